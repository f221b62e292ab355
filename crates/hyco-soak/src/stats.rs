//! What the run counts: transfers by outcome, failures by cause, bytes, timings, kill events.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::client::{Failure, Plan};
use crate::wire::Mode;

/// Locks, ignoring poisoning (a panicked client task must not take the report down with it).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Failure causes, in report order. The first three are integrity failures and must stay 0.
pub const CAUSES: [&str; 10] = [
    "hash_mismatch",
    "truncated_clean_eof",
    "extra_data",
    "client_abort",
    "manager_killed",
    "forwarder_killed",
    "connect_refused",
    "timeout",
    "reset_other",
    "other",
];

/// Causes that mean data was wrong or silently cut.
pub const INTEGRITY: [&str; 3] = ["hash_mismatch", "truncated_clean_eof", "extra_data"];

/// A SIGKILL the run sent.
#[derive(Clone, Debug)]
pub struct KillEvent {
    pub role: String,
    pub pid: u32,
    pub at: Instant,
    /// When the killed process was reaped (gone for sure).
    pub dead: Option<Instant>,
    /// When the restarted process was ready again.
    pub ready: Option<Instant>,
    /// Transfers this kill failed (those counted as `manager_killed` / `forwarder_killed`).
    pub failures: u64,
    /// Of those, how many had been in flight over [`STALLED`] when the kill came.
    pub stalled: u64,
}

/// Transfers take under 2 s here; one in flight for longer than this when a kill ended it was
/// stuck before (the kill freed it, it did not cause it).
pub const STALLED: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct ModeTally {
    ok: u64,
    failed: u64,
    ok_bytes_up: u64,
    ok_bytes_down: u64,
    secs: Vec<f32>,
}

#[derive(Default)]
struct Inner {
    started: u64,
    ok: u64,
    failed: u64,
    modes: BTreeMap<Mode, ModeTally>,
    causes: BTreeMap<&'static str, u64>,
    details: BTreeMap<String, u64>,
    /// Transfers started while a manager was down: ok, and failures by cause.
    outage_ok: u64,
    outage_failed: BTreeMap<&'static str, u64>,
    /// Cause of every failed transfer, by id (to match the endpoint's anomalies).
    failed_ids: HashMap<u64, &'static str>,
    /// The first integrity failures in full.
    integrity: Vec<Value>,
    /// The first failures no fault explains (timeouts, resets without a kill, other), to find
    /// them in the process logs.
    unexplained: Vec<Value>,
    timeouts_with_kill: u64,
}

