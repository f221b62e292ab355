//! The client's way to a relay: TCP (with `TCP_NODELAY`), directly or through an HTTP proxy's
//! `CONNECT` tunnel, TLS with verification, then the WebSocket upgrade.
//!
//! [`Connector`] dials and upgrades; a non-101 answer comes back as
//! [`ConnectError::Rejected`] with the status, reason phrase and body, because the relay's
//! status line is how a sender learns why a listener refused it. A connector can be given
//! several addresses for one endpoint ([`Connector::set_relay_addrs`], see
//! [`super::relay_addrs`]) and a pool of warm connections ([`Connector::set_warm`], see
//! [`super::warm`]). The same dialer carries plain HTTPS requests ([`super::https`]).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::early::{EarlyCache, Pending};
use super::handshake::accept_key;
use super::relay_addrs::{AddrFailure, RelayAddrs};
use super::stream::{Role, WsConfig, WsStream};
use super::warm::{WarmConfig, WarmPool};
use crate::tls::ClientTls;

/// The reason phrase as the server sent it (the relay explains refusals there), or the
/// canonical one.
pub(super) fn reason_phrase<B>(resp: &Response<B>) -> String {
    resp.extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or("").to_owned())
}

/// Why a client connection did not become a WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not `wss://host[:port]/path`.
    #[error("bad relay URL: {0}")]
    BadUrl(String),
    /// TCP connect failed.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// `host:port` dialled.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate not trusted, wrong name, …).
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// Server name checked.
        host: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The whole connect took longer than allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// HTTP-level failure.
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The server answered with something other than 101.
    #[error("{status} {reason}")]
    Rejected {
        /// Status code.
        status: u16,
        /// Reason phrase as sent (the relay puts its explanation here).
        reason: String,
        /// Start of the body, if any.
        body: String,
    },
    /// A 101 that does not complete a valid WebSocket handshake.
    #[error("invalid handshake response: {0}")]
    BadHandshake(&'static str),
    /// The HTTP proxy could not be reached or refused the tunnel.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// The endpoint has several addresses ([`Connector::set_relay_addrs`]) and the TCP step
    /// (or the proxy tunnel) failed at every one of them.
    #[error("cannot reach {endpoint} at any of its relay addresses: {}", join(.failures))]
    AllAddrsFailed {
        /// The endpoint, `host:port`.
        endpoint: String,
        /// Each address, in the order tried, with why it failed.
        failures: Vec<AddrFailure>,
    },
}

