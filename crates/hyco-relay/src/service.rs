//! Request routing: every HTTP request on the relay's port comes through [`handle`].
//!
//! * `/$hc/{hc}…` with an upgrade: `sb-hc-action` = listen, connect, accept (protocol.md §2).
//! * `/$hyco/v1/…`: the admin API ([`crate::admin`]).
//! * `GET /{hc}?api-version=…`: the entity description (§2.9).
//! * other requests to `/{hc}…`: HTTP mode ([`crate::http`]).
//! * anything else: a neutral 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{header, Request, Response, StatusCode};
use hyco_io::splice::{splice, Counters, SpliceEnd};
use hyco_io::ws::handshake::{check_upgrade, is_upgrade, switching_protocols};
use hyco_proto::address::{self, Action, HcQuery};
use hyco_proto::control::{AcceptCommand, ListenerCommand, RemoteEndpoint};
use hyco_proto::rights::Need;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::control::ControlChannel;
use crate::error::{Body, RelayError};
use crate::metrics::Hc;
use crate::registry::{id_list, ControlMsg, ListenerEntry};
use crate::rendezvous::{Busy, Outcome};
use crate::store::HybridConnection;
use crate::{unix_now, ServerTls, Shared};

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let result = if path.starts_with("/$hyco/") {
        crate::admin::handle(&shared, peer, req).await
    } else if path.len() > 1 && !shared.memory.allows_new() {
        // Over the memory budget: new work is refused; the admin API and open tunnels go on.
        warn!(peer = %peer, resident = shared.memory.resident(), "memory budget reached; refusing");
        Err(RelayError::Unavailable(
            "ServerBusy: the relay is at its memory budget; retry later.",
        ))
    } else if is_hc_path(&path) {
        if is_upgrade(&req) {
            let counted = metric_label(&shared, &req);
            let r = websocket(&shared, peer, req).await;
            if let Some((listen, hc)) = counted {
                let status = match &r {
                    Ok(resp) => resp.status().as_u16(),
                    Err(e) => e.status().as_u16(),
                };
                shared.metrics.record_upgrade(listen, &hc, status);
            }
            r
        } else {
            Err(RelayError::BadRequest(
                "The $hc endpoint only accepts WebSocket upgrades.".into(),
            ))
        }
    } else if path == "/" || path.is_empty() {
        Err(RelayError::NotFound("Not found.".into()))
    } else {
        entity_or_http(&shared, peer, req).await
    };
    Ok(result.unwrap_or_else(|e| {
        if e.is_peer_fault() {
            debug!(peer = %peer, path = %path_for_log(&path), error = %e, "request refused");
        } else {
            warn!(peer = %peer, error = %e, "request failed");
        }
        e.into_response()
    }))
}

/// For listen and connect upgrades: whether it is a listen, and the metric label.
fn metric_label(shared: &Shared, req: &Request<Incoming>) -> Option<(bool, Hc)> {
    let q = HcQuery::parse(req.uri().query().unwrap_or("")).ok()?;
    let listen = match q.action? {
        Action::Listen => true,
        Action::Connect => false,
        _ => return None,
    };
    let ns = shared.store.snapshot();
    let key = address::split_hc_path(req.uri().path())
        .ok()
        .and_then(|segs| resolve(&ns, &segs).map(|(k, _, _)| k));
    Some((listen, Hc::new(key.as_deref())))
}

fn is_hc_path(path: &str) -> bool {
    path.len() >= 4
        && path[..4].eq_ignore_ascii_case("/$hc")
        && (path.len() == 4 || path.as_bytes()[4] == b'/')
}