/// Shared counters of the run.
pub struct Stats {
    pub t0: Instant,
    inner: Mutex<Inner>,
    kills: Mutex<Vec<KillEvent>>,
    /// Managers down now (killed and not ready again).
    pub managers_down: AtomicU64,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            t0: Instant::now(),
            inner: Mutex::new(Inner::default()),
            kills: Mutex::new(Vec::new()),
            managers_down: AtomicU64::new(0),
        }
    }

    /// Records a kill about to be sent; returns its index.
    pub fn kill(&self, role: &str, pid: u32) -> usize {
        let mut k = lock(&self.kills);
        k.push(KillEvent {
            role: role.into(),
            pid,
            at: Instant::now(),
            dead: None,
            ready: None,
            failures: 0,
            stalled: 0,
        });
        k.len() - 1
    }

    /// Counts a failure caused by the kill that overlapped `start..=end`.
    fn count_kill_failure(&self, start: Instant, end: Instant) {
        let mut kills = lock(&self.kills);
        if let Some(k) = kills
            .iter_mut()
            .rev()
            .find(|k| k.at <= end && k.dead.unwrap_or(k.at) >= start)
        {
            k.failures += 1;
            if k.at.saturating_duration_since(start) > STALLED {
                k.stalled += 1;
            }
        }
    }

    /// Whether a kill inside `start..=end` came more than [`STALLED`] after `start`.
    fn stalled_before(&self, start: Instant, end: Instant) -> bool {
        lock(&self.kills)
            .iter()
            .rev()
            .find(|k| k.at <= end && k.dead.unwrap_or(k.at) >= start)
            .is_some_and(|k| k.at.saturating_duration_since(start) > STALLED)
    }

    /// The killed process is gone.
    pub fn dead(&self, idx: usize) {
        if let Some(k) = lock(&self.kills).get_mut(idx) {
            k.dead = Some(Instant::now());
        }
    }

    /// The killed process's replacement is ready.
    pub fn ready_again(&self, idx: usize) {
        if let Some(k) = lock(&self.kills).get_mut(idx) {
            k.ready = Some(Instant::now());
        }
    }

    pub fn kills(&self) -> Vec<KillEvent> {
        lock(&self.kills).clone()
    }

    /// Counts a transfer as started.
    pub fn started(&self) {
        lock(&self.inner).started += 1;
    }

    /// Records the outcome of one transfer and returns its cause when it failed.
    pub fn record(
        &self,
        plan: &Plan,
        start: Instant,
        end: Instant,
        during_outage: bool,
        client_port: u64,
        r: &Result<(), Failure>,
    ) -> Option<&'static str> {
        let h = plan.header;
        let mut inner = lock(&self.inner);
        let secs = (end - start).as_secs_f32();
        match r {
            Ok(()) => {
                inner.ok += 1;
                if during_outage {
                    inner.outage_ok += 1;
                }
                let m = inner.modes.entry(h.mode).or_default();
                m.ok += 1;
                m.secs.push(secs);
                let (up, down) = match h.mode {
                    Mode::Echo => (h.size, h.size),
                    Mode::Download => (0, h.size),
                    Mode::Upload | Mode::Sink => (h.size, 0),
                };
                m.ok_bytes_up += up;
                m.ok_bytes_down += down;
                None
            }
            Err(f) => {
                inner.failed += 1;
                inner.modes.entry(h.mode).or_default().failed += 1;
                // The kill that was in flight, if any (the latest one that overlaps the
                // transfer: signalled before it ended, reaped after it started).
                let kill = {
                    let mut kills = lock(&self.kills);
                    let k = kills
                        .iter_mut()
                        .rev()
                        .find(|k| k.at <= end && k.dead.unwrap_or(k.at) >= start);
                    k.map(|k| k.role.clone())
                };
                let stalled = kill.is_some() && self.stalled_before(start, end);
                let killed = |detail: String| -> (&'static str, String) {
                    let detail = if stalled {
                        format!("{detail}, after a stall (in flight over 10 s at the kill)")
                    } else {
                        detail
                    };
                    match &kill {
                        Some(r) if r.starts_with("manager") => ("manager_killed", detail),
                        Some(_) => ("forwarder_killed", detail),
                        None => ("reset_other", detail),
                    }
                };
                let (cause, detail) = match f {
                    Failure::Aborted => ("client_abort", String::new()),
                    Failure::Connect(std::io::ErrorKind::ConnectionRefused) => {
                        ("connect_refused", String::new())
                    }
                    Failure::Connect(k) => ("other", format!("connect {k:?}")),
                    Failure::HashMismatch { .. } => ("hash_mismatch", String::new()),
                    Failure::Extra { .. } => ("extra_data", String::new()),
                    Failure::Timeout { phase } => {
                        if kill.is_some() {
                            inner.timeouts_with_kill += 1;
                        }
                        (
                            "timeout",
                            format!(
                                "{}{} in {phase}",
                                h.mode.name(),
                                if h.late_close { " (late close)" } else { "" }
                            ),
                        )
                    }
                    Failure::Io { kind, phase } => killed(format!("{phase} {kind:?}")),
                    Failure::EndpointReset { .. } => killed("endpoint input reset".into()),
                    Failure::ShortCleanEof { .. } if kill.is_some() => {
                        killed("short, then clean end of stream".into())
                    }
                    Failure::EndpointShort { .. } if kill.is_some() => {
                        killed("endpoint got short input, clean end".into())
                    }
                    Failure::ShortCleanEof { .. } => ("truncated_clean_eof", String::new()),
                    Failure::EndpointShort { .. } => {
                        ("truncated_clean_eof", "endpoint side".into())
                    }
                };
                if matches!(cause, "manager_killed" | "forwarder_killed") {
                    self.count_kill_failure(start, end);
                }
                *inner.causes.entry(cause).or_default() += 1;
                if during_outage {
                    *inner.outage_failed.entry(cause).or_default() += 1;
                }
                if !detail.is_empty() {
                    *inner
                        .details
                        .entry(format!("{cause}: {detail}"))
                        .or_default() += 1;
                }
                inner.failed_ids.insert(h.id, cause);
                let unexplained = matches!(cause, "timeout" | "reset_other" | "other");
                if (INTEGRITY.contains(&cause) && inner.integrity.len() < 100)
                    || (unexplained && inner.unexplained.len() < 200)
                {
                    let ended_unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    let v = json!({
                        "cause": cause, "client_port": client_port, "ended_unix_secs": ended_unix,
                        "id": h.id, "mode": h.mode.name(), "size": h.size, "seed": h.seed,
                        "late_close": h.late_close, "failure": f.to_string(),
                        "start_secs": (start - self.t0).as_secs_f64(),
                        "end_secs": (end - self.t0).as_secs_f64(),
                        "kill_in_flight": kill,
                    });
                    if unexplained {
                        inner.unexplained.push(v);
                    } else {
                        inner.integrity.push(v);
                    }
                }
                Some(cause)
            }
        }
    }

    /// The cause recorded for a failed transfer.
    pub fn cause_of(&self, id: u64) -> Option<&'static str> {
        lock(&self.inner).failed_ids.get(&id).copied()
    }

    /// (ok, failed, started).
    pub fn counts(&self) -> (u64, u64, u64) {
        let i = lock(&self.inner);
        (i.ok, i.failed, i.started)
    }

    /// Failures by cause, non-zero ones.
    pub fn causes(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.inner).causes.clone()
    }

    pub fn integrity_failures(&self) -> u64 {
        let i = lock(&self.inner);
        INTEGRITY
            .iter()
            .map(|c| i.causes.get(c).copied().unwrap_or(0))
            .sum()
    }

    /// The JSON summary of transfers.
    pub fn json(&self) -> Value {
        let i = lock(&self.inner);
        let mut modes = serde_json::Map::new();
        for (m, t) in &i.modes {
            let mut s = t.secs.clone();
            s.sort_by(f32::total_cmp);
            let pct = |p: f64| -> f64 {
                if s.is_empty() {
                    return 0.0;
                }
                let v = s[((s.len() - 1) as f64 * p).round() as usize];
                (f64::from(v) * 1000.0).round() / 1000.0
            };
            modes.insert(
                m.name().into(),
                json!({
                    "ok": t.ok, "failed": t.failed,
                    "ok_bytes_client_to_endpoint": t.ok_bytes_up,
                    "ok_bytes_endpoint_to_client": t.ok_bytes_down,
                    "secs_p50": pct(0.5), "secs_p99": pct(0.99), "secs_max": pct(1.0),
                }),
            );
        }
        let causes: serde_json::Map<String, Value> = CAUSES
            .iter()
            .map(|c| {
                (
                    (*c).to_owned(),
                    json!(i.causes.get(c).copied().unwrap_or(0)),
                )
            })
            .collect();
        json!({
            "started": i.started,
            "ok": i.ok,
            "failed": i.failed,
            "by_mode": modes,
            "failures_by_cause": causes,
            "failure_details": i.details,
            "integrity_failures": INTEGRITY.iter().map(|c| i.causes.get(c).copied().unwrap_or(0)).sum::<u64>(),
            "integrity_failure_samples": i.integrity,
            "unexplained_failure_samples": i.unexplained,
            "timeouts_with_a_kill_in_flight": i.timeouts_with_kill,
            "started_while_a_manager_was_down": {
                "ok": i.outage_ok,
                "failed": i.outage_failed.values().sum::<u64>(),
                "failed_by_cause": i.outage_failed,
            },
        })
    }
}
