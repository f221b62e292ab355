//! `sb-hc-action=connect`: a sender. It is offered to a listener as an `accept` command with a
//! rendezvous address; when the listener opens it, the two sockets are spliced (protocol.md
//! §2.3, §4.2).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response};
use hyco_io::prefixed::Prefixed;
use hyco_io::splice::{splice, Counters, Side, SpliceEnd};
use hyco_io::ws::handshake::switching_protocols;
use hyco_proto::address::{self, HcQuery};
use hyco_proto::control::{AcceptCommand, ListenerCommand, RemoteEndpoint};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::dispatch::{NotOffered, Offers, NO_LISTENER_QUALIFIES};
use crate::error::{Body, RelayError};
use crate::metrics::{GaugeUnit, Hc};
use crate::registry::{ControlMsg, ListenerEntry};
use crate::rendezvous::{Busy, Outcome, PendingGuard};
use crate::request::forwarded_headers;
use crate::select::Target;
use crate::standby;
use crate::{ServerTls, Shared, Tunnel, TunnelEntry};

/// Where an authorized connect goes.
pub(crate) struct Route {
    /// `Sec-WebSocket-Accept` for the 101.
    pub(crate) accept_key: String,
    /// Registry key of the hybrid connection.
    pub(crate) hc_key: String,
    /// Its name as created.
    pub(crate) hc_name: String,
    /// Path after the entity name (senders' arguments).
    pub(crate) suffix: String,
    /// The `sb-hc-*` parameters and the application's query.
    pub(crate) query: HcQuery,
    /// Whether `Authorization` carried the token the relay checked.
    pub(crate) authorization_used: bool,
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

/// Joins the sender to a socket its listener parked when one is (standby extension), else
/// offers it to listeners until one answers; then splices the two in a task.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    route: Route,
) -> Result<Response<Body>, RelayError> {
    // Refused while descriptors remain to say so (issue 15 §5); held until the splice ends.
    let Some(tunnel_permit) = shared.tunnel_gate.try_acquire() else {
        return Err(RelayError::Unavailable(
            "ServerBusy: the relay is at its tunnel limit (--max-tunnels); retry later.",
        ));
    };
    let started = Instant::now();
    let mut headers = connect_headers(req.headers(), route.authorization_used);
    hyco_io::header_case::Spelling::of(&req)
        .await
        .apply(&mut headers);
    // The sender's own id, else a fresh GUID (never a piece of a capability).
    let conn_id = route
        .query
        .id
        .clone()
        .unwrap_or_else(|| address::new_connection_id(rand::random()));
    let offers = Offers::new(shared, &route.hc_key, req.headers());
    let tunnel = Joining {
        sender: hyper::upgrade::on(&mut req),
        start: TunnelStart {
            hc_key: route.hc_key.clone(),
            id: conn_id.clone(),
            peer,
            started,
        },
        permit: tunnel_permit,
    };
    // A sender that asks for a sub-protocol gets the listener's answer to it: a rendezvous.
    let tunnel = if req
        .headers()
        .contains_key(http::header::SEC_WEBSOCKET_PROTOCOL)
    {
        tunnel
    } else {
        let accept_for = |l: &ListenerEntry| {
            accept_command(&l.host, peer, &route, &headers, &conn_id, None).to_json()
        };
        match standby::join(
            shared,
            &route.hc_key,
            offers.local_listeners(),
            tunnel,
            accept_for,
        ) {
            Ok(listener_id) => {
                debug!(hc = %route.hc_name, id = %conn_id, listener_id = %listener_id, "sender joined to a standby socket");
                return Ok(crate::advertise(
                    shared,
                    switching_protocols(&route.accept_key, None),
                ));
            }
            Err(tunnel) => tunnel,
        }
    };
    let (listener_id, outcome) =
        rendezvous(shared, peer, offers, &route, &headers, &conn_id).await?;
    let hc_name = &route.hc_name;
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
            let span = tracing::info_span!("tunnel", hc = %hc_name, id = %conn_id, listener_id = %listener_id, peer = %peer);
            let shared2 = Arc::clone(shared);
            shared.tracker.spawn(
                async move {
                    let Joining {
                        sender,
                        start,
                        permit,
                    } = tunnel;
                    let _tunnel_permit = permit;
                    run_tunnel(&shared2, start, sender, ListenerSide::Upgrade(upgrade)).await;
                }
                .instrument(span),
            );
            Ok(crate::advertise(
                shared,
                switching_protocols(&route.accept_key, protocol.as_deref()),
            ))
        }
    }
}

