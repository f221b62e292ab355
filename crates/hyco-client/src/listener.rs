//! A listener: one control channel to the relay, kept alive forever.
//!
//! [`HybridListener::start`] spawns an actor that connects, sends `renewToken` before the token
//! expires, pings and reconnects when the relay stops answering, and retries with jittered
//! backoff after any failure (a 404 too: the hybrid connection may be created later). Each
//! `accept` from the relay arrives as an [`Incoming`] on the channel; the owner accepts or
//! rejects it. Dropping the [`HybridListener`] stops the actor.

use std::fmt;
use std::time::{Duration, SystemTime};

use hyco_io::backoff::Backoff;
use hyco_io::ws::{Connector, Message};
use hyco_io::CancellationToken;
use hyco_proto::control::{AcceptCommand, ListenerCommand, RenewTokenCommand, RequestCommand};
use hyco_proto::ConnectionString;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn};

use crate::http::{ControlReply, HttpResponse, RelayedRequest};
use crate::{entity_of, mint_token, ClientError, ClientOptions, HybridStream};

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Listener id (`sb-hc-id`); a UUID when absent.
    pub id: Option<String>,
    /// How often to ping the relay.
    pub ping_interval: Duration,
    /// Reconnect when nothing arrived for this long.
    pub dead_after: Duration,
    /// Renew this long before the token expires.
    pub renew_before: Duration,
    /// Backoff base and cap.
    pub backoff: (Duration, Duration),
    /// Window and ceiling of the quick retries after a loss, before the backoff grows
    /// ([`Backoff::with_fast_retries`]; `None`: grow from the start).
    pub fast_retries: Option<(Duration, Duration)>,
    /// Token lifetime.
    pub token_lifetime: Duration,
    /// Most sockets parked at the relay for senders to be joined to at once (the `standby`
    /// extension). The pool starts at 2 and aims at twice the most senders that arrived in any
    /// one second of the last minute, replacing used sockets at once and letting the ones the
    /// relay retires go when fewer are wanted. Used only when the relay advertises `standby`,
    /// never above the relay's own `max`; 0: never.
    pub standby_max: usize,
    /// When set, each parked socket holds a place under this tunnel limit while parked, taken
    /// only while a tenth of the limit stays free for real tunnels (`hyco manager` passes its
    /// `--max-tunnels` gate: each parked socket is a descriptor).
    pub standby_gate: Option<std::sync::Arc<hyco_io::tunnels::TunnelGate>>,
}

/// [`ListenerOptions::standby_max`] by default.
pub const DEFAULT_STANDBY_MAX: usize = 16;

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            id: None,
            ping_interval: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            renew_before: Duration::from_secs(300),
            backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            fast_retries: Some(hyco_io::backoff::FAST_RETRIES),
            token_lifetime: ClientOptions::default().token_lifetime,
            standby_max: DEFAULT_STANDBY_MAX,
            standby_gate: None,
        }
    }
}

/// Where the control channel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerStatus {
    /// Dialling.
    Connecting,
    /// Online.
    Connected {
        /// Since when.
        since: SystemTime,
    },
    /// Lost or refused; retrying.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The relay says the hybrid connection does not exist; retrying.
    NotFound,
    /// The relay refused the key; retrying.
    Unauthorized {
        /// The relay's reason.
        reason: String,
    },
}

impl fmt::Display for ListenerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerStatus::Connecting => f.write_str("Connecting"),
            ListenerStatus::Connected { .. } => f.write_str("Connected"),
            ListenerStatus::Disconnected { reason } => write!(f, "Disconnected ({reason})"),
            ListenerStatus::NotFound => f.write_str("NotFound"),
            ListenerStatus::Unauthorized { reason } => write!(f, "Unauthorized ({reason})"),
        }
    }
}

/// A sender waiting for this listener.
pub struct Incoming {
    /// The relay's `accept` command.
    pub command: AcceptCommand,
    kind: Kind,
}

