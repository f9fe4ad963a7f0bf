//! Logins and tokens: argon2 password hashes, HS256 JWTs carrying subject,
//! tenant and trust level, and the layer that verifies them.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, password_hash::rand_core::OsRng};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tollgate::tenant::{TenantClaims, TenantId, TenantRejection};
use uuid::Uuid;

use crate::error::AppError;

/// What a token says, put in request extensions by [`require_auth`].
/// Its text is shared (`Arc<str>`): the verified claims are cached, and
/// each request gets a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    /// The user's tenant (a token naming anything else does not verify).
    pub tenant: Uuid,
    /// The user's trust level when the token was issued.
    pub trust: Arc<str>,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Who issued it (`AUTH_ISSUER`).
    pub iss: Arc<str>,
    /// Whom it is for (`AUTH_AUDIENCE`).
    pub aud: Arc<str>,
}

impl TenantClaims for Claims {
    fn tenant(&self) -> Result<TenantId, TenantRejection> {
        Ok(TenantId::new(self.tenant))
    }
}

/// At most this many verified tokens are remembered (about 0.5 KiB each:
/// the token and its claims).
pub const VERIFIED_TOKENS_MAX: u64 = 10_000;

/// Issues and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct Tokens {
    issuer: Arc<str>,
    audience: Arc<str>,
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    validation: Arc<Validation>,
    ttl: Duration,
    /// Tokens that verified, with their claims: a client sends the same
    /// token with every request, and decoding it (base64, HMAC, JSON) was
    /// about a tenth of the tenant route's instructions. Only tokens we
    /// signed get in, so garbage cannot fill it; it is bounded anyway, and
    /// an entry is never used past the token's `exp`. Hashed with
    /// foldhash: SipHash over a token of some 200 bytes was most of a hit.
    verified: moka::sync::Cache<Box<str>, Claims, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("ttl", &self.ttl).finish()
    }
}

impl Tokens {
    /// HS256 with `secret`; tokens valid for `ttl`, issued by `issuer`
    /// for `audience`, and only such tokens accepted: a token another
    /// service signed with a shared key is not one of ours.
    pub fn new(secret: &[u8], ttl: Duration, issuer: &str, audience: &str) -> Self {
        Self::with_capacity(secret, ttl, issuer, audience, VERIFIED_TOKENS_MAX)
    }

    fn with_capacity(
        secret: &[u8],
        ttl: Duration,
        issuer: &str,
        audience: &str,
        verified_max: u64,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        // Replicas share a clock source closely enough.
        validation.leeway = 5;
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            encoding: Arc::new(EncodingKey::from_secret(secret)),
            decoding: Arc::new(DecodingKey::from_secret(secret)),
            validation: Arc::new(validation),
            ttl,
            verified: moka::sync::Cache::builder()
                .max_capacity(verified_max)
                // No entry outlives the longest-lived token we issue.
                .time_to_live(ttl.max(Duration::from_secs(1)))
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// How long a new token is valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A token for this user.
    pub fn issue(&self, sub: Uuid, tenant: Uuid, trust: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        self.sign(&Claims {
            sub,
            tenant,
            trust: trust.into(),
            iat: now,
            exp: now.saturating_add(self.ttl.as_secs()),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        })
    }

    /// Signs any claims (tests use it for expired tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 over serializable claims cannot fail")
    }

    /// The claims of a valid, unexpired token signed with our secret.
    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        if let Some(claims) = self.verified.get(token) {
            // Past `exp`, decoding decides again (it allows the leeway).
            if claims.exp > jsonwebtoken::get_current_timestamp() {
                return Ok(claims);
            }
        }
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        self.verified.insert(token.into(), claims.clone());
        Ok(claims)
    }
}

/// Rejects requests without a valid bearer token (401 problem+json with
/// `WWW-Authenticate: Bearer`); puts [`Claims`] in request extensions. A
/// [`StepLayer`](crate::step::StepLayer) step.
// A step's result; the request (the larger variant) is moved on anyway.
#[allow(clippy::result_large_err)]
pub fn require_auth(tokens: &Tokens, mut req: Request) -> Result<Request, Response> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let Some(token) = token else {
        return Err(AppError::Unauthorized("a bearer token is required").into_response());
    };
    match tokens.verify(token.trim()) {
        Ok(claims) => {
            req.extensions_mut().insert(claims);
            Ok(req)
        }
        Err(err) => {
            tracing::debug!(%err, "token rejected");
            Err(AppError::Unauthorized("the token is invalid or expired").into_response())
        }
    }
}