/// A sender on its way to a tunnel: its side of the upgrade, what the tunnel is known by, and
/// its permit.
pub(crate) struct Joining {
    /// The sender's connection once its 101 is written.
    pub(crate) sender: OnUpgrade,
    /// What the tunnel is known by.
    pub(crate) start: TunnelStart,
    /// Its tunnel permit, held until the splice ends.
    pub(crate) permit: hyco_io::tunnels::TunnelPermit,
}

/// Offers the sender until a listener answers (accepts or rejects) or none is left. A listener
/// that leaves before answering gets the offer passed to another one ([`crate::dispatch`]).
async fn rendezvous(
    shared: &Shared,
    peer: SocketAddr,
    mut offers: Offers<'_>,
    route: &Route,
    headers: &[(String, String)],
    conn_id: &str,
) -> Result<(String, Outcome), RelayError> {
    let deadline = Instant::now() + shared.cfg.limits.rendezvous_timeout;
    loop {
        let build = |_: &mut (), target: &Target| {
            waiting_accept(shared, peer, route, headers, conn_id, target)
        };
        let (taken, waiting) =
            offers
                .offer(&mut (), build, |_, _| ())
                .await
                .map_err(|e| match e {
                    NotOffered::NoneLeft { tried: true } | NotOffered::Exhausted => {
                        RelayError::ListenerGone
                    }
                    NotOffered::NoneQualifies => RelayError::NotFound(NO_LISTENER_QUALIFIES.into()),
                    NotOffered::NoneLeft { tried: false } => RelayError::NotFound(format!(
                    "Endpoint does not exist. No listener is connected for hybrid connection '{}'.",
                    route.hc_name
                )),
                    NotOffered::Refused(e) => e,
                })?;
        tokio::select! {
            r = tokio::time::timeout_at(deadline, waiting.rx) => return match r {
                Ok(Ok(o)) => Ok((taken.listener_id, o)),
                Ok(Err(_)) => Err(RelayError::Unavailable("The rendezvous was abandoned.")),
                Err(_) => Err(RelayError::ListenerTimeout(
                    shared.cfg.limits.rendezvous_timeout.as_secs(),
                )),
            },
            _ = taken.closed() => {
                info!(hc = %route.hc_name, listener_id = %taken.listener_id, "listener left before answering; offering to another");
            }
        }
    }
}

/// A sender waiting for the listener it was offered to.
struct Waiting {
    /// Its place among the pending rendezvous, held until the wait ends.
    _pending: PendingGuard,
    /// Where the listener's answer comes.
    rx: tokio::sync::oneshot::Receiver<Outcome>,
}

/// The `accept` command for a sender: `rv` is the rendezvous capability when the listener
/// is to dial back (a standby socket is already there: its address has none).
fn accept_command(
    rendezvous_host: &str,
    peer: SocketAddr,
    route: &Route,
    headers: &[(String, String)],
    conn_id: &str,
    rv: Option<&str>,
) -> ListenerCommand {
    let mut address = format!(
        "wss://{rendezvous_host}/$hc/{}{}?",
        route.hc_name, route.suffix
    );
    if !route.query.app_query.is_empty() {
        address.push_str(&route.query.app_query);
        address.push('&');
    }
    address.push_str(&format!(
        "sb-hc-action=accept&sb-hc-id={}",
        form_urlencoded::byte_serialize(conn_id.as_bytes()).collect::<String>()
    ));
    if let Some(rv) = rv {
        address.push_str(&format!("&sb-hc-rv={rv}"));
    }
    ListenerCommand::Accept(AcceptCommand {
        address,
        id: conn_id.to_owned(),
        connect_headers: headers.to_vec(),
        remote_endpoint: Some(RemoteEndpoint {
            address: peer.ip().to_string(),
            port: peer.port(),
        }),
    })
}

