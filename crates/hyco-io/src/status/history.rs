//! The recent past of a status page: a bounded ring of samples of the process's snapshot (open
//! tunnels, bytes carried, failures by reason, per hybrid connection), so that a page opened
//! after an incident still shows it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(5);
/// Samples kept: one hour.
pub const KEEP: usize = 720;
/// Hybrid connections kept per sample (the first by name); the total row covers all of them.
pub const MAX_HCS: usize = 50;
/// Failure reasons kept per hybrid connection and sample.
const MAX_REASONS: usize = 8;

struct HcSample {
    name: Arc<str>,
    tunnels: u64,
    bytes: u64,
    failures: Vec<(Arc<str>, u64)>,
}

struct Sample {
    time: u64,
    hcs: Vec<HcSample>,
}

/// The ring of samples; at most [`KEEP`] × ([`MAX_HCS`] + 1) rows whatever the input.
#[derive(Default)]
pub struct History {
    ring: Mutex<VecDeque<Sample>>,
}

/// The name from the last sample when it is the same, so that a long history of the same names
/// holds one copy of each.
fn intern(prev: Option<&Sample>, name: &str) -> Arc<str> {
    prev.and_then(|p| p.hcs.iter().find(|h| &*h.name == name))
        .map(|h| Arc::clone(&h.name))
        .unwrap_or_else(|| Arc::from(name))
}

fn count(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_i64().map(|n| n.max(0).unsigned_abs()))
        .unwrap_or(0)
}

impl History {
    /// Records a sample from a snapshot document (`{"time", "hybridConnections": [{"name",
    /// "activeConnections", "bytes", "failures": {reason: count}}]}`); a document of another
    /// shape records an empty sample.
    pub fn record(&self, snapshot: &str) {
        let doc: Value = serde_json::from_str(snapshot).unwrap_or(Value::Null);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let prev = ring.back();
        let mut hcs: Vec<&Value> = doc["hybridConnections"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        hcs.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut total = HcSample {
            name: intern(prev, ""),
            tunnels: 0,
            bytes: 0,
            failures: Vec::new(),
        };
        let mut rows = Vec::new();
        for hc in &hcs {
            let Some(name) = hc["name"].as_str() else {
                continue;
            };
            let mut failures: Vec<(Arc<str>, u64)> = Vec::new();
            for (reason, n) in hc["failures"].as_object().into_iter().flatten() {
                let n = count(n);
                let full = total.failures.len() >= MAX_REASONS;
                match total.failures.iter_mut().find(|(r, _)| &**r == reason) {
                    Some((_, t)) => *t = t.saturating_add(n),
                    None if !full => total.failures.push((Arc::from(reason.as_str()), n)),
                    None => {}
                }
                if failures.len() < MAX_REASONS {
                    failures.push((Arc::from(reason.as_str()), n));
                }
            }
            let row = HcSample {
                name: intern(prev, name),
                tunnels: count(&hc["activeConnections"]),
                bytes: count(&hc["bytes"]),
                failures,
            };
            total.tunnels = total.tunnels.saturating_add(row.tunnels);
            total.bytes = total.bytes.saturating_add(row.bytes);
            if rows.len() < MAX_HCS {
                rows.push(row);
            }
        }
        rows.push(total);
        let time = count(&doc["time"]);
        if ring.len() >= KEEP {
            ring.pop_front();
        }
        ring.push_back(Sample { time, hcs: rows });
    }

    /// `{"every": seconds, "samples": [{"time", "hybridConnections": {name: {"tunnels",
    /// "bytes", "failures": {reason: count}}}}]}`, oldest first; the name `""` is the total.
    pub fn to_json(&self) -> String {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let samples: Vec<Value> = ring
            .iter()
            .map(|s| {
                let hcs: Map<String, Value> = s
                    .hcs
                    .iter()
                    .map(|h| {
                        let failures: Map<String, Value> = h
                            .failures
                            .iter()
                            .map(|(r, n)| (r.to_string(), json!(n)))
                            .collect();
                        (
                            h.name.to_string(),
                            json!({"tunnels": h.tunnels, "bytes": h.bytes, "failures": failures}),
                        )
                    })
                    .collect();
                json!({"time": s.time, "hybridConnections": hcs})
            })
            .collect();
        json!({"every": EVERY.as_secs(), "samples": samples}).to_string()
    }

    /// Samples held now.
    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no sample was taken yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(t: u64, n: usize) -> String {
        let hcs: Vec<Value> = (0..n)
            .map(|i| {
                json!({"name": format!("hc{i:03}"), "activeConnections": 1, "bytes": t * 10,
                "failures": {"refused (4xx)": i, "failed (5xx)": -3}})
            })
            .collect();
        json!({"time": t, "hybridConnections": hcs}).to_string()
    }

    #[test]
    fn bounded_in_time_and_width() {
        let h = History::default();
        for t in 0..(KEEP as u64 + 10) {
            h.record(&doc(t, MAX_HCS + 20));
        }
        assert_eq!(h.len(), KEEP);
        let v: Value = serde_json::from_str(&h.to_json()).unwrap();
        let s = v["samples"].as_array().unwrap();
        assert_eq!(s[0]["time"], 10, "the oldest samples go first");
        let last = s.last().unwrap()["hybridConnections"].as_object().unwrap();
        assert_eq!(last.len(), MAX_HCS + 1);
        // The total covers every hybrid connection, kept or not.
        assert_eq!(last[""]["tunnels"], (MAX_HCS + 20) as u64);
        assert_eq!(
            last[""]["failures"]["refused (4xx)"],
            (0..(MAX_HCS as u64 + 20)).sum::<u64>()
        );
        assert_eq!(
            last["hc000"]["failures"]["failed (5xx)"], 0,
            "negative counts are 0"
        );
        // Names are shared between samples, not copied.
        let ring = h.ring.lock().unwrap();
        assert!(Arc::ptr_eq(
            &ring[0].hcs[0].name,
            &ring[KEEP - 1].hcs[0].name
        ));
    }

    #[test]
    fn hostile_documents_record_empty_samples() {
        let h = History::default();
        for d in [
            "",
            "[]",
            r#"{"hybridConnections": 7}"#,
            r#"{"hybridConnections": [{"bytes": 1}]}"#,
        ] {
            h.record(d);
        }
        assert_eq!(h.len(), 4);
        let v: Value = serde_json::from_str(&h.to_json()).unwrap();
        for s in v["samples"].as_array().unwrap() {
            assert_eq!(s["hybridConnections"][""]["bytes"], 0);
        }
    }
}