/// `tollgate_auth_hash_rejected_total`: logins refused because every
/// hashing worker was busy and the queue full.
pub const HASH_REJECTED: &str = "tollgate_auth_hash_rejected_total";
/// `tollgate_auth_hash_in_flight`: logins admitted to hashing (running or
/// queued).
pub const HASH_IN_FLIGHT: &str = "tollgate_auth_hash_in_flight";

/// Bounds password hashing: Argon2 takes tens of milliseconds of CPU and
/// about 19 MiB of memory per hash, so it runs on `workers` threads of its
/// own (started once; not the blocking pool, whose threads come and go and
/// would each keep an allocator arena with Argon2's memory in it), at most
/// `queue` more logins wait, and a login beyond that is refused at once
/// (503) instead of piling up memory and threads.
#[derive(Debug, Clone)]
pub struct HashGate {
    jobs: std::sync::mpsc::SyncSender<HashJob>,
    admitted: Arc<tokio::sync::Semaphore>,
}

/// A password to check, where to send the answer, and the login's place,
/// given back by the worker once the job is done (or skipped).
type HashJob = (
    Option<String>,
    String,
    tokio::sync::oneshot::Sender<bool>,
    Admitted,
);

/// The job could not be queued: answered 503, never "wrong password".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashQueueFull;

/// A login's place at the [`HashGate`]: running or queued.
#[derive(Debug)]
pub struct Admitted(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!(HASH_IN_FLIGHT).decrement(1.0);
    }
}

impl HashGate {
    /// `workers` hashing threads, `queue` more logins waiting. The threads
    /// end when the last clone of the gate is dropped.
    pub fn new(workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        // Admission bounds what is queued, so the channel never blocks.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<HashJob>(workers + queue);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tollgate-argon2-{i}"))
                .spawn(move || {
                    lower_priority();
                    // Argon2's memory, allocated once per thread and reused:
                    // a fresh 19 MiB per hash would be kept by the allocator
                    // (glibc raises its mmap threshold after the first free).
                    let mut blocks = Vec::new();
                    loop {
                        // One waiter takes the next job; a poisoned lock
                        // still holds a usable receiver.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((hash, password, answer, _place)) = job else {
                            return;
                        };
                        // A login cancelled while queued (client gone,
                        // request timeout) still held its place until
                        // here; its hash is not computed.
                        if answer.is_closed() {
                            continue;
                        }
                        let _ = answer.send(verify_password_with(
                            &mut blocks,
                            hash.as_deref(),
                            &password,
                        ));
                        // `_place` is released here, after the hash.
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(%err, "cannot start a password hashing thread");
            }
        }
        Self {
            jobs,
            admitted: Arc::new(tokio::sync::Semaphore::new(workers + queue)),
        }
    }

    /// A place, or `None` when workers and queue are full.
    pub fn admit(&self) -> Option<Admitted> {
        match self.admitted.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!(HASH_IN_FLIGHT).increment(1.0);
                Some(Admitted(permit))
            }
            Err(_) => {
                metrics::counter!(HASH_REJECTED).increment(1);
                None
            }
        }
    }

    /// [`verify_password`] on a hashing thread, once one is free. The
    /// place travels with the job and is released by the worker when the
    /// hash is done: a login cancelled meanwhile keeps counting against the
    /// bound until then, so the queue never holds more jobs than places.
    pub async fn verify(
        &self,
        place: Admitted,
        hash: Option<String>,
        password: String,
    ) -> Result<bool, HashQueueFull> {
        let (answer, verdict) = tokio::sync::oneshot::channel();
        // Holding a place means there is room in the channel; if not (the
        // workers are gone), the login is refused as busy.
        if self.jobs.try_send((hash, password, answer, place)).is_err() {
            metrics::counter!(HASH_REJECTED).increment(1);
            return Err(HashQueueFull);
        }
        verdict.await.map_err(|_| HashQueueFull)
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): when logins
/// and requests compete for the cores, the runtime's threads win, so a
/// login flood slows logins rather than every route. Linux only; elsewhere
/// (and if the call fails) the thread keeps its priority.
fn lower_priority() {
    // On Linux `setpriority` of a thread id sets that one thread's nice value.
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(%err, "cannot lower the priority of a password hashing thread");
    }
}

/// An argon2id hash (PHC string) of `password`, with a random salt.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters accepts any password")
        .to_string()
}

/// Whether `password` matches `hash`. Pass `None` for an unknown user: a
/// dummy hash is verified instead, so both cases take the same time.
pub fn verify_password(hash: Option<&str>, password: &str) -> bool {
    verify_password_with(&mut Vec::new(), hash, password)
}

