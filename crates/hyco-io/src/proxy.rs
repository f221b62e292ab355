//! Outbound HTTP proxies: the proxy URL, the `NO_PROXY` rules, and the `CONNECT` tunnel.
//!
//! The WebSocket connector (`ws::Connector`) dials through a [`Proxy`] when it has one and the
//! relay's host is not excluded by its [`NoProxy`] list: a TCP connection to the proxy,
//! `CONNECT host:port`, and once the proxy answers 2xx, TLS to the relay *inside* the tunnel
//! (relay name for SNI and verification, exactly as without a proxy). The proxy only ever sees
//! the relay's `host:port`.
//!
//! Only `http://` proxy URLs are supported: the tunnel's content is TLS already, so TLS to the
//! proxy itself (an `https://` proxy URL) is refused with an error saying so.
//!
//! Secrets: a proxy URL's password only leaves this module inside the `Proxy-Authorization`
//! header. [`ProxyUrl`]'s `Display` and `Debug` print it as `***`, and no error carries it.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of a proxy's answer head (status line and headers) read before giving up.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a proxy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy URL cannot be used (message says why; it never repeats the URL, which may
    /// hold a password).
    #[error("{0}")]
    BadUrl(String),
    /// The TCP connection to the proxy failed.
    #[error("cannot reach proxy {proxy}: {source}")]
    Connect {
        /// The proxy, password masked.
        proxy: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading or writing the `CONNECT` exchange failed.
    #[error("proxy {proxy}, CONNECT {target}: {source}")]
    Io {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The proxy closed the connection before its answer was complete.
    #[error("proxy {proxy} closed the connection before answering CONNECT {target}")]
    Closed {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
    },
    /// Connecting to the proxy and the `CONNECT` exchange took longer than the connector's
    /// timeout.
    #[error("proxy {proxy} did not open a tunnel to {target} within {timeout:?}")]
    Timeout {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer is not an HTTP/1.x status line.
    #[error("proxy {proxy} sent a malformed answer to CONNECT {target}: {line:?}")]
    Malformed {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The start of what it sent.
        line: String,
    },
    /// The answer's head is larger than [`MAX_HEAD`].
    #[error("proxy {proxy}'s answer to CONNECT {target} is larger than {MAX_HEAD} bytes")]
    HeadTooLarge {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
    },
    /// The proxy answered `CONNECT` with a status other than 2xx.
    #[error("proxy {proxy} refused CONNECT {target}: {status_line}{hint}")]
    Refused {
        /// The proxy, password masked.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The status code.
        status: u16,
        /// The status line as sent.
        status_line: String,
        /// What to do about it, for authentication failures (empty otherwise).
        hint: &'static str,
    },
}

impl ProxyError {
    /// The proxy's status code, for a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProxyError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

// === impl ProxyUrl ===

/// An `http://[user[:password]@]host[:port]` proxy. The port defaults to 80. User and password
/// are percent-decoded; `Display` and `Debug` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP literal (IPv6 without brackets).
    host: String,
    port: u16,
    /// Decoded user name, for display.
    user: Option<String>,
    /// `Basic base64(user:password)`: the only place the password is kept.
    authorization: Option<String>,
}

impl ProxyUrl {
    /// Parses a proxy URL. A URL without a scheme is taken as `http://`.
    pub fn parse(s: &str) -> Result<ProxyUrl, ProxyError> {
        let s = s.trim();
        let owned;
        let s = if s.contains("://") {
            s
        } else {
            owned = format!("http://{s}");
            &owned
        };
        // url's own message may quote the input; keep it out of ours.
        let u = url::Url::parse(s).map_err(|e| {
            bad(format!(
                "not a URL ({e}); expected http://[user:password@]host:port"
            ))
        })?;
        match u.scheme() {
            "http" => {}
            "https" => return Err(bad(
                "https:// proxies (TLS to the proxy) are not supported; use an http:// proxy URL \
                     (the tunnel through it still carries TLS end to end to the relay)"
                    .into(),
            )),
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not supported; expected http://[user:password@]host:port"
                )))
            }
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(bad("missing host".into())),
        };
        if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
            return Err(bad(
                "a proxy URL has no path or query; expected http://[user:password@]host:port"
                    .into(),
            ));
        }
        let (user, authorization) = if u.username().is_empty() && u.password().is_none() {
            (None, None)
        } else {
            let user: Vec<u8> = percent_decode_str(u.username()).collect();
            let password: Vec<u8> = percent_decode_str(u.password().unwrap_or("")).collect();
            let mut pair = user.clone();
            pair.push(b':');
            pair.extend_from_slice(&password);
            let basic = base64::engine::general_purpose::STANDARD.encode(&pair);
            (
                Some(String::from_utf8_lossy(&user).into_owned()),
                Some(format!("Basic {basic}")),
            )
        };
        Ok(ProxyUrl {
            host,
            port: u.port().unwrap_or(80),
            user,
            authorization,
        })
    }

    /// The proxy's host (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the URL carries credentials (sent as `Proxy-Authorization: Basic`).
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        if let Some(user) = &self.user {
            write!(f, "{user}:***@")?;
        }
        f.write_str(&authority(&self.host, self.port))
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

