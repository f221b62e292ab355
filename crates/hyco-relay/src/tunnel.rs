//! A tunnel from both sides' connections to the end of its splice: listed, counted and
//! gauged until it ends, however it ends. Its listener side is a rendezvous
//! ([`crate::connect`]) or a parked socket ([`crate::standby`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use hyco_io::splice::{splice_keep, Counters, Kept, Side, SpliceEnd};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{GaugeUnit, Hc};
use crate::{ServerIo, Shared, Tunnel, TunnelEntry};

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
    /// The sender asked for its connection to outlive the tunnel (`reuse`, offered here).
    pub(crate) reuse: bool,
}

/// Whether an upgrade request asks for its connection to outlive its tunnel: it names
/// `reuse` in `Hyco-Extensions`, and this relay offers it.
pub(crate) fn asks_reuse(shared: &Shared, headers: &http::HeaderMap) -> bool {
    shared.cfg.extensions.reuse
        && headers
            .get_all(hyco_proto::ext::HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| hyco_proto::ext::Extensions::names(v, hyco_proto::ext::REUSE))
}

/// The listener's side of a tunnel.
pub(crate) enum ListenerSide {
    /// A rendezvous: its connection once its 101 is written.
    Upgrade(OnUpgrade),
    /// A standby socket, open already (nothing of the listener's was read from it).
    Parked(Box<ServerIo>),
}

impl ListenerSide {
    /// The listener's connection and the bytes read past its handshake.
    async fn open(self) -> Option<ServerIo> {
        match self {
            ListenerSide::Upgrade(u) => {
                let parts = u.await.ok()?.downcast::<TokioIo<ServerIo>>().ok()?;
                Some(parts.io.into_inner().unread(&parts.read_buf))
            }
            ListenerSide::Parked(io) => Some(*io),
        }
    }
}

/// The tunnel, from both upgrades to the end of the splice; listed, counted and gauged until
/// it ends, however it ends.
///
/// With `reuse` (docs/design-notes.md, "Connections that outlive their tunnel"), a tunnel that
/// both peers closed with 1000 leaves their connections open: the sender's, if it asked, is
/// served again as a new HTTP/1.1 connection; the listener's, if `listener_reuse` (a standby
/// socket that asked), is returned for its task to park again.
pub(crate) async fn run_tunnel(
    shared: &Arc<Shared>,
    start: TunnelStart,
    sender: OnUpgrade,
    listener: ListenerSide,
    listener_reuse: bool,
) -> Option<Box<ServerIo>> {
    let started = start.started;
    let (s, l) = tokio::join!(sender, listener.open());
    let (Ok(s), Some(l_io)) = (s, l) else {
        debug!("an upgrade did not complete");
        return None;
    };
    let Ok(s) = s.downcast::<TokioIo<ServerIo>>() else {
        warn!("unexpected transport after upgrade");
        return None;
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
    let a = s.io.into_inner().unread(&s.read_buf);
    drop(s.read_buf);
    let (end, kept) = tokio::select! {
        r = splice_keep(a, l_io, shared.cfg.splice, counters) => r,
        _ = shared.drain.cancelled() => (SpliceEnd::Aborted { side: Side::A, error: std::io::Error::other("relay stopped") }, None),
    };
    // Both peers closed normally: what each asked for is what both expect (the agents apply
    // the same rule), so a kept connection is never one its agent dropped, nor the reverse.
    let normal = |c: &std::sync::atomic::AtomicU32| c.load(Ordering::Relaxed) == 1000;
    let reusable =
        normal(&counters.a_close) && normal(&counters.b_close) && !shared.shutdown.is_cancelled();
    let listener_back = match kept {
        Some(k) => {
            let keep = (reusable && start.reuse, reusable && listener_reuse);
            settle(shared, k, keep, start.peer).await
        }
        None => None,
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
    listener_back
}

/// Both connections of a tunnel that closed normally: each one kept (`keep`: sender, listener)
/// goes on (the sender's served again, the listener's returned for parking), the others end as
/// a splice ends them (close_notify and FIN, bounded).
async fn settle(
    shared: &Arc<Shared>,
    kept: Box<Kept<ServerIo, ServerIo>>,
    (keep_sender, keep_listener): (bool, bool),
    peer: SocketAddr,
) -> Option<Box<ServerIo>> {
    let Kept {
        a,
        a_rest,
        b,
        b_rest,
    } = *kept;
    let (mut sender_io, mut listener_io) = (a.unread(&a_rest), b.unread(&b_rest));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        if !keep_sender {
            let _ = sender_io.shutdown().await;
        }
        if !keep_listener {
            let _ = listener_io.shutdown().await;
        }
    })
    .await;
    if keep_sender {
        crate::serve_again(shared, sender_io, peer);
    }
    keep_listener.then(|| Box::new(listener_io))
}
