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
use hyco_proto::rights::Need;
use hyper::body::{Body as _, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::error::{Body, RelayError};
use crate::registry::{id_list, ControlMsg};
use crate::service::{forwarded_headers, host_of, resolve, strip_port, Prefixed};
use crate::{unix_now, ServerTls, Shared};

/// Largest body sent inline on the control channel (protocol.md §4.7: 64 kB).
pub const INLINE_BODY_MAX: u64 = 64 * 1024;
/// Largest `request`/`response` JSON (the .NET listener's command buffer).
const MAX_COMMAND: usize = 64 * 1024;
/// Pieces of a streamed body are read and forwarded at most this large.
const PIECE: usize = 64 * 1024;

/// How a response starts, as the sender's handler receives it.
pub enum Delivery {
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
pub struct HttpTable {
    slots: Mutex<HashMap<String, Slot>>,
}

impl HttpTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers a response that came on listener `listener`'s control channel. `false` when
    /// no request of that listener waits under this id.
    pub fn deliver_from_control(&self, listener: u64, id: &str, d: Delivery) -> bool {
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
    pub fn abandon(&self, listener: u64, id: &str) {
        let mut g = self.lock();
        if let Some(s) = g.get_mut(id).filter(|s| s.listener == listener) {
            s.tx = None;
        }
    }

    fn take_tx(&self, id: &str) -> Option<oneshot::Sender<Delivery>> {
        self.lock().get_mut(id).and_then(|s| s.tx.take())
    }

    /// Number of requests waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
pub fn request_target(path: &str, query: &HcQuery) -> String {
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

/// Serves one HTTP-mode request: authorize, pick a listener, send, wait, answer.
pub async fn handle(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    segments: &[&str],
) -> Result<Response<Body>, RelayError> {
    let started = Instant::now();
    if req.method() == Method::CONNECT {
        return Err(RelayError::BadRequest(
            "CONNECT is not relayed in HTTP mode.".into(),
        ));
    }
    if hyco_io::ws::handshake::is_upgrade(&req) {
        return Err(RelayError::BadRequest(
            "WebSocket connections go to /$hc/{hybrid connection}.".into(),
        ));
    }
    let ns = shared.store.snapshot();
    let raw_query = req.uri().query();
    let query = HcQuery::parse(raw_query.unwrap_or(""))
        .map_err(|e| RelayError::BadRequest(format!("Bad query: {e}")))?;
    let resolved = resolve(&ns, segments);
    let entity_name = resolved
        .as_ref()
        .map(|(_, hc, _)| hc.name.clone())
        .unwrap_or_else(|| segments.join("/"));
    let host = host_of(&req);
    let needs_auth = resolved
        .as_ref()
        .is_none_or(|(_, hc, _)| hc.requires_client_authorization);
    // §2.7: the query token and ServiceBusAuthorization are always removed; Authorization is
    // the credential (and removed) only when auth is required and neither of those came.
    let relay_credential =
        query.token.is_some() || req.headers().contains_key("servicebusauthorization");
    let authorization_used = needs_auth && !relay_credential;
    if needs_auth {
        // A token may be signed for the whole URL, path after the entity included (Java's
        // client signs the request's URL).
        let audience_path = match &resolved {
            Some((_, hc, rest)) => format!("{}{rest}", hc.name),
            None => entity_name.clone(),
        };
        let mut hosts = shared.cfg.hostnames.clone();
        hosts.push(strip_port(&host).to_ascii_lowercase());
        let token = crate::auth::find_token(query.token.as_deref(), req.headers(), true);
        if let Err(e) = crate::auth::guarded(&shared.auth_throttle, peer.ip(), || {
            crate::auth::authorize(
                &ns,
                &hosts,
                Some((&audience_path, resolved.as_ref().map(|(_, hc, _)| *hc))),
                token?,
                Need::Send,
                unix_now(),
                0,
            )
        }) {
            info!(event = "AuthorizationFailed", peer = %peer, hc = %entity_name, action = "request", reason = %e, "refused");
            return Err(e);
        }
    }
    let Some((hc_key, hc, _)) = resolved else {
        return Err(RelayError::NotFound(format!(
            "Endpoint does not exist. No hybrid connection '{entity_name}' in this namespace."
        )));
    };
    let hc_name = hc.name.clone();
    let method = req.method().clone();
    let target = request_target(req.uri().path(), &query);
    let mut headers = request_headers(req.headers(), authorization_used);
    crate::header_case::Spelling::of(&req)
        .await
        .apply(&mut headers);
    let allowed = id_list(req.headers().get("microsoft-relay-allowedlisteners"));
    let disallowed =
        id_list(req.headers().get("microsoft-relay-disallowedlisteners")).unwrap_or_default();
    let inline_len = req
        .body()
        .size_hint()
        .exact()
        .filter(|n| *n <= INLINE_BODY_MAX);
    let limits = shared.cfg.limits;
    let mut body = Some(req.into_body());
    // A small body is read before a listener is chosen, so no listener waits on a slow sender.
    let inline_body = match inline_len {
        Some(0) => Some(Bytes::new()),
        Some(_) => {
            let b = body.take().ok_or_else(body_taken)?;
            let read = tokio::time::timeout(
                limits.http_timeout,
                Limited::new(b, INLINE_BODY_MAX as usize).collect(),
            )
            .await
            .map_err(|_| RelayError::BadRequest("The request body did not arrive in time.".into()))?
            .map_err(|_| RelayError::BadRequest("The request body could not be read.".into()))?;
            Some(read.to_bytes())
        }
        None => None,
    };

    let mut tried = crate::select::Tried::default();
    let id = address::new_connection_id(rand::random());
    let table = &shared.http;
    let _guard = SlotGuard {
        table,
        id: id.clone(),
    };
    let (listener, listener_id, rx) = loop {
        let Some(choice) =
            crate::select::pick(shared, &hc_key, allowed.as_deref(), &disallowed, &tried).await
        else {
            if tried.is_empty()
                && crate::service::none_qualify(shared, &hc_key, allowed.as_deref(), &disallowed)
                    .await
            {
                return Err(RelayError::NotFound(
                    crate::service::NO_LISTENER_QUALIFIES.into(),
                ));
            }
            return Err(RelayError::NoListener(hc_name));
        };
        if tried.len() >= 3 {
            return Err(RelayError::ListenerGone);
        }
        tried.add(&choice);
        let rv = address::new_connection_id(rand::random());
        let address = format!(
            "wss://{}/$hc/{}?sb-hc-action=request&sb-hc-id={id}&sb-hc-rv={rv}",
            choice.rendezvous_host(shared),
            hc_name
        );
        let full = |body: bool| {
            ListenerCommand::Request(RequestCommand {
                address: address.clone(),
                id: id.clone(),
                request_target: Some(target.clone()),
                method: Some(method.as_str().to_owned()),
                remote_endpoint: Some(RemoteEndpoint {
                    address: peer.ip().to_string(),
                    port: peer.port(),
                }),
                request_headers: Some(headers.clone()),
                body: Some(body),
            })
            .to_json()
        };
        let full_json = full(inline_body.as_ref().is_none_or(|b| !b.is_empty()));
        // On a rendezvous a body is always announced and sent, an empty one as an empty final
        // frame: Java's listener reads one there whatever `body` says.
        let rendezvous_json = full(true);
        if rendezvous_json.len() > MAX_COMMAND {
            return Err(RelayError::HeadersTooLarge);
        }
        let (tx, rx) = oneshot::channel();
        let remote = matches!(choice, crate::select::Target::Remote(_));
        // Another node's listener gets the address-only form: it opens the rendezvous here,
        // so neither the request nor the response crosses between nodes.
        let (msg, pending) = match &inline_body {
            Some(b) if !remote => (
                ControlMsg::Request {
                    json: full_json,
                    body: (!b.is_empty()).then(|| b.clone()),
                },
                None,
            ),
            _ => {
                let short = ListenerCommand::Request(RequestCommand {
                    address,
                    id: id.clone(),
                    request_target: None,
                    method: None,
                    remote_endpoint: None,
                    request_headers: None,
                    body: None,
                })
                .to_json();
                let b = match &inline_body {
                    Some(b) => RequestBody::Read(b.clone()),
                    None => RequestBody::Streaming(body.take().ok_or_else(body_taken)?),
                };
                (ControlMsg::Command(short), Some((rendezvous_json, b)))
            }
        };
        table.lock().insert(
            id.clone(),
            Slot {
                hc_key: hc_key.clone(),
                rv,
                listener: match &choice {
                    crate::select::Target::Local(l) => l.conn_id,
                    crate::select::Target::Remote(_) => REMOTE_LISTENER,
                },
                pending,
                claimed: false,
                tx: Some(tx),
            },
        );
        let sent = match choice {
            crate::select::Target::Local(listener) => match listener.tx.try_send(msg) {
                Ok(()) => {
                    let lid = listener.listener_id.clone();
                    Ok((Some(listener), lid))
                }
                Err(e) => Err(e.to_string()),
            },
            crate::select::Target::Remote(r) => {
                let delivered = match (&shared.cluster, msg) {
                    (Some(c), ControlMsg::Command(json)) => c.deliver(&hc_key, &r, json).await,
                    _ => false,
                };
                if delivered {
                    Ok((None, r.listener_id))
                } else {
                    Err(format!("node {} did not take the request", r.node))
                }
            }
        };
        match sent {
            Ok((l, lid)) => break (l, lid, rx),
            Err(e) => {
                // Full or gone: take the body back and offer the request to another listener.
                if let Some(s) = table.lock().remove(&id) {
                    if let Some((_, RequestBody::Streaming(b))) = s.pending {
                        body = Some(b);
                    }
                }
                debug!(hc = %hc_name, error = %e, "listener unavailable; trying another");
            }
        }
    };

    // Wait for the response to start. A listener that leaves before opening the rendezvous
    // will not answer; one that opened it may still answer there.
    let deadline = Instant::now() + limits.http_timeout;
    tokio::pin!(rx);
    let timeout = || {
        info!(hc = %hc_name, id = %id, "listener did not answer in time");
        RelayError::HttpTimeout(limits.http_timeout.as_secs())
    };
    let closed = async {
        match &listener {
            Some(l) => l.tx.closed().await,
            // Another node's listener: its leaving shows as the deadline.
            None => std::future::pending().await,
        }
    };
    let waited = tokio::select! {
        r = tokio::time::timeout_at(deadline, &mut rx) => r,
        _ = closed => {
            let claimed = table.lock().get(&id).is_some_and(|s| s.claimed);
            if !claimed {
                info!(hc = %hc_name, id = %id, "listener left before answering");
                return Err(RelayError::ListenerGone);
            }
            // The rendezvous goes on; wait for it alone.
            tokio::time::timeout_at(deadline, &mut rx).await
        }
    };
    let delivery = match waited {
        Ok(Ok(d)) => d,
        // The wait was abandoned: an unreadable response, or a failed rendezvous.
        Ok(Err(_)) => {
            return Err(RelayError::BadGateway(
                "The listener failed to answer the request.".into(),
            ))
        }
        Err(_) => return Err(timeout()),
    };
    let (cmd, body) = match delivery {
        Delivery::Whole(cmd, bytes) => (cmd, ResponseBody::Whole(bytes)),
        Delivery::Streamed(cmd, rx) => (cmd, ResponseBody::Streamed(rx)),
    };
    info!(
        event = "HttpRequestRelayed",
        hc = %hc_name,
        id = %id,
        listener_id = %listener_id,
        peer = %peer,
        method = %method,
        status = cmd.status_code,
        setup_ms = started.elapsed().as_millis() as u64,
        "request answered"
    );
    let mut resp = response_for_sender(&cmd, body, &method, &host)?;
    // The names as the listener spelled them, in the order `response_for_sender` added them.
    let names: Vec<&str> = (cmd.response_headers.iter().flatten())
        .map(|(k, _)| k.as_str())
        .filter(|k| {
            let lower = k.to_ascii_lowercase();
            !is_hop_header(&lower) && lower != "via"
        })
        .collect();
    crate::header_case::respell(&mut resp, &names).await;
    Ok(resp)
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
/// framing ones, `Via` naming this relay, and the body framed by the relay.
fn response_for_sender(
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
    Ok(resp)
}

/// `sb-hc-action=request`: the listener opens the rendezvous of a request. Checks the
/// capability, answers 101 and runs the exchange in a task.
pub fn rendezvous(
    shared: &Arc<Shared>,
    segments: &[&str],
    query: &HcQuery,
    req: &mut Request<Incoming>,
    accept_key: &str,
) -> Result<Response<Body>, RelayError> {
    let rv = crate::service::rendezvous_capability(query)?;
    let id = query.id.clone().ok_or(RelayError::RendezvousInvalid)?;
    let ns = shared.store.snapshot();
    let (hc_key, _, _) = resolve(&ns, segments).ok_or(RelayError::RendezvousInvalid)?;
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
            let io = match upgrade.await.map(|u| u.downcast::<TokioIo<ServerTls>>()) {
                Ok(Ok(parts)) => Prefixed::new(parts.io.into_inner(), parts.read_buf),
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

/// On a request rendezvous: sends the request (address-only form), then reads the response and
/// hands it to the waiting sender.
async fn exchange<S>(
    shared: &Shared,
    ws: &mut WsStream<S>,
    id: &str,
    pending: Option<(String, RequestBody)>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let idle = shared.cfg.limits.http_timeout;
    if let Some((json, body)) = pending {
        ws.send_text(&json)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        match body {
            RequestBody::Streaming(b) => stream_request_body(ws, b, idle).await?,
            RequestBody::Read(b) => ws
                .send_part(false, true, true, &b)
                .await
                .map_err(|e| format!("sending the body: {e}"))?,
        }
    }
    let text = match tokio::time::timeout(idle, ws.recv()).await {
        Ok(Ok(hyco_io::ws::Message::Text(t))) => t,
        Ok(Ok(other)) => return Err(format!("expected a response, got {other:?}")),
        Ok(Err(e)) => return Err(format!("reading the response: {e}")),
        Err(_) => return Err("no response in time".into()),
    };
    let cmd = match ListenerCommand::parse(&text) {
        Ok(ListenerCommand::Response(r)) if r.request_id == id => r,
        Ok(_) => return Err("expected the response to this request".into()),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let tx = shared
        .http
        .take_tx(id)
        .ok_or("the request was answered already or abandoned")?;
    if !cmd.body {
        let _ = tx.send(Delivery::Whole(cmd, Bytes::new()));
        return Ok(());
    }
    let (btx, brx) = mpsc::channel(8);
    if tx.send(Delivery::Streamed(cmd, brx)).is_err() {
        return Err("the sender went away".into());
    }
    loop {
        match tokio::time::timeout(idle, ws.recv_part(PIECE)).await {
            Ok(Ok(Part::Data { data, fin, .. })) => {
                if !data.is_empty() && btx.send(Ok(Bytes::from(data))).await.is_err() {
                    return Err("the sender went away".into());
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
                return Err("listener closed mid-body".into());
            }
            Ok(Err(e)) => {
                let _ = btx.send(Err(std::io::Error::other(e.to_string()))).await;
                return Err(format!("reading the response body: {e}"));
            }
            Err(_) => {
                let _ = btx
                    .send(Err(std::io::Error::other("response body stalled")))
                    .await;
                return Err("response body stalled".into());
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
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut first = true;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(format!("reading the sender's body: {e}")),
            Err(_) => return Err("the sender's body stalled".into()),
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not relayed
        };
        if data.is_empty() {
            continue;
        }
        ws.send_part(false, first, false, &data)
            .await
            .map_err(|e| format!("sending the body: {e}"))?;
        first = false;
    }
    ws.send_part(false, first, true, &[])
        .await
        .map_err(|e| format!("sending the body: {e}"))
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
