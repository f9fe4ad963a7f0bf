//! The command line: `tollgate-server` serves; subcommands manage the
//! schema, tenants and users.

use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::auth::hash_password;
use crate::config::{ConfigError, DatabaseConfig, LimitsConfig};
use crate::db::{self, DbError};
use crate::plans::{LimitName, PlanTable, TenantPlan, parse_value};
use crate::trust::{Trust, change_level};
use tollgate::tenant::{Access, TenantId, begin};

/// The Tollgate reference server. Without a subcommand it serves; every
/// setting comes from environment variables (see the README).
#[derive(Debug, Parser)]
#[command(name = "tollgate-server", version)]
pub struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints the configuration table (Markdown) the README carries.
    ConfigTable,
    /// Applies pending migrations, as `MIGRATION_DATABASE_URL` (else
    /// `DATABASE_URL`), and exits.
    Migrate,
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Users.
    #[command(subcommand)]
    User(UserCommand),
}

/// `tenant …`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant on `TENANT_DEFAULT_PLAN` and prints its id.
    Add {
        /// Its display name.
        name: String,
    },
    /// Moves a tenant to another plan, live on every replica.
    SetPlan {
        /// The tenant's id.
        tenant: Uuid,
        /// One of `TENANT_PLANS`.
        plan: String,
    },
    /// Overrides one of a tenant's limits (`default`: back to the plan's).
    SetLimit {
        /// The tenant's id.
        tenant: Uuid,
        /// `tenant`, `read`, `write` or `concurrency`.
        limit: String,
        /// A quota (`100/min,burst=20`), for `concurrency` a number or
        /// `unlimited`; or `default`.
        quota: String,
    },
    /// Prints a tenant's plan, overrides and effective limits (JSON).
    Show {
        /// The tenant's id.
        tenant: Uuid,
    },
}

