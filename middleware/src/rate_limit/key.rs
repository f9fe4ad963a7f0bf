//! Keys and the extractors that take them from a request.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use http::request::Parts;
use uuid::Uuid;

use crate::client_ip::{ClientIp, peer_addr};
use crate::problem::Problem;

/// What a policy counts against: one bucket per distinct key.
///
/// A key made from a [`Uuid`] is the key of its hyphenated lower-case text
/// (equal, same hash, same store key), kept as 16 bytes instead of a new
/// string on every request: [`Key::text`] keeps such a text as its UUID,
/// so the two forms are one.
#[derive(Debug, Clone)]
pub struct Key(Repr);

impl std::hash::Hash for Key {
    /// As few writes as possible: one for an IPv4 address, where a derived
    /// `Hash` makes five. Stores hash a key on every check.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match &self.0 {
            Repr::Global => state.write_u8(0),
            Repr::Ip(IpAddr::V4(v4)) => state.write_u32(u32::from(*v4)),
            Repr::Ip(IpAddr::V6(v6)) => state.write_u128(u128::from(*v6)),
            Repr::Text(text) => state.write(text.as_bytes()),
            // Its 16 bytes: no text holds a UUID's own text (`Key::text`).
            Repr::Uuid(id) => state.write_u128(id.as_u128()),
            Repr::UnderQuota(under) => {
                under.1.hash(state);
                under.0.hash(state);
            }
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Repr::Global, Repr::Global) => true,
            (Repr::Ip(a), Repr::Ip(b)) => a == b,
            (Repr::Text(a), Repr::Text(b)) => a == b,
            (Repr::Uuid(a), Repr::Uuid(b)) => a == b,
            (Repr::UnderQuota(a), Repr::UnderQuota(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Key {}

#[derive(Debug, Clone)]
enum Repr {
    Global,
    Ip(IpAddr),
    Text(Arc<str>),
    /// A UUID, and the key of its hyphenated lower-case text: a `Text`
    /// never holds that text (see [`Key::text`]).
    Uuid(Uuid),
    /// A key's bucket under one quota (see [`Key::under_quota`]).
    UnderQuota(Box<(Key, super::Quota)>),
}

/// The UUID whose hyphenated lower-case text (as `Uuid`'s `Display` writes
/// it) `text` is.
fn uuid_of_text(text: &str) -> Option<Uuid> {
    if text.len() != uuid::fmt::Hyphenated::LENGTH {
        return None;
    }
    let id = Uuid::try_parse(text).ok()?;
    // Not another form of it (upper case, braces): those are other texts.
    let mut buffer = Uuid::encode_buffer();
    (id.hyphenated().encode_lower(&mut buffer) == text).then_some(id)
}

impl Key {
    /// The single key shared by every request.
    pub const fn global() -> Self {
        Self(Repr::Global)
    }

    /// A key for an address (or network address, already masked).
    pub const fn ip(ip: IpAddr) -> Self {
        Self(Repr::Ip(ip))
    }

    /// A key from any text: a tenant id, a subject, a composite.
    pub fn text(text: impl Into<Arc<str>>) -> Self {
        let text = text.into();
        match uuid_of_text(&text) {
            Some(id) => Self::uuid(id),
            None => Self(Repr::Text(text)),
        }
    }

    /// The key of `id`'s text (`Key::text(id.to_string())`), without
    /// allocating.
    pub const fn uuid(id: Uuid) -> Self {
        Self(Repr::Uuid(id))
    }

    /// The bucket of this key under `quota`, distinct from the key's
    /// bucket under any other quota. A policy whose quota is chosen per
    /// request counts a request whose quota is not the policy's own here,
    /// so a key whose quota changes (a plan upgrade, an override) starts a
    /// fresh bucket instead of reading the old one's state under new
    /// parameters.
    pub(crate) fn under_quota(self, quota: super::Quota) -> Self {
        Self(Repr::UnderQuota(Box::new((self, quota))))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Global => f.write_str("global"),
            Repr::Ip(ip) => write!(f, "ip:{ip}"),
            Repr::Text(t) => write!(f, "k:{t}"),
            Repr::Uuid(id) => write!(f, "k:{id}"),
            // Other keys never start with `q`: no collision in a store's
            // key space.
            Repr::UnderQuota(under) => {
                let gcra = under.1.gcra();
                write!(f, "q{}/{}:{}", under.1.burst(), gcra.interval(), under.0)
            }
        }
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        Self::ip(ip)
    }
}

impl From<Uuid> for Key {
    fn from(id: Uuid) -> Self {
        Self::uuid(id)
    }
}

impl From<&str> for Key {
    fn from(text: &str) -> Self {
        Self::text(text)
    }
}

impl From<String> for Key {
    fn from(text: String) -> Self {
        Self::text(text)
    }
}

/// A request the extractor refuses outright (say, a malformed tenant id):
/// answered with this problem, before any store is asked.
#[derive(Debug, Clone)]
pub struct KeyRejection(Problem);

impl KeyRejection {
    /// A rejection answered with `problem`.
    pub fn new(problem: Problem) -> Self {
        Self(problem)
    }

    /// `400 Bad Request` with `detail`.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self(Problem::new(StatusCode::BAD_REQUEST, "Bad Request").with_detail(detail))
    }

    /// `401 Unauthorized` with `detail`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self(Problem::new(StatusCode::UNAUTHORIZED, "Unauthorized").with_detail(detail))
    }

    /// The problem the request is answered with.
    pub fn problem(&self) -> &Problem {
        &self.0
    }

    pub(crate) fn into_problem(self) -> Problem {
        self.0
    }
}