/// Paths may carry an application's arguments; keep log lines short.
fn path_for_log(path: &str) -> &str {
    let mut end = path.len().min(120);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// The longest existing hybrid connection that the segments start with, and the rest.
pub(crate) fn resolve<'a>(
    ns: &'a crate::store::Namespace,
    segments: &[&str],
) -> Option<(String, &'a HybridConnection, String)> {
    for k in (1..=segments.len()).rev() {
        let name = segments[..k].join("/");
        if let Some(hc) = ns.hcs.get(&address::entity_key(&name)) {
            let rest: String = segments[k..].iter().map(|s| format!("/{s}")).collect();
            return Some((address::entity_key(&name), hc, rest));
        }
    }
    None
}

pub(crate) fn host_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

async fn websocket(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let uri = req.uri().clone();
    let segments = address::split_hc_path(uri.path())
        .map_err(|e| RelayError::BadRequest(format!("Bad hybrid connection path: {e}")))?;
    let query = HcQuery::parse(uri.query().unwrap_or(""))
        .map_err(|e| RelayError::BadRequest(format!("Bad query: {e}")))?;
    let action = query
        .action
        .ok_or_else(|| RelayError::BadRequest("sb-hc-action is required.".into()))?;
    let accept_key = check_upgrade(&req).map_err(|e| {
        if e.status == StatusCode::UPGRADE_REQUIRED {
            RelayError::UpgradeRequired
        } else {
            RelayError::BadRequest(e.reason.into())
        }
    })?;
    let ns = shared.store.snapshot();
    if action == Action::Accept {
        return accept(shared, &segments, &query, &mut req, &accept_key);
    }
    if action == Action::Request {
        return crate::http::rendezvous(shared, &segments, &query, &mut req, &accept_key);
    }
    let host = host_of(&req);
    let mut hosts = shared.cfg.hostnames.clone();
    hosts.push(strip_port(&host).to_ascii_lowercase());
    let resolved = resolve(&ns, &segments);
    let entity_name = resolved
        .as_ref()
        .map(|(_, hc, _)| hc.name.clone())
        .unwrap_or_else(|| segments.join("/"));
    let token = crate::auth::find_token(query.token.as_deref(), req.headers(), true)
        .map(|t| t.map(str::to_owned));
    let needs_auth = match (&action, &resolved) {
        (Action::Connect, Some((_, hc, _))) => hc.requires_client_authorization,
        _ => true,
    };
    // `Authorization` is the relay's credential only when it was the one checked; otherwise it
    // is the application's, for the listener to evaluate (.NET's AcceptHandler, Node's
    // verifyClient).
    let authorization_used = needs_auth
        && query.token.is_none()
        && !req.headers().contains_key("servicebusauthorization");
    let need = if action == Action::Listen {
        Need::Listen
    } else {
        Need::Send
    };
    // The audience may name the path after the entity too (a token for the whole URL).
    let audience_path = match &resolved {
        Some((_, hc, rest)) => format!("{}{rest}", hc.name),
        None => entity_name.clone(),
    };
    let grant = if needs_auth {
        let g = crate::auth::guarded(&shared.auth_throttle, peer.ip(), || {
            crate::auth::authorize(
                &ns,
                &hosts,
                Some((&audience_path, resolved.as_ref().map(|(_, hc, _)| *hc))),
                token.as_ref().map_err(|e| *e)?.as_deref(),
                need,
                unix_now(),
                0,
            )
        });
        if let Err(e) = &g {
            info!(event = "AuthorizationFailed", peer = %peer, hc = %entity_name, action = action.as_str(), reason = %e, "refused");
        }
        Some(g?)
    } else {
        None
    };
    let Some((hc_key, hc, suffix)) = resolved else {
        return Err(RelayError::NotFound(format!(
            "Endpoint does not exist. No hybrid connection '{entity_name}' in this namespace."
        )));
    };
    let route = Route {
        accept_key,
        hc_key,
        hc_name: hc.name.clone(),
        suffix,
        host,
        query,
        authorization_used,
    };
    match action {
        Action::Listen => {
            let expiry = grant.map(|g| g.expiry).unwrap_or(u64::MAX);
            let token = token.ok().flatten().unwrap_or_default();
            listen(shared, peer, req, route, expiry, token)
        }
        _ => connect(shared, peer, req, route).await,
    }
}

