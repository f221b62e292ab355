//! Faults that need a real network: a listener whose network disappears without a FIN or a
//! reset (attack catalogue E4). The manager runs in a network namespace this test creates,
//! joined to the host by a veth pair; taking the link down silences it completely, which no
//! loopback trick can do. Needs root (`ip netns`), as CI has.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, Relay, T};
use hyco_client::{connect_with, ConnectOptions};
use hyco_proto::ConnectionString;
use hyco_testkit::{Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// A network namespace with a veth pair to the host; removed on drop.
struct Netns {
    name: String,
    inside: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Netns {
        let pid = std::process::id();
        let name = format!("hyco-e4-{pid}");
        let (outside, inside) = (
            format!("he4h{}", pid % 100_000),
            format!("he4n{}", pid % 100_000),
        );
        let (a, b) = (200 + pid % 50, (pid / 50) % 250);
        let (host_ip, ns_ip) = (format!("10.{a}.{b}.1"), format!("10.{a}.{b}.2"));
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            inside: inside.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &outside]);
        ip(&["link", "set", &outside, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &inside,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &inside, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's side of the link goes down: its packets stop, nothing is sent.
    fn cut(&self) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.inside,
            "down",
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A TCP echo server on `host` (an address of the veth pair), port 0.
async fn echo_on(host: &str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e4_a_listener_whose_network_vanishes_is_dropped_within_the_dead_interval() {
    let ns = Netns::new();
    let listen = format!("{}:0", ns.host_ip);
    let r = Relay::start_on(
        TempDir::new("netns-e4"),
        &listen,
        &["--hostname", &ns.host_ip],
    )
    .await;
    // The service the manager reaches from inside the namespace: an echo on the host's side
    // of the veth pair.
    let echo = echo_on(&ns.host_ip).await;
    let (l, s) = r.hc("far", &echo.to_string()).await;
    // The manager lives in the namespace; it reaches the relay over the veth pair.
    let (ca, hyco) = (r.ca(), bin());
    let manager_args = [
        "netns",
        "exec",
        &ns.name,
        hyco.to_str().unwrap(),
        "manager",
        "run",
        "--connection-string",
        &l,
        "--ca-file",
        &ca,
    ];
    let mut m = Proc::spawn(
        "manager-in-netns",
        std::path::Path::new("ip"),
        &manager_args,
        &[],
    );
    m.wait_line("listener connected", T).await;
    r.wait_listeners("far", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    let c = r.connector();
    let mut st = connect_with(&cs, &c, &ConnectOptions::default())
        .await
        .unwrap();
    st.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    st.read_exact(&mut b).await.unwrap();
    drop(st);

    ns.cut();
    let cut = Instant::now();
    // No FIN, no reset: the relay learns it only from the missing pongs (ping every 10 s,
    // dropped after 30 s of silence).
    let mut gone = None;
    for _ in 0..120 {
        if r.listeners("far").await == 0 {
            gone = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone =
        gone.expect("the silent listener was still registered 60 s after its link went down");
    eprintln!("E4: listener dropped {gone:?} after its link went down");
    assert!(gone <= Duration::from_secs(45), "took {gone:?}");
    // Senders now learn at once that nobody listens, instead of waiting for a dead listener.
    let t = Instant::now();
    let e = connect_with(&cs, &c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    m.kill().await;
}
