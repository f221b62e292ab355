//! Which endpoints the manager may dial (issue 15 §6, confused deputy).
//!
//! A hybrid connection's endpoint is whatever a holder of Manage on it wrote into its metadata;
//! the manager dials from inside the operator's network. The operator bounds that with
//! `--allow-endpoint` / `allow_endpoints` (docs/usage.md, "Endpoints the manager may dial"):
//!
//! * `*`: any host; `db.corp`: that host name; `*.corp`: names under `corp` (not `corp`
//!   itself); host names match the endpoint as written, and then its resolved addresses are
//!   checked like any other;
//! * `10.1.2.3`, `10.0.0.0/8`, `fd00::/8`, `[fd00::1]`: addresses, matched against what the
//!   endpoint resolves to (so a name cannot smuggle a forbidden address in);
//! * each optionally followed by `:PORT` or `:FIRST-LAST` (`db.corp:5432`, `*:5432`,
//!   `[fd00::/8]:443`, `10.0.0.0/8:8000-8099`); without it, any port.
//!
//! Without entries every endpoint is allowed, except what is always refused: link-local
//! addresses (169.254.0.0/16, fe80::/10, IPv4-mapped ones too) and the cloud metadata services
//! (169.254.169.254, fd00:ec2::254, 100.100.100.200, `metadata.google.internal`, …). Only an
//! address entry that contains such an address allows it; a host name entry or `*` never does,
//! and the metadata host names are never dialled.
//!
//! The check runs on the resolved addresses, and only the permitted ones are dialled: a name
//! that resolves to a metadata address is refused even if it is on the list.

use hyco_io::proxy::in_net;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Host names of cloud metadata services: never dialled.
const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Addresses always refused unless an address entry names them: (network, prefix length).
fn forbidden_by_default(ip: IpAddr) -> Option<&'static str> {
    const V4: &[(Ipv4Addr, u8, &str)] = &[
        (
            Ipv4Addr::new(169, 254, 169, 254),
            32,
            "a cloud metadata address",
        ),
        (
            Ipv4Addr::new(100, 100, 100, 200),
            32,
            "a cloud metadata address",
        ),
        (Ipv4Addr::new(169, 254, 0, 0), 16, "a link-local address"),
    ];
    const V6: &[(Ipv6Addr, u8, &str)] = &[
        (
            Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254),
            128,
            "a cloud metadata address",
        ),
        (
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
            "a link-local address",
        ),
    ];
    match ip.to_canonical() {
        IpAddr::V4(a) => V4
            .iter()
            .find(|(n, b, _)| in_net(IpAddr::V4(a), IpAddr::V4(*n), *b))
            .map(|x| x.2),
        IpAddr::V6(a) => V6
            .iter()
            .find(|(n, b, _)| in_net(IpAddr::V6(a), IpAddr::V6(*n), *b))
            .map(|x| x.2),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Any,
    /// Lower case, no trailing dot.
    Name(String),
    /// `*.suffix`: the suffix, lower case.
    Under(String),
    Net(IpAddr, u8),
}

/// One `--allow-endpoint` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    host: Host,
    ports: (u16, u16),
}

impl AllowEntry {
    fn port_ok(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            Host::Any => "*".to_owned(),
            Host::Name(n) => n.clone(),
            Host::Under(s) => format!("*.{s}"),
            Host::Net(ip @ IpAddr::V6(_), b) => format!("[{ip}/{b}]"),
            Host::Net(ip, b) => format!("{ip}/{b}"),
        };
        match self.ports {
            (1, u16::MAX) | (0, u16::MAX) => f.write_str(&host),
            (a, b) if a == b => write!(f, "{host}:{a}"),
            (a, b) => write!(f, "{host}:{a}-{b}"),
        }
    }
}

/// An allow-list entry that does not parse: the entry and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{}': {why} (expected HOST[:PORT]: *, a host name, *.domain, an address or CIDR block, [IPv6] or [IPv6/len]; PORT a number or FIRST-LAST)", .entry.escape_debug())]
pub struct AllowEntryError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong.
    pub why: &'static str,
}

impl std::str::FromStr for AllowEntry {
    type Err = AllowEntryError;

