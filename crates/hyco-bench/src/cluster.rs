//! Cluster: two relay nodes on one `redis-server`, a manager on node 1. The same measurements
//! through node 1 (sender and listener on one node) and through node 2 (the accept crosses
//! nodes through Redis): connect + 1-byte echo latency (the dispatch cost), and bulk
//! throughput from a library sender (the data path, which stays on the sender's node).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::process::Command;

use crate::{field_port, library_bulk, provision, sequential, spawn, Proc, Target};

/// What the cluster measurement needs from the main run.
pub struct Inputs<'a> {
    pub hyco: &'a Path,
    pub scratch: &'a Path,
    pub echo: SocketAddr,
    pub discard: SocketAddr,
    pub discarded: Arc<std::sync::atomic::AtomicU64>,
    pub sequential: usize,
    pub bulk_secs: u64,
}

async fn node(
    inp: &Inputs<'_>,
    id: &str,
    redis_url: &str,
    cert: Option<(&Path, &Path)>,
) -> Result<(Proc, u16)> {
    let data = inp.scratch.join(format!("cluster-{id}"));
    let data_s = data.to_string_lossy().to_string();
    let mut args = vec![
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--data",
        &data_s,
        "--cluster",
        redis_url,
        "--node-id",
        id,
        "--advertise",
        "127.0.0.1",
    ];
    let cert_s = cert.map(|(c, k)| {
        (
            c.to_string_lossy().to_string(),
            k.to_string_lossy().to_string(),
        )
    });
    if let Some((c, k)) = &cert_s {
        args.extend(["--cert", c, "--key", k]);
    }
    let (p, line) = spawn("relay", inp.hyco, &args, &[], "relay listening").await?;
    Ok((p, field_port(&line, "listen")?))
}

/// Runs the cluster measurements; `None` when `redis-server` is not installed.
pub async fn run(inp: Inputs<'_>) -> Result<Option<Value>> {
    let have_redis = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_redis {
        return Ok(None);
    }
    // Absolute: redis-server changes into --dir before it creates the socket.
    let rdir = std::path::absolute(inp.scratch.join("redis"))?;
    std::fs::create_dir_all(&rdir)?;
    let sock = rdir.join("redis.sock");
    let sock_s = sock.to_string_lossy().to_string();
    let rdir_s = rdir.to_string_lossy().to_string();
    let (_redis, _) = spawn(
        "redis",
        Path::new("redis-server"),
        &[
            "--port",
            "0",
            "--unixsocket",
            &sock_s,
            "--unixsocketperm",
            "700",
            "--dir",
            &rdir_s,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        &[],
        "ready to accept connections",
    )
    .await?;
    let url = format!("redis+unix://{sock_s}");
    let (_n1, p1) = node(&inp, "n1", &url, None).await?;
    let d1 = inp.scratch.join("cluster-n1");
    let (cert, key) = (d1.join("server.pem"), d1.join("server-key.pem"));
    let (_n2, p2) = node(&inp, "n2", &url, Some((&cert, &key))).await?;
    let ca = d1.join("ca.pem");
    let ca_s = ca.to_string_lossy().to_string();
    let root = std::fs::read_to_string(d1.join("root.connection-string"))?
        .trim()
        .to_owned();
    let (listen, send) = provision(
        inp.hyco,
        &ca_s,
        &root,
        &[("echo", inp.echo), ("discard", inp.discard)],
        ("cl", "cs"),
    )
    .await?;
    let state_s = inp
        .scratch
        .join("cluster-manager")
        .to_string_lossy()
        .to_string();
    let on =
        |cs: &str, port: u16| cs.replace(&format!("localhost:{p1}"), &format!("localhost:{port}"));
    let (_manager, _) = spawn(
        "manager",
        inp.hyco,
        &[
            "manager",
            "run",
            "--connection-string",
            &format!("{listen};EntityPath=echo"),
            "--connection-string",
            &format!("{listen};EntityPath=discard"),
        ],
        &[("HYCO_CA_FILE", &ca_s), ("HYCO_STATE_DIR", &state_s)],
        "listener connected",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connector = hyco_client::ClientOptions {
        ca_file: Some(ca.clone()),
        warm_connections: 1,
        ..Default::default()
    }
    .connector()?;
    let mut out = serde_json::Map::new();
    for (label, port) in [("same_node", p1), ("cross_node", p2)] {
        let cs: hyco_proto::ConnectionString = format!("{};EntityPath=echo", on(&send, port))
            .parse()
            .context("send connection string")?;
        let echo = Target::Library {
            echo: cs.clone(),
            connector: connector.clone(),
        };
        let bulk = Target::Library {
            echo: cs.with_entity("discard"),
            connector: connector.clone(),
        };
        let seq = sequential(&echo, inp.sequential).await?;
        let b1 = library_bulk(&bulk, Arc::clone(&inp.discarded), 1, inp.bulk_secs)
            .await
            .unwrap_or(f64::NAN);
        out.insert(
            label.into(),
            json!({"connect_echo": seq, "bulk_1_gbps": b1 / 1e9}),
        );
    }
    let ratio = |k: &str| {
        let s = out["same_node"]["connect_echo"][k].as_f64()?;
        let c = out["cross_node"]["connect_echo"][k].as_f64()?;
        Some(c / s)
    };
    let (r50, r99) = (ratio("p50_us"), ratio("p99_us"));
    let bulk_ratio = out["cross_node"]["bulk_1_gbps"]
        .as_f64()
        .zip(out["same_node"]["bulk_1_gbps"].as_f64())
        .map(|(c, s)| c / s);
    out.insert(
        "cross_over_same".into(),
        json!({"p50": r50, "p99": r99, "bulk_1": bulk_ratio}),
    );
    Ok(Some(Value::Object(out)))
}
