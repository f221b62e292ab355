//! A listener's control channel, from 101 to close.
//!
//! The task sends `accept` commands queued by senders, answers pings, pings the listener and
//! drops it when it stops answering, accepts `renewToken`, and closes with 1008 when the token
//! expires past the grace window (protocol.md §3.4, §4.5, §5.5).

use std::sync::Arc;
use std::time::Duration;

use hyco_io::ws::{Message, Role, WsConfig, WsError, WsStream};
use hyco_proto::control::{ListenerCommand, ResponseCommand};
use hyco_proto::rights::Need;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::registry::{ControlMsg, ListenerEntry, Registration};
use crate::{unix_now, Shared};

/// Everything the control task needs besides the socket.
pub(crate) struct ControlChannel {
    /// Relay state.
    pub(crate) shared: Arc<Shared>,
    /// Registry key of the hybrid connection.
    pub(crate) hc_key: String,
    /// Its name as addressed.
    pub(crate) hc_name: String,
    /// This listener's registry entry.
    pub(crate) entry: Arc<ListenerEntry>,
    /// Its place in the registry, given back when the channel is dropped.
    pub(crate) registration: Registration,
    /// Expiry of the token that opened (or last renewed) the channel.
    pub(crate) expiry: u64,
    /// That token, kept to re-check it when keys change. Never logged.
    pub(crate) token: String,
    /// Queue of commands for this listener.
    pub(crate) rx: mpsc::Receiver<ControlMsg>,
}

/// What the ping timer knows of the listener: frames it had received at the last check, and
/// when that count last moved.
struct Liveness {
    seen: u64,
    last_progress: Instant,
}

/// A command queued for the listener; `Some(why)` when the channel ends.
async fn on_queued<S>(ws: &mut WsStream<S>, cmd: Option<ControlMsg>) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match cmd {
        Some(ControlMsg::Command(json)) => ws
            .send_text(&json)
            .await
            .err()
            .map(|e| format!("write failed: {e}")),
        // The body follows its request with nothing between (§4.1).
        Some(ControlMsg::Request { json, body }) => ws
            .send_text_then_binary(&json, body.as_deref())
            .await
            .err()
            .map(|e| format!("write failed: {e}")),
        Some(ControlMsg::Close(code, reason)) => {
            let _ = ws.send_close(code, reason).await;
            Some(reason.to_string())
        }
        None => Some("registry dropped".into()),
    }
}

/// The `requestId` of a `response` command that does not parse as one.
fn unreadable_response_id(text: &str) -> Option<String> {
    if text.len() > 64 * 1024 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("response")?
        .get("requestId")?
        .as_str()
        .map(str::to_owned)
}

/// The furthest a token's expiry puts a channel's deadline. `se` is the client's number (up to
/// 2^64-1, validly signed); past ten years a channel is as good as unbounded, and `Instant`
/// arithmetic stays far from its overflow.
const FURTHEST: Duration = Duration::from_secs(10 * 365 * 86_400);

/// When a channel whose token expires at `expiry` (seconds since the epoch) must close.
pub(crate) fn deadline_for(expiry: u64, grace: Duration) -> Instant {
    let left = Duration::from_secs(expiry.saturating_sub(unix_now()))
        .saturating_add(grace)
        .min(FURTHEST);
    // At most ten years ahead: no platform's monotonic clock overflows there.
    Instant::now() + left
}

/// Verifies a Listen token for the hybrid connection `(key, name)`, reached by `host`, with
/// the keys as they are now, as of `now` (0: expiry not checked).
fn listen_token_at(
    shared: &Shared,
    (hc_key, hc_name): (&str, &str),
    host: &str,
    token: &str,
    now: u64,
) -> Result<crate::auth::Grant, crate::error::RelayError> {
    let ns = shared.store.snapshot();
    let hc = ns.hcs.get(hc_key);
    let hosts = crate::auth::hosts(&shared.cfg.hostnames, host);
    crate::auth::authorize(
        &ns,
        &hosts,
        Some((hc_name, hc)),
        Some(token),
        Need::Listen,
        now,
    )
}

/// Whether a Listen token still verifies with the keys as they are now (its expiry is the
/// holder's timer): after a key change, control channels and standby sockets ask this.
pub(crate) fn listen_token_check(
    shared: &Shared,
    hc_key: &str,
    hc_name: &str,
    host: &str,
    token: &str,
) -> Result<crate::auth::Grant, crate::error::RelayError> {
    listen_token_at(shared, (hc_key, hc_name), host, token, 0)
}

