//! `hyco-bench`: measures hyco side by side with direct TCP and rathole, in one run, on
//! 127.0.0.1 only, and reports every figure also as a ratio to direct TCP measured in the same
//! run (the machines are shared and noisy; ratios travel, absolute numbers do not).
//!
//! Configurations: `direct`, `hyco` (forward → relay (TLS) → manager), `hyco-lib` (the client
//! library in this process → relay → manager), `rathole-tls`, `rathole-tcp` (when a rathole
//! binary is given). Figures: iperf3 bulk throughput with 1 and 8 streams; sequential connect +
//! 1-byte echo latency p50/p99; N concurrent connections opened and each echoing, held, with the
//! RSS of every process idle and loaded.
//!
//! Not a test: nothing here asserts timings. `bench/run` installs the tools and calls this.
#![forbid(unsafe_code)]

mod chart;
mod cluster;
mod delay;
mod floor;
mod http_mode;
mod http_nginx;
mod pgbench;
mod stats;
mod wan;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

#[derive(Parser)]
struct Args {
    /// The hyco binary (release build).
    #[arg(long)]
    hyco: PathBuf,
    /// A rathole binary; without it the rathole configurations are skipped.
    #[arg(long)]
    rathole: Option<PathBuf>,
    /// iperf3.
    #[arg(long, default_value = "iperf3")]
    iperf3: PathBuf,
    /// Folder for results.json and scratch files.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
    /// Short runs (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Only the cluster figures (two relay nodes on redis-server).
    #[arg(long)]
    cluster_only: bool,
    /// Run only these parts, comma-separated: direct, hyco, hyco-lib, http, http-nginx,
    /// rathole-tls, rathole-tcp, cluster (default: all). `direct` always runs, as the baseline.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds per iperf3 run (overrides the plan).
    #[arg(long)]
    bulk_secs: Option<u64>,
    /// Sequential connect+echo round trips (overrides the plan).
    #[arg(long)]
    sequential: Option<usize>,
    /// Concurrent tunnels (overrides the plan).
    #[arg(long)]
    concurrent: Option<usize>,
    #[command(flatten)]
    wan: wan::WanArgs,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

struct Plan {
    bulk_secs: u64,
    sequential: usize,
    concurrent: usize,
}

/// A child process (the shared harness's), killed on drop, with its name.
struct Proc(hyco_testkit::Proc, &'static str);

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
}

/// Starts a process and waits for an output line containing `ready`; returns it. Its first 20
/// warnings and errors go to our stderr, so a failed connection in a figure can be traced to
/// its cause.
async fn spawn(
    name: &'static str,
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    ready: &str,
) -> Result<(Proc, String)> {
    let shown = std::sync::atomic::AtomicUsize::new(0);
    let warnings = move |l: &str| {
        if (l.contains(" WARN ") || l.contains(" ERROR "))
            && shown.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 20
        {
            eprintln!("  [{name}] {l}");
        }
    };
    let opts = hyco_testkit::ProcOptions::long_run("warn,hyco=info").tap(warnings);
    let p = hyco_testkit::Proc::start(name, bin, args, env, opts)
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let line = p.ready(ready, Duration::from_secs(30)).await?;
    Ok((Proc(p, name), line))
}

/// Creates hybrid connections (name, endpoint) and a Listen and a Send rule on a relay; returns
/// the two rules' connection strings.
async fn provision(
    hyco: &Path,
    ca: &str,
    root: &str,
    hcs: &[(&str, SocketAddr)],
    (listen, send): (&str, &str),
) -> Result<(String, String)> {
    let admin = hyco_testkit::Admin {
        bin: hyco.to_owned(),
        ca: ca.into(),
        root: root.to_owned(),
        within: Duration::from_secs(60),
    };
    for (hc, target) in hcs {
        admin
            .ok(&["hc", "create", hc, "--endpoint", &target.to_string()])
            .await?;
    }
    let l = admin
        .ok(&["rule", "create", listen, "--rights", "listen"])
        .await?;
    let s = admin
        .ok(&["rule", "create", send, "--rights", "send"])
        .await?;
    Ok((l, s))
}

fn field_port(line: &str, key: &str) -> Result<u16> {
    let start = line.find(&format!("{key}=")).context("field missing")? + key.len() + 1;
    let v = line[start..].split_whitespace().next().unwrap_or("");
    Ok(v.rsplit(':').next().unwrap_or("").parse()?)
}

async fn echo_server() -> Result<SocketAddr> {
    let l = hyco_io::listener::bind(([127, 0, 0, 1], 0).into())?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            // Keep serving through transient accept errors (out of descriptors under load).
            let Ok((mut s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(a)
}

/// How a configuration is reached.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a handful per run
enum Target {
    Port {
        echo: u16,
        iperf: u16,
    },
    Library {
        echo: hyco_proto::ConnectionString,
        connector: hyco_client::Connector,
    },
}

trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

async fn open_echo(t: &Target) -> Result<Box<dyn Duplex>> {
    Ok(match t {
        Target::Port { echo, .. } => {
            let s = TcpStream::connect(("127.0.0.1", *echo)).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        // Early data on, as `hyco forward` has it: the library's user opts in.
        Target::Library { echo, connector } => Box::new(
            hyco_client::connect_with(
                echo,
                connector,
                &hyco_client::ConnectOptions {
                    early_data: true,
                    ..hyco_client::ConnectOptions::default()
                },
            )
            .await?,
        ),
    })
}

async fn one_byte_echo(s: &mut Box<dyn Duplex>) -> Result<()> {
    s.write_all(b"x").await?;
    s.flush().await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn sequential(t: &Target, n: usize) -> Result<Value> {
    let mut lat = Vec::with_capacity(n);
    let mut failures = 0;
    for _ in 0..n {
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = open_echo(t).await?;
            one_byte_echo(&mut s).await?;
            let _ = s.shutdown().await;
            anyhow::Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => lat.push(t0.elapsed().as_secs_f64() * 1e6),
            _ => failures += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok(
        json!({"n": n, "failures": failures, "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99)}),
    )
}

async fn concurrent(t: &Target, n: usize, pids: &[(&'static str, u32)]) -> Result<Value> {
    let idle: BTreeMap<_, _> = pids
        .iter()
        .map(|(k, p)| (*k, hyco_testkit::rss_kib(*p)))
        .collect();
    let t0 = Instant::now();
    let mut opened = Vec::with_capacity(n);
    let mut failures = 0usize;
    // The first few reasons, so a failure can be told from a timeout.
    let mut errors: Vec<String> = Vec::new();
    // Open in waves so the accept queues are not the bottleneck being measured.
    for chunk in (0..n).collect::<Vec<_>>().chunks(250) {
        let mut wave = Vec::new();
        for _ in chunk {
            let t = t.clone();
            wave.push(tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(60), async {
                    let mut s = open_echo(&t).await?;
                    one_byte_echo(&mut s).await?;
                    anyhow::Ok(s)
                })
                .await
            }));
        }
        for w in wave {
            let why = match w.await {
                Ok(Ok(Ok(s))) => {
                    opened.push(s);
                    continue;
                }
                Ok(Ok(Err(e))) => format!("{e:#}"),
                Ok(Err(_)) => "timed out after 60 s".to_owned(),
                Err(e) => format!("task: {e}"),
            };
            failures += 1;
            if errors.len() < 5 {
                errors.push(why);
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded: BTreeMap<_, _> = pids
        .iter()
        .map(|(k, p)| (*k, hyco_testkit::rss_kib(*p)))
        .collect();
    let per_conn: BTreeMap<_, _> = pids
        .iter()
        .map(|(k, _)| {
            let d = loaded[k].saturating_sub(idle[k]) as f64 / opened.len().max(1) as f64;
            (*k, (d * 10.0).round() / 10.0)
        })
        .collect();
    // Direct TCP has no tunnel processes: no figure rather than 0.
    let total_per_conn = (!pids.is_empty())
        .then(|| (per_conn.values().fold(0.0, |a, b| a + b) * 10.0).round() / 10.0);
    let ok = opened.len();
    drop(opened);
    Ok(json!({
        "n": n, "ok": ok, "failures": failures, "errors": errors, "open_all_secs": open_secs,
        "rss_idle_kib": idle, "rss_loaded_kib": loaded,
        "kib_per_connection": per_conn, "kib_per_connection_total": total_per_conn,
    }))
}

/// CPU time (user + system) `pid` has used, in clock ticks (`/proc/<pid>/stat`).
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields counted here come after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name and state.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second of `/proc/<pid>/stat`.
pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// One bulk run through a port: bits per second at the receiver, and the CPU the tunnel's
/// processes spent per GB carried (ms/GB, each and in total). On shared cores the CPU per byte
/// moves far less than throughput, and with 8 streams (every core busy) throughput is just
/// the inverse of it.
async fn iperf_with_cpu(
    iperf3: &Path,
    port: u16,
    streams: u32,
    secs: u64,
    pids: &[(&'static str, u32)],
) -> (f64, Value) {
    let before: Vec<_> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let Ok((bps, bytes)) = iperf(iperf3, port, streams, secs).await else {
        return (f64::NAN, Value::Null);
    };
    if pids.is_empty() {
        return (bps, Value::Null);
    }
    let hz = clock_ticks();
    let mut per = serde_json::Map::new();
    let mut total = 0.0;
    for ((name, pid), b) in pids.iter().zip(before) {
        let (Some(b), Some(a)) = (b, cpu_ticks(*pid)) else {
            return (bps, Value::Null);
        };
        let ms_per_gb = a.saturating_sub(b) as f64 / hz * 1000.0 / (bytes / 1e9);
        total += ms_per_gb;
        per.insert((*name).to_owned(), json!(ms_per_gb.round()));
    }
    per.insert("total".into(), json!(total.round()));
    (bps, Value::Object(per))
}

/// iperf3 for `secs`: bits per second and bytes at the receiver.
async fn iperf(iperf3: &Path, port: u16, streams: u32, secs: u64) -> Result<(f64, f64)> {
    let out = Command::new(iperf3)
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 output")?;
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Ok((bps, bytes)),
        _ => bail!("iperf3: {}", v["error"]),
    }
}

/// Bulk throughput through the library: `streams` connections writing to a discard endpoint
/// for `secs`; returns bits per second received there.
async fn library_bulk(
    t: &Target,
    discard_count: Arc<std::sync::atomic::AtomicU64>,
    streams: usize,
    secs: u64,
) -> Result<f64> {
    let start = discard_count.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut s = open_echo(t).await?;
        tasks.push(tokio::spawn(async move {
            let buf = vec![0u8; 256 * 1024];
            while Instant::now() < deadline {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
            let _ = s.shutdown().await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let got = discard_count.load(std::sync::atomic::Ordering::Relaxed) - start;
    Ok(got as f64 * 8.0 / secs as f64)
}

/// Descriptors each process may open (the soft limit, which `bench/run` raises to the hard one).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `want` held tunnels, or as many as the descriptor limit allows: each is two sockets in the
/// relay (and in the forwarder, the manager, and this process with its echo server), plus a
/// margin for listeners, warm connections and files.
fn concurrent_that_fits(want: usize) -> usize {
    let Some(limit) = open_files_limit() else {
        return want;
    };
    let fits = limit.saturating_sub(200) / 2;
    if fits < want {
        eprintln!(
            "hyco-bench: {want} held tunnels need {} descriptors per process, the limit here is \
             {limit}: holding {fits}",
            2 * want + 200
        );
        return fits;
    }
    want
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let plan = if a.quick {
        Plan {
            bulk_secs: 3,
            sequential: 300,
            concurrent: 1000,
        }
    } else {
        Plan {
            bulk_secs: 10,
            sequential: 2000,
            concurrent: concurrent_that_fits(10_000),
        }
    };
    let plan = Plan {
        bulk_secs: a.bulk_secs.unwrap_or(plan.bulk_secs),
        sequential: a.sequential.unwrap_or(plan.sequential),
        concurrent: a.concurrent.unwrap_or(plan.concurrent),
    };
    std::fs::create_dir_all(&a.out)?;
    let scratch = a.out.join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    if a.wan.wan {
        return wan::run(&a, &scratch).await;
    }

    // Targets: an echo server, an iperf3 server, a discard server (for library bulk).
    let echo = echo_server().await?;
    let iperf_port = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let _iperf_srv = Command::new(&a.iperf3)
        .args(["-s", "-p", &iperf_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("iperf3 -s")?;
    let discard = hyco_io::listener::bind(([127, 0, 0, 1], 0).into())?;
    let discard_addr = discard.local_addr()?;
    let discarded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let d2 = Arc::clone(&discarded);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = discard.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let d = Arc::clone(&d2);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    d.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cluster_inputs = cluster::Inputs {
        hyco: &a.hyco,
        scratch: &scratch,
        echo,
        discard: discard_addr,
        discarded: Arc::clone(&discarded),
        sequential: plan.sequential,
        bulk_secs: plan.bulk_secs,
    };
    if a.cluster_only {
        let c = cluster::run(cluster_inputs)
            .await?
            .context("redis-server is not installed")?;
        print_cluster(&c);
        std::fs::write(
            a.out.join("cluster.json"),
            serde_json::to_string_pretty(&c)?,
        )?;
        return Ok(());
    }

    let mut results = serde_json::Map::new();
    // 1. direct
    eprintln!("direct …");
    let direct = Target::Port {
        echo: echo.port(),
        iperf: iperf_port,
    };
    results.insert(
        "direct".into(),
        run_config(&a, &plan, &direct, &[], None).await?,
    );

    // 2./3. hyco, and HTTP mode, on one relay and manager
    let mut http = None;
    let mut http_nginx = None;
    if a.wants("hyco") || a.wants("hyco-lib") || a.wants("http") || a.wants("http-nginx") {
        eprintln!("hyco …");
        let data = scratch.join("relay");
        let (relay, line) = spawn(
            "relay",
            &a.hyco,
            &[
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--data",
                data.to_str().unwrap_or(""),
            ],
            &[],
            "relay listening",
        )
        .await?;
        let relay_port = field_port(&line, "listen")?;
        let ca = data.join("ca.pem");
        let ca_s = ca.to_string_lossy().to_string();
        let root = std::fs::read_to_string(data.join("root.connection-string"))?
            .trim()
            .to_owned();
        let (listen, send) = provision(
            &a.hyco,
            &ca_s,
            &root,
            &[
                ("echo", echo),
                ("iperf", SocketAddr::from(([127, 0, 0, 1], iperf_port))),
                ("discard", discard_addr),
                // HTTP mode: the listener is in this process; the endpoint is never dialled.
                ("web", SocketAddr::from(([127, 0, 0, 1], 9))),
            ],
            ("l", "s"),
        )
        .await?;
        let mut margs = vec!["manager".to_owned(), "run".to_owned()];
        for hc in ["echo", "iperf", "discard"] {
            margs.push("--connection-string".into());
            margs.push(format!("{listen};EntityPath={hc}"));
        }
        let margs_ref: Vec<&str> = margs.iter().map(String::as_str).collect();
        // Its own state folder (control socket), not the machine's default.
        let state_dir = scratch.join("manager-state");
        let state_s = state_dir.to_string_lossy().to_string();
        let (manager, _) = spawn(
            "manager",
            &a.hyco,
            &margs_ref,
            &[("HYCO_CA_FILE", &ca_s), ("HYCO_STATE_DIR", &state_s)],
            "listener connected",
        )
        .await?;
        // Wait until all three listeners are up (one line each).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (fwd, fline) = spawn(
            "forward",
            &a.hyco,
            &[
                "forward",
                "-L",
                "127.0.0.1:0:echo",
                "-L",
                "127.0.0.1:0:iperf",
                "--connection-string",
                &send,
            ],
            &[("HYCO_CA_FILE", &ca_s)],
            "hc=iperf",
        )
        .await?;
        let _ = fline;
        // The echo rule line came first; read both ports from a fresh status: simplest is to ask the OS.
        let ports = listening_ports(fwd.pid().unwrap_or(0)).await;
        let (fecho, fiperf) = match ports.as_slice() {
            [p1, p2] => (*p1, *p2),
            _ => bail!("could not find the forwarder's two ports: {ports:?}"),
        };
        let (fecho, fiperf) = if probe_is_echo(fecho).await {
            (fecho, fiperf)
        } else {
            (fiperf, fecho)
        };
        let pids = [
            ("relay", relay.pid().unwrap_or(0)),
            ("manager", manager.pid().unwrap_or(0)),
            ("forward", fwd.pid().unwrap_or(0)),
        ];
        if a.wants("hyco") {
            results.insert(
                "hyco".into(),
                run_config(
                    &a,
                    &plan,
                    &Target::Port {
                        echo: fecho,
                        iperf: fiperf,
                    },
                    &pids,
                    None,
                )
                .await?,
            );
        }
        if a.wants("hyco-lib") {
            eprintln!("hyco-lib …");
            // One warm connection, as `hyco forward` keeps.
            let connector = hyco_client::ClientOptions {
                ca_file: Some(ca.clone()),
                warm_connections: 1,
                ..Default::default()
            }
            .connector()?;
            let cs: hyco_proto::ConnectionString = format!("{send};EntityPath=echo").parse()?;
            let lib = Target::Library {
                echo: cs.clone(),
                connector: connector.clone(),
            };
            let lib_bulk = Target::Library {
                echo: cs.with_entity("discard"),
                connector,
            };
            let self_pid = std::process::id();
            let pids_lib = [
                ("relay", pids[0].1),
                ("manager", pids[1].1),
                ("sender-process", self_pid),
            ];
            results.insert(
                "hyco-lib".into(),
                run_config(
                    &a,
                    &plan,
                    &lib,
                    &pids_lib,
                    Some((&lib_bulk, Arc::clone(&discarded))),
                )
                .await?,
            );
        }
        if a.wants("http") {
            eprintln!("http mode …");
            http = Some(
                http_mode::run(
                    relay_port,
                    &ca,
                    format!("{listen};EntityPath=web").parse()?,
                    format!("{send};EntityPath=web").parse()?,
                    16,
                    plan.bulk_secs.max(1),
                )
                .await?,
            );
        }
        if a.wants("http-nginx") {
            eprintln!("http mode to nginx …");
            http_nginx = Some(
                http_nginx::run(http_nginx::Inputs {
                    hyco: &a.hyco,
                    scratch: &scratch,
                    relay_port,
                    relay_data: &data,
                    root: &root,
                    secs: plan.bulk_secs.max(2),
                })
                .await
                .unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
            );
        }
        drop((relay, manager, fwd));
    }

    // 4. rathole
    if let Some(rathole) = &a.rathole {
        for tls in [true, false] {
            let name = if tls { "rathole-tls" } else { "rathole-tcp" };
            if !a.wants(name) {
                continue;
            }
            eprintln!("{name} …");
            match rathole_config(rathole, &scratch, tls, echo, iperf_port).await {
                Ok((procs, target)) => {
                    let pids: Vec<(&'static str, u32)> =
                        procs.iter().map(|p| (p.1, p.pid().unwrap_or(0))).collect();
                    results.insert(
                        name.into(),
                        run_config(&a, &plan, &target, &pids, None).await?,
                    );
                }
                Err(e) => {
                    results.insert(name.into(), json!({"error": format!("{e:#}")}));
                }
            }
        }
    }

    let cluster = if a.wants("cluster") {
        eprintln!("cluster …");
        cluster::run(cluster_inputs)
            .await
            .unwrap_or_else(|e| Some(json!({"error": format!("{e:#}")})))
    } else {
        None
    };

    let mut report = ratios(Value::Object(results));
    if let Some(http) = http {
        let http = with_http_ratios(http);
        print_http(&http);
        report["http_mode"] = http;
    }
    if let Some(h) = http_nginx {
        http_nginx::print(&h);
        report["http_nginx"] = h;
    }
    if let Some(c) = cluster {
        print_cluster(&c);
        report["cluster"] = c;
    }
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    print_table(&report);
    println!("\nresults: {}", a.out.join("results.json").display());
    Ok(())
}

async fn listening_ports(pid: u32) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Hltnp"])
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut ports: Vec<u16> = out
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
        })
        .collect();
    ports.sort_unstable();
    ports
}

async fn probe_is_echo(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"?").await.is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut b)).await, Ok(Ok(_)) if &b == b"?")
}

async fn run_config(
    a: &Args,
    plan: &Plan,
    t: &Target,
    pids: &[(&'static str, u32)],
    library_bulk_target: Option<(&Target, Arc<std::sync::atomic::AtomicU64>)>,
) -> Result<Value> {
    // CPU per GB only where every process of the tunnel is outside this one: the library
    // sender shares this process with the discard server it sends to.
    let (mut cpu1, mut cpu8) = (Value::Null, Value::Null);
    let (b1, b8) = match (t, library_bulk_target) {
        _ if plan.bulk_secs == 0 => (f64::NAN, f64::NAN),
        (Target::Port { iperf: port, .. }, _) => {
            let (b1, c1) = iperf_with_cpu(&a.iperf3, *port, 1, plan.bulk_secs, pids).await;
            let (b8, c8) = iperf_with_cpu(&a.iperf3, *port, 8, plan.bulk_secs, pids).await;
            (cpu1, cpu8) = (c1, c8);
            (b1, b8)
        }
        (_, Some((bt, counter))) => (
            library_bulk(bt, Arc::clone(&counter), 1, plan.bulk_secs)
                .await
                .unwrap_or(f64::NAN),
            library_bulk(bt, counter, 8, plan.bulk_secs)
                .await
                .unwrap_or(f64::NAN),
        ),
        _ => (f64::NAN, f64::NAN),
    };
    let seq = match plan.sequential {
        0 => Value::Null,
        n => sequential(t, n).await?,
    };
    let conc = match plan.concurrent {
        0 => Value::Null,
        n => concurrent(t, n, pids).await?,
    };
    Ok(json!({"bulk_1_gbps": b1 / 1e9, "bulk_8_gbps": b8 / 1e9,
               "cpu_ms_per_gb_1": cpu1, "cpu_ms_per_gb_8": cpu8,
               "connect_echo": seq, "concurrent": conc}))
}

async fn rathole_config(
    bin: &Path,
    dir: &Path,
    tls: bool,
    echo: SocketAddr,
    iperf: u16,
) -> Result<(Vec<Proc>, Target)> {
    let control = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let pe = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let pi = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let d = dir.join(if tls { "rathole-tls" } else { "rathole-tcp" });
    std::fs::create_dir_all(&d)?;
    let (server_tls, client_tls) = if tls {
        rathole_tls_sections(&d).await?
    } else {
        (String::new(), String::new())
    };
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n{server_tls}\n[server.services.echo]\nbind_addr = \"127.0.0.1:{pe}\"\n[server.services.iperf]\nbind_addr = \"127.0.0.1:{pi}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"localhost:{control}\"\ndefault_token = \"bench\"\n{client_tls}\n[client.services.echo]\nlocal_addr = \"{echo}\"\n[client.services.iperf]\nlocal_addr = \"127.0.0.1:{iperf}\"\n"
    );
    let (s, c) = start_rathole(bin, &d, &server, &client).await?;
    // The data channels are set up lazily; make sure both services answer.
    for _ in 0..50 {
        if probe_is_echo(pe).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((
        vec![s, c],
        Target::Port {
            echo: pe,
            iperf: pi,
        },
    ))
}

/// A certificate for `localhost` under `d` (rathole's server takes it as PKCS#12) and the
/// `[server.transport]` and `[client.transport]` sections that use it.
async fn rathole_tls_sections(d: &Path) -> Result<(String, String)> {
    let pki = hyco_io::tls::generate_pki(&["localhost".to_owned()])?;
    std::fs::write(d.join("cert.pem"), &pki.cert_pem)?;
    std::fs::write(d.join("key.pem"), &pki.key_pem)?;
    std::fs::write(d.join("ca.pem"), &pki.ca_cert_pem)?;
    let st = Command::new("openssl")
        .args([
            "pkcs12",
            "-export",
            "-out",
            "id.p12",
            "-inkey",
            "key.pem",
            "-in",
            "cert.pem",
            "-passout",
            "pass:hyco",
        ])
        .current_dir(d)
        .status()
        .await?;
    if !st.success() {
        bail!("openssl pkcs12 failed");
    }
    Ok((
        format!("[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = {:?}\npkcs12_password = \"hyco\"\n", d.join("id.p12")),
        format!("[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = {:?}\nhostname = \"localhost\"\n", d.join("ca.pem")),
    ))
}

/// rathole's server and client from the configurations given (written under `d`), each
/// started once it says it is up.
async fn start_rathole(bin: &Path, d: &Path, server: &str, client: &str) -> Result<(Proc, Proc)> {
    std::fs::write(d.join("server.toml"), server)?;
    std::fs::write(d.join("client.toml"), client)?;
    let server_toml = d.join("server.toml").display().to_string();
    let client_toml = d.join("client.toml").display().to_string();
    let (s, _) = spawn(
        "rathole-server",
        bin,
        &["--server", &server_toml],
        &[("RUST_LOG", "info")],
        "Listening",
    )
    .await?;
    let (c, _) = spawn(
        "rathole-client",
        bin,
        &["--client", &client_toml],
        &[("RUST_LOG", "info")],
        "Control channel established",
    )
    .await?;
    Ok((s, c))
}

/// Adds `…_ratio` next to every figure: the figure divided by direct's.
fn ratios(mut v: Value) -> Value {
    let direct = v["direct"].clone();
    if let Some(obj) = v.as_object_mut() {
        for (name, cfg) in obj.iter_mut() {
            if name == "direct" {
                continue;
            }
            for key in ["bulk_1_gbps", "bulk_8_gbps"] {
                if let (Some(x), Some(d)) = (cfg[key].as_f64(), direct[key].as_f64()) {
                    cfg[format!("{key}_ratio")] = json!((x / d * 1000.0).round() / 1000.0);
                }
            }
            for key in ["p50_us", "p99_us"] {
                if let (Some(x), Some(d)) = (
                    cfg["connect_echo"][key].as_f64(),
                    direct["connect_echo"][key].as_f64(),
                ) {
                    cfg["connect_echo"][format!("{key}_ratio")] =
                        json!((x / d * 100.0).round() / 100.0);
                }
            }
        }
    }
    v
}

/// The relayed figures as ratios of the direct ones (throughput: relayed / direct; latency:
/// relayed / direct, so higher is slower).
fn with_http_ratios(mut v: Value) -> Value {
    let d = v["direct"].clone();
    let r = &mut v["relayed"];
    for k in ["requests_per_s", "p50_ms", "p99_ms"] {
        if let (Some(rv), Some(dv)) = (r[k].as_f64(), d[k].as_f64()) {
            if dv > 0.0 {
                r[format!("{k}_ratio")] = json!(rv / dv);
            }
        }
    }
    v
}

fn print_http(v: &Value) {
    let f = |x: &Value| {
        x.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    println!("\nHTTP mode, 16 keep-alive connections, small GET:");
    println!(
        "{:<10} {:>12} {:>9} {:>9} {:>9} {:>8}",
        "", "requests/s", "p50 ms", "p99 ms", "errors", "rps ratio"
    );
    for side in ["direct", "relayed"] {
        let c = &v[side];
        println!(
            "{:<10} {:>12} {:>9} {:>9} {:>9} {:>8}",
            side,
            f(&c["requests_per_s"]),
            f(&c["p50_ms"]),
            f(&c["p99_ms"]),
            c["errors"].as_u64().unwrap_or(0),
            f(&c["requests_per_s_ratio"]),
        );
    }
}

fn print_cluster(v: &Value) {
    let f = |x: &Value| {
        x.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    if let Some(e) = v["error"].as_str() {
        println!("\ncluster: {e}");
        return;
    }
    println!("\nCluster, 2 nodes on one redis-server, library sender, listener on node 1:");
    println!(
        "{:<12} {:>10} {:>10} {:>10}",
        "sender on", "p50 µs", "p99 µs", "1-stream"
    );
    for (side, label) in [("same_node", "node 1"), ("cross_node", "node 2")] {
        let c = &v[side];
        println!(
            "{:<12} {:>10} {:>10} {:>10}",
            label,
            f(&c["connect_echo"]["p50_us"]),
            f(&c["connect_echo"]["p99_us"]),
            f(&c["bulk_1_gbps"]),
        );
    }
    let r = &v["cross_over_same"];
    println!(
        "cross-node / same-node: p50 {}, p99 {}, throughput {}",
        f(&r["p50"]),
        f(&r["p99"]),
        f(&r["bulk_1"])
    );
}

fn print_table(v: &Value) {
    println!(
        "{:<12} {:>10} {:>7} {:>10} {:>7} {:>9} {:>10} {:>10} {:>9} {:>10} {:>12}",
        "config",
        "1-stream",
        "ratio",
        "8-stream",
        "ratio",
        "CPU s/GB",
        "p50 µs",
        "p99 µs",
        "conns ok",
        "open s",
        "KiB/conn"
    );
    if let Some(obj) = v.as_object() {
        for (name, c) in obj
            .iter()
            .filter(|(n, _)| *n != "http_mode" && *n != "cluster")
        {
            let f = stats::cell;
            println!(
                "{:<12} {:>10} {:>7} {:>10} {:>7} {:>9} {:>10} {:>10} {:>9} {:>10} {:>12}",
                name,
                f(&c["bulk_1_gbps"]),
                f(&c["bulk_1_gbps_ratio"]),
                f(&c["bulk_8_gbps"]),
                f(&c["bulk_8_gbps_ratio"]),
                f(&json!(c["cpu_ms_per_gb_8"]["total"]
                    .as_f64()
                    .map(|ms| ms / 1000.0))),
                f(&c["connect_echo"]["p50_us"]),
                f(&c["connect_echo"]["p99_us"]),
                c["concurrent"]["ok"]
                    .as_u64()
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "-".into()),
                f(&c["concurrent"]["open_all_secs"]),
                f(&c["concurrent"]["kib_per_connection_total"]),
            );
        }
    }
    println!(
        "(throughput in Gbit/s; ratios against direct TCP in this run; CPU s/GB: what the \
         tunnel's processes spent per GB carried with 8 streams, all of them summed)"
    );
}