/// Takes a policy's key from a request.
///
/// `Ok(Some(key))` counts the request against `key`; `Ok(None)` skips this
/// policy for the request (say, a per-tenant policy on an anonymous request);
/// `Err` answers the request with the rejection.
///
/// Implemented for closures:
///
/// ```
/// use tollgate::rate_limit::{Key, KeyExtractor};
///
/// let by_api_key = |req: &http::request::Parts| {
///     Ok(req.headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(Key::from))
/// };
/// let (parts, _) = http::Request::get("/").header("x-api-key", "k1").body(()).unwrap().into_parts();
/// assert_eq!(by_api_key.extract(&parts).unwrap(), Some(Key::from("k1")));
/// ```
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key of `req`.
    fn extract(&self, req: &Parts) -> Result<Option<Key>, KeyRejection>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&Parts) -> Result<Option<Key>, KeyRejection> + Send + Sync + 'static,
{
    fn extract(&self, req: &Parts) -> Result<Option<Key>, KeyRejection> {
        self(req)
    }
}

/// Every request shares one key: a limit on the route as a whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _: &Parts) -> Result<Option<Key>, KeyRejection> {
        Ok(Some(Key::global()))
    }
}

/// Keys by a value your own middleware put in the request extensions (the
/// claims of a verified token, an API key's account): `f` turns it into the
/// key. A request without one is answered `401` with a problem body: it
/// did not go through your authentication.
///
/// ```
/// use tollgate::rate_limit::{ByExtension, Key, KeyExtractor};
///
/// #[derive(Clone)]
/// struct Claims { tenant: String }
///
/// let by_tenant = ByExtension::new(|claims: &Claims| Key::from(claims.tenant.as_str()));
/// let (mut parts, _) = http::Request::get("/").body(()).unwrap().into_parts();
/// assert_eq!(by_tenant.extract(&parts).unwrap_err().problem().status(), 401);
/// parts.extensions.insert(Claims { tenant: "acme".into() });
/// assert_eq!(by_tenant.extract(&parts).unwrap(), Some(Key::from("acme")));
/// ```
pub struct ByExtension<T, F> {
    key_of: F,
    _extension: std::marker::PhantomData<fn(&T)>,
}

