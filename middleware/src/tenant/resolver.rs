//! Where a request's tenant comes from: [`TenantResolver`] and its
//! built-ins.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use http::request::Parts;
use http::{HeaderName, StatusCode, header};
use uuid::Uuid;

use crate::problem::Problem;

/// A validated tenant id: a UUID, or a text id of a documented character
/// set, so it is safe to hand to Postgres (it is written into the
/// transaction's `SET LOCAL`) and to use as a rate-limit key.
///
/// Text ids are 1 to [`TenantId::MAX_TEXT_LEN`] characters of `A-Z a-z 0-9`
/// and `_ - . :` (slugs like `acme-corp`, integers like `4711`, prefixed
/// ids like `org:42`); no quote, backslash, space, NUL or other control
/// character can get in. A string in UUID form is always the UUID (and is
/// normalised to lower-case hyphenated). Parsing (`str::parse`) accepts
/// UUIDs only, as before; text ids are opt-in ([`TenantId::text`],
/// [`TenantId::parse_any`], the resolvers' `allow_text_ids`), so a service
/// whose policies cast the setting to `uuid` never gets one.
///
/// ```
/// use tollgate::tenant::TenantId;
///
/// let slug = TenantId::parse_any("acme-corp").unwrap();
/// assert_eq!(slug.to_string(), "acme-corp");
/// assert_eq!(slug.as_uuid(), None);
/// let id = TenantId::parse_any("0B9E3D4C-7C0E-4A55-9D8E-3F0A1B2C3D4E").unwrap();
/// assert_eq!(id.to_string(), "0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e");
/// assert!(id.as_uuid().is_some());
/// assert!(TenantId::parse_any("acme corp").is_err());
/// assert!(TenantId::parse_any("it's").is_err());
/// assert!(TenantId::parse_any("").is_err());
/// assert!("acme-corp".parse::<TenantId>().is_err(), "parse: UUIDs only");
/// ```
///
/// The row-level security policy compares with the setting as its column
/// is typed: `tenant_id = nullif(current_setting('app.tenant_id', true),
/// '')::uuid` for a `uuid` column, `tenant_id = nullif(current_setting(
/// 'app.tenant_id', true), '')` for a `text` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Repr);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    Uuid(Uuid),
    /// Checked ASCII, `len` bytes used: kept inline so the id stays `Copy`.
    Text {
        len: u8,
        bytes: [u8; TenantId::MAX_TEXT_LEN],
    },
}

impl TenantId {
    /// The longest text id.
    pub const MAX_TEXT_LEN: usize = 63;

    /// The tenant with this UUID.
    pub const fn new(id: Uuid) -> Self {
        Self(Repr::Uuid(id))
    }

    /// The tenant with this text id, if it is 1 to [`MAX_TEXT_LEN`](Self::MAX_TEXT_LEN)
    /// characters of `A-Z a-z 0-9 _ - . :`.
    pub fn text(id: &str) -> Result<Self, TenantRejection> {
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
        if id.is_empty() || id.len() > Self::MAX_TEXT_LEN || !id.bytes().all(|b| allowed(&b)) {
            return Err(TenantRejection::Invalid(format!(
                "the tenant id {id:?} is neither a UUID nor 1 to {} characters of A-Z a-z 0-9 _ - . :",
                Self::MAX_TEXT_LEN
            )));
        }
        let mut bytes = [0; Self::MAX_TEXT_LEN];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Ok(Self(Repr::Text {
            len: id.len() as u8,
            bytes,
        }))
    }

    /// A UUID when `id` is in UUID form, else a [text id](Self::text):
    /// for services whose tenants are slugs or numbers (resolvers:
    /// [`FromHeader::allow_text_ids`], [`FromSubdomain::allow_text_ids`]).
    pub fn parse_any(id: &str) -> Result<Self, TenantRejection> {
        match Uuid::try_parse(id) {
            Ok(id) => Ok(Self::new(id)),
            Err(_) => Self::text(id),
        }
    }

    /// The UUID, for a UUID tenant.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match self.0 {
            Repr::Uuid(id) => Some(id),
            Repr::Text { .. } => None,
        }
    }
}