impl ControlChannel {
    /// Runs the channel until it closes, then unregisters the listener.
    pub(crate) async fn run<S>(mut self, io: S, prefix: &[u8])
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // Text commands stay within 64 KiB (checked when parsed, 1009 beyond); a response body
        // sent inline may be 64 KiB itself, so whole messages get room for both.
        let cfg = WsConfig {
            max_message: 128 * 1024,
            max_fragments: 64,
            ..WsConfig::default()
        };
        let mut ws = WsStream::with_prefix(io, Role::Server, cfg, prefix);
        let label = crate::metrics::Hc::new(Some(&self.hc_key));
        let connected =
            crate::metrics::GaugeUnit::hold(&self.shared.metrics.active_listeners, &label);
        if let Some(p) = &self.shared.cfg.panic_listener_prefix {
            if self.entry.listener_id.starts_with(p.as_str()) {
                panic!("test hook: control channel of listener {p}… panics");
            }
        }
        let address = self.entry.remote.to_string();
        crate::status::listener_event(
            &self.shared,
            "NewListenerRegistered",
            &self.hc_name,
            &self.entry.listener_id,
            &address,
            None,
        );
        let why = self.serve(&mut ws).await;
        // Out of the rotation before the closing handshake; the registration and the gauge
        // would go on their own if this task ended any other way.
        drop(self.registration);
        drop(connected);
        self.shared
            .metrics
            .listener_disconnects
            .get_or_create(&label)
            .inc();
        crate::status::listener_event(
            &self.shared,
            "ListenerUnregistered",
            &self.hc_name,
            &self.entry.listener_id,
            &address,
            Some(&why),
        );
        ws.finish_close(Duration::from_secs(2)).await;
        info!(
            event = "ListenerUnregistered",
            hc = %self.hc_name,
            listener_id = %self.entry.listener_id,
            peer = %self.entry.remote,
            reason = %why,
            "listener left"
        );
    }

    /// The channel's life: messages from the listener, commands for it, key changes, token
    /// expiry, pings and shutdown, until one of them ends it; returns why.
    async fn serve<S>(&mut self, ws: &mut WsStream<S>) -> String
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let limits = self.shared.cfg.limits;
        let mut expiry_at = deadline_for(self.expiry, limits.token_grace);
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.reset();
        let mut alive = Liveness {
            seen: ws.frames_received(),
            last_progress: Instant::now(),
        };
        let shutdown = self.shared.shutdown.clone();
        let mut keys_changed = self.shared.keys_changed.subscribe();
        // A `response` with `body: true` waits here for the binary message that must follow.
        let mut awaiting_body: Option<ResponseCommand> = None;
        loop {
            let end = tokio::select! {
                msg = ws.recv() => self.on_message(ws, msg, &mut awaiting_body, &mut expiry_at).await,
                cmd = self.rx.recv() => on_queued(ws, cmd).await,
                Ok(()) = keys_changed.changed() => self.on_keys_changed(ws).await,
                _ = sleep_until(expiry_at) => {
                    let _ = ws.send_close(1008, "The token has expired.").await;
                    Some("token expired".into())
                }
                _ = ping.tick() => self.on_ping(ws, &mut alive).await,
                _ = shutdown.cancelled() => {
                    let _ = ws.send_close(1001, "The relay is shutting down.").await;
                    Some("relay shutting down".into())
                }
            };
            if let Some(why) = end {
                return why;
            }
        }
    }

    /// A message from the listener; `Some(why)` when the channel ends.
    async fn on_message<S>(
        &mut self,
        ws: &mut WsStream<S>,
        msg: Result<Message, WsError>,
        awaiting_body: &mut Option<ResponseCommand>,
        expiry_at: &mut Instant,
    ) -> Option<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match msg {
            Ok(Message::Text(t)) => {
                if let Some(r) = awaiting_body.take() {
                    debug!(hc = %self.hc_name, "a response's body did not follow it; the request fails");
                    self.shared.http.abandon(self.entry.conn_id, &r.request_id);
                }
                match ListenerCommand::parse(&t) {
                    Ok(ListenerCommand::Response(r)) => {
                        if r.body {
                            *awaiting_body = Some(r);
                        } else {
                            self.deliver(r, bytes::Bytes::new());
                        }
                        return None;
                    }
                    Err(_) => {
                        // A response we cannot read (statusCode "abc", -1…) fails its request
                        // at once (502) instead of leaving it to time out.
                        if let Some(id) = unreadable_response_id(&t) {
                            debug!(hc = %self.hc_name, request_id = %id, "unreadable response; the request fails");
                            self.shared.http.abandon(self.entry.conn_id, &id);
                            return None;
                        }
                    }
                    Ok(_) => {}
                }
                let (code, reason) = self.on_text(&t, expiry_at)?;
                let _ = ws.send_close(code, reason).await;
                Some(reason.to_string())
            }
            Ok(Message::Binary(b)) => {
                match awaiting_body.take() {
                    Some(r) => self.deliver(r, bytes::Bytes::from(b)),
                    None => debug!("binary message on control channel ignored"),
                }
                None
            }
            Ok(Message::Close(c)) => {
                let _ = ws.send_close(1000, "").await;
                Some(format!("listener closed: {c:?}"))
            }
            Err(WsError::Protocol(e)) => {
                let _ = ws.flush_pending().await;
                Some(format!("protocol error: {e}"))
            }
            Err(e) => Some(format!("{e}")),
        }
    }

    /// Rules or keys changed: a deleted hybrid connection or a token that no longer verifies
    /// ends the channel.
    async fn on_keys_changed<S>(&self, ws: &mut WsStream<S>) -> Option<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if !self.shared.store.snapshot().hcs.contains_key(&self.hc_key) {
            // Deleted (here, or on another node of a cluster): say so, rather than that the
            // token stopped verifying.
            let _ = ws
                .send_close(1001, "The hybrid connection was deleted.")
                .await;
            return Some("hybrid connection deleted".into());
        }
        if let Err(e) = self.check_token(&self.token, 0) {
            info!(event = "ListenerTokenRevoked", hc = %self.hc_name, listener_id = %self.entry.listener_id, reason = %e, "closing: its token no longer verifies");
            let _ = ws
                .send_close(1008, "The token's key was regenerated or removed.")
                .await;
            return Some("token key revoked".into());
        }
        None
    }

    /// A ping period passed: drops a listener silent for `dead_after`, else pings it.
    async fn on_ping<S>(&self, ws: &mut WsStream<S>, alive: &mut Liveness) -> Option<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let now_seen = ws.frames_received();
        if now_seen != alive.seen {
            alive.seen = now_seen;
            alive.last_progress = Instant::now();
            self.entry
                .last_seen
                .store(crate::unix_now(), std::sync::atomic::Ordering::Relaxed);
        } else if alive.last_progress.elapsed() >= self.shared.cfg.limits.dead_after {
            return Some("no answer to pings".into());
        }
        if let Err(e) = ws.send_ping(b"").await {
            return Some(format!("ping failed: {e}"));
        }
        None
    }

    /// Verifies a token for Listen on this channel's hybrid connection, with the keys as they
    /// are now, as of `now` (0: expiry not checked; the grace timer handles it).
    fn check_token(
        &self,
        token: &str,
        now: u64,
    ) -> Result<crate::auth::Grant, crate::error::RelayError> {
        listen_token_at(
            &self.shared,
            (&self.hc_key, &self.hc_name),
            &self.entry.host,
            token,
            now,
        )
    }

    /// Hands a response that came on this channel to the request waiting for it.
    fn deliver(&self, r: ResponseCommand, body: bytes::Bytes) {
        let id = r.request_id.clone();
        if !self.shared.http.deliver_from_control(
            self.entry.conn_id,
            &id,
            crate::http::Delivery::Whole(r, body),
        ) {
            debug!(hc = %self.hc_name, request_id = %id, "response for no waiting request ignored");
        }
    }

    /// Handles one text command; returns a close code and reason when the channel must end.
    fn on_text(&mut self, text: &str, expiry_at: &mut Instant) -> Option<(u16, &'static str)> {
        match ListenerCommand::parse(text) {
            Ok(ListenerCommand::RenewToken(r)) => match self.check_token(&r.token, unix_now()) {
                Ok(grant) => {
                    self.expiry = grant.expiry;
                    self.token = r.token;
                    *expiry_at = deadline_for(grant.expiry, self.shared.cfg.limits.token_grace);
                    debug!(hc = %self.hc_name, "token renewed");
                    None
                }
                Err(e) => {
                    warn!(event = "InvalidSasToken", hc = %self.hc_name, error = %e, "renewToken refused");
                    // The close names the cause ("The token is expired.", a wrong audience…).
                    let why = match e {
                        crate::error::RelayError::Unauthorized(m)
                        | crate::error::RelayError::Forbidden(m) => m,
                        _ => "The renewed token is invalid.",
                    };
                    Some((1008, why))
                }
            },
            Ok(other) => {
                debug!(hc = %self.hc_name, command = ?std::mem::discriminant(&other), "control command ignored");
                None
            }
            Err(e) => {
                use hyco_proto::control::ControlError;
                match e {
                    ControlError::TooLarge { .. } => Some((1009, "Control message too large.")),
                    ControlError::TooDeep => Some((1008, "Control message nested too deeply.")),
                    _ => {
                        debug!(hc = %self.hc_name, error = %e, "control message ignored");
                        None
                    }
                }
            }
        }
    }
}
