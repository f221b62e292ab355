//! End to end with real processes: `hyco relay`, `hyco manager`, `hyco forward`, `hyco admin`,
//! real TCP services on 127.0.0.1, real TLS with the generated CA.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, echo_roundtrip, relay, Relay, T};

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyco_client::{connect_with, ClientOptions, ConnectOptions};
use hyco_proto::ConnectionString;
use hyco_testkit::{dead_port, echo_server, eventually, run, Proc, TempDir};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_64_mib_each_way_with_half_close() {
    let r = relay("bulk").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("echo", 1).await;
    let (_f, port) = r.forward("echo", &s).await;
    // 64 MiB out, the same 64 MiB back; the client half-closes after writing and still
    // receives everything the echo server sends after that.
    let (sent, got, n) = echo_roundtrip(port, 64 << 20).await;
    assert_eq!(n, 64 << 20);
    assert_eq!(sent, got, "SHA-256 of what came back differs");
}

/// The key of a connection string.
fn key_of(cs: &str) -> &str {
    cs.split("SharedAccessKey=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
}

/// The same connection string with a well-formed key that is not the rule's.
fn with_wrong_key(cs: &str) -> String {
    cs.replace(key_of(cs), "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
}

/// The error a sender with connection string `cs` is refused with.
async fn refused(cs: &str, connector: &hyco_client::Connector) -> hyco_client::ClientError {
    connect_with(
        &ConnectionString::parse(cs).unwrap(),
        connector,
        &ConnectOptions::default(),
    )
    .await
    .unwrap_err()
}

/// How the listener refused a sender with `cs`: its status and the text that explains it. The
/// classic path gives them in the connect's status line; a sender joined to a parked standby
/// socket (a relay with the extensions on: its 101 comes at once) gets a Close with
/// 4000 + status and the reason right after the 101.
async fn listener_refusal(
    cs: &ConnectionString,
    connector: &hyco_client::Connector,
) -> (u16, String) {
    match connect_with(cs, connector, &ConnectOptions::default()).await {
        Err(e) => (e.status().unwrap_or(0), e.to_string()),
        Ok(mut ws) => {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(T, ws.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 0, "a refused sender gets no data");
            match ws.peer_close() {
                Some(Some((code, reason))) if (4400..=4599).contains(code) => {
                    (code - 4000, reason.clone())
                }
                other => panic!("expected a 4xxx close, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_the_documented_status() {
    let r = relay("refuse").await;
    let down = dead_port().await;
    let (l, s) = r.hc("down", &down.to_string()).await;
    let connector = r.connector();
    let cs = ConnectionString::parse(&s).unwrap();

    // (e) no listener yet.
    let e = connect_with(&cs, &connector, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("No listener"), "{e}");

    // (d) endpoint down: 502 with the manager's reason.
    let _m = r.manager("manager", &l);
    r.wait_listeners("down", 1).await;
    let (status, e) = listener_refusal(&cs, &connector).await;
    assert_eq!(status, 502, "{e}");
    assert!(e.contains(&format!("Endpoint {down} unreachable")), "{e}");

    // (f) wrong key, Listen key used to send, expired token.
    let wrong = with_wrong_key(&s);
    let e = refused(&wrong, &connector).await;
    assert_eq!(e.status(), Some(401), "{e}");
    let e = refused(&l, &connector).await;
    assert_eq!(e.status(), Some(403), "{e}");
    let hyco_proto::ConnectionStringAuth::Key { name, key } = &cs.auth else {
        panic!()
    };
    let expired = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", Some("down")),
        name,
        key,
        1_000_000,
    );
    let with_sas = format!(
        "Endpoint=sb://localhost:{}/;SharedAccessSignature={};EntityPath=down",
        r.port,
        expired.as_str()
    );
    let e = refused(&with_sas, &connector).await;
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");

    // Unknown hybrid connection with a valid namespace token: 404 after authorization.
    let root = ConnectionString::parse(&r.root)
        .unwrap()
        .with_entity("nope");
    let e = connect_with(&root, &connector, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    // Bad admin input: a clear error and a non-zero exit.
    let (code, _, err) = r
        .admin(&["hc", "create", "x", "--endpoint", "nohost"])
        .await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--endpoint"), "{err}");
    let (code, _, err) = run(
        &bin(),
        &["admin", "hc", "list"],
        &[("HYCO_CONNECTION_STRING", "Endpoint=sb://x/;Bogus=1")],
        T,
    )
    .await;
    assert_eq!(code, 64);
    assert!(err.contains("Bogus"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_both_receive_connections() {
    let r = relay("ha").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("ha", &echo.to_string()).await;
    let m1 = r.manager("manager-1", &l);
    let m2 = r.manager("manager-2", &l);
    r.wait_listeners("ha", 2).await;
    let (_f, port) = r.forward("ha", &s).await;
    for i in 0..24u32 {
        let (a, b, n) = echo_roundtrip(port, 1000 + i as usize).await;
        assert_eq!((a, n), (b, 1000 + i as usize));
    }
    eventually("24 connections served", T, || async {
        m1.count("connection served") + m2.count("connection served") == 24
    })
    .await;
    assert!(m1.count("connection served") > 0, "manager-1 got none");
    assert!(m2.count("connection served") > 0, "manager-2 got none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_keeps_state_and_managers_reconnect() {
    let mut r = relay("restart").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("svc", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("svc", 1).await;
    let (_f, port) = r.forward("svc", &s).await;
    let (a, b, _) = echo_roundtrip(port, 10_000).await;
    assert_eq!(a, b);

    r.proc.kill().await;
    let relay_port = r.port;
    let Relay { dir, .. } = r;
    let r = Relay::start(dir, relay_port).await;
    // Same keys, same hybrid connection; the manager comes back by itself.
    r.wait_listeners("svc", 1).await;
    let (a, b, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((a, n), (b, 100_000));
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| Path::new(c).is_file())
    })
}

/// 16 MiB of random bytes through `port` to an echo service, the first half written before
/// [`HalfwayTransfer::start`] returns, the rest by [`HalfwayTransfer::finish`]: what a drain
/// must carry across a shutdown in between.
struct HalfwayTransfer {
    wr: tokio::net::tcp::OwnedWriteHalf,
    reader: tokio::task::JoinHandle<(Vec<u8>, Result<bool, tokio::time::error::Elapsed>)>,
    data: Vec<u8>,
}

impl HalfwayTransfer {
    async fn start(port: u16) -> HalfwayTransfer {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let mut data = vec![0u8; 16 << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let reader = tokio::spawn(async move {
            let mut got = Vec::with_capacity(16 << 20);
            let r = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut got)).await;
            (got, r.map(|r| r.is_ok()))
        });
        wr.write_all(&data[..8 << 20]).await.unwrap();
        HalfwayTransfer { wr, reader, data }
    }

    /// Writes the second half and ends the sending side: whether that worked, what came back,
    /// whether the read ended cleanly within 60 s, and what was sent.
    async fn finish(
        mut self,
    ) -> (
        std::io::Result<()>,
        Vec<u8>,
        Result<bool, tokio::time::error::Elapsed>,
        Vec<u8>,
    ) {
        let mut written = self.wr.write_all(&self.data[8 << 20..]).await;
        if written.is_ok() {
            written = self.wr.shutdown().await;
        }
        let (got, ended) = self.reader.await.unwrap();
        (written, got, ended, self.data)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_the_tunnel() {
    let server =
        which("redis-server").expect("redis-server is required (scripts/test installs it)");
    let cli = which("redis-cli").expect("redis-cli is required (scripts/test installs it)");
    let rport = dead_port().await.port().to_string();
    let redis = Proc::spawn(
        "redis",
        &server,
        &[
            "--port",
            &rport,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        &[],
    );
    redis.wait_line("Ready to accept connections", T).await;
    let r = relay("redis").await;
    let (l, s) = r.hc("redis", &format!("127.0.0.1:{rport}")).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("redis", 1).await;
    let (_f, port) = r.forward("redis", &s).await;
    let p = port.to_string();
    let (code, out, err) = run(
        &cli,
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &p,
            "SET",
            "hyco",
            "through the relay",
        ],
        &[],
        T,
    )
    .await;
    assert_eq!((code, out.trim()), (0, "OK"), "{err}");
    let (code, out, _) = run(&cli, &["-h", "127.0.0.1", "-p", &p, "GET", "hyco"], &[], T).await;
    assert_eq!((code, out.trim()), (0, "through the relay"));
    let (_, out, _) = run(
        &cli,
        &["-h", "127.0.0.1", "-p", &rport, "GET", "hyco"],
        &[],
        T,
    )
    .await;
    assert_eq!(
        out.trim(),
        "through the relay",
        "the value reached the real server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_tunnels_without_losing_bytes() {
    let mut r = relay("drain").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("drain", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("drain", 1).await;
    let (_f, port) = r.forward("drain", &s).await;

    // A transfer in flight: 16 MiB written in two halves, with the SIGTERM in between.
    let t = HalfwayTransfer::start(port).await;
    r.proc.wait_line("tunnel open", T).await;
    r.proc.signal_term().await;
    r.proc.wait_line("relay stopping", T).await;
    // The relay no longer accepts; the running tunnel goes on.
    assert!(
        TcpStream::connect(("127.0.0.1", r.port)).await.is_err(),
        "relay still accepting"
    );
    let (written, got, ended, want) = t.finish().await;
    written.unwrap();
    assert_eq!(ended, Ok(true), "the tunnel did not end cleanly");
    assert_eq!(got.len(), want.len());
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(&want),
        "bytes lost or changed during the drain"
    );
    let st = r
        .proc
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("relay did not exit within the drain grace");
    assert!(st.success(), "relay exit status {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_sigterm_drains_its_bridges_without_losing_bytes() {
    let r = relay("mdrain").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("mdrain", &echo.to_string()).await;
    let mut m = r.manager("manager", &l);
    r.wait_listeners("mdrain", 1).await;
    let (_f, port) = r.forward("mdrain", &s).await;

    // A bridge in flight: 16 MiB written in two halves, with the manager's SIGTERM between.
    let t = HalfwayTransfer::start(port).await;
    r.proc.wait_line("tunnel open", T).await;
    m.signal_term().await;
    m.wait_line("signal received", T).await;
    // The manager has left the relay (it takes no new senders); the open bridge goes on.
    r.wait_listeners("mdrain", 0).await;
    let (_, got, ended, want) = t.finish().await;
    assert_eq!(ended, Ok(true), "the tunnel did not end cleanly");
    assert_eq!(
        got.len(),
        want.len(),
        "bytes lost across the manager's shutdown"
    );
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(&want),
        "bytes changed across the manager's shutdown"
    );
    let st = m
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("manager did not exit within the drain grace");
    assert!(st.success(), "manager exit status {st:?}");
    assert_eq!(m.count("draining open bridges"), 1, "{:?}", m.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_keeps_listening_across_many_token_renewals() {
    // Tokens live 4 s and the relay allows 1 s of grace: without renewals the control channel
    // would be closed (1008) after 5 s.
    let r = Relay::start_with(TempDir::new("renew"), 0, &["--token-grace", "1"]).await;
    let echo = echo_server().await;
    let (l, s) = r.hc("renew", &echo.to_string()).await;
    let m = r.manager_with(
        "manager",
        &l,
        &["--token-lifetime", "4"],
        &[("HYCO_LOG", "info,hyco_client=debug")],
    );
    r.wait_listeners("renew", 1).await;
    let (_f, port) = r.forward("renew", &s).await;
    // Wait for several renewals (every ~2 s), checking the tunnel between them.
    for n in 1..=4 {
        eventually(&format!("{n} renewals"), T, || async {
            m.count("token renewed") >= n
        })
        .await;
        let (a, b, _) = echo_roundtrip(port, 1000).await;
        assert_eq!(a, b);
    }
    assert_eq!(
        r.proc.count("token expired"),
        0,
        "the relay closed a renewing listener"
    );
    assert_eq!(
        m.count("control channel down"),
        0,
        "the manager had to reconnect"
    );
}

/// Issue 15 §1: `--token-lifetime 18446744073709551615` used to wrap the token's expiry into
/// the past and loop on "401 The token is expired". Out-of-range lifetimes are refused with the
/// range in the message; the longest accepted one gives a working listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_token_lifetime_extremes_are_refused_or_work() {
    let r = relay("lifetime").await;
    let echo = echo_server().await;
    let (l, _) = r.hc("lifetime", &echo.to_string()).await;
    let ca = r.ca();
    for bad in [
        "0",
        "1",
        "31536001",
        "9223372036854775807",
        "18446744073709551615",
    ] {
        let (code, _, err) = run(
            &bin(),
            &[
                "manager",
                "run",
                "--connection-string",
                &l,
                "--ca-file",
                &ca,
                "--token-lifetime",
                bad,
            ],
            &[],
            T,
        )
        .await;
        assert_eq!(code, 64, "--token-lifetime {bad}: {err}");
        assert!(
            err.contains(&format!(
                "--token-lifetime {bad}: use 2 to 31536000 seconds"
            )),
            "--token-lifetime {bad}: {err}"
        );
    }
    let m = r.manager_with("manager", &l, &["--token-lifetime", "31536000"], &[]);
    r.wait_listeners("lifetime", 1).await;
    assert_eq!(m.count("token is expired"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_connection_and_no_secrets() {
    // First start prints the root connection string once (on purpose); restart so that
    // everything captured below is log output only.
    let mut first = relay("logs").await;
    first.proc.kill().await;
    let Relay { dir, .. } = first;
    let data = dir.0.join("data");
    let relay_proc = Proc::spawn(
        "relay",
        &bin(),
        &[
            "--log-json",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
    );
    let line = relay_proc.wait_line("relay listening", T).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port: u16 = v["fields"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The root connection string names the port of this run.
    let root = std::fs::read_to_string(data.join("root.connection-string"))
        .unwrap()
        .trim()
        .to_owned();
    let r = Relay {
        proc: relay_proc,
        dir,
        port,
        root,
    };
    let echo = echo_server().await;
    let (l, s) = r.hc("logs", &echo.to_string()).await;
    let m = r.manager_with("manager", &l, &["--log-json"], &[]);
    r.wait_listeners("logs", 1).await;
    let (f, fport) = r.forward_with("logs", &s, &["--log-json"]).await;
    let (a, b, n) = echo_roundtrip(fport, 5000).await;
    assert_eq!((a, n), (b, 5000));
    // A refused attempt with a wrong key is logged too, without the key.
    let wrong = with_wrong_key(&s);
    let _ = refused(&wrong, &r.connector()).await;
    let closed = r.proc.wait_line("tunnel closed", T).await;
    m.wait_line("connection served", T).await;
    f.wait_line("tunnel closed", T).await;

    // The relay's line per tunnel carries who, how much, how long and how it ended.
    let v: serde_json::Value = serde_json::from_str(&closed).unwrap();
    let fields = &v["fields"];
    assert_eq!(fields["bytes_sender_to_listener"], 5000);
    assert_eq!(fields["bytes_listener_to_sender"], 5000);
    assert_eq!(fields["sender_close_code"], 1000);
    assert_eq!(fields["listener_close_code"], 1000);
    assert!(fields["duration_ms"].is_u64());
    assert_eq!(v["span"]["hc"], "logs");
    assert!(v["span"]["listener_id"].is_string() && v["span"]["peer"].is_string());

    let keys: Vec<&str> = [&l, &s, &r.root].iter().map(|cs| key_of(cs)).collect();
    for p in [&r.proc, &m, &f] {
        for line in p.lines() {
            serde_json::from_str::<serde_json::Value>(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", p.name));
            for k in &keys {
                assert!(!line.contains(k), "{}: a key in the logs: {line}", p.name);
            }
            assert!(
                !line.contains("sig="),
                "{}: a signature in the logs: {line}",
                p.name
            );
        }
    }
    assert!(r.proc.count("AuthorizationFailed") >= 1);
}

/// A connection through the forwarder that sends one chunk and reads until the stream fails
/// or ends; returns Ok(()) for a clean end of stream, Err for an error. `started` fires on
/// the first bytes read.
async fn read_until_end(
    port: u16,
    started: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<()> {
    // The app writes one chunk and then only reads: a second writer would take the reset
    // (Linux hands ECONNRESET to whichever call comes first, and a later read then sees a
    // plain end of stream), and this helper is about what the reader sees.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&[5u8; 16 * 1024]).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut started = Some(started);
    loop {
        match tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("connection neither ended nor failed")
        {
            Ok(0) => return Ok(()),
            Ok(_) => {
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// An endpoint that, once it has read the first bytes of a connection, streams data to it
/// (16 KiB per millisecond, bounded) until the connection fails.
async fn source_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if s.read(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                let chunk = vec![7u8; 16 * 1024];
                for _ in 0..100_000 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_mid_transfer_is_an_error_for_the_app_not_an_end() {
    let r = relay("kill-manager").await;
    let source = source_server().await;
    let (l, s) = r.hc("k", &source.to_string()).await;
    let mut m = r.manager("manager", &l);
    r.wait_listeners("k", 1).await;
    let (_f, port) = r.forward("k", &s).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = tokio::spawn(read_until_end(port, tx));
    rx.await.expect("no data flowed before the kill");
    m.kill().await;
    let end = app.await.unwrap();
    assert!(
        end.is_err(),
        "the app saw a clean end of stream, not an error"
    );
    r.proc.wait_line("Aborted", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_killed_mid_transfer_closes_the_endpoint_connection() {
    let r = relay("kill-forward").await;
    // An endpoint that reports how its connection ended.
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = endpoint.local_addr().unwrap();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = endpoint.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        let _ = ended_tx.send(total);
    });
    let (l, snd) = r.hc("kf", &ep.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("kf", 1).await;
    let (mut f, port) = r.forward("kf", &snd).await;
    let mut app = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    app.write_all(&[1u8; 100_000]).await.unwrap();
    r.proc.wait_line("tunnel open", T).await;
    f.kill().await;
    let total = tokio::time::timeout(T, ended_rx)
        .await
        .expect("the endpoint connection was left open")
        .unwrap();
    assert!(total <= 100_000);
    r.proc.wait_line("tunnel closed", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_reset_reaches_the_app_as_an_error() {
    let r = relay("reset").await;
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = endpoint.accept().await {
            // Accept, read a little, then reset.
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let (l, snd) = r.hc("rs", &ep.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("rs", 1).await;
    let (_f, port) = r.forward("rs", &snd).await;
    let (tx, _rx) = tokio::sync::oneshot::channel();
    let end = read_until_end(port, tx).await;
    assert!(
        end.is_err(),
        "an endpoint reset came out as a clean end of stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_is_reported_as_a_timeout() {
    let r = relay("blackhole").await;
    // A listening socket whose accept queue is full: further SYNs get no answer.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = sock.listen(0).unwrap();
    let addr = hole.local_addr().unwrap();
    let _filler = TcpStream::connect(addr).await.unwrap();
    let (l, s) = r.hc("bh", &addr.to_string()).await;
    let cfg = r.dir.0.join("manager.toml");
    std::fs::write(
        &cfg,
        format!("ca_file = {:?}\ndial_timeout_secs = 1\n[[hybrid_connection]]\nconnection_string = {l:?}\n", r.ca()),
    )
    .unwrap();
    let _m = Proc::spawn(
        "manager",
        &bin(),
        &["manager", "run", "--config", cfg.to_str().unwrap()],
        &[],
    );
    r.wait_listeners("bh", 1).await;
    let (status, e) = listener_refusal(&ConnectionString::parse(&s).unwrap(), &r.connector()).await;
    assert_eq!(status, 504, "{e}");
    assert!(e.contains("did not answer within 1s"), "{e}");
    drop(hole);
}

/// A chunked POST written by hand over TLS (no Content-Length); returns the raw answer.
async fn chunked_post(r: &Relay, target: &str, token: &str, chunks: &[&[u8]]) -> String {
    let tls = hyco_io::tls::client_config(Some(Path::new(&r.ca()))).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nHost: localhost:{}\r\nServiceBusAuthorization: {token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        r.port
    )
    .into_bytes();
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut answer))
        .await
        .unwrap()
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The body of a raw chunked HTTP/1.1 answer.
fn dechunk(answer: &str) -> String {
    let (_, mut rest) = answer.split_once("\r\n\r\n").unwrap();
    let mut body = String::new();
    for _ in 0..100_000 {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return body;
        }
        body.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    panic!("too many chunks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_http_listener_serves_every_body_size_through_the_relay() {
    use hyco_client::http::{request, HttpResponse};
    let r = relay("http-sdk").await;
    let (l, s) = r.hc("web", "127.0.0.1:9").await;
    let opts = ClientOptions {
        ca_file: Some(PathBuf::from(r.ca())),
        ..ClientOptions::default()
    };
    let connector = opts.connector().unwrap();
    let stop = hyco_io::CancellationToken::new();
    let (listener, _ws_rx, mut http_rx) = hyco_client::HybridListener::start_with_http(
        ConnectionString::parse(&l).unwrap(),
        connector.clone(),
        hyco_client::ListenerOptions::default(),
        stop.clone(),
    )
    .unwrap();
    // The application: /web/echo answers with what it got; /web/stream streams 5 × 50 000.
    tokio::spawn(async move {
        while let Some(mut req) = http_rx.recv().await {
            tokio::spawn(async move {
                let body = req.body(16 << 20).await.unwrap();
                if req.target.starts_with("/web/stream") {
                    let mut w = req
                        .respond_streaming(200, None, vec![("X-Kind".into(), "stream".into())])
                        .await
                        .unwrap();
                    for i in 0..5u8 {
                        w.write(&vec![i; 50_000]).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    w.finish().await.unwrap();
                } else {
                    let resp = HttpResponse::new(200, body)
                        .header("X-Method", &req.method)
                        .header("X-Target", &req.target)
                        .header(
                            "X-Saw-Relay-Credential",
                            if req.header("ServiceBusAuthorization").is_some() {
                                "yes"
                            } else {
                                "no"
                            },
                        );
                    req.respond(resp).await.unwrap();
                }
            });
        }
    });
    r.wait_listeners("web", 1).await;
    let send = ConnectionString::parse(&s).unwrap();
    for len in [0usize, 100, 65_536, 65_537, 1 << 20] {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let method = if len == 0 {
            http::Method::GET
        } else {
            http::Method::POST
        };
        let a = request(
            &send,
            &connector,
            method.clone(),
            "/echo?x=1",
            &[],
            body.clone().into(),
            4 << 20,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{len}: {}", a.reason);
        assert_eq!(a.body.len(), len);
        assert!(a.body.as_ref() == body.as_slice(), "{len}: body differs");
        assert_eq!(a.headers["x-method"], method.as_str());
        assert_eq!(a.headers["x-target"], "/web/echo?x=1");
        assert_eq!(a.headers["x-saw-relay-credential"], "no");
        assert!(a.headers["via"].to_str().unwrap().contains("localhost"));
    }
    // A streamed response arrives whole, chunked.
    let a = request(
        &send,
        &connector,
        http::Method::GET,
        "/stream",
        &[],
        bytes::Bytes::new(),
        4 << 20,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 250_000);
    assert_eq!(a.body[249_999], 4);
    assert_eq!(a.headers["x-kind"], "stream");
    // A chunked request body (unknown length) goes over the rendezvous.
    let token = hyco_client::mint_token(&send, Duration::from_secs(600))
        .unwrap()
        .unwrap()
        .0;
    let answer = chunked_post(&r, "/web/echo", &token, &[b"abc", &[b'x'; 70_000], b"end"]).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    // Header names go out as the listener spelled them (issue 17, `header_case`).
    assert!(answer.contains("X-Target: /web/echo"));
    // 70 006 bytes come back over the rendezvous, so chunked.
    assert!(answer.contains("transfer-encoding: chunked"));
    let mut expected = b"abc".to_vec();
    expected.extend_from_slice(&[b'x'; 70_000]);
    expected.extend_from_slice(b"end");
    assert!(dechunk(&answer).as_bytes() == expected.as_slice());
    drop(listener);
}

/// `--relay-addr` (the nodes of a relay cluster behind one name): the first address refuses
/// (a port bound then released), the second is the relay. Manager and forwarder both get
/// through, each moves past the dead address once and then sticks to the live one, and the
/// manager's listener reconnects through the list after a relay restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_addrs_skip_an_address_that_refuses() {
    let r = relay("relay-addrs").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let dead = dead_port().await.to_string();
    let live = format!("127.0.0.1:{}", r.port);
    let addrs = ["--relay-addr", dead.as_str(), "--relay-addr", live.as_str()];
    let m = r.manager_with("manager", &l, &addrs, &[]);
    r.wait_listeners("echo", 1).await;
    let (f, port) = r.forward_with("echo", &s, &addrs).await;
    for len in [10, 10_000, 1 << 20] {
        let (a, b, n) = echo_roundtrip(port, len).await;
        assert_eq!((a, n), (b, len));
    }
    for (name, p) in [("manager", &m), ("forwarder", &f)] {
        eventually(&format!("{name} skipped {dead}"), T, || async {
            p.count("relay address unreachable") >= 1
        })
        .await;
        // Sticky: only the first dials skipped it (the first connect and the warm connection
        // dialled next to it may both start there), every one after went straight to the live
        // address.
        let skipped = p.lines();
        let skipped: Vec<_> = skipped
            .iter()
            .filter(|l| l.contains("relay address unreachable"))
            .collect();
        assert!((1..=2).contains(&skipped.len()), "{name}: {skipped:#?}");
        assert!(
            skipped.iter().all(|l| l.contains(&dead)),
            "{name}: {skipped:#?}"
        );
    }
    let before = (
        m.count("relay address unreachable"),
        f.count("relay address unreachable"),
    );
    for _ in 0..5 {
        let (a, b, n) = echo_roundtrip(port, 1000).await;
        assert_eq!((a, n), (b, 1000));
    }
    assert_eq!(
        (
            m.count("relay address unreachable"),
            f.count("relay address unreachable")
        ),
        before,
        "a later connect went back to the dead address"
    );

    // Each reconnect of the listener is a new connect over the list: with the relay back on
    // the same port, the manager finds it again.
    let mut r = r;
    r.proc.kill().await;
    let relay_port = r.port;
    let Relay { dir, .. } = r;
    let r = Relay::start(dir, relay_port).await;
    r.wait_listeners("echo", 1).await;
    let (a, b, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((a, n), (b, 100_000));
}

/// The connection string names `localhost` on a port where nothing listens; `--relay-addr`
/// sends the TCP step to 127.0.0.1 and the relay's port, while TLS (the certificate is checked
/// for `localhost`), the Host header and the token audience keep the connection string's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_addr_carries_the_endpoint_name_to_another_address() {
    let r = relay("relay-addr-name").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let nowhere = dead_port().await.port();
    let moved = |cs: &str| {
        let from = format!("sb://localhost:{}/", r.port);
        assert!(cs.contains(&from), "{cs}");
        cs.replace(&from, &format!("sb://localhost:{nowhere}/"))
    };
    let (l, s) = (moved(&l), moved(&s));
    let live = format!("127.0.0.1:{}", r.port);
    let addr = ["--relay-addr", live.as_str()];
    let _m = r.manager_with("manager", &l, &addr, &[]);
    r.wait_listeners("echo", 1).await;
    let (f, port) = r.forward_with("echo", &s, &addr).await;
    let (a, b, n) = echo_roundtrip(port, 50_000).await;
    assert_eq!((a, n), (b, 50_000));
    assert_eq!(f.count("relay address unreachable"), 0);

    // The library: `HYCO_RELAY_ADDRS`-style options through `connector_for`.
    let cs = ConnectionString::parse(&s).unwrap();
    let opts = ClientOptions {
        ca_file: Some(PathBuf::from(r.ca())),
        relay_addrs: vec![live.clone()],
        ..ClientOptions::default()
    };
    let mut ws = connect_with(
        &cs,
        &opts.connector_for(&cs).unwrap(),
        &ConnectOptions::default(),
    )
    .await
    .unwrap();
    ws.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    ws.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // Without the address, the connection string's own port refuses.
    let e = connect_with(&cs, &r.connector(), &ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains(&nowhere.to_string()), "{e}");
}

/// Issue 14, log forging: the inputs of the report, through a real relay and manager with text
/// logs. A sender (no token needed here) sends `sb-hc-id` with CR LF, a whole forged log line
/// and a terminal escape; a listener does the same with a Listen token; a Manage holder puts
/// `evil\r\nFAKE LINE\x1b[31m` into the endpoint metadata, which the manager quotes in its retry
/// warning, its status page and `manager show`. Afterwards every log has one line per event and
/// no control byte, and what is shown carries the text escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_text_never_forges_a_log_line_or_reaches_a_terminal_raw() {
    let r = Relay::start_with(
        TempDir::new("forge"),
        0,
        &["--status-listen", "127.0.0.1:0"],
    )
    .await;
    let echo = echo_server().await;
    let (code, _, err) = r
        .admin(&[
            "hc",
            "create",
            "forge",
            "--endpoint",
            &echo.to_string(),
            "--no-client-auth",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, l, err) = r
        .admin(&["rule", "create", "l", "--hc", "forge", "--rights", "listen"])
        .await;
    assert_eq!(code, 0, "{err}");
    let l = l.trim().to_owned();
    let m = r.manager_with("manager", &l, &["--status-listen", "127.0.0.1:0"], &[]);
    let mstatus = hyco_testkit::field(
        &m.wait_line("status page and metrics listening", T).await,
        "status",
    )
    .unwrap();
    r.wait_listeners("forge", 1).await;
    let connector = r.connector();

    // The report's sb-hc-id, decoded: what the relay used to log and pass on raw.
    let forged = "ID\r\n2026-12-04T00:00:00Z  INFO hyco_relay: FORGED admin login ok\u{1b}[2J";
    let anon = format!("Endpoint=sb://localhost:{}/;EntityPath=forge", r.port);
    let sent = connect_with(
        &ConnectionString::parse(&anon).unwrap(),
        &connector,
        &ConnectOptions {
            id: Some(forged.into()),
            ..ConnectOptions::default()
        },
    )
    .await;
    assert_eq!(
        sent.err().and_then(|e| e.status()),
        Some(400),
        "a forged sb-hc-id was accepted"
    );
    // The same id on a listener's control channel, with a Listen token.
    let stop = hyco_io::CancellationToken::new();
    let (listener, _incoming) = hyco_client::HybridListener::start(
        ConnectionString::parse(&l).unwrap(),
        connector.clone(),
        hyco_client::ListenerOptions {
            id: Some(forged.into()),
            ..Default::default()
        },
        stop.clone(),
    )
    .unwrap();
    let mut status = listener.status_watch();
    let down = tokio::time::timeout(T, async {
        loop {
            if let hyco_client::ListenerStatus::Disconnected { reason } =
                &*status.borrow_and_update()
            {
                return reason.clone();
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert!(down.contains("400"), "{down}");
    stop.cancel();

    // Endpoint metadata from a Manage holder, quoted by the manager on every retry.
    let meta = r#"[{"key":"endpoint","value":"evil\r\nFAKE LINE\u001b[31m"}]"#;
    let root = ConnectionString::parse(&r.root).unwrap();
    let hyco_proto::ConnectionStringAuth::Key { name, key } = &root.auth else {
        panic!()
    };
    let token = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", None),
        name,
        key,
        4_000_000_000,
    );
    let body = serde_json::json!({ "userMetadata": meta }).to_string();
    let ans = connector
        .https_request(
            http::Method::PATCH,
            &format!(
                "https://localhost:{}/$hyco/v1/hybridconnections/forge",
                r.port
            ),
            &[
                ("Authorization", token.as_str()),
                ("Content-Type", "application/json"),
            ],
            bytes::Bytes::from(body),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(ans.status, 200, "{:?}", ans.body);
    let state = m.state_dir.to_str().unwrap().to_owned();
    let (code, _, err) = run(
        &bin(),
        &["manager", "restart", "forge"],
        &[("HYCO_STATE_DIR", &state)],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let warned = m.wait_line("cannot resolve the endpoint", T).await;
    assert!(warned.contains(r"evil\r\nFAKE LINE\x1b[31m"), "{warned}");
    let (code, shown, err) = run(
        &bin(),
        &["manager", "show", "forge"],
        &[("HYCO_STATE_DIR", &state)],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains(r"FAKE LINE\x1b[31m"), "{shown}");
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
    let page = common::http_get_as(&mstatus, &mstatus, "/api/status").await;
    assert!(page.contains(r"FAKE LINE\\x1b[31m"), "{page}");
    assert!(
        !page.contains(r"\r\n") && !page.contains(r"\u001b"),
        "{page}"
    );

    // Every line of both logs: one event each, no control byte, no forged line.
    for p in [&r.proc, &m] {
        for line in p.lines() {
            assert!(
                !line.chars().any(char::is_control),
                "control bytes in {line:?}"
            );
            assert!(
                !line.starts_with("2026-12-04T00:00:00Z"),
                "forged line {line:?}"
            );
            assert!(!line.starts_with("FAKE LINE"), "forged line {line:?}");
        }
    }
}

/// Issue 14, DNS rebinding: the status pages of a relay and a manager answer loopback names
/// and their `--status-host` names only; a foreign `Host` gets 421 and no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_answer_only_loopback_and_configured_hosts() {
    let flags = [
        "--status-listen",
        "127.0.0.1:0",
        "--status-host",
        "status.example",
    ];
    let r = Relay::start_with(TempDir::new("status-host"), 0, &flags).await;
    let rstatus = hyco_testkit::field(
        &r.proc
            .wait_line("status page and metrics listening", T)
            .await,
        "status",
    )
    .unwrap();
    let echo = echo_server().await;
    let (l, _) = r.hc("secret-name", &echo.to_string()).await;
    let m = r.manager_with("manager", &l, &flags, &[]);
    let mstatus = hyco_testkit::field(
        &m.wait_line("status page and metrics listening", T).await,
        "status",
    )
    .unwrap();
    r.wait_listeners("secret-name", 1).await;
    let port = |a: &str| a.rsplit(':').next().unwrap().to_owned();
    for addr in [&rstatus, &mstatus] {
        let p = port(addr);
        for host in [
            format!("127.0.0.1:{p}"),
            format!("localhost:{p}"),
            format!("[::1]:{p}"),
            "status.example".into(),
            format!("STATUS.example:{p}"),
        ] {
            for path in ["/api/status", "/", "/metrics"] {
                let a = common::http_get_as(addr, &host, path).await;
                assert!(a.starts_with("HTTP/1.1 200"), "{host} {path}: {a}");
            }
        }
        for host in [
            format!("evil.example:{p}"),
            "evil.example".into(),
            format!("127.0.0.1.evil.example:{p}"),
            format!("10.1.2.3:{p}"),
        ] {
            for path in ["/api/status", "/", "/metrics", "/api/events"] {
                let a = common::http_get_as(addr, &host, path).await;
                assert!(a.starts_with("HTTP/1.1 421"), "{host} {path}: {a}");
                assert!(!a.contains("secret-name"), "{host} {path}: {a}");
            }
        }
    }
}
