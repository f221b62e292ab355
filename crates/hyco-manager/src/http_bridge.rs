//! HTTP mode: requests that senders make to `https://{relay}/{hc}/…` forwarded to the hybrid
//! connection's endpoint as HTTP/1.1, and its responses carried back.
//!
//! * The request keeps its method, the path below `/{hc}`, the query as sent (the relay has
//!   already removed its own `sb-hc-*` pairs), the headers and the body. Hop-by-hop headers go
//!   (RFC 9110 §7.6.1: `Connection` and the headers it names, `Keep-Alive`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`, `Proxy-*`), so do the relay's credentials
//!   (`ServiceBusAuthorization`, an `Authorization: SharedAccessSignature …`). `Host` is the
//!   endpoint's; `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` are set from what the
//!   relay reported, replacing whatever the sender sent under those names.
//! * The body streams: the first 64 KiB are read, and if the body ended there it goes with a
//!   `Content-Length`, otherwise chunked (the relay does not pass the sender's length on).
//! * The response keeps status, reason, headers (minus hop-by-hop ones) and body. A body that
//!   ends within 64 KiB and 2 s is answered whole (on the control channel when it fits there);
//!   otherwise it is streamed over the request's rendezvous as it arrives, as the .NET
//!   listener does (protocol.md §4.7). `Location` pointing at the endpoint is rewritten to the
//!   relay's URL of the hybrid connection, as a reverse proxy does.
//! * Failures answer the sender with the reason: a TCP endpoint the allow-list refuses → 403
//!   (checked on the resolved addresses before each new connection, as for tunnels:
//!   [`crate::endpoint::dial_tcp`]), the endpoint refused or reset → 502, did not answer
//!   within the timeout → 504, a body over the operator's cap → 413, the manager at its
//!   tunnel limit → 503.
//!
//! The relay sends a request's whole body before it reads the response (§4.7), so an
//! endpoint's response starts only after its request body was read through.
//!
//! Connections to the endpoint are kept alive in a small pool per hybrid connection.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::BodyExt;
use hyco_client::http::{HttpResponse, RelayedRequest};
use hyco_proto::address::HostPort;
use hyco_proto::headers::{connection_tokens, is_hop_by_hop};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::allow::EndpointPolicy;
use crate::endpoint::{self, Endpoint};
use crate::status::HcStatus;

/// Settings of HTTP mode, the same for every hybrid connection of a manager.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Longest wait for the endpoint: its response after the request body went out, each
    /// piece of a request body it reads, each piece of a response body.
    pub timeout: Duration,
    /// Largest request body passed on; larger ones are answered 413. `None`: no cap.
    pub max_body: Option<u64>,
    /// Idle keep-alive connections kept per hybrid connection.
    pub pool_idle: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            // Below the relay's own 60 s, so the sender sees this 504 and its reason.
            timeout: Duration::from_secs(50),
            max_body: None,
            pool_idle: 16,
        }
    }
}

/// What a response body may hold to be answered whole: the control channel's limit.
const WHOLE_MAX: usize = 64 * 1024;
/// How long a response body may take to end and still be answered whole (the .NET listener's
/// flush timeout).
const WHOLE_WAIT: Duration = Duration::from_secs(2);
/// The request body read before deciding between `Content-Length` and chunked.
const PREFETCH: usize = 64 * 1024;
/// Most headers an endpoint's response may have.
const MAX_RESPONSE_HEADERS: usize = 500;
/// Idle endpoint connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One hybrid connection's HTTP forwarding: its endpoint connection pool and counters.
pub struct HttpBridge {
    client: Client<Dialer, ReqBody>,
    settings: HttpSettings,
    /// Endpoint connections open now, idle pooled ones included.
    open: Arc<AtomicI64>,
}

