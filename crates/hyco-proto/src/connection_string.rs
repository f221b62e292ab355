//! Connection strings (protocol.md §3.7), parsed the way Microsoft's .NET and Java clients
//! parse them.
//!
//! `Endpoint=sb://host[:port]/;SharedAccessKeyName=…;SharedAccessKey=…[;EntityPath=…]`, or a
//! ready-made `SharedAccessSignature=…`, or `Authentication=Managed Identity`. Parts are split on
//! `;`, each on its *first* `=` (base64 padding and the `=` inside a token survive); keys are
//! case-insensitive; any unknown key is a hard error, as in both Microsoft clients. Errors name
//! the offending part but never echo a key or signature value.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::{SasToken, SecretKey};

/// Where the relay is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Always `sb`.
    pub scheme: String,
    /// Host name or IP literal as written (an IPv6 literal keeps its brackets).
    pub host: String,
    /// Port when given (the clients use it as is; 443 otherwise).
    pub port: Option<u16>,
}

impl Endpoint {
    /// `host` or `host:port`.
    pub fn host_port(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// The port, 443 when absent.
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(443)
    }
}

/// How the string authenticates. `Debug` masks the key and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionStringAuth {
    /// A rule name and its key: tokens are signed locally.
    Key {
        /// `SharedAccessKeyName`.
        name: String,
        /// `SharedAccessKey`.
        key: SecretKey,
    },
    /// A ready-made token, reused verbatim (a listener dies when it expires).
    Signature(SasToken),
    /// `Authentication=Managed Identity` (.NET only; hyco cannot use it).
    ManagedIdentity,
    /// No credentials (anonymous senders).
    None,
}

/// A parsed connection string. `Debug` masks the key and the token; [`render`] shows them.
///
/// [`render`]: ConnectionString::render
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The relay.
    pub endpoint: Endpoint,
    /// The hybrid connection, when the string names one.
    pub entity_path: Option<String>,
    /// Credentials.
    pub auth: ConnectionStringAuth,
    /// `OperationTimeout` (.NET `TimeSpan` syntax).
    pub operation_timeout: Option<Duration>,
}

/// Why a connection string was refused; names the part, never a key value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A part without `=`. `shown` is the part's text only when it looks like a key name.
    #[error("part {part}{shown} has no '=' (expected Key=Value)")]
    NoEquals {
        /// 1-based position among the non-empty parts.
        part: usize,
        /// ` ('Text')`, or empty when the text could be a secret.
        shown: String,
    },
    /// A key that is not one of the known ones (Microsoft's clients refuse these too).
    #[error("unknown key '{0}' (known: Endpoint, EntityPath, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature, OperationTimeout, Authentication)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("'{0}' given twice")]
    Duplicate(&'static str),
    /// No `Endpoint`.
    #[error("Endpoint is missing")]
    MissingEndpoint,
    /// `Endpoint` is not `sb://host[:port][/]`; the text says why.
    #[error("Endpoint {0}")]
    BadEndpoint(String),
    /// `SharedAccessKeyName` without `SharedAccessKey` or the reverse.
    #[error("SharedAccessKeyName and SharedAccessKey must be given together")]
    KeyPair,
    /// `SharedAccessSignature` together with a key name or key.
    #[error("SharedAccessSignature cannot be combined with SharedAccessKeyName/SharedAccessKey")]
    SignatureAndKey,
    /// `Authentication` together with a key or a signature.
    #[error("Authentication cannot be combined with SharedAccessKey or SharedAccessSignature")]
    AuthenticationAndKey,
    /// A value that is empty or malformed: (key, why).
    #[error("{0} is invalid: {1}")]
    BadValue(&'static str, &'static str),
}

/// Text that cannot be a secret: letters (and spaces) only, short.
fn safe_label(s: &str, max: usize) -> Option<&str> {
    (!s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphabetic() || b == b' '))
        .then_some(s)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// .NET `TimeSpan`: `hh:mm:ss` or `d.hh:mm:ss`, each with an optional `.fffffff`.
