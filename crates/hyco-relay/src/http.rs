//! HTTP mode (protocol.md §2.7, §2.8, §4.3–4.7): a plain HTTPS request to `/{hc}/…` goes to a
//! listener as a `request` command, and its `response` comes back to the sender.
//!
//! * Small requests (known length, body ≤ 64 KiB) travel whole on the control channel: the
//!   `request` JSON, then at once one binary message with the body.
//! * Others (larger, or chunked) are announced address-only; the listener opens the request
//!   rendezvous, and the relay sends the full `request` and streams the body there.
//! * The response comes on the control channel (`response` + one binary message) or on the
//!   rendezvous the listener opens for it (`response`, then the body as the fragments of one
//!   binary message): whole responses go to the sender with `Content-Length`, streamed ones
//!   chunked, as they arrive.
//!
//! Each request waits in [`HttpTable`] under its id until its response starts. The rendezvous
//! address carries a second 128-bit capability (`sb-hc-rv`); both must match.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyco_io::ws::{Part, Role, WsConfig, WsStream};
use hyco_proto::address::{self, HcQuery};
use hyco_proto::control::{ListenerCommand, RemoteEndpoint, RequestCommand, ResponseCommand};
use hyper::body::{Body as _, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::dispatch::{NotOffered, Offers, Taken, NO_LISTENER_QUALIFIES};
use crate::error::{Body, RelayError};
use crate::registry::ControlMsg;
use crate::request::{forwarded_headers, host_of, strip_port};
use crate::select::Target;
use crate::{ServerIo, Shared};

/// Largest body sent inline on the control channel (protocol.md §4.7: 64 kB).
pub(crate) const INLINE_BODY_MAX: u64 = 64 * 1024;
/// Largest `request`/`response` JSON (the .NET listener's command buffer).
const MAX_COMMAND: usize = 64 * 1024;
/// Pieces of a streamed body are read and forwarded at most this large.
const PIECE: usize = 64 * 1024;

/// How a response starts, as the sender's handler receives it.
pub(crate) enum Delivery {
    /// The whole response (control channel, or a rendezvous with a short body).
    Whole(ResponseCommand, Bytes),
    /// Headers now; body pieces follow on the channel, an `Err` aborts it.
    Streamed(
        ResponseCommand,
        mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ),
}

/// The body an address-only request sends over its rendezvous.
enum RequestBody {
    /// Still with the sender: streamed as it arrives.
    Streaming(Incoming),
    /// Read already (a small body, sent address-only to another node's listener).
    Read(Bytes),
}

/// `Slot::listener` of a request sent to another node's listener: no local control channel
/// may answer it; its answer comes over the rendezvous.
const REMOTE_LISTENER: u64 = u64::MAX;

/// A request waiting for its response.
struct Slot {
    hc_key: String,
    /// The rendezvous capability in its address.
    rv: String,
    /// The listener it was sent to (`ListenerEntry::conn_id`): only it may answer on its
    /// control channel.
    listener: u64,
    /// The full request and body, for an address-only request: the rendezvous sends them.
    pending: Option<(String, RequestBody)>,
    /// Set once the listener opened the rendezvous (it may open it once).
    claimed: bool,
    /// Where the response goes.
    tx: Option<oneshot::Sender<Delivery>>,
}

/// Requests waiting for responses, by request id.
#[derive(Default)]
pub(crate) struct HttpTable {
    slots: Mutex<HashMap<String, Slot>>,
}

impl HttpTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers a response that came on listener `listener`'s control channel. `false` when
    /// no request of that listener waits under this id.
    pub(crate) fn deliver_from_control(&self, listener: u64, id: &str, d: Delivery) -> bool {
        let tx = {
            let mut g = self.lock();
            match g.get_mut(id) {
                Some(s) if s.listener == listener => s.tx.take(),
                _ => None,
            }
        };
        tx.is_some_and(|tx| tx.send(d).is_ok())
    }

    /// Fails a request of listener `listener`: its sender gets 502.
    pub(crate) fn abandon(&self, listener: u64, id: &str) {
        let mut g = self.lock();
        if let Some(s) = g.get_mut(id).filter(|s| s.listener == listener) {
            s.tx = None;
        }
    }

    fn take_tx(&self, id: &str) -> Option<oneshot::Sender<Delivery>> {
        self.lock().get_mut(id).and_then(|s| s.tx.take())
    }
}

