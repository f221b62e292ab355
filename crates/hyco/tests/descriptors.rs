//! Running out of descriptors is a status, not a hang (issue 15 §5). Each process runs under
//! `ulimit -n 300`; past its tunnel limit (derived from that: (300 - 75) / 2 = 112) a sender
//! gets a prompt refusal instead of waiting for its deadline, the process says so once in its
//! log (and in its metrics where it has them), and tunnels open again once others close.
//! Before the limit existed, a manager logged "Too many open files" after some 58 tunnels and
//! its senders got no answer at all.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{metric, spawn_with_nofile, Relay, T};
use hyco_client::{connect_with, ConnectOptions, Connector};
use hyco_proto::ConnectionString;
use hyco_testkit::{echo_server, eventually, field, Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NOFILE: u32 = 300;
const AT_LIMIT: &str = "at the tunnel limit";
const RECOVERED: &str = "below the tunnel limit again";

/// The tunnel limit a process logged at start.
async fn logged_limit(p: &Proc) -> usize {
    let line = p
        .wait_line("tunnel limit derived from the descriptor limit", T)
        .await;
    assert_eq!(field(&line, "nofile").as_deref(), Some("300"), "{line}");
    let max: usize = field(&line, "max_tunnels").unwrap().parse().unwrap();
    assert_eq!(max, (300 - 75) / 2, "{line}");
    max
}

/// A tunnel through the relay that has carried one byte each way.
async fn tunnel(cs: &ConnectionString, c: &Connector) -> hyco_client::HybridStream {
    let mut s = tokio::time::timeout(T, connect_with(cs, c, &ConnectOptions::default()))
        .await
        .expect("no answer within the deadline")
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(T, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    s
}

/// The sender past the limit: an answer (503 and `reason`), not a wait for the deadline.
async fn refused(cs: &ConnectionString, c: &Connector, reason: &str) {
    let Err(e) = tokio::time::timeout(T, connect_with(cs, c, &ConnectOptions::default()))
        .await
        .expect("a sender past the limit got no answer")
    else {
        panic!("a sender past the limit got a tunnel");
    };
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains(reason), "{e}");
}

/// Holds the limit's worth of tunnels, sees the next senders refused, closes a tenth and
/// opens again.
async fn fill_refuse_recover(
    max: usize,
    cs: &ConnectionString,
    c: &Connector,
    limited: &Proc,
    reason: &str,
) {
    let mut held = Vec::with_capacity(max);
    for _ in 0..max {
        held.push(tunnel(cs, c).await);
    }
    for _ in 0..5 {
        refused(cs, c, reason).await;
    }
    assert_eq!(limited.count(AT_LIMIT), 1, "said once, not per sender");
    assert_eq!(limited.count("Too many open files"), 0);
    // Close a tenth: new tunnels open again.
    held.truncate(max - max.div_ceil(10));
    eventually("a tunnel opens again after others closed", T, || async {
        connect_with(cs, c, &ConnectOptions::default())
            .await
            .is_ok()
    })
    .await;
    let _again = tunnel(cs, c).await;
    limited.wait_line(RECOVERED, T).await;
    // The tunnels held all along still carry data.
    for s in held.iter_mut().take(3) {
        s.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_answers_503_past_its_tunnel_limit_and_recovers() {
    let r = Relay::start_with_nofile(
        TempDir::new("fd-relay"),
        NOFILE,
        &["--status-listen", "127.0.0.1:0"],
    )
    .await;
    let max = logged_limit(&r.proc).await;
    let status = field(
        &r.proc
            .wait_line("status page and metrics listening", T)
            .await,
        "status",
    )
    .unwrap();
    let echo = echo_server().await;
    let (l, s) = r.hc("fd", &echo.to_string()).await;
    // Parked standby sockets hold relay permits too (docs/design-notes.md): this test counts
    // the relay's tunnels alone, so its listener parks none.
    let _m = r.manager_with("manager", &l, &["--standby-max", "0"], &[]);
    r.wait_listeners("fd", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    fill_refuse_recover(max, &cs, &r.connector(), &r.proc, "tunnel limit").await;
    assert!(metric(&status, "hyco_tunnels_refused_total").await >= 5);
    assert_eq!(metric(&status, "hyco_tunnel_limit ").await, max as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_rejects_past_its_tunnel_limit_and_recovers() {
    let r = common::relay("fd-manager").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("fd", &echo.to_string()).await;
    let ca = r.ca();
    let m = spawn_with_nofile(
        "manager",
        NOFILE,
        &[
            "manager",
            "run",
            "--connection-string",
            &l,
            "--ca-file",
            &ca,
            "--status-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let max = logged_limit(&m).await;
    let status = field(
        &m.wait_line("status page and metrics listening", T).await,
        "status",
    )
    .unwrap();
    r.wait_listeners("fd", 1).await;
    let cs = ConnectionString::parse(&s).unwrap();
    fill_refuse_recover(
        max,
        &cs,
        &r.connector(),
        &m,
        "The manager is at its tunnel limit",
    )
    .await;
    assert!(metric(&status, "hyco_manager_tunnels_refused_total").await >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_resets_past_its_tunnel_limit_and_recovers() {
    let r = common::relay("fd-forward").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("fd", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("fd", 1).await;
    let ca = r.ca();
    let f = spawn_with_nofile(
        "forward",
        NOFILE,
        &[
            "forward",
            "-L",
            "127.0.0.1:0:fd",
            "--connection-string",
            &s,
            "--ca-file",
            &ca,
        ],
        &[],
    );
    let max = logged_limit(&f).await;
    let port: u16 = field(&f.wait_line("forwarding", T).await, "local")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let open = || async move {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(T, s.read(&mut b)).await {
            Ok(Ok(1)) => Ok(s),
            Ok(Ok(_)) => Err(std::io::Error::other("closed")),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("no answer from the forwarder within {T:?}"),
        }
    };
    let mut held = Vec::with_capacity(max);
    for _ in 0..max {
        held.push(open().await.unwrap());
    }
    for _ in 0..5 {
        assert!(
            open().await.is_err(),
            "a connection past the limit got a tunnel"
        );
    }
    assert_eq!(f.count(AT_LIMIT), 1, "said once, not per connection");
    assert_eq!(f.count("Too many open files"), 0);
    held.truncate(max - max.div_ceil(10));
    eventually("a tunnel opens again after others closed", T, || async {
        open().await.is_ok()
    })
    .await;
    f.wait_line(RECOVERED, T).await;
}
