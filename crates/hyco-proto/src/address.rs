//! Addresses (protocol.md §2): `$hc` paths, `sb-hc-*` query parameters, rendezvous ids,
//! entity names and `host:port` endpoints.
//!
//! The query rule of §2.10: a pair whose form-decoded key starts with `sb-hc-` (any case)
//! *and* contains `=` belongs to the relay and is consumed; everything else is the
//! application's and is kept byte for byte, empty segments included, so `?&foo=bar&` reaches the
//! listener as `&foo=bar&`. Query values are form-decoded exactly once (`+` is a space), which is
//! what makes the .NET (`+`) and Node/Python (`%20`) token encodings agree (§3.5).

use std::fmt;
use std::str::FromStr;

/// Longest raw query accepted.
pub const MAX_QUERY: usize = 16 * 1024;
/// Most `&`-separated pairs accepted in a query.
pub const MAX_QUERY_PAIRS: usize = 256;
/// Longest entity name.
pub const MAX_ENTITY_NAME: usize = 260;
/// Longest reason phrase [`sanitize_reason`] returns.
pub const MAX_REASON: usize = 512;
/// Longest `sb-hc-id` accepted (Azure's own ids are a GUID, 36 characters, with an optional
/// `_G<n>` suffix).
pub const MAX_ID: usize = 128;

/// Whether `id` is an acceptable `sb-hc-id`: 1 to [`MAX_ID`] characters, each an ASCII letter,
/// digit or one of `-_.:@{}` (GUIDs in any .NET format but `(…)`, Azure's `_G<n>` suffix,
/// plain numbers, host-like names). The id is logged, shown on status pages and echoed to
/// listeners, so nothing else (no control character, space, quote or `=`) gets in.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@{}".contains(&b))
}

/// `sb-hc-action`: what a WebSocket connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Listener control channel.
    Listen,
    /// Sender.
    Connect,
    /// Listener rendezvous for a WebSocket.
    Accept,
    /// Listener rendezvous for an HTTP request.
    Request,
    /// A socket a listener parks for senders to come (hyco extension, [`crate::ext`]).
    Standby,
}

impl Action {
    /// The wire value: `listen`, `connect`, `accept`, `request`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Listen => "listen",
            Action::Connect => "connect",
            Action::Accept => "accept",
            Action::Request => "request",
            Action::Standby => "standby",
        }
    }

    /// The action named by a wire value (ASCII case-insensitive).
    pub fn from_wire(s: &str) -> Option<Action> {
        [
            Action::Listen,
            Action::Connect,
            Action::Accept,
            Action::Request,
            Action::Standby,
        ]
        .into_iter()
        .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::from_wire(s).ok_or(AddressError::BadAction)
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A WebSocket path that does not start with `/$hc/`.
    #[error("path must start with /$hc/")]
    NotHc,
    /// An empty (`//`), `.` or `..` segment.
    #[error("path has an empty, '.' or '..' segment")]
    BadSegment,
    /// No entity in the path.
    #[error("path names no hybrid connection")]
    NoEntity,
    /// Query over 16 KiB or over 256 pairs.
    #[error("query too large")]
    QueryTooLarge,
    /// A relay parameter given twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// An `sb-hc-action` value that is not listen, connect, accept or request.
    #[error("unknown sb-hc-action")]
    BadAction,
    /// An `sb-hc-id` that is empty, too long or has a character outside [`is_valid_id`]'s.
    #[error("sb-hc-id must be 1 to 128 letters, digits or '-_.:@{{}}'")]
    BadId,
    /// An entity name outside the allowed alphabet or length; the text says which rule.
    #[error("invalid hybrid connection name: {0}")]
    BadName(&'static str),
    /// A `host:port` that does not parse; the text names the bad part.
    #[error("{0}")]
    BadHostPort(String),
}

/// The `sb-hc-*` parameters of a query, and the rest kept byte for byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HcQuery {
    /// `sb-hc-action`.
    pub action: Option<Action>,
    /// `sb-hc-id`, decoded.
    pub id: Option<String>,
    /// `sb-hc-token`, form-decoded once (`+` → space): ready for [`crate::ParsedToken::parse`].
    pub token: Option<String>,
    /// `sb-hc-statusCode` (a listener's reject, §2.6), decoded, not yet validated.
    pub status_code: Option<String>,
    /// `sb-hc-statusDescription` (reject reason), decoded.
    pub status_description: Option<String>,
    /// Node's un-prefixed `statusCode` (§2.6): use only when `status_code` is absent. The pair
    /// stays in `app_query` too.
    pub node_status_code: Option<String>,
    /// Node's un-prefixed `statusDescription`; same rules as `node_status_code`.
    pub node_status_description: Option<String>,
    /// Every pair that is not an `sb-hc-*=` pair, in order, exactly as received, joined by `&`.
    pub app_query: String,
    /// Other `sb-hc-*` pairs (key lower-cased, both decoded), e.g. the relay's own `sb-hc-rv`.
    pub extra_sb: Vec<(String, String)>,
}

