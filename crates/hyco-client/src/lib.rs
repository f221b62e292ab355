//! The hyco SDK: both halves of a hybrid connection.
//!
//! # Layout
//! * [`ClientOptions`]: trust (system roots plus `--ca-file`), timeouts, proxy and the relay's
//!   node addresses → a [`Connector`] ([`ClientOptions::connector_for`] for a connection
//!   string's endpoint).
//! * [`connect`] / [`connect_with`]: a sender; returns a [`HybridStream`]
//!   (`AsyncRead + AsyncWrite`; `shutdown()` is a half-close).
//! * [`listener`]: a listener actor (control channel, renew, ping, reconnect) yielding
//!   [`listener::Incoming`] connections to accept or reject.
//! * [`forward`]: local TCP ports carried to hybrid connections (`hyco forward`).
//! * [`http`]: HTTP mode: [`http::RelayedRequest`] to serve requests a listener receives
//!   ([`HybridListener::start_with_http`]), [`http::request`] to make them.
//! * [`get_entity`]: the entity description, readable with a Listen key.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod forward;
pub mod http;
pub mod listener;
mod standby;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyco_io::tls::ClientTls;
use hyco_io::ws::{ConnectError, WsStream};
use hyco_proto::entity::EntityDescription;
use hyco_proto::{ConnectionString, ConnectionStringAuth};

pub use forward::{run_forward, run_forward_limited, ForwardRule};
pub use hyco_io::proxy::{NoProxy, ProxyUrl};
pub use hyco_io::ws::Connector;
pub use listener::{HybridListener, Incoming, ListenerOptions, ListenerStatus};

/// A tunnelled connection: binary WebSocket messages as a byte stream.
pub type HybridStream = WsStream<ClientTls>;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection string cannot be used for this.
    #[error("connection string: {0}")]
    ConnectionString(String),
    /// TLS set-up (CA file unreadable, …).
    #[error(transparent)]
    Tls(#[from] hyco_io::tls::TlsError),
    /// The relay refused with a status and reason (a listener's reject arrives this way).
    #[error("relay refused the connection: {status} {reason}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Reason phrase.
        reason: String,
    },
    /// The hybrid connection does not exist.
    #[error("hybrid connection not found: {0}")]
    NotFound(String),
    /// Network, TLS or handshake failure (the connector's error is the source).
    #[error("{0}")]
    Connect(#[source] ConnectError),
    /// An HTTP-mode exchange failed (rendezvous, framing, body limit).
    #[error("http mode: {0}")]
    Http(String),
    /// The entity description could not be read.
    #[error("entity description: {0}")]
    Entity(#[from] hyco_proto::entity::EntityError),
    /// An entry of [`ClientOptions::relay_addrs`] is not `host:port`.
    #[error("relay address {0}")]
    RelayAddr(String),
}

impl From<ConnectError> for ClientError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Rejected { status, reason, .. } => {
                ClientError::Rejected { status, reason }
            }
            other => ClientError::Connect(other),
        }
    }
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Trust, timeouts and the outbound proxy.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// An extra CA to trust, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS + upgrade deadline (through the proxy: connecting to it and its `CONNECT`
    /// answer included).
    pub connect_timeout: Duration,
    /// Lifetime of the tokens minted from a key.
    pub token_lifetime: Duration,
    /// The HTTP proxy every connection (WebSocket, rendezvous, HTTPS request) goes through
    /// with `CONNECT`, for networks that only let traffic out that way. `None`: direct.
    pub proxy: Option<ProxyUrl>,
    /// Relay hosts reached directly even when `proxy` is set (the `NO_PROXY` convention).
    pub no_proxy: NoProxy,
    /// Where the connection string's endpoint can be reached, `host:port` each (`[v6]:port`):
    /// the nodes of a relay cluster behind one namespace name. Connects to the endpoint dial
    /// these in turn, starting at the one that last worked; TLS, `Host` and the token audience
    /// keep the endpoint's name ([`Connector::set_relay_addrs`]). Empty: the endpoint's own
    /// name is dialled. Applied by [`ClientOptions::connector_for`].
    pub relay_addrs: Vec<String>,
    /// Connections kept ready (TCP and TLS done) per relay address this client dials, so that
    /// a sender connection or a rendezvous costs only the upgrade round trip
    /// (`hyco_io::ws::warm`). 0 (the library's default): none. `hyco forward` and
    /// `hyco manager` keep 1.
    pub warm_connections: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            ca_file: None,
            connect_timeout: Duration::from_secs(30),
            token_lifetime: Duration::from_secs(3600),
            proxy: None,
            no_proxy: NoProxy::default(),
            relay_addrs: Vec::new(),
            warm_connections: 0,
        }
    }
}