impl HttpBridge {
    /// A bridge whose connections go to `unix` when set, else to the `host:port` of each
    /// request's URI at the addresses `policy` permits; `dial_timeout` bounds each connect;
    /// `open` counts its connections.
    pub fn new(
        settings: HttpSettings,
        dial_timeout: Duration,
        policy: Arc<EndpointPolicy>,
        unix: Option<PathBuf>,
        open: Arc<AtomicI64>,
    ) -> Self {
        let dialer = Dialer {
            dial_timeout,
            policy,
            unix: unix.map(Arc::new),
            open: Arc::clone(&open),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(settings.pool_idle)
            .pool_timer(TokioTimer::new())
            // hyper's default is 100; a response may carry more (the control message's 64 KiB
            // bounds it anyway).
            .http1_max_headers(MAX_RESPONSE_HEADERS)
            .set_host(false)
            .build(dialer);
        HttpBridge {
            client,
            settings,
            open,
        }
    }

    /// Endpoint connections open now (idle pooled ones included).
    pub fn open_connections(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Serves one request end to end; every outcome is logged and counted on `st`.
    pub async fn serve(&self, req: RelayedRequest, target: Endpoint, st: &HcStatus) {
        let started = Instant::now();
        let id = req.id.clone();
        let hc = st.name.as_str();
        let method = req.method.clone();
        let mut done = Served::new(st);
        let status = match self.forward(req, &target, &mut done).await {
            Answer::Sent(status) => {
                st.endpoint_allowed();
                status
            }
            Answer::Gone(why) => {
                debug!(role = "listener", hc, id = %id, reason = %why, "request abandoned");
                0
            }
            Answer::Failed(Failure { status, reason }, req) => {
                if status == REFUSED {
                    // Said once per change of the endpoint's verdict, not per request.
                    if st.endpoint_refused(&reason) {
                        warn!(role = "listener", hc, endpoint = %target, reason = %reason, "endpoint refused by the allow-list; requests are rejected");
                    }
                } else {
                    warn!(role = "listener", hc, id = %id, endpoint = %target, status, reason = %reason, "request failed");
                    st.rejected(reason.clone());
                }
                let mut resp = HttpResponse::new(status, format!("{reason}\n"));
                resp.reason = Some(reason);
                resp.headers
                    .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
                if let Err(e) = req.respond(resp).await {
                    debug!(role = "listener", hc, id = %id, error = %e, "could not answer");
                }
                status
            }
        };
        // An access log line: DEBUG (failures are warned about above).
        debug!(role = "listener", hc, id = %id, endpoint = %target, method = %method, status,
            bytes = done.bytes, duration_ms = started.elapsed().as_millis() as u64, "request served");
    }

    async fn forward(
        &self,
        mut req: RelayedRequest,
        target: &Endpoint,
        done: &mut Served<'_>,
    ) -> Answer {
        let hc = done.st.name.as_str();
        let sent = match self.send(&mut req, target, hc).await {
            Ok(s) => s,
            Err(f) => return Answer::Failed(f, Box::new(req)),
        };
        let Sent {
            resp,
            method,
            authority,
            prefix,
            public_host,
        } = sent;
        let timeout = self.settings.timeout;
        done.opened();
        let bodyless = method == Method::HEAD
            || resp.status() == http::StatusCode::NO_CONTENT
            || resp.status() == http::StatusCode::NOT_MODIFIED;
        let (parts, mut body) = resp.into_parts();
        let status = parts.status.as_u16();
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let rewrite = Rewrite {
            endpoint_authority: &authority,
            prefix: &prefix,
            public_host: public_host.as_deref(),
        };
        let headers = response_headers(&parts.headers, &rewrite);

        // Whole when it ends soon and small; else streamed.
        let mut held: Vec<Bytes> = Vec::new();
        let mut held_len = 0usize;
        let mut ended = bodyless;
        let whole_by = Instant::now() + WHOLE_WAIT;
        while !ended && held_len <= WHOLE_MAX {
            match tokio::time::timeout_at(whole_by, body.frame()).await {
                Err(_) => break,
                Ok(None) => ended = true,
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        held_len += d.len();
                        held.push(d);
                    }
                }
                Ok(Some(Err(e))) => {
                    let reason = format!("The endpoint {target} broke off its response: {e}");
                    return Answer::Failed(
                        Failure {
                            status: 502,
                            reason,
                        },
                        Box::new(req),
                    );
                }
            }
        }
        if ended && held_len <= WHOLE_MAX {
            let mut whole = BytesMut::with_capacity(held_len);
            for d in &held {
                whole.extend_from_slice(d);
            }
            done.bytes = held_len as u64;
            let resp = HttpResponse {
                status,
                reason,
                headers,
                body: whole.freeze(),
            };
            return match req.respond(resp).await {
                Ok(()) => Answer::Sent(status),
                Err(e) => Answer::Gone(format!("response: {e}")),
            };
        }
        let mut w = match req.respond_streaming(status, reason, headers).await {
            Ok(w) => w,
            Err(e) => return Answer::Gone(format!("response: {e}")),
        };
        for d in held {
            if let Err(e) = w.write(&d).await {
                return Answer::Gone(format!("response body: {e}"));
            }
            done.bytes += d.len() as u64;
        }
        loop {
            match tokio::time::timeout(timeout, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(f))) => {
                    let Ok(d) = f.into_data() else { continue };
                    if let Err(e) = w.write(&d).await {
                        // The sender went away: dropping the body closes that endpoint
                        // connection instead of returning it to the pool half-read.
                        return Answer::Gone(format!("response body: {e}"));
                    }
                    done.bytes += d.len() as u64;
                }
                // Too late for a status: the sender's response is cut off (the rendezvous
                // closes without the final frame).
                Ok(Some(Err(e))) => {
                    return Answer::Gone(format!("the endpoint broke off the body: {e}"))
                }
                Err(_) => return Answer::Gone("the endpoint's body stalled".into()),
            }
        }
        match w.finish().await {
            Ok(()) => Answer::Sent(status),
            Err(e) => Answer::Gone(format!("response end: {e}")),
        }
    }

    /// Sends the request to the endpoint (the body streaming on) and waits for the head of
    /// its response, which comes back once the relay has sent the whole body.
    async fn send(
        &self,
        req: &mut RelayedRequest,
        target: &Endpoint,
        hc: &str,
    ) -> Result<Sent, Failure> {
        let (prefix, path) = below_hc(&req.target, hc).ok_or_else(|| Failure {
            status: 400,
            reason: format!("The request target is not below /{hc}."),
        })?;
        let prefix = prefix.to_owned();
        let authority = match target {
            Endpoint::Tcp(hp) if hp.host.contains(':') => format!("[{}]:{}", hp.host, hp.port),
            Endpoint::Tcp(hp) => format!("{}:{}", hp.host, hp.port),
            Endpoint::Unix(_) => "localhost".to_owned(),
        };
        // The path comes decoded, as Azure sends it; the request line needs it encoded again.
        let path = hyco_proto::address::request_line_path(&path);
        let uri: Uri = format!("http://{authority}{path}")
            .parse()
            .map_err(|_| Failure {
                status: 400,
                reason: "The request target is not a usable URI.".into(),
            })?;
        let method = Method::from_bytes(req.method.as_bytes()).map_err(|_| Failure {
            status: 400,
            reason: "The request method is not usable.".into(),
        })?;
        let public_host = req
            .header("host")
            .filter(|h| usable_host(h))
            .map(str::to_owned);
        let mut headers = request_headers(&req.headers);
        set_forwarded(&mut headers, req, public_host.as_deref());
        if let Ok(v) = HeaderValue::from_str(&authority) {
            headers.insert(http::header::HOST, v);
        }

        // The first piece of the body tells whether it has a known length.
        let cap = self.settings.max_body;
        let mut first = BytesMut::new();
        let mut ended = false;
        while first.len() <= PREFETCH {
            match req.next_chunk().await {
                Ok(Some(c)) => {
                    first.extend_from_slice(&c);
                    if cap.is_some_and(|m| first.len() as u64 > m) {
                        return Err(too_large(cap));
                    }
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(e) => {
                    return Err(Failure {
                        status: 502,
                        reason: format!("The request body broke off: {e}"),
                    })
                }
            }
        }
        let first = first.freeze();
        let sent_len = first.len() as u64;
        let (tx, body) = if ended {
            (None, ReqBody::whole(first))
        } else {
            // Said explicitly: left to itself hyper sends no body with a GET of unknown length.
            headers.insert(
                http::header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            let (tx, rx) = mpsc::channel(4);
            (Some(tx), ReqBody::streamed(first, rx))
        };
        let mut hreq = Request::new(body);
        *hreq.method_mut() = method.clone();
        *hreq.uri_mut() = uri;
        *hreq.headers_mut() = headers;

        // Send; meanwhile pass the rest of the body on. The response deadline starts once the
        // body has gone out.
        let timeout = self.settings.timeout;
        let send = self.client.request(hreq);
        tokio::pin!(send);
        let pump = pump_body(req, tx, sent_len, cap, timeout);
        tokio::pin!(pump);
        let mut pumped = false;
        let mut deadline = Instant::now() + timeout;
        let resp = loop {
            tokio::select! {
                r = &mut send => break r,
                p = &mut pump, if !pumped => {
                    p?;
                    pumped = true;
                    deadline = Instant::now() + timeout;
                }
                _ = tokio::time::sleep_until(deadline), if pumped => {
                    return Err(Failure {
                        status: 504,
                        reason: format!(
                            "The endpoint {target} did not answer within {} s.",
                            timeout.as_secs()
                        ),
                    });
                }
            }
        };
        // An early answer (a 413 of the endpoint's, say): the relay still sends the whole
        // body before it reads the response.
        if !pumped {
            pump.await?;
        }
        let resp = resp.map_err(|e| endpoint_failure(&e, target))?;
        Ok(Sent {
            resp,
            method,
            authority,
            prefix,
            public_host,
        })
    }
}

/// Serves a request of hybrid connection `st`: forwarded when HTTP is on and the endpoint is
/// known, else answered 501 as a listener without HTTP does.
pub(crate) async fn dispatch(bridge: &HttpBridge, req: RelayedRequest, st: &HcStatus) {
    let target = st.endpoint.lock().ok().and_then(|g| g.clone());
    match target {
        Some(t) if st.http.load(Ordering::Relaxed) => bridge.serve(req, t, st).await,
        _ => {
            let mut resp = HttpResponse::new(501, "This listener does not serve HTTP requests.");
            resp.headers
                .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
            let _ = req.respond(resp).await;
        }
    }
}

/// Answers a request 503 when the manager is at its tunnel limit (the reserve still has the
/// descriptors this needs).
pub(crate) async fn at_tunnel_limit(req: RelayedRequest, st: &HcStatus) {
    let reason = "The manager is at its tunnel limit (--max-tunnels); retry later.";
    st.rejected(reason.to_owned());
    let mut resp = HttpResponse::new(503, format!("{reason}\n"));
    resp.reason = Some(reason.to_owned());
    resp.headers
        .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    resp.headers.push(("Retry-After".into(), "1".into()));
    let _ = req.respond(resp).await;
}

/// A request the endpoint answered, and what its response needs.
struct Sent {
    resp: http::Response<Incoming>,
    method: Method,
    authority: String,
    prefix: String,
    public_host: Option<String>,
}

/// How a request ended, when it did not end in a [`Failure`] answer.
enum Answer {
    /// The endpoint's response went out with this status.
    Sent(u16),
    /// The sender or the relay went away; nobody is left to answer.
    Gone(String),
    /// The sender is to get this status and reason.
    Failed(Failure, Box<RelayedRequest>),
}

/// The status of a [`Failure`] that is the allow-list's refusal, and of no other: the
/// endpoint's own 403 is a response, never a failure.
const REFUSED: u16 = 403;

/// A status and reason for the sender.
#[derive(Debug, Clone)]
struct Failure {
    status: u16,
    reason: String,
}

fn too_large(cap: Option<u64>) -> Failure {
    Failure {
        status: 413,
        reason: format!(
            "The request body is larger than {} bytes.",
            cap.unwrap_or_default()
        ),
    }
}

/// Counts a request on the hybrid connection's board: open once its response starts, closed
/// (with its bytes) however it ends.
struct Served<'a> {
    st: &'a HcStatus,
    started: Instant,
    open: bool,
    bytes: u64,
}

