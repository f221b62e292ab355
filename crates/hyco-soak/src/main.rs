//! `hyco-soak`: a long run (not in CI) of a relay, two managers (HA) and a forwarder, all on
//! 127.0.0.1, under N parallel client tasks doing one checked transfer at a time through the
//! forwarder to an in-process endpoint. Sizes are random (log-uniform), the half-close order
//! is random, some transfers are aborted on purpose (RST), a manager is SIGKILLed and restarted
//! every few minutes and the forwarder now and then. Every completed transfer is verified by
//! SHA-256; failures are counted by cause; RSS and descriptors of every process are sampled.
//!
//! `bench/soak` builds the release binaries and runs this. The exit code is 0 when the run
//! finished with no integrity failure (hash mismatch, silent truncation, extra bytes), 2 when
//! there was one, 1 when the setup failed.

mod client;
mod endpoint;
mod procs;
mod stats;
mod wire;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{Failure, Moved, Plan};
use crate::endpoint::{AnomalyKind, Endpoint};
use crate::procs::{Managed, Usage};
use crate::stats::{lock, Stats, CAUSES, INTEGRITY};
use crate::wire::{Header, Mode};

/// Soak run: relay, two managers and a forwarder under checked parallel transfers and faults.
#[derive(Parser, Debug)]
#[command(name = "hyco-soak", args_override_self = true)]
struct Args {
    /// The hyco binary (a release build; this program builds nothing).
    #[arg(long, default_value = "target/release/hyco")]
    hyco: PathBuf,
    /// How long the load runs: 90s, 30m, 1h30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    duration: Duration,
    /// Parallel client tasks, each doing one transfer at a time.
    #[arg(long, default_value_t = 32)]
    tunnels: usize,
    /// Largest transfer: bytes, or with KiB / MiB / GiB.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_size: u64,
    /// Seed of the client tasks' and the fault schedule's randomness [default: random].
    #[arg(long)]
    seed: Option<u64>,
    /// Write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Bound of one transfer, connect to verified end.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    transfer_timeout: Duration,
    /// Probability that a transfer is aborted by its client (RST) at a random point.
    #[arg(long, default_value_t = 0.05)]
    abort_probability: f64,
    /// Time between manager SIGKILLs, drawn uniformly from MIN..MAX, or `off`.
    #[arg(long, default_value = "2m..5m", value_parser = parse_every)]
    manager_kill_every: Every,
    /// How long a killed manager stays down before it is started again: MIN..MAX.
    #[arg(long, default_value = "2s..8s", value_parser = parse_every)]
    manager_down_for: Every,
    /// Time between forwarder SIGKILL-and-restarts (same port), MIN..MAX, or `off`.
    #[arg(long, default_value = "10m..15m", value_parser = parse_every)]
    forwarder_restart_every: Every,
    /// Period of the live line (and of the RSS / descriptor samples).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    report_every: Duration,
    /// Transfer modes to draw from, comma-separated: echo, download, upload, sink.
    #[arg(long, default_value = "echo,download,upload,sink", value_parser = parse_modes)]
    modes: Modes,
    /// Keep every process's full log in this folder (ROLE.log; restarts append).
    #[arg(long)]
    logs: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Modes(Vec<Mode>);

fn parse_modes(s: &str) -> Result<Modes, String> {
    let mut v = Vec::new();
    for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match Mode::ALL.iter().find(|m| m.name() == w) {
            Some(m) if !v.contains(m) => v.push(*m),
            Some(_) => {}
            None => return Err(format!("{w}: not one of echo, download, upload, sink")),
        }
    }
    if v.is_empty() {
        return Err("no mode given".into());
    }
    Ok(Modes(v))
}

/// A random interval, or none.
#[derive(Clone, Copy, Debug)]
struct Every(Option<(Duration, Duration)>);

impl Every {
    fn pick(&self, rng: &mut StdRng) -> Option<Duration> {
        let (lo, hi) = self.0?;
        Some(Duration::from_secs_f64(
            rng.gen_range(lo.as_secs_f64()..=hi.as_secs_f64()),
        ))
    }
    fn describe(&self) -> String {
        match self.0 {
            None => "off".into(),
            Some((a, b)) => format!("{}..{}", fmt_dur(a), fmt_dur(b)),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        return if n >= 0.0 && n.is_finite() {
            Ok(Duration::from_secs_f64(n))
        } else {
            Err(format!("{s}: not a duration"))
        };
    }
    let mut total = 0.0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().map_err(|_| format!("{s}: not a duration"))?;
        num.clear();
        total += n * match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return Err(format!("{s}: unit {c:?} is not h, m or s")),
        };
    }
    if !num.is_empty() {
        return Err(format!("{s}: a number without a unit at the end"));
    }
    Ok(Duration::from_secs_f64(total))
}

