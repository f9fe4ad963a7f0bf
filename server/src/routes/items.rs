//! `/api/v1/items`: tenant-scoped CRUD. Every query runs in the request's
//! tenant transaction; row-level security does the scoping, so no query
//! here names a tenant.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tollgate::tenant::Tx;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;
use uuid::Uuid;

use super::{Class, Route};
use crate::error::AppError;

/// Longest `name`, in characters.
pub const NAME_MAX: usize = 200;
/// Longest `body`, in characters.
pub const BODY_MAX: usize = 10_000;
/// Largest page.
pub const PAGE_MAX: u32 = 100;

/// The routes: reads and writes.
pub fn routes() -> Vec<Route> {
    vec![
        Route::new(Class::Read, routes!(list)),
        Route::new(Class::Read, routes!(fetch)),
        Route::new(Class::Write, routes!(create)),
        Route::new(Class::Write, routes!(update)),
        Route::new(Class::Write, routes!(remove)),
    ]
}

/// An item.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Item {
    /// Its id.
    pub id: Uuid,
    /// A short name.
    pub name: String,
    /// Free text.
    pub body: String,
    /// When it was created.
    #[serde(serialize_with = "timestamp")]
    pub created_at: DateTime<Utc>,
    /// When it was last changed.
    #[serde(serialize_with = "timestamp")]
    pub updated_at: DateTime<Utc>,
}

/// A timestamp exactly as chrono's `Serialize` writes it (RFC 3339, `Z`,
/// as many fraction digits as it needs: 0, 3, 6 or 9), written by hand
/// into a stack buffer and handed over whole. Given chrono's `Display`,
/// serde_json escapes each piece chrono writes as a string of its own
/// (about 100 instructions a character); chrono's own `to_rfc3339_opts`
/// goes through `fmt` into a new `String` (about 1 100 instructions a
/// timestamp). A page has 40 of them. Years outside 0 to 9999 and leap
/// seconds, which chrono writes its own way, are left to chrono.
fn timestamp<S: serde::Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    // Read the fields once: each accessor of a `DateTime` would add its
    // (zero) offset again.
    let utc = at.naive_utc();
    let (year, nanos) = (utc.year(), utc.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    }
    // "YYYY-MM-DDTHH:MM:SS" ".nnnnnnnnn" "Z"
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    let mut digits = |from: usize, width: usize, mut n: u32| {
        for i in (from..from + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    digits(0, 4, year as u32);
    digits(5, 2, utc.month());
    digits(8, 2, utc.day());
    digits(11, 2, utc.hour());
    digits(14, 2, utc.minute());
    digits(17, 2, utc.second());
    let fraction = match nanos {
        0 => 0,
        n if n % 1_000_000 == 0 => 3,
        n if n % 1_000 == 0 => 6,
        _ => 9,
    };
    digits(20, 9, nanos);
    let end = if fraction == 0 { 19 } else { 20 + fraction };
    text[end] = b'Z';
    // ASCII digits and punctuation only.
    let text = std::str::from_utf8(&text[..=end]).expect("ASCII");
    serializer.serialize_str(text)
}

/// A new item, or an item's new content.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemInput {
    /// 1 to 200 characters, not blank (some character other than space,
    /// tab, CR, LF, VT or FF), no NUL; stored without leading and trailing
    /// blanks.
    #[schema(
        example = "First item",
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00]*[^\x00 \t\n\r\x0b\x0c][^\x00]*$"
    )]
    pub name: String,
    /// Up to 10 000 characters, no NUL.
    #[serde(default)]
    #[schema(max_length = 10000, pattern = r"^[^\x00]*$")]
    pub body: String,
}

/// The characters a name may not consist of alone, and is stored without at
/// either end: the same set as the documented `pattern` (a Unicode notion
/// of white space differs between the regex engines clients validate with).
fn blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

impl ItemInput {
    /// The name as stored.
    fn stored_name(&self) -> &str {
        self.name.trim_matches(blank)
    }
}

impl ItemInput {
    fn validate(&self) -> Result<(), AppError> {
        let mut errors = Vec::new();
        let name = self.stored_name();
        if name.is_empty() || self.name.chars().count() > NAME_MAX {
            errors.push(format!("name: 1 to {NAME_MAX} characters, not blank"));
        }
        if self.body.chars().count() > BODY_MAX {
            errors.push(format!("body: at most {BODY_MAX} characters"));
        }
        // Postgres text cannot hold NUL (SQLSTATE 22021): refuse it here.
        if self.name.contains('\0') {
            errors.push("name: must not contain NUL (U+0000)".to_owned());
        }
        if self.body.contains('\0') {
            errors.push("body: must not contain NUL (U+0000)".to_owned());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AppError::Invalid(errors))
        }
    }
}

/// Paging through items, oldest first.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<Uuid>,
}

/// A page of items.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemPage {
    /// The items.
    pub items: Vec<Item>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<Uuid>,
}

/// The columns an [`Item`] is read from, as a macro so queries stay
/// `&'static str` (`concat!`), built at compile time.
macro_rules! columns {
    () => {
        "id, name, body, created_at, updated_at"
    };
}

/// The list's first page (`$1`: rows to read). Keyset pagination on
/// (created_at, id): stable under inserts.
///
/// Two statements, not one with `$2 IS NULL OR …`: Postgres would plan
/// that one again on every execution. Its generic plan keeps the cursor's
/// subquery, which a custom plan for a first page drops; and the planner
/// cannot see the tenant the policy filters on, so it expects one row and
/// every custom plan looks cheaper than the generic one, which Postgres
/// then never switches to.
pub const LIST_FIRST_PAGE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM items WHERE deleted_at IS NULL ORDER BY created_at, id LIMIT $1"
);