/// `user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Creates a user in a tenant and prints its id.
    Add {
        /// The tenant's id.
        #[arg(long)]
        tenant: Uuid,
        /// The login e-mail (stored lower case).
        #[arg(long)]
        email: String,
        /// The password (hashed with argon2id).
        #[arg(long)]
        password: String,
        /// One of `TRUST_LEVELS` (default: the first, lowest).
        #[arg(long)]
        trust_level: Option<String>,
    },
    /// Changes a user's trust level; it applies from the user's next token.
    SetTrust {
        /// The user's e-mail.
        #[arg(long)]
        email: String,
        /// One of `TRUST_LEVELS`.
        #[arg(long)]
        level: String,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad environment.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad argument.
    #[error("{0}")]
    Usage(String),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl CliError {
    /// 2 for a bad argument or setting (as clap's usage errors and a bad
    /// configuration of the server), 1 when the database failed.
    pub fn exit_code(&self) -> std::process::ExitCode {
        match self {
            Self::Config(_) | Self::Usage(_) => std::process::ExitCode::from(2),
            Self::Db(_) => std::process::ExitCode::FAILURE,
        }
    }
}

impl From<sqlx::Error> for CliError {
    fn from(err: sqlx::Error) -> Self {
        // Classified: a pooler's signature gets its hint.
        Self::Db(DbError::from(err))
    }
}

/// Runs `command`, printing its result on stdout.
pub async fn run(command: Command) -> Result<(), CliError> {
    if let Command::ConfigTable = command {
        print!("{}", crate::config::markdown_table());
        return Ok(());
    }
    let lookup = |name: &str| std::env::var(name).ok();
    let database = DatabaseConfig::from_lookup(lookup)?;
    match command {
        Command::ConfigTable => {}
        Command::Migrate => {
            db::migrate(&database).await?;
            println!("migrations applied");
        }
        Command::Tenant(TenantCommand::Add { name }) => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 200 {
                return Err(CliError::Usage("NAME: 1 to 200 characters".to_owned()));
            }
            let pool = db::pool(&database)?;
            // The id is chosen here so the insert can run as that tenant:
            // the tenants table is under row-level security too.
            let id = Uuid::new_v4();
            let plans = PlanTable::from_lookup(lookup)?;
            let mut tx = begin(&pool, TenantId::new(id), Access::ReadWrite).await?;
            sqlx::query("INSERT INTO tenants (id, name, plan) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(name)
                .bind(&**plans.name(plans.default_plan()))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            println!("{id}");
        }
        Command::Tenant(TenantCommand::SetPlan { tenant, plan }) => {
            let plans = PlanTable::from_lookup(lookup)?;
            let plan = plans.parse(plan.trim()).map_err(CliError::Usage)?;
            let shown = plan_change(&database, &plans, tenant, |conn, plans, origin| {
                Box::pin(crate::plans::set_plan(conn, plans, origin, tenant, plan))
            })
            .await?;
            println!("{shown}");
        }
        Command::Tenant(TenantCommand::SetLimit {
            tenant,
            limit,
            quota,
        }) => {
            let plans = PlanTable::from_lookup(lookup)?;
            let limit = LimitName::parse(&limit).map_err(CliError::Usage)?;
            let value = match quota.trim() {
                "default" => None,
                quota => {
                    parse_value(limit, quota).map_err(CliError::Usage)?;
                    Some(quota.to_owned())
                }
            };
            let shown = plan_change(&database, &plans, tenant, move |conn, plans, origin| {
                Box::pin(async move {
                    crate::plans::set_limit(conn, plans, origin, tenant, limit, value.as_deref())
                        .await
                })
            })
            .await?;
            println!("{shown}");
        }
        Command::Tenant(TenantCommand::Show { tenant }) => {
            let plans = PlanTable::from_lookup(lookup)?;
            let shown = plan_change(&database, &plans, tenant, |conn, plans, _| {
                Box::pin(crate::plans::show(conn, plans, tenant))
            })
            .await?;
            println!("{shown}");
        }
        Command::User(UserCommand::Add {
            tenant,
            email,
            password,
            trust_level,
        }) => {
            let limits = LimitsConfig::from_lookup(lookup)?;
            let level = match trust_level {
                Some(level) => known_level(&limits, &level)?,
                None => limits.trust.lowest(),
            };
            let email = email.trim().to_lowercase();
            if email.len() < 3 || email.len() > 254 || !email.contains('@') {
                return Err(CliError::Usage(format!(
                    "--email {email:?}: not an e-mail address"
                )));
            }
            if password.len() < 8 || password.len() > 1024 {
                return Err(CliError::Usage("--password: 8 to 1024 bytes".to_owned()));
            }
            let pool = db::pool(&database)?;
            let hash = tokio::task::spawn_blocking(move || hash_password(&password))
                .await
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let mut tx = begin(&pool, TenantId::new(tenant), Access::ReadWrite).await?;
            let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tenants")
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(CliError::Usage(format!(
                    "--tenant {tenant}: no such tenant"
                )));
            }
            let id: Uuid = sqlx::query_scalar(
                "INSERT INTO users (tenant_id, email, password_hash, trust_level)
                 VALUES ($1, $2, $3, $4) RETURNING id",
            )
            .bind(tenant)
            .bind(&email)
            .bind(&hash)
            .bind(&*level.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| match &err {
                sqlx::Error::Database(db) if db.is_unique_violation() => {
                    CliError::Usage(format!("--email {email}: already registered"))
                }
                _ => err.into(),
            })?;
            tx.commit().await?;
            println!("{id}");
        }
        Command::User(UserCommand::SetTrust { email, level }) => {
            let limits = LimitsConfig::from_lookup(lookup)?;
            let level = known_level(&limits, &level)?;
            let pool = db::pool(&database)?;
            // Every query in a transaction: DATABASE_URL may be a pooler.
            let mut lookup = pool.begin_with("BEGIN READ ONLY").await?;
            let user: Option<(Uuid, Uuid)> =
                sqlx::query_as("SELECT user_id, tenant_id FROM auth_lookup($1)")
                    .bind(email.trim())
                    .fetch_optional(&mut *lookup)
                    .await?;
            lookup.commit().await?;
            let Some((user_id, tenant)) = user else {
                return Err(CliError::Usage(format!("--email {email}: no such user")));
            };
            let mut tx = begin(&pool, TenantId::new(tenant), Access::ReadWrite).await?;
            // Every replica drops its cached level when this commits; this
            // process caches nothing, so any origin id will do.
            change_level(&mut tx, Uuid::new_v4(), user_id, &level).await?;
            tx.commit().await?;
            println!("{user_id} {}", level.name);
        }
    }
    Ok(())
}

/// Runs `work` in a transaction of `tenant` and returns what it shows, as
/// JSON; exit 2 when there is no such tenant. A change announces itself
/// to every replica on commit; this process caches nothing, so any origin
/// id will do.
async fn plan_change<F>(
    database: &DatabaseConfig,
    plans: &PlanTable,
    tenant: Uuid,
    work: F,
) -> Result<String, CliError>
where
    F: for<'c> FnOnce(
        &'c mut sqlx::PgConnection,
        &'c PlanTable,
        Uuid,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = sqlx::Result<Option<TenantPlan>>> + Send + 'c>,
    >,
{
    let pool = db::pool(database)?;
    let mut tx = begin(&pool, TenantId::new(tenant), Access::ReadWrite).await?;
    let shown = work(&mut tx, plans, Uuid::new_v4()).await?;
    let Some(shown) = shown else {
        return Err(CliError::Usage(format!("tenant {tenant}: no such tenant")));
    };
    tx.commit().await?;
    Ok(serde_json::to_string_pretty(&shown).unwrap_or_default())
}

fn known_level(limits: &LimitsConfig, level: &str) -> Result<Trust, CliError> {
    limits.trust.parse(level).map_err(|known| {
        CliError::Usage(format!(
            "trust level {level:?} is not configured in TRUST_LEVELS: {known}"
        ))
    })
}
