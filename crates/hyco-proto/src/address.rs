//! Addresses: `$hc` paths, `sb-hc-*` query parameters, rendezvous ids, `host:port`
//! (protocol.md §2).

use std::fmt;
use std::str::FromStr;

/// `sb-hc-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Listener control channel.
    Listen,
    /// Sender.
    Connect,
    /// Listener rendezvous for a WebSocket.
    Accept,
    /// Listener rendezvous for an HTTP request.
    Request,
}

impl Action {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Listen => "listen",
            Action::Connect => "connect",
            Action::Accept => "accept",
            Action::Request => "request",
        }
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not `/$hc/…`.
    #[error("path must start with /$hc/")]
    NotHc,
    /// Empty, `.` or `..` segment.
    #[error("path has an empty, '.' or '..' segment")]
    BadSegment,
    /// No entity in the path.
    #[error("path names no hybrid connection")]
    NoEntity,
    /// Query too long or too many pairs.
    #[error("query too large")]
    QueryTooLarge,
    /// A parameter given twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// Unknown `sb-hc-action`.
    #[error("unknown sb-hc-action")]
    BadAction,
    /// An entity name outside the allowed alphabet or length.
    #[error("{0}")]
    BadName(&'static str),
    /// `host:port` that does not parse.
    #[error("{0}")]
    BadHostPort(String),
}

/// The `sb-hc-*` parameters of a query, and the rest kept byte-for-byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HcQuery {
    /// `sb-hc-action`.
    pub action: Option<Action>,
    /// `sb-hc-id`.
    pub id: Option<String>,
    /// `sb-hc-token`, form-decoded once.
    pub token: Option<String>,
    /// `sb-hc-statusCode` (reject).
    pub status_code: Option<String>,
    /// `sb-hc-statusDescription` (reject).
    pub status_description: Option<String>,
    /// Node's un-prefixed `statusCode` (protocol.md §2.6, D10).
    pub node_status_code: Option<String>,
    /// Node's un-prefixed `statusDescription`.
    pub node_status_description: Option<String>,
    /// Every pair that is not an `sb-hc-*=` pair, in order, as received.
    pub app_query: String,
    /// Other `sb-hc-*` pairs (decoded), e.g. the relay's own `sb-hc-rv`.
    pub extra_sb: Vec<(String, String)>,
}

fn decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl HcQuery {
    /// Parses a raw query (without `?`).
    pub fn parse(raw: &str) -> Result<HcQuery, AddressError> {
        if raw.len() > 16 * 1024 {
            return Err(AddressError::QueryTooLarge);
        }
        let mut q = HcQuery::default();
        let mut app: Vec<&str> = Vec::new();
        if raw.is_empty() {
            return Ok(q);
        }
        for (i, pair) in raw.split('&').enumerate() {
            if i >= 256 {
                return Err(AddressError::QueryTooLarge);
            }
            let Some((k, v)) = pair.split_once('=') else {
                app.push(pair);
                continue;
            };
            let key = decode(k).to_ascii_lowercase();
            let set = |slot: &mut Option<String>, name: &'static str| {
                if slot.is_some() {
                    return Err(AddressError::Duplicate(name));
                }
                *slot = Some(decode(v));
                Ok(())
            };
            match key.as_str() {
                "sb-hc-action" => {
                    if q.action.is_some() {
                        return Err(AddressError::Duplicate("sb-hc-action"));
                    }
                    q.action = Some(match decode(v).as_str() {
                        "listen" => Action::Listen,
                        "connect" => Action::Connect,
                        "accept" => Action::Accept,
                        "request" => Action::Request,
                        _ => return Err(AddressError::BadAction),
                    });
                }
                "sb-hc-id" => set(&mut q.id, "sb-hc-id")?,
                "sb-hc-token" => set(&mut q.token, "sb-hc-token")?,
                "sb-hc-statuscode" => set(&mut q.status_code, "sb-hc-statusCode")?,
                "sb-hc-statusdescription" => {
                    set(&mut q.status_description, "sb-hc-statusDescription")?
                }
                k if k.starts_with("sb-hc-") => q.extra_sb.push((k.to_owned(), decode(v))),
                other => {
                    if other == "statuscode" && q.node_status_code.is_none() {
                        q.node_status_code = Some(decode(v));
                    } else if other == "statusdescription" && q.node_status_description.is_none() {
                        q.node_status_description = Some(decode(v));
                    }
                    app.push(pair);
                }
            }
        }
        q.app_query = app.join("&");
        Ok(q)
    }
}

fn split_segments(rest: &str) -> Result<Vec<&str>, AddressError> {
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    for (i, s) in segs.iter().enumerate() {
        if (s.is_empty() && i + 1 != n) || *s == "." || *s == ".." {
            return Err(AddressError::BadSegment);
        }
    }
    let segs: Vec<&str> = segs.into_iter().filter(|s| !s.is_empty()).collect();
    if segs.is_empty() {
        return Err(AddressError::NoEntity);
    }
    Ok(segs)
}

/// Segments after `/$hc/` of a WebSocket path.
pub fn split_hc_path(path: &str) -> Result<Vec<&str>, AddressError> {
    let rest = path.strip_prefix('/').ok_or(AddressError::NotHc)?;
    let (first, rest) = rest.split_once('/').ok_or(AddressError::NotHc)?;
    if !first.eq_ignore_ascii_case("$hc") {
        return Err(AddressError::NotHc);
    }
    split_segments(rest)
}

/// Segments of an HTTP-mode path.
pub fn split_http_path(path: &str) -> Result<Vec<&str>, AddressError> {
    split_segments(path.strip_prefix('/').unwrap_or(path))
}

