//! The Grafana dashboard (packaging/grafana-dashboard.json) against live processes: every metric
//! a panel queries must be exported by a running relay (a cluster node on a real Redis, for the
//! `hyco_cluster_*` series) or manager, after traffic that exercises tunnels and failures. So
//! the dashboard cannot drift from the code.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{echo_roundtrip, http_get, Relay, T};
use hyco_testkit::{dead_port, echo_server, eventually, field, Proc, TempDir};

/// The metric names in a PromQL expression: `hyco_…` identifiers.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("hyco_") {
        let before_ok = i == 0 || {
            let c = rest.as_bytes()[i - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        if before_ok {
            out.push(name);
        }
    }
    out
}

/// The series names of a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn dashboard_exprs() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/grafana-dashboard.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push(e.to_owned());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&d["panels"], &mut exprs);
    exprs
}

/// A connection through a forwarder whose tunnel is refused: the forwarder closes or resets it.
async fn refused(port: u16) {
    use tokio::io::AsyncReadExt;
    // A reset that arrives before the connect is polled complete is reported by the connect.
    let mut s = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to the forwarder: {e}"),
    };
    let mut buf = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the refused connection was not closed");
    assert!(buf.is_empty());
}

#[test]
fn names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.5, sum by (le) (rate(hyco_a_bucket{job=~\"x\"}[5m]))) / xhyco_no"
        ),
        ["hyco_a_bucket"]
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let exprs = dashboard_exprs();
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(wanted.len() > 20, "the dashboard queries {wanted:?}");
    for area in [
        "hyco_cluster_",
        "hyco_manager_",
        "hyco_sender_",
        "hyco_listener_",
        "_bytes_",
    ] {
        assert!(
            wanted.iter().any(|w| w.contains(area)),
            "no panel queries {area}*"
        );
    }

    // A cluster node on a real Redis (a one-node cluster exports every hyco_cluster_* series).
    let dir = TempDir::new("dashboard");
    let redis_dir = dir.0.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let sock = redis_dir.join("redis.sock").display().to_string();
    let redis_args = [
        "--port",
        "0",
        "--unixsocket",
        &sock,
        "--unixsocketperm",
        "700",
        "--save",
        "",
    ];
    let redis = Proc::spawn("redis", Path::new("redis-server"), &redis_args, &[]);
    redis.wait_line("ready to accept connections", T).await;
    let url = format!("redis+unix://{sock}");
    let relay = Relay::start_with(
        TempDir::new("dashboard-relay"),
        0,
        &[
            "--cluster",
            &url,
            "--node-id",
            "n1",
            "--advertise",
            "127.0.0.1",
            "--status-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let relay_status = field(
        &relay
            .proc
            .wait_line("status page and metrics listening", T)
            .await,
        "status",
    )
    .expect("status address");
    relay.proc.wait_line("joined the cluster", T).await;

    // Traffic: a tunnel, a sender refused (no such hybrid connection), a sender rejected by the
    // manager (endpoint down), a listener refused (a Send key cannot listen), a listener lost.
    let echo = echo_server().await;
    let (listen, send) = relay.hc("web", &echo.to_string()).await;
    let (listen_dead, send_dead) = relay.hc("dead", &dead_port().await.to_string()).await;
    let ca = relay.ca();
    let manager = Proc::spawn(
        "manager",
        &common::bin(),
        &[
            "manager",
            "run",
            "--connection-string",
            &listen,
            "--connection-string",
            &listen_dead,
            "--ca-file",
            &ca,
            "--status-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let manager_status = field(
        &manager
            .wait_line("status page and metrics listening", T)
            .await,
        "status",
    )
    .expect("status address");
    relay.wait_listeners("web", 1).await;
    relay.wait_listeners("dead", 1).await;
    let (_fwd, port) = relay.forward("web", &send).await;
    let (sent, got, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((sent, n), (got, 100_000));
    let (_fwd_dead, port_dead) = relay.forward("dead", &send_dead).await;
    refused(port_dead).await; // 502 from the manager
    let (_fwd_none, port_none) = relay.forward("nothing-here", &send).await;
    refused(port_none).await; // 404
    let _bad_listener = relay.manager("send-as-listener", &send);
    eventually("a listener refused", T, || async {
        common::metric(
            &relay_status,
            "hyco_listener_connections_client_error_total",
        )
        .await
            > 0
    })
    .await;

    eventually("the manager rejected a sender", T, || async {
        common::metric(
            &manager_status,
            "hyco_manager_sender_connections_server_error_total",
        )
        .await
            > 0
    })
    .await;
    // A listener lost: its hybrid connection is deleted.
    let (code, _, err) = relay.admin(&["hc", "delete", "dead"]).await;
    assert_eq!(code, 0, "{err}");
    eventually("the manager lost a control channel", T, || async {
        common::metric(&manager_status, "hyco_manager_listener_disconnects_total").await > 0
    })
    .await;

    // The status documents are read too (as Prometheus would find the pages in use).
    let _ = http_get(&relay_status, "/api/status").await;
    let mut have = exported(&http_get(&relay_status, "/metrics").await);
    have.extend(exported(&http_get(&manager_status, "/metrics").await));
    let missing: Vec<&String> = wanted.iter().filter(|w| !have.contains(*w)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no process exports: {missing:?}\nexported: {have:?}"
    );
    drop(redis);
}
