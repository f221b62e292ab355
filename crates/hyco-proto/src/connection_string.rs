//! Connection strings (protocol.md §3.7), parsed like Microsoft's clients parse them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::{SasToken, SecretKey};

/// Where the relay is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `sb`.
    pub scheme: String,
    /// Host name or IP literal (IPv6 in brackets).
    pub host: String,
    /// Port when given.
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

/// How the string authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum ConnectionStringAuth {
    /// A rule name and its key.
    Key {
        /// `SharedAccessKeyName`.
        name: String,
        /// `SharedAccessKey`.
        key: SecretKey,
    },
    /// A ready-made token.
    Signature(SasToken),
    /// `Authentication=Managed Identity` (.NET only; hyco cannot use it).
    ManagedIdentity,
    /// Nothing (anonymous senders).
    None,
}

/// A parsed connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The relay.
    pub endpoint: Endpoint,
    /// The hybrid connection, when the string names one.
    pub entity_path: Option<String>,
    /// Credentials.
    pub auth: ConnectionStringAuth,
    /// `OperationTimeout`.
    pub operation_timeout: Option<Duration>,
}

/// Why a connection string was refused; names the part, never a key value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A part without `=`.
    #[error("part {0} has no '=' (expected Key=Value)")]
    NoEquals(usize),
    /// An unknown key (Microsoft's clients refuse these too).
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    /// A key given twice.
    #[error("'{0}' given twice")]
    Duplicate(String),
    /// No Endpoint.
    #[error("Endpoint is missing")]
    MissingEndpoint,
    /// Endpoint is not `sb://host[:port][/]`.
    #[error("Endpoint {0}")]
    BadEndpoint(String),
    /// Name without key or key without name.
    #[error("SharedAccessKeyName and SharedAccessKey must be given together")]
    KeyPair,
    /// Signature and key together.
    #[error("SharedAccessSignature cannot be combined with SharedAccessKeyName/SharedAccessKey")]
    SignatureAndKey,
    /// A value that is empty or malformed.
    #[error("{0} is invalid: {1}")]
    BadValue(&'static str, &'static str),
}

fn parse_timespan(s: &str) -> Option<Duration> {
    // [d.]hh:mm:ss[.fffffff]
    let (days, rest) = match s.split_once('.') {
        Some((d, r)) if r.contains(':') && !d.contains(':') => (d.parse::<u64>().ok()?, r),
        _ => (0, s),
    };
    let mut it = rest.split(':');
    let h: u64 = it.next()?.parse().ok()?;
    let m: u64 = it.next()?.parse().ok()?;
    let sec_part = it.next()?;
    if it.next().is_some() || m >= 60 {
        return None;
    }
    let (secs, frac) = sec_part.split_once('.').unwrap_or((sec_part, ""));
    let s: u64 = secs.parse().ok()?;
    if s >= 60 {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        if frac.len() > 7 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<9}").parse::<u32>().ok()?
    };
    Some(Duration::new(days * 86400 + h * 3600 + m * 60 + s, nanos))
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
    if authority.is_empty()
        || authority.contains('/')
        || authority.contains('?')
        || authority.contains('@')
    {
        return Err(bad("must be sb://host[:port]/ with no path"));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (h, tail) = after
            .split_once(']')
            .ok_or_else(|| bad("has an unclosed '['"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => return Err(bad("has junk after the IPv6 address")),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(bad("has no valid host"));
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("has an invalid port"))?,
        ),
        None => None,
    };
    Ok(Endpoint {
        scheme: "sb".into(),
        host,
        port,
    })
}

