//! `sb-hc-action=listen`: a listener opens its control channel (protocol.md §2.2). It is
//! registered before the 101 goes out; the channel's task owns the registration.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response};
use hyco_io::ws::handshake::switching_protocols;
use hyco_proto::address;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::control::ControlChannel;
use crate::error::{Body, RelayError};
use crate::registry::ListenerEntry;
use crate::{ServerIo, Shared};

/// An authorized listen (or standby socket: [`crate::standby`]).
pub(crate) struct Route {
    /// `Sec-WebSocket-Accept` for the 101.
    pub(crate) accept_key: String,
    /// Registry key of the hybrid connection.
    pub(crate) hc_key: String,
    /// Its name as created.
    pub(crate) hc_name: String,
    /// The Host the request came in with (rendezvous addresses name it).
    pub(crate) host: String,
    /// The listener's `sb-hc-id`, when it chose one.
    pub(crate) listener_id: Option<String>,
    /// Expiry of the token that authorized it…
    pub(crate) expiry: u64,
    /// …and the token, kept to re-check when keys change. Never logged.
    pub(crate) token: String,
}

/// Registers the listener and hands its upgraded socket to a control channel task.
pub(crate) fn listen(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    route: Route,
) -> Result<Response<Body>, RelayError> {
    let (tx, rx) = mpsc::channel(64);
    let listener_id = route
        .listener_id
        .unwrap_or_else(|| address::new_connection_id(rand::random()));
    let entry = Arc::new(ListenerEntry {
        conn_id: shared.registry.next_conn_id(),
        listener_id: listener_id.clone(),
        remote: peer,
        since: SystemTime::now(),
        host: route.host,
        tx,
        last_seen: AtomicU64::new(crate::unix_now()),
    });
    let registration = shared
        .registry
        .add(&route.hc_key, Arc::clone(&entry), shared.cfg.limits.max_listeners_per_hc)
        .map_err(|_| {
            RelayError::Forbidden("MaximumListenersPerEndpoint: this hybrid connection has the maximum number of listeners.")
        })?;
    info!(event = "NewListenerRegistered", hc = %route.hc_name, listener_id = %listener_id, peer = %peer, "listener connected");
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The channel owns the registration: whatever ends its task (the upgrade failing, a close,
    // cancellation, a panic) drops it, and the listener is gone from the registry.
    let channel = ControlChannel {
        shared: Arc::clone(shared),
        hc_key: route.hc_key,
        hc_name: route.hc_name,
        entry,
        registration,
        expiry: route.expiry,
        token: route.token,
        rx,
    };
    shared.tracker.spawn(async move {
        match on_upgrade.await.map(|u| u.downcast::<TokioIo<ServerIo>>()) {
            Ok(Ok(parts)) => channel.run(parts.io.into_inner(), &parts.read_buf).await,
            _ => debug!("listener upgrade did not complete"),
        }
    });
    Ok(crate::advertise(
        shared,
        switching_protocols(&route.accept_key, None),
    ))
}