impl ClientOptions {
    /// Defaults, with `HYCO_CA_FILE` as the extra CA, `HYCO_RELAY_ADDRS` (comma-separated
    /// `host:port`) as [`ClientOptions::relay_addrs`] and the proxy settings of the environment
    /// (see [`ClientOptions::proxy_from_env`]). An unusable proxy URL there is logged and
    /// ignored; use `proxy_from_env` to treat it as an error. Bad relay addresses are
    /// reported when the connector is built.
    pub fn from_env() -> Self {
        let proxy = Self::proxy_from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the proxy setting of the environment");
            None
        });
        ClientOptions {
            ca_file: std::env::var_os("HYCO_CA_FILE").map(PathBuf::from),
            proxy,
            no_proxy: Self::no_proxy_from_env(),
            relay_addrs: std::env::var("HYCO_RELAY_ADDRS")
                .map(|v| split_relay_addrs(&v))
                .unwrap_or_default(),
            ..ClientOptions::default()
        }
    }

    /// [`ClientOptions::relay_addrs`] checked: `(host, port)` each, IPv6 without brackets. The
    /// error names the first bad entry.
    pub fn parsed_relay_addrs(&self) -> Result<Vec<(String, u16)>, ClientError> {
        self.relay_addrs
            .iter()
            .map(|a| {
                hyco_proto::address::HostPort::parse(a.trim())
                    .map(|hp| (hp.host, hp.port))
                    .map_err(|e| ClientError::RelayAddr(e.to_string()))
            })
            .collect()
    }

    /// The proxy from `HTTPS_PROXY`, `https_proxy`, `ALL_PROXY` or `all_proxy`: the first one
    /// set and not blank.
    pub fn proxy_from_env() -> Result<Option<ProxyUrl>, hyco_io::proxy::ProxyError> {
        hyco_io::proxy::proxy_from_env_vars(|name| std::env::var(name).ok())
    }

    /// The hosts that bypass the proxy, from `NO_PROXY` or `no_proxy`.
    pub fn no_proxy_from_env() -> NoProxy {
        hyco_io::proxy::no_proxy_from_env_vars(|name| std::env::var(name).ok())
    }

    /// A connector with these settings, except [`ClientOptions::relay_addrs`], which need the
    /// endpoint they stand for: see [`ClientOptions::connector_for`]. (They are still checked
    /// here, so a bad entry is an error either way.)
    pub fn connector(&self) -> Result<Connector, ClientError> {
        self.parsed_relay_addrs()?;
        let tls = hyco_io::tls::client_config(self.ca_file.as_deref())?;
        let mut c = Connector::new(Arc::clone(&tls));
        c.timeout = self.connect_timeout;
        c.set_proxy(self.proxy.clone().map(|url| hyco_io::proxy::Proxy {
            url,
            no_proxy: self.no_proxy.clone(),
        }));
        c.set_warm(hyco_io::ws::warm::WarmConfig {
            size: self.warm_connections,
            ..hyco_io::ws::warm::WarmConfig::default()
        });
        Ok(c)
    }

    /// A connector for `cs`: [`ClientOptions::connector`], plus [`ClientOptions::relay_addrs`]
    /// for `cs`'s endpoint. Connection strings for other entities on the same endpoint can
    /// use it too, and its clones share which address last worked.
    pub fn connector_for(&self, cs: &ConnectionString) -> Result<Connector, ClientError> {
        let mut c = self.connector()?;
        let addrs = self.parsed_relay_addrs()?;
        if !addrs.is_empty() {
            c.set_relay_addrs(&cs.endpoint.host, cs.endpoint.port_or_default(), addrs);
        }
        Ok(c)
    }
}