impl ConnectionString {
    /// Parses a connection string.
    pub fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
        let (mut endpoint, mut entity, mut kn, mut key, mut sas, mut timeout, mut mi) =
            (None, None, None, None, None, None, false);
        for (i, part) in s
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let (k, v) = part
                .split_once('=')
                .ok_or(ConnectionStringError::NoEquals(i + 1))?;
            let k = k.trim();
            let v = v.trim();
            let dup = || ConnectionStringError::Duplicate(k.to_owned());
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => {
                    if endpoint.replace(parse_endpoint(v)?).is_some() {
                        return Err(dup());
                    }
                }
                "entitypath" => {
                    if v.is_empty() {
                        return Err(ConnectionStringError::BadValue("EntityPath", "empty"));
                    }
                    if entity.replace(v.to_owned()).is_some() {
                        return Err(dup());
                    }
                }
                "sharedaccesskeyname" => {
                    if v.is_empty() {
                        return Err(ConnectionStringError::BadValue(
                            "SharedAccessKeyName",
                            "empty",
                        ));
                    }
                    if kn.replace(v.to_owned()).is_some() {
                        return Err(dup());
                    }
                }
                "sharedaccesskey" => {
                    if v.is_empty() {
                        return Err(ConnectionStringError::BadValue("SharedAccessKey", "empty"));
                    }
                    if key.replace(SecretKey::new(v)).is_some() {
                        return Err(dup());
                    }
                }
                "sharedaccesssignature" => {
                    if !v.to_ascii_lowercase().starts_with("sharedaccesssignature ") {
                        return Err(ConnectionStringError::BadValue(
                            "SharedAccessSignature",
                            "must start with 'SharedAccessSignature '",
                        ));
                    }
                    if sas.replace(SasToken::new(v.to_owned())).is_some() {
                        return Err(dup());
                    }
                }
                "operationtimeout" => {
                    let d = parse_timespan(v).ok_or(ConnectionStringError::BadValue(
                        "OperationTimeout",
                        "expected hh:mm:ss",
                    ))?;
                    if timeout.replace(d).is_some() {
                        return Err(dup());
                    }
                }
                "authentication" => {
                    let norm: String = v
                        .chars()
                        .filter(|c| !c.is_whitespace() && *c != '_')
                        .collect();
                    if !norm.eq_ignore_ascii_case("managedidentity") {
                        return Err(ConnectionStringError::BadValue(
                            "Authentication",
                            "only 'Managed Identity' is known",
                        ));
                    }
                    mi = true;
                }
                _ => {
                    return Err(ConnectionStringError::UnknownKey(
                        k.chars().take(64).collect(),
                    ))
                }
            }
        }
        let endpoint = endpoint.ok_or(ConnectionStringError::MissingEndpoint)?;
        let auth = match (kn, key, sas) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(ConnectionStringError::SignatureAndKey)
            }
            (Some(name), Some(key), None) => ConnectionStringAuth::Key { name, key },
            (None, None, Some(t)) => ConnectionStringAuth::Signature(t),
            (None, None, None) if mi => ConnectionStringAuth::ManagedIdentity,
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

    /// The canonical text, secrets included (that is its purpose).
    pub fn render(&self) -> String {
        let mut s = format!("Endpoint=sb://{}/", self.endpoint.host_port());
        match &self.auth {
            ConnectionStringAuth::Key { name, key } => {
                s.push_str(&format!(
                    ";SharedAccessKeyName={name};SharedAccessKey={}",
                    key.expose()
                ));
            }
            ConnectionStringAuth::Signature(t) => {
                s.push_str(&format!(";SharedAccessSignature={}", t.as_str()))
            }
            ConnectionStringAuth::ManagedIdentity => s.push_str(";Authentication=Managed Identity"),
            ConnectionStringAuth::None => {}
        }
        if let Some(e) = &self.entity_path {
            s.push_str(&format!(";EntityPath={e}"));
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
        let auth = match &self.auth {
            ConnectionStringAuth::Key { name, .. } => format!("key {name} ***"),
            ConnectionStringAuth::Signature(_) => "signature ***".into(),
            ConnectionStringAuth::ManagedIdentity => "managed identity".into(),
            ConnectionStringAuth::None => "none".into(),
        };
        f.debug_struct("ConnectionString")
            .field("endpoint", &self.endpoint.host_port())
            .field("entity_path", &self.entity_path)
            .field("auth", &auth)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn variants() {
        let cs = ConnectionString::parse(&format!(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={K}"
        ))
        .unwrap();
        assert_eq!(cs.endpoint.host_port(), "contoso.servicebus.windows.net");
        assert!(
            matches!(&cs.auth, ConnectionStringAuth::Key { name, key } if name == "RootManageSharedAccessKey" && key.expose() == K)
        );
        let cs = ConnectionString::parse(&format!(
            "endpoint=sb://localhost:9443/;sharedaccesskeyname=l;SHAREDACCESSKEY={K};EntityPath=hyco;OperationTimeout=00:01:30"
        ))
        .unwrap();
        assert_eq!(cs.endpoint.port, Some(9443));
        assert_eq!(cs.entity_path.as_deref(), Some("hyco"));
        assert_eq!(cs.operation_timeout, Some(Duration::from_secs(90)));
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=a&sig=b%3D&se=1&skn=k;EntityPath=hyco",
        )
        .unwrap();
        assert!(matches!(cs.auth, ConnectionStringAuth::Signature(_)));
        let cs = ConnectionString::parse(
            "Endpoint=sb://ns/;Authentication=Managed Identity;EntityPath=h",
        )
        .unwrap();
        assert!(matches!(cs.auth, ConnectionStringAuth::ManagedIdentity));
        assert_eq!(
            parse_timespan("1.02:03:04.5"),
            Some(Duration::new(93784, 500_000_000))
        );
    }

    #[test]
    fn errors_name_the_part_and_hide_keys() {
        let e = |s: &str| ConnectionString::parse(s).unwrap_err();
        assert_eq!(
            e("Endpoint=sb://ns/;Foo=bar"),
            ConnectionStringError::UnknownKey("Foo".into())
        );
        assert_eq!(
            e("SharedAccessKeyName=a;SharedAccessKey=b"),
            ConnectionStringError::MissingEndpoint
        );
        assert_eq!(
            e("Endpoint=sb://ns/;SharedAccessKeyName=a"),
            ConnectionStringError::KeyPair
        );
        assert_eq!(
            e("Endpoint=sb://ns/;garbage"),
            ConnectionStringError::NoEquals(2)
        );
        assert_eq!(
            e("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b;SharedAccessSignature=SharedAccessSignature x"),
            ConnectionStringError::SignatureAndKey
        );
        assert!(matches!(
            e("Endpoint=https://ns/"),
            ConnectionStringError::BadEndpoint(_)
        ));
        assert!(matches!(
            e("Endpoint=sb://ns:99999/"),
            ConnectionStringError::BadEndpoint(_)
        ));
        assert!(matches!(
            e("Endpoint=sb://ns/path"),
            ConnectionStringError::BadEndpoint(_)
        ));
        let msg = e(&format!("Endpoint=sb://ns/;SharedAccessKey={K}")).to_string();
        assert!(!msg.contains(K));
    }

    #[test]
    fn render_round_trips_and_debug_masks() {
        let s = format!("Endpoint=sb://localhost:9443/;SharedAccessKeyName=l;SharedAccessKey={K};EntityPath=hyco");
        let cs = ConnectionString::parse(&s).unwrap();
        assert_eq!(cs.render(), s);
        assert!(!format!("{cs:?}").contains(K));
        assert_eq!(
            cs.with_entity("other").entity_path.as_deref(),
            Some("other")
        );
    }
}
