//! The relay's live view: one JSON document the status page and `/api/status` show.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::metrics::Hc;
use crate::Shared;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Publishes a listener event (`NewListenerRegistered`, `ListenerUnregistered`).
pub(crate) fn listener_event(
    shared: &Shared,
    event: &str,
    hc: &str,
    listener_id: &str,
    address: &str,
    reason: Option<&str>,
) {
    let e = json!({
        "event": event,
        "hybridConnection": hc,
        "listenerId": listener_id,
        "address": address,
        "reason": reason,
        "time": unix(SystemTime::now()),
    });
    // No subscriber is fine: nobody wants the event right now.
    let _ = shared.events.send(e.to_string());
}

/// The snapshot: every hybrid connection with its endpoint, listeners, open tunnels and bytes.
pub(crate) fn snapshot(shared: &Shared) -> String {
    let ns = shared.store.snapshot();
    let tunnels: Vec<_> = crate::lock(&shared.tunnels).values().cloned().collect();
    let mut hcs = Vec::new();
    for (key, hc) in &ns.hcs {
        let label = Hc::new(Some(key));
        let listeners: Vec<_> = shared
            .registry
            .list(key)
            .iter()
            .map(|l| {
                let silent = unix(SystemTime::now())
                    .saturating_sub(l.last_seen.load(Ordering::Relaxed));
                // Pings go out every ping interval; two missed answers is worth showing.
                let health = if silent <= 2 * shared.cfg.limits.ping_interval.as_secs() {
                    "healthy".to_owned()
                } else {
                    format!("silent for {silent} s")
                };
                json!({"id": l.listener_id, "address": l.remote.to_string(), "since": unix(l.since), "health": health})
            })
            .collect();
        let live: Vec<_> = tunnels.iter().filter(|t| &t.hc_key == key).collect();
        let live_bytes: u64 = live
            .iter()
            .map(|t| {
                t.counters.a_to_b.load(Ordering::Relaxed)
                    + t.counters.b_to_a.load(Ordering::Relaxed)
            })
            .sum();
        let endpoint = hc
            .user_metadata
            .as_deref()
            .and_then(|m| hyco_proto::entity::parse_endpoint_metadata(m).ok())
            .map(|hp| hp.to_string());
        let state = if listeners.is_empty() {
            "No listener"
        } else {
            "Connected"
        };
        hcs.push(json!({
            "name": hc.name,
            "endpoint": endpoint,
            "state": state,
            "detail": if hc.requires_client_authorization { "senders need a Send token" } else { "anonymous senders allowed" },
            "listeners": listeners,
            "activeConnections": live.len(),
            "connections": shared.metrics.sender_success.get_or_create(&label).get(),
            "bytes": shared.metrics.bytes_transferred.get_or_create(&label).get() + live_bytes,
            // Failures by reason, as counted for /metrics (the page charts them per minute).
            "failures": {
                "senders refused (4xx)": shared.metrics.sender_client_error.get_or_create(&label).get(),
                "senders failed (5xx)": shared.metrics.sender_server_error.get_or_create(&label).get(),
                "listeners refused (4xx)": shared.metrics.listener_client_error.get_or_create(&label).get(),
                "listeners failed (5xx)": shared.metrics.listener_server_error.get_or_create(&label).get(),
            },
        }));
    }
    json!({
        "role": "relay",
        "title": format!("hyco relay · {}", shared.cfg.public_host),
        "time": unix(SystemTime::now()),
        "hybridConnections": hcs,
        "cluster": shared.cluster.as_ref().map(|c| c.status()),
    })
    .to_string()
}