fn parse_every(s: &str) -> Result<Every, String> {
    if s == "off" {
        return Ok(Every(None));
    }
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let (a, b) = (parse_duration(a)?, parse_duration(b)?);
    if a > b || b.is_zero() {
        return Err(format!("{s}: expected MIN..MAX with 0 < MAX, MIN <= MAX"));
    }
    Ok(Every(Some((a, b))))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| format!("{s}: not a size"))?;
    let mult = match s[split..].trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        u => return Err(format!("{s}: unknown unit {u}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s}: too large"))
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Removes the scratch folder when the run ends, however it ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Roles in report order.
const ROLES: [&str; 4] = ["relay", "manager-a", "manager-b", "forward"];

/// The processes, each behind a lock (the fault task restarts them), and their current pids
/// (read by the sampler without waiting for a restart).
struct Procs {
    all: BTreeMap<&'static str, Arc<tokio::sync::Mutex<Managed>>>,
    pids: Mutex<BTreeMap<&'static str, u32>>,
}

impl Procs {
    fn set_pid(&self, role: &'static str, pid: Option<u32>) {
        let mut p = lock(&self.pids);
        match pid {
            Some(pid) => p.insert(role, pid),
            None => p.remove(role),
        };
    }

    fn usage(&self) -> BTreeMap<&'static str, Usage> {
        let pids = lock(&self.pids).clone();
        ROLES
            .iter()
            .map(|r| (*r, pids.get(r).map(|p| Usage::of(*p)).unwrap_or_default()))
            .collect()
    }
}

fn usage_json(u: &BTreeMap<&'static str, Usage>) -> Value {
    Value::Object(u.iter().map(|(k, v)| ((*k).to_owned(), v.json())).collect())
}

/// Runs `hyco admin ARGS` with the root connection string; returns its stdout.
async fn admin(hyco: &Path, ca: &Path, root: &str, args: &[&str]) -> Result<String> {
    let admin = hyco_testkit::Admin {
        bin: hyco.to_owned(),
        ca: ca.to_owned(),
        root: root.to_owned(),
        within: Duration::from_secs(30),
    };
    Ok(admin.ok(args).await?)
}