/// Where an authorized listen or connect goes.
struct Route {
    /// `Sec-WebSocket-Accept` for the 101.
    accept_key: String,
    /// Registry key of the hybrid connection.
    hc_key: String,
    /// Its name as created.
    hc_name: String,
    /// Path after the entity name (senders' arguments).
    suffix: String,
    /// The Host the request came in with.
    host: String,
    /// The `sb-hc-*` parameters and the application's query.
    query: HcQuery,
    /// Whether `Authorization` carried the token the relay checked.
    authorization_used: bool,
}

fn listen(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    route: Route,
    expiry: u64,
    token: String,
) -> Result<Response<Body>, RelayError> {
    let Route {
        accept_key,
        hc_key,
        hc_name,
        host,
        query,
        ..
    } = route;
    let (tx, rx) = mpsc::channel(64);
    let listener_id = query
        .id
        .clone()
        .unwrap_or_else(|| address::new_connection_id(rand::random()));
    let entry = Arc::new(ListenerEntry {
        conn_id: shared.registry.next_conn_id(),
        listener_id: listener_id.clone(),
        remote: peer,
        since: SystemTime::now(),
        host,
        tx,
        last_seen: std::sync::atomic::AtomicU64::new(crate::unix_now()),
    });
    let registration = shared
        .registry
        .add(&hc_key, Arc::clone(&entry), shared.cfg.limits.max_listeners_per_hc)
        .map_err(|_| {
            RelayError::Forbidden("MaximumListenersPerEndpoint: this hybrid connection has the maximum number of listeners.")
        })?;
    info!(event = "NewListenerRegistered", hc = %hc_name, listener_id = %listener_id, peer = %peer, "listener connected");
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The channel owns the registration: whatever ends its task (the upgrade failing, a close,
    // cancellation, a panic) drops it, and the listener is gone from the registry.
    let channel = ControlChannel {
        shared: Arc::clone(shared),
        hc_key,
        hc_name,
        entry,
        registration,
        expiry,
        token,
        rx,
    };
    shared.tracker.spawn(async move {
        match on_upgrade.await.map(|u| u.downcast::<TokioIo<ServerTls>>()) {
            Ok(Ok(parts)) => channel.run(parts.io.into_inner(), &parts.read_buf).await,
            _ => debug!("listener upgrade did not complete"),
        }
    });
    Ok(switching_protocols(&accept_key, None))
}

/// Header names the way Microsoft's clients spell them (Java looks them up case-sensitively).
fn canonical_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            if part.eq_ignore_ascii_case("websocket") {
                "WebSocket".to_owned()
            } else {
                let mut c = part.chars();
                match c.next() {
                    Some(f) => {
                        f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase()
                    }
                    None => String::new(),
                }
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The sender's headers for `connectHeaders`: the relay's credentials and extensions removed,
/// repeated headers joined with ", " (attacks A11). `Authorization` goes only when it was the
/// relay's credential.
fn connect_headers(headers: &http::HeaderMap, drop_authorization: bool) -> Vec<(String, String)> {
    forwarded_headers(headers, |n| {
        (n == "authorization" && drop_authorization)
            || matches!(
                n,
                "servicebusauthorization"
                    | "sec-websocket-extensions"
                    | "microsoft-relay-allowedlisteners"
                    | "microsoft-relay-disallowedlisteners"
            )
    })
}

/// A sender's headers as a listener gets them: those `skip` names (lower-case) left out, names
/// in the usual capitalisation, repeated headers joined with ", ", non-text values dropped.
pub(crate) fn forwarded_headers(
    headers: &http::HeaderMap,
    skip: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        let n = name.as_str();
        if skip(n) {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            out.push((canonical_header_name(n), values.join(", ")));
        }
    }
    out
}

async fn connect(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    route: Route,
) -> Result<Response<Body>, RelayError> {
    let Route {
        accept_key,
        hc_key,
        hc_name,
        suffix,
        query,
        authorization_used,
        ..
    } = route;
    // Refused while descriptors remain to say so (issue 15 §5); held until the splice ends.
    let Some(tunnel_permit) = shared.tunnel_gate.try_acquire() else {
        return Err(RelayError::Unavailable(
            "ServerBusy: the relay is at its tunnel limit (--max-tunnels); retry later.",
        ));
    };
    let started = Instant::now();
    let allowed = id_list(req.headers().get("microsoft-relay-allowedlisteners"));
    let disallowed =
        id_list(req.headers().get("microsoft-relay-disallowedlisteners")).unwrap_or_default();
    let mut headers = connect_headers(req.headers(), authorization_used);
    crate::header_case::Spelling::of(&req)
        .await
        .apply(&mut headers);
    let deadline = Instant::now() + shared.cfg.limits.rendezvous_timeout;
    // A listener that leaves before answering does not cost the sender the whole deadline:
    // the accept is offered to another one (at most three), or the sender learns at once.
    let mut tried = crate::select::Tried::default();
    let (listener_id, conn_id, outcome) = loop {
        let Some(target) =
            crate::select::pick(shared, &hc_key, allowed.as_deref(), &disallowed, &tried).await
        else {
            return Err(if !tried.is_empty() {
                RelayError::ListenerGone
            } else if none_qualify(shared, &hc_key, allowed.as_deref(), &disallowed).await {
                RelayError::NotFound(NO_LISTENER_QUALIFIES.into())
            } else {
                RelayError::NotFound(format!(
                    "Endpoint does not exist. No listener is connected for hybrid connection '{hc_name}'."
                ))
            });
        };
        if tried.len() >= 3 {
            return Err(RelayError::ListenerGone);
        }
        tried.add(&target);
        let rv = address::new_connection_id(rand::random());
        // The sender's own id, else a fresh GUID (never a piece of the capability).
        let conn_id = query
            .id
            .clone()
            .unwrap_or_else(|| address::new_connection_id(rand::random()));
        let mut address = format!(
            "wss://{}/$hc/{}{}?",
            target.rendezvous_host(shared),
            hc_name,
            suffix
        );
        if !query.app_query.is_empty() {
            address.push_str(&query.app_query);
            address.push('&');
        }
        address.push_str(&format!(
            "sb-hc-action=accept&sb-hc-id={}&sb-hc-rv={rv}",
            form_urlencoded::byte_serialize(conn_id.as_bytes()).collect::<String>()
        ));
        let cmd = ListenerCommand::Accept(AcceptCommand {
            address,
            id: conn_id.clone(),
            connect_headers: headers.clone(),
            remote_endpoint: Some(RemoteEndpoint {
                address: peer.ip().to_string(),
                port: peer.port(),
            }),
        });
        let limits = &shared.cfg.limits;
        let (_guard, rx) = shared
            .rendezvous
            .insert(
                rv,
                hc_key.clone(),
                limits.max_pending,
                limits.max_pending_per_hc,
            )
            .map_err(|b| {
                RelayError::Unavailable(match b {
                    Busy::Relay => "Too many connections are waiting for listeners.",
                    Busy::HybridConnection => {
                        "Too many connections are waiting for this hybrid connection's listeners."
                    }
                })
            })?;
        let (listener, listener_id) = match target {
            crate::select::Target::Local(listener) => {
                if listener
                    .tx
                    .try_send(ControlMsg::Command(cmd.to_json()))
                    .is_err()
                {
                    continue;
                }
                let id = listener.listener_id.clone();
                (Some(listener), id)
            }
            crate::select::Target::Remote(r) => {
                let Some(c) = &shared.cluster else { continue };
                if !c.deliver(&hc_key, &r, cmd.to_json()).await {
                    info!(hc = %hc_name, node = %r.node, listener_id = %r.listener_id, "listener's node did not take the accept; offering to another");
                    continue;
                }
                (None, r.listener_id)
            }
        };
        let closed = async {
            match &listener {
                Some(l) => l.tx.closed().await,
                // Another node's listener: its leaving shows as the deadline.
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, rx) => match r {
                Ok(Ok(o)) => break (listener_id, conn_id, o),
                Ok(Err(_)) => return Err(RelayError::Unavailable("The rendezvous was abandoned.")),
                Err(_) => {
                    return Err(RelayError::ListenerTimeout(
                        shared.cfg.limits.rendezvous_timeout.as_secs(),
                    ))
                }
            },
            _ = closed => {
                info!(hc = %hc_name, listener_id = %listener_id, "listener left before answering; offering to another");
            }
        }
    };
    match outcome {
        Outcome::Rejected { status, reason } => {
            info!(event = "ListenerRejectedConnection", hc = %hc_name, id = %conn_id, status, "listener rejected the sender");
            let status = if (400..=599).contains(&status) {
                status
            } else {
                502
            };
            Err(RelayError::ListenerRejected {
                status,
                reason: address::sanitize_reason(&reason),
            })
        }
        Outcome::Accepted { upgrade, protocol } => {
            let sender_upgrade = hyper::upgrade::on(&mut req);
            let shared2 = Arc::clone(shared);
            let span = tracing::info_span!("tunnel", hc = %hc_name, id = %conn_id, listener_id = %listener_id, peer = %peer);
            shared.tracker.spawn(
                async move {
                    let _tunnel_permit = tunnel_permit;
                    let (s, l) = tokio::join!(sender_upgrade, upgrade);
                    let (Ok(s), Ok(l)) = (s, l) else {
                        debug!("an upgrade did not complete");
                        return;
                    };
                    let (Ok(s), Ok(l)) = (s.downcast::<TokioIo<ServerTls>>(), l.downcast::<TokioIo<ServerTls>>()) else {
                        warn!("unexpected transport after upgrade");
                        return;
                    };
                    info!(event = "SenderListenerConnectionEstablished", setup_ms = started.elapsed().as_millis() as u64, "tunnel open");
                    let label = Hc::new(Some(&hc_key));
                    let m = &shared2.metrics;
                    m.sender_success.get_or_create(&label).inc();
                    // Held until the task ends, however it ends (as is the tunnel's listing).
                    let _open = crate::metrics::GaugeUnit::hold(&m.active_connections, &label);
                    m.connect_latency.get_or_create(&label).observe(started.elapsed().as_secs_f64());
                    let tunnel_id = shared2.registry.next_conn_id();
                    let tunnel = Arc::new(crate::Tunnel {
                        hc_key: hc_key.clone(),
                        id: conn_id.clone(),
                        peer,
                        since: SystemTime::now(),
                        counters: Counters::default(),
                    });
                    let _listed = crate::TunnelEntry::insert(&shared2, tunnel_id, Arc::clone(&tunnel));
                    let counters = &tunnel.counters;
                    let opened = Instant::now();
                    let a = Prefixed::new(s.io.into_inner(), s.read_buf);
                    let b = Prefixed::new(l.io.into_inner(), l.read_buf);
                    let end = tokio::select! {
                        end = splice(a, b, shared2.cfg.splice, counters) => end,
                        _ = shared2.drain.cancelled() => SpliceEnd::Aborted { side: hyco_io::splice::Side::A, error: std::io::Error::other("relay stopped") },
                    };
                    let (up, down) = (
                        counters.a_to_b.load(std::sync::atomic::Ordering::Relaxed),
                        counters.b_to_a.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    info!(
                        role = "tunnel",
                        bytes_sender_to_listener = up,
                        bytes_listener_to_sender = down,
                        duration_ms = opened.elapsed().as_millis() as u64,
                        sender_close_code = counters.a_close.load(std::sync::atomic::Ordering::Relaxed),
                        listener_close_code = counters.b_close.load(std::sync::atomic::Ordering::Relaxed),
                        end = ?end,
                        "tunnel closed"
                    );
                    m.sender_disconnects.get_or_create(&label).inc();
                    m.bytes_transferred.get_or_create(&label).inc_by(up + down);
                }
                .instrument(span),
            );
            Ok(switching_protocols(&accept_key, protocol.as_deref()))
        }
    }
}

/// Azure's answer (404) when listeners are connected but the sender's
/// `Microsoft-Relay-AllowedListeners` / `DisallowedListeners` rule out all of them.
pub(crate) const NO_LISTENER_QUALIFIES: &str =
    "None of the connected listeners meet the AllowedListeners/DisallowedListeners criteria.";

/// Whether the sender named listeners to allow or disallow and some listener is connected
/// (so the headers, not the absence of listeners, left nobody to pick).
pub(crate) async fn none_qualify(
    shared: &Shared,
    hc_key: &str,
    allowed: Option<&[String]>,
    disallowed: &[String],
) -> bool {
    (allowed.is_some() || !disallowed.is_empty())
        && crate::select::pick(shared, hc_key, None, &[], &Default::default())
            .await
            .is_some()
}

/// The rendezvous capability (`sb-hc-rv`) of an accept or request-rendezvous address.
pub(crate) fn rendezvous_capability(query: &HcQuery) -> Result<String, RelayError> {
    query
        .extra_sb
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("sb-hc-rv"))
        .map(|(_, v)| v.clone())
        .ok_or(RelayError::RendezvousInvalid)
}

fn accept(
    shared: &Arc<Shared>,
    segments: &[&str],
    query: &HcQuery,
    req: &mut Request<Incoming>,
    accept_key: &str,
) -> Result<Response<Body>, RelayError> {
    let rv = rendezvous_capability(query)?;
    let ns = shared.store.snapshot();
    let (hc_key, _, _) = resolve(&ns, segments).ok_or(RelayError::RendezvousInvalid)?;
    let (node_status, node_description) = listener_added_reject(req.uri().query().unwrap_or(""));
    let (status, description) = match &query.status_code {
        Some(s) => (Some(s.clone()), query.status_description.clone()),
        None => (
            node_status,
            node_description.or_else(|| query.status_description.clone()),
        ),
    };
    if let Some(status) = status {
        let reason = description.unwrap_or_else(|| "Rejected by the listener".to_owned());
        let status = status.trim().parse::<u16>().unwrap_or(502);
        shared
            .rendezvous
            .complete(&rv, &hc_key, Outcome::Rejected { status, reason })
            .map_err(|_| RelayError::RendezvousInvalid)?;
        let mut resp = Response::new(crate::error::empty());
        *resp.status_mut() = StatusCode::GONE;
        return Ok(resp);
    }
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    let upgrade = hyper::upgrade::on(req);
    shared
        .rendezvous
        .complete(
            &rv,
            &hc_key,
            Outcome::Accepted {
                upgrade,
                protocol: protocol.clone(),
            },
        )
        .map_err(|_| RelayError::RendezvousInvalid)?;
    Ok(switching_protocols(accept_key, protocol.as_deref()))
}

/// Node's un-prefixed `statusCode` / `statusDescription` reject (its listener appends them to
/// the accept address), taken only where the listener put them: after the relay's own
/// `sb-hc-*` pairs, which end the address the relay issued. Before those comes the sender's own
/// query, whose `statusCode` is the application's, not a reject. The last of each wins.
fn listener_added_reject(raw_query: &str) -> (Option<String>, Option<String>) {
    let (mut status, mut description) = (None, None);
    let mut past_relay_pairs = false;
    for pair in raw_query.split('&') {
        let Some((k, v)) = form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        let sb_hc = k.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("sb-hc-"));
        if sb_hc && pair.contains('=') {
            past_relay_pairs = true;
        } else if past_relay_pairs && k.eq_ignore_ascii_case("statusCode") {
            status = Some(v.into_owned());
        } else if past_relay_pairs && k.eq_ignore_ascii_case("statusDescription") {
            description = Some(v.into_owned());
        }
    }
    (status, description)
}

