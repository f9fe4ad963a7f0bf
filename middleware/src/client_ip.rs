//! The client's IP address, from the socket peer and, only when that peer is
//! a trusted proxy, from `X-Forwarded-For` or `Forwarded` (RFC 7239).
//!
//! [`SetClientIpLayer`] resolves the address once per request and stores a
//! [`ClientIp`] in the request extensions, where the rate limiter's
//! [`ByClientIp`](crate::rate_limit::ByClientIp) and your handlers read it.
//!
//! # Trust
//!
//! Forwarding headers are client input: anyone can send
//! `X-Forwarded-For: 1.2.3.4`. They are read only when the socket peer is
//! inside a configured [`TrustedProxies`] CIDR, and then the chain is walked
//! right to left (nearest hop first), skipping trusted proxies and stopping at
//! the first address that is not one. Entries to the left of that address were
//! written by the client and are ignored. Only one header is read — the one
//! your proxy writes ([`ForwardedHeader`]) — because a proxy that appends to
//! `X-Forwarded-For` passes a client's forged `Forwarded` through untouched.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, as a dual-stack socket
//! reports IPv4 peers) are turned back into IPv4.
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//! use axum::{Router, routing::get, extract::connect_info::MockConnectInfo, Extension};
//! use tollgate::client_ip::{ClientIp, SetClientIpLayer, TrustedProxies};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
//! let app = Router::new()
//!     .route("/", get(|Extension(ClientIp(ip)): Extension<ClientIp>| async move { ip.to_string() }))
//!     .layer(SetClientIpLayer::new(proxies))
//!     .layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 5], 443))));
//!
//! let req = http::Request::get("/")
//!     .header("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.0.0.2")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! let body = axum::body::to_bytes(res.into_body(), 64).await.unwrap();
//! // 10.0.0.5 and 10.0.0.2 are trusted proxies; 203.0.113.9 is the client.
//! // 198.51.100.7 was written by the client itself and is ignored.
//! assert_eq!(&body[..], b"203.0.113.9");
//! # }
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use axum::extract::connect_info::MockConnectInfo;
use http::{HeaderMap, HeaderName, Request, header::FORWARDED};
use ipnet::IpNet;
use tower_layer::Layer;
use tower_service::Service;

/// The resolved client address, in request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// The socket peer address, for servers that do not use axum's
/// [`ConnectInfo`]. Insert it into request extensions before
/// [`SetClientIp`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// Which forwarding header the trusted proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, Caddy, most load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl FromStr for ForwardedHeader {
    type Err = ClientIpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            _ => Err(ClientIpError::UnknownHeader(s.to_owned())),
        }
    }
}

/// Why a trusted-proxy configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientIpError {
    /// An entry is neither an IP address nor a CIDR.
    #[error("`{0}` is not an IP address or CIDR (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    InvalidCidr(String),
    /// A `/0` network would let every client choose its own address.
    #[error("`{0}` trusts every address, so any client could forge its IP")]
    TrustsEverything(String),
    /// The header name is not one Tollgate reads.
    #[error("`{0}` is not a forwarding header (expected x-forwarded-for or forwarded)")]
    UnknownHeader(String),
}

/// The proxies whose forwarding headers are believed.
///
/// Parses from a comma-separated list of CIDRs or bare addresses
/// (`"10.0.0.0/8, 192.168.1.10, fd00::/8"`); an empty string trusts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

// === impl TrustedProxies ===

impl TrustedProxies {
    /// Trusts no proxy: the socket peer is always the client.
    pub fn none() -> Self {
        Self::default()
    }

