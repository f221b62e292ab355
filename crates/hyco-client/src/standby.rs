//! The listener's standby pool (the `standby` extension, `hyco_proto::ext`): upgraded sockets
//! parked at the relay, so a sender is joined to one at once instead of waiting for an `accept`
//! on the control channel and a rendezvous.
//!
//! A pool lives for one control-channel session whose 101 advertised `standby`: the session
//! holds the [`Pool`] and dropping it (the session ended, the listener stopped) cancels the pool
//! task and every parked socket with it.
//!
//! # Size
//! The pool aims at `clamp(2 × the most arrivals seen in any one second of the last 60 s, 2,
//! max)` sockets, where an arrival is a sender joined through a parked socket or an `accept` on
//! the control channel, and `max` is the smaller of [`crate::ListenerOptions::standby_max`] and
//! the relay's advertised `max`. It starts at 2, grows at once when arrivals come faster (a
//! burst of 8 in a second asks for 16), replaces each socket a sender used at once, and shrinks
//! by not replacing the sockets the relay retires (after its `ttl`) once the busy second has
//! left the 60 s window. A refusal of a new socket (404: no control channel on that relay node;
//! 429: the relay's cap; 401/403) or any other failure stops the growth for a jittered backoff
//! (1 s doubling to 30 s, reset by the next socket parked).
//!
//! # Reuse
//! When the relay offered `reuse` (on the socket's 101, which the socket's request asked for),
//! a tunnel both peers closed with 1000 leaves the socket parked at the relay again, and the
//! owner gives the stream back ([`crate::HybridStream::recycle`]): it waits for the next
//! `accept` here with no new TCP, TLS or upgrade. While lent to a tunnel it counts as one of
//! the pool's for [`RETURN_GRACE`]; one still out after that is replaced, and one that comes
//! back to a full pool is closed.
//!
//! A parked socket sends nothing (no ping, no frame) until the relay's `accept` arrives on it;
//! with a [`TunnelGate`] given, each holds a place under it while parked, taken only while a
//! tenth of the gate's limit stays free for real tunnels.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyco_io::backoff::Backoff;
use hyco_io::tunnels::{TunnelGate, TunnelPermit};
use hyco_io::ws::{Connector, Message, Recycle, Role, WsStream};
use hyco_io::CancellationToken;
use hyco_proto::control::{AcceptCommand, ListenerCommand};
use hyco_proto::ConnectionString;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::debug;

use crate::{mint_token, ClientError, HybridStream};

/// Hands a joined sender (the relay's `accept` and the socket, now its tunnel) to the
/// listener's owner; gives the socket back when the owner cannot take it now.
pub(crate) type Deliver =
    Arc<dyn Fn(AcceptCommand, Box<HybridStream>) -> Result<(), Box<HybridStream>> + Send + Sync>;

/// The window over which the busiest second is remembered.
const WINDOW_SECS: u64 = 60;

/// The smallest pool.
const MIN_POOL: usize = 2;

/// How long a socket lent to a tunnel counts as one of the pool's (see the module docs).
const RETURN_GRACE: Duration = Duration::from_secs(1);

/// Loan ids, unique in the process.
static NEXT_LOAN: AtomicU64 = AtomicU64::new(0);

/// Arrivals per second over the last [`WINDOW_SECS`].
pub(crate) struct Arrivals {
    start: Instant,
    /// (second since `start`, arrivals in it), oldest first, at most `WINDOW_SECS` entries.
    seconds: Mutex<VecDeque<(u64, u32)>>,
}