impl std::str::FromStr for ProxyUrl {
    type Err = ProxyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProxyUrl::parse(s)
    }
}

fn bad(why: String) -> ProxyError {
    ProxyError::BadUrl(format!("proxy URL: {why}"))
}

/// `host:port`, with brackets around an IPv6 host.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// === impl NoProxy ===

/// Hosts reached directly, never through the proxy: the `NO_PROXY` convention.
///
/// A comma-separated list (blanks around entries ignored, case-insensitive). Each entry is
/// * `*`: every host;
/// * a host name, matching itself and its subdomains on a dot boundary (`example.com` and
///   `.example.com` both match `example.com` and `relay.example.com`, not `badexample.com`);
///   a leading `*.` is read as `.`;
/// * an IP literal (`10.1.2.3`, `::1`, `[::1]`), matching that address written as an address
///   (no name resolution happens: `localhost` must be listed as a name);
/// * a CIDR block (`10.0.0.0/8`, `fd00::/8`), matching addresses inside it;
///
/// any of the last three optionally followed by `:port` (`[v6]:port` for IPv6) to match only
/// that port. Entries that are none of these are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Everything,
    /// Lower-case, no leading or trailing dot.
    Name(String, Option<u16>),
    Ip(IpAddr, Option<u16>),
    Net(IpAddr, u8, Option<u16>),
}

impl NoProxy {
    /// Parses a `NO_PROXY` list (never fails: unusable entries are skipped).
    pub fn parse(list: &str) -> NoProxy {
        NoProxy {
            rules: list.split(',').filter_map(parse_rule).collect(),
        }
    }

    /// Whether the list has no usable entry.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `host:port` is to be reached directly. `host` is a name or an IP literal (IPv6
    /// with or without brackets).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        self.rules.iter().any(|r| match (r, ip) {
            (Rule::Everything, _) => true,
            (Rule::Ip(a, p), Some(ip)) => *a == ip && port_ok(p),
            (Rule::Net(net, bits, p), Some(ip)) => in_net(ip, *net, *bits) && port_ok(p),
            (Rule::Name(n, p), None) => {
                port_ok(p)
                    && host
                        .strip_suffix(n.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
            }
            _ => false,
        })
    }
}

impl fmt::Display for NoProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let port = |p: &Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
            match r {
                Rule::Everything => f.write_str("*")?,
                Rule::Name(n, p) => write!(f, "{n}{}", port(p))?,
                Rule::Ip(ip @ IpAddr::V6(_), Some(p)) => write!(f, "[{ip}]:{p}")?,
                Rule::Ip(ip, p) => write!(f, "{ip}{}", port(p))?,
                Rule::Net(ip, bits, p) => write!(f, "{ip}/{bits}{}", port(p))?,
            }
        }
        Ok(())
    }
}

fn parse_rule(entry: &str) -> Option<Rule> {
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() {
        return None;
    }
    if e == "*" {
        return Some(Rule::Everything);
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(Rule::Ip(ip, None));
    }
    // `[v6]` or `[v6]:port`
    if let Some(rest) = e.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some(Rule::Ip(ip.parse().ok()?, port));
    }
    // An IPv6 block has colons of its own, so a CIDR block is tried before a `:port` suffix.
    if let Some(rule) = parse_net(&e, None) {
        return rule;
    }
    let (body, port) = match e.rsplit_once(':') {
        Some((b, p)) if !b.contains(':') => (b.to_owned(), Some(p.parse::<u16>().ok()?)),
        Some(_) => return None,
        None => (e, None),
    };
    if let Some(rule) = parse_net(&body, port) {
        return rule;
    }
    if let Ok(ip) = body.parse::<IpAddr>() {
        return Some(Rule::Ip(ip, port));
    }
    let name = body.strip_prefix("*.").unwrap_or(&body);
    let name = name.trim_start_matches('.').trim_end_matches('.');
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then(|| Rule::Name(name.to_owned(), port))
}

/// `ip/bits`: `None` when `s` is not of that shape, `Some(None)` when the prefix is too long.
fn parse_net(s: &str, port: Option<u16>) -> Option<Option<Rule>> {
    let (net, bits) = s.split_once('/')?;
    let net: IpAddr = net.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    Some((bits <= max).then_some(Rule::Net(net, bits, port)))
}

/// Whether `ip` is inside the network `net`/`bits` (both of one family; `bits` at most 32 or
/// 128). Used for `NO_PROXY` entries and by the manager's endpoint allow-list.
pub fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

// === impl Proxy ===

/// What a connector needs: the proxy, and the hosts that bypass it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Where `CONNECT` goes.
    pub url: ProxyUrl,
    /// Hosts dialled directly.
    pub no_proxy: NoProxy,
}

