//! Recovery after a crash is quick every time (issue 15 §8). Under load (client loops pushing
//! SHA-checked payloads through forwarder → relay → manager → echo), the relay is SIGKILLed and
//! restarted on the same port 20 times and the manager 20 times. Every restart must recover
//! and no completed transfer may differ from what was sent; the time from each restart to the
//! next successful tunnel is printed (the worst one is the figure the issue asks for), and only
//! a generous sanity bound is asserted: timing is not a test on a shared machine.
//!
//! Before the fix the worst recovery was 2–6 s: the listener's backoff had grown to several
//! seconds while the relay was down (0, 0.5, 1, 2, 4 s…), and so had the manager's endpoint
//! resolution after its own restart.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Relay, T};
use hyco_testkit::{echo_server, TempDir};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const RESTARTS: usize = 20;
const LOOPS: usize = 4;
const PAYLOAD: usize = 32 * 1024;
/// Only a sanity bound: a restart that does not recover within this is a failure.
const SANITY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Tally {
    /// (start, end) of every transfer that came back whole and equal.
    ok: Mutex<Vec<(Instant, Instant)>>,
    failed: AtomicU64,
    corrupt: AtomicU64,
}

enum Outcome {
    Ok,
    Failed,
    Corrupt,
}

/// One transfer through the forwarder: `PAYLOAD` random bytes out, the echo back.
async fn transfer(port: u16) -> Outcome {
    let Ok(Ok(s)) = tokio::time::timeout(T, TcpStream::connect(("127.0.0.1", port))).await else {
        return Outcome::Failed;
    };
    let (mut r, mut w) = s.into_split();
    let mut data = vec![0u8; PAYLOAD];
    rand::thread_rng().fill_bytes(&mut data);
    let sent = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        let ok = w.write_all(&data).await.is_ok();
        let _ = w.shutdown().await;
        ok
    });
    let mut got = Vec::with_capacity(PAYLOAD);
    let read = tokio::time::timeout(T, r.read_to_end(&mut got)).await;
    let wrote = writer.await.unwrap_or(false);
    match read {
        Ok(Ok(_)) if got.len() == PAYLOAD && wrote => {
            if Sha256::digest(&got) == sent {
                Outcome::Ok
            } else {
                Outcome::Corrupt
            }
        }
        // More than was sent, or bytes that are not a prefix of it: corruption, not a cut.
        Ok(Ok(_)) if got.len() > PAYLOAD => Outcome::Corrupt,
        _ => Outcome::Failed,
    }
}

/// Time from `t0` to the end of the first good transfer that started after it. Returns once
/// `LOOPS` transfers have succeeded since `t0`, so that every restart hits a loaded system.
async fn recovery_after(tally: &Tally, t0: Instant, what: &str) -> Duration {
    let deadline = t0 + SANITY;
    loop {
        let (first, n) = {
            let g = tally.ok.lock().unwrap();
            let after = g.iter().filter(|(start, _)| *start >= t0);
            (after.clone().map(|(_, end)| *end).min(), after.count())
        };
        if let (Some(end), true) = (first, n >= LOOPS) {
            return end - t0;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no successful tunnel within {SANITY:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn summary(name: &str, v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let worst = s.last().copied().unwrap_or_default();
    eprintln!(
        "{name}: {} restarts; recovery median {:?}, worst {worst:?}; all: {:?}",
        s.len(),
        s[s.len() / 2],
        v
    );
    worst
}

/// A manager for `l` that trusts the CA in the relay's data folder `dir` (the relay itself may
/// be down).
fn dir_manager(dir: &TempDir, l: &str) -> hyco_testkit::Proc {
    let ca = dir.0.join("data/ca.pem");
    hyco_testkit::Proc::spawn(
        "manager",
        &common::bin(),
        &[
            "manager",
            "run",
            "--connection-string",
            l,
            "--ca-file",
            ca.to_str().unwrap(),
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_restart_of_relay_or_manager_recovers_quickly_without_corruption() {
    let mut r = Relay::start(TempDir::new("recovery"), 0).await;
    let port = r.port;
    let echo = echo_server().await;
    let (l, s) = r.hc("chaos", &echo.to_string()).await;
    let mut m = r.manager("manager", &l);
    r.wait_listeners("chaos", 1).await;
    let (_f, fport) = r.forward("chaos", &s).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..LOOPS {
        let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                match transfer(fport).await {
                    Outcome::Ok => tally.ok.lock().unwrap().push((start, Instant::now())),
                    Outcome::Failed => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        // Paces the retries while the system is down.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Outcome::Corrupt => {
                        tally.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    recovery_after(&tally, Instant::now(), "first tunnel").await;

    let (mut relay_times, mut manager_times) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..RESTARTS {
        // The relay: SIGKILL, and a new process on the same port and data folder.
        r.proc.kill().await;
        let Relay { dir, .. } = r;
        let t0 = Instant::now();
        r = Relay::start(dir, port).await;
        assert_eq!(r.port, port, "the relay came back on another port");
        relay_times.push(recovery_after(&tally, t0, &format!("relay restart {i}")).await);

        // The manager: SIGKILL, and a new one.
        m.kill().await;
        let t0 = Instant::now();
        m = r.manager("manager", &l);
        manager_times.push(recovery_after(&tally, t0, &format!("manager restart {i}")).await);
    }
    // Both down, the manager restarted first: it retries its endpoint read while the relay is
    // away (the case that took 6 s), and the relay comes back a moment later.
    let mut both_times = Vec::new();
    for i in 0..5 {
        r.proc.kill().await;
        m.kill().await;
        let Relay { dir, .. } = r;
        m = dir_manager(&dir, &l);
        // Three failed reads: the manager's retries are under way.
        hyco_testkit::eventually("the manager retries its endpoint", T, || async {
            m.count("cannot resolve the endpoint") >= 3
        })
        .await;
        let t0 = Instant::now();
        r = Relay::start(dir, port).await;
        both_times.push(recovery_after(&tally, t0, &format!("both down {i}")).await);
    }
    // Down for a few seconds (a slow start, a host reboot): by then the old backoff had grown
    // to 2–4 s between attempts, and recovery took as long.
    let mut long_times = Vec::new();
    for i in 0..3 {
        r.proc.kill().await;
        let Relay { dir, .. } = r;
        // The outage itself, not a wait for readiness.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t0 = Instant::now();
        r = Relay::start(dir, port).await;
        long_times.push(recovery_after(&tally, t0, &format!("3 s outage {i}")).await);
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        tokio::time::timeout(SANITY, l).await.unwrap().unwrap();
    }
    let ok = tally.ok.lock().unwrap().len();
    let (failed, corrupt) = (
        tally.failed.load(Ordering::Relaxed),
        tally.corrupt.load(Ordering::Relaxed),
    );
    eprintln!(
        "{} restarts in {:?}: {ok} transfers verified, {failed} failed during restarts, {corrupt} corrupted",
        relay_times.len() + manager_times.len() + both_times.len() + long_times.len(),
        started.elapsed()
    );
    let worst_relay = summary("relay", &relay_times);
    let worst_manager = summary("manager", &manager_times);
    let worst_both = summary("manager restarted while the relay was down", &both_times);
    let worst_long = summary("relay down 3 s", &long_times);
    eprintln!(
        "worst recovery: {:?}",
        worst_relay
            .max(worst_manager)
            .max(worst_both)
            .max(worst_long)
    );
    assert_eq!(corrupt, 0, "a transfer came back different");
    assert!(ok > 4 * RESTARTS, "load ran: {ok} transfers");
}