impl Arrivals {
    pub(crate) fn new() -> Arrivals {
        Arrivals {
            start: Instant::now(),
            seconds: Mutex::new(VecDeque::new()),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// One sender arrived now.
    pub(crate) fn record(&self) {
        self.record_at(self.now());
    }

    fn record_at(&self, sec: u64) {
        let mut s = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        match s.back_mut() {
            Some((last, n)) if *last == sec => *n = n.saturating_add(1),
            _ => s.push_back((sec, 1)),
        }
        while s.front().is_some_and(|(t, _)| t + WINDOW_SECS <= sec) {
            s.pop_front();
        }
    }

    /// The pool size wanted now, at most `max`.
    pub(crate) fn target(&self, max: usize) -> usize {
        self.target_at(self.now(), max)
    }

    fn target_at(&self, sec: u64, max: usize) -> usize {
        let s = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        let peak = s
            .iter()
            .filter(|(t, _)| t + WINDOW_SECS > sec)
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(0);
        usize::try_from(peak)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .max(MIN_POOL)
            .min(max)
    }
}

/// What the pool needs to park sockets for one listener.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) cs: ConnectionString,
    pub(crate) connector: Connector,
    pub(crate) entity: String,
    pub(crate) listener_id: String,
    pub(crate) token_lifetime: Duration,
    pub(crate) deliver: Deliver,
    pub(crate) gate: Option<Arc<TunnelGate>>,
}

/// A running pool; dropping it retires every parked socket.
pub(crate) struct Pool {
    cancel: CancellationToken,
    arrivals: Arc<Arrivals>,
    wake: Arc<Notify>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Pool {
    /// Starts a pool of at most `max` sockets (`max` > 0), stopped with `parent` too.
    pub(crate) fn start(ctx: Ctx, max: usize, parent: &CancellationToken) -> Pool {
        let cancel = parent.child_token();
        let arrivals = Arc::new(Arrivals::new());
        let wake = Arc::new(Notify::new());
        tokio::spawn(run(
            ctx,
            max,
            Arc::clone(&arrivals),
            Arc::clone(&wake),
            cancel.clone(),
        ));
        Pool {
            cancel,
            arrivals,
            wake,
        }
    }

    /// A sender arrived by the control channel: the pool may want to grow.
    pub(crate) fn arrival(&self) {
        self.arrivals.record();
        self.wake.notify_one();
    }
}

/// What a parked socket's task reports.
enum Event {
    /// The relay answered 101.
    Parked,
    /// A sender was joined through it; with a loan id when the socket may come back.
    Used(Option<u64>),
    /// A lent socket, back after its tunnel and parked at the relay again.
    Back(u64, Box<HybridStream>),
    /// A lent socket that will not come back.
    Gone(u64),
    /// The relay closed it before a sender came (ttl, token, shutdown).
    Retired,
    /// It could not be opened, or was lost.
    Failed,
}

async fn run(
    ctx: Ctx,
    max: usize,
    arrivals: Arc<Arrivals>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut live = 0usize;
    // Sockets lent to tunnels and still counted in `live`, with when they were lent.
    let mut lent: HashMap<u64, Instant> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut hold_until: Option<Instant> = None;
    loop {
        if hold_until.is_some_and(|t| Instant::now() >= t) {
            hold_until = None;
        }
        // A loan out longer than the grace stops counting: its place is filled below.
        let before = lent.len();
        lent.retain(|_, at| at.elapsed() < RETURN_GRACE);
        live = live.saturating_sub(before - lent.len());
        if hold_until.is_none() {
            let target = arrivals.target(max);
            while live < target {
                let Some(permit) = place(&ctx, &mut hold_until) else {
                    break;
                };
                live += 1;
                tokio::spawn(park(ctx.clone(), permit, ev_tx.clone(), cancel.clone()));
            }
        }
        let hold = hold_until;
        let grace_end = lent.values().min().map(|at| *at + RETURN_GRACE);
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(Event::Parked) => backoff.reset(),
                Some(Event::Used(loan)) => {
                    match loan {
                        Some(id) => { lent.insert(id, Instant::now()); }
                        None => live = live.saturating_sub(1),
                    }
                    arrivals.record();
                }
                Some(Event::Back(id, ws)) => {
                    // Still counted: parked again. Past its grace (replaced already): kept
                    // only while the pool wants more.
                    let counted = lent.remove(&id).is_some();
                    let permit = if counted || live < arrivals.target(max) {
                        place(&ctx, &mut hold_until)
                    } else {
                        None
                    };
                    match permit {
                        Some(permit) => {
                            if !counted {
                                live += 1;
                            }
                            tokio::spawn(wait_for_sender(ctx.clone(), *ws, true, permit, ev_tx.clone(), cancel.clone()));
                        }
                        // Closed by dropping it: the relay retires a parked socket whose
                        // listener went away.
                        None if counted => live = live.saturating_sub(1),
                        None => {}
                    }
                }
                Some(Event::Gone(id)) => {
                    if lent.remove(&id).is_some() {
                        live = live.saturating_sub(1);
                    }
                }
                Some(Event::Retired) => live = live.saturating_sub(1),
                Some(Event::Failed) => {
                    live = live.saturating_sub(1);
                    hold_until = Some(Instant::now() + backoff.next_delay());
                }
                None => return,
            },
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {}
            _ = tokio::time::sleep_until(grace_end.unwrap_or_else(Instant::now)), if grace_end.is_some() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// A place under the gate for one more parked socket (`Some(None)` without a gate); `None`
/// near the tunnel limit, which holds the pool's growth for a second.
fn place(ctx: &Ctx, hold_until: &mut Option<Instant>) -> Option<Option<TunnelPermit>> {
    match &ctx.gate {
        None => Some(None),
        Some(g) => match g.try_acquire_spare() {
            Some(p) => Some(Some(p)),
            None => {
                *hold_until = Some(Instant::now() + Duration::from_secs(1));
                None
            }
        },
    }
}

/// A socket lent to a tunnel: back to the pool after a normal end, or counted out when dropped.
struct Lent {
    id: u64,
    events: mpsc::UnboundedSender<Event>,
    cfg: hyco_io::ws::WsConfig,
    /// Set once given back, so the drop says nothing more.
    back: bool,
}

impl Recycle<hyco_io::tls::ClientTls> for Lent {
    fn give_back(mut self: Box<Self>, io: hyco_io::tls::ClientTls, rest: Vec<u8>) {
        // `rest` may hold the relay's next `accept` already.
        let ws = WsStream::with_prefix(io, Role::Client, self.cfg, &rest);
        self.back = true;
        let _ = self.events.send(Event::Back(self.id, Box::new(ws)));
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.back {
            let _ = self.events.send(Event::Gone(self.id));
        }
    }
}

/// Opens one parked socket and waits on it for a sender (or its retirement).
async fn park(
    ctx: Ctx,
    permit: Option<TunnelPermit>,
    events: mpsc::UnboundedSender<Event>,
    cancel: CancellationToken,
) {
    let opened = tokio::select! {
        r = open(&ctx) => r,
        _ = cancel.cancelled() => return,
    };
    let (ws, reuse) = match opened {
        Ok(x) => x,
        Err(e) => {
            debug!(hc = %ctx.entity, listener_id = %ctx.listener_id, error = %e, "standby socket not parked");
            let _ = events.send(Event::Failed);
            return;
        }
    };
    let _ = events.send(Event::Parked);
    wait_for_sender(ctx, ws, reuse, permit, events, cancel).await;
}

/// Waits on a parked socket for the relay's `accept`, then hands the tunnel to the owner.
async fn wait_for_sender(
    ctx: Ctx,
    mut ws: HybridStream,
    reuse: bool,
    permit: Option<TunnelPermit>,
    events: mpsc::UnboundedSender<Event>,
    cancel: CancellationToken,
) {
    // Parked: nothing is sent on it until the relay's `accept`.
    let msg = tokio::select! {
        m = ws.recv() => m,
        _ = cancel.cancelled() => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.send_close(1001, "listener stopped")).await;
            return;
        }
    };
    let command = match msg {
        Ok(Message::Text(t)) => match ListenerCommand::parse(&t) {
            Ok(ListenerCommand::Accept(a)) => a,
            _ => {
                debug!(hc = %ctx.entity, "standby socket: unexpected first message");
                let _ = ws.send_close(1002, "expected accept").await;
                let _ = events.send(Event::Failed);
                return;
            }
        },
        Ok(Message::Close(c)) => {
            debug!(hc = %ctx.entity, close = ?c, "standby socket retired by the relay");
            let _ = ws.send_close(1000, "").await;
            let _ = events.send(Event::Retired);
            return;
        }
        Ok(Message::Binary(_)) => {
            let _ = ws.send_close(1002, "expected accept").await;
            let _ = events.send(Event::Failed);
            return;
        }
        Err(e) => {
            debug!(hc = %ctx.entity, error = %e, "standby socket lost");
            let _ = events.send(Event::Failed);
            return;
        }
    };
    // From here the socket is a tunnel: the application's own limits count it.
    drop(permit);
    let loan = reuse.then(|| NEXT_LOAN.fetch_add(1, Ordering::Relaxed));
    if let Some(id) = loan {
        ws.set_recycle(Box::new(Lent {
            id,
            events: events.clone(),
            cfg: ctx.connector.ws,
            back: false,
        }));
    }
    let _ = events.send(Event::Used(loan));
    if let Err(mut ws) = (ctx.deliver)(command, Box::new(ws)) {
        // As on the control channel: a listener not keeping up refuses with 503.
        if ws.send_close(4503, "The listener is busy.").await.is_ok() {
            ws.finish_close(Duration::from_secs(2)).await;
        }
    }
}

/// The upgrade `sb-hc-action=standby` with the listener's id and a Listen token (asking for
/// `reuse`); the socket, and whether the relay offered `reuse` on its 101.
async fn open(ctx: &Ctx) -> Result<(HybridStream, bool), ClientError> {
    let url = hyco_proto::address::ws_url(
        &ctx.cs.endpoint.host_port(),
        &ctx.entity,
        None,
        hyco_proto::Action::Standby,
        &ctx.listener_id,
    );
    let (token, _) = mint_token(&ctx.cs, ctx.token_lifetime)?.ok_or_else(|| {
        ClientError::ConnectionString("a listener needs a key or a signature".into())
    })?;
    let c = ctx
        .connector
        .connect(
            &url,
            &[
                ("ServiceBusAuthorization", token.as_str()),
                (hyco_proto::ext::HEADER, hyco_proto::ext::REUSE),
            ],
        )
        .await?;
    Ok((c.ws, c.extensions.reuse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_target_follows_the_busiest_second_of_the_last_minute() {
        let a = Arrivals::new();
        assert_eq!(a.target_at(0, 16), 2, "starts at 2");
        assert_eq!(a.target_at(0, 1), 1, "never above max");
        a.record_at(5);
        assert_eq!(a.target_at(5, 16), 2);
        for _ in 0..7 {
            a.record_at(6);
        }
        assert_eq!(
            a.target_at(6, 16),
            14,
            "a burst of 7 in a second asks for 14"
        );
        assert_eq!(a.target_at(6, 8), 8, "capped by max");
        a.record_at(30);
        assert_eq!(a.target_at(65, 16), 14, "the burst is remembered for 60 s");
        assert_eq!(a.target_at(66, 16), 2, "and then forgotten");
        // Old seconds are dropped as new ones come, so memory stays bounded.
        for s in 100..1000 {
            a.record_at(s);
        }
        assert!(a.seconds.lock().unwrap().len() <= WINDOW_SECS as usize);
        // Counts saturate instead of wrapping.
        a.seconds.lock().unwrap().push_back((1000, u32::MAX));
        a.record_at(1000);
        assert_eq!(a.target_at(1000, usize::MAX), (u32::MAX as usize) * 2);
    }

    /// The pool's guard: a session that ends (the pool dropped) takes its sockets with it, even
    /// one still in its handshake, while the listener itself (the parent token) lives on.
    #[tokio::test]
    async fn dropping_the_pool_closes_its_sockets() {
        use tokio::io::AsyncReadExt;
        const T: Duration = Duration::from_secs(10);
        // A "relay" that takes connections and never answers their TLS hello.
        let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = relay.local_addr().unwrap().port();
        let ctx = Ctx {
            cs: ConnectionString::parse(&format!(
                "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=s;SharedAccessKey=a2V5;EntityPath=hc"
            ))
            .unwrap(),
            connector: crate::ClientOptions::default().connector().unwrap(),
            entity: "hc".into(),
            listener_id: "l1".into(),
            token_lifetime: Duration::from_secs(60),
            deliver: Arc::new(|_, ws| Err(ws)),
            gate: None,
        };
        let parent = CancellationToken::new();
        let pool = Pool::start(ctx, 4, &parent);
        // It starts at 2: both arrive and send their hello.
        let mut socks = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = tokio::time::timeout(T, relay.accept())
                .await
                .unwrap()
                .unwrap();
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(hello[0], 0x16, "a TLS handshake record");
            socks.push(s);
        }
        drop(pool);
        for mut s in socks {
            let mut rest = Vec::new();
            tokio::time::timeout(T, s.read_to_end(&mut rest))
                .await
                .expect("the socket closed with its pool, not at the connect deadline")
                .unwrap();
        }
        assert!(!parent.is_cancelled());
    }

    #[test]
    fn parked_sockets_leave_a_tenth_of_the_tunnel_limit_free() {
        let gate = TunnelGate::new("test", 20);
        let mut held = Vec::new();
        while let Some(p) = gate.try_acquire_spare() {
            held.push(p);
            assert!(held.len() <= 20);
        }
        assert_eq!(held.len(), 18);
        assert_eq!(gate.refused(), 0, "not a refusal");
        assert!(gate.try_acquire().is_some(), "real tunnels still fit");
    }
}
