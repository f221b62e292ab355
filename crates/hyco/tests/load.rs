//! Load rows of the attack catalogue, against a real relay process: a flood of invalid
//! rendezvous dials (B5) and connect/disconnect churn (E5). The rates are what two shared
//! cores reach with a TLS handshake per dial, far below the catalogue's 100 000/s and
//! 1 000/s: the properties checked are the catalogue's (every answer right, memory and
//! descriptors back to where they were), and the figures are printed (`--nocapture`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{metric, relay, T};
use hyco_client::{connect_with, ConnectOptions, Connector};
use hyco_proto::ConnectionString;
use hyco_testkit::{echo_server, eventually, field};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The RSS of a process that must still run.
fn rss_kib(pid: u32) -> u64 {
    let kib = hyco_testkit::rss_kib(pid);
    assert!(kib > 0, "process {pid} is gone");
    kib
}

/// The open descriptors of a process that must still run.
fn fds(pid: u32) -> usize {
    let n = hyco_testkit::open_fds(pid);
    assert!(n > 0, "process {pid} is gone");
    n as usize
}

/// One tunnel: connect, one byte each way, close. The time it took.
async fn tunnel(cs: &ConnectionString, c: &Connector) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = tokio::time::timeout(T, connect_with(cs, c, &ConnectOptions::default()))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tokio::time::timeout(T, s.read_exact(&mut b))
        .await
        .map_err(|_| "echo timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let took = t.elapsed();
    let _ = s.shutdown().await;
    Ok(took)
}

