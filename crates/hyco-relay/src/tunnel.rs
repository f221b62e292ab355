//! A tunnel from both sides' connections to the end of its splice: listed, counted and
//! gauged until it ends, however it ends. Its listener side is a rendezvous
//! ([`crate::connect`]) or a parked socket ([`crate::standby`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use hyco_io::prefixed::Prefixed;
use hyco_io::splice::{splice, Counters, Side, SpliceEnd};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{GaugeUnit, Hc};
use crate::{ServerTls, Shared, Tunnel, TunnelEntry};

/// A sender on its way to a tunnel: its side of the upgrade, what the tunnel is known by, and
/// its permit.
pub(crate) struct Joining {
    /// The sender's connection once its 101 is written.
    pub(crate) sender: OnUpgrade,
    /// What the tunnel is known by.
    pub(crate) start: TunnelStart,
    /// Its tunnel permit, held until the splice ends (`None` when a parked socket's permit
    /// is the tunnel's).
    pub(crate) permit: Option<hyco_io::tunnels::TunnelPermit>,
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