/// How the tunnel to an [`Incoming`] sender is (or gets) open.
enum Kind {
    /// An `accept` on the control channel: the rendezvous address is to be dialled.
    Rendezvous(Connector),
    /// A parked socket the relay joined the sender to: already the tunnel.
    Standby(Box<HybridStream>),
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("id", &self.command.id)
            .field("standby", &self.is_standby())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    fn standby(command: AcceptCommand, ws: Box<HybridStream>) -> Incoming {
        Incoming {
            command,
            kind: Kind::Standby(ws),
        }
    }

    /// The connection id.
    pub fn id(&self) -> &str {
        &self.command.id
    }

    /// Whether the sender came through a parked socket (the tunnel is open already).
    pub fn is_standby(&self) -> bool {
        matches!(self.kind, Kind::Standby(_))
    }

    /// Opens the rendezvous: the tunnel to the sender. For a sender joined through a parked
    /// socket, that socket is the tunnel, returned at once.
    pub async fn accept(self) -> Result<HybridStream, ClientError> {
        match self.kind {
            Kind::Rendezvous(connector) => {
                Ok(connector.connect(&self.command.address, &[]).await?.ws)
            }
            Kind::Standby(ws) => Ok(*ws),
        }
    }

    /// Refuses the sender with a status and reason it will see. The relay's 410 means done.
    /// On a parked socket the refusal is a Close with code 4000 + status (a status outside
    /// 400..=599 is sent as 500).
    pub async fn reject(self, status: u16, reason: &str) -> Result<(), ClientError> {
        let connector = match self.kind {
            Kind::Rendezvous(c) => c,
            Kind::Standby(mut ws) => {
                let status = if (400..=599).contains(&status) {
                    status
                } else {
                    500
                };
                // The socket is gone (the relay or the network dropped it): said as a failed
                // connect to the relay would be.
                ws.send_close(4000 + status, reason)
                    .await
                    .map_err(|source| {
                        let addr = hyco_io::ws::dial::Target::parse(&self.command.address)
                            .map(|t| format!("{}:{}", t.host, t.port))
                            .unwrap_or_default();
                        ClientError::Connect(hyco_io::ws::ConnectError::Connect { addr, source })
                    })?;
                ws.finish_close(Duration::from_secs(2)).await;
                return Ok(());
            }
        };
        let url = hyco_proto::address::reject_url(&self.command.address, status, reason);
        match connector.connect(&url, &[]).await {
            Err(hyco_io::ws::ConnectError::Rejected { status: 410, .. }) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => Err(ClientError::Rejected {
                status: 101,
                reason: "the relay accepted a reject as a connection".into(),
            }),
        }
    }
}

/// Handle of a running listener; dropping it stops the listener.
pub struct HybridListener {
    stop: CancellationToken,
    status: watch::Receiver<ListenerStatus>,
    id: String,
}

impl Drop for HybridListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl HybridListener {
    /// Starts the actor; `accept`s arrive on the returned channel. HTTP-mode requests are
    /// answered `501 Not Implemented` (use [`HybridListener::start_with_http`] to serve them).
    pub fn start(
        cs: ConnectionString,
        connector: Connector,
        opts: ListenerOptions,
        shutdown: CancellationToken,
    ) -> Result<(HybridListener, mpsc::Receiver<Incoming>), ClientError> {
        Self::start_inner(cs, connector, opts, shutdown, None)
    }

    /// Starts the actor serving both modes: WebSocket `accept`s on the first channel, HTTP
    /// requests on the second.
    #[allow(clippy::type_complexity)]
    pub fn start_with_http(
        cs: ConnectionString,
        connector: Connector,
        opts: ListenerOptions,
        shutdown: CancellationToken,
    ) -> Result<
        (
            HybridListener,
            mpsc::Receiver<Incoming>,
            mpsc::Receiver<RelayedRequest>,
        ),
        ClientError,
    > {
        let (http_tx, http_rx) = mpsc::channel(256);
        let (l, rx) = Self::start_inner(cs, connector, opts, shutdown, Some(http_tx))?;
        Ok((l, rx, http_rx))
    }