/// `loops` tasks opening and closing tunnels for `secs`: (count, failures).
async fn churn(
    cs: &ConnectionString,
    c: &Connector,
    loops: usize,
    secs: u64,
) -> (u64, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..loops {
        let (cs, c) = (cs.clone(), c.clone());
        set.spawn(async move {
            let (mut n, mut failed) = (0u64, Vec::new());
            // Bounded: at most 100 000 tunnels per loop, and the deadline.
            for _ in 0..100_000 {
                if Instant::now() >= deadline {
                    break;
                }
                match tunnel(&cs, &c).await {
                    Ok(_) => n += 1,
                    Err(e) => failed.push(e),
                }
            }
            (n, failed)
        });
    }
    let (mut total, mut failures) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        let (n, f) = r.unwrap();
        total += n;
        failures.extend(f);
    }
    (total, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e5_churn_leaves_descriptors_and_memory_where_they_were() {
    let r = relay("load-churn").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("churn", &echo.to_string()).await;
    let m = r.manager("manager", &l);
    r.wait_listeners("churn", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    let c = r.connector();
    let (relay_pid, manager_pid) = (r.proc.pid().unwrap(), m.pid().unwrap());
    // Warm-up: allocator arenas and caches reach their working size.
    let (n, failed) = churn(&cs, &c, 8, 3).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(n > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = (
        fds(relay_pid),
        rss_kib(relay_pid),
        fds(manager_pid),
        rss_kib(manager_pid),
    );
    let started = Instant::now();
    let (n, failed) = churn(&cs, &c, 8, 15).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    assert!(
        failed.is_empty(),
        "{} failures: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Descriptors return to the baseline once the last tunnels are torn down.
    eventually("descriptors back to the baseline", T, || async {
        fds(relay_pid) <= base.0 && fds(manager_pid) <= base.2
    })
    .await;
    let after = (rss_kib(relay_pid), rss_kib(manager_pid));
    eprintln!(
        "E5: {n} tunnels opened and closed in 15 s ({rate:.0}/s, 8 at a time), 0 failed; relay fds {} → {}, RSS {} → {} KiB; manager fds {} → {}, RSS {} → {} KiB",
        base.0,
        fds(relay_pid),
        base.1,
        after.0,
        base.2,
        fds(manager_pid),
        base.3,
        after.1
    );
    // RSS back within 5 % of the baseline (plus one MiB of allocator slack on small heaps).
    assert!(
        after.0 <= base.1 + base.1 / 20 + 1024,
        "relay RSS grew: {} → {} KiB",
        base.1,
        after.0
    );
    assert!(
        after.1 <= base.3 + base.3 / 20 + 1024,
        "manager RSS grew: {} → {} KiB",
        base.3,
        after.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b5_a_flood_of_invalid_rendezvous_dials_gets_403_and_costs_nothing() {
    let r = relay("load-b5").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("svc", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("svc", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    let c = r.connector();
    let pid = r.proc.pid().unwrap();
    let port = r.port;
    let flood = |secs: u64, stop: Arc<AtomicBool>| {
        let c = c.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
            let count = Arc::new(AtomicU64::new(0));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..12 {
                let (c, statuses, count, stop) =
                    (c.clone(), statuses.clone(), count.clone(), stop.clone());
                set.spawn(async move {
                    for _ in 0..100_000 {
                        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // A made-up capability for the right hybrid connection.
                        let rv: [u8; 16] = rand::random();
                        let rv: String = rv.iter().map(|b| format!("{b:02x}")).collect();
                        let url = format!(
                            "wss://localhost:{port}/$hc/svc?sb-hc-action=accept&sb-hc-id=x&sb-hc-rv={rv}"
                        );
                        let status = match c.connect(&url, &[]).await {
                            Err(hyco_io::ws::ConnectError::Rejected { status, .. }) => {
                                status.to_string()
                            }
                            Ok(_) => "101".into(),
                            Err(e) => format!("error: {e}"),
                        };
                        *statuses.lock().unwrap().entry(status).or_insert(0u64) += 1;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while set.join_next().await.is_some() {}
            let st = statuses.lock().unwrap().clone();
            (count.load(Ordering::Relaxed), st)
        }
    };
    // Warm-up, then the baseline.
    let (_, st) = flood(2, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(st.keys().collect::<Vec<_>>(), vec!["403"], "{st:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_kib(pid);
    // The flood, with legitimate tunnels opening alongside it.
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = tokio::spawn(flood(10, stop.clone()));
    let mut legit = Vec::new();
    for _ in 0..40 {
        legit.push(
            tunnel(&cs, &c)
                .await
                .expect("a legitimate tunnel failed during the flood"),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (n, st) = flooding.await.unwrap();
    let after = rss_kib(pid);
    legit.sort();
    eprintln!(
        "B5: {n} invalid dials ({:.0}/s, 12 at a time): {st:?}; relay RSS {base} → {after} KiB; 40 legitimate tunnels alongside: p50 {:?}, max {:?}",
        n as f64 / 8.0,
        legit[20],
        legit[39]
    );
    assert_eq!(st.keys().collect::<Vec<_>>(), vec!["403"], "{st:?}");
    assert!(after < base + 10 * 1024, "RSS grew {} KiB", after - base);
}

/// Idle tunnels hold no 64 KiB I/O buffers in the relay or the manager: a buffer is taken when
/// bytes move and given back when a read would wait. That is what keeps ten thousand held
/// tunnels small (docs/BENCHMARKS.md). The gauges are read from both processes' `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_hold_no_io_buffers() {
    let dir = hyco_testkit::TempDir::new("load-buffers");
    let r = common::Relay::start_with(dir, 0, &["--status-listen", "127.0.0.1:0"]).await;
    let rstatus = field(
        &r.proc
            .wait_line("status page and metrics listening", T)
            .await,
        "status",
    )
    .unwrap();
    let echo = echo_server().await;
    let (l, s) = r.hc("buf", &echo.to_string()).await;
    let m = r.manager_with("manager", &l, &["--status-listen", "127.0.0.1:0"], &[]);
    let mstatus = field(
        &m.wait_line("status page and metrics listening", T).await,
        "status",
    )
    .unwrap();
    r.wait_listeners("buf", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    let c = r.connector();
    let held = || async {
        (
            metric(&rstatus, "hyco_io_buffers_held").await,
            metric(&mstatus, "hyco_manager_io_buffers_held").await,
        )
    };

    // 24 tunnels each move 512 KiB both ways, then stay open.
    let block: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut tunnels = Vec::new();
    for _ in 0..24 {
        let s = tokio::time::timeout(T, connect_with(&cs, &c, &ConnectOptions::default()))
            .await
            .unwrap()
            .unwrap();
        let (mut rd, mut wr) = tokio::io::split(s);
        let b = block.clone();
        let w = tokio::spawn(async move {
            wr.write_all(&b).await.unwrap();
            wr
        });
        let mut got = vec![0u8; block.len()];
        tokio::time::timeout(T, rd.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == block, "echo intact");
        tunnels.push((rd, w.await.unwrap()));
    }
    eventually("no buffers held by 24 idle tunnels", T, || async {
        held().await == (0, 0)
    })
    .await;

    // A tunnel whose reader stopped holds buffers where bytes wait (the gauges are live).
    let (rd, wr) = &mut tunnels[0];
    let big = vec![7u8; 8 << 20];
    let writer = async {
        wr.write_all(&big).await.unwrap();
    };
    let watcher = async {
        eventually("buffers held while bytes wait", T, || async {
            let (a, b) = held().await;
            a + b > 0
        })
        .await;
        let mut got = vec![0u8; big.len()];
        tokio::time::timeout(T, rd.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.iter().all(|&x| x == 7));
    };
    tokio::join!(writer, watcher);
    eventually("buffers back once the bytes moved", T, || async {
        held().await == (0, 0)
    })
    .await;

    // Every idle tunnel still works.
    for (rd, wr) in &mut tunnels {
        wr.write_all(b"?").await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(T, rd.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"?");
    }
}