/// [`verify_password`] with Argon2's working memory in `blocks`, grown as
/// needed and kept by the caller for the next hash.
pub fn verify_password_with(
    blocks: &mut Vec<argon2::Block>,
    hash: Option<&str>,
    password: &str,
) -> bool {
    static DUMMY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash_password("not a password anyone has"));
    let (hash, known) = match hash {
        Some(h) => (h, true),
        None => (DUMMY.as_str(), false),
    };
    matches_hash(blocks, hash, password).unwrap_or(false) && known
}

/// Recomputes the PHC string's hash of `password` in `blocks` and compares
/// in constant time.
fn matches_hash(blocks: &mut Vec<argon2::Block>, hash: &str, password: &str) -> Option<bool> {
    let parsed = PasswordHash::new(hash).ok()?;
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).ok()?;
    let version = match parsed.version {
        Some(v) => argon2::Version::try_from(v).ok()?,
        None => argon2::Version::default(),
    };
    let params = argon2::Params::try_from(&parsed).ok()?;
    let expected = parsed.hash?;
    let mut salt = [0u8; 64];
    let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
    let mut out = vec![0u8; expected.len()];
    blocks.resize(params.block_count(), argon2::Block::default());
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..])
        .ok()?;
    // `Output`'s equality is constant-time.
    Some(argon2::password_hash::Output::new(&out).ok()? == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(verified_max: u64) -> Tokens {
        Tokens::with_capacity(
            b"secret",
            Duration::from_secs(900),
            "iss",
            "aud",
            verified_max,
        )
    }

    #[test]
    fn verified_tokens_are_remembered_but_never_past_their_expiry() {
        let tokens = tokens(100);
        let (user, tenant) = (Uuid::new_v4(), Uuid::new_v4());
        let token = tokens.issue(user, tenant, "new");
        assert_eq!(tokens.verify(&token).unwrap().sub, user);
        assert!(tokens.verified.contains_key(token.as_str()));
        assert_eq!(tokens.verify(&token).unwrap().sub, user, "from the cache");
        // Rejected tokens are not remembered.
        for bad in [
            format!("{token}x"),
            "not.a.token".to_owned(),
            tokens.sign(&Claims {
                exp: 1,
                ..tokens.verify(&token).unwrap()
            }),
        ] {
            assert!(tokens.verify(&bad).is_err(), "{bad}");
            assert!(!tokens.verified.contains_key(bad.as_str()));
        }
        // An entry whose token has expired (beyond the leeway) is not used.
        let mut expired = tokens.verify(&token).unwrap();
        expired.exp = jsonwebtoken::get_current_timestamp() - 60;
        let expired_token = tokens.sign(&expired);
        tokens
            .verified
            .insert(expired_token.as_str().into(), expired);
        assert!(tokens.verify(&expired_token).is_err());
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let tokens = tokens(100);
        for _ in 0..1_000 {
            let token = tokens.issue(Uuid::new_v4(), Uuid::new_v4(), "new");
            tokens.verify(&token).unwrap();
        }
        tokens.verified.run_pending_tasks();
        assert!(
            tokens.verified.entry_count() <= 100,
            "{}",
            tokens.verified.entry_count()
        );
    }

    /// A hash that keeps the one worker busy for a while (in a debug
    /// build), so cancelled jobs are still queued when later logins come.
    fn slow_hash(password: &str) -> String {
        let params = argon2::Params::new(19_456, 4, 1, None).unwrap();
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_logins_keep_their_place_until_the_worker_is_done() {
        let gate = HashGate::new(1, 1);
        let hash = slow_hash("right");
        // Two logins admitted and cancelled (client gone, request timeout)
        // while their jobs are queued or running.
        for _ in 0..2 {
            let place = gate.admit().expect("a place");
            let (gate, hash) = (gate.clone(), hash.clone());
            let login =
                tokio::spawn(async move { gate.verify(place, Some(hash), "right".into()).await });
            // Queued (or running) by now, then cancelled.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            login.abort();
            let _ = login.await;
        }
        // Two later logins at once with the right password: admitted only
        // once a place is free, and then never answered "wrong password".
        let later: Vec<_> = (0..2)
            .map(|_| {
                let (gate, hash) = (gate.clone(), hash.clone());
                tokio::spawn(async move {
                    let place = loop {
                        if let Some(place) = gate.admit() {
                            break place;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    };
                    gate.verify(place, Some(hash), "right".into()).await
                })
            })
            .collect();
        for answer in later {
            assert_eq!(answer.await.unwrap(), Ok(true));
        }
        // A wrong password is still wrong.
        let place = gate.admit().unwrap();
        assert_eq!(
            gate.verify(place, Some(hash), "wrong".into()).await,
            Ok(false)
        );
    }
}