    fn start_inner(
        cs: ConnectionString,
        connector: Connector,
        opts: ListenerOptions,
        shutdown: CancellationToken,
        http: Option<mpsc::Sender<RelayedRequest>>,
    ) -> Result<(HybridListener, mpsc::Receiver<Incoming>), ClientError> {
        entity_of(&cs)?;
        let id = opts
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (status_tx, status) = watch::channel(ListenerStatus::Connecting);
        let (tx, rx) = mpsc::channel(256);
        let stop = shutdown.child_token();
        let actor = Actor {
            cs,
            connector,
            opts,
            id: id.clone(),
            status: status_tx,
            tx,
            http,
            stop: stop.clone(),
        };
        tokio::spawn(actor.run());
        Ok((HybridListener { stop, status, id }, rx))
    }

    /// Current status.
    pub fn status(&self) -> ListenerStatus {
        self.status.borrow().clone()
    }

    /// A watch on the status.
    pub fn status_watch(&self) -> watch::Receiver<ListenerStatus> {
        self.status.clone()
    }

    /// This listener's id.
    pub fn listener_id(&self) -> &str {
        &self.id
    }

    /// Stops the actor.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

struct Actor {
    cs: ConnectionString,
    connector: Connector,
    opts: ListenerOptions,
    id: String,
    status: watch::Sender<ListenerStatus>,
    tx: mpsc::Sender<Incoming>,
    http: Option<mpsc::Sender<RelayedRequest>>,
    stop: CancellationToken,
}

impl Actor {
    async fn run(self) {
        let entity = self.cs.entity_path.clone().unwrap_or_default();
        let mut backoff = Backoff::new(self.opts.backoff.0, self.opts.backoff.1);
        if let Some(fast) = self.opts.fast_retries {
            backoff = backoff.with_fast_retries(fast);
        }
        loop {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
            let _ = self.status.send(ListenerStatus::Connecting);
            let started = Instant::now();
            let outcome = tokio::select! {
                r = self.session(&entity) => r,
                _ = self.stop.cancelled() => return,
            };
            if started.elapsed() >= Duration::from_secs(10) {
                backoff.reset();
            } else if matches!(*self.status.borrow(), ListenerStatus::Connected { .. }) {
                // Up, but not for long (a relay restarted again soon): retry quickly again.
                backoff.link_lost();
            }
            let status = match outcome {
                Err(ClientError::Rejected { status: 404, .. }) => ListenerStatus::NotFound,
                Err(ClientError::Rejected {
                    status: s @ (401 | 403),
                    reason,
                }) => ListenerStatus::Unauthorized {
                    reason: format!("{s} {reason}"),
                },
                Err(e) => ListenerStatus::Disconnected {
                    reason: e.to_string(),
                },
                Ok(reason) => ListenerStatus::Disconnected { reason },
            };
            warn!(hc = %entity, listener_id = %self.id, status = %status, "control channel down; reconnecting");
            let _ = self.status.send(status);
        }
    }