/// The list's page after the item `$2` (`$1`: rows to read). An unknown
/// cursor (another tenant's item, say) reads nothing.
pub const LIST_AFTER: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM items WHERE deleted_at IS NULL
        AND (created_at, id) > (SELECT created_at, id FROM items WHERE id = $2)
      ORDER BY created_at, id LIMIT $1"
);

/// Lists the tenant's items.
#[utoipa::path(
    get, path = "/api/v1/items", tag = "items",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ItemPage),
        (status = 400, description = "A query that does not parse", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "limit outside 1 to 100", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn list(
    mut tx: Tx,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ItemPage>, AppError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(AppError::Invalid(vec![format!("limit: 1 to {PAGE_MAX}")]));
    }
    // Input checked: only now take a connection.
    let page = match query.after {
        None => sqlx::query_as(LIST_FIRST_PAGE).bind(i64::from(limit) + 1),
        Some(after) => sqlx::query_as(LIST_AFTER)
            .bind(i64::from(limit) + 1)
            .bind(after),
    };
    let mut items: Vec<Item> = page.fetch_all(tx.conn().await?).await?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|i| i.id)
    } else {
        None
    };
    Ok(Json(ItemPage { items, next }))
}

/// Creates an item in the caller's tenant.
#[utoipa::path(
    post, path = "/api/v1/items", tag = "items",
    request_body = ItemInput,
    security(("bearer" = [])),
    responses(
        (status = 201, body = Item, headers(("location" = String, description = "The new item's URL"))),
        crate::openapi::BodyErrors,
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn create(
    mut tx: Tx,
    input: Result<Json<ItemInput>, JsonRejection>,
) -> Result<impl IntoResponse, AppError> {
    // The body is read and checked before the transaction begins, so a
    // slow client holds no pooled connection.
    let Json(input) = input?;
    input.validate()?;
    let item: Item = sqlx::query_as(concat!(
        "INSERT INTO items (name, body) VALUES ($1, $2) RETURNING ",
        columns!()
    ))
    .bind(input.stored_name())
    .bind(&input.body)
    .fetch_one(tx.conn().await?)
    .await?;
    let location = format!("/api/v1/items/{}", item.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(item),
    ))
}

/// One item.
#[utoipa::path(
    get, path = "/api/v1/items/{id}", tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Item),
        (status = 400, description = "Not a UUID", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such item in this tenant", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn fetch(
    mut tx: Tx,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<Item>, AppError> {
    let Path(id) = id?;
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM items WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(tx.conn().await?)
    .await?
    .map(Json)
    .ok_or(AppError::NotFound)
}

/// Replaces an item's name and body.
#[utoipa::path(
    put, path = "/api/v1/items/{id}", tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    request_body = ItemInput,
    security(("bearer" = [])),
    responses(
        (status = 200, body = Item),
        crate::openapi::BodyErrors,
        (status = 404, description = "No such item in this tenant", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn update(
    mut tx: Tx,
    id: Result<Path<Uuid>, PathRejection>,
    input: Result<Json<ItemInput>, JsonRejection>,
) -> Result<Json<Item>, AppError> {
    let Path(id) = id?;
    let Json(input) = input?;
    input.validate()?;
    sqlx::query_as(concat!(
        "UPDATE items SET name = $2, body = $3, updated_at = now()
          WHERE id = $1 AND deleted_at IS NULL RETURNING ",
        columns!()
    ))
    .bind(id)
    .bind(input.stored_name())
    .bind(&input.body)
    .fetch_optional(tx.conn().await?)
    .await?
    .map(Json)
    .ok_or(AppError::NotFound)
}

/// Deletes an item (it is purged for good after `ITEM_RETENTION`).
#[utoipa::path(
    delete, path = "/api/v1/items/{id}", tag = "items",
    params(("id" = Uuid, Path, description = "The item's id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Not a UUID", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such item in this tenant", body = crate::openapi::Problem, content_type = "application/problem+json"),
        crate::openapi::TenantRouteErrors,
    )
)]
pub async fn remove(
    mut tx: Tx,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<StatusCode, AppError> {
    let Path(id) = id?;
    // Soft delete: the cleanup job purges it after ITEM_RETENTION.
    let deleted =
        sqlx::query("UPDATE items SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .execute(tx.conn().await?)
            .await?
            .rows_affected();
    if deleted == 0 {
        return Err(AppError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// Written as chrono's own `Serialize` writes it, at every precision a
    /// timestamp can have, and past year 9999.
    #[test]
    fn timestamps_serialize_as_chrono_does() {
        let nanos = [
            0,
            1_000,
            120_000,
            123_000_000,
            123_456_000,
            123_456_789,
            999_999_999,
        ];
        for (secs, nanos) in nanos
            .iter()
            .map(|&n| (1_765_000_000, n))
            // Year 10000, year 9999's last second, year 0, 1970, a date
            // with every field two-digit, a leap second.
            .chain([
                (253_402_300_800, 5_000),
                (253_402_300_799, 7),
                (-62_167_219_200, 0),
                (0, 0),
                (1_700_000_000, 1),
                (1_483_228_799, 1_500_000_000),
            ])
        {
            let at = Utc.timestamp_opt(secs, nanos).unwrap();
            let item = Item {
                id: Uuid::nil(),
                name: String::new(),
                body: String::new(),
                created_at: at,
                updated_at: at,
            };
            let json = serde_json::to_value(&item).unwrap();
            let chrono = serde_json::to_value(at).unwrap();
            assert_eq!(json["created_at"], chrono, "{secs}.{nanos}");
            assert_eq!(json["updated_at"], chrono, "{secs}.{nanos}");
        }
    }
}