/// Form-decodes one key or value (`+` → space, then `%XX`; invalid UTF-8 becomes U+FFFD).
fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl HcQuery {
    /// Parses a raw query (without the `?`). See the module documentation for the rules.
    /// Duplicate `sb-hc-action`, `sb-hc-id`, `sb-hc-token`, `sb-hc-statusCode` or
    /// `sb-hc-statusDescription` are refused, as is an unknown action.
    pub fn parse(raw_query: &str) -> Result<HcQuery, AddressError> {
        if raw_query.len() > MAX_QUERY {
            return Err(AddressError::QueryTooLarge);
        }
        let mut q = HcQuery::default();
        if raw_query.is_empty() {
            return Ok(q);
        }
        let mut app: Vec<&str> = Vec::new();
        for (i, pair) in raw_query.split('&').enumerate() {
            if i >= MAX_QUERY_PAIRS {
                return Err(AddressError::QueryTooLarge);
            }
            let Some((k, v)) = pair.split_once('=') else {
                app.push(pair);
                continue;
            };
            let key = form_decode(k).to_ascii_lowercase();
            let set = |slot: &mut Option<String>, name: &'static str| {
                if slot.is_some() {
                    return Err(AddressError::Duplicate(name));
                }
                *slot = Some(form_decode(v));
                Ok(())
            };
            match key.as_str() {
                "sb-hc-action" => {
                    if q.action.is_some() {
                        return Err(AddressError::Duplicate("sb-hc-action"));
                    }
                    q.action =
                        Some(Action::from_wire(&form_decode(v)).ok_or(AddressError::BadAction)?);
                }
                "sb-hc-id" => {
                    set(&mut q.id, "sb-hc-id")?;
                    if !q.id.as_deref().is_some_and(is_valid_id) {
                        return Err(AddressError::BadId);
                    }
                }
                "sb-hc-token" => set(&mut q.token, "sb-hc-token")?,
                "sb-hc-statuscode" => set(&mut q.status_code, "sb-hc-statusCode")?,
                "sb-hc-statusdescription" => {
                    set(&mut q.status_description, "sb-hc-statusDescription")?
                }
                k if k.starts_with("sb-hc-") => q.extra_sb.push((key.clone(), form_decode(v))),
                other => {
                    if other == "statuscode" && q.node_status_code.is_none() {
                        q.node_status_code = Some(form_decode(v));
                    } else if other == "statusdescription" && q.node_status_description.is_none() {
                        q.node_status_description = Some(form_decode(v));
                    }
                    app.push(pair);
                }
            }
        }
        q.app_query = app.join("&");
        Ok(q)
    }

    /// The reject status a listener asked for: `sb-hc-statusCode`, else Node's `statusCode`.
    pub fn reject_status(&self) -> Option<&str> {
        self.status_code
            .as_deref()
            .or(self.node_status_code.as_deref())
    }

    /// The reject reason matching [`HcQuery::reject_status`].
    pub fn reject_description(&self) -> Option<&str> {
        if self.status_code.is_some() {
            self.status_description.as_deref()
        } else {
            self.node_status_description
                .as_deref()
                .or(self.status_description.as_deref())
        }
    }
}

