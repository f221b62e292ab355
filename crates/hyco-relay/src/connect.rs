//! `sb-hc-action=connect`: a sender. It is offered to a listener as an `accept` command with a
//! rendezvous address; when the listener opens it, the two sockets are spliced (protocol.md
//! §2.3, §4.2).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyco_io::ws::handshake::switching_protocols;
use hyco_proto::address::{self, HcQuery};
use hyco_proto::control::{AcceptCommand, ListenerCommand, RemoteEndpoint};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

use crate::dispatch::{NotOffered, Offers, NO_LISTENER_QUALIFIES};
use crate::error::{Body, RelayError};
use crate::registry::{ControlMsg, ListenerEntry};
use crate::rendezvous::{Busy, Outcome, PendingGuard};
use crate::request::forwarded_headers;
use crate::select::Target;
use crate::standby;
use crate::tunnel::{run_tunnel, Joining, ListenerSide, TunnelStart};
use crate::Shared;

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
                    | "hyco-extensions"
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
    // A parked socket holds a tunnel permit already, which its tunnel keeps; any other tunnel
    // takes one here, refused while descriptors remain to say so (issue 15 §5).
    let standby = joins_parked_sockets(req.headers()) && shared.cfg.extensions.standby.is_some();
    let tunnel_permit = if standby { None } else { Some(permit(shared)?) };
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
            reuse: crate::tunnel::asks_reuse(shared, req.headers()),
        },
        permit: tunnel_permit,
    };
    let mut tunnel = if !standby {
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
    if tunnel.permit.is_none() {
        tunnel.permit = Some(permit(shared)?);
    }
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
            spawn_tunnel(shared, tunnel, upgrade, span);
            Ok(crate::advertise(
                shared,
                switching_protocols(&route.accept_key, protocol.as_deref()),
            ))
        }
    }
}

/// The tunnel of a sender and a listener's rendezvous, in a task of its own; it holds the
/// sender's permit until it ends.
fn spawn_tunnel(
    shared: &Arc<Shared>,
    tunnel: Joining,
    upgrade: hyper::upgrade::OnUpgrade,
    span: tracing::Span,
) {
    let shared2 = Arc::clone(shared);
    shared.tracker.spawn(
        async move {
            let Joining {
                sender,
                start,
                permit,
            } = tunnel;
            let _tunnel_permit = permit;
            let listener = ListenerSide::Upgrade(upgrade);
            // A rendezvous socket is not parked again: `false`.
            run_tunnel(&shared2, start, sender, listener, false).await;
        }
        .instrument(span),
    );
}

/// A tunnel permit, or the sender's 503 at the tunnel limit. At the limit a socket parked
/// ahead of need (standby, any listener) gives its permit up first.
fn permit(shared: &Shared) -> Result<hyco_io::tunnels::TunnelPermit, RelayError> {
    shared
        .tunnel_gate
        .try_acquire_or(|| shared.standby.reclaim())
        .ok_or(RelayError::Unavailable(
            "ServerBusy: the relay is at its tunnel limit (--max-tunnels); retry later.",
        ))
}

/// Whether a sender may be joined to a parked socket: it said so (`Hyco-Extensions:
/// standby`: a hyco agent, which takes a listener's refusal as a Close after its 101), and it
/// asks for no sub-protocol (only a listener's rendezvous can answer that). Microsoft's
/// senders say nothing, and keep the protocol's rendezvous and its refusals by status.
fn joins_parked_sockets(headers: &http::HeaderMap) -> bool {
    !headers.contains_key(http::header::SEC_WEBSOCKET_PROTOCOL)
        && headers
            .get_all(hyco_proto::ext::HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| hyco_proto::ext::Extensions::names(v, hyco_proto::ext::STANDBY))
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