impl TenantId {
    /// Appends the id as [`Display`](fmt::Display) writes it, without
    /// `fmt` (the tenant transaction's statement is made per request).
    pub(crate) fn push_to(&self, out: &mut String) {
        match &self.0 {
            Repr::Uuid(id) => {
                out.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
            Repr::Text { len, bytes } => {
                out.push_str(std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default());
            }
        }
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            // Hyphenated lower-case hex: only `[0-9a-f-]`.
            Repr::Uuid(id) => id.as_hyphenated().fmt(f),
            // Checked on the way in: ASCII of the documented set.
            Repr::Text { len, bytes } => {
                f.write_str(std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default())
            }
        }
    }
}

impl FromStr for TenantId {
    type Err = TenantRejection;

    /// A UUID only: a service whose tenants are UUIDs (and whose policies
    /// cast the setting to `uuid`) never sees a text id. See
    /// [`TenantId::parse_any`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s)
            .map(Self::new)
            .map_err(|_| TenantRejection::Invalid(format!("the tenant id {s:?} is not a UUID")))
    }
}

impl From<Uuid> for TenantId {
    fn from(id: Uuid) -> Self {
        Self::new(id)
    }
}

/// Why a request has no usable tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantRejection {
    /// The route needs a tenant and the request names none: 401.
    #[error("the request names no tenant")]
    Missing,
    /// The request names a tenant that is not a valid id: 400.
    #[error("{0}")]
    Invalid(String),
}

impl TenantRejection {
    /// The problem details answered for this rejection.
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::Missing => Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized")
                .with_detail("this route needs an authenticated tenant"),
            Self::Invalid(detail) => {
                Problem::new(StatusCode::BAD_REQUEST, "Invalid tenant").with_detail(detail.clone())
            }
        }
    }
}

/// Finds the tenant of a request.
///
/// Implement it for your own source of tenants; the built-ins are
/// [`FromClaims`] (the default choice: what the authentication layer
/// verified), [`FromHeader`] and [`FromSubdomain`].
pub trait TenantResolver: Clone + Send + Sync + 'static {
    /// The request's tenant, or why it has none.
    fn resolve(&self, parts: &Parts) -> Result<TenantId, TenantRejection>;
}

/// Claims, put in request extensions by an authentication layer, that name
/// a tenant. Implement it for your claims type to use [`FromClaims`].
pub trait TenantClaims: Clone + Send + Sync + 'static {
    /// The tenant the token was issued for, or why it names none (say, a
    /// claim that is not a tenant id: [`TenantRejection::Invalid`]).
    /// Claims that hold a [`TenantId`] already return it as is; claims
    /// that hold text parse it here, once.
    fn tenant(&self) -> Result<TenantId, TenantRejection>;
}

/// The tenant from verified claims of type `C` in the request extensions.
///
/// No claims (no authentication layer ran, or it let the request through
/// anonymously) is [`TenantRejection::Missing`]. Nothing the client sends
/// besides its token is read: a tenant header cannot override the token.
pub struct FromClaims<C>(PhantomData<fn() -> C>);

impl<C> FromClaims<C> {
    /// Reads claims of type `C`.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<C> Default for FromClaims<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> Clone for FromClaims<C> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<C> fmt::Debug for FromClaims<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FromClaims")
            .field(&std::any::type_name::<C>())
            .finish()
    }
}

impl<C: TenantClaims> TenantResolver for FromClaims<C> {
    fn resolve(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        parts
            .extensions
            .get::<C>()
            .ok_or(TenantRejection::Missing)?
            .tenant()
    }
}

/// The tenant from a request header, e.g. `X-Tenant-Id`.
///
/// Only for traffic that a trusted component has authenticated already
/// (an internal service, a gateway that sets the header): a client can put
/// any value in a header.
#[derive(Debug, Clone)]
pub struct FromHeader {
    name: HeaderName,
    text_ids: bool,
}

impl FromHeader {
    /// Reads the header `name`: a UUID.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            text_ids: false,
        }
    }

    /// Accepts text ids too ([`TenantId::parse_any`]).
    #[must_use]
    pub fn allow_text_ids(mut self) -> Self {
        self.text_ids = true;
        self
    }
}