    fn from_str(entry: &str) -> Result<AllowEntry, AllowEntryError> {
        let bad = |why: &'static str| AllowEntryError {
            entry: entry.to_owned(),
            why,
        };
        let e = entry.trim().to_ascii_lowercase();
        if e.is_empty() {
            return Err(bad("empty"));
        }
        // Split off the port: `[v6…]:port`, a bare IPv6 address or block (no port), or
        // `host:port`.
        let (host, port) = if let Some(rest) = e.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(|| bad("no closing ']'"))?;
            match after {
                "" => (h.to_owned(), None),
                p => (
                    h.to_owned(),
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else if e.matches(':').count() > 1 {
            (e.clone(), None)
        } else {
            match e.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (e.clone(), None),
            }
        };
        let num = |s: &str| -> Result<u16, AllowEntryError> {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port is not 1-65535"))
        };
        let ports = match port {
            None | Some("*") => (1, u16::MAX),
            Some(p) => match p.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad("the port range is backwards"));
                    }
                    (a, b)
                }
                None => {
                    let p = num(p)?;
                    (p, p)
                }
            },
        };
        let host = if host == "*" {
            Host::Any
        } else if let Some((net, bits)) = host.split_once('/') {
            let net: IpAddr = net.parse().map_err(|_| bad("not an address before '/'"))?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            let bits = bits
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| bad("the prefix length is out of range"))?;
            Host::Net(net, bits)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Host::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
        } else {
            let (under, name) = match host.strip_prefix("*.") {
                Some(n) => (true, n),
                None => (false, host.as_str()),
            };
            let name = name.trim_end_matches('.');
            let valid = !name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(bad("not a host name"));
            }
            if under {
                Host::Under(name.to_owned())
            } else {
                Host::Name(name.to_owned())
            }
        };
        Ok(AllowEntry { host, ports })
    }
}

/// Why the allow-list refuses an endpoint: said to the sender (403) and in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The name is a cloud metadata service's.
    #[error("Endpoint {endpoint} is a cloud metadata service, which this manager never dials.")]
    MetadataName {
        /// `host:port` as given.
        endpoint: String,
    },
    /// An address the endpoint is (or resolves to) is refused unless an entry names it.
    #[error(
        "Endpoint {endpoint} {}; this manager dials it only when --allow-endpoint names it ({ip}/{}).",
        if *.literal { format!("is {what}") } else { format!("resolves to {ip}, {what}") },
        if .ip.is_ipv4() { 32 } else { 128 }
    )]
    Forbidden {
        /// `host:port` as given.
        endpoint: String,
        /// The refused address.
        ip: IpAddr,
        /// What kind of address it is (link-local, cloud metadata, …).
        what: &'static str,
        /// The endpoint is that address (not a name resolving to it).
        literal: bool,
    },
    /// The name resolves to nothing.
    #[error("Endpoint {endpoint} resolves to no address.")]
    NoAddress {
        /// `host:port` as given.
        endpoint: String,
    },
    /// No entry names it.
    #[error(
        "Endpoint {endpoint} is not in this manager's allow-list (--allow-endpoint, allow_endpoints)."
    )]
    NotListed {
        /// `host:port` as given.
        endpoint: String,
    },
}

/// The manager's allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    entries: Vec<AllowEntry>,
}

impl EndpointPolicy {
    /// A policy of these entries (none: every endpoint but the always-refused ones).
    pub fn new(entries: Vec<AllowEntry>) -> Self {
        EndpointPolicy { entries }
    }

    /// Parses the entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowEntryError> {
        entries
            .iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// The entries.
    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    /// Whether there are entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The addresses of endpoint `host:port` (resolved to `addrs`) that may be dialled, in
    /// their order; `Err` with the reason, for the sender and the log, when none may.
    pub fn permitted(
        &self,
        host: &str,
        port: u16,
        addrs: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let shown = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if METADATA_NAMES.contains(&name.as_str()) {
            return Err(Refusal::MetadataName { endpoint: shown });
        }
        let is_literal = name.parse::<IpAddr>().is_ok();
        let by_name = self.entries.is_empty()
            || self.entries.iter().any(|e| {
                e.port_ok(port)
                    && match &e.host {
                        Host::Any => true,
                        Host::Name(n) => !is_literal && *n == name,
                        Host::Under(s) => {
                            !is_literal
                                && name
                                    .strip_suffix(s.as_str())
                                    .is_some_and(|r| r.ends_with('.'))
                        }
                        Host::Net(..) => false,
                    }
            });
        let by_address = |ip: IpAddr| {
            let ip = ip.to_canonical();
            self.entries.iter().any(|e| {
                e.port_ok(port)
                    && matches!(e.host, Host::Net(n, b) if in_net(ip, n.to_canonical(), b))
            })
        };
        let mut forbidden = None;
        let ok: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| {
                if by_address(a.ip()) {
                    return true;
                }
                if let Some(what) = forbidden_by_default(a.ip()) {
                    forbidden.get_or_insert((a.ip().to_canonical(), what));
                    return false;
                }
                by_name
            })
            .collect();
        if !ok.is_empty() {
            return Ok(ok);
        }
        Err(match forbidden {
            Some((ip, what)) => Refusal::Forbidden {
                endpoint: shown,
                ip,
                what,
                literal: is_literal,
            },
            None if addrs.is_empty() => Refusal::NoAddress { endpoint: shown },
            None => Refusal::NotListed { endpoint: shown },
        })
    }
}