    /// One control-channel session; returns why it ended.
    async fn session(&self, entity: &str) -> Result<String, ClientError> {
        let url = hyco_proto::address::ws_url(
            &self.cs.endpoint.host_port(),
            entity,
            None,
            hyco_proto::Action::Listen,
            &self.id,
        );
        let (token, mut expiry) =
            mint_token(&self.cs, self.opts.token_lifetime)?.ok_or_else(|| {
                ClientError::ConnectionString("a listener needs a key or a signature".into())
            })?;
        let connected = self
            .connector
            .connect(&url, &[("ServiceBusAuthorization", token.as_str())])
            .await?;
        let mut ws = connected.ws;
        info!(hc = %entity, listener_id = %self.id, "listener connected");
        // Parked sockets, when the relay offers them: the pool lives as long as this session
        // (dropped, whichever way the session ends, it retires them).
        let pool = self.standby_pool(entity, connected.extensions.standby);
        let _ = self.status.send(ListenerStatus::Connected {
            since: SystemTime::now(),
        });
        let can_renew = matches!(self.cs.auth, hyco_proto::ConnectionStringAuth::Key { .. });
        let mut ping = tokio::time::interval(self.opts.ping_interval);
        ping.reset();
        let mut seen = ws.frames_received();
        let mut last_progress = Instant::now();
        // HTTP responses that go back on this channel, and a request whose body is next.
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlReply>(64);
        let mut awaiting_body: Option<RequestCommand> = None;
        loop {
            let renew_at = renew_instant(expiry, self.opts.renew_before);
            tokio::select! {
                msg = ws.recv() => match msg {
                    Ok(Message::Binary(b)) if awaiting_body.is_some() => {
                        if let Some(r) = awaiting_body.take() {
                            self.dispatch(RelayedRequest::from_control(r, bytes::Bytes::from(b), ctl_tx.clone(), self.connector.clone()));
                        }
                    }
                    Ok(Message::Text(t)) => match ListenerCommand::parse(&t) {
                        Ok(ListenerCommand::Request(r)) => {
                            awaiting_body = None;
                            match r.body {
                                Some(true) => awaiting_body = Some(r),
                                Some(false) => self.dispatch(RelayedRequest::from_control(r, bytes::Bytes::new(), ctl_tx.clone(), self.connector.clone())),
                                // Address-only: the request itself waits on its rendezvous.
                                None => {
                                    let connector = self.connector.clone();
                                    let http = self.http.clone();
                                    tokio::spawn(async move {
                                        match RelayedRequest::from_rendezvous(&r.address, &connector).await {
                                            Ok(req) => dispatch_to(http.as_ref(), req),
                                            Err(e) => warn!(error = %e, "request rendezvous failed"),
                                        }
                                    });
                                }
                            }
                        }
                        Ok(ListenerCommand::Accept(command)) => {
                            if let Some(p) = &pool {
                                p.arrival();
                            }
                            let incoming = Incoming { command, kind: Kind::Rendezvous(self.connector.clone()) };
                            if let Err(e) = self.tx.try_send(incoming) {
                                let incoming = match e {
                                    mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
                                };
                                tokio::spawn(async move { let _ = incoming.reject(503, "The listener is busy.").await; });
                            }
                        }
                        Ok(other) => debug!(command = ?std::mem::discriminant(&other), "control command ignored"),
                        Err(e) => debug!(error = %e, "control message ignored"),
                    },
                    Ok(Message::Binary(_)) => debug!("binary message without a request ignored"),
                    Ok(Message::Close(c)) => {
                        let _ = ws.send_close(1000, "").await;
                        return Ok(match c {
                            Some((code, reason)) => format!("relay closed the channel: {code} {reason}"),
                            None => "relay closed the channel".into(),
                        });
                    }
                    Err(e) => return Ok(format!("control channel lost: {e}")),
                },
                Some((json, body)) = ctl_rx.recv() => {
                    if let Err(e) = ws.send_text_then_binary(&json, body.as_deref()).await {
                        return Ok(format!("control channel lost: {e}"));
                    }
                }
                _ = sleep_until_opt(renew_at), if can_renew => {
                    let (t, e) = mint_token(&self.cs, self.opts.token_lifetime)?
                        .ok_or_else(|| ClientError::ConnectionString("no key to renew with".into()))?;
                    let cmd = ListenerCommand::RenewToken(RenewTokenCommand { token: t });
                    if let Err(e) = ws.send_text(&cmd.to_json()).await {
                        return Ok(format!("renewal failed: {e}"));
                    }
                    debug!(hc = %entity, "token renewed");
                    expiry = e;
                }
                _ = ping.tick() => {
                    let now_seen = ws.frames_received();
                    if now_seen != seen {
                        seen = now_seen;
                        last_progress = Instant::now();
                    } else if last_progress.elapsed() >= self.opts.dead_after {
                        return Ok("relay stopped answering pings".into());
                    }
                    match tokio::time::timeout(Duration::from_secs(10), ws.send_ping(b"")).await {
                        Ok(Ok(())) => {}
                        _ => return Ok("ping could not be sent".into()),
                    }
                }
                _ = self.stop.cancelled() => {
                    if tokio::time::timeout(Duration::from_secs(2), ws.send_close(1000, "Normal Closure")).await.is_ok() {
                        ws.finish_close(Duration::from_secs(2)).await;
                    }
                    return Ok("stopped".into());
                }
            }
        }
    }
}

impl Actor {
    /// The standby pool for a session whose relay advertised `standby` (and `standby_max` > 0).
    fn standby_pool(
        &self,
        entity: &str,
        offer: Option<hyco_proto::ext::StandbyParams>,
    ) -> Option<crate::standby::Pool> {
        let advertised = usize::try_from(offer?.max).unwrap_or(usize::MAX);
        let max = self.opts.standby_max.min(advertised);
        if max == 0 {
            return None;
        }
        let ctx = crate::standby::Ctx {
            cs: self.cs.clone(),
            connector: self.connector.clone(),
            entity: entity.to_owned(),
            listener_id: self.id.clone(),
            token_lifetime: self.opts.token_lifetime,
            deliver: {
                let tx = self.tx.clone();
                std::sync::Arc::new(move |command, ws| match tx.try_reserve() {
                    Ok(place) => {
                        place.send(Incoming::standby(command, ws));
                        Ok(())
                    }
                    Err(_) => Err(ws),
                })
            },
            gate: self.opts.standby_gate.clone(),
        };
        debug!(hc = %entity, max, "parking standby sockets");
        Some(crate::standby::Pool::start(ctx, max, &self.stop))
    }