/// Removes a slot when the sender's handler ends.
struct SlotGuard<'a> {
    table: &'a HttpTable,
    id: String,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

/// Hop-by-hop and framing headers: neither forwarded to listeners nor taken from their
/// responses (the relay frames the sender's response itself).
fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "content-length"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
            | "close"
    )
}

/// The request target the listener sees: the path decoded as Azure hands it over
/// ([`address::listener_path`]), and the query without `sb-hc-*` pairs that carry a value
/// (`?sb-hc-undefined` stays; §2.10). The pairs kept are the parser's own `app_query`, so a name
/// is dropped exactly when [`HcQuery::parse`] reads it as `sb-hc-*` (`sb%2Dhc%2Dtoken=` too).
/// The query's other bytes are kept as sent.
pub(crate) fn request_target(path: &str, query: &HcQuery) -> String {
    let mut out = address::listener_path(path).into_owned();
    if !query.app_query.is_empty() {
        out.push('?');
        out.push_str(&query.app_query);
    }
    out
}

/// The sender's headers for `requestHeaders`: hop-by-hop headers, the relay's credentials and
/// the listener-choice headers removed; repeated headers joined with ", ".
fn request_headers(headers: &http::HeaderMap, drop_authorization: bool) -> Vec<(String, String)> {
    // The headers `Connection` names are hop-by-hop too (RFC 9110 §7.6.1).
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    forwarded_headers(headers, |n| {
        is_hop_header(n)
            || named.iter().any(|t| t == n)
            || n == "servicebusauthorization"
            || (n == "authorization" && drop_authorization)
            || n == "microsoft-relay-allowedlisteners"
            || n == "microsoft-relay-disallowedlisteners"
    })
}

/// An authorized HTTP-mode request to an existing hybrid connection.
pub(crate) struct Route {
    /// Registry key of the hybrid connection.
    pub(crate) hc_key: String,
    /// Its name as created.
    pub(crate) hc_name: String,
    /// The `sb-hc-*` parameters and the application's query.
    pub(crate) query: HcQuery,
    /// Whether `Authorization` carried the token the relay checked (then it is not forwarded).
    pub(crate) authorization_used: bool,
}

/// Refuses what HTTP mode does not relay: `CONNECT`, and WebSocket upgrades (they go to
/// `/$hc/…`).
pub(crate) fn check_method<B>(req: &Request<B>) -> Result<(), RelayError> {
    if req.method() == Method::CONNECT {
        return Err(RelayError::BadRequest(
            "CONNECT is not relayed in HTTP mode.".into(),
        ));
    }
    if hyco_io::ws::handshake::is_upgrade(req) {
        return Err(RelayError::BadRequest(
            "WebSocket connections go to /$hc/{hybrid connection}.".into(),
        ));
    }
    Ok(())
}

/// The request as listeners get it, whichever listener that is.
struct Outgoing {
    /// Its id (the key of its [`HttpTable`] slot).
    id: String,
    method: Method,
    target: String,
    headers: Vec<(String, String)>,
    peer: SocketAddr,
    /// The body, read already when small (known length up to [`INLINE_BODY_MAX`]).
    inline_body: Option<Bytes>,
}