/// Checks an entity name: 1-260 chars, `/`-separated segments of `[A-Za-z0-9][A-Za-z0-9._-]*`.
pub fn validate_entity_name(name: &str) -> Result<(), AddressError> {
    if name.is_empty() || name.len() > 260 {
        return Err(AddressError::BadName("name must be 1 to 260 characters"));
    }
    for seg in name.split('/') {
        let mut chars = seg.chars();
        match chars.next() {
            Some(c) if c.is_ascii_alphanumeric() => {}
            _ => {
                return Err(AddressError::BadName(
                    "each segment must start with a letter or digit",
                ))
            }
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(AddressError::BadName(
                "use letters, digits, '.', '_', '-' and '/'",
            ));
        }
    }
    Ok(())
}

/// Lookup key of an entity (names are case-insensitive).
pub fn entity_key(name: &str) -> String {
    name.trim_matches('/').to_ascii_lowercase()
}

/// `wss://{host_port}/$hc/{entity}[suffix][?query&]sb-hc-action=…&sb-hc-id=…`.
pub fn ws_url(
    host_port: &str,
    entity: &str,
    suffix_and_query: Option<&str>,
    action: Action,
    id: &str,
) -> String {
    let (suffix, query) = match suffix_and_query {
        Some(s) => match s.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (s, None),
        },
        None => ("", None),
    };
    let mut url = format!("wss://{host_port}/$hc/{entity}{suffix}?");
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push_str(q);
        url.push('&');
    }
    url.push_str(&format!(
        "sb-hc-action={}&sb-hc-id={}",
        action.as_str(),
        form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
    ));
    url
}

/// The accept address plus the reject parameters (protocol.md §2.6).
pub fn reject_url(accept_address: &str, status: u16, description: &str) -> String {
    let sep = if accept_address.contains('?') {
        '&'
    } else {
        '?'
    };
    format!(
        "{accept_address}{sep}sb-hc-statusCode={status}&sb-hc-statusDescription={}",
        form_urlencoded::byte_serialize(description.as_bytes()).collect::<String>()
    )
}

/// Visible ASCII and spaces only, at most 512 characters: safe in a status line.
pub fn sanitize_reason(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(512)
        .collect()
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_connection_id(random16: [u8; 16]) -> String {
    random16.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `host:port` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    /// 1-65535.
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| AddressError::BadHostPort(format!("'{s}': {why}"));
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad("expected [ipv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("invalid IPv6 address"))?;
            (h, p)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| bad("expected host:port"))?
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        if !s.starts_with('[')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return Err(bad("host has invalid characters"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port must be a number from 1 to 65535"));
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rules() {
        let q = HcQuery::parse("&foo=bar&sb-hc-action=connect&sb-hc-token=SharedAccessSignature+sr%3Dx&sb-hc-undefined&x=%22&").unwrap();
        assert_eq!(q.action, Some(Action::Connect));
        assert_eq!(q.token.as_deref(), Some("SharedAccessSignature sr=x"));
        assert_eq!(q.app_query, "&foo=bar&sb-hc-undefined&x=%22&");
        assert_eq!(
            HcQuery::parse("sb-hc-action=listen&sb-hc-action=listen"),
            Err(AddressError::Duplicate("sb-hc-action"))
        );
        assert_eq!(
            HcQuery::parse("sb-hc-action=fly"),
            Err(AddressError::BadAction)
        );
        let r = HcQuery::parse(
            "sb-hc-action=accept&sb-hc-rv=abc&statusCode=404&statusDescription=no+way",
        )
        .unwrap();
        assert_eq!(r.extra_sb, vec![("sb-hc-rv".to_owned(), "abc".to_owned())]);
        assert_eq!(r.node_status_code.as_deref(), Some("404"));
        assert_eq!(r.node_status_description.as_deref(), Some("no way"));
        assert!(HcQuery::parse(&"a=b&".repeat(300)).is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(split_hc_path("/$hc/hc1").unwrap(), vec!["hc1"]);
        assert_eq!(split_hc_path("/$HC/hc1/sub/").unwrap(), vec!["hc1", "sub"]);
        for bad in [
            "/$hc//hc1",
            "/$hc/./hc1",
            "/$hc/x/../hc1",
            "/$hc/",
            "/hc1",
            "/%24hc/hc1",
        ] {
            assert!(split_hc_path(bad).is_err(), "{bad}");
        }
        assert_eq!(split_hc_path("/$hc/hc1%2Fsub").unwrap(), vec!["hc1%2Fsub"]);
        assert!(validate_entity_name("db/prod-1").is_ok());
        assert!(validate_entity_name("$hc").is_err());
        assert!(validate_entity_name("a b").is_err());
        assert!(validate_entity_name("").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            ws_url(
                "localhost:9443",
                "hyco",
                Some("/x?a=1"),
                Action::Connect,
                "id 1"
            ),
            "wss://localhost:9443/$hc/hyco/x?a=1&sb-hc-action=connect&sb-hc-id=id+1"
        );
        assert_eq!(
            reject_url("wss://h/$hc/e?sb-hc-action=accept", 502, "no route"),
            "wss://h/$hc/e?sb-hc-action=accept&sb-hc-statusCode=502&sb-hc-statusDescription=no+route"
        );
        assert_eq!(sanitize_reason("OK\r\nSet-Cookie: x"), "OKSet-Cookie: x");
        assert_eq!(new_connection_id([0xab; 16]).len(), 32);
    }

    #[test]
    fn host_ports() {
        let hp: HostPort = "db.corp:5432".parse().unwrap();
        assert_eq!(hp.to_string(), "db.corp:5432");
        let v6: HostPort = "[::1]:80".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:80");
        for bad in ["db", "db:0", "db:70000", ":80", "a b:1", "[::1]"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }
}