    fn dispatch(&self, req: RelayedRequest) {
        dispatch_to(self.http.as_ref(), req);
    }
}

/// Hands a request to the application, or answers it: 501 when this listener does not serve
/// HTTP, 503 when the application is not keeping up.
fn dispatch_to(http: Option<&mpsc::Sender<RelayedRequest>>, req: RelayedRequest) {
    let (req, status, why) = match http {
        None => (req, 501, "This listener does not serve HTTP requests."),
        Some(tx) => match tx.try_send(req) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(r)) => (r, 503, "The listener is busy."),
            Err(mpsc::error::TrySendError::Closed(r)) => {
                (r, 501, "This listener no longer serves HTTP requests.")
            }
        },
    };
    tokio::spawn(async move {
        let mut resp = HttpResponse::new(status, why.as_bytes().to_vec());
        resp.headers
            .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
        if let Err(e) = req.respond(resp).await {
            debug!(error = %e, "could not answer an HTTP request");
        }
    });
}

fn renew_instant(expiry: u64, before: Duration) -> Instant {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let lifetime_left = expiry.saturating_sub(now);
    // Renew `before` ahead, or at half the remaining life for short tokens.
    // The expiry may be the relay's or a signature's number, up to 2^64-1: a wait past a year
    // is renewed after a year, and `Instant` arithmetic stays far from its overflow.
    let wait = lifetime_left
        .saturating_sub(before.as_secs())
        .max(lifetime_left / 2)
        .clamp(1, RENEW_AT_LEAST_EVERY.as_secs());
    Instant::now() + Duration::from_secs(wait)
}

/// The longest a listener waits before renewing its token, however far its expiry.
const RENEW_AT_LEAST_EVERY: Duration = Duration::from_secs(365 * 86_400);

async fn sleep_until_opt(at: Instant) {
    tokio::time::sleep_until(at).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_before_expiry() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let at = renew_instant(now + 3600, Duration::from_secs(300));
        let d = at - Instant::now();
        assert!(d <= Duration::from_secs(3300) && d >= Duration::from_secs(3200));
        let short = renew_instant(now + 10, Duration::from_secs(300)) - Instant::now();
        assert!(short <= Duration::from_secs(6));
        // Expiries from the far end of the range (issue 15 §1): no overflow, at most a year.
        for expiry in [0, 1, now - 1, now, now + 1, i64::MAX as u64, u64::MAX] {
            let d = renew_instant(expiry, Duration::from_secs(300)) - Instant::now();
            assert!(d <= RENEW_AT_LEAST_EVERY, "{expiry}: {d:?}");
        }
        assert_eq!(ListenerStatus::NotFound.to_string(), "NotFound");
    }
}
