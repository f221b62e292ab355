//! The WAN figures (issue 16): what a new connection costs when the relay is a cloud region
//! away from both the application and the service.
//!
//! Two delayed links ([`crate::delay`], 20 ms one way by default): the application's side to
//! the relay (A), and the relay to the service's side (B). Through them, the time to first
//! byte of a new connection (connect, send 100 bytes to an echo service, first byte back), one
//! at a time (starts `spacing` apart) and in bursts of 8 at once, for:
//!
//! - `direct`: app → A → B → echo, the physical limit (out and back through both links);
//! - `hyco`: app → `hyco forward` → A → relay → B → `hyco manager` → echo;
//! - `hyco-lib`: the `hyco_client` library in this process → A → relay → B → manager → echo;
//! - `rathole-tls`: app → A → rathole server → B → rathole client → echo (TLS transport).
//!
//! p50 and p99 of each, also as ratios to direct in the same run. Warm connections as the
//! defaults are (`hyco forward` keeps one; the library gets one, as in the loopback figures).
//!
//! Then, on loopback (no delay), pgbench select-only against a throw-away PostgreSQL through
//! each tunnel: a new connection per transaction (`-C -c 8`) and 8 held connections, as ratios
//! to rathole-TLS. An SVG chart of the distributions goes next to `wan.json`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::Instant;

use crate::chart::{cdf_svg, Panel, Series};
use crate::delay::{DelayLink, LinkConfig};
use crate::pgbench::Postgres;
use crate::stats::percentile;
use crate::{
    echo_server, field_port, listening_ports, open_echo, probe_is_echo, provision, spawn, Proc,
    Target,
};

/// Flags of the WAN part (`hyco-bench --wan`, `bench/run --wan`).
#[derive(clap::Args)]
pub struct WanArgs {
    /// Run the WAN figures (delayed links, new-connection time to first byte) and the pgbench
    /// figures instead of the loopback ones. `--only` picks configurations (direct always runs).
    #[arg(long)]
    pub wan: bool,
    /// One-way delay of each of the two links, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub wan_delay_ms: u64,
    /// Milliseconds between the starts of two sequential connections, and of two bursts
    /// (default 500; 200 with --quick).
    #[arg(long)]
    pub wan_spacing_ms: Option<u64>,
    /// Sequential connections per configuration (default 150; 30 with --quick).
    #[arg(long)]
    pub wan_sequential: Option<usize>,
    /// Bursts of 8 concurrent new connections per configuration (default 25; 8 with --quick).
    #[arg(long)]
    pub wan_bursts: Option<usize>,
    /// Seconds per pgbench run (default 10; 4 with --quick); 0 skips pgbench.
    #[arg(long)]
    pub pgbench_secs: Option<u64>,
    /// Seconds per iperf3 run of the bulk floor (default 5; 2 with --quick); 0 skips it.
    #[arg(long)]
    pub floor_secs: Option<u64>,
}

/// Connections per burst.
const BURST: usize = 8;
/// Bytes sent on each new connection.
const HELLO: usize = 100;
/// Unmeasured connections before the measured ones (lazy setup in every process).
const WARMUP: usize = 3;

struct Plan {
    delay: Duration,
    spacing: Duration,
    sequential: usize,
    bursts: usize,
    pg_secs: u64,
    floor_secs: u64,
}

/// One new connection: connect, send 100 bytes, wait for the first byte back. Milliseconds.
async fn ttfb(t: &Target) -> Result<f64> {
    let t0 = Instant::now();
    let mut s = open_echo(t).await?;
    s.write_all(&[b'x'; HELLO]).await?;
    s.flush().await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    // Not measured: read the rest and close, so the echo's bytes do not meet a reset.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut rest = [0u8; HELLO];
        let _ = s.read_exact(&mut rest[1..]).await;
        let _ = s.shutdown().await;
    })
    .await;
    Ok(ms)
}

async fn ttfb_bounded(t: &Target) -> Result<f64> {
    tokio::time::timeout(Duration::from_secs(10), ttfb(t))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after 10 s")))
}

