//! Standby rendezvous, a hyco extension (docs/design-notes.md, "Connect in one round trip").
//!
//! A listener whose control channel saw `standby` in `Hyco-Extensions` parks upgraded sockets
//! here (`sb-hc-action=standby`, its Listen token, its own `sb-hc-id`). A sender is then joined
//! to one at once: the relay writes the `accept` command on the parked socket, answers the
//! sender's 101 without waiting for a rendezvous, and splices the two. Microsoft's listeners
//! never park a socket, so for them nothing changes.
//!
//! A parked socket is bound to the control channel of its listener (gone with it), to its
//! hybrid connection and to its Listen token: the token's expiry, a key regeneration or the
//! hybrid connection's deletion retire it, and so does its time to live. It holds a tunnel
//! permit (one descriptor) while parked and counts against its listener's cap; at the tunnel
//! limit it yields that permit to a sender that found no socket of its own listener parked
//! ([`Pools::reclaim`]): a socket held ahead of need never costs a real tunnel its place.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyco_io::tunnels::TunnelPermit;
use hyco_io::ws::frame::{close_payload, server_frame, OpCode};
use hyco_io::ws::handshake::switching_protocols;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info};

use crate::error::{Body, RelayError};
use crate::listen::Route;
use crate::metrics::{GaugeUnit, Hc};
use crate::registry::ListenerEntry;
use crate::tunnel::{run_tunnel, Joining, ListenerSide};
use crate::{ServerIo, Shared};

/// What a parked socket gets when a sender is joined to it.
pub(crate) struct Pair {
    /// The `accept` command, written on the socket before anything of the sender's.
    accept: String,
    /// The sender.
    sender: Joining,
    /// The permit the socket held while parked, now its tunnel's.
    permit: TunnelPermit,
}

/// One parked socket in its listener's pool: its id, the way to hand it a sender, and the
/// tunnel permit it holds (kept here, so that it can be handed to a sender at the limit
/// without waiting for the socket's task).
struct Entry {
    id: u64,
    tx: oneshot::Sender<Pair>,
    permit: TunnelPermit,
}

/// A listener's parked sockets, oldest first.
type Parked = VecDeque<Entry>;

/// The parked sockets of every listener of this node, by the listener's relay-internal id.
#[derive(Default)]
pub(crate) struct Pools {
    by_listener: Mutex<HashMap<u64, Parked>>,
    next_id: AtomicU64,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Parked>> {
        self.by_listener.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sockets the listener `conn_id` has parked now.
    pub(crate) fn len(&self, listener: u64) -> usize {
        self.lock().get(&listener).map_or(0, VecDeque::len)
    }

    /// The oldest socket the listener has parked, out of the pool.
    fn take(&self, listener: u64) -> Option<Entry> {
        let mut g = self.lock();
        let list = g.get_mut(&listener)?;
        let entry = list.pop_front();
        if list.is_empty() {
            g.remove(&listener);
        }
        entry
    }

    /// At the tunnel limit: the permit of the oldest socket of the listener with the most
    /// parked, which leaves the pool and is closed by its task (1001, [`YIELDED`]). `None`
    /// when nothing is parked.
    pub(crate) fn reclaim(&self) -> Option<TunnelPermit> {
        let mut g = self.lock();
        let (&listener, _) = g.iter().max_by_key(|(_, list)| list.len())?;
        let entry = g.get_mut(&listener)?.pop_front();
        if g.get(&listener).is_some_and(VecDeque::is_empty) {
            g.remove(&listener);
        }
        // Dropping `tx` tells the socket's task it was given up.
        entry.map(|e| e.permit)
    }

    /// Parks under `listener` unless it has `max` already; the place is given back when the
    /// returned guard is dropped.
    fn push(
        self: &Arc<Self>,
        listener: u64,
        tx: oneshot::Sender<Pair>,
        permit: TunnelPermit,
        max: usize,
    ) -> Option<Place> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        let list = g.entry(listener).or_default();
        if list.len() >= max {
            return None;
        }
        list.push_back(Entry { id, tx, permit });
        Some(Place {
            pools: Arc::clone(self),
            listener,
            id,
        })
    }
}