fn parse_timespan(s: &str) -> Option<Duration> {
    let (days, rest) = match s.split_once('.') {
        Some((d, r)) if r.contains(':') && !d.contains(':') => {
            if !all_digits(d) || d.len() > 8 {
                return None;
            }
            (d.parse::<u64>().ok()?, r)
        }
        _ => (0, s),
    };
    let mut it = rest.split(':');
    let (h, m, sec_part) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let (secs, frac) = sec_part.split_once('.').unwrap_or((sec_part, ""));
    let field = |t: &str, max: u64| -> Option<u64> {
        if !all_digits(t) || t.len() > 2 {
            return None;
        }
        t.parse::<u64>().ok().filter(|v| *v < max)
    };
    let (h, m, secs) = (field(h, 24)?, field(m, 60)?, field(secs, 60)?);
    let nanos = if sec_part.contains('.') {
        if frac.len() > 7 || !all_digits(frac) {
            return None;
        }
        format!("{frac:0<9}").parse::<u32>().ok()?
    } else {
        0
    };
    Some(Duration::new(
        days * 86400 + h * 3600 + m * 60 + secs,
        nanos,
    ))
}

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with(['.', '-'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

fn parse_endpoint(v: &str) -> Result<Endpoint, ConnectionStringError> {
    let bad = |why: &str| ConnectionStringError::BadEndpoint(format!("'{v}' {why}"));
    let (scheme, rest) = v
        .split_once("://")
        .ok_or_else(|| bad("must look like sb://host[:port]/"))?;
    if !scheme.eq_ignore_ascii_case("sb") {
        return Err(bad("must use the sb:// scheme"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(bad("must be sb://host[:port]/ with no path or query"));
    }
    if authority.contains('@') {
        return Err(bad("must not contain user information"));
    }
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(i) => {
                let tail = &authority[i + 1..];
                let port = match tail.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if tail.is_empty() => None,
                    None => return Err(bad("has junk after the IPv6 address")),
                };
                (&authority[..=i], port)
            }
            None => return Err(bad("has an unclosed '['")),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !valid_host(host) {
        return Err(bad("has an invalid host"));
    }
    let port = match port {
        Some(p) => Some(
            Some(p)
                .filter(|p| all_digits(p) && p.len() <= 5)
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("has an invalid port (1-65535)"))?,
        ),
        None => None,
    };
    Ok(Endpoint {
        scheme: "sb".into(),
        host: host.to_owned(),
        port,
    })
}

fn set<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), ConnectionStringError> {
    if slot.replace(value).is_some() {
        return Err(ConnectionStringError::Duplicate(name));
    }
    Ok(())
}

fn non_empty(v: &str, name: &'static str) -> Result<(), ConnectionStringError> {
    if v.is_empty() {
        return Err(ConnectionStringError::BadValue(name, "empty"));
    }
    Ok(())
}

impl ConnectionString {
    /// Parses a connection string (see the module documentation for the rules).
    pub fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
        let mut endpoint = None;
        let mut entity: Option<String> = None;
        let mut key_name: Option<String> = None;
        let mut key: Option<SecretKey> = None;
        let mut sas: Option<SasToken> = None;
        let mut timeout = None;
        let mut managed = None;
        let parts = s.split(';').map(str::trim).filter(|p| !p.is_empty());
        for (i, part) in parts.enumerate() {
            let Some((k, v)) = part.split_once('=') else {
                return Err(ConnectionStringError::NoEquals {
                    part: i + 1,
                    shown: safe_label(part, 32)
                        .map(|t| format!(" ('{t}')"))
                        .unwrap_or_default(),
                });
            };
            let (k, v) = (k.trim(), v.trim());
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => set(&mut endpoint, parse_endpoint(v)?, "Endpoint")?,
                "entitypath" => {
                    non_empty(v, "EntityPath")?;
                    set(&mut entity, v.to_owned(), "EntityPath")?
                }
                "sharedaccesskeyname" => {
                    non_empty(v, "SharedAccessKeyName")?;
                    set(&mut key_name, v.to_owned(), "SharedAccessKeyName")?
                }
                "sharedaccesskey" => {
                    non_empty(v, "SharedAccessKey")?;
                    set(&mut key, SecretKey::new(v), "SharedAccessKey")?
                }
                "sharedaccesssignature" => {
                    let prefix = v.get(.."SharedAccessSignature ".len());
                    if !prefix.is_some_and(|p| p.eq_ignore_ascii_case("SharedAccessSignature ")) {
                        return Err(ConnectionStringError::BadValue(
                            "SharedAccessSignature",
                            "must start with 'SharedAccessSignature '",
                        ));
                    }
                    set(
                        &mut sas,
                        SasToken::new(v.to_owned()),
                        "SharedAccessSignature",
                    )?
                }
                "operationtimeout" => {
                    let d = parse_timespan(v).ok_or(ConnectionStringError::BadValue(
                        "OperationTimeout",
                        "expected hh:mm:ss or d.hh:mm:ss",
                    ))?;
                    set(&mut timeout, d, "OperationTimeout")?
                }
                "authentication" => {
                    let norm: String = v
                        .chars()
                        .filter(|c| !c.is_whitespace() && *c != '_' && *c != '-')
                        .collect();
                    if !norm.eq_ignore_ascii_case("managedidentity") {
                        return Err(ConnectionStringError::BadValue(
                            "Authentication",
                            "only 'Managed Identity' is known",
                        ));
                    }
                    set(&mut managed, (), "Authentication")?
                }
                _ => {
                    return Err(ConnectionStringError::UnknownKey(
                        safe_label(k, 64).unwrap_or("(not shown)").to_owned(),
                    ))
                }
            }
        }
        let endpoint = endpoint.ok_or(ConnectionStringError::MissingEndpoint)?;
        let has_key = key_name.is_some() || key.is_some();
        if sas.is_some() && has_key {
            return Err(ConnectionStringError::SignatureAndKey);
        }
        if managed.is_some() && (has_key || sas.is_some()) {
            return Err(ConnectionStringError::AuthenticationAndKey);
        }
        let auth = match (key_name, key, sas) {
            (Some(name), Some(key), None) => ConnectionStringAuth::Key { name, key },
            (None, None, Some(t)) => ConnectionStringAuth::Signature(t),
            (None, None, None) if managed.is_some() => ConnectionStringAuth::ManagedIdentity,
            (None, None, None) => ConnectionStringAuth::None,
            _ => return Err(ConnectionStringError::KeyPair),
        };
        Ok(ConnectionString {
            endpoint,
            entity_path: entity,
            auth,
            operation_timeout: timeout,
        })
    }

    /// The canonical text, secrets included (that is its purpose):
    /// `Endpoint=sb://host[:port]/;SharedAccessKeyName=…;SharedAccessKey=…[;EntityPath=…]`,
    /// or `Endpoint=…;SharedAccessSignature=…[;EntityPath=…]`. `OperationTimeout` is not
    /// rendered (the Hybrid Connection Manager accepts only these four fields).
    pub fn render(&self) -> String {
        let mut s = format!("Endpoint=sb://{}/", self.endpoint.host_port());
        match &self.auth {
            ConnectionStringAuth::Key { name, key } => {
                s.push_str(";SharedAccessKeyName=");
                s.push_str(name);
                s.push_str(";SharedAccessKey=");
                s.push_str(key.expose());
            }
            ConnectionStringAuth::Signature(t) => {
                s.push_str(";SharedAccessSignature=");
                s.push_str(t.as_str());
            }
            ConnectionStringAuth::ManagedIdentity => s.push_str(";Authentication=Managed Identity"),
            ConnectionStringAuth::None => {}
        }
        if let Some(e) = &self.entity_path {
            s.push_str(";EntityPath=");
            s.push_str(e);
        }
        s
    }

    /// The same string for another hybrid connection.
    pub fn with_entity(&self, entity: &str) -> ConnectionString {
        ConnectionString {
            entity_path: Some(entity.to_owned()),
            ..self.clone()
        }
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConnectionString::parse(s)
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("endpoint", &self.endpoint.host_port())
            .field("entity_path", &self.entity_path)
            .field("auth", &self.auth)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests;