impl fmt::Display for EndpointPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            return f.write_str("any endpoint but link-local and cloud metadata addresses");
        }
        let list: Vec<String> = self.entries.iter().map(|e| e.to_string()).collect();
        f.write_str(&list.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy(entries: &[&str]) -> EndpointPolicy {
        EndpointPolicy::parse(entries).unwrap()
    }

    #[test]
    fn the_syntax() {
        for (text, shown) in [
            ("*", "*"),
            ("*:5432", "*:5432"),
            ("DB.corp:5432", "db.corp:5432"),
            ("*.corp", "*.corp"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.0.0.0/8:8000-8099", "10.0.0.0/8:8000-8099"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("fd00::/8", "[fd00::/8]"),
            ("[fd00::/8]:443", "[fd00::/8]:443"),
            ("[::1]:22", "[::1/128]:22"),
            ("db:*", "db"),
        ] {
            assert_eq!(
                text.parse::<AllowEntry>().unwrap().to_string(),
                shown,
                "{text}"
            );
        }
        for bad in [
            "",
            "db:0",
            "db:70000",
            "db:9-8",
            "10.0.0.0/33",
            "x/8",
            "[::1",
            "[::1]x",
            "a..b",
            "a b",
            "db:",
            "-:",
            "fd00::/200",
        ] {
            let e = bad.parse::<AllowEntry>().unwrap_err().to_string();
            assert!(e.contains("expected HOST[:PORT]"), "{bad}: {e}");
        }
    }

    #[test]
    fn without_entries_everything_but_link_local_and_metadata() {
        let p = EndpointPolicy::default();
        assert_eq!(
            p.permitted("10.0.0.5", 5432, &[sa("10.0.0.5:5432")]),
            Ok(vec![sa("10.0.0.5:5432")])
        );
        for (host, addr) in [
            ("169.254.169.254", "169.254.169.254:80"),
            ("169.254.1.1", "169.254.1.1:80"),
            ("fe80::1", "[fe80::1]:80"),
            ("fd00:ec2::254", "[fd00:ec2::254]:80"),
            ("::ffff:169.254.169.254", "[::ffff:169.254.169.254]:80"),
            ("100.100.100.200", "100.100.100.200:80"),
        ] {
            let e = p.permitted(host, 80, &[sa(addr)]).unwrap_err().to_string();
            assert!(
                e.contains("link-local") || e.contains("metadata"),
                "{host}: {e}"
            );
        }
        // A name is judged by what it resolves to: the resolved metadata address is dropped,
        // the other address of the name is kept.
        let e = p
            .permitted("innocent.example", 80, &[sa("169.254.169.254:80")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Endpoint innocent.example:80 resolves to 169.254.169.254, a cloud metadata address; this manager dials it only when --allow-endpoint names it (169.254.169.254/32)."
        );
        assert_eq!(
            p.permitted(
                "mixed.example",
                80,
                &[sa("169.254.169.254:80"), sa("10.0.0.1:80")]
            ),
            Ok(vec![sa("10.0.0.1:80")])
        );
        let e = p
            .permitted("Metadata.Google.Internal.", 80, &[sa("10.0.0.1:80")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cloud metadata service"), "{e}");
    }

    #[test]
    fn with_entries_only_what_they_name() {
        let p = policy(&[
            "10.0.0.0/8",
            "db.corp:5432",
            "*.svc.corp:80-89",
            "[fd00::/8]:443",
        ]);
        let ok = |h: &str, port: u16, a: &str| p.permitted(h, port, &[sa(a)]).is_ok();
        assert!(ok("10.9.9.9", 22, "10.9.9.9:22"));
        assert!(
            ok("anything.example", 22, "10.9.9.9:22"),
            "by resolved address"
        );
        assert!(ok("db.corp", 5432, "192.0.2.7:5432"));
        assert!(ok("DB.CORP.", 5432, "192.0.2.7:5432"));
        assert!(!ok("db.corp", 5433, "192.0.2.7:5433"));
        assert!(ok("a.svc.corp", 85, "192.0.2.8:85"));
        assert!(
            !ok("svc.corp", 85, "192.0.2.8:85"),
            "*.svc.corp is below it"
        );
        assert!(!ok("a.svc.corp", 90, "192.0.2.8:90"));
        assert!(ok("fd00::1", 443, "[fd00::1]:443"));
        assert!(!ok("fd00::1", 444, "[fd00::1]:444"));
        let e = p
            .permitted("192.0.2.1", 80, &[sa("192.0.2.1:80")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in this manager's allow-list"), "{e}");
        // A listed name still may not resolve to a metadata address…
        let e = p
            .permitted("db.corp", 5432, &[sa("169.254.169.254:5432")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata"), "{e}");
        // …and `*` does not open link-local either; an address entry does.
        let any = policy(&["*"]);
        assert!(any.permitted("x", 80, &[sa("169.254.1.1:80")]).is_err());
        assert!(any.permitted("x", 80, &[sa("192.0.2.1:80")]).is_ok());
        let ll = policy(&["169.254.10.0/24"]);
        assert!(ll.permitted("x", 80, &[sa("169.254.10.3:80")]).is_ok());
        assert!(ll.permitted("x", 80, &[sa("169.254.169.254:80")]).is_err());
    }
}