/// A parked socket's place in its listener's pool, given back when dropped.
struct Place {
    pools: Arc<Pools>,
    listener: u64,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut g = self.pools.lock();
        if let Some(list) = g.get_mut(&self.listener) {
            list.retain(|e| e.id != self.id);
            if list.is_empty() {
                g.remove(&self.listener);
            }
        }
    }
}

/// Parks a listener's socket: 101, then it waits in its listener's pool for a sender.
pub(crate) fn open(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    route: Route,
) -> Result<Response<Body>, RelayError> {
    let Some(params) = shared.cfg.extensions.standby else {
        return Err(RelayError::BadRequest(
            "This relay does not offer standby sockets (its extensions are off).".into(),
        ));
    };
    let Some(listener_id) = route.listener_id.as_deref() else {
        return Err(RelayError::BadRequest(
            "A standby socket names its listener in sb-hc-id.".into(),
        ));
    };
    let Some(entry) = shared
        .registry
        .list(&route.hc_key)
        .into_iter()
        .find(|e| e.listener_id.eq_ignore_ascii_case(listener_id))
    else {
        return Err(RelayError::NotFound(format!(
            "Listener '{}' has no control channel on this relay node.",
            hyco_proto::address::sanitize_reason(listener_id)
        )));
    };
    let max = usize::try_from(params.max).unwrap_or(usize::MAX);
    if shared.standby.len(entry.conn_id) >= max {
        return Err(RelayError::TooMany(
            "This listener has the most standby sockets the relay keeps (standby;max).",
        ));
    }
    // Parked sockets take no more than nine tenths of the tunnel limit: the rest is for
    // senders, so parking never makes a sender wait for a permit a parked socket holds.
    if !shared.tunnel_gate.has_spare() {
        return Err(RelayError::TooMany(NEAR_LIMIT));
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let resp = crate::advertise(shared, switching_protocols(&route.accept_key, None));
    let socket = Socket {
        shared: Arc::clone(shared),
        entry,
        reuse: crate::tunnel::asks_reuse(shared, req.headers()),
        route,
        ttl: Duration::from_secs(u64::from(params.ttl_secs)),
        max,
    };
    shared.tracker.spawn(async move {
        match on_upgrade.await.map(|u| u.downcast::<TokioIo<ServerIo>>()) {
            Ok(Ok(parts)) if parts.read_buf.is_empty() && parts.io.inner().unread_len() == 0 => {
                // The empty `read_buf` is a slice of hyper's read buffer: dropped here, not
                // kept (with that buffer) for the socket's and its tunnel's whole life.
                let io = Box::new(parts.io.into_inner());
                drop(parts.read_buf);
                socket.run(io).await;
            }
            Ok(Ok(parts)) => {
                let mut io = parts.io.into_inner();
                close(&mut io, 1008, SILENT).await;
            }
            _ => debug!(peer = %peer, "standby upgrade did not complete"),
        }
    });
    Ok(resp)
}

/// Why no socket is parked near the tunnel limit.
const NEAR_LIMIT: &str =
    "The relay is near its tunnel limit (--max-tunnels) and parks no more sockets now.";

/// Why a parked socket is closed when a sender of another listener needed its permit.
const YIELDED: &str =
    "The relay is at its tunnel limit and gave this standby socket's place to a sender.";

/// Why a parked socket is closed when its listener sends anything before it is paired.
const SILENT: &str = "A standby socket stays silent until a sender is joined to it.";

/// One parked socket and what binds it.
struct Socket {
    shared: Arc<Shared>,
    entry: Arc<ListenerEntry>,
    route: Route,
    ttl: Duration,
    max: usize,
    /// The listener asked for the socket to be parked again after a tunnel that both peers
    /// closed normally (`reuse`, offered here).
    reuse: bool,
}

/// How a parked socket's wait ended.
enum Retired {
    /// With a Close of this code and reason.
    Close(u16, &'static str),
    /// The listener closed or reset it, or wrote to it.
    ByListener(Option<&'static str>),
}

impl Socket {
    /// Parks the socket and serves the tunnel of the sender joined to it; with `reuse`, again
    /// after every tunnel that gave the socket back.
    async fn run(self, io: Box<ServerIo>) {
        let mut next = self.park(io).await;
        while let Some((socket, mut io)) = next.take() {
            // Back from a tunnel: held to its rules as on the way in (its upgrade was checked
            // then): keys regenerated or the hybrid connection deleted meanwhile close it.
            if let Some(Retired::Close(code, reason)) = socket.revoked() {
                close(&mut io, code, reason).await;
                return;
            }
            next = socket.park(io).await;
        }
    }

    /// Waits in the pool until a sender is joined (then runs the tunnel) or something retires
    /// the socket. Returns the socket to park again, when its tunnel gave it back.
    async fn park(self, mut io: Box<ServerIo>) -> Option<(Socket, Box<ServerIo>)> {
        // The descriptor it holds, counted against `--max-tunnels`, taken only once the socket
        // is in the pool (a sender that finds none parked is never short of a permit a socket
        // on its way holds); once a sender is joined, the permit of their tunnel (the sender
        // takes none of its own).
        let Some(permit) = self.shared.tunnel_gate.try_acquire_spare() else {
            close(&mut io, 1001, NEAR_LIMIT).await;
            return None;
        };
        let (tx, mut rx) = oneshot::channel();
        let Some(parked) = self
            .shared
            .standby
            .push(self.entry.conn_id, tx, permit, self.max)
        else {
            close(
                &mut io,
                1008,
                "This listener has the most standby sockets the relay keeps.",
            )
            .await;
            return None;
        };
        let label = Hc::new(Some(&self.route.hc_key));
        let gauge = GaugeUnit::hold(&self.shared.metrics.standby_sockets, &label);
        let waited = self.wait(&mut io, &mut rx).await;
        // Out of the pool first; a sender handed over meanwhile is still served.
        drop(parked);
        drop(gauge);
        let retired = match (waited, rx.try_recv()) {
            (Ok(pair), _) | (Err(_), Ok(pair)) => return self.serve(io, pair).await,
            (Err(retired), Err(_)) => retired,
        };
        match retired {
            Retired::Close(code, reason) => {
                debug!(hc = %self.route.hc_name, listener_id = %self.entry.listener_id, code, reason, "standby socket retired");
                close(&mut io, code, reason).await;
            }
            Retired::ByListener(Some(reason)) => close(&mut io, 1008, reason).await,
            Retired::ByListener(None) => {}
        }
        None
    }

    /// The parked wait, until a sender is handed over or the socket is retired.
    async fn wait(
        &self,
        io: &mut ServerIo,
        rx: &mut oneshot::Receiver<Pair>,
    ) -> Result<Pair, Retired> {
        let token_deadline = crate::control::deadline_for(self.route.expiry, Duration::ZERO);
        let ttl_deadline = Instant::now() + self.ttl;
        let (deadline, on_deadline) = if token_deadline < ttl_deadline {
            (
                token_deadline,
                Retired::Close(1008, "The token has expired."),
            )
        } else {
            (ttl_deadline, Retired::Close(1000, "standby expired"))
        };
        let mut keys_changed = self.shared.keys_changed.subscribe();
        let shutdown = self.shared.shutdown.clone();
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                biased;
                // Only `reclaim` drops the other end without a sender.
                pair = &mut *rx => return pair.map_err(|_| Retired::Close(1001, YIELDED)),
                _ = self.entry.tx.closed() => {
                    return Err(Retired::Close(1001, "The listener's control channel closed."))
                }
                _ = shutdown.cancelled() => {
                    return Err(Retired::Close(1001, "The relay is shutting down."))
                }
                Ok(()) = keys_changed.changed() => {
                    if let Some(why) = self.revoked() {
                        return Err(why);
                    }
                }
                _ = sleep_until(deadline) => return Err(on_deadline),
                r = io.read(&mut probe) => {
                    return Err(Retired::ByListener(match r {
                        Ok(n) if n > 0 => Some(SILENT),
                        _ => None,
                    }));
                }
            }
        }
    }

    /// After a change of rules or keys: why the socket must go, if it must.
    fn revoked(&self) -> Option<Retired> {
        if !self
            .shared
            .store
            .snapshot()
            .hcs
            .contains_key(&self.route.hc_key)
        {
            return Some(Retired::Close(1001, "The hybrid connection was deleted."));
        }
        crate::control::listen_token_check(
            &self.shared,
            &self.route.hc_key,
            &self.route.hc_name,
            &self.route.host,
            &self.route.token,
        )
        .err()
        .map(|_| Retired::Close(1008, "The token's key was regenerated or removed."))
    }

    /// A sender was joined: the `accept` goes out first, then the two are spliced. Returns the
    /// socket when its tunnel gave it back (`reuse`).
    async fn serve(self, mut io: Box<ServerIo>, pair: Pair) -> Option<(Socket, Box<ServerIo>)> {
        let Pair {
            permit: parked_permit,
            accept,
            sender:
                Joining {
                    sender,
                    start,
                    permit,
                },
        } = pair;
        let frame = server_frame(OpCode::Text, accept.as_bytes());
        drop(accept);
        if let Err(e) = write_all(&mut io, &frame).await {
            info!(hc = %self.route.hc_name, listener_id = %self.entry.listener_id, error = %e, "standby socket failed as a sender was joined to it");
            return None;
        }
        let span = tracing::info_span!("tunnel", hc = %self.route.hc_name, id = %start.id, listener_id = %self.entry.listener_id, peer = %start.peer, standby = true);
        drop(frame);
        let _permits = (parked_permit, permit);
        let listener = ListenerSide::Parked(io);
        if self.reuse {
            let back = tracing::Instrument::instrument(
                run_tunnel(&self.shared, start, sender, listener, true),
                span,
            )
            .await?;
            return Some((self, back));
        }
        // Not held for the tunnel's life: the route (token, query) and the entry.
        let Socket {
            shared,
            entry,
            route,
            ..
        } = self;
        drop((entry, route));
        tracing::Instrument::instrument(run_tunnel(&shared, start, sender, listener, false), span)
            .await;
        None
    }
}

async fn write_all(io: &mut ServerIo, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// A server Close frame with `code` and `reason`, then the end of the socket (bounded: a
/// listener that stopped reading does not hold the task).
async fn close(io: &mut ServerIo, code: u16, reason: &str) {
    let bytes = server_frame(OpCode::Close, &close_payload(code, reason));
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        write_all(io, &bytes).await?;
        io.shutdown().await
    })
    .await;
}