impl<'a> Served<'a> {
    fn new(st: &'a HcStatus) -> Self {
        Served {
            st,
            started: Instant::now(),
            open: false,
            bytes: 0,
        }
    }

    fn opened(&mut self) {
        self.st.bridge_opened(self.started.elapsed());
        self.open = true;
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        if self.open {
            self.st.bridge_closed(self.bytes);
        }
    }
}

/// Passes the rest of the request body on, `sent` bytes already gone. Too large: the endpoint's
/// request is aborted (the channel closes without the end) and the sender gets 413. An endpoint
/// that stops reading for `timeout`: 504.
async fn pump_body(
    req: &mut RelayedRequest,
    tx: Option<mpsc::Sender<Piece>>,
    mut sent: u64,
    cap: Option<u64>,
    timeout: Duration,
) -> Result<(), Failure> {
    let Some(tx) = tx else { return Ok(()) };
    let mut open = true;
    loop {
        let piece = match req.next_chunk().await {
            Ok(Some(c)) => {
                sent = sent.saturating_add(c.len() as u64);
                if cap.is_some_and(|m| sent > m) {
                    return Err(too_large(cap));
                }
                Some(c)
            }
            Ok(None) => None,
            Err(e) => {
                return Err(Failure {
                    status: 502,
                    reason: format!("The request body broke off: {e}"),
                })
            }
        };
        let end = piece.is_none();
        // Once the endpoint's connection is gone, the rest is read and dropped.
        if open {
            match tokio::time::timeout(timeout, tx.send(piece)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => open = false,
                Err(_) => {
                    return Err(Failure {
                        status: 504,
                        reason: format!(
                            "The endpoint did not read the request body within {} s.",
                            timeout.as_secs()
                        ),
                    })
                }
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// Maps a client error to what the sender sees.
fn endpoint_failure(e: &hyper_util::client::legacy::Error, target: &Endpoint) -> Failure {
    let io = io_cause(e);
    if e.is_connect() {
        if let Some(reason) = io.and_then(endpoint::refusal) {
            return Failure {
                status: REFUSED,
                reason,
            };
        }
        if let Some(io) = io.filter(|io| io.kind() == io::ErrorKind::TimedOut) {
            return Failure {
                status: 504,
                reason: format!("Endpoint {target} unreachable: {io}"),
            };
        }
        return Failure {
            status: 502,
            reason: match io {
                Some(io) => format!("Endpoint {target} unreachable: {io}"),
                None => format!("Endpoint {target} unreachable."),
            },
        };
    }
    Failure {
        status: 502,
        reason: match (io, innermost(e)) {
            (Some(io), _) => format!("The endpoint {target} closed the connection: {io}"),
            (None, Some(cause)) => format!("The endpoint {target} failed: {cause}"),
            (None, None) => {
                format!("The endpoint {target} closed the connection without an answer.")
            }
        },
    }
}

/// The deepest cause of an error, said for people (hyper's "message head is too large", …).
fn innermost(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = e.source()?;
    while let Some(next) = cur.source() {
        cur = next;
    }
    Some(cur.to_string())
}

fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

/// `/{hc}` as the sender wrote it and the rest of the target (`/` at least), when `target` is
/// below the hybrid connection `hc` (names compare case-insensitively, as the relay's do).
fn below_hc<'a>(target: &'a str, hc: &str) -> Option<(&'a str, String)> {
    let n = hc.len() + 1;
    let head = target.get(..n)?;
    if !(head.starts_with('/') && head[1..].eq_ignore_ascii_case(hc)) {
        return None;
    }
    let rest = &target[n..];
    let path = match rest.as_bytes().first() {
        None => "/".to_owned(),
        Some(b'/') => rest.to_owned(),
        Some(b'?') => format!("/{rest}"),
        Some(_) => return None,
    };
    Some((head, path))
}

/// The sender's headers as the endpoint gets them (before `Host` and the forwarding headers).
fn request_headers(from: &[(String, String)]) -> HeaderMap {
    let named = connection_tokens(
        from.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v.as_str()),
    );
    let mut out = HeaderMap::new();
    for (k, v) in from {
        let lower = k.to_ascii_lowercase();
        let drop = is_hop_by_hop(&lower)
            || named.contains(&lower)
            || matches!(
                lower.as_str(),
                "host"
                    | "expect"
                    | "servicebusauthorization"
                    | "x-forwarded-for"
                    | "x-forwarded-proto"
                    | "x-forwarded-host"
                    | "forwarded"
            )
            || (lower == "authorization" && is_relay_token(v));
        if drop {
            continue;
        }
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            (Ok(n), Ok(v)) => {
                out.append(n, v);
            }
            _ => debug!("unusable request header dropped"),
        }
    }
    out
}

/// A relay token (`SharedAccessSignature …`): the relay's credential, never the service's.
fn is_relay_token(v: &str) -> bool {
    v.trim_start()
        .get(..22)
        .is_some_and(|p| p.eq_ignore_ascii_case("SharedAccessSignature "))
}

/// A `Host` value safe to repeat in the forwarding headers (and quote in `Forwarded`).
fn usable_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` from what the relay reported: the sender's
/// address (`remoteEndpoint`), HTTPS, and the host the sender asked for.
fn set_forwarded(h: &mut HeaderMap, req: &RelayedRequest, host: Option<&str>) {
    let ip = req
        .remote
        .as_ref()
        .and_then(|r| r.address.parse::<std::net::IpAddr>().ok());
    let mut fwd = Vec::new();
    if let Some(ip) = ip {
        if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
            h.insert("x-forwarded-for", v);
        }
        fwd.push(match ip {
            std::net::IpAddr::V4(a) => format!("for={a}"),
            std::net::IpAddr::V6(a) => format!("for=\"[{a}]\""),
        });
    }
    if let Some(host) = host {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert("x-forwarded-host", v);
        }
        fwd.push(format!("host=\"{host}\""));
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    fwd.push("proto=https".into());
    if let Ok(v) = HeaderValue::from_str(&fwd.join(";")) {
        h.insert("forwarded", v);
    }
}

/// What `Location` rewriting needs.
struct Rewrite<'a> {
    /// `host:port` the endpoint was asked as.
    endpoint_authority: &'a str,
    /// `/{hc}` as the sender wrote it.
    prefix: &'a str,
    /// The relay's host as the sender addressed it.
    public_host: Option<&'a str>,
}

impl Rewrite<'_> {
    /// `Location` as the sender must see it: an absolute path gets the `/{hc}` prefix; a URL
    /// of the endpoint itself becomes the relay's URL. Others (elsewhere) stay.
    fn location(&self, loc: &str) -> String {
        if loc.starts_with('/') && !loc.starts_with("//") {
            return format!("{}{loc}", self.prefix);
        }
        if let (Some(rest), Some(host)) = (loc.strip_prefix("http://"), self.public_host) {
            let (auth, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
            let same = auth.eq_ignore_ascii_case(self.endpoint_authority)
                || self
                    .endpoint_authority
                    .strip_suffix(":80")
                    .is_some_and(|a| auth.eq_ignore_ascii_case(a));
            if same {
                let tail = if tail.starts_with('/') || tail.is_empty() {
                    tail.to_owned()
                } else {
                    format!("/{tail}")
                };
                return format!("https://{host}{}{tail}", self.prefix);
            }
        }
        loc.to_owned()
    }
}

/// The endpoint's headers as the sender gets them: hop-by-hop and framing ones removed (the
/// relay frames the body), repeated ones kept as separate entries, `Location` rewritten.
fn response_headers(h: &HeaderMap, rw: &Rewrite<'_>) -> Vec<(String, String)> {
    let named = connection_tokens(
        h.get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut out = Vec::with_capacity(h.len());
    for (k, v) in h {
        let n = k.as_str();
        if is_hop_by_hop(n) || named.iter().any(|t| t == n) {
            continue;
        }
        let v = String::from_utf8_lossy(v.as_bytes());
        let v = if n == "location" {
            rw.location(&v)
        } else {
            v.into_owned()
        };
        out.push((canonical(n), v));
    }
    out
}

/// `content-type` → `Content-Type`.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut up = true;
    for c in name.chars() {
        out.push(if up { c.to_ascii_uppercase() } else { c });
        up = c == '-';
    }
    out
}

/// A piece of a streamed request body: data, or its end (`None`). A channel that closes
/// without the end aborts the endpoint's request, so a body cut short is never passed on as
/// complete.
type Piece = Option<Bytes>;

/// The request body for the endpoint: what was read already, then what the pump passes on.
struct ReqBody {
    first: Option<Bytes>,
    rx: Option<mpsc::Receiver<Piece>>,
    exact: Option<u64>,
}

impl ReqBody {
    fn whole(b: Bytes) -> Self {
        ReqBody {
            exact: Some(b.len() as u64),
            first: Some(b).filter(|b| !b.is_empty()),
            rx: None,
        }
    }

    fn streamed(first: Bytes, rx: mpsc::Receiver<Piece>) -> Self {
        ReqBody {
            first: Some(first).filter(|b| !b.is_empty()),
            rx: Some(rx),
            exact: None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Some(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(None)) => {
                self.rx = None;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.rx = None;
                Poll::Ready(Some(Err(io::Error::other(
                    "the request body was cut short",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Dials the endpoint for the pool: the hybrid connection's Unix socket, or the URI's
/// `host:port`.
#[derive(Clone)]
struct Dialer {
    dial_timeout: Duration,
    policy: Arc<EndpointPolicy>,
    unix: Option<Arc<PathBuf>>,
    open: Arc<AtomicI64>,
}

type DialFuture = Pin<Box<dyn std::future::Future<Output = io::Result<Conn>> + Send>>;

impl tower_service::Service<Uri> for Dialer {
    type Response = Conn;
    type Error = io::Error;
    type Future = DialFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> DialFuture {
        let d = self.clone();
        Box::pin(async move {
            let t = d.dial_timeout;
            let late = || {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {} s", t.as_secs()),
                )
            };
            let stream = match &d.unix {
                Some(path) => Stream::Unix(
                    tokio::time::timeout(t, UnixStream::connect(path.as_path()))
                        .await
                        .map_err(|_| late())??,
                ),
                None => {
                    let host = uri
                        .host()
                        .ok_or_else(|| io::Error::other("no host"))?
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let port = uri.port_u16().unwrap_or(80);
                    let hp = HostPort { host, port };
                    // The same check as for a tunnel: only permitted addresses are dialled.
                    let s = tokio::time::timeout(t, endpoint::dial_tcp(&hp, &d.policy))
                        .await
                        .map_err(|_| late())??;
                    Stream::Tcp(s)
                }
            };
            d.open.fetch_add(1, Ordering::Relaxed);
            Ok(Conn {
                io: TokioIo::new(stream),
                open: d.open,
            })
        })
    }
}

/// A connection to the endpoint; counted while it exists.
struct Conn {
    io: TokioIo<Stream>,
    open: Arc<AtomicI64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// TCP or Unix.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_below_the_hybrid_connection() {
        assert_eq!(below_hc("/web", "web"), Some(("/web", "/".into())));
        assert_eq!(
            below_hc("/Web/a/b?x=%2F", "web"),
            Some(("/Web", "/a/b?x=%2F".into()))
        );
        assert_eq!(below_hc("/web?q=1", "web"), Some(("/web", "/?q=1".into())));
        assert_eq!(below_hc("/webx/a", "web"), None);
        assert_eq!(below_hc("/we", "web"), None);
        assert_eq!(below_hc("/a/b/c", "a/b"), Some(("/a/b", "/c".into())));
        // A multi-byte character where the name would end: no panic, no match.
        assert_eq!(below_hc("/wé/x", "we"), None);
    }

    fn hv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn hop_by_hop_and_relay_credentials_never_reach_the_endpoint() {
        let h = request_headers(&hv(&[
            ("Host", "relay.example"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Proxy-Connection", "keep-alive"),
            (
                "ServiceBusAuthorization",
                "SharedAccessSignature sr=x&sig=y",
            ),
            ("Authorization", "sharedaccesssignature sr=x&sig=y"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("Expect", "100-continue"),
            ("Accept", "text/html"),
            ("Set-Thing", "a"),
        ]));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "set-thing"]);
        let h = request_headers(&hv(&[("Authorization", "Bearer app-token")]));
        assert_eq!(h["authorization"], "Bearer app-token");
    }

    #[test]
    fn locations_pointing_at_the_endpoint_point_at_the_relay() {
        let rw = Rewrite {
            endpoint_authority: "127.0.0.1:8080",
            prefix: "/web",
            public_host: Some("relay.example:9443"),
        };
        assert_eq!(rw.location("/login?x=1"), "/web/login?x=1");
        assert_eq!(
            rw.location("http://127.0.0.1:8080/dir/"),
            "https://relay.example:9443/web/dir/"
        );
        assert_eq!(
            rw.location("http://127.0.0.1:8080"),
            "https://relay.example:9443/web"
        );
        assert_eq!(rw.location("https://elsewhere/x"), "https://elsewhere/x");
        assert_eq!(rw.location("//cdn.example/x"), "//cdn.example/x");
        assert_eq!(rw.location("rel/x"), "rel/x");
        let rw = Rewrite {
            endpoint_authority: "app:80",
            ..rw
        };
        assert_eq!(
            rw.location("http://app/x"),
            "https://relay.example:9443/web/x"
        );
    }

    #[test]
    fn response_headers_lose_hop_by_hop_and_keep_repeats() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert("etag", HeaderValue::from_static("\"x\""));
        let rw = Rewrite {
            endpoint_authority: "a:1",
            prefix: "/h",
            public_host: None,
        };
        assert_eq!(
            response_headers(&h, &rw),
            hv(&[
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Etag", "\"x\"")
            ])
        );
    }
}