/// `a:1, b:2,` → `["a:1", "b:2"]`: comma-separated, blanks dropped.
pub fn split_relay_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The entity a connection string names.
pub fn entity_of(cs: &ConnectionString) -> Result<&str, ClientError> {
    cs.entity_path
        .as_deref()
        .ok_or_else(|| ClientError::ConnectionString("EntityPath is missing".into()))
}

/// A token for the connection string's entity and its expiry, or `None` for anonymous use.
pub fn mint_token(
    cs: &ConnectionString,
    lifetime: Duration,
) -> Result<Option<(String, u64)>, ClientError> {
    match &cs.auth {
        ConnectionStringAuth::Key { name, key } => {
            // Saturating: a lifetime near 2^64 s must not wrap into a token expired at once.
            let expiry = now().saturating_add(lifetime.as_secs());
            let uri = hyco_proto::sas::resource_uri(&cs.endpoint.host, Some(entity_of(cs)?));
            Ok(Some((
                hyco_proto::sas::sign(&uri, name, key, expiry)
                    .as_str()
                    .to_owned(),
                expiry,
            )))
        }
        ConnectionStringAuth::Signature(t) => {
            let expiry = hyco_proto::ParsedToken::parse(t.as_str())
                .map(|p| p.expiry())
                .unwrap_or(u64::MAX);
            Ok(Some((t.as_str().to_owned(), expiry)))
        }
        ConnectionStringAuth::ManagedIdentity => Err(ClientError::ConnectionString(
            "Managed Identity is not supported; use a SharedAccessKey".into(),
        )),
        ConnectionStringAuth::None => Ok(None),
    }
}

/// Options of one sender connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `sb-hc-id` (a new UUID when absent).
    pub id: Option<String>,
    /// Extra handshake headers (they reach the listener in `connectHeaders`).
    pub headers: Vec<(String, String)>,
    /// Path suffix and query after the entity, e.g. `/room7?lang=en`.
    pub path_suffix: Option<String>,
    /// Send early data when the relay accepts it (the `early-data` extension, learnt by the
    /// connector from an earlier connect's 101): the stream is returned before the relay's
    /// answer, and the first writes go out right behind the upgrade request. A refusal then
    /// surfaces as an `io::Error` of a later read or write of the stream, wrapping
    /// [`ConnectError::Rejected`], instead of as this function's error. The request also says
    /// `Hyco-Extensions: standby`, so a hyco relay may join it to a socket its listener parked
    /// (no rendezvous round trip); a listener's refusal then comes as a WebSocket Close
    /// `4000 + status` after the 101. It says `reuse` too: a stream that ends normally (both
    /// Closes 1000) and is then given to [`HybridStream::recycle`] goes back to the connector's
    /// warm pool, and the next connect skips TCP and TLS (see the `reuse` extension in
    /// `hyco_proto::ext`). Off by default: a refusal is this function's error, as with Azure.
    pub early_data: bool,
}

/// What a sender with [`ConnectOptions::early_data`] asks for in `Hyco-Extensions`.
const SENDER_EXTENSIONS: &str = "standby, reuse";

/// Opens a sender connection with options from the environment.
pub async fn connect(cs: &ConnectionString) -> Result<HybridStream, ClientError> {
    let connector = ClientOptions::from_env().connector_for(cs)?;
    connect_with(cs, &connector, &ConnectOptions::default()).await
}

/// Opens a sender connection.
pub async fn connect_with(
    cs: &ConnectionString,
    connector: &Connector,
    opts: &ConnectOptions,
) -> Result<HybridStream, ClientError> {
    let entity = entity_of(cs)?;
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let url = hyco_proto::address::ws_url(
        &cs.endpoint.host_port(),
        entity,
        opts.path_suffix.as_deref(),
        hyco_proto::Action::Connect,
        &id,
    );
    let token = mint_token(cs, ClientOptions::default().token_lifetime)?;
    let mut headers: Vec<(&str, &str)> = opts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Some((t, _)) = &token {
        headers.push(("ServiceBusAuthorization", t.as_str()));
    }
    if opts.early_data {
        headers.push((hyco_proto::ext::HEADER, SENDER_EXTENSIONS));
    }
    let connected = if opts.early_data {
        let mut c = connector.connect_early(&url, &headers).await?;
        connector.lend_for_reuse(&url, &mut c);
        c
    } else {
        connector.connect(&url, &headers).await?
    };
    Ok(connected.ws)
}