/// Joins a sender to a socket one of `listeners` parked, if one has: `accept_for` makes the
/// `accept` command for the one chosen, and the parked socket's task runs the tunnel. Returns
/// that listener's id, or gives the sender back when none had a socket to take it.
pub(crate) fn join(
    shared: &Shared,
    hc_key: &str,
    listeners: Vec<Arc<ListenerEntry>>,
    mut sender: Joining,
    accept_for: impl Fn(&ListenerEntry) -> String,
) -> Result<String, Joining> {
    if shared.cfg.extensions.standby.is_none() {
        return Err(sender);
    }
    let mut with_parked: Vec<_> = listeners
        .into_iter()
        .filter(|l| shared.standby.len(l.conn_id) > 0)
        .collect();
    // At random among the listeners that have one, as senders are spread (protocol.md §5.1).
    while !with_parked.is_empty() {
        let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..with_parked.len());
        let l = with_parked.swap_remove(i);
        while let Some(Entry { tx, permit, .. }) = shared.standby.take(l.conn_id) {
            let pair = Pair {
                accept: accept_for(&l),
                sender,
                permit,
            };
            match tx.send(pair) {
                Ok(()) => {
                    let label = Hc::new(Some(hc_key));
                    shared.metrics.standby_pairings.get_or_create(&label).inc();
                    return Ok(l.listener_id.clone());
                }
                // That socket's task ended as it was taken: the next one.
                Err(p) => sender = p.sender,
            }
        }
    }
    Err(sender)
}