/// The `accept` command for one listener, with its rendezvous waiting under a fresh
/// capability: the wait's place (held until it ends) and where the listener's answer comes.
fn waiting_accept(
    shared: &Shared,
    peer: SocketAddr,
    route: &Route,
    headers: &[(String, String)],
    conn_id: &str,
    target: &Target,
) -> Result<(ControlMsg, Waiting), RelayError> {
    let rv = address::new_connection_id(rand::random());
    let cmd = accept_command(
        &target.rendezvous_host(shared),
        peer,
        route,
        headers,
        conn_id,
        Some(&rv),
    );
    let limits = &shared.cfg.limits;
    let (pending, rx) = shared
        .rendezvous
        .insert(
            rv,
            route.hc_key.clone(),
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
    let waiting = Waiting {
        _pending: pending,
        rx,
    };
    Ok((ControlMsg::Command(cmd.to_json()), waiting))
}

/// What a tunnel is known by before it opens.
pub(crate) struct TunnelStart {
    pub(crate) hc_key: String,
    pub(crate) id: String,
    pub(crate) peer: SocketAddr,
    /// When its sender's request came in.
    pub(crate) started: Instant,
}

/// The listener's side of a tunnel.
pub(crate) enum ListenerSide {
    /// A rendezvous: its connection once its 101 is written.
    Upgrade(OnUpgrade),
    /// A standby socket, open already (nothing of the listener's was read from it).
    Parked(Box<ServerTls>),
}

impl ListenerSide {
    /// The listener's connection and the bytes read past its handshake.
    async fn open(self) -> Option<(ServerTls, bytes::Bytes)> {
        match self {
            ListenerSide::Upgrade(u) => {
                let parts = u.await.ok()?.downcast::<TokioIo<ServerTls>>().ok()?;
                Some((parts.io.into_inner(), parts.read_buf))
            }
            ListenerSide::Parked(io) => Some((*io, bytes::Bytes::new())),
        }
    }
}

/// The tunnel, from both upgrades to the end of the splice; listed, counted and gauged until
/// it ends, however it ends.
pub(crate) async fn run_tunnel(
    shared: &Arc<Shared>,
    start: TunnelStart,
    sender: OnUpgrade,
    listener: ListenerSide,
) {
    let started = start.started;
    let (s, l) = tokio::join!(sender, listener.open());
    let (Ok(s), Some((l_io, l_buf))) = (s, l) else {
        debug!("an upgrade did not complete");
        return;
    };
    let Ok(s) = s.downcast::<TokioIo<ServerTls>>() else {
        warn!("unexpected transport after upgrade");
        return;
    };
    info!(
        event = "SenderListenerConnectionEstablished",
        setup_ms = started.elapsed().as_millis() as u64,
        "tunnel open"
    );
    let label = Hc::new(Some(&start.hc_key));
    let m = &shared.metrics;
    m.sender_success.get_or_create(&label).inc();
    // Held until the task ends, however it ends (as is the tunnel's listing).
    let _open = GaugeUnit::hold(&m.active_connections, &label);
    m.connect_latency
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    let tunnel = Arc::new(Tunnel {
        hc_key: start.hc_key,
        id: start.id,
        peer: start.peer,
        since: SystemTime::now(),
        counters: Counters::default(),
    });
    let _listed = TunnelEntry::insert(shared, shared.registry.next_conn_id(), Arc::clone(&tunnel));
    let counters = &tunnel.counters;
    let opened = Instant::now();
    let a = Prefixed::new(s.io.into_inner(), s.read_buf);
    let b = Prefixed::new(l_io, l_buf);
    let end = tokio::select! {
        end = splice(a, b, shared.cfg.splice, counters) => end,
        _ = shared.drain.cancelled() => SpliceEnd::Aborted { side: Side::A, error: std::io::Error::other("relay stopped") },
    };
    let (up, down) = (
        counters.a_to_b.load(Ordering::Relaxed),
        counters.b_to_a.load(Ordering::Relaxed),
    );
    info!(
        role = "tunnel",
        bytes_sender_to_listener = up,
        bytes_listener_to_sender = down,
        duration_ms = opened.elapsed().as_millis() as u64,
        sender_close_code = counters.a_close.load(Ordering::Relaxed),
        listener_close_code = counters.b_close.load(Ordering::Relaxed),
        end = ?end,
        "tunnel closed"
    );
    m.sender_disconnects.get_or_create(&label).inc();
    m.bytes_transferred.get_or_create(&label).inc_by(up + down);
}