/// Reads the entity description (any right works; the manager uses its Listen key).
pub async fn get_entity(
    cs: &ConnectionString,
    connector: &Connector,
) -> Result<EntityDescription, ClientError> {
    let entity = entity_of(cs)?;
    let url = format!(
        "https://{}/{entity}?api-version=2016-07",
        cs.endpoint.host_port()
    );
    let token = mint_token(cs, Duration::from_secs(600))?.ok_or_else(|| {
        ClientError::ConnectionString("a key or signature is needed to read the entity".into())
    })?;
    let ans = connector
        .https_request(
            ::http::Method::GET,
            &url,
            &[("Authorization", token.0.as_str())],
            bytes::Bytes::new(),
            256 * 1024,
        )
        .await?;
    match ans.status {
        200 => match hyco_proto::entity::parse_entity_atom(&String::from_utf8_lossy(&ans.body)) {
            Err(hyco_proto::entity::EntityError::NotFound) => {
                Err(ClientError::NotFound(entity.into()))
            }
            other => Ok(other?),
        },
        404 | 204 => Err(ClientError::NotFound(entity.into())),
        status => Err(ClientError::Rejected {
            status,
            reason: ans.reason,
        }),
    }
}

/// Copies both ways between a local TCP socket and a tunnel until both sides have closed.
/// Half-close travels as WebSocket Close and back; an abort on either side resets the TCP
/// connection (linger 0) so the local peer sees an error, not a clean end of stream.
/// Returns (bytes TCP → tunnel, bytes tunnel → TCP).
pub async fn pump(
    tcp: &mut tokio::net::TcpStream,
    ws: &mut HybridStream,
) -> std::io::Result<(u64, u64)> {
    let r = hyco_io::copy::copy_bidirectional(tcp, ws).await;
    if r.is_err() {
        let _ = tcp.set_zero_linger();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed connect says why, and keeps the cause: the connector's error, and below it the
    /// socket's.
    #[tokio::test]
    async fn a_connect_error_keeps_its_source() {
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let cs = ConnectionString::parse(&format!(
            "Endpoint=sb://127.0.0.1:{dead}/;SharedAccessKeyName=s;SharedAccessKey=a2V5;EntityPath=hc"
        ))
        .unwrap();
        let connector = ClientOptions::default().connector().unwrap();
        let e = connect_with(&cs, &connector, &ConnectOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect(_)), "{e}");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(
            source.downcast_ref::<ConnectError>().is_some(),
            "{source:?}"
        );
        let io = source
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the socket's error below it");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(e.to_string(), source.to_string(), "the wording stays");
    }

    #[test]
    fn relay_addrs_are_checked_and_applied_to_the_endpoint() {
        assert_eq!(
            split_relay_addrs(" 10.0.0.1:9443, ,[::1]:9443,"),
            ["10.0.0.1:9443", "[::1]:9443"]
        );
        let cs = ConnectionString::parse(
            "Endpoint=sb://Relay.Example:9443/;SharedAccessKeyName=s;SharedAccessKey=a2V5;EntityPath=db",
        )
        .unwrap();
        let opts = ClientOptions {
            relay_addrs: vec!["10.0.0.1:9443".into(), "[::1]:9443".into()],
            ..ClientOptions::default()
        };
        let c = opts.connector_for(&cs).unwrap();
        let r = c.relay_addrs().unwrap();
        assert!(r.matches("relay.example", 9443));
        assert_eq!(
            r.addrs(),
            &[("10.0.0.1".to_owned(), 9443), ("::1".to_owned(), 9443)]
        );
        assert!(ClientOptions::default()
            .connector_for(&cs)
            .unwrap()
            .relay_addrs()
            .is_none());
        for bad in ["10.0.0.1", "node:0", "node:http", ":9443"] {
            let opts = ClientOptions {
                relay_addrs: vec!["10.0.0.1:9443".into(), bad.into()],
                ..ClientOptions::default()
            };
            let e = opts.connector_for(&cs).err().unwrap().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
            assert!(opts.connector().is_err(), "{bad}");
        }
    }
}