async fn entity_or_http(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let path = req.uri().path().to_owned();
    let segments = address::split_http_path(&path)
        .map_err(|e| RelayError::BadRequest(format!("Bad path: {e}")))?;
    let raw_query = req.uri().query().unwrap_or("");
    let is_entity_get = req.method() == http::Method::GET
        && form_urlencoded::parse(raw_query.as_bytes()).any(|(k, _)| k == "api-version");
    if !is_entity_get {
        return crate::http::handle(shared, peer, req, &segments).await;
    }
    // Refusals here get Azure's XML error body: .NET's management client reads its `Detail`.
    Ok(
        entity_get(shared, peer, &req, &segments, raw_query).unwrap_or_else(|e| {
            debug!(peer = %peer, path = %path_for_log(&path), error = %e, "entity read refused");
            e.into_xml_response()
        }),
    )
}

/// `GET /{hc}?api-version=…`: the entity description (§2.9).
fn entity_get(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: &Request<Incoming>,
    segments: &[&str],
    raw_query: &str,
) -> Result<Response<Body>, RelayError> {
    let ns = shared.store.snapshot();
    let resolved = resolve(&ns, segments).filter(|(_, _, rest)| rest.is_empty());
    let name = resolved
        .as_ref()
        .map(|(_, hc, _)| hc.name.clone())
        .unwrap_or_else(|| segments.join("/"));
    let host = host_of(req);
    let mut hosts = shared.cfg.hostnames.clone();
    hosts.push(strip_port(&host).to_ascii_lowercase());
    let query =
        HcQuery::parse(raw_query).map_err(|e| RelayError::BadRequest(format!("Bad query: {e}")))?;
    let token = crate::auth::find_token(query.token.as_deref(), req.headers(), true);
    // Any of Listen, Send, Manage may read the description (the manager has Listen only).
    crate::auth::guarded(&shared.auth_throttle, peer.ip(), || {
        let token = token?;
        let entity = Some((name.as_str(), resolved.as_ref().map(|r| r.1)));
        crate::auth::authorize(&ns, &hosts, entity, token, Need::Listen, unix_now(), 0).or_else(
            |_| crate::auth::authorize(&ns, &hosts, entity, token, Need::Send, unix_now(), 0),
        )
    })?;
    let Some((key, hc, _)) = resolved else {
        return Err(RelayError::NotFound(format!(
            "Endpoint does not exist. No hybrid connection '{name}'."
        )));
    };
    let desc = hyco_proto::entity::EntityDescription {
        name: hc.name.clone(),
        created_at: hc.created_at.clone(),
        updated_at: hc.updated_at.clone(),
        requires_client_authorization: hc.requires_client_authorization,
        user_metadata: hc.user_metadata.clone(),
        listener_count: shared.registry.count(&key) as u32,
    };
    let id_url = format!("https://{}/{}?api-version=2016-07", host, hc.name);
    let xml = hyco_proto::entity::render_entity_atom(&id_url, &desc);
    let mut resp = Response::new(crate::error::full(xml));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/atom+xml;type=entry;charset=utf-8"),
    );
    Ok(resp)
}

/// Locks a std mutex, recovering from poisoning (the data stays consistent: every critical
/// section here is a single insert or remove).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream with bytes that hyper read past the handshake put back in front.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`, reading `prefix` first. The prefix is copied out: it is a slice of
    /// hyper's 8 KiB read buffer, which would otherwise stay allocated for the tunnel's life.
    pub fn new(inner: S, prefix: bytes::Bytes) -> Self {
        Prefixed {
            prefix: bytes::Bytes::copy_from_slice(&prefix),
            inner,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                self.prefix = bytes::Bytes::new();
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
