//! What operators live through: a manager killed while short connections keep coming (two
//! managers, high availability), and the relay gone for 20 s. Each test prints the figures it
//! measured (run with `--nocapture` to see them).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{relay, Relay};
use hyco_testkit::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One short connection through the forwarder: 64 bytes out, the same 64 back.
async fn short_connection(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(&[9u8; 64]).await?;
        let mut buf = [0u8; 64];
        s.read_exact(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf == [9u8; 64])
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), attempt).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_managers_killing_one_fails_only_connections_in_flight() {
    let r = relay("ha-kill").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("ha", &echo.to_string()).await;
    let mut m1 = r.manager("manager-1", &l);
    let _m2 = r.manager("manager-2", &l);
    r.wait_listeners("ha", 2).await;
    let (_f, port) = r.forward("ha", &s).await;
    // Four loops of short connections run while manager-1 is killed, so some are in flight.
    let start = Instant::now();
    let mut loops = Vec::new();
    let loops_n = 4;
    for _ in 0..loops_n {
        loops.push(tokio::spawn(async move {
            let mut out: Vec<(Instant, Instant, bool)> = Vec::new();
            for _ in 0..150 {
                let t = Instant::now();
                let ok = short_connection(port).await;
                out.push((t, Instant::now(), ok));
                if start.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Taken before the signal: `kill` also waits for the process to be reaped, and on a busy
    // machine a connection in flight can fail (at the death) before that wait returns.
    let killed_at = Instant::now();
    m1.kill().await;
    let mut results: Vec<(Instant, bool)> = Vec::new();
    for l in loops {
        // Judge each connection by when it ended: one that began before the kill and ended
        // after it was in flight.
        results.extend(l.await.unwrap().into_iter().map(|(_, end, ok)| (end, ok)));
    }
    let before = results.iter().filter(|(t, _)| *t < killed_at);
    assert!(
        before.clone().all(|(_, ok)| *ok),
        "failures before the kill"
    );
    let failures: Vec<Duration> = results
        .iter()
        .filter(|(t, ok)| *t >= killed_at && !*ok)
        .map(|(t, _)| *t - killed_at)
        .collect();
    let window = failures.iter().max().copied().unwrap_or_default();
    eprintln!(
        "HA: {} connections after the kill, {} failed, last failure {:?} after the kill",
        results.iter().filter(|(t, _)| *t >= killed_at).count(),
        failures.len(),
        window
    );
    // The relay sees the dead manager's sockets close at once and offers pending accepts to
    // the other manager: only tunnels already open through manager-1 fail. Each loop has at
    // most one connection open at a time, so at most one failure per loop, all within the
    // first second.
    assert!(
        failures.len() <= loops_n,
        "{} failures: {failures:?}",
        failures.len()
    );
    assert!(
        window < Duration::from_secs(1),
        "failures {window:?} after the kill"
    );
    r.wait_listeners("ha", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_reconnect_after_the_relay_is_down_for_20_seconds() {
    let mut r = relay("relay-down").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("svc", &echo.to_string()).await;
    let _m1 = r.manager("manager-1", &l);
    let _m2 = r.manager("manager-2", &l);
    r.wait_listeners("svc", 2).await;
    let (_f, port) = r.forward("svc", &s).await;
    assert!(short_connection(port).await);

    r.proc.kill().await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let relay_port = r.port;
    let Relay { dir, .. } = r;
    let r = Relay::start(dir, relay_port).await;
    let back = Instant::now();
    // Both managers are listening again within the backoff cap (30 s) plus a margin.
    let mut connected = None;
    for _ in 0..450 {
        if r.listeners("svc").await == 2 {
            connected = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected = connected.expect("the managers did not come back within 45 s");
    eprintln!("relay down 20 s: both managers connected {connected:?} after it came back");
    assert!(short_connection(port).await);
}