/// Serves one HTTP-mode request: send it to a listener, wait, answer.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    route: Route,
) -> Result<Response<Body>, RelayError> {
    let started = Instant::now();
    let host = host_of(&req);
    let limits = shared.cfg.limits;
    let mut offers = Offers::new(shared, &route.hc_key, req.headers());
    let inline_len = req
        .body()
        .size_hint()
        .exact()
        .filter(|n| *n <= INLINE_BODY_MAX);
    let spelling = hyco_io::header_case::Spelling::of(&req).await;
    let (parts, body) = req.into_parts();
    let mut out = Outgoing {
        id: address::new_connection_id(rand::random()),
        method: parts.method.clone(),
        target: request_target(parts.uri.path(), &route.query),
        headers: request_headers(&parts.headers, route.authorization_used),
        peer,
        inline_body: None,
    };
    spelling.apply(&mut out.headers);
    let mut body = Some(body);
    // A small body is read before a listener is chosen, so no listener waits on a slow sender.
    out.inline_body = match inline_len {
        Some(0) => Some(Bytes::new()),
        Some(_) => {
            Some(read_small_body(body.take().ok_or_else(body_taken)?, limits.http_timeout).await?)
        }
        None => None,
    };
    let table = &shared.http;
    let _guard = SlotGuard {
        table,
        id: out.id.clone(),
    };
    let build = |body: &mut Option<Incoming>, choice: &Target| {
        request_message(shared, &route, &out, body, choice)
    };
    // Full or gone: take the body back and offer the request to another listener.
    let undo = |body: &mut Option<Incoming>, _| {
        if let Some(s) = table.lock().remove(&out.id) {
            if let Some((_, RequestBody::Streaming(b))) = s.pending {
                *body = Some(b);
            }
        }
    };
    let (taken, rx) = offers
        .offer(&mut body, build, undo)
        .await
        .map_err(|e| match e {
            NotOffered::NoneQualifies => RelayError::NotFound(NO_LISTENER_QUALIFIES.into()),
            NotOffered::NoneLeft { .. } => RelayError::NoListener(route.hc_name.clone()),
            NotOffered::Exhausted => RelayError::ListenerGone,
            NotOffered::Refused(e) => e,
        })?;
    let delivery = wait_response(
        table,
        &route.hc_name,
        &out.id,
        &taken,
        rx,
        limits.http_timeout,
    )
    .await?;
    let (cmd, body) = match delivery {
        Delivery::Whole(cmd, bytes) => (cmd, ResponseBody::Whole(bytes)),
        Delivery::Streamed(cmd, rx) => (cmd, ResponseBody::Streamed(rx)),
    };
    // One line per request is an access log: DEBUG, so a busy HTTP endpoint does not spend
    // its CPU on formatting (failures are logged where they happen, at INFO or above).
    debug!(
        event = "HttpRequestRelayed",
        hc = %route.hc_name,
        id = %out.id,
        listener_id = %taken.listener_id,
        peer = %peer,
        method = %out.method,
        status = cmd.status_code,
        setup_ms = started.elapsed().as_millis() as u64,
        "request answered"
    );
    response_for_sender(&cmd, body, &out.method, &host).await
}

/// Reads a body of known length (at most [`INLINE_BODY_MAX`]) within `timeout`.
async fn read_small_body(body: Incoming, timeout: Duration) -> Result<Bytes, RelayError> {
    let read = tokio::time::timeout(
        timeout,
        Limited::new(body, INLINE_BODY_MAX as usize).collect(),
    )
    .await
    .map_err(|_| RelayError::BadRequest("The request body did not arrive in time.".into()))?
    .map_err(|_| RelayError::BadRequest("The request body could not be read.".into()))?;
    Ok(read.to_bytes())
}