impl Proxy {
    /// The proxy to use for `host:port`, or `None` to dial directly.
    pub fn for_target(&self, host: &str, port: u16) -> Option<&ProxyUrl> {
        (!self.no_proxy.matches(host, port)).then_some(&self.url)
    }
}

/// The proxy of the environment, read through `get` (so tests need not touch the process
/// environment): the first of `HTTPS_PROXY`, `https_proxy`, `ALL_PROXY`, `all_proxy` that is
/// set and not blank. `HTTP_PROXY` is not read: every hyco connection is TLS.
pub fn proxy_from_env_vars(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProxyUrl>, ProxyError> {
    let Some((name, v)) = first_set(
        &get,
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"],
    ) else {
        return Ok(None);
    };
    ProxyUrl::parse(&v).map(Some).map_err(|e| match e {
        ProxyError::BadUrl(m) => ProxyError::BadUrl(format!("{name}: {m}")),
        other => other,
    })
}

/// The bypass list of the environment, read through `get`: `NO_PROXY`, else `no_proxy`.
pub fn no_proxy_from_env_vars(get: impl Fn(&str) -> Option<String>) -> NoProxy {
    first_set(&get, &["NO_PROXY", "no_proxy"])
        .map(|(_, v)| NoProxy::parse(&v))
        .unwrap_or_default()
}

fn first_set(
    get: &impl Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
}

// === the CONNECT tunnel ===

/// Connects to `proxy` and asks it for a tunnel to `host:port`, all within `timeout`. The
/// returned stream is the tunnel: nothing after the proxy's answer head has been read from it.
pub async fn open_tunnel(
    proxy: &ProxyUrl,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let target = authority(host, port);
    let work = async {
        let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .map_err(|source| ProxyError::Connect {
                proxy: proxy.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        connect_tunnel(&mut tcp, proxy, &target).await?;
        Ok(tcp)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProxyError::Timeout {
            proxy: proxy.to_string(),
            target: target.clone(),
            timeout,
        })?
}

/// Sends `CONNECT target` on a connection to the proxy and reads the answer head.
async fn connect_tunnel(
    tcp: &mut TcpStream,
    proxy: &ProxyUrl,
    target: &str,
) -> Result<(), ProxyError> {
    if target
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ProxyError::BadUrl(format!("invalid target {target:?}")));
    }
    let io = |source| ProxyError::Io {
        proxy: proxy.to_string(),
        target: target.to_owned(),
        source,
    };
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: hyco/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(auth) = &proxy.authorization {
        req.push_str("Proxy-Authorization: ");
        req.push_str(auth);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.map_err(io)?;
    let head = match read_head(tcp).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Err(ProxyError::Closed {
                proxy: proxy.to_string(),
                target: target.to_owned(),
            })
        }
        Err(HeadError::TooLarge) => {
            return Err(ProxyError::HeadTooLarge {
                proxy: proxy.to_string(),
                target: target.to_owned(),
            })
        }
        Err(HeadError::Io(e)) => return Err(io(e)),
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line: String = String::from_utf8_lossy(line)
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let status = parse_status(&line).ok_or_else(|| ProxyError::Malformed {
        proxy: proxy.to_string(),
        target: target.to_owned(),
        line: line.clone(),
    })?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    // 401 is not what RFC 9110 says a proxy sends, but some (tinyproxy) answer a wrong
    // password with it; before the tunnel exists only the proxy can have answered.
    let hint = match (status, proxy.has_credentials()) {
        (401 | 407, false) => {
            " (proxy authentication required: put user:password in the proxy URL)"
        }
        (401 | 407, true) => {
            " (proxy authentication failed: check the user and password in the proxy URL)"
        }
        _ => "",
    };
    Err(ProxyError::Refused {
        proxy: proxy.to_string(),
        target: target.to_owned(),
        status,
        status_line: line,
        hint,
    })
}

/// `HTTP/1.x NNN reason` → `NNN`.
fn parse_status(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("HTTP/1.")?;
    let mut parts = rest.splitn(3, ' ');
    let _minor = parts.next().filter(|v| v.len() == 1)?;
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

enum HeadError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads up to and including the blank line that ends the answer head, and not one byte more:
/// the bytes after it belong to the tunnel (TLS from the relay), so it peeks first and then
/// consumes only what is head. `Ok(None)` when the proxy closes before the head is complete.
async fn read_head(tcp: &mut TcpStream) -> Result<Option<Vec<u8>>, HeadError> {
    const END: &[u8] = b"\r\n\r\n";
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tcp.peek(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        // The end marker may straddle what was consumed already and what is peeked now.
        let carried = head.len().min(END.len() - 1);
        let mut window = head[head.len() - carried..].to_vec();
        window.extend_from_slice(&buf[..n]);
        let end = window
            .windows(END.len())
            .position(|w| w == END)
            .map(|i| i + END.len() - carried);
        let take = end.unwrap_or(n);
        tcp.read_exact(&mut buf[..take])
            .await
            .map_err(HeadError::Io)?;
        head.extend_from_slice(&buf[..take]);
        if end.is_some() {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

#[cfg(test)]
mod tests;