fn split_segments(rest: &str) -> Result<Vec<&str>, AddressError> {
    let segs: Vec<&str> = rest.split('/').collect();
    let last = segs.len() - 1;
    for (i, s) in segs.iter().enumerate() {
        // One trailing slash is tolerated; any other empty segment is not.
        if (s.is_empty() && i != last) || *s == "." || *s == ".." {
            return Err(AddressError::BadSegment);
        }
    }
    let segs: Vec<&str> = segs.into_iter().filter(|s| !s.is_empty()).collect();
    if segs.is_empty() {
        return Err(AddressError::NoEntity);
    }
    Ok(segs)
}

/// The raw segments after `/$hc/` of a WebSocket path (`$hc` compared case-insensitively).
/// Empty (`//`), `.` and `..` segments are refused; one trailing slash is tolerated; nothing is
/// percent-decoded (so `%2F` never splits a segment and `%24hc` is not `$hc`).
pub fn split_hc_path(path: &str) -> Result<Vec<&str>, AddressError> {
    let rest = path.strip_prefix('/').ok_or(AddressError::NotHc)?;
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if !first.eq_ignore_ascii_case("$hc") {
        return Err(AddressError::NotHc);
    }
    split_segments(tail)
}

/// The raw segments of an HTTP-mode path (no `$hc`), with the rules of [`split_hc_path`].
pub fn split_http_path(path: &str) -> Result<Vec<&str>, AddressError> {
    split_segments(path.strip_prefix('/').unwrap_or(path))
}

/// Checks an entity name: 1–260 characters, `/`-separated segments each matching
/// `[A-Za-z0-9][A-Za-z0-9._-]*`, none equal to `$hc`.
pub fn validate_entity_name(name: &str) -> Result<(), AddressError> {
    if name.is_empty() || name.len() > MAX_ENTITY_NAME {
        return Err(AddressError::BadName("must be 1 to 260 characters"));
    }
    for seg in name.split('/') {
        if seg.eq_ignore_ascii_case("$hc") {
            return Err(AddressError::BadName("'$hc' is reserved"));
        }
        let mut chars = seg.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
            return Err(AddressError::BadName(
                "each '/'-separated segment must start with a letter or digit",
            ));
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(AddressError::BadName(
                "use only letters, digits, '.', '_', '-' and '/'",
            ));
        }
    }
    Ok(())
}

/// The lookup key of an entity: lower-cased, without outer slashes (names are
/// case-insensitive).
pub fn entity_key(name: &str) -> String {
    name.trim_matches('/').to_ascii_lowercase()
}

/// `wss://{host_port}/$hc/{entity}[/suffix][?query&]sb-hc-action={action}&sb-hc-id={id}`.
/// `suffix_and_query` is what follows the entity, e.g. `/room7?lang=en`; a missing leading
/// `/` is added. The id is form-encoded.
pub fn ws_url(
    host_port: &str,
    entity: &str,
    suffix_and_query: Option<&str>,
    action: Action,
    id: &str,
) -> String {
    let (suffix, query) = match suffix_and_query {
        Some(s) => match s.split_once('?') {
            Some((p, q)) => (p, q),
            None => (s, ""),
        },
        None => ("", ""),
    };
    let slash = if suffix.is_empty() || suffix.starts_with('/') {
        ""
    } else {
        "/"
    };
    let mut url = format!("wss://{host_port}/$hc/{entity}{slash}{suffix}?");
    if !query.is_empty() {
        url.push_str(query);
        if !query.ends_with('&') {
            url.push('&');
        }
    }
    url.push_str("sb-hc-action=");
    url.push_str(action.as_str());
    url.push_str("&sb-hc-id=");
    url.push_str(&form_encode(id));
    url
}

/// The accept address plus the reject parameters (protocol.md §2.6):
/// `&sb-hc-statusCode={status}&sb-hc-statusDescription={form-encoded description}`.
pub fn reject_url(accept_address: &str, status: u16, description: &str) -> String {
    let sep = match accept_address.find('?') {
        None => "?",
        Some(i) if i + 1 == accept_address.len() || accept_address.ends_with('&') => "",
        Some(_) => "&",
    };
    format!(
        "{accept_address}{sep}sb-hc-statusCode={status}&sb-hc-statusDescription={}",
        form_encode(description)
    )
}