/// Number of entries in `{"value": [...]}` from `hyco admin hc connections|listeners`.
async fn admin_count(hyco: &Path, ca: &Path, root: &str, what: &str) -> Result<usize> {
    let out = admin(hyco, ca, root, &["--output", "json", "hc", what, "soak"]).await?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("hc {what}: {out}"))?;
    v["value"]
        .as_array()
        .map(Vec::len)
        .with_context(|| format!("hc {what}: no value array in {out}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(2),
        Err(e) => {
            eprintln!("hyco-soak: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One client task's transfer in flight.
#[derive(Default)]
struct Slot {
    /// Start in ms since the load began, plus one; 0 when idle.
    start_ms: AtomicU64,
    header: Mutex<Option<Header>>,
    trace: client::Trace,
}

impl Slot {
    fn describe(&self) -> String {
        match *lock(&self.header) {
            Some(h) => format!(
                "transfer {} {} size {}{}, in {}, {} B sent, {} B received, client port {}",
                h.id,
                h.mode.name(),
                h.size,
                if h.late_close { " late close" } else { "" },
                self.trace.phase(),
                self.trace.up.load(Relaxed),
                self.trace.down.load(Relaxed),
                self.trace.port.load(Relaxed)
            ),
            None => "idle".into(),
        }
    }
}

/// Shared between the client tasks, the fault task and the sampler.
struct Shared {
    stats: Stats,
    moved: Moved,
    endpoint: Arc<Endpoint>,
    forward_addr: SocketAddr,
    next_id: AtomicU64,
    /// Per client task, its transfer in flight.
    slots: Vec<Slot>,
    args: Args,
    seed: u64,
}

/// Sets up, runs the load and the faults, reports. Returns the number of integrity failures.
async fn run(args: Args) -> Result<u64> {
    if args.tunnels == 0 {
        bail!("--tunnels must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.abort_probability) {
        bail!("--abort-probability must be within 0..=1");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let hyco = std::fs::canonicalize(&args.hyco).with_context(|| {
        format!(
            "{} (build it: cargo build --release -p hyco)",
            args.hyco.display()
        )
    })?;
    let base = std::env::temp_dir().join(format!("hyco-soak-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let _cleanup = RemoveDir(base.clone());
    // Run a private copy: a rebuild of target/release/hyco during the run must not change what
    // the restarted managers and forwarder execute.
    let hyco = {
        let copy = base.join("hyco");
        std::fs::copy(&hyco, &copy)
            .with_context(|| format!("copying {} to {}", hyco.display(), copy.display()))?;
        copy
    };

    // Ctrl-C and SIGTERM end the run early; the report is still written and every process
    // killed.
    let (stop_tx, stop_rx) = watch::channel(false);
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (stop_tx, interrupted) = (stop_tx.clone(), Arc::clone(&interrupted));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("hyco-soak: interrupted; stopping and reporting");
            interrupted.store(true, Relaxed);
            let _ = stop_tx.send(true);
        });
    }

    if let Some(d) = &args.logs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_file = |role: &str| args.logs.as_ref().map(|d| d.join(format!("{role}.log")));
    let endpoint = Endpoint::start().await?;
    let relay_data = base.join("relay");
    let mut relay = Managed::new(
        "relay",
        hyco.clone(),
        vec![
            "relay".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data".into(),
            relay_data.to_string_lossy().into_owned(),
        ],
        vec![],
        "relay listening",
    );
    relay.log_to(log_file("relay"))?;
    relay.start(Duration::from_secs(60)).await?;
    let ca = relay_data.join("ca.pem");
    let root = std::fs::read_to_string(relay_data.join("root.connection-string"))
        .context("the relay's root.connection-string")?
        .trim()
        .to_owned();
    admin(
        &hyco,
        &ca,
        &root,
        &[
            "hc",
            "create",
            "soak",
            "--endpoint",
            &endpoint.addr.to_string(),
        ],
    )
    .await?;
    let listen = admin(
        &hyco,
        &ca,
        &root,
        &[
            "rule",
            "create",
            "soak-listen",
            "--hc",
            "soak",
            "--rights",
            "listen",
        ],
    )
    .await?;
    let send = admin(
        &hyco,
        &ca,
        &root,
        &[
            "rule",
            "create",
            "soak-send",
            "--hc",
            "soak",
            "--rights",
            "send",
        ],
    )
    .await?;
    let ca_env = vec![("HYCO_CA_FILE".to_owned(), ca.to_string_lossy().into_owned())];
    let mut managers = Vec::new();
    for role in ["manager-a", "manager-b"] {
        let state = base.join(role);
        let mut m = Managed::new(
            role,
            hyco.clone(),
            vec![
                "manager".into(),
                "run".into(),
                "--connection-string".into(),
                listen.clone(),
                "--state-dir".into(),
                state.to_string_lossy().into_owned(),
            ],
            ca_env.clone(),
            "listener connected",
        );
        m.log_to(log_file(role))?;
        m.start(Duration::from_secs(60)).await?;
        managers.push(m);
    }
    let mut forward = Managed::new(
        "forward",
        hyco.clone(),
        vec![
            "forward".into(),
            "-L".into(),
            "127.0.0.1:0:soak".into(),
            "--connection-string".into(),
            send.clone(),
        ],
        ca_env.clone(),
        "forwarding",
    );
    forward.log_to(log_file("forward"))?;
    forward.start(Duration::from_secs(60)).await?;
    let port = procs::port_field(&forward.ready_line, "local")
        .with_context(|| format!("no local= port in {:?}", forward.ready_line))?;
    // Restarts take the same port, so clients keep one address.
    forward.set_args(vec![
        "forward".into(),
        "-L".into(),
        format!("127.0.0.1:{port}:soak"),
        "--connection-string".into(),
        send.clone(),
    ]);
    let forward_addr = SocketAddr::from(([127, 0, 0, 1], port));

    let mut all = BTreeMap::new();
    let procs_ = Procs {
        all: BTreeMap::new(),
        pids: Mutex::new(BTreeMap::new()),
    };
    procs_.set_pid("relay", relay.pid());
    procs_.set_pid("forward", forward.pid());
    all.insert("relay", Arc::new(tokio::sync::Mutex::new(relay)));
    all.insert("forward", Arc::new(tokio::sync::Mutex::new(forward)));
    for m in managers {
        let role = if m.role == "manager-a" {
            "manager-a"
        } else {
            "manager-b"
        };
        procs_.set_pid(role, m.pid());
        all.insert(role, Arc::new(tokio::sync::Mutex::new(m)));
    }
    let procs = Arc::new(Procs { all, ..procs_ });

    // Every mode once, both managers up, before the load: a broken setup stops here.
    let check_moved = Moved::default();
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let plan = Plan {
            header: Header {
                mode,
                late_close: i % 2 == 1,
                id: u64::MAX - i as u64,
                size: 100_000,
                seed: i as u64,
            },
            abort_at: None,
        };
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            client::run(
                forward_addr,
                plan,
                &endpoint,
                &check_moved,
                &client::Trace::default(),
            ),
        )
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("setup check, {} through hyco: {e:?}", mode.name()),
            Err(_) => bail!("setup check, {} through hyco: over 30 s", mode.name()),
        }
    }

    let usage_start = procs.usage();
    let start_json = usage_json(&usage_start);
    let shared = Arc::new(Shared {
        stats: Stats::new(),
        moved: Moved::default(),
        endpoint: Arc::clone(&endpoint),
        forward_addr,
        next_id: AtomicU64::new(1),
        slots: (0..args.tunnels).map(|_| Slot::default()).collect(),
        seed,
        args,
    });
    let a = &shared.args;
    println!(
        "hyco-soak: {} tunnels for {}, max size {} B, seed {seed}, abort p {}, manager kill every {} (down {}), forwarder restart every {}; relay, managers, forwarder: {}",
        a.tunnels,
        fmt_dur(a.duration),
        a.max_size,
        a.abort_probability,
        a.manager_kill_every.describe(),
        a.manager_down_for.describe(),
        a.forwarder_restart_every.describe(),
        ROLES
            .iter()
            .map(|r| format!("{r} pid {}", usage_start[r].pid))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Load.
    let mut clients = Vec::new();
    for i in 0..shared.args.tunnels {
        clients.push(tokio::spawn(client_loop(
            Arc::clone(&shared),
            i,
            stop_rx.clone(),
        )));
    }
    let faults = tokio::spawn(fault_loop(
        Arc::clone(&shared),
        Arc::clone(&procs),
        stop_rx.clone(),
    ));
    let samples = Arc::new(Mutex::new(Vec::<Value>::new()));
    let peaks = Arc::new(Mutex::new(BTreeMap::<&'static str, (u64, u64)>::new()));
    let sampler = tokio::spawn(sample_loop(
        Arc::clone(&shared),
        Arc::clone(&procs),
        Arc::clone(&samples),
        Arc::clone(&peaks),
        stop_rx.clone(),
    ));

    let mut stop_wait = stop_rx.clone();
    tokio::select! {
        _ = tokio::time::sleep(shared.args.duration) => {}
        _ = stop_wait.wait_for(|s| *s) => {}
    }
    let load_secs = shared.stats.t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let was_interrupted = interrupted.load(Relaxed);

    // Let transfers in flight finish (bounded), and a manager being restarted come back.
    let grace = if was_interrupted {
        Duration::from_secs(5)
    } else {
        shared.args.transfer_timeout + Duration::from_secs(5)
    };
    let deadline = Instant::now() + grace;
    for c in &mut clients {
        if tokio::time::timeout_at(deadline, &mut *c).await.is_err() {
            c.abort();
        }
    }
    let stuck: Vec<String> = shared
        .slots
        .iter()
        .filter(|f| f.start_ms.load(Relaxed) != 0)
        .map(Slot::describe)
        .collect();
    for s in &stuck {
        eprintln!("hyco-soak: still in flight when the clients were stopped: {s}");
    }
    let stuck_at_end = stuck.len();
    if tokio::time::timeout(Duration::from_secs(90), faults)
        .await
        .is_err()
    {
        eprintln!("hyco-soak: the fault task did not finish within 90 s");
    }
    sampler.abort();
    let usage_end = procs.usage();

    // Drain: the relay must count no connection once the clients are done, the endpoint no
    // open socket; both managers must be listening.
    let drain_start = Instant::now();
    let mut relay_conns: Option<usize> = None;
    let mut drain_err = None;
    // After Ctrl-C the terminal signalled the hyco processes too: one look is enough.
    let drain_limit = if was_interrupted {
        Duration::ZERO
    } else {
        Duration::from_secs(30)
    };
    loop {
        match admin_count(&hyco, &ca, &root, "connections").await {
            Ok(n) => {
                relay_conns = Some(n);
                if n == 0 && endpoint.stats.active.load(Relaxed) == 0 {
                    break;
                }
            }
            Err(e) => drain_err = Some(format!("{e:#}")),
        }
        if drain_start.elapsed() >= drain_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let listeners = admin_count(&hyco, &ca, &root, "listeners").await.ok();
    let usage_drained = procs.usage();

    // Stop everything (the forwarder and managers first, the relay last).
    for role in ["forward", "manager-a", "manager-b", "relay"] {
        if let Some(p) = procs.all.get(role) {
            p.lock().await.stop(Duration::from_secs(15)).await;
        }
    }

    let peaks_now = lock(&peaks).clone();
    let samples_now = lock(&samples).clone();
    let report = build_report(ReportIn {
        shared: &shared,
        procs: &procs,
        load_secs,
        interrupted: was_interrupted,
        stuck_at_end,
        start: start_json,
        usage_start: &usage_start,
        usage_end: &usage_end,
        usage_drained: &usage_drained,
        peaks: &peaks_now,
        samples: samples_now,
        relay_conns,
        drain_secs,
        drain_err,
        listeners,
    })
    .await;
    if let Some(out) = &shared.args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report.0)?)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("\nJSON report: {}", out.display());
    }
    print!("{}", report.1);
    Ok(shared.stats.integrity_failures())
}

async fn client_loop(sh: Arc<Shared>, i: usize, stop: watch::Receiver<bool>) {
    let mut rng =
        StdRng::seed_from_u64(sh.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    while !*stop.borrow() {
        let id = sh.next_id.fetch_add(1, Relaxed);
        let plan = Plan::random(
            &mut rng,
            id,
            &sh.args.modes.0,
            sh.args.max_size,
            sh.args.abort_probability,
        );
        let during_outage = sh.stats.managers_down.load(Relaxed) > 0;
        sh.stats.started();
        let start = Instant::now();
        let slot = &sh.slots[i];
        *lock(&slot.header) = Some(plan.header);
        slot.start_ms
            .store((start - sh.stats.t0).as_millis() as u64 + 1, Relaxed);
        let r = match tokio::time::timeout(
            sh.args.transfer_timeout,
            client::run(sh.forward_addr, plan, &sh.endpoint, &sh.moved, &slot.trace),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                sh.endpoint.forget_sink(id);
                eprintln!(
                    "[{}] timeout after {}: {}",
                    fmt_dur(start.elapsed() + (start - sh.stats.t0)),
                    fmt_dur(sh.args.transfer_timeout),
                    slot.describe()
                );
                Err(Failure::Timeout {
                    phase: slot.trace.phase(),
                })
            }
        };
        let end = Instant::now();
        slot.start_ms.store(0, Relaxed);
        *lock(&slot.header) = None;
        let port = slot.trace.port.load(Relaxed);
        let cause = sh.stats.record(&plan, start, end, during_outage, port, &r);
        match cause {
            Some(c) if INTEGRITY.contains(&c) => eprintln!(
                "[{}] INTEGRITY FAILURE {c}: transfer {id} {:?}: {}",
                fmt_dur(end - sh.stats.t0),
                plan.header,
                r.as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
            Some("connect_refused") => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => {}
        }
    }
}

/// Kills a manager (SIGKILL) every few minutes and starts it again after a few seconds;
/// restarts the forwarder (SIGKILL, same port) more rarely. One fault at a time.
async fn fault_loop(sh: Arc<Shared>, procs: Arc<Procs>, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(sh.seed ^ 0xFA17);
    let now = Instant::now();
    let mut next_mgr = sh.args.manager_kill_every.pick(&mut rng).map(|d| now + d);
    let mut next_fwd = sh
        .args
        .forwarder_restart_every
        .pick(&mut rng)
        .map(|d| now + d);
    loop {
        let (at, is_mgr) = match (next_mgr, next_fwd) {
            (None, None) => return,
            (Some(m), None) => (m, true),
            (None, Some(f)) => (f, false),
            (Some(m), Some(f)) => (m.min(f), m <= f),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (role, down_for): (&'static str, Duration) = if is_mgr {
            next_mgr = sh
                .args
                .manager_kill_every
                .pick(&mut rng)
                .map(|d| Instant::now() + d);
            (
                if rng.gen_bool(0.5) {
                    "manager-a"
                } else {
                    "manager-b"
                },
                sh.args
                    .manager_down_for
                    .pick(&mut rng)
                    .unwrap_or(Duration::from_secs(3)),
            )
        } else {
            next_fwd = sh
                .args
                .forwarder_restart_every
                .pick(&mut rng)
                .map(|d| Instant::now() + d);
            ("forward", Duration::from_secs_f64(rng.gen_range(1.0..=3.0)))
        };
        let Some(p) = procs.all.get(role) else {
            continue;
        };
        let mut p = p.lock().await;
        let pid = p.pid().unwrap_or(0);
        if is_mgr {
            sh.stats.managers_down.fetch_add(1, Relaxed);
        }
        let k = sh.stats.kill(role, pid);
        p.kill().await;
        sh.stats.dead(k);
        procs.set_pid(role, None);
        let t_kill = Instant::now();
        // Down for a while (cut short when the run ends: the drain check wants it back).
        tokio::select! {
            _ = tokio::time::sleep(down_for) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        let mut started = false;
        for attempt in 1..=5 {
            match p.start(Duration::from_secs(60)).await {
                Ok(()) => {
                    started = true;
                    break;
                }
                Err(e) => {
                    eprintln!("hyco-soak: restarting {role} (attempt {attempt}): {e:#}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        procs.set_pid(role, p.pid());
        if started {
            sh.stats.ready_again(k);
        }
        if is_mgr {
            sh.stats.managers_down.fetch_sub(1, Relaxed);
        }
        eprintln!(
            "[{}] SIGKILL {role} pid {pid}; restarted as pid {} , ready {} after the kill",
            fmt_dur(t_kill - sh.stats.t0),
            p.pid().unwrap_or(0),
            fmt_dur(t_kill.elapsed())
        );
    }
}

/// Every `report_every`: samples RSS and descriptors and prints the live line.
async fn sample_loop(
    sh: Arc<Shared>,
    procs: Arc<Procs>,
    samples: Arc<Mutex<Vec<Value>>>,
    peaks: Arc<Mutex<BTreeMap<&'static str, (u64, u64)>>>,
    stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(sh.args.report_every);
    tick.tick().await;
    let mut last_bytes = (0u64, 0u64);
    let mut last_t = Instant::now();
    loop {
        tick.tick().await;
        if *stop.borrow() {
            return;
        }
        let u = procs.usage();
        {
            let mut pk = lock(&peaks);
            for (r, v) in &u {
                let e = pk.entry(r).or_default();
                e.0 = e.0.max(v.rss_kib);
                e.1 = e.1.max(v.fds);
            }
        }
        let (ok, failed, _) = sh.stats.counts();
        let up = sh.moved.up.load(Relaxed);
        let down = sh.moved.down.load(Relaxed);
        let now = Instant::now();
        let rate = ((up + down) - (last_bytes.0 + last_bytes.1)) as f64
            / (now - last_t).as_secs_f64().max(0.001)
            / 1e6;
        last_bytes = (up, down);
        last_t = now;
        let t = now - sh.stats.t0;
        let now_ms = t.as_millis() as u64;
        let (oldest, oldest_slot) = sh
            .slots
            .iter()
            .map(|f| (f.start_ms.load(Relaxed), f))
            .filter(|(s, _)| *s != 0)
            .map(|(s, f)| (now_ms.saturating_sub(s - 1), Some(f)))
            .max_by_key(|(age, _)| *age)
            .unwrap_or((0, None));
        let causes = sh.stats.causes();
        let kills = sh.stats.kills();
        let mk = kills
            .iter()
            .filter(|k| k.role.starts_with("manager"))
            .count();
        let fk = kills.len() - mk;
        let fails: Vec<String> = causes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        eprintln!(
            "[{}] ok {ok} failed {failed} ({}) | up {} down {} | {rate:.1} MB/s | kills mgr {mk} fwd {fk} | oldest in flight {:.1}s | RSS MiB {} | fds {}",
            fmt_dur(t),
            if fails.is_empty() { "-".into() } else { fails.join(", ") },
            gib(up),
            gib(down),
            oldest as f64 / 1000.0,
            ROLES.iter().map(|r| mib(u[r].rss_kib)).collect::<Vec<_>>().join("/"),
            ROLES.iter().map(|r| u[r].fds.to_string()).collect::<Vec<_>>().join("/"),
        );
        if oldest > 10_000 {
            if let Some(f) = oldest_slot {
                eprintln!(
                    "[{}] slow: in flight for {:.1}s: {}",
                    fmt_dur(t),
                    oldest as f64 / 1000.0,
                    f.describe()
                );
            }
        }
        lock(&samples).push(json!({
            "t_secs": t.as_secs(),
            "ok": ok, "failed": failed,
            "bytes_client_to_endpoint": up, "bytes_endpoint_to_client": down,
            "mb_per_s": (rate * 10.0).round() / 10.0,
            "oldest_in_flight_secs": oldest as f64 / 1000.0,
            "endpoint_open": sh.endpoint.stats.active.load(Relaxed),
            "processes": usage_json(&u),
        }));
    }
}

fn stuck_json(sh: &Shared) -> Value {
    sh.slots
        .iter()
        .filter(|f| f.start_ms.load(Relaxed) != 0)
        .map(|f| Value::String(f.describe()))
        .collect()
}

struct ReportIn<'a> {
    shared: &'a Shared,
    procs: &'a Procs,
    load_secs: f64,
    interrupted: bool,
    stuck_at_end: usize,
    start: Value,
    usage_start: &'a BTreeMap<&'static str, Usage>,
    usage_end: &'a BTreeMap<&'static str, Usage>,
    usage_drained: &'a BTreeMap<&'static str, Usage>,
    peaks: &'a BTreeMap<&'static str, (u64, u64)>,
    samples: Vec<Value>,
    relay_conns: Option<usize>,
    drain_secs: f64,
    drain_err: Option<String>,
    listeners: Option<usize>,
}

/// The JSON report and its text (Markdown tables).
async fn build_report(r: ReportIn<'_>) -> (Value, String) {
    let sh = r.shared;
    let a = &sh.args;
    let st = &sh.stats;
    let transfers = st.json();
    let (up, down) = (sh.moved.up.load(Relaxed), sh.moved.down.load(Relaxed));
    let es = &sh.endpoint.stats;

    // Endpoint anomalies, by what the client concluded for the same transfer.
    let mut anomalies: BTreeMap<String, u64> = BTreeMap::new();
    for an in sh.endpoint.anomalies() {
        let kind = match an.kind {
            AnomalyKind::TruncatedCleanEof { .. } => "input cut short, clean FIN",
            AnomalyKind::ExtraInput { .. } => "input longer than announced",
        };
        let client = st.cause_of(an.id).unwrap_or("client saw success");
        *anomalies
            .entry(format!("{kind} ({}) / client: {client}", an.mode.name()))
            .or_default() += 1;
    }

    let kills = st.kills();
    let kill_json: Vec<Value> = kills
        .iter()
        .map(|k| {
            json!({
                "role": k.role, "pid": k.pid,
                "at_secs": ((k.at - st.t0).as_secs_f64() * 10.0).round() / 10.0,
                "back_after_secs": k.ready.map(|t| ((t - k.at).as_secs_f64() * 10.0).round() / 10.0),
                "failed_transfers_in_flight": k.failures,
                "of_which_stalled_over_10s_before": k.stalled,
            })
        })
        .collect();
    let mgr_kills: Vec<&stats::KillEvent> = kills
        .iter()
        .filter(|k| k.role.starts_with("manager"))
        .collect();
    let fwd_kills = kills.len() - mgr_kills.len();

    let mut logs = serde_json::Map::new();
    for role in ROLES {
        if let Some(p) = r.procs.all.get(role) {
            let p = p.lock().await;
            logs.insert(
                role.into(),
                json!({"starts": p.starts, "lines": p.log.snapshot()}),
            );
        }
    }

    let mut procs_json = serde_json::Map::new();
    for role in ROLES {
        let pk = r.peaks.get(role).copied().unwrap_or_default();
        procs_json.insert(
            role.into(),
            json!({
                "start": r.usage_start[role].json(),
                "peak_sampled": {"rss_kib": pk.0, "fds": pk.1},
                "end_loaded": r.usage_end[role].json(),
                "end_drained": r.usage_drained[role].json(),
            }),
        );
    }

    let json = json!({
        "config": {
            "hyco": a.hyco, "tunnels": a.tunnels, "duration_secs": a.duration.as_secs_f64(),
            "max_size": a.max_size, "seed": sh.seed, "transfer_timeout_secs": a.transfer_timeout.as_secs_f64(),
            "abort_probability": a.abort_probability,
            "manager_kill_every": a.manager_kill_every.describe(),
            "manager_down_for": a.manager_down_for.describe(),
            "forwarder_restart_every": a.forwarder_restart_every.describe(),
            "modes": a.modes.0.iter().map(|m| m.name()).collect::<Vec<_>>(),
        },
        "load_secs": (r.load_secs * 10.0).round() / 10.0,
        "interrupted": r.interrupted,
        "transfers": transfers,
        "bytes": {
            "client_to_endpoint": up, "endpoint_to_client": down,
            "mb_per_s": ((up + down) as f64 / r.load_secs.max(0.001) / 1e6 * 10.0).round() / 10.0,
        },
        "manager_kills": mgr_kills.len(),
        "forwarder_restarts": fwd_kills,
        "kills": kill_json,
        "endpoint": {
            "accepted": es.accepted.load(Relaxed), "completed": es.completed.load(Relaxed),
            "closed_before_header": es.no_header.load(Relaxed), "bad_header": es.bad_header.load(Relaxed),
            "input_reset": es.input_reset.load(Relaxed), "output_error": es.output_error.load(Relaxed),
            "timeouts": es.timeouts.load(Relaxed),
            "open_after_drain": es.active.load(Relaxed),
            "bytes_in": es.bytes_in.load(Relaxed), "bytes_out": es.bytes_out.load(Relaxed),
            "anomalies": anomalies,
        },
        "still_in_flight_at_end": stuck_json(r.shared),
        "drain": {
            "relay_connections_after": r.relay_conns, "secs": (r.drain_secs * 10.0).round() / 10.0,
            "error": r.drain_err, "listeners_after": r.listeners,
            "client_transfers_still_in_flight_at_end": r.stuck_at_end,
        },
        "processes": procs_json,
        "processes_at_start": r.start,
        "samples": r.samples,
        "logs": logs,
    });

    // Text.
    let mut t = String::new();
    let tj = &json["transfers"];
    let _ = writeln!(t, "\n## hyco soak report\n");
    let _ = writeln!(t, "| | |\n|---|---|");
    let _ = writeln!(
        t,
        "| load | {}{} with {} tunnels, modes {}, sizes log-uniform 0..{} B, seed {} |",
        fmt_dur(Duration::from_secs_f64(r.load_secs)),
        if r.interrupted { " (interrupted)" } else { "" },
        a.tunnels,
        a.modes
            .0
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        a.max_size,
        sh.seed
    );
    let _ = writeln!(
        t,
        "| faults | client abort p={}, manager SIGKILL every {} (down {}), forwarder SIGKILL+restart every {} |",
        a.abort_probability,
        a.manager_kill_every.describe(),
        a.manager_down_for.describe(),
        a.forwarder_restart_every.describe()
    );
    let _ = writeln!(
        t,
        "| transfers | {} started, **{} ok (verified)**, {} failed |",
        tj["started"], tj["ok"], tj["failed"]
    );
    let _ = writeln!(
        t,
        "| bytes moved | client→endpoint {}, endpoint→client {} ({} MB/s average both ways) |",
        gib(up),
        gib(down),
        json["bytes"]["mb_per_s"]
    );
    let _ = writeln!(
        t,
        "| **integrity failures** | **{}** (hash mismatch {}, truncated with clean end {}, extra data {}) |",
        tj["integrity_failures"],
        tj["failures_by_cause"]["hash_mismatch"],
        tj["failures_by_cause"]["truncated_clean_eof"],
        tj["failures_by_cause"]["extra_data"]
    );
    let per_kill: Vec<String> = mgr_kills.iter().map(|k| k.failures.to_string()).collect();
    let back: Vec<String> = mgr_kills
        .iter()
        .map(|k| {
            k.ready
                .map(|r| format!("{:.1}", (r - k.at).as_secs_f64()))
                .unwrap_or_else(|| "never".into())
        })
        .collect();
    let _ = writeln!(
        t,
        "| manager kills | {} (failed transfers in flight per kill: [{}]; back, s after kill: [{}]) |",
        mgr_kills.len(),
        per_kill.join(", "),
        back.join(", ")
    );
    let _ = writeln!(t, "| forwarder restarts | {fwd_kills} |");
    let outage = &tj["started_while_a_manager_was_down"];
    let outage_causes: Vec<String> = outage["failed_by_cause"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "| started while a manager was down | {} ok, {} failed ({}) |",
        outage["ok"],
        outage["failed"],
        if outage_causes.is_empty() {
            "-".into()
        } else {
            outage_causes.join(", ")
        }
    );
    let _ = writeln!(
        t,
        "| after the load | relay connections {} (after {:.1} s), endpoint sockets open {}, listeners {}, transfers still in flight {} |",
        r.relay_conns.map_or("?".into(), |n| n.to_string()),
        r.drain_secs,
        es.active.load(Relaxed),
        r.listeners.map_or("?".into(), |n| n.to_string()),
        r.stuck_at_end
    );

    let _ = writeln!(
        t,
        "\n| mode | ok | failed | p50 s | p99 s | max s |\n|---|---:|---:|---:|---:|---:|"
    );
    for m in Mode::ALL {
        let v = &tj["by_mode"][m.name()];
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            m.name(),
            v["ok"],
            v["failed"],
            v["secs_p50"],
            v["secs_p99"],
            v["secs_max"]
        );
    }

    let _ = writeln!(t, "\n| failure cause | count |\n|---|---:|");
    for c in CAUSES {
        let _ = writeln!(t, "| {c} | {} |", tj["failures_by_cause"][c]);
    }
    if let Some(d) = tj["failure_details"].as_object() {
        if !d.is_empty() {
            let _ = writeln!(t, "\n| failure detail | count |\n|---|---:|");
            for (k, v) in d {
                let _ = writeln!(t, "| {k} | {v} |");
            }
        }
    }

    let _ = writeln!(
        t,
        "\n| process | RSS MiB start | peak | end | drained | fds start | peak | end | drained | starts |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for role in ROLES {
        let pk = r.peaks.get(role).copied().unwrap_or_default();
        let (s, e, d) = (
            r.usage_start[role],
            r.usage_end[role],
            r.usage_drained[role],
        );
        let _ = writeln!(
            t,
            "| {role} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mib(s.rss_kib),
            mib(pk.0),
            mib(e.rss_kib),
            mib(d.rss_kib),
            s.fds,
            pk.1,
            e.fds,
            d.fds,
            json["logs"][role]["starts"]
        );
    }

    let _ = writeln!(
        t,
        "\n| endpoint | |\n|---|---:|\n| accepted | {} |\n| completed | {} |\n| closed before a header | {} |\n| input reset | {} |\n| output error | {} |\n| timeouts | {} |",
        es.accepted.load(Relaxed),
        es.completed.load(Relaxed),
        es.no_header.load(Relaxed),
        es.input_reset.load(Relaxed),
        es.output_error.load(Relaxed),
        es.timeouts.load(Relaxed)
    );
    for (k, v) in &anomalies {
        let _ = writeln!(t, "| {k} | {v} |");
    }

    let _ = writeln!(
        t,
        "\n| process | log line (WARN/ERROR, and tunnel outcomes) | count |\n|---|---|---:|"
    );
    for role in ROLES {
        if let Some(lines) = json["logs"][role]["lines"].as_object() {
            for (k, v) in lines {
                if k.starts_with("WARN")
                    || k.starts_with("ERROR")
                    || k.contains("outcome=")
                    || k.starts_with("(")
                {
                    let _ = writeln!(t, "| {role} | {} | {v} |", k.replace('|', "\\|"));
                }
            }
        }
    }
    (json, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_intervals() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("1m30").is_err());
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("3K"), Ok(3072));
        assert!(parse_size("1TiB").is_err());
        assert!(parse_every("off").is_ok_and(|e| e.0.is_none()));
        let e = parse_every("2m..5m").unwrap();
        assert_eq!(
            e.0,
            Some((Duration::from_secs(120), Duration::from_secs(300)))
        );
        assert!(parse_every("5m..2m").is_err());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let d = e.pick(&mut rng).unwrap();
            assert!(d >= Duration::from_secs(120) && d <= Duration::from_secs(300));
        }
    }
}
