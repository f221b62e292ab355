//! The relay as a cluster: a real `redis-server` (Debian's package, on a Unix socket in the
//! test's folder) and relay nodes as real processes on 127.0.0.1, with managers and senders
//! spread over them. Each test prints the figures it measured (`--nocapture`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{http_get, metric, Relay, T};
use hyco_client::{connect_with, ConnectOptions, Connector};
use hyco_proto::ConnectionString;
use hyco_testkit::{echo_server, eventually, field, Proc, TempDir};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// A `redis-server` with persistence (append-only file, fsync always), so a restart keeps the
/// cluster's configuration as a production Redis would.
struct Redis {
    proc: Proc,
    dir: PathBuf,
}

impl Redis {
    async fn start(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("redis.sock");
        let (sock_s, dir_s) = (sock.display().to_string(), dir.display().to_string());
        let which = std::process::Command::new("sh")
            .args(["-c", "command -v redis-server"])
            .output()
            .unwrap();
        assert!(
            which.status.success(),
            "redis-server is not installed (Debian package redis-server; scripts/test installs it)"
        );
        let args = [
            "--port",
            "0",
            "--unixsocket",
            &sock_s,
            "--unixsocketperm",
            "700",
            "--dir",
            &dir_s,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ];
        let proc = Proc::spawn("redis", Path::new("redis-server"), &args, &[]);
        proc.wait_line("ready to accept connections", T).await;
        Redis {
            proc,
            dir: dir.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }
}

/// A node: the relay process and its status address.
struct Node {
    relay: Relay,
    status: String,
}

/// Starts node `id`. The first node generates the certificate (it covers 127.0.0.1 and
/// localhost); the others use it, with its CA beside them so every helper finds one.
async fn node(id: &str, redis: &Redis, first: Option<&Node>) -> Node {
    node_with(id, redis, first, &[]).await
}

async fn node_with(id: &str, redis: &Redis, first: Option<&Node>, more: &[String]) -> Node {
    let dir = TempDir::new(&format!("cluster-{id}"));
    let mut extra: Vec<String> = vec![
        "--cluster".into(),
        redis.url(),
        "--node-id".into(),
        id.into(),
        "--advertise".into(),
        "127.0.0.1".into(),
        "--status-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(f) = first {
        let fdata = f.relay.dir.0.join("data");
        let data = dir.0.join("data");
        // The relay refuses a data folder others can read.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&data)
            .unwrap();
        std::fs::copy(fdata.join("ca.pem"), data.join("ca.pem")).unwrap();
        extra.extend([
            "--cert".into(),
            fdata.join("server.pem").display().to_string(),
            "--key".into(),
            fdata.join("server-key.pem").display().to_string(),
        ]);
    }
    extra.extend_from_slice(more);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let relay = Relay::start_with(dir, 0, &extra).await;
    let line = relay
        .proc
        .wait_line("status page and metrics listening", T)
        .await;
    let status = field(&line, "status").unwrap();
    relay.proc.wait_line("joined the cluster", T).await;
    Node { relay, status }
}

async fn cluster(tag: &str, n: usize) -> (TempDir, Redis, Vec<Node>) {
    cluster_with(tag, n, &[]).await
}

/// `n` nodes on a fresh Redis, each started with the `more` arguments.
async fn cluster_with(tag: &str, n: usize, more: &[String]) -> (TempDir, Redis, Vec<Node>) {
    let base = TempDir::new(tag);
    let redis = Redis::start(&base.0.join("redis")).await;
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=n {
        let first = nodes.first();
        let nd = node_with(&format!("n{i}"), &redis, first, more).await;
        nodes.push(nd);
    }
    (base, redis, nodes)
}

/// `redis-cli` on the test's Redis; its output.
fn redis_cli(base: &TempDir, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-s")
        .arg(base.0.join("redis/redis.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// HMAC-SHA256 (RFC 2104), for forging cluster messages that carry a valid MAC.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> String {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The same connection string, pointed at another node's port.
fn on(cs: &str, port: u16) -> String {
    let start = cs.find("sb://").unwrap() + 5;
    let end = start + cs[start..].find('/').unwrap();
    format!("{}localhost:{port}{}", &cs[..start], &cs[end..])
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

/// Listeners of `hc` over the given nodes (each counts its own).
async fn listeners(nodes: &[&Node], hc: &str) -> u64 {
    let mut n = 0;
    for nd in nodes {
        n += nd.relay.listeners(hc).await;
    }
    n
}

/// A hybrid connection `svc` for `endpoint` with its manager on n1; the sender connection
/// strings for n1 (same node) and n2 (cross-node), checked with one cross-node echo.
async fn listener_on_n1(nodes: &[Node], endpoint: &str) -> (Proc, Connector, String, String) {
    let (l, s) = nodes[0].relay.hc("svc", endpoint).await;
    let m = nodes[0]
        .relay
        .manager("manager", &on(&l, nodes[0].relay.port));
    nodes[0].relay.wait_listeners("svc", 1).await;
    let connector = nodes[0].relay.connector();
    let (same, cross) = (on(&s, nodes[0].relay.port), on(&s, nodes[1].relay.port));
    lib_echo(&cross, &connector, 4096).await.unwrap();
    (m, connector, same, cross)
}

/// Tries a 4 KiB echo through `cs` every 100 ms, at most `tries` times: how long after `since`
/// the first one worked.
async fn first_echo(cs: &str, c: &Connector, since: Instant, tries: u32) -> Option<Duration> {
    for _ in 0..tries {
        if lib_echo(cs, c, 4096).await.is_ok() {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sends `len` random bytes through a sender connection for `cs` and checks the echo.
async fn lib_echo(cs: &str, connector: &Connector, len: usize) -> Result<(), String> {
    lib_echo_with(cs, connector, len, &ConnectOptions::default()).await
}

/// [`lib_echo`] with these connect options.
async fn lib_echo_with(
    cs: &str,
    connector: &Connector,
    len: usize,
    opts: &ConnectOptions,
) -> Result<(), String> {
    let cs = ConnectionString::parse(cs).map_err(|e| e.to_string())?;
    let s = connect_with(&cs, connector, opts)
        .await
        .map_err(|e| e.to_string())?;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            rand::thread_rng().fill_bytes(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(<[u8; 32]>::from(h.finalize()))
    });
    let mut h = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
            .await
            .map_err(|_| "echo stalled".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    let sent = writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if total != len || sent != <[u8; 32]>::from(h.finalize()) {
        return Err(format!("echo differs: {total} of {len} bytes"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_on_each_node_reaches_a_listener_on_every_other_node() {
    let (_base, _redis, nodes) = cluster("cluster-cross", 3).await;
    let echo = echo_server().await;
    let connector = nodes[0].relay.connector();
    let mut managers = Vec::new();
    let mut sends = Vec::new();
    for (i, nd) in nodes.iter().enumerate() {
        let name = format!("hc{i}");
        // Created through node 1: the configuration is shared.
        let (l, s) = nodes[0].relay.hc(&name, &echo.to_string()).await;
        managers.push(
            nodes[0]
                .relay
                .manager(&format!("manager-{i}"), &on(&l, nd.relay.port)),
        );
        nd.relay.wait_listeners(&name, 1).await;
        sends.push(s);
    }
    for (i, s) in sends.iter().enumerate() {
        for (j, nd) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let started = Instant::now();
            lib_echo(&on(s, nd.relay.port), &connector, 1 << 20)
                .await
                .unwrap_or_else(|e| panic!("sender on n{} → listener on n{}: {e}", j + 1, i + 1));
            eprintln!(
                "cluster: sender on n{} → listener on n{}: 1 MiB echoed in {:?}",
                j + 1,
                i + 1,
                started.elapsed()
            );
        }
    }
    // Each node dispatched two accepts to the others and delivered two from them; no message
    // was refused.
    for (i, nd) in nodes.iter().enumerate() {
        let d = metric(&nd.status, "hyco_cluster_dispatched").await;
        let v = metric(&nd.status, "hyco_cluster_delivered").await;
        let bad = metric(&nd.status, "hyco_cluster_bad_messages").await;
        assert_eq!(
            (d, v, bad),
            (2, 2, 0),
            "node n{}: dispatched, delivered, bad",
            i + 1
        );
    }
    // Every node sees three live nodes once it renewed its lease after n3 joined.
    eventually("n2 reports 3 live nodes", T, || async {
        let status = http_get(&nodes[1].status, "/api/status").await;
        status.contains("\"node\":\"n2\"") && status.contains("\"nodes\":3")
    })
    .await;
}

/// Standby sockets belong to a node: the manager parks them on the node of its control
/// channel, where a hyco sender is joined to one; a hyco sender on another node gets the
/// classic rendezvous through the cluster (docs/design-notes.md, "Connect in one round
/// trip"), and that node keeps no parked socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_sockets_serve_their_node_and_other_nodes_rendezvous() {
    let (_base, _redis, nodes) = cluster("cluster-standby", 2).await;
    let echo = echo_server().await;
    let (_m, connector, same, cross) = listener_on_n1(&nodes, &echo.to_string()).await;
    eventually("the manager parks sockets on n1", T, || async {
        metric(&nodes[0].status, "hyco_standby_sockets").await >= 1
    })
    .await;
    // Senders that take parked sockets, as `hyco forward`.
    let hyco_sender = ConnectOptions {
        early_data: true,
        ..ConnectOptions::default()
    };
    lib_echo_with(&same, &connector, 64 * 1024, &hyco_sender)
        .await
        .unwrap();
    assert_eq!(
        metric(&nodes[0].status, "hyco_standby_pairings").await,
        1,
        "the sender on n1 was joined to a parked socket"
    );
    let dispatched = metric(&nodes[1].status, "hyco_cluster_dispatched").await;
    lib_echo_with(&cross, &connector, 64 * 1024, &hyco_sender)
        .await
        .unwrap();
    assert_eq!(
        metric(&nodes[1].status, "hyco_cluster_dispatched").await,
        dispatched + 1,
        "the sender on n2 went through the cluster's rendezvous"
    );
    assert_eq!(metric(&nodes[1].status, "hyco_standby_pairings").await, 0);
    assert_eq!(metric(&nodes[1].status, "hyco_standby_sockets").await, 0);
    assert_eq!(metric(&nodes[0].status, "hyco_standby_pairings").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_spread_over_the_nodes_all_succeed() {
    let (_base, _redis, nodes) = cluster("cluster-spread", 3).await;
    let echo = echo_server().await;
    let (l, s) = nodes[0].relay.hc("spread", &echo.to_string()).await;
    let mut managers = Vec::new();
    let mut manager_status = Vec::new();
    for (i, nd) in nodes.iter().enumerate() {
        let m = nodes[0].relay.manager_with(
            &format!("manager-{i}"),
            &on(&l, nd.relay.port),
            &["--status-listen", "127.0.0.1:0"],
            &[],
        );
        let line = m.wait_line("status page and metrics listening", T).await;
        manager_status.push(field(&line, "status").unwrap());
        managers.push(m);
        nd.relay.wait_listeners("spread", 1).await;
    }
    let connector = nodes[0].relay.connector();
    let sends: Vec<String> = nodes.iter().map(|nd| on(&s, nd.relay.port)).collect();
    let started = Instant::now();
    let mut ok = 0;
    let mut failures = Vec::new();
    // 1,000 connections, 25 at a time, each on the next node in turn.
    for batch in 0..40 {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..25 {
            let cs = sends[(batch * 25 + k) % 3].clone();
            let c = connector.clone();
            set.spawn(async move { lib_echo(&cs, &c, 64).await });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    let elapsed = started.elapsed();
    let mut per_manager = Vec::new();
    for st in &manager_status {
        per_manager.push(metric(st, "hyco_manager_sender_connections_success").await);
    }
    eprintln!(
        "cluster: 1000 connections over 3 nodes in {elapsed:?}: {ok} ok; per manager {per_manager:?}"
    );
    assert_eq!(ok, 1000, "failures: {failures:?}");
    assert_eq!(per_manager.iter().sum::<u64>(), 1000);
    assert!(
        per_manager.iter().all(|n| *n > 0),
        "every node's listener gets some: {per_manager:?}"
    );
    // Microsoft-Relay-AllowedListeners / DisallowedListeners reach across nodes: senders on n1
    // routed to the listener on n3 only, by naming it, then by excluding the other two.
    let ids: Vec<String> = managers
        .iter()
        .map(|m| {
            let line = m
                .lines()
                .into_iter()
                .find(|l| l.contains("listener connected"))
                .unwrap();
            field(&line, "listener_id").unwrap()
        })
        .collect();
    let on_n1 = ConnectionString::parse(&sends[0]).unwrap();
    for header in [
        ("Microsoft-Relay-AllowedListeners", ids[2].clone()),
        (
            "Microsoft-Relay-DisallowedListeners",
            format!("{},{}", ids[0], ids[1]),
        ),
    ] {
        let before: Vec<u64> = {
            let mut v = Vec::new();
            for st in &manager_status {
                v.push(metric(st, "hyco_manager_sender_connections_success").await);
            }
            v
        };
        for _ in 0..20 {
            let opts = ConnectOptions {
                headers: vec![(header.0.to_owned(), header.1.clone())],
                ..ConnectOptions::default()
            };
            let mut st = connect_with(&on_n1, &connector, &opts).await.unwrap();
            st.write_all(b"a").await.unwrap();
            let mut b = [0u8; 1];
            st.read_exact(&mut b).await.unwrap();
        }
        eventually("the bridges are counted", T, || async {
            metric(
                &manager_status[2],
                "hyco_manager_sender_connections_success",
            )
            .await
                == before[2] + 20
        })
        .await;
        let mut after = Vec::new();
        for st in &manager_status {
            after.push(metric(st, "hyco_manager_sender_connections_success").await);
        }
        assert_eq!(
            (after[0], after[1]),
            (before[0], before[1]),
            "{}: only the listener on n3 may serve",
            header.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_drops_only_its_own_connections_and_its_listeners_rehome() {
    let (_base, _redis, mut nodes) = cluster("cluster-kill", 3).await;
    let echo = echo_server().await;
    let (l, s) = nodes[0].relay.hc("ha", &echo.to_string()).await;
    let ports: Vec<u16> = nodes.iter().map(|nd| nd.relay.port).collect();
    let mut managers = Vec::new();
    for (i, nd) in nodes.iter().enumerate() {
        // Each manager dials its own node first, the others after it.
        let mut extra = Vec::new();
        for k in 0..3 {
            extra.push("--relay-addr".to_string());
            extra.push(format!("127.0.0.1:{}", ports[(i + k) % 3]));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        managers.push(nodes[0].relay.manager_with(
            &format!("manager-{i}"),
            &on(&l, nd.relay.port),
            &extra,
            &[],
        ));
        nd.relay.wait_listeners("ha", 1).await;
    }
    let connector = nodes[0].relay.connector();
    // A long transfer whose sender is on n1: it must fail when n1 dies (its own connection).
    let on_n1 = {
        let cs = ConnectionString::parse(&on(&s, ports[0])).unwrap();
        let mut st = connect_with(&cs, &connector, &ConnectOptions::default())
            .await
            .unwrap();
        st.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        st.read_exact(&mut b).await.unwrap();
        st
    };
    // Short connections through n2 and n3 run before, during and after the kill.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for p in [ports[1], ports[2]] {
        let (cs, c, stop) = (on(&s, p), connector.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match lib_echo(&cs, &c, 256).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n1 = nodes.remove(0);
    let mut n1_proc = n1.relay.proc;
    n1_proc.kill().await;
    let killed = Instant::now();
    // n1's own sender sees an error, not a clean end of stream.
    let mut on_n1 = on_n1;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(T, async {
        let _ = on_n1.write_all(b"after the kill").await;
        on_n1.read(&mut b).await
    })
    .await
    .expect("n1's sender hangs");
    assert!(
        !matches!(r, Ok(n) if n > 0),
        "a sender on the dead node still gets data"
    );
    // The manager of n1 re-registers on n2 or n3.
    let live: Vec<&Node> = nodes.iter().collect();
    let mut rehomed = None;
    for _ in 0..300 {
        if listeners(&live, "ha").await == 3 {
            rehomed = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rehomed = rehomed.expect("manager-0 did not re-register on a live node within 30 s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_ok = 0;
    for l in loops {
        let (ok, failed) = l.await.unwrap();
        assert!(
            failed.is_empty(),
            "connections through live nodes failed: {failed:?}"
        );
        total_ok += ok;
    }
    eprintln!(
        "cluster: n1 killed; {total_ok} connections through n2/n3 meanwhile, 0 failed; manager-0 re-registered after {rehomed:?}"
    );
    // New connections through each live node reach all three managers' listeners.
    for nd in &nodes {
        lib_echo(&on(&s, nd.relay.port), &connector, 64 << 10)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_recovers_after_redis_restarts() {
    let (base, mut redis, nodes) = cluster("cluster-redis", 2).await;
    let echo = echo_server().await;
    let (_m, connector, same, cross) = listener_on_n1(&nodes, &echo.to_string()).await;

    redis.proc.kill().await;
    // Without Redis: the listener's own node still pairs; another node answers at once.
    lib_echo(&same, &connector, 4096)
        .await
        .expect("a same-node pairing fails while Redis is down");
    let t = Instant::now();
    let e = lib_echo(&cross, &connector, 4096).await;
    let fast = t.elapsed();
    assert!(e.is_err(), "cross-node worked without Redis?");
    assert!(fast < Duration::from_secs(5), "the refusal took {fast:?}");
    eventually("n2 reports Redis unreachable", T, || async {
        http_get(&nodes[1].status, "/api/status")
            .await
            .contains("unreachable")
    })
    .await;

    redis = Redis::start(&base.0.join("redis")).await;
    let back = Instant::now();
    let ok_after = first_echo(&cross, &connector, back, 150)
        .await
        .expect("cross-node pairing did not recover within 15 s of Redis");
    eprintln!("cluster: refusal without Redis in {fast:?}; cross-node back {ok_after:?} after Redis restarted");
    // Admin writes work again, and the other node sees them.
    let (code, _, err) = nodes[1]
        .relay
        .admin(&["hc", "create", "after", "--endpoint", &echo.to_string()])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = nodes[0].relay.admin(&["hc", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("after"), "{out}");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_regenerated_on_one_node_is_refused_on_another() {
    let (_base, _redis, nodes) = cluster("cluster-keys", 3).await;
    let echo = echo_server().await;
    let (l, s) = nodes[0].relay.hc("keys", &echo.to_string()).await;
    let _m = nodes[0]
        .relay
        .manager("manager", &on(&l, nodes[1].relay.port));
    nodes[1].relay.wait_listeners("keys", 1).await;
    let connector = nodes[0].relay.connector();
    let old_on_n3 = on(&s, nodes[2].relay.port);
    lib_echo(&old_on_n3, &connector, 1024).await.unwrap();

    let (code, out, err) = nodes[0]
        .relay
        .admin(&[
            "rule",
            "regenerate",
            "s",
            "--hc",
            "keys",
            "--key",
            "primary",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let changed = Instant::now();
    let mut refused_after = None;
    for _ in 0..100 {
        let cs = ConnectionString::parse(&old_on_n3).unwrap();
        match connect_with(&cs, &connector, &ConnectOptions::default()).await {
            Err(e) if e.to_string().contains("401") => {
                refused_after = Some(changed.elapsed());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let refused_after = refused_after.expect("n3 still accepts the old key after 5 s");
    eprintln!("cluster: old key refused on n3 {refused_after:?} after regeneration on n1");
    // The documented bound: the broadcast, or at worst the 2 s configuration poll.
    assert!(refused_after < Duration::from_secs(3));
    // The new key (the command printed its connection string) works there.
    lib_echo(&on(out.trim(), nodes[2].relay.port), &connector, 1024)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_works_across_nodes() {
    use hyco_client::http::{request, HttpResponse};
    let (_base, _redis, nodes) = cluster("cluster-http", 2).await;
    let (l, s) = nodes[0].relay.hc("web", "127.0.0.1:9").await;
    let connector = nodes[0].relay.connector();
    let stop = hyco_io::CancellationToken::new();
    // The HTTP listener is on n1; requests arrive on n2.
    let (_listener, _ws_rx, mut http_rx) = hyco_client::HybridListener::start_with_http(
        ConnectionString::parse(&on(&l, nodes[0].relay.port)).unwrap(),
        connector.clone(),
        hyco_client::ListenerOptions::default(),
        stop.clone(),
    )
    .unwrap();
    tokio::spawn(async move {
        while let Some(mut req) = http_rx.recv().await {
            tokio::spawn(async move {
                let body = req.body(4 << 20).await.unwrap();
                if req.target.starts_with("/web/stream") {
                    let mut w = req.respond_streaming(200, None, Vec::new()).await.unwrap();
                    for i in 0..4u8 {
                        w.write(&vec![i; 40_000]).await.unwrap();
                    }
                    w.finish().await.unwrap();
                } else {
                    let resp = HttpResponse::new(200, body).header("X-Target", &req.target);
                    req.respond(resp).await.unwrap();
                }
            });
        }
    });
    nodes[0].relay.wait_listeners("web", 1).await;
    let send = ConnectionString::parse(&on(&s, nodes[1].relay.port)).unwrap();
    for len in [0usize, 100, 65_536, 1 << 20] {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let method = if len == 0 {
            http::Method::GET
        } else {
            http::Method::POST
        };
        let a = request(
            &send,
            &connector,
            method,
            "/echo?q=1",
            &[],
            body.clone().into(),
            4 << 20,
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{len}: {}", a.reason);
        assert!(a.body.as_ref() == body.as_slice(), "{len}: body differs");
        assert_eq!(a.headers["x-target"], "/web/echo?q=1");
    }
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
    assert_eq!(a.body.len(), 160_000);
    assert_eq!(metric(&nodes[1].status, "hyco_cluster_dispatched").await, 5);
    stop.cancel();
}

// Issue 17, point 3: a bodyless request for another node's listener is announced address-only,
// and Java's listener, having read the full `request` on the rendezvous, reads a body there
// whatever `body` says (HybridHttpConnection.java:143-158: with `body: false` it calls
// `array()` on a null buffer and the sender waits for 504). The rendezvous always carries
// `body: true` and, for no body, an empty final binary frame, which .NET and Node read as an
// empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodyless_request_for_another_nodes_listener_sends_an_empty_body_on_the_rendezvous() {
    use hyco_io::ws::{Message, Part};
    use hyco_proto::control::{ListenerCommand, ResponseCommand};
    let (_base, _redis, nodes) = cluster("cluster-bodyless", 2).await;
    let (l, s) = nodes[0].relay.hc("web", "127.0.0.1:9").await;
    let connector = nodes[0].relay.connector();
    // A raw listener on n1; the request arrives on n2.
    let lcs = ConnectionString::parse(&l).unwrap();
    let hyco_proto::ConnectionStringAuth::Key { name, key } = &lcs.auth else {
        panic!("a key")
    };
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", Some("web")),
        name,
        key,
        expiry,
    );
    let url = format!(
        "wss://localhost:{}/$hc/web?sb-hc-action=listen",
        nodes[0].relay.port
    );
    let mut listener = connector
        .connect(&url, &[("ServiceBusAuthorization", token.as_str())])
        .await
        .unwrap();
    nodes[0].relay.wait_listeners("web", 1).await;
    let send = ConnectionString::parse(&on(&s, nodes[1].relay.port)).unwrap();
    let c2 = connector.clone();
    let sender = tokio::spawn(async move {
        hyco_client::http::request(
            &send,
            &c2,
            http::Method::GET,
            "/nobody",
            &[],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap()
    });
    let next_request = |m: Message| match m {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Request(r) => r,
            other => panic!("expected request, got {other:?}"),
        },
        other => panic!("expected text, got {other:?}"),
    };
    let short = next_request(
        tokio::time::timeout(T, listener.ws.recv())
            .await
            .unwrap()
            .unwrap(),
    );
    assert!(short.method.is_none(), "address-only across nodes");
    let mut rdv = connector.connect(&short.address, &[]).await.unwrap().ws;
    let full = next_request(tokio::time::timeout(T, rdv.recv()).await.unwrap().unwrap());
    assert_eq!(full.method.as_deref(), Some("GET"));
    assert_eq!(full.body, Some(true), "the body is announced");
    match tokio::time::timeout(T, rdv.recv_part(1 << 16))
        .await
        .unwrap()
        .unwrap()
    {
        Part::Data {
            text: false,
            fin: true,
            data,
            ..
        } => assert!(data.is_empty()),
        other => panic!("expected an empty final binary frame, got {other:?}"),
    }
    let resp = ListenerCommand::Response(ResponseCommand {
        request_id: full.id.clone(),
        status_code: 200,
        status_description: None,
        response_headers: None,
        body: false,
    })
    .to_json();
    rdv.send_text(&resp).await.unwrap();
    let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_are_dropped_and_deletes_reach_every_node() {
    let secret_dir = TempDir::new("cluster-secret");
    let secret_file = secret_dir.0.join("cluster.key");
    let secret = "0123456789abcdef0123456789abcdef";
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let more = [
        "--cluster-secret-file".to_string(),
        secret_file.display().to_string(),
    ];
    let (base, _redis, nodes) = cluster_with("cluster-forged", 2, &more).await;
    let echo = echo_server().await;
    let (l, s) = nodes[0].relay.hc("target", &echo.to_string()).await;
    let mut m = nodes[0]
        .relay
        .manager("manager", &on(&l, nodes[1].relay.port));
    nodes[1].relay.wait_listeners("target", 1).await;
    let publish = |msg: &str| {
        assert_eq!(
            redis_cli(&base, &["PUBLISH", "hyco:default:inbox:n2", msg]),
            "1"
        );
    };
    let n2 = redis_cli(&base, &["GET", "hyco:default:node:n2"]);
    let epoch = serde_json::from_str::<serde_json::Value>(&n2).unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let deliver = |sent_at: u64, conn_id: u64| {
        format!(
            r#"{{"id":"x{sent_at}","from":"n1","sentAtMs":{sent_at},"body":{{"kind":"deliver","hc":"target","epoch":"{epoch}","connId":{conn_id},"command":"{{}}"}}}}"#
        )
    };
    // G1: someone who can write to Redis but lacks the key: a made-up MAC, and no MAC; someone
    // replaying a recorded message: a valid MAC a minute old.
    let fresh = deliver(now_ms(), 0);
    publish(&format!("{}.{fresh}", "ab".repeat(32)));
    publish(&fresh);
    let stale = deliver(now_ms() - 60_000, 0);
    publish(&format!(
        "{}.{stale}",
        hmac_sha256(secret.as_bytes(), stale.as_bytes())
    ));
    eventually("n2 counts 3 bad messages", T, || async {
        metric(&nodes[1].status, "hyco_cluster_bad_messages").await == 3
    })
    .await;
    // G2: a valid message for a listener n2 does not hold: refused, written nowhere.
    let unknown = deliver(now_ms(), 987_654);
    publish(&format!(
        "{}.{unknown}",
        hmac_sha256(secret.as_bytes(), unknown.as_bytes())
    ));
    // n2 handles its inbox in order: once a bad message sent after it is counted, the valid
    // one was handled, and it was accepted as genuine (not counted as bad) but delivered
    // nowhere.
    publish(&format!("{}.{fresh}", "cd".repeat(32)));
    eventually(
        "n2 handled the messages before the fourth bad one",
        T,
        || async { metric(&nodes[1].status, "hyco_cluster_bad_messages").await == 4 },
    )
    .await;
    assert_eq!(metric(&nodes[1].status, "hyco_cluster_delivered").await, 0);
    // G3: a directory entry of a node without a lease is never chosen, and is removed.
    let (code, _, err) = nodes[0]
        .relay
        .admin(&["hc", "create", "ghost", "--endpoint", &echo.to_string()])
        .await;
    assert_eq!(code, 0, "{err}");
    redis_cli(
        &base,
        &[
            "HSET",
            "hyco:default:lst:ghost",
            "n9:dead:1",
            r#"{"node":"n9","epoch":"dead","listenerId":"ghost-1"}"#,
        ],
    );
    let root = ConnectionString::parse(&on(&nodes[0].relay.root, nodes[0].relay.port))
        .unwrap()
        .with_entity("ghost");
    let e = connect_with(
        &root,
        &nodes[0].relay.connector(),
        &ConnectOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    assert_eq!(
        redis_cli(&base, &["HEXISTS", "hyco:default:lst:ghost", "n9:dead:1"]),
        "0"
    );
    // Still serving.
    let connector = nodes[0].relay.connector();
    lib_echo(&on(&s, nodes[0].relay.port), &connector, 1024)
        .await
        .unwrap();
    // Deleting the hybrid connection on n1 closes its listener on n2.
    let (code, _, err) = nodes[0].relay.admin(&["hc", "delete", "target"]).await;
    assert_eq!(code, 0, "{err}");
    m.wait_line("relay closed the channel: 1001", T).await;
    let _ = m.kill().await;
}

/// Issue 14: with a cluster secret the configuration records in Redis are signed. A Redis
/// client without the secret adds a Manage rule to the namespace record (`HSET … cfg`) and
/// bumps `cfg:ver`: every node refuses it, says so once in its log, keeps serving the last good
/// configuration, and the injected key opens nothing; an admin write refuses to build on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_injected_into_redis_is_refused_by_every_node_and_logged() {
    let secret_dir = TempDir::new("cluster-signed-secret");
    let secret_file = secret_dir.0.join("cluster.key");
    std::fs::write(&secret_file, "fedcba9876543210fedcba9876543210\n").unwrap();
    let more = [
        "--cluster-secret-file".to_string(),
        secret_file.display().to_string(),
    ];
    let (base, _redis, nodes) = cluster_with("cluster-signed", 2, &more).await;
    let echo = echo_server().await;
    let (l, s) = nodes[0].relay.hc("signed", &echo.to_string()).await;
    let _m = nodes[0]
        .relay
        .manager("manager", &on(&l, nodes[1].relay.port));
    nodes[1].relay.wait_listeners("signed", 1).await;
    let connector = nodes[0].relay.connector();
    // The signed configuration made on n1 is served by n2.
    lib_echo(&on(&s, nodes[1].relay.port), &connector, 1024)
        .await
        .unwrap();
    assert!(redis_cli(&base, &["HGET", "hyco:default:cfg", "sig"]).len() > 64);

    // The injection: the root rule copied under another name, with a key the attacker knows.
    let ns = redis_cli(&base, &["HGET", "hyco:default:cfg", "namespace"]);
    let mut rec: serde_json::Value = serde_json::from_str(&ns).unwrap();
    let evil_key = "ZXZpbGV2aWxldmlsZXZpbGV2aWxldmlsZXZpbGV2aWw=";
    let mut rule = rec["rules"][0].clone();
    rule["name"] = "evil\r\nFAKE LINE\u{1b}[31m".into();
    rule["primaryKey"] = evil_key.into();
    rule["secondaryKey"] = evil_key.into();
    rec["rules"].as_array_mut().unwrap().push(rule);
    redis_cli(
        &base,
        &["HSET", "hyco:default:cfg", "namespace", &rec.to_string()],
    );
    let ver = redis_cli(&base, &["INCR", "hyco:default:cfg:ver"]);
    for nd in &nodes {
        let line = nd
            .relay
            .proc
            .wait_line("refusing the configuration in Redis", T)
            .await;
        assert!(line.contains(&format!("version={ver}")), "{line}");
        assert!(line.contains("altered"), "{line}");
    }
    // The injected key (under the plain name too) opens nothing, on any node.
    let root = &nodes[0].relay.root;
    let root_name = root
        .split("SharedAccessKeyName=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    for nd in &nodes {
        for name in [root_name, "evil"] {
            let evil = on(
                &root.replace(key_of(root), evil_key).replace(
                    &format!("SharedAccessKeyName={root_name}"),
                    &format!("SharedAccessKeyName={name}"),
                ),
                nd.relay.port,
            );
            let (code, _, err) = hyco_testkit::run(
                &common::bin(),
                &["admin", "hc", "list"],
                &[
                    ("HYCO_CA_FILE", nd.relay.ca().as_str()),
                    ("HYCO_CONNECTION_STRING", evil.as_str()),
                ],
                T,
            )
            .await;
            assert_ne!(code, 0, "the injected key was accepted");
            assert!(err.contains("401"), "{err}");
        }
        // The last good configuration still serves.
        lib_echo(&on(&s, nd.relay.port), &connector, 1024)
            .await
            .unwrap();
    }
    // An admin write does not build on the altered records.
    let (code, _, err) = nodes[1]
        .relay
        .admin(&["hc", "create", "more", "--endpoint", &echo.to_string()])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("refused"), "{err}");
    // Logged once per version, on one line without control bytes.
    for nd in &nodes {
        let lines = nd.relay.proc.lines();
        let refused: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("refusing the configuration in Redis"))
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            !refused[0].chars().any(|c| c.is_control()),
            "{:?}",
            refused[0]
        );
        assert_eq!(metric(&nd.status, "hyco_cluster_bad_config").await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_migrates_into_a_cluster() {
    // A standalone relay with a hybrid connection and keys.
    let single = common::relay("cluster-migrate-src").await;
    let echo = echo_server().await;
    let (l, s) = single.hc("moved", &echo.to_string()).await;
    let Relay {
        mut proc,
        dir,
        root,
        ..
    } = single;
    proc.terminate(T).await;
    let base = TempDir::new("cluster-migrate");
    let redis = Redis::start(&base.0.join("redis")).await;
    let data = dir.0.join("data");
    let (data, url, hyco) = (data.to_str().unwrap(), redis.url(), common::bin());
    let args = ["cluster", "migrate", "--data", data, "--cluster", &url];
    let migrate = || hyco_testkit::run(&hyco, &args, &[], T);
    let (code, out, err) = migrate().await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 hybrid connection"), "{out}");
    // A second migration without --replace is refused.
    let (code, _, err) = migrate().await;
    assert_ne!(code, 0);
    assert!(err.contains("--replace"), "{err}");
    // A node on that Redis serves the old keys: same root, listen and send strings.
    let n1 = node("n1", &redis, None).await;
    assert_eq!(key_of(&n1.relay.root), key_of(&root), "the root key moved");
    let _m = n1.relay.manager("manager", &on(&l, n1.relay.port));
    n1.relay.wait_listeners("moved", 1).await;
    lib_echo(&on(&s, n1.relay.port), &n1.relay.connector(), 4096)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_without_redis_or_with_a_taken_id() {
    // G4: no Redis at the URL.
    let dir = TempDir::new("cluster-noredis");
    let data = dir.0.join("data");
    let url = format!("redis+unix://{}", dir.0.join("nothing.sock").display());
    let (code, _, err) = hyco_testkit::run(
        &common::bin(),
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--cluster",
            &url,
            "--node-id",
            "n1",
            "--advertise",
            "127.0.0.1",
        ],
        &[],
        T,
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot prepare the relay"), "{err}");
    // G5: a second node with a live node's id waits one lease, then refuses.
    let (_base, redis, nodes) = cluster("cluster-dupid", 1).await;
    let dir2 = TempDir::new("cluster-dupid-2");
    let data2 = dir2.0.join("data");
    let fdata = nodes[0].relay.dir.0.join("data");
    let started = Instant::now();
    let (code, _, err) = hyco_testkit::run(
        &common::bin(),
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data2.to_str().unwrap(),
            "--cluster",
            &redis.url(),
            "--node-id",
            "n1",
            "--advertise",
            "127.0.0.1",
            "--cert",
            fdata.join("server.pem").to_str().unwrap(),
            "--key",
            fdata.join("server-key.pem").to_str().unwrap(),
        ],
        &[],
        Duration::from_secs(40),
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("in use by a live node"), "{err}");
    eprintln!(
        "cluster: duplicate node id refused after {:?}",
        started.elapsed()
    );
    // The first node still serves.
    let (code, _, err) = nodes[0].relay.admin(&["hc", "list"]).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_fences_once_and_keeps_serving_locally() {
    // A 3 s lease renewed every second: the node fences after about 4 s without Redis.
    let more = ["--cluster-lease".to_string(), "3".to_string()];
    let (_base, redis, nodes) = cluster_with("cluster-fence", 2, &more).await;
    let echo = echo_server().await;
    let (m, connector, same, cross) = listener_on_n1(&nodes, &echo.to_string()).await;

    // Redis stops answering (a frozen server, or a partition: connections hang, nothing fails fast).
    redis.proc.signal("STOP").await;
    let stopped = Instant::now();
    m.wait_line("relay closed the channel: 1011 NameRenewalFailed", T)
        .await;
    let fenced = stopped.elapsed();
    // The listener comes back to the node, which serves it locally.
    let served = first_echo(&same, &connector, stopped, 100)
        .await
        .expect("no local pairing within 10 s of the fence");
    assert_eq!(
        metric(&nodes[0].status, "hyco_cluster_fences").await,
        1,
        "fences once per outage"
    );
    redis.proc.signal("CONT").await;
    let back = Instant::now();
    let cross_back = first_echo(&cross, &connector, back, 150)
        .await
        .expect("cross-node pairing did not recover within 15 s");
    eprintln!(
        "cluster: Redis frozen; fenced after {fenced:?}, local pairing again after {served:?}; cross-node back {cross_back:?} after Redis resumed"
    );
}
