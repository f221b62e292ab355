//! Where a hybrid connection's senders go, and how: a TCP `host:port` or a Unix socket, as raw
//! TCP (WebSocket mode) and, when HTTP is on, as HTTP/1.1 requests (HTTP mode).
//!
//! The TCP endpoint normally comes from the entity's user metadata; the manager's own settings
//! (configuration file, `hyco manager add --endpoint`) may replace it. A Unix socket is only
//! ever taken from those local settings, never from the metadata: whoever can edit the hybrid
//! connection on the relay must not be able to point the manager at a local socket of its host
//! (`/var/run/docker.sock` and the like).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use hyco_proto::address::HostPort;
use serde::{Deserialize, Serialize};

use crate::allow::{EndpointPolicy, Refusal};

/// A hybrid connection's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    /// `host:port` or `[ipv6]:port`.
    Tcp(HostPort),
    /// `unix:/absolute/path`.
    Unix(PathBuf),
}

/// An endpoint that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// `unix:` with a relative path (its first 64 characters).
    #[error("unix:{0}: the socket path must be absolute")]
    RelativeSocket(String),
    /// `unix:` with a path too long for a socket address, or with control characters.
    #[error("unix:{0}: not a usable socket path")]
    BadSocket(String),
    /// Not `host:port`.
    #[error("{0}")]
    Tcp(#[source] hyco_proto::address::AddressError),
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            let shown: String = path.chars().take(64).collect();
            if !path.starts_with('/') {
                return Err(EndpointError::RelativeSocket(shown));
            }
            if path.len() > 107 || path.bytes().any(|b| b.is_ascii_control()) {
                return Err(EndpointError::BadSocket(shown));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        s.parse::<HostPort>()
            .map(Endpoint::Tcp)
            .map_err(EndpointError::Tcp)
    }
}

impl TryFrom<String> for Endpoint {
    type Error = EndpointError;
    fn try_from(s: String) -> Result<Self, EndpointError> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(hp) => hp.fmt(f),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The allow-list's reason when `e` is its refusal (for a 403), else `None`. A refusal travels
/// inside an [`std::io::Error`] (kind `PermissionDenied`) so that the HTTP bridge's connector,
/// which must return one, reports it too.
pub(crate) fn refusal(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Refusal>())
        .map(ToString::to_string)
}

/// Connects to a TCP endpoint the way every dial of the manager does (tunnels and HTTP mode
/// alike): resolves `hp`, keeps the addresses `policy` permits, connects to those only (the
/// first that answers), Nagle off. A refusal is an error [`refusal`] recognises.
pub(crate) async fn dial_tcp(
    hp: &HostPort,
    policy: &EndpointPolicy,
) -> std::io::Result<tokio::net::TcpStream> {
    let addrs: Vec<_> = tokio::net::lookup_host((hp.host.as_str(), hp.port))
        .await?
        .collect();
    let permitted = policy
        .permitted(&hp.host, hp.port, &addrs)
        .map_err(|reason| std::io::Error::new(std::io::ErrorKind::PermissionDenied, reason))?;
    let s = tokio::net::TcpStream::connect(&permitted[..]).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A connection to an endpoint, for a tunnel (WebSocket mode).
pub(crate) enum Dialed {
    /// TCP, with Nagle off.
    Tcp(tokio::net::TcpStream),
    /// A Unix socket.
    Unix(tokio::net::UnixStream),
}

impl Dialed {
    /// Connects to `e`: a TCP endpoint at the addresses `policy` permits ([`dial_tcp`]); a
    /// Unix socket as it is (only the operator's own settings name one).
    pub(crate) async fn dial(e: &Endpoint, policy: &EndpointPolicy) -> std::io::Result<Dialed> {
        match e {
            Endpoint::Tcp(hp) => Ok(Dialed::Tcp(dial_tcp(hp, policy).await?)),
            Endpoint::Unix(p) => Ok(Dialed::Unix(tokio::net::UnixStream::connect(p).await?)),
        }
    }

    /// Copies both ways until both sides closed (see [`hyco_client::pump`]); returns (bytes
    /// endpoint → tunnel, bytes tunnel → endpoint).
    pub(crate) async fn pump(
        &mut self,
        ws: &mut hyco_client::HybridStream,
    ) -> std::io::Result<(u64, u64)> {
        match self {
            Dialed::Tcp(s) => hyco_client::pump(s, ws).await,
            Dialed::Unix(s) => hyco_io::copy::copy_bidirectional(s, ws).await,
        }
    }
}

/// The manager's own settings for one hybrid connection (configuration file, `manager add`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcOptions {
    /// The endpoint speaks HTTP: HTTP-mode requests are forwarded to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
    /// Replaces the endpoint of the user metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
}