/// Safe for an HTTP status line: visible ASCII and spaces only (tabs become spaces; CR, LF,
/// NUL and everything else removed), trimmed, at most 512 characters.
pub fn sanitize_reason(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_REASON)
        .collect();
    cleaned.trim().to_owned()
}

/// 128 random bits as a dashed GUID, `8-4-4-4-12` lower-case hex digits (request, rendezvous,
/// connection and listener ids): Microsoft's clients parse every id as one (Java's
/// `UUID.fromString`). The caller supplies the randomness.
pub fn new_connection_id(random16: [u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, b) in random16.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        // Two digits without a formatter (two ids per HTTP-mode request).
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// Whether `id` is a dashed GUID, optionally followed by Azure's `_G<n>` suffix (which the
/// clients strip before parsing).
pub fn is_guid(id: &str) -> bool {
    let guid = match id.split_once("_G") {
        Some((g, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => g,
        Some(_) => return false,
        None => id,
    };
    guid.len() == 36
        && guid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A `host:port` endpoint, e.g. the target in App Service metadata (§6.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    /// 1–65535.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port` or `[ipv6]:port`; same as [`FromStr`].
    pub fn parse(s: &str) -> Result<HostPort, AddressError> {
        s.parse()
    }
}

fn valid_dns_name(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl FromStr for HostPort {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(64).collect();
        let bad = |why: &str| AddressError::BadHostPort(format!("'{shown}': {why}"));
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad("expected [ipv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("host is not a valid IPv6 address"))?;
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| bad("expected host:port"))?;
            if h.is_empty() {
                return Err(bad("host is empty"));
            }
            if h.contains(':') {
                return Err(bad("IPv6 hosts must be written [addr]:port"));
            }
            if !valid_dns_name(h) {
                return Err(bad(
                    "host must be a DNS name or IP address (letters, digits, '-', '_', '.')",
                ));
            }
            (h, p)
        };
        let port = Some(port)
            .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be a number from 1 to 65535"))?;
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

/// The path of a request target as Azure hands it to HTTP-mode listeners: percent-escapes
/// decoded. Microsoft's Java listener percent-encodes the path it receives before parsing it
/// (azure-relay-java HybridHttpConnection.java:208-222, added as "Hybrid HTTP connection handles
/// URL requests with spaces", #83), so an escape left in place would reach the application
/// encoded twice; .NET (`new Uri(base, target)`, HybridHttpConnection.cs:179) takes either form.
/// Escapes of `/`, `?`, `#` and `%` stay, since decoding them would change where the path ends
/// or how it splits; so do escapes of control characters, and the whole path stays as sent when
/// the decoded bytes are not UTF-8. [`request_line_path`] is the inverse for a request line.
pub fn listener_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return path.into();
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let escaped = match (c, b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex_pair(h, l),
            _ => None,
        };
        match escaped {
            Some(v) if !matches!(v, b'/' | b'?' | b'#' | b'%') && !v.is_ascii_control() => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(s) => s.into(),
        Err(_) => path.into(),
    }
}

fn hex_pair(h: u8, l: u8) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16);
    Some((d(h)? * 16 + d(l)?) as u8)
}

/// What an HTTP/1.1 request-target may not carry as is (RFC 9112 §3.2 with RFC 3986's
/// characters): controls, space and `"<>\^`{|}`; non-ASCII is always encoded.
const NOT_IN_A_TARGET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A listener's request target (path as [`listener_path`] gives it, then the query as sent)
/// made fit for an HTTP/1.1 request line again: in the path, what a target may not carry is
/// percent-encoded; `%` escapes and the query are kept as they are.
pub fn request_line_path(target: &str) -> std::borrow::Cow<'_, str> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let encoded: std::borrow::Cow<'_, str> =
        percent_encoding::utf8_percent_encode(path, NOT_IN_A_TARGET).into();
    match (encoded, query) {
        (std::borrow::Cow::Borrowed(_), _) => target.into(),
        (std::borrow::Cow::Owned(p), None) => p.into(),
        (std::borrow::Cow::Owned(p), Some(q)) => format!("{p}?{q}").into(),
    }
}

#[cfg(test)]
mod tests;
