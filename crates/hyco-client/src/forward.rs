//! `hyco forward`: local TCP ports, each carried to a hybrid connection.

use std::sync::Arc;
use std::time::Duration;

use hyco_io::tunnels::TunnelGate;
use hyco_io::ws::Connector;
use hyco_io::{CancellationToken, TaskTracker};
use hyco_proto::ConnectionString;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{connect_with, pump, ClientError, ConnectOptions};

/// One local port and the hybrid connection it leads to.
pub struct ForwardRule {
    /// The bound local socket.
    pub listener: TcpListener,
    /// Connection string with EntityPath and a Send key.
    pub cs: ConnectionString,
}

/// Runs every rule until `shutdown`, then waits up to the default drain grace
/// ([`hyco_io::tunnels::DRAIN_GRACE_SECS`]) for open tunnels. At most the default tunnel limit
/// for this process's descriptor limit is open at once.
pub async fn run_forward(
    rules: Vec<ForwardRule>,
    connector: Connector,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let gate = TunnelGate::new("forwarder", hyco_io::tunnels::max_tunnels(None));
    let grace = Duration::from_secs(hyco_io::tunnels::DRAIN_GRACE_SECS);
    run_forward_limited(rules, connector, gate, grace, shutdown).await
}

/// [`run_forward`] with the tunnel limit `gate`, shared by every rule (past it, a local
/// connection is closed at once, and the gate logs that once, instead of waiting for
/// descriptors that are not there), and `grace` for open tunnels after `shutdown`.
pub async fn run_forward_limited(
    rules: Vec<ForwardRule>,
    connector: Connector,
    gate: Arc<TunnelGate>,
    grace: Duration,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let tracker = TaskTracker::new();
    for rule in rules {
        tracker.spawn(accept_loop(
            rule,
            connector.clone(),
            Arc::clone(&gate),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    shutdown.cancelled().await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            grace_secs = grace.as_secs(),
            "drain grace over; cutting remaining tunnels"
        );
    }
    Ok(())
}

/// The relay's refusal behind a stream error (early data: the 101 comes after the connect).
fn refusal(e: &std::io::Error) -> Option<ClientError> {
    let c = e.get_ref()?.downcast_ref::<hyco_io::ws::ConnectError>()?;
    match c {
        hyco_io::ws::ConnectError::Rejected { status, reason, .. } => Some(ClientError::Rejected {
            status: *status,
            reason: reason.clone(),
        }),
        _ => None,
    }
}

async fn accept_loop(
    rule: ForwardRule,
    connector: Connector,
    gate: Arc<TunnelGate>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let hc = rule.cs.entity_path.clone().unwrap_or_default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let (mut tcp, peer) = tokio::select! {
            r = rule.listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(100); x }
                Err(e) => {
                    warn!(hc = %hc, error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(permit) = gate.try_acquire() else {
            // At the limit: a reset now, not a connection that waits for nothing.
            let _ = tcp.set_zero_linger();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let cs = rule.cs.clone();
        let connector = connector.clone();
        let hc = hc.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            // Early data: the app's first bytes go out behind the upgrade request; a refusal
            // comes back as the pump's error, and resets the app's connection all the same.
            let opts = ConnectOptions { early_data: true, ..ConnectOptions::default() };
            let mut ws = match connect_with(&cs, &connector, &opts).await {
                Ok(ws) => ws,
                Err(e) => {
                    warn!(role = "sender", hc = %hc, peer = %peer, error = %e, "tunnel not opened");
                    let _ = tcp.set_zero_linger();
                    return;
                }
            };
            let r = pump(&mut tcp, &mut ws).await;
            let (up, down, outcome) = match r {
                Ok((u, d)) => {
                    // A normal end keeps the relay connection for the next tunnel (`reuse`).
                    ws.recycle();
                    (u, d, "closed".to_owned())
                }
                Err(e) => match refusal(&e) {
                    // Refused after early data: said as a connect refusal would have been.
                    Some(refused) => {
                        warn!(role = "sender", hc = %hc, peer = %peer, error = %refused, "tunnel not opened");
                        return;
                    }
                    None => (0, 0, format!("aborted: {e}")),
                },
            };
            info!(role = "sender", hc = %hc, peer = %peer, bytes_out = up, bytes_in = down,
                duration_ms = started.elapsed().as_millis() as u64, outcome = %outcome, "tunnel closed");
        });
    }
}