/// The user-metadata entry that turns HTTP on: `{"key":"hyco-mode","value":"http"}` in the
/// same JSON array as App Service's `endpoint` entry. App Service and Microsoft's Hybrid
/// Connection Manager read only the entry whose key is `endpoint` and ignore the others
/// (protocol.md §6.1), so the same hybrid connection still works with them, in TCP.
pub const MODE_KEY: &str = "hyco-mode";

/// Whether the user metadata asks for HTTP mode (key and value in any case).
pub fn http_in_metadata(user_metadata: &str) -> bool {
    let Ok(serde_json::Value::Array(entries)) = serde_json::from_str(user_metadata) else {
        return false;
    };
    entries.iter().any(|e| {
        let s = |k: &str| e.get(k).and_then(|v| v.as_str()).map(str::trim);
        s("key").is_some_and(|k| k.eq_ignore_ascii_case(MODE_KEY))
            && s("value").is_some_and(|v| v.eq_ignore_ascii_case("http"))
    })
}

/// `user_metadata` (a JSON array) with the entry that turns HTTP mode on added.
pub fn with_http_mode(user_metadata: &str) -> String {
    let mut entries = match serde_json::from_str(user_metadata) {
        Ok(serde_json::Value::Array(a)) => a,
        _ => Vec::new(),
    };
    entries.push(serde_json::json!({"key": MODE_KEY, "value": "http"}));
    serde_json::Value::Array(entries).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for s in ["app.corp:8080", "[::1]:80", "unix:/run/app.sock"] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
        }
        assert!(matches!("unix:/run/a.sock".parse(), Ok(Endpoint::Unix(_))));
        for bad in ["unix:run/a.sock", "unix:", "app.corp", "unix:/a\nb"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        let o: HcOptions = toml::from_str("http = true\nendpoint = \"unix:/run/a.sock\"").unwrap();
        assert!(o.http);
        assert_eq!(o.endpoint, Some(Endpoint::Unix("/run/a.sock".into())));
        assert!(toml::from_str::<HcOptions>("endpoint = \"unix:rel\"").is_err());
    }

    #[test]
    fn http_mode_in_user_metadata() {
        assert!(http_in_metadata(
            r#"[{"key":"endpoint","value":"a:80"},{"key":"hyco-mode","value":"http"}]"#
        ));
        assert!(http_in_metadata(
            r#"[{"key":"HYCO-MODE","value":" HTTP "}]"#
        ));
        for no in [
            r#"[{"key":"endpoint","value":"a:80"}]"#,
            r#"[{"key":"hyco-mode","value":"tcp"}]"#,
            r#"{"key":"hyco-mode","value":"http"}"#,
            "not json",
        ] {
            assert!(!http_in_metadata(no), "{no}");
        }
        assert!(http_in_metadata(&with_http_mode(
            r#"[{"key":"endpoint","value":"a:80"}]"#
        )));
        // The App Service parser still finds the endpoint next to it.
        let hp = hyco_proto::entity::parse_endpoint_metadata(
            r#"[{"key":"hyco-mode","value":"http"},{"key":"endpoint","value":"a:80"}]"#,
        )
        .unwrap();
        assert_eq!(hp.to_string(), "a:80");
    }
}
