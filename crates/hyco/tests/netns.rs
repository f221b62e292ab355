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

/// A network namespace joined to the host by a veth pair on one IPv6 /64 (a ULA prefix): the
/// namespace's end is `::2`, the host's end holds `::1` and `::10`…`::1f`, all of one /64.
struct Netns6 {
    name: String,
    prefix: String,
}

impl Netns6 {
    fn new(tag: &str) -> Netns6 {
        let pid = std::process::id();
        let name = format!("hyco-{tag}-{pid}");
        let (outside, inside) = (
            format!("h6{tag}h{}", pid % 100_000),
            format!("h6{tag}n{}", pid % 100_000),
        );
        let prefix = format!("fd15:{:x}:{:x}:1", pid >> 16, pid & 0xffff);
        ip(&["netns", "add", &name]);
        let ns = Netns6 {
            name: name.clone(),
            prefix: prefix.clone(),
        };
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &name]);
        for host in std::iter::once(1).chain(0x10..=0x1f) {
            ip(&[
                "addr",
                "add",
                &format!("{prefix}::{host:x}/64"),
                "dev",
                &outside,
                "nodad",
            ]);
        }
        ip(&["link", "set", &outside, "up"]);
        let inns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        };
        inns(&[
            "addr",
            "add",
            &format!("{prefix}::2/64"),
            "dev",
            &inside,
            "nodad",
        ]);
        inns(&["link", "set", &inside, "up"]);
        inns(&["link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns6 {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A relay inside `ns` on `[prefix::2]:0` with `extra` flags; returns it, its port and CA.
async fn relay_in(ns: &Netns6, dir: &TempDir, extra: &[&str]) -> (Proc, u16, std::path::PathBuf) {
    let data = dir.0.join("data");
    let listen = format!("[{}::2]:0", ns.prefix);
    let hyco = bin();
    let mut args = vec![
        "netns",
        "exec",
        &ns.name,
        hyco.to_str().unwrap(),
        "relay",
        "--listen",
        &listen,
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let p = Proc::spawn("relay-in-netns", std::path::Path::new("ip"), &args, &[]);
    let line = p.wait_line("relay listening", T).await;
    let port = hyco_testkit::field(&line, "listen")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (p, port, data.join("ca.pem"))
}

/// One entity GET with a token signed by a key nobody has, from `source`; the status code.
async fn failed_auth_from(ns: &Netns6, port: u16, ca: &std::path::Path, source: &str) -> u16 {
    let sock = tokio::net::TcpSocket::new_v6().unwrap();
    sock.bind(format!("[{source}]:0").parse().unwrap()).unwrap();
    let tcp = tokio::time::timeout(
        T,
        sock.connect(format!("[{}::2]:{port}", ns.prefix).parse().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let tls = hyco_io::tls::client_config(Some(ca)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let bad = "SharedAccessSignature sr=http%3A%2F%2Flocalhost%2Fhc&sig=AAAA&se=9999999999&skn=RootManageSharedAccessKey";
    s.write_all(
        format!("GET /hc?api-version=2016-07 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {bad}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut head)).await;
    let head = String::from_utf8_lossy(&head);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status from the relay: {head:?}"))
}

/// Failed authorizations from 16 addresses of one /64 (IPv6 sources, over a veth pair into a
/// namespace) share one budget: an attacker with a /64 does not get 2^64 of them. With
/// `--ipv6-prefix 128` each address has its own, as every IPv6 source had before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_count_an_ipv6_64_as_one_source() {
    let ns = Netns6::new("v6");
    let sources: Vec<String> = (0x10..=0x1f)
        .map(|h| format!("{}::{h:x}", ns.prefix))
        .collect();
    let mut counts = Vec::new();
    for extra in [
        &["--auth-failure-burst", "3"][..],
        &["--auth-failure-burst", "3", "--ipv6-prefix", "128"],
    ] {
        let dir = TempDir::new("netns-v6");
        let (mut relay, port, ca) = relay_in(&ns, &dir, extra).await;
        let started = Instant::now();
        let mut unauthorized = 0;
        let mut throttled = 0;
        for round in 0..4 {
            for src in &sources {
                match failed_auth_from(&ns, port, &ca, src).await {
                    401 => unauthorized += 1,
                    429 => throttled += 1,
                    other => panic!("round {round} from {src}: status {other}"),
                }
            }
        }
        // The bucket refills one failure per second.
        let refilled = started.elapsed().as_secs() as usize + 1;
        counts.push((unauthorized, throttled, refilled));
        relay.kill().await;
    }
    eprintln!(
        "/64 keyed: (401, 429, seconds) {:?}; per address: {:?}",
        counts[0], counts[1]
    );
    let (u, t, refilled) = counts[0];
    assert!(
        u <= 3 + refilled,
        "one /64 had more than one budget: {u} x 401, {t} x 429"
    );
    assert_eq!(u + t, 64);
    let (u, _, _) = counts[1];
    assert!(
        u >= 16 * 3,
        "with --ipv6-prefix 128 each address has its own budget: {u}"
    );
}