fn join(failures: &[AddrFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ConnectError {
    /// The HTTP status, for a rejection.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Parts of a `wss://` URL the connector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port, 443 when absent.
    pub port: u16,
    /// Path and query, sent as the request target.
    pub path_and_query: String,
}

impl Target {
    /// Parses `wss://host[:port]/path[?query]`. `https://` is accepted too.
    pub fn parse(url: &str) -> Result<Target, ConnectError> {
        let u = url::Url::parse(url).map_err(|e| ConnectError::BadUrl(format!("{e}")))?;
        match u.scheme() {
            "wss" | "https" => {}
            s => {
                return Err(ConnectError::BadUrl(format!(
                    "scheme {s:?} is not supported; hyco only speaks TLS (wss)"
                )))
            }
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(ConnectError::BadUrl("missing host".into())),
        };
        let mut path_and_query = u.path().to_owned();
        if let Some(q) = u.query() {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Ok(Target {
            host,
            port: u.port().unwrap_or(443),
            path_and_query,
        })
    }

    pub(super) fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// A completed client handshake.
#[derive(Debug)]
pub struct Connected {
    /// The WebSocket, client role.
    pub ws: WsStream<ClientTls>,
    /// The sub-protocol the server chose.
    pub protocol: Option<String>,
    /// What the 101 advertised in `Hyco-Extensions` (nothing for a relay without extensions,
    /// and for an early-data connect, whose 101 is read later by the stream).
    pub extensions: hyco_proto::ext::Extensions,
}

/// Dials relays: TCP (with `TCP_NODELAY`), directly or through an HTTP proxy's `CONNECT`
/// tunnel, TLS with verification, HTTP/1.1 upgrade.
#[derive(Clone)]
pub struct Connector {
    /// How to reach a relay; shared, since a connector is cloned for every task.
    dialer: Arc<Dialer>,
    /// Limit for TCP + TLS + upgrade together.
    pub timeout: Duration,
    /// Frame and buffer limits for the resulting stream.
    pub ws: WsConfig,
    /// Other addresses for one endpoint (the nodes of a relay cluster), with the cursor that
    /// remembers which one last worked; shared by the clones so they all learn from one failure.
    relay: Option<Arc<RelayAddrs>>,
    /// TCP + TLS done ahead of need ([`Connector::set_warm`]), shared by the clones.
    warm: Option<Arc<WarmPool>>,
    /// The relays that accept early data ([`Connector::connect_early`]), shared by the clones.
    early: Arc<EarlyCache>,
}

/// The TLS client, and the proxy if connections go through one.
struct Dialer {
    tls: tokio_rustls::TlsConnector,
    /// Every connection goes through it with `CONNECT`, except to hosts its `no_proxy`
    /// matches. TLS is still end to end with the relay: the proxy only sees `host:port`.
    proxy: Option<crate::proxy::Proxy>,
}

impl Connector {
    /// A connector with the given client TLS config (see [`crate::tls::client_config`]).
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Connector {
            dialer: Arc::new(Dialer {
                tls: tokio_rustls::TlsConnector::from(tls),
                proxy: None,
            }),
            timeout: Duration::from_secs(30),
            ws: WsConfig::default(),
            relay: None,
            warm: None,
            early: Arc::default(),
        }
    }

    /// Keeps connections to the relays this connector dials warm (TCP and TLS done), so a
    /// sender connection or a rendezvous costs only the upgrade round trip. See
    /// [`super::warm`]; a `size` of 0 turns it off. Clones made after this call share the pool.
    pub fn set_warm(&mut self, cfg: WarmConfig) {
        self.warm = WarmPool::new(cfg);
    }

    /// Warm connections held now.
    pub fn warm_held(&self) -> usize {
        self.warm.as_ref().map_or(0, |w| w.held())
    }

    /// A warm connection to `t`, if the pool has one; starts keeping `t` warm.
    fn take_warm(&self, t: &Target) -> Option<ClientTls> {
        let pool = self.warm.as_ref()?;
        let key = (t.host.clone(), t.port);
        let (found, start_fill) = pool.take(&key);
        if start_fill {
            let me = self.clone();
            let target = t.clone();
            tokio::spawn(Arc::clone(pool).fill(key, move || {
                let (me, target) = (me.clone(), target.clone());
                async move {
                    tokio::time::timeout(me.timeout, me.dial(&target))
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            }));
        }
        found
    }

    /// Dials `addrs` instead of `endpoint_host:endpoint_port` itself, for the relay nodes of a
    /// cluster behind one name. Only a connect to exactly that endpoint (host compared without
    /// regard to case, same port) is affected: its TCP step (or, through a proxy, its
    /// `CONNECT`) goes to the addresses in turn, starting at the one that last worked, moving
    /// on when one cannot be reached (refused, unreachable, or no connection within its share
    /// of [`Connector::timeout`]) and trying each at most once per connect; when all fail the
    /// error is [`ConnectError::AllAddrsFailed`]. The TLS server name, certificate check and
    /// `Host` header stay the endpoint's. Connects to any other `host:port` (rendezvous
    /// addresses, for one) are dialled as given. An empty `addrs` removes the setting.
    ///
    /// Hosts are names or IP literals (IPv6 with or without brackets). Clones made before this
    /// call keep their previous setting; clones made after share the cursor.
    pub fn set_relay_addrs(
        &mut self,
        endpoint_host: &str,
        endpoint_port: u16,
        addrs: Vec<(String, u16)>,
    ) {
        self.relay = RelayAddrs::new(endpoint_host, endpoint_port, addrs).map(Arc::new);
    }

    /// The endpoint's other addresses, if [`Connector::set_relay_addrs`] set some.
    pub fn relay_addrs(&self) -> Option<&RelayAddrs> {
        self.relay.as_deref()
    }

    /// Sends connections through an HTTP proxy (`CONNECT`), except to the hosts its
    /// `no_proxy` list matches; `None` dials directly. The `CONNECT` exchange counts against
    /// [`Connector::timeout`].
    pub fn set_proxy(&mut self, proxy: Option<crate::proxy::Proxy>) {
        self.dialer = Arc::new(Dialer {
            tls: self.dialer.tls.clone(),
            proxy,
        });
    }

    /// The proxy connections go through, if any.
    pub fn proxy(&self) -> Option<&crate::proxy::Proxy> {
        self.dialer.proxy.as_ref()
    }

    /// Opens a WebSocket to `url` with extra request headers.
    pub async fn connect(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Connected, ConnectError> {
        let target = Target::parse(url)?;
        tokio::time::timeout(self.timeout, self.connect_inner(&target, headers))
            .await
            .map_err(|_| ConnectError::Timeout(self.timeout))?
    }

    async fn connect_inner(
        &self,
        t: &Target,
        headers: &[(&str, &str)],
    ) -> Result<Connected, ConnectError> {
        if let Some(tls) = self.take_warm(t) {
            match self.upgrade(tls, t, headers).await {
                // The relay may have closed a warm connection (restart, deadline): dial anew.
                Err(ConnectError::Http(e)) => {
                    tracing::debug!(error = %e, "warm connection unusable; dialling");
                }
                other => return other,
            }
        }
        let tls = self.dial(t).await?;
        self.upgrade(tls, t, headers).await
    }

    /// For a sender connection to `url` whose request asked for `reuse`: when the relay offers
    /// it (on this connection's 101, or, with the response still pending, on the 101s it gave
    /// before), a normal end of the stream gives the connection back to the warm pool
    /// ([`WsStream::recycle`], [`super::warm::Loan`]). Without a warm pool, nothing changes.
    pub fn lend_for_reuse(&self, url: &str, c: &mut Connected) {
        let (Ok(t), Some(pool)) = (Target::parse(url), self.warm.as_ref()) else {
            return;
        };
        let offered = if c.ws.response_pending() {
            self.early.reuse(&(t.host.to_ascii_lowercase(), t.port))
        } else {
            c.extensions.reuse
        };
        if offered {
            c.ws.set_recycle(Box::new(pool.lend(&(t.host.clone(), t.port))));
        }
    }

    /// The WebSocket upgrade on an open TLS connection.
    async fn upgrade(
        &self,
        tls: ClientTls,
        t: &Target,
        headers: &[(&str, &str)],
    ) -> Result<Connected, ConnectError> {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let key_raw: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_raw);
        let mut req = Request::get(t.path_and_query.as_str())
            .header(header::HOST, t.host_header())
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_KEY, key.as_str())
            .header(header::SEC_WEBSOCKET_VERSION, "13");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req
            .body(Empty::<Bytes>::new())
            .map_err(|_| ConnectError::BadUrl("invalid request header".into()))?;
        // Names on the wire as written here and by the caller, as Microsoft's clients send them.
        let mut names = vec![
            "Host",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
        ];
        names.extend(headers.iter().map(|(k, _)| *k));
        if let Some(ext) = crate::header_case::recorded(&names).await {
            req.extensions_mut().extend(ext);
        }
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let reason = reason_phrase(&resp);
            let body = match tokio::time::timeout(
                Duration::from_secs(2),
                Limited::new(resp.into_body(), 4096).collect(),
            )
            .await
            {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                _ => String::new(),
            };
            return Err(ConnectError::Rejected {
                status,
                reason,
                body,
            });
        }
        let expected = accept_key(key.as_bytes());
        if resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes() != expected.as_bytes())
            .unwrap_or(true)
        {
            return Err(ConnectError::BadHandshake("wrong Sec-WebSocket-Accept"));
        }
        let protocol = resp
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let extensions = resp
            .headers()
            .get(hyco_proto::ext::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(hyco_proto::ext::Extensions::parse)
            .unwrap_or_default();
        let upgraded = hyper::upgrade::on(resp).await?;
        let parts = upgraded
            .downcast::<TokioIo<ClientTls>>()
            .map_err(|_| ConnectError::BadHandshake("unexpected transport after upgrade"))?;
        let ws = WsStream::with_prefix(
            parts.io.into_inner(),
            Role::Client,
            self.ws,
            &parts.read_buf,
        );
        Ok(Connected {
            ws,
            protocol,
            extensions,
        })
    }

    /// Like [`Connector::connect`], but may send early data ([`super::early`]): when the relay
    /// at this `host:port` advertised `early-data` on an earlier connect of this connector (or
    /// a clone), the upgrade request is written and the stream returned at once, its response
    /// still pending. Writes then go out right behind the request, up to the advertised number
    /// of bytes before the 101; a refusal (or a bad 101) surfaces as an `io::Error` of the
    /// stream's first read or a later write, wrapping [`ConnectError::Rejected`] (or
    /// [`ConnectError::BadHandshake`]). The response is awaited at most [`Connector::timeout`].
    ///
    /// Otherwise this is a classic connect, and its 101 teaches the connector whether the relay
    /// accepts early data. A 101 in early mode without `early-data` makes the next connect
    /// classic again.
    pub async fn connect_early(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Connected, ConnectError> {
        let target = Target::parse(url)?;
        let key = (target.host.to_ascii_lowercase(), target.port);
        let Some(budget) = self.early.get(&key) else {
            let c = self.connect(url, headers).await?;
            self.early.learn(&key, &c.extensions);
            return Ok(c);
        };
        tokio::time::timeout(self.timeout, async {
            // Early data cannot be sent again on a fresh connection once written, so a warm
            // connection the relay has closed meanwhile (restart, deadline) is left out here
            // rather than found dead after the fact, as a classic connect does.
            let tls = match self
                .take_warm(&target)
                .and_then(|mut t| (!closed_by_peer(&mut t)).then_some(t))
            {
                Some(tls) => tls,
                None => self.dial(&target).await?,
            };
            self.upgrade_early(tls, &target, headers, budget, key).await
        })
        .await
        .map_err(|_| ConnectError::Timeout(self.timeout))?
    }

    /// Writes the upgrade request on `tls` and returns the stream with its response pending.
    async fn upgrade_early(
        &self,
        mut tls: ClientTls,
        t: &Target,
        headers: &[(&str, &str)],
        budget: u32,
        key: super::warm::Key,
    ) -> Result<Connected, ConnectError> {
        use tokio::io::AsyncWriteExt as _;
        let key_raw: [u8; 16] = rand::random();
        let ws_key = base64::engine::general_purpose::STANDARD.encode(key_raw);
        let head = super::early::request_head(t, &ws_key, headers)?;
        let io_err = |source| ConnectError::Connect {
            addr: super::relay_addrs::authority(&t.host, t.port),
            source,
        };
        tls.write_all(&head).await.map_err(io_err)?;
        tls.flush().await.map_err(io_err)?;
        let pending = Pending::new(
            accept_key(ws_key.as_bytes()),
            usize::try_from(budget).unwrap_or(usize::MAX),
            self.timeout,
            Some((Arc::clone(&self.early), key)),
        );
        Ok(Connected {
            ws: WsStream::with_pending_response(tls, self.ws, pending),
            protocol: None,
            extensions: hyco_proto::ext::Extensions::default(),
        })
    }

    /// Whether a connect to `host:port` would send early data (the relay advertised it).
    pub fn early_data_for(&self, host: &str, port: u16) -> Option<u32> {
        self.early.get(&(host.to_ascii_lowercase(), port))
    }
}

/// Whether the peer has closed `tls` already (its FIN, reset or close_notify is in): one read
/// that does not wait. TLS records without data (session tickets) are taken in on the way.
fn closed_by_peer(tls: &mut ClientTls) -> bool {
    use tokio::io::AsyncRead as _;
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    let mut probe = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    // A warm connection has nothing to read: end of stream, an error, or bytes the relay had
    // no reason to send all mean it is not fit for a request.
    !std::pin::Pin::new(tls)
        .poll_read(&mut cx, &mut buf)
        .is_pending()
}

impl Connector {
    /// TCP to the relay (or a tunnel to it through the proxy), then TLS to the relay. For the
    /// endpoint of [`Connector::set_relay_addrs`], the TCP step goes to its addresses in turn.
    pub(super) async fn dial(&self, t: &Target) -> Result<ClientTls, ConnectError> {
        let tcp = match self.relay.as_deref().filter(|r| r.matches(&t.host, t.port)) {
            Some(relay) => {
                let limit = relay.attempt_timeout(self.timeout);
                relay
                    .dial(limit, |host, port| self.tcp(host, port, Some(t), limit))
                    .await
                    .map_err(|failures| ConnectError::AllAddrsFailed {
                        endpoint: relay.endpoint(),
                        failures,
                    })?
            }
            None => self.tcp(t.host.clone(), t.port, None, self.timeout).await?,
        };
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|_| ConnectError::BadUrl(format!("invalid server name {:?}", t.host)))?;
        self.dialer
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| ConnectError::Tls {
                host: t.host.clone(),
                source,
            })
    }

    /// The TCP step to `host:port`: directly, or a `CONNECT` tunnel through the proxy unless
    /// `no_proxy` matches the address (or `endpoint`, the name it stands in for). `limit`
    /// bounds the proxy exchange.
    async fn tcp(
        &self,
        host: String,
        port: u16,
        endpoint: Option<&Target>,
        limit: Duration,
    ) -> Result<TcpStream, ConnectError> {
        let bypass = |p: &crate::proxy::Proxy| {
            endpoint.is_some_and(|e| p.for_target(&e.host, e.port).is_none())
        };
        let via = self
            .dialer
            .proxy
            .as_ref()
            .filter(|p| !bypass(p))
            .and_then(|p| p.for_target(&host, port));
        match via {
            Some(proxy) => {
                tracing::debug!(%proxy, host = %host, port, "dialling through the proxy");
                Ok(crate::proxy::open_tunnel(proxy, &host, port, limit).await?)
            }
            None => {
                let tcp = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|source| ConnectError::Connect {
                        addr: super::relay_addrs::authority(&host, port),
                        source,
                    })?;
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("wss://relay.example:9443/$hc/hyco?sb-hc-action=listen").unwrap();
        assert_eq!(t.host, "relay.example");
        assert_eq!(t.port, 9443);
        assert_eq!(t.path_and_query, "/$hc/hyco?sb-hc-action=listen");
        assert!(Target::parse("ws://relay/").is_err());
        assert_eq!(
            Target::parse("wss://[::1]/x").unwrap().host_header(),
            "[::1]"
        );
    }

    async fn refusing_port() -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn relay_addrs_apply_to_their_endpoint_only() {
        let (d1, d2) = (refusing_port().await, refusing_port().await);
        let mut c = Connector::new(crate::tls::client_config(None).unwrap());
        c.set_relay_addrs(
            "Relay.Example",
            9443,
            vec![("127.0.0.1".into(), d1), ("127.0.0.1".into(), d2)],
        );
        let clone = c.clone();
        // The endpoint: every address is tried, and the error names each.
        let e = clone
            .connect("wss://relay.example:9443/$hc/x", &[])
            .await
            .unwrap_err();
        match &e {
            ConnectError::AllAddrsFailed { endpoint, failures } => {
                assert_eq!(endpoint, "relay.example:9443");
                let tried: Vec<_> = failures.iter().map(|f| f.addr.as_str()).collect();
                assert_eq!(
                    tried,
                    [format!("127.0.0.1:{d1}"), format!("127.0.0.1:{d2}")]
                );
            }
            other => panic!("expected AllAddrsFailed, got {other}"),
        }
        let text = e.to_string();
        assert!(text.contains(&format!("127.0.0.1:{d1} (")), "{text}");
        // Another host:port (a rendezvous address) is dialled as given.
        let e = c
            .connect(&format!("wss://127.0.0.1:{d1}/$hc/x?sb-hc-rv=1"), &[])
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Connect { addr, .. } if *addr == format!("127.0.0.1:{d1}")),
            "{e}"
        );
        c.set_relay_addrs("relay.example", 9443, Vec::new());
        assert!(c.relay_addrs().is_none());
    }

    /// A proxy that refuses every `CONNECT` with 502 and reports each request line.
    async fn refusing_proxy() -> (
        crate::proxy::ProxyUrl,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let mut s = tokio::io::BufReader::new(s);
                let mut first = String::new();
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 && line != "\r\n" {
                    if first.is_empty() {
                        first = line.trim_end().to_owned();
                    }
                    line.clear();
                }
                let _ = tx.send(first);
                let _ = s
                    .get_mut()
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let url = crate::proxy::ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        (url, rx)
    }

    #[tokio::test]
    async fn through_a_proxy_the_connect_goes_to_each_address() {
        let (url, mut seen) = refusing_proxy().await;
        let mut c = Connector::new(crate::tls::client_config(None).unwrap());
        c.set_proxy(Some(crate::proxy::Proxy {
            url: url.clone(),
            no_proxy: crate::proxy::NoProxy::default(),
        }));
        c.set_relay_addrs(
            "relay.example",
            443,
            vec![("10.0.0.11".into(), 9443), ("fd00::12".into(), 9443)],
        );
        let e = c
            .connect("wss://relay.example/$hc/x", &[])
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::AllAddrsFailed { .. }), "{e}");
        assert!(e.to_string().contains("502"), "{e}");
        assert_eq!(
            seen.recv().await.unwrap(),
            "CONNECT 10.0.0.11:9443 HTTP/1.1"
        );
        assert_eq!(
            seen.recv().await.unwrap(),
            "CONNECT [fd00::12]:9443 HTTP/1.1"
        );
        // `no_proxy` naming the endpoint sends its addresses direct.
        let dead = refusing_port().await;
        c.set_proxy(Some(crate::proxy::Proxy {
            url,
            no_proxy: crate::proxy::NoProxy::parse("relay.example"),
        }));
        c.set_relay_addrs("relay.example", 443, vec![("127.0.0.1".into(), dead)]);
        let e = c
            .connect("wss://relay.example/$hc/x", &[])
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{dead} (cannot reach")),
            "{text}"
        );
        assert!(seen.try_recv().is_err(), "the proxy was used");
    }
}