impl<T, F> ByExtension<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> Key + Send + Sync + 'static,
{
    /// Keys by `key_of` the request's `T`.
    pub fn new(key_of: F) -> Self {
        Self {
            key_of,
            _extension: std::marker::PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for ByExtension<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByExtension")
            .field("extension", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, F> KeyExtractor for ByExtension<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> Key + Send + Sync + 'static,
{
    fn extract(&self, req: &Parts) -> Result<Option<Key>, KeyRejection> {
        req.extensions
            .get::<T>()
            .map(|value| Some((self.key_of)(value)))
            .ok_or_else(|| KeyRejection::unauthorized("this route needs credentials"))
    }
}

/// Keys by client address: the [`ClientIp`] set by
/// [`SetClientIpLayer`](crate::client_ip::SetClientIpLayer), else the
/// socket peer.
///
/// IPv6 addresses are grouped by their `/64` (configurable): one host is
/// usually given a whole /64 and could otherwise rotate through 2^64
/// addresses, each with a fresh quota. IPv4 addresses are used whole.
///
/// A request with no known address at all (no `SetClientIpLayer`, no
/// `ConnectInfo`) is not limited by this policy, and a warning is logged once.
#[derive(Debug)]
pub struct ByClientIp {
    v4_prefix: u8,
    v6_prefix: u8,
    warned: AtomicBool,
}

impl Default for ByClientIp {
    fn default() -> Self {
        Self::new()
    }
}

impl ByClientIp {
    /// IPv4 whole, IPv6 by /64.
    pub fn new() -> Self {
        Self {
            v4_prefix: 32,
            v6_prefix: 64,
            warned: AtomicBool::new(false),
        }
    }

    /// Groups IPv6 clients by the given prefix length (e.g. 56).
    ///
    /// # Panics
    ///
    /// If `prefix` is above 128.
    #[must_use]
    pub fn with_ipv6_prefix(mut self, prefix: u8) -> Self {
        assert!(prefix <= 128, "an IPv6 prefix is at most 128 bits");
        self.v6_prefix = prefix;
        self
    }

    /// Groups IPv4 clients by the given prefix length (32: each address).
    ///
    /// # Panics
    ///
    /// If `prefix` is above 32.
    #[must_use]
    pub fn with_ipv4_prefix(mut self, prefix: u8) -> Self {
        assert!(prefix <= 32, "an IPv4 prefix is at most 32 bits");
        self.v4_prefix = prefix;
        self
    }

    /// The key of `ip`: its network address under the configured prefix.
    pub fn key_of(&self, ip: IpAddr) -> Key {
        Key::ip(match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.v4_prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.v6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        })
    }
}

impl KeyExtractor for ByClientIp {
    fn extract(&self, req: &Parts) -> Result<Option<Key>, KeyRejection> {
        let ip = req
            .extensions
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| peer_addr(&req.extensions));
        if ip.is_none() && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "ByClientIp found no client address (add SetClientIpLayer and serve with \
                 into_make_service_with_connect_info); requests are not limited by IP"
            );
        }
        Ok(ip.map(|ip| self.key_of(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_uuid_key_is_the_key_of_its_text() {
        use std::hash::BuildHasher;
        let id: Uuid = "6F9619FF-8B86-D011-B42D-00C04FC964FF".parse().unwrap();
        let (uuid, text) = (Key::uuid(id), Key::text(id.to_string()));
        assert_eq!(uuid, text);
        assert_eq!(text, uuid);
        assert_eq!(uuid, Key::from(id));
        let hasher = std::hash::RandomState::new();
        assert_eq!(hasher.hash_one(&uuid), hasher.hash_one(&text));
        assert_eq!(uuid.to_string(), "k:6f9619ff-8b86-d011-b42d-00c04fc964ff");
        assert_eq!(uuid.to_string(), text.to_string());
        assert_ne!(uuid, Key::text(id.simple().to_string()));
        // Other forms of it are other texts.
        let upper = id.hyphenated().to_string().to_uppercase();
        assert_ne!(uuid, Key::text(upper.as_str()));
        assert_eq!(Key::text(upper.as_str()).to_string(), format!("k:{upper}"));
        assert_ne!(uuid, Key::text(id.braced().to_string()));
        assert_ne!(uuid, Key::uuid(Uuid::nil()));
        assert_ne!(uuid, Key::global());
    }

    #[test]
    fn ipv6_grouped_by_64_by_default() {
        let by = ByClientIp::new();
        assert_eq!(
            by.key_of(ip("2001:db8:1:2:aaaa::1")),
            by.key_of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            by.key_of(ip("2001:db8:1:2::1")),
            by.key_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            by.key_of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "ip:2001:db8:1:2::"
        );
    }

    #[test]
    fn ipv6_prefix_is_configurable() {
        let by = ByClientIp::new().with_ipv6_prefix(56);
        assert_eq!(
            by.key_of(ip("2001:db8:1:2::1")),
            by.key_of(ip("2001:db8:1:ff::1"))
        );
        assert_ne!(
            by.key_of(ip("2001:db8:1:100::1")),
            by.key_of(ip("2001:db8:1:ff::1"))
        );
        let whole = ByClientIp::new().with_ipv6_prefix(128);
        assert_ne!(
            whole.key_of(ip("2001:db8::1")),
            whole.key_of(ip("2001:db8::2"))
        );
        let all = ByClientIp::new().with_ipv6_prefix(0);
        assert_eq!(all.key_of(ip("2001:db8::1")), all.key_of(ip("3000::2")));
    }

    #[test]
    fn ipv4_whole_and_mapped_ipv6_is_ipv4() {
        let by = ByClientIp::new();
        assert_ne!(by.key_of(ip("192.0.2.1")), by.key_of(ip("192.0.2.2")));
        assert_eq!(
            by.key_of(ip("::ffff:192.0.2.1")),
            by.key_of(ip("192.0.2.1"))
        );
        let by24 = ByClientIp::new().with_ipv4_prefix(24);
        assert_eq!(by24.key_of(ip("192.0.2.1")), by24.key_of(ip("192.0.2.200")));
    }

    #[test]
    fn prefers_client_ip_over_peer() {
        let (mut parts, _) = http::Request::new(()).into_parts();
        assert_eq!(ByClientIp::new().extract(&parts).unwrap(), None);
        parts
            .extensions
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [10, 0, 0, 1],
                1,
            ))));
        assert_eq!(
            ByClientIp::new().extract(&parts).unwrap(),
            Some(Key::ip(ip("10.0.0.1")))
        );
        parts.extensions.insert(ClientIp(ip("198.51.100.1")));
        assert_eq!(
            ByClientIp::new().extract(&parts).unwrap(),
            Some(Key::ip(ip("198.51.100.1")))
        );
    }
}