/// Samples and failures of one measurement, with their percentiles.
fn summary(mut ms: Vec<f64>, failures: usize, errors: Vec<String>) -> Value {
    ms.sort_by(f64::total_cmp);
    let r = |x: Option<f64>| x.map(|x| (x * 100.0).round() / 100.0);
    json!({
        "n": ms.len() + failures,
        "failures": failures,
        "errors": errors,
        "p50_ms": r(percentile(&ms, 0.5)),
        "p90_ms": r(percentile(&ms, 0.9)),
        "p99_ms": r(percentile(&ms, 0.99)),
        "max_ms": r(ms.last().copied()),
        "samples_ms": ms.iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
    })
}

/// `n` connections, one at a time, starts `spacing` apart (or right after the previous one
/// when that took longer).
async fn sequential(t: &Target, n: usize, spacing: Duration) -> Value {
    let (mut ms, mut failures, mut errors) = (Vec::with_capacity(n), 0, Vec::new());
    let start = Instant::now();
    for i in 0..WARMUP + n {
        tokio::time::sleep_until(start + spacing * i as u32).await;
        let r = ttfb_bounded(t).await;
        if i < WARMUP {
            continue;
        }
        match r {
            Ok(x) => ms.push(x),
            Err(e) => {
                failures += 1;
                if errors.len() < 5 {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    summary(ms, failures, errors)
}

/// `bursts` times, 8 new connections at once; bursts start `spacing` apart (or when the
/// previous one is done). One burst before them is reported apart as `cold`: it meets pools
/// (warm connections, standby sockets) sized for one connection at a time, which then adapt.
async fn bursts(t: &Target, bursts: usize, spacing: Duration) -> Value {
    let (mut ms, mut failures, mut errors) = (Vec::new(), 0, Vec::new());
    let mut cold = (Vec::new(), 0, Vec::new());
    let start = Instant::now();
    for i in 0..=bursts {
        tokio::time::sleep_until(start + spacing * i as u32).await;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            let t = t.clone();
            set.spawn(async move { ttfb_bounded(&t).await });
        }
        let (ms, failures, errors) = if i == 0 {
            (&mut cold.0, &mut cold.1, &mut cold.2)
        } else {
            (&mut ms, &mut failures, &mut errors)
        };
        while let Some(r) = set.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(x) => ms.push(x),
                Err(e) => {
                    *failures += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let mut v = summary(ms, failures, errors);
    v["cold"] = summary(cold.0, cold.1, cold.2);
    v
}

async fn measure(name: &str, t: &Target, plan: &Plan) -> Value {
    eprintln!("wan: {name} …");
    let seq = sequential(t, plan.sequential, plan.spacing).await;
    let burst = bursts(t, plan.bursts, plan.spacing).await;
    json!({"sequential": seq, "burst": burst})
}

/// A port on 127.0.0.1 that was free a moment ago (for configuration files).
async fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

/// rathole with its TLS transport carrying one service to `local`. With `link`, the client
/// reaches the server's control port through one delayed link and the application the
/// service port through another (kept in the returned links); the port to connect to.
async fn rathole_tls(
    bin: &Path,
    dir: &Path,
    local: SocketAddr,
    link: Option<LinkConfig>,
) -> Result<(Vec<Proc>, Vec<DelayLink>, u16)> {
    let control = free_port().await?;
    let service = free_port().await?;
    std::fs::create_dir_all(dir)?;
    let mut links = Vec::new();
    let (remote, app) = match link {
        Some(cfg) => {
            let app = DelayLink::start(([127, 0, 0, 1], service).into(), cfg).await?;
            let ctl = DelayLink::start(([127, 0, 0, 1], control).into(), cfg).await?;
            let ports = (ctl.addr().port(), app.addr().port());
            links.extend([app, ctl]);
            ports
        }
        None => (control, service),
    };
    let (server_tls, client_tls) = crate::rathole_tls_sections(dir).await?;
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n{server_tls}\
         [server.services.svc]\nbind_addr = \"127.0.0.1:{service}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"localhost:{remote}\"\ndefault_token = \"bench\"\n{client_tls}\
         [client.services.svc]\nlocal_addr = \"{local}\"\n"
    );
    let (s, c) = crate::start_rathole(bin, dir, &server, &client).await?;
    Ok((vec![s, c], links, app))
}

/// Waits (at most 10 s) until the service answers through `port` as an echo.
async fn wait_echo(port: u16) -> Result<()> {
    for _ in 0..50 {
        if probe_is_echo(port).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("port {port} does not echo")
}

/// A relay with its CA and the Listen and Send rules' connection strings.
struct Relay {
    proc: Proc,
    port: u16,
    ca: PathBuf,
    listen: String,
    send: String,
}

impl Relay {
    async fn start(hyco: &Path, data: &Path, hcs: &[(&str, SocketAddr)]) -> Result<Relay> {
        let data_s = data.display().to_string();
        let (proc, line) = spawn(
            "relay",
            hyco,
            &["relay", "--listen", "127.0.0.1:0", "--data", &data_s],
            &[],
            "relay listening",
        )
        .await?;
        let port = field_port(&line, "listen")?;
        let ca = data.join("ca.pem");
        let root = std::fs::read_to_string(data.join("root.connection-string"))?
            .trim()
            .to_owned();
        let (listen, send) = provision(hyco, &ca.to_string_lossy(), &root, hcs, ("l", "s")).await?;
        Ok(Relay {
            proc,
            port,
            ca,
            listen,
            send,
        })
    }

    /// `cs` pointed at `port` (a link in front of the relay) instead of the relay itself.
    fn via(&self, cs: &str, port: u16) -> String {
        cs.replace(
            &format!("localhost:{}", self.port),
            &format!("localhost:{port}"),
        )
    }

    /// `hyco manager run` for `hc`, reaching the relay at `port`.
    async fn manager(&self, hyco: &Path, state: &Path, hc: &str, port: u16) -> Result<Proc> {
        let cs = format!("{};EntityPath={hc}", self.via(&self.listen, port));
        let ca = self.ca.display().to_string();
        let state = state.display().to_string();
        let (p, _) = spawn(
            "manager",
            hyco,
            &["manager", "run", "--connection-string", &cs],
            &[("HYCO_CA_FILE", &ca), ("HYCO_STATE_DIR", &state)],
            "listener connected",
        )
        .await?;
        Ok(p)
    }

    /// `hyco forward` of `hc` on a port of its choosing, reaching the relay at `port`.
    async fn forward(&self, hyco: &Path, hc: &str, port: u16) -> Result<(Proc, u16)> {
        let cs = self.via(&self.send, port);
        let ca = self.ca.display().to_string();
        let rule = format!("127.0.0.1:0:{hc}");
        let (p, _) = spawn(
            "forward",
            hyco,
            &["forward", "-L", &rule, "--connection-string", &cs],
            &[("HYCO_CA_FILE", &ca)],
            "forwarding",
        )
        .await?;
        match listening_ports(p.pid().unwrap_or(0)).await.as_slice() {
            [port] => Ok((p, *port)),
            other => bail!("the forwarder listens on {other:?}, not one port"),
        }
    }
}

/// The CPU (model and the AES-related features) and the load, for the record.
fn machine() -> Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned());
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let features: Vec<&str> = ["aes", "vaes", "avx2", "avx512f", "vpclmulqdq"]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_features": features,
        "loadavg": load,
    })
}

/// Adds `p50_ratio` and `p99_ratio` (to `base`) to every configuration's measurements.
fn with_ratios(mut v: Value, base: &str, keys: &[&str]) -> Value {
    let b = v[base].clone();
    if let Some(obj) = v.as_object_mut() {
        for cfg in obj.values_mut() {
            for m in keys {
                for p in ["p50_ms", "p99_ms"] {
                    if let (Some(x), Some(d)) = (cfg[*m][p].as_f64(), b[*m][p].as_f64()) {
                        let k = p.replace("_ms", "_ratio");
                        cfg[*m][k] = json!((x / d * 100.0).round() / 100.0);
                    }
                }
            }
        }
    }
    v
}

/// Runs the WAN part; writes `wan.json` and `wan.svg` to `a.out` and prints the tables.
pub async fn run(a: &crate::Args, scratch: &Path) -> Result<()> {
    let w = &a.wan;
    let plan = Plan {
        delay: Duration::from_millis(w.wan_delay_ms),
        spacing: Duration::from_millis(w.wan_spacing_ms.unwrap_or(if a.quick { 200 } else { 500 })),
        sequential: w.wan_sequential.unwrap_or(if a.quick { 30 } else { 150 }),
        bursts: w.wan_bursts.unwrap_or(if a.quick { 8 } else { 25 }),
        pg_secs: w.pgbench_secs.unwrap_or(if a.quick { 4 } else { 10 }),
        floor_secs: w.floor_secs.unwrap_or(if a.quick { 2 } else { 5 }),
    };
    let machine_before = machine();
    let link = LinkConfig::with_delay(plan.delay);
    let echo = echo_server().await?;
    let pg = if plan.pg_secs > 0 {
        eprintln!("wan: PostgreSQL …");
        Some(Postgres::start().await.context("PostgreSQL for pgbench")?)
    } else {
        None
    };
    let pg_addr: SocketAddr = ([127, 0, 0, 1], pg.as_ref().map_or(9, |p| p.port)).into();
    let iperf_port = free_port().await?;
    let _iperf = if plan.floor_secs > 0 {
        Some(
            Command::new(&a.iperf3)
                .args(["-s", "-p", &iperf_port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("iperf3 -s")?,
        )
    } else {
        None
    };
    let iperf_addr: SocketAddr = ([127, 0, 0, 1], iperf_port).into();
    let mut floor = Value::Null;
    let mut wan = serde_json::Map::new();
    let mut pgb = serde_json::Map::new();

    // direct: app → A → B → echo.
    {
        let b = DelayLink::start(echo, link).await?;
        let a_link = DelayLink::start(b.addr(), link).await?;
        let t = Target::Port {
            echo: a_link.addr().port(),
            iperf: 0,
        };
        wan.insert("direct".into(), measure("direct", &t, &plan).await);
    }
    if let Some(pg) = &pg {
        eprintln!("wan: pgbench direct …");
        pgb.insert(
            "direct".into(),
            pgbench_pair(pg, pg.port, plan.pg_secs, &[]).await,
        );
    }

    // hyco: one relay; the agents reach it through the links (WAN) or directly (pgbench).
    if a.wants("hyco") || a.wants("hyco-lib") {
        let relay = Relay::start(
            &a.hyco,
            &scratch.join("wan-relay"),
            &[("echo", echo), ("pg", pg_addr), ("iperf", iperf_addr)],
        )
        .await?;
        let relay_addr: SocketAddr = ([127, 0, 0, 1], relay.port).into();
        {
            let b = DelayLink::start(relay_addr, link).await?;
            let a_link = DelayLink::start(relay_addr, link).await?;
            let _manager = relay
                .manager(
                    &a.hyco,
                    &scratch.join("wan-manager"),
                    "echo",
                    b.addr().port(),
                )
                .await?;
            if a.wants("hyco") {
                let (_fwd, port) = relay.forward(&a.hyco, "echo", a_link.addr().port()).await?;
                wait_echo(port).await?;
                let t = Target::Port {
                    echo: port,
                    iperf: 0,
                };
                wan.insert("hyco".into(), measure("hyco", &t, &plan).await);
            }
            if a.wants("hyco-lib") {
                let connector = hyco_client::ClientOptions {
                    ca_file: Some(relay.ca.clone()),
                    warm_connections: 1,
                    ..Default::default()
                }
                .connector()?;
                let cs = format!(
                    "{};EntityPath=echo",
                    relay.via(&relay.send, a_link.addr().port())
                );
                let t = Target::Library {
                    echo: cs.parse()?,
                    connector,
                };
                wan.insert("hyco-lib".into(), measure("hyco-lib", &t, &plan).await);
            }
        }
        if let (Some(pg), true) = (&pg, a.wants("hyco")) {
            eprintln!("wan: pgbench hyco …");
            let manager = relay
                .manager(&a.hyco, &scratch.join("pg-manager"), "pg", relay.port)
                .await?;
            let (fwd, port) = relay.forward(&a.hyco, "pg", relay.port).await?;
            let pids = [
                ("relay", relay.proc.pid().unwrap_or(0)),
                ("manager", manager.pid().unwrap_or(0)),
                ("forward", fwd.pid().unwrap_or(0)),
            ];
            pgb.insert(
                "hyco".into(),
                pgbench_pair(pg, port, plan.pg_secs, &pids).await,
            );
        }
        if plan.floor_secs > 0 && a.wants("hyco") {
            eprintln!("wan: bulk floor …");
            let manager = relay
                .manager(&a.hyco, &scratch.join("iperf-manager"), "iperf", relay.port)
                .await?;
            let (fwd, port) = relay.forward(&a.hyco, "iperf", relay.port).await?;
            let pids = [
                ("relay", relay.proc.pid().unwrap_or(0)),
                ("manager", manager.pid().unwrap_or(0)),
                ("forward", fwd.pid().unwrap_or(0)),
            ];
            floor = bulk_floor(&a.iperf3, iperf_addr, port, &pids, plan.floor_secs).await?;
        }
    }

    // rathole over TLS: app → A → server → B → client → echo.
    if let (Some(bin), true) = (&a.rathole, a.wants("rathole-tls")) {
        match rathole_tls(bin, &scratch.join("wan-rathole"), echo, Some(link)).await {
            Ok((_procs, _links, port)) => {
                wait_echo(port).await?;
                let t = Target::Port {
                    echo: port,
                    iperf: 0,
                };
                wan.insert(
                    "rathole-tls".into(),
                    measure("rathole-tls", &t, &plan).await,
                );
            }
            Err(e) => {
                wan.insert("rathole-tls".into(), json!({"error": format!("{e:#}")}));
            }
        }
        if let Some(pg) = &pg {
            eprintln!("wan: pgbench rathole-tls …");
            match rathole_tls(bin, &scratch.join("pg-rathole"), pg_addr, None).await {
                Ok((procs, _, port)) => {
                    let pids: Vec<_> = ["server", "client"]
                        .into_iter()
                        .zip(&procs)
                        .map(|(n, p)| (n, p.pid().unwrap_or(0)))
                        .collect();
                    pgb.insert(
                        "rathole-tls".into(),
                        pgbench_pair(pg, port, plan.pg_secs, &pids).await,
                    );
                }
                Err(e) => {
                    pgb.insert("rathole-tls".into(), json!({"error": format!("{e:#}")}));
                }
            }
        }
    }
    drop(pg);

    let wan = with_ratios(Value::Object(wan), "direct", &["sequential", "burst"]);
    let pgb = pg_ratios(Value::Object(pgb));
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let report = json!({
        "date": date,
        "delay_ms_one_way": w.wan_delay_ms,
        "spacing_ms": plan.spacing.as_millis() as u64,
        "burst": BURST,
        "machine_before": machine_before,
        "machine_after": machine(),
        "ttfb": wan,
        "pgbench": pgb,
        "bulk_floor": floor,
    });
    std::fs::create_dir_all(&a.out)?;
    let json_path = a.out.join("wan.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let svg_path = a.out.join("wan.svg");
    std::fs::write(&svg_path, chart(&report))?;
    print(&report);
    println!(
        "\nresults: {}\nchart: {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// hyco's CPU per GB with iperf3 through `hyco_port` (1 and 8 streams), the floor's parts,
/// and the ratio (see `floor.rs`).
async fn bulk_floor(
    iperf3: &Path,
    iperf: SocketAddr,
    hyco_port: u16,
    pids: &[(&'static str, u32)],
    secs: u64,
) -> Result<Value> {
    let seal = tokio::task::spawn_blocking(|| crate::floor::seal_rate(2.0)).await??;
    // Four AEAD passes per byte, in CPU ms per GB.
    let aead_ms = 4.0 * 1e9 / seal * 1e3;
    let (first, _relays) = crate::floor::plain_relays(iperf, 3).await?;
    let me = [("plain-relays", std::process::id())];
    let mut out = serde_json::Map::new();
    out.insert("seal_gb_per_s".into(), json!((seal / 1e7).round() / 100.0));
    out.insert(
        "providers".into(),
        tokio::task::spawn_blocking(|| crate::floor::providers(1.0)).await??,
    );
    out.insert("aead_ms_per_gb".into(), json!(aead_ms.round()));
    for streams in [1u32, 8] {
        let (rbps, relays) = iperf_cpu(iperf3, first.port(), streams, secs, &me).await;
        let (hbps, hyco) = iperf_cpu(iperf3, hyco_port, streams, secs, pids).await;
        let floor = relays["total"].as_f64().map(|r| r + aead_ms);
        let ratio = hyco["total"]
            .as_f64()
            .zip(floor)
            .map(|(h, f)| (h / f * 100.0).round() / 100.0);
        out.insert(
            format!("streams_{streams}"),
            json!({
                "plain_relays_gbps": rbps / 1e9,
                "plain_relays_ms_per_gb": relays["total"],
                "floor_ms_per_gb": floor.map(f64::round),
                "hyco_gbps": hbps / 1e9,
                "hyco_ms_per_gb": hyco,
                "hyco_over_floor": ratio,
            }),
        );
    }
    Ok(Value::Object(out))
}

/// iperf3 through `port` with the CPU per GB of `pids` (as the loopback figures), after a
/// moment for the iperf3 server to finish its previous test; an error is kept.
async fn iperf_cpu(
    iperf3: &Path,
    port: u16,
    streams: u32,
    secs: u64,
    pids: &[(&'static str, u32)],
) -> (f64, Value) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (bps, cpu) = crate::iperf_with_cpu(iperf3, port, streams, secs, pids).await;
    if cpu.is_null() {
        let why = crate::iperf(iperf3, port, streams, 1)
            .await
            .err()
            .map(|e| format!("{e:#}"));
        return (bps, json!({ "error": why }));
    }
    (bps, cpu)
}

/// pgbench `-C` and held, through `port`, with the CPU each transaction cost: the tunnel's
/// processes `pids` each, and the whole machine (PostgreSQL's backends and pgbench included).
async fn pgbench_pair(pg: &Postgres, port: u16, secs: u64, pids: &[(&str, u32)]) -> Value {
    let mut v = serde_json::Map::new();
    for (k, new_conn) in [("new_connection", true), ("held", false)] {
        let before: Vec<_> = pids.iter().map(|(_, p)| crate::cpu_ticks(*p)).collect();
        let machine_before = machine_busy_ticks();
        let mut r = pg
            .select_only(port, new_conn, secs)
            .await
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        let per_tick_ms = 1000.0 / crate::clock_ticks();
        if let Some(n) = r["transactions"].as_f64().filter(|n| *n > 0.0) {
            let ms_per_txn =
                |ticks: u64| (ticks as f64 * per_tick_ms / n * 1000.0).round() / 1000.0;
            let mut by = serde_json::Map::new();
            for ((name, pid), b) in pids.iter().zip(before) {
                if let (Some(b), Some(a)) = (b, crate::cpu_ticks(*pid)) {
                    by.insert((*name).into(), json!(ms_per_txn(a.saturating_sub(b))));
                }
            }
            r["tunnel_cpu_ms_per_txn"] = Value::Object(by);
            if let (Some(b), Some(a)) = (machine_before, machine_busy_ticks()) {
                r["machine_cpu_ms_per_txn"] = json!(ms_per_txn(a.saturating_sub(b)));
            }
        }
        v.insert(k.into(), r);
    }
    Value::Object(v)
}

/// Busy clock ticks of every CPU together (`/proc/stat`: all but idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal …
    let all: u64 = f.iter().take(8).sum();
    Some(all.saturating_sub(*f.get(3)?).saturating_sub(*f.get(4)?))
}

/// `tps_ratio` to rathole-TLS in every configuration.
fn pg_ratios(mut v: Value) -> Value {
    let base = v["rathole-tls"].clone();
    if let Some(obj) = v.as_object_mut() {
        for cfg in obj.values_mut() {
            for m in ["new_connection", "held"] {
                if let (Some(x), Some(b)) = (cfg[m]["tps"].as_f64(), base[m]["tps"].as_f64()) {
                    cfg[m]["tps_ratio_to_rathole_tls"] = json!((x / b * 100.0).round() / 100.0);
                }
            }
        }
    }
    v
}

const ORDER: [&str; 4] = ["direct", "hyco", "hyco-lib", "rathole-tls"];

fn chart(r: &Value) -> String {
    let samples = |cfg: &str, m: &str| -> Vec<f64> {
        r["ttfb"][cfg][m]["samples_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let present: Vec<&str> = ORDER
        .into_iter()
        .filter(|c| r["ttfb"][*c]["sequential"].is_object())
        .collect();
    let data: Vec<(Vec<f64>, Vec<f64>)> = present
        .iter()
        .map(|c| (samples(c, "sequential"), samples(c, "burst")))
        .collect();
    let seq_title = format!(
        "one at a time ({} ms apart)",
        r["spacing_ms"].as_u64().unwrap_or(0)
    );
    let burst_title = format!("bursts of {BURST} at once");
    let panels = [
        Panel {
            title: &seq_title,
            series: present
                .iter()
                .zip(&data)
                .map(|(n, d)| Series {
                    name: n,
                    samples_ms: &d.0,
                })
                .collect(),
        },
        Panel {
            title: &burst_title,
            series: present
                .iter()
                .zip(&data)
                .map(|(n, d)| Series {
                    name: n,
                    samples_ms: &d.1,
                })
                .collect(),
        },
    ];
    let delay = r["delay_ms_one_way"].as_u64().unwrap_or(0);
    cdf_svg(
        "New connection, time to first byte (connect, 100 bytes out, first byte back)",
        &format!(
            "two links of {delay} ms one way each (app–relay, relay–service); generated by bench/run --wan{}",
            r["date"].as_str().map(|d| format!(", {d}")).unwrap_or_default()
        ),
        Some((4.0 * delay as f64, "4 × one-way delay")),
        &panels,
    )
}

fn print(r: &Value) {
    let f = crate::stats::cell;
    println!(
        "\nWAN: two links of {} ms one way; new connection, time to first byte (ms); ratios to direct",
        r["delay_ms_one_way"]
    );
    println!(
        "{:<12} {:>8} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>6} {:>6} | {:>5}",
        "config", "seq p50", "p99", "ratio", "ratio", "burst p50", "p99", "ratio", "ratio", "fail"
    );
    for c in ORDER {
        let v = &r["ttfb"][c];
        if v.is_null() {
            continue;
        }
        if let Some(e) = v["error"].as_str() {
            println!("{c:<12} {e}");
            continue;
        }
        let (s, b) = (&v["sequential"], &v["burst"]);
        println!(
            "{:<12} {:>8} {:>8} {:>6} {:>6} | {:>9} {:>8} {:>6} {:>6} | {:>5}",
            c,
            f(&s["p50_ms"]),
            f(&s["p99_ms"]),
            f(&s["p50_ratio"]),
            f(&s["p99_ratio"]),
            f(&b["p50_ms"]),
            f(&b["p99_ms"]),
            f(&b["p50_ratio"]),
            f(&b["p99_ratio"]),
            s["failures"].as_u64().unwrap_or(0) + b["failures"].as_u64().unwrap_or(0),
        );
    }
    let cold: Vec<String> = ORDER
        .iter()
        .filter_map(|c| {
            let v = &r["ttfb"][*c]["burst"]["cold"];
            v.is_object()
                .then(|| format!("{c} {}/{}", f(&v["p50_ms"]), f(&v["max_ms"])))
        })
        .collect();
    if !cold.is_empty() {
        println!(
            "first (cold) burst, not in the figures above, p50/max ms: {}",
            cold.join(", ")
        );
    }
    if r["pgbench"].as_object().is_some_and(|o| !o.is_empty()) {
        println!(
            "\npgbench select-only, 8 clients, loopback; ratios to rathole-TLS; CPU ms per \
             transaction: the tunnel's processes, and the whole machine (PostgreSQL included)"
        );
        println!(
            "{:<12} {:>10} {:>7} {:>8} {:>8} {:>8} | {:>10} {:>7} {:>8} {:>8} {:>8}",
            "config",
            "-C tps",
            "ratio",
            "lat ms",
            "tunnel",
            "machine",
            "held tps",
            "ratio",
            "lat ms",
            "tunnel",
            "machine"
        );
        let tunnel_cpu = |m: &Value| -> Value {
            m["tunnel_cpu_ms_per_txn"]
                .as_object()
                .filter(|o| !o.is_empty())
                .map_or(Value::Null, |o| {
                    let sum: f64 = o.values().filter_map(Value::as_f64).sum();
                    json!((sum * 1000.0).round() / 1000.0)
                })
        };
        for c in ["direct", "hyco", "rathole-tls"] {
            let v = &r["pgbench"][c];
            if v.is_null() {
                continue;
            }
            let (n, h) = (&v["new_connection"], &v["held"]);
            println!(
                "{:<12} {:>10} {:>7} {:>8} {:>8} {:>8} | {:>10} {:>7} {:>8} {:>8} {:>8}",
                c,
                f(&n["tps"]),
                f(&n["tps_ratio_to_rathole_tls"]),
                f(&n["latency_ms"]),
                f(&tunnel_cpu(n)),
                f(&n["machine_cpu_ms_per_txn"]),
                f(&h["tps"]),
                f(&h["tps_ratio_to_rathole_tls"]),
                f(&h["latency_ms"]),
                f(&tunnel_cpu(h)),
                f(&h["machine_cpu_ms_per_txn"]),
            );
            for e in [&n["error"], &h["error"], &v["error"]] {
                if let Some(e) = e.as_str() {
                    println!("  {c}: {e}");
                }
            }
        }
    }
    let fl = &r["bulk_floor"];
    if fl.is_object() {
        println!(
            "\nBulk CPU per GB (loopback, iperf3): hyco against the floor (3 plain TCP relays + 4 AEAD passes at {} GB sealed per CPU second)",
            f(&fl["seal_gb_per_s"])
        );
        println!(
            "{:<10} {:>12} {:>12} {:>12} {:>12} {:>8}",
            "streams", "relays ms/GB", "AEAD ms/GB", "floor ms/GB", "hyco ms/GB", "ratio"
        );
        for n in [1, 8] {
            let v = &fl[format!("streams_{n}")];
            println!(
                "{:<10} {:>12} {:>12} {:>12} {:>12} {:>8}",
                n,
                f(&v["plain_relays_ms_per_gb"]),
                f(&fl["aead_ms_per_gb"]),
                f(&v["floor_ms_per_gb"]),
                f(&v["hyco_ms_per_gb"]["total"]),
                f(&v["hyco_over_floor"]),
            );
        }
        let p = &fl["providers"];
        println!(
            "crypto providers on this CPU: AES-128-GCM sealed per CPU second ring {} GB, aws-lc-rs {} GB; \
             X25519 (one side of a handshake) ring {} µs, aws-lc-rs {} µs",
            f(&p["ring"]["seal_gb_per_s"]),
            f(&p["aws-lc-rs"]["seal_gb_per_s"]),
            f(&p["ring"]["x25519_us"]),
            f(&p["aws-lc-rs"]["x25519_us"]),
        );
    }
    let m = &r["machine_before"];
    println!(
        "\nCPU: {} ({} cores; {}); load average before {}, after {}",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["cpu_features"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        m["loadavg"].as_str().unwrap_or("?"),
        r["machine_after"]["loadavg"].as_str().unwrap_or("?"),
    );
}