    /// Trusts the given networks.
    ///
    /// Refuses a `/0` network: trusting everyone means any client can say
    /// who it is.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Result<Self, ClientIpError> {
        let nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
        if let Some(all) = nets.iter().find(|n| n.prefix_len() == 0) {
            return Err(ClientIpError::TrustsEverything(all.to_string()));
        }
        Ok(Self {
            nets,
            header: ForwardedHeader::default(),
        })
    }

    /// Reads `header` instead of the default `X-Forwarded-For`.
    #[must_use]
    pub fn with_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address for a request from `peer` carrying `headers`.
    ///
    /// Elements are read one by one (a line with a non-ASCII byte in one
    /// element still yields the others). When the walk meets an element it
    /// cannot read where it needs an address (malformed, or an obfuscated
    /// `Forwarded` node), the client is unknown: [`UNKNOWN_CLIENT`], a key
    /// of its own, never the address of a proxy.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        match self.header {
            ForwardedHeader::XForwardedFor => self.walk(peer, headers, &X_FORWARDED_FOR, whole),
            ForwardedHeader::Forwarded => self.walk(peer, headers, &FORWARDED, forwarded_for),
        }
    }

    /// The comma-separated entries of every `name` header line, last
    /// first: the first address not trusted, or the farthest trusted one.
    /// `node_of` takes the address out of an entry. Loops rather than a
    /// flattened iterator: this runs on every request behind a proxy.
    fn walk(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        name: &HeaderName,
        node_of: impl Fn(&str) -> Option<&str>,
    ) -> IpAddr {
        let mut client = peer;
        // A `HeaderName`, not a `&str`: no name parsing per request.
        for line in headers.get_all(name).iter().rev() {
            for entry in line.as_bytes().rsplit(|b| *b == b',') {
                // An entry that is not UTF-8 leaves the line's other
                // entries readable.
                let node = std::str::from_utf8(entry).ok();
                match node.and_then(&node_of).and_then(parse_node) {
                    Some(ip) if self.is_trusted(ip) => client = ip,
                    Some(ip) => return ip,
                    // Unreadable where an address should be: keying it
                    // as the nearest proxy would make every such client
                    // share (and spend) that proxy's bucket.
                    None => return UNKNOWN_CLIENT,
                }
            }
        }
        client
    }
}