impl TenantResolver for FromHeader {
    fn resolve(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        let value = parts
            .headers
            .get(&self.name)
            .ok_or(TenantRejection::Missing)?;
        let value = value
            .to_str()
            .map_err(|_| TenantRejection::Invalid(format!("{} is not text", self.name)))?
            .trim();
        if self.text_ids {
            TenantId::parse_any(value)
        } else {
            value.parse()
        }
    }
}

/// The tenant from the first label of the `Host` (or, in HTTP/2, the
/// `:authority`) under a base domain: `<tenant>.api.example.com`.
#[derive(Debug, Clone)]
pub struct FromSubdomain {
    /// `.api.example.com`, lower case, with its leading dot.
    suffix: String,
    text_ids: bool,
}

impl FromSubdomain {
    /// Tenants are subdomains of `base_domain` (e.g. `api.example.com`).
    pub fn new(base_domain: &str) -> Self {
        Self {
            suffix: format!(".{}", base_domain.trim_matches('.').to_ascii_lowercase()),
            text_ids: false,
        }
    }

    /// Accepts text ids too (`acme.api.example.com`; [`TenantId::parse_any`]).
    #[must_use]
    pub fn allow_text_ids(mut self) -> Self {
        self.text_ids = true;
        self
    }
}

impl TenantResolver for FromSubdomain {
    fn resolve(&self, parts: &Parts) -> Result<TenantId, TenantRejection> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.host())
            .ok_or(TenantRejection::Missing)?;
        // Strip a port, then compare without regard to case.
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let host = host.to_ascii_lowercase();
        let label = host
            .strip_suffix(&self.suffix)
            .ok_or(TenantRejection::Missing)?;
        if label.contains('.') {
            return Err(TenantRejection::Invalid(format!(
                "{host:?} is not a single label under {}",
                &self.suffix[1..]
            )));
        }
        if self.text_ids {
            TenantId::parse_any(label)
        } else {
            label.parse()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b9e3d4c-7c0e-4a55-9d8e-3f0a1b2c3d4e";

    #[derive(Clone)]
    struct Claims(&'static str);
    impl TenantClaims for Claims {
        fn tenant(&self) -> Result<TenantId, TenantRejection> {
            self.0.parse()
        }
    }

    fn parts(build: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        build(http::Request::builder())
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn claims_are_the_default_source() {
        let resolver = FromClaims::<Claims>::new();
        let mut p = parts(|b| b.header("x-tenant-id", "11111111-1111-1111-1111-111111111111"));
        assert_eq!(resolver.resolve(&p), Err(TenantRejection::Missing));
        p.extensions.insert(Claims(A));
        assert_eq!(resolver.resolve(&p).unwrap().to_string(), A);
        p.extensions.insert(Claims("tenant-a"));
        assert!(matches!(
            resolver.resolve(&p),
            Err(TenantRejection::Invalid(_))
        ));
    }

    #[test]
    fn header() {
        let resolver = FromHeader::new(HeaderName::from_static("x-tenant-id"));
        assert_eq!(
            resolver.resolve(&parts(|b| b)),
            Err(TenantRejection::Missing)
        );
        let ok = resolver
            .resolve(&parts(|b| b.header("x-tenant-id", A)))
            .unwrap();
        assert_eq!(ok.to_string(), A);
        let bad = resolver.resolve(&parts(|b| b.header("x-tenant-id", "1; DROP TABLE")));
        assert_eq!(bad.unwrap_err().to_problem().status(), 400);
    }

    #[test]
    fn subdomain() {
        let resolver = FromSubdomain::new("api.example.com");
        let host = |h: &str| resolver.resolve(&parts(|b| b.header("host", h)));
        assert_eq!(
            host(&format!("{A}.API.example.com:8443"))
                .unwrap()
                .to_string(),
            A
        );
        assert_eq!(host("api.example.com"), Err(TenantRejection::Missing));
        assert_eq!(host("evil.com"), Err(TenantRejection::Missing));
        assert!(matches!(
            host("x.y.api.example.com"),
            Err(TenantRejection::Invalid(_))
        ));
        assert_eq!(
            TenantRejection::Missing.to_problem().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
