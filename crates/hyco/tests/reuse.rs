//! The `reuse` extension end to end, with real processes: `hyco forward` and `hyco manager`
//! reach the relay through counting TCP relays, and a run of tunnels, one after the other,
//! opens only the connections the pools keep, not two more per tunnel. Against a relay that
//! does not offer it (older, or `--extensions` without it) the agents work as before, with
//! new connections for every tunnel.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{echo_roundtrip, Relay};
use hyco_testkit::{echo_server, TempDir};

/// Tunnels in a run.
const TUNNELS: usize = 100;

/// Forwards TCP connections to `to`, counting them.
async fn counting(to: u16, count: Arc<AtomicUsize>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if let Ok(mut r) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = r.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut r).await;
                }
            });
        }
    });
    port
}

/// `TUNNELS` echo round trips through a forwarder, one after the other, on a relay started with
/// `relay_args`; the TCP connections the forwarder and the manager opened to the relay.
async fn run(tag: &str, relay_args: &[&str]) -> (usize, usize) {
    let r = Relay::start_with(TempDir::new(tag), 0, relay_args).await;
    let echo = echo_server().await;
    let (l, s) = r.hc("re", &echo.to_string()).await;
    let (to_m, to_f) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let m_port = counting(r.port, Arc::clone(&to_m)).await;
    let f_port = counting(r.port, Arc::clone(&to_f)).await;
    let m_addr = format!("127.0.0.1:{m_port}");
    // No warm connections for the manager: they are renewed every 6 s whatever the tunnels
    // do, and the count would depend on how long the run took.
    let m_args = ["--relay-addr", &m_addr, "--warm-connections", "0"];
    let _m = r.manager_with("manager", &l, &m_args, &[]);
    r.wait_listeners("re", 1).await;
    let f_addr = format!("127.0.0.1:{f_port}");
    let (_f, port) = r.forward_with("re", &s, &["--relay-addr", &f_addr]).await;
    for i in 0..TUNNELS {
        let (sent, got, n) = echo_roundtrip(port, 2000).await;
        assert_eq!((sent, n), (got, 2000), "tunnel {i}");
    }
    let opened = (to_f.load(Ordering::SeqCst), to_m.load(Ordering::SeqCst));
    eprintln!(
        "{tag}: {TUNNELS} tunnels; connections opened: forwarder {}, manager {}",
        opened.0, opened.1
    );
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_one_after_another_reuse_the_agents_connections() {
    let (forward, manager) = run("reuse-on", &[]).await;
    // The pools' own connections, each used again and again: the forwarder's first connect
    // and up to 16 warm ones; the manager's control channel and up to 16 parked sockets. The
    // bounds leave room for a slow machine (a loan out past its one-second grace is replaced)
    // and stay far below one connection per tunnel.
    assert!(
        forward <= 30,
        "forwarder opened {forward} for {TUNNELS} tunnels"
    );
    assert!(
        manager <= 30,
        "manager opened {manager} for {TUNNELS} tunnels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reuse_at_the_relay_every_tunnel_opens_new_connections() {
    let (forward, manager) = run("reuse-off", &["--extensions", "standby,early-data"]).await;
    assert!(forward >= TUNNELS, "forwarder opened {forward}");
    assert!(manager >= TUNNELS, "manager opened {manager}");
    // And with no extension at all, the protocol as Azure speaks it.
    let (forward, manager) = run("reuse-none", &["--extensions", "none"]).await;
    assert!(forward >= TUNNELS, "forwarder opened {forward}");
    assert!(manager >= TUNNELS, "manager opened {manager}");
}