impl FromStr for TrustedProxies {
    type Err = ClientIpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let nets = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ClientIpError::InvalidCidr(p.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(nets)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// `X-Forwarded-For` (not among `http`'s standard names).
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client of a request whose forwarding header could not be read
/// where an address was needed: `0.0.0.0`, one key for all such requests,
/// apart from every real address.
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// An `X-Forwarded-For` entry is the address itself.
fn whole(entry: &str) -> Option<&str> {
    Some(entry)
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim_ascii().split_once('=')?;
        k.trim_ascii()
            .eq_ignore_ascii_case("for")
            .then(|| v.trim_ascii().trim_matches('"'))
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:80`. Obfuscated (`_hidden`) and
/// `unknown` nodes are `None`.
fn parse_node(node: &str) -> Option<IpAddr> {
    // HTTP's whitespace is ASCII: no need for `str::trim`'s Unicode tables.
    let node = node.trim_ascii();
    let ip = node
        .parse::<IpAddr>()
        .ok()
        .or_else(|| node.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            node.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })?;
    Some(ip.to_canonical())
}

/// Applies [`SetClientIp`] to a service.
///
/// See the [module docs](crate::client_ip) for an example.
#[derive(Debug, Clone, Default)]
pub struct SetClientIpLayer {
    proxies: Arc<TrustedProxies>,
}

impl SetClientIpLayer {
    /// A layer resolving client addresses with `proxies`.
    pub fn new(proxies: TrustedProxies) -> Self {
        Self {
            proxies: Arc::new(proxies),
        }
    }
}

impl<S> Layer<S> for SetClientIpLayer {
    type Service = SetClientIp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetClientIp {
            inner,
            proxies: self.proxies.clone(),
        }
    }
}

/// Middleware that puts the [`ClientIp`] into request extensions.
///
/// The peer comes from axum's `ConnectInfo<SocketAddr>` or a [`PeerAddr`]
/// extension; a request with neither gets no `ClientIp`.
///
/// See the [module docs](crate::client_ip) for an example.
#[derive(Debug, Clone)]
pub struct SetClientIp<S> {
    inner: S,
    proxies: Arc<TrustedProxies>,
}

// === impl SetClientIp ===

impl<S> SetClientIp<S> {
    define_inner_service_accessors!();
}

/// The socket peer recorded in `ext`, if any: axum's `ConnectInfo`, its
/// `MockConnectInfo` in tests (as axum's own extractor does), or [`PeerAddr`].
pub(crate) fn peer_addr(ext: &http::Extensions) -> Option<IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
        .or_else(|| ext.get::<PeerAddr>().map(|p| p.0.ip()))
}

impl<S, B> Service<Request<B>> for SetClientIp<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(peer) = peer_addr(req.extensions()) {
            let ip = self.proxies.resolve(peer, req.headers());
            req.extensions_mut().insert(ClientIp(ip));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(proxies.resolve(ip("203.0.113.1"), &h), ip("203.0.113.1"));
        assert_eq!(
            TrustedProxies::none().resolve(ip("203.0.113.1"), &h),
            ip("203.0.113.1")
        );
    }

    #[test]
    fn walks_right_to_left_stopping_at_first_untrusted() {
        let proxies: TrustedProxies = "10.0.0.0/8, 192.168.0.1".parse().unwrap();
        // The client prepended a forged 1.1.1.1; the real client is 198.51.100.2.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1, 198.51.100.2"),
            ("x-forwarded-for", "192.168.0.1, 10.1.2.3"),
        ]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("198.51.100.2"));
        // The last line is the nearest proxy's: read first.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "203.0.113.9, 10.1.2.3"),
        ]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_chain_yields_leftmost() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("10.9.9.9"));
    }

    #[test]
    fn missing_header_from_trusted_peer_is_the_peer() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            proxies.resolve(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn a_garbage_hop_makes_the_client_unknown_never_a_proxy() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "198.51.100.2, not-an-ip, 10.2.2.2")]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), UNKNOWN_CLIENT);
        let h = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), UNKNOWN_CLIENT);
    }

    #[test]
    fn a_non_ascii_byte_spoils_only_its_own_element() {
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let mut h = HeaderMap::new();
        // The client wrote the first element; the proxy appended the rest.
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes("caf\u{e9}, 198.51.100.2".as_bytes()).unwrap(),
        );
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("198.51.100.2"));
        // Not UTF-8 at all.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.3").unwrap(),
        );
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("198.51.100.3"));
        // Unreadable where the address should be: unknown, not the proxy.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"198.51.100.3, \xff").unwrap(),
        );
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), UNKNOWN_CLIENT);
    }

    #[test]
    fn forwarded_header_with_ports_and_brackets() {
        let proxies = "10.0.0.0/8"
            .parse::<TrustedProxies>()
            .unwrap()
            .with_header(ForwardedHeader::Forwarded);
        let h = headers(&[(
            "forwarded",
            r#"for=192.0.2.60;proto=http, For="[2001:db8:cafe::17]:4711";by=10.0.0.1, for="10.3.3.3:80""#,
        )]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("2001:db8:cafe::17"));
        // X-Forwarded-For is not read when Forwarded is configured.
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_obfuscated_node_stops_walk() {
        let proxies = "10.0.0.0/8"
            .parse::<TrustedProxies>()
            .unwrap()
            .with_header(ForwardedHeader::Forwarded);
        let h = headers(&[("forwarded", "for=198.51.100.1, for=_hidden, for=10.0.0.7")]);
        assert_eq!(proxies.resolve(ip("10.0.0.1"), &h), UNKNOWN_CLIENT);
    }

    #[test]
    fn ipv4_mapped_peer_is_canonical() {
        let h = HeaderMap::new();
        assert_eq!(
            TrustedProxies::none().resolve(ip("::ffff:192.0.2.1"), &h),
            ip("192.0.2.1")
        );
        // And a mapped peer matches an IPv4 trusted range.
        let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "198.51.100.4")]);
        assert_eq!(
            proxies.resolve(ip("::ffff:10.0.0.1"), &h),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn refuses_bad_configuration() {
        assert_eq!(
            "10.0.0.0/33".parse::<TrustedProxies>(),
            Err(ClientIpError::InvalidCidr("10.0.0.0/33".into()))
        );
        assert_eq!(
            "nope".parse::<TrustedProxies>(),
            Err(ClientIpError::InvalidCidr("nope".into()))
        );
        assert_eq!(
            "10.0.0.0/8, 0.0.0.0/0".parse::<TrustedProxies>(),
            Err(ClientIpError::TrustsEverything("0.0.0.0/0".into()))
        );
        assert!(matches!(
            "::/0".parse::<TrustedProxies>(),
            Err(ClientIpError::TrustsEverything(_))
        ));
        assert_eq!("".parse::<TrustedProxies>(), Ok(TrustedProxies::none()));
        assert_eq!(
            "10.1.2.3/8, 192.0.2.1"
                .parse::<TrustedProxies>()
                .unwrap()
                .to_string(),
            "10.0.0.0/8,192.0.2.1/32"
        );
    }
}