/// The `request` for one listener, its slot waiting in the table under the request's id with
/// a fresh rendezvous capability. Small requests to a listener here travel whole on its
/// control channel; others are announced address-only, with the full request and the body
/// kept for the rendezvous (taken from `body` when it streams).
fn request_message(
    shared: &Shared,
    route: &Route,
    out: &Outgoing,
    body: &mut Option<Incoming>,
    choice: &Target,
) -> Result<(ControlMsg, oneshot::Receiver<Delivery>), RelayError> {
    let rv = address::new_connection_id(rand::random());
    let address = format!(
        "wss://{}/$hc/{}?sb-hc-action=request&sb-hc-id={}&sb-hc-rv={rv}",
        choice.rendezvous_host(shared),
        route.hc_name,
        out.id
    );
    let full = |with_body: bool| {
        ListenerCommand::Request(RequestCommand {
            address: address.clone(),
            id: out.id.clone(),
            request_target: Some(out.target.clone()),
            method: Some(out.method.as_str().to_owned()),
            remote_endpoint: Some(RemoteEndpoint {
                address: out.peer.ip().to_string(),
                port: out.peer.port(),
            }),
            request_headers: Some(out.headers.clone()),
            body: Some(with_body),
        })
        .to_json()
    };
    // The full request is one JSON, at most a listener's command buffer, wherever it goes.
    let fits = |json: String| {
        if json.len() > MAX_COMMAND {
            Err(RelayError::HeadersTooLarge)
        } else {
            Ok(json)
        }
    };
    let (tx, rx) = oneshot::channel();
    let (listener, remote) = match choice {
        Target::Local(l) => (l.conn_id, false),
        Target::Remote(_) => (REMOTE_LISTENER, true),
    };
    // Another node's listener gets the address-only form: it opens the rendezvous here,
    // so neither the request nor the response crosses between nodes.
    let (msg, pending) = match &out.inline_body {
        Some(b) if !remote => (
            ControlMsg::Request {
                json: fits(full(!b.is_empty()))?,
                body: (!b.is_empty()).then(|| b.clone()),
            },
            None,
        ),
        _ => {
            // On a rendezvous a body is always announced and sent, an empty one as an empty
            // final frame: Java's listener reads one there whatever `body` says.
            let rendezvous_json = fits(full(true))?;
            let short = ListenerCommand::Request(RequestCommand {
                address,
                id: out.id.clone(),
                request_target: None,
                method: None,
                remote_endpoint: None,
                request_headers: None,
                body: None,
            })
            .to_json();
            let b = match &out.inline_body {
                Some(b) => RequestBody::Read(b.clone()),
                None => RequestBody::Streaming(body.take().ok_or_else(body_taken)?),
            };
            (ControlMsg::Command(short), Some((rendezvous_json, b)))
        }
    };
    shared.http.lock().insert(
        out.id.clone(),
        Slot {
            hc_key: route.hc_key.clone(),
            rv,
            listener,
            pending,
            claimed: false,
            tx: Some(tx),
        },
    );
    Ok((msg, rx))
}

/// Waits for the response to start. A listener that leaves before opening the rendezvous
/// will not answer; one that opened it may still answer there.
async fn wait_response(
    table: &HttpTable,
    hc_name: &str,
    id: &str,
    taken: &Taken,
    mut rx: oneshot::Receiver<Delivery>,
    timeout: Duration,
) -> Result<Delivery, RelayError> {
    let deadline = Instant::now() + timeout;
    let waited = tokio::select! {
        r = tokio::time::timeout_at(deadline, &mut rx) => r,
        _ = taken.closed() => {
            let claimed = table.lock().get(id).is_some_and(|s| s.claimed);
            if !claimed {
                info!(hc = %hc_name, id = %id, "listener left before answering");
                return Err(RelayError::ListenerGone);
            }
            // The rendezvous goes on; wait for it alone.
            tokio::time::timeout_at(deadline, &mut rx).await
        }
    };
    match waited {
        Ok(Ok(d)) => Ok(d),
        // The wait was abandoned: an unreadable response, or a failed rendezvous.
        Ok(Err(_)) => Err(RelayError::BadGateway(
            "The listener failed to answer the request.".into(),
        )),
        Err(_) => {
            info!(hc = %hc_name, id = %id, "listener did not answer in time");
            Err(RelayError::HttpTimeout(timeout.as_secs()))
        }
    }
}

/// The body is moved into exactly one place per attempt; this is the error if that breaks.
fn body_taken() -> RelayError {
    RelayError::Internal("request body already taken".into())
}

enum ResponseBody {
    Whole(Bytes),
    Streamed(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

/// A streamed response body fed by the rendezvous task.
struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// The listener's response as the sender gets it: status and reason as given, headers minus
/// framing ones and spelled as the listener spelled them, `Via` naming this relay, and the body
/// framed by the relay.
async fn response_for_sender(
    cmd: &ResponseCommand,
    body: ResponseBody,
    method: &Method,
    host: &str,
) -> Result<Response<Body>, RelayError> {
    // 1xx (101 above all) and anything outside 200–599 never reach an HTTP sender (F3).
    let status = StatusCode::from_u16(cmd.status_code)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| {
            RelayError::BadGateway(format!(
                "The listener answered with an unusable status {}.",
                cmd.status_code
            ))
        })?;
    let bodyless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A body without a type: say what RFC 9110 §8.3 lets the recipient assume anyway, because
    // the JDK's `HttpURLConnection.getContent()` refuses a response with none ("no
    // content-type"; azure-relay-java HybridConnectionListenerTest.java:373 reads the body so).
    let untyped_content = !bodyless
        && !matches!(&body, ResponseBody::Whole(b) if b.is_empty())
        && !(cmd.response_headers.iter().flatten())
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let b: Body = match body {
        _ if bodyless => crate::error::empty(),
        ResponseBody::Whole(bytes) => crate::error::full(bytes),
        ResponseBody::Streamed(rx) => ChannelBody(rx).boxed(),
    };
    let mut resp = Response::new(b);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let mut via: Option<String> = None;
    // The listener's names in the order and number they go into `h`, for their spelling.
    let mut spelled: Vec<&str> = Vec::new();
    for (k, v) in cmd.response_headers.iter().flatten() {
        let lower = k.to_ascii_lowercase();
        if is_hop_header(&lower) {
            continue;
        }
        if lower == "via" {
            via = Some(v.clone());
            continue;
        }
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(name), Ok(value)) => {
                h.append(name, value);
                spelled.push(k);
            }
            _ => debug!(header = %k, "unusable response header dropped"),
        }
    }
    let me = format!("1.1 {}", strip_port(host));
    let via = match via {
        Some(v) if !v.trim().is_empty() => format!("{v}, {me}"),
        _ => me,
    };
    if let Ok(v) = HeaderValue::from_str(&via) {
        h.insert(header::VIA, v);
    }
    if untyped_content {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    if let Some(reason) = cmd.status_description.as_deref() {
        let reason = address::sanitize_reason(reason);
        if !reason.is_empty() {
            if let Ok(rp) = hyper::ext::ReasonPhrase::try_from(reason.into_bytes()) {
                resp.extensions_mut().insert(rp);
            }
        }
    }
    hyco_io::header_case::respell(&mut resp, &spelled).await;
    Ok(resp)
}

/// `sb-hc-action=request`: the listener opens the rendezvous of a request. Checks the
/// capability, answers 101 and runs the exchange in a task.
pub(crate) fn rendezvous(
    shared: &Arc<Shared>,
    (rv, hc_key): (String, String),
    query: &HcQuery,
    req: &mut Request<Incoming>,
    accept_key: &str,
) -> Result<Response<Body>, RelayError> {
    let id = query.id.clone().ok_or(RelayError::RendezvousInvalid)?;
    let pending = {
        let mut g = shared.http.lock();
        let slot = g
            .get_mut(&id)
            .filter(|s| {
                !s.claimed
                    && s.hc_key == hc_key
                    && hyco_proto::secret::constant_time_eq(s.rv.as_bytes(), rv.as_bytes())
            })
            .ok_or(RelayError::RendezvousInvalid)?;
        slot.claimed = true;
        slot.pending.take()
    };
    let upgrade = hyper::upgrade::on(req);
    let shared2 = Arc::clone(shared);
    let span = tracing::info_span!("request_rendezvous", id = %id);
    shared.tracker.spawn(tracing::Instrument::instrument(
        async move {
            let io = match upgrade.await.map(|u| u.downcast::<TokioIo<ServerIo>>()) {
                Ok(Ok(parts)) => parts.io.into_inner().unread(&parts.read_buf),
                _ => {
                    debug!("request rendezvous upgrade did not complete");
                    return;
                }
            };
            let cfg = WsConfig {
                max_message: MAX_COMMAND,
                ..WsConfig::default()
            };
            let mut ws = WsStream::new(io, Role::Server, cfg);
            if let Err(e) = exchange(&shared2, &mut ws, &id, pending).await {
                debug!(error = %e, "request rendezvous failed");
                // Whoever waits learns it failed: the sender's handler sees its channel drop.
                drop(shared2.http.take_tx(&id));
                let _ = ws.send_close(1011, "request failed").await;
                return;
            }
            // .NET closes after each response; Node would keep the socket for more requests,
            // which this relay sends on the control channel instead (§4.7).
            let _ = ws.send_close(1000, "").await;
            ws.finish_close(Duration::from_secs(2)).await;
        },
        span,
    ));
    Ok(hyco_io::ws::handshake::switching_protocols(
        accept_key, None,
    ))
}

/// Why a request rendezvous failed (logged; the sender gets 502 or a cut body).
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("sending the request: {0}")]
    SendRequest(#[source] std::io::Error),
    #[error("sending the body: {0}")]
    SendBody(#[source] std::io::Error),
    #[error("reading the sender's body: {0}")]
    SenderBody(#[source] hyper::Error),
    #[error("the sender's body stalled")]
    SenderStalled,
    #[error("expected a response, got {0}")]
    NotAResponse(String),
    #[error("reading the response: {0}")]
    ReadResponse(#[source] hyco_io::ws::WsError),
    #[error("no response in time")]
    NoResponse,
    #[error("expected the response to this request")]
    OtherCommand,
    #[error("bad response: {0}")]
    BadResponse(#[source] hyco_proto::control::ControlError),
    #[error("the request was answered already or abandoned")]
    Answered,
    #[error("the sender went away")]
    SenderGone,
    #[error("listener closed mid-body")]
    ClosedMidBody,
    #[error("reading the response body: {0}")]
    ReadBody(#[source] hyco_io::ws::WsError),
    #[error("response body stalled")]
    BodyStalled,
}

/// On a request rendezvous: sends the request (address-only form), then reads the response and
/// hands it to the waiting sender.
async fn exchange<S>(
    shared: &Shared,
    ws: &mut WsStream<S>,
    id: &str,
    pending: Option<(String, RequestBody)>,
) -> Result<(), ExchangeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let idle = shared.cfg.limits.http_timeout;
    if let Some((json, body)) = pending {
        ws.send_text(&json)
            .await
            .map_err(ExchangeError::SendRequest)?;
        match body {
            RequestBody::Streaming(b) => stream_request_body(ws, b, idle).await?,
            RequestBody::Read(b) => ws
                .send_part(false, true, true, &b)
                .await
                .map_err(ExchangeError::SendBody)?,
        }
    }
    let text = match tokio::time::timeout(idle, ws.recv()).await {
        Ok(Ok(hyco_io::ws::Message::Text(t))) => t,
        Ok(Ok(other)) => return Err(ExchangeError::NotAResponse(format!("{other:?}"))),
        Ok(Err(e)) => return Err(ExchangeError::ReadResponse(e)),
        Err(_) => return Err(ExchangeError::NoResponse),
    };
    let cmd = match ListenerCommand::parse(&text) {
        Ok(ListenerCommand::Response(r)) if r.request_id == id => r,
        Ok(_) => return Err(ExchangeError::OtherCommand),
        Err(e) => return Err(ExchangeError::BadResponse(e)),
    };
    let tx = shared.http.take_tx(id).ok_or(ExchangeError::Answered)?;
    if !cmd.body {
        let _ = tx.send(Delivery::Whole(cmd, Bytes::new()));
        return Ok(());
    }
    let (btx, brx) = mpsc::channel(8);
    if tx.send(Delivery::Streamed(cmd, brx)).is_err() {
        return Err(ExchangeError::SenderGone);
    }
    loop {
        match tokio::time::timeout(idle, ws.recv_part(PIECE)).await {
            Ok(Ok(Part::Data { data, fin, .. })) => {
                if !data.is_empty() && btx.send(Ok(Bytes::from(data))).await.is_err() {
                    return Err(ExchangeError::SenderGone);
                }
                if fin {
                    return Ok(());
                }
            }
            // Java's listener never sends the final frame: it closes with 1000 after the last
            // fragment, and Azure takes that as the end of the body. A normal Close (or one
            // without a code) ends it; any other code aborts it.
            Ok(Ok(Part::Close(None | Some((1000, _))))) => return Ok(()),
            Ok(Ok(Part::Close(_))) => {
                let _ = btx
                    .send(Err(std::io::Error::other("listener closed mid-body")))
                    .await;
                return Err(ExchangeError::ClosedMidBody);
            }
            Ok(Err(e)) => {
                let _ = btx.send(Err(std::io::Error::other(e.to_string()))).await;
                return Err(ExchangeError::ReadBody(e));
            }
            Err(_) => {
                let _ = btx
                    .send(Err(std::io::Error::other("response body stalled")))
                    .await;
                return Err(ExchangeError::BodyStalled);
            }
        }
    }
}

/// Streams the sender's body as the fragments of one binary message, ending with an empty
/// final frame.
async fn stream_request_body<S>(
    ws: &mut WsStream<S>,
    mut body: Incoming,
    idle: Duration,
) -> Result<(), ExchangeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut first = true;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ExchangeError::SenderBody(e)),
            Err(_) => return Err(ExchangeError::SenderStalled),
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not relayed
        };
        if data.is_empty() {
            continue;
        }
        ws.send_part(false, first, false, &data)
            .await
            .map_err(ExchangeError::SendBody)?;
        first = false;
    }
    ws.send_part(false, first, true, &[])
        .await
        .map_err(ExchangeError::SendBody)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_target_drops_sb_hc_pairs_with_values_only() {
        let t = |path: &str, q: Option<&str>| {
            request_target(path, &HcQuery::parse(q.unwrap_or("")).unwrap())
        };
        assert_eq!(t("/hc/a/b", None), "/hc/a/b");
        assert_eq!(t("/hc", Some("x=1&sb-hc-token=abc&y=2")), "/hc?x=1&y=2");
        assert_eq!(
            t("/hc", Some("sb-hc-undefined&SB-HC-ID=4")),
            "/hc?sb-hc-undefined"
        );
        assert_eq!(t("/hc", Some("&foo=bar&")), "/hc?&foo=bar&");
        assert_eq!(t("/hc", Some("sb-hc-token=x")), "/hc");
        assert_eq!(t("/hc", Some("")), "/hc");
        // Encoded names are dropped exactly when the parser reads them as `sb-hc-*`.
        for q in [
            "sb%2Dhc%2Dtoken=x",
            "sb-hc%2dtoken=x",
            "%73b-hc-token=x",
            "SB-HC-TOKEN=x",
        ] {
            assert_eq!(t("/hc", Some(&format!("a=1&{q}"))), "/hc?a=1", "{q}");
        }
        // UTF-8 in the query (hyper accepts it): no slicing inside a character.
        assert_eq!(t("/hc", Some("abcdeé=1")), "/hc?abcdeé=1");
    }

    #[test]
    fn relay_credentials_and_hop_headers_do_not_reach_the_listener() {
        let mut h = http::HeaderMap::new();
        h.insert("host", HeaderValue::from_static("relay.example"));
        h.insert(
            "servicebusauthorization",
            HeaderValue::from_static("SharedAccessSignature x"),
        );
        h.insert("authorization", HeaderValue::from_static("Bearer app"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("via", HeaderValue::from_static("1.1 proxy"));
        h.append("connection", HeaderValue::from_static("X-Named-Hop"));
        h.insert("x-named-hop", HeaderValue::from_static("1"));
        let kept = request_headers(&h, false);
        let names: Vec<&str> = kept.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["Host", "Authorization", "X-Multi", "Via"]);
        assert!(kept.contains(&("X-Multi".into(), "a, b".into())));
        let kept = request_headers(&h, true);
        assert!(!kept.iter().any(|(k, _)| k == "Authorization"));
    }
}
