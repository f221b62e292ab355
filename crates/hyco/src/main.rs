//! `hyco`: one binary for every role. Parses arguments, sets up tracing, binds, and calls the
//! library `run` of the role. No logic of its own; a bad configuration exits with 64.

#![forbid(unsafe_code)]

mod admin;
mod cli_env;
mod generate;
mod logfmt;
mod manager_cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hyco_client::{ClientOptions, NoProxy, ProxyUrl};
use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use tracing::{error, info};

/// Self-hosted Hybrid Connections: relay, manager, forwarder and admin in one binary.
#[derive(Parser)]
#[command(name = "hyco", version, about)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    /// HTTP proxy for the outbound connections of manager, forward and admin (CONNECT;
    /// TLS stays end to end with the relay): http://[user:password@]host:port. Default:
    /// HTTPS_PROXY, https_proxy, ALL_PROXY or all_proxy. An empty value means no proxy.
    #[arg(long, global = true, value_name = "URL")]
    proxy: Option<String>,
    /// Relay hosts reached without the proxy: comma-separated host names (subdomains
    /// included), IP addresses, CIDR blocks or `*`, each optionally with `:port`. Default:
    /// NO_PROXY or no_proxy.
    #[arg(long, global = true, value_name = "LIST")]
    no_proxy: Option<String>,
    /// Runtime worker threads. Default: one per core for the relay; half the cores (at least
    /// one) for `manager run` and `forward`, which share their host with the service or the
    /// application they serve.
    #[arg(long, global = true, env = "HYCO_THREADS", value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Worker threads for `cmd` (see `Cli::threads`).
fn worker_threads(cmd: &Cmd, flag: Option<u16>) -> usize {
    if let Some(n) = flag {
        return usize::from(n);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cmd {
        Cmd::Forward(_)
        | Cmd::Manager {
            cmd: ManagerCmd::Run(_),
            ..
        } => (cores / 2).max(1),
        _ => cores,
    }
}

/// `--proxy` and `--no-proxy` as given, set once in `main` before any role starts. Process-wide
/// so that manager, forward and admin all reach them through [`client_options`] without each
/// subcommand carrying them; the environment is read there, and only by the roles that dial.
static PROXY_FLAGS: OnceLock<(Option<String>, Option<String>)> = OnceLock::new();

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Cmd {
    /// Run the relay.
    Relay(RelayArgs),
    /// The Hybrid Connection Manager: `run` is the service, the other commands talk to it.
    Manager {
        #[command(subcommand)]
        cmd: ManagerCmd,
        #[command(flatten)]
        state: manager_cli::StateDirArg,
    },
    /// Expose hybrid connections as local TCP ports.
    Forward(ForwardArgs),
    /// Manage hybrid connections and keys on a relay.
    Admin(admin::AdminArgs),
    /// Relay clusters on Redis.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Print a shell completion script (e.g. `hyco completions bash > /etc/bash_completion.d/hyco`).
    Completions(generate::CompletionsArgs),
    /// Generate the manual pages.
    Man(generate::ManArgs),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Copy a relay's embedded store (namespace rules, hybrid connections, their keys) into
    /// Redis, for the nodes of a new cluster. Stop the relay first.
    Migrate(MigrateArgs),
}

#[derive(Args)]
struct MigrateArgs {
    /// The relay's data folder.
    #[arg(long, default_value = "hyco-data", env = "HYCO_DATA")]
    data: PathBuf,
    /// Redis URL of the cluster.
    #[arg(long, env = "HYCO_CLUSTER", hide_env_values = true)]
    cluster: String,
    /// Cluster name (key prefix).
    #[arg(long, default_value = "default", env = "HYCO_CLUSTER_NAME")]
    cluster_name: String,
    /// Overwrite a configuration the cluster has already.
    #[arg(long)]
    replace: bool,
    /// The nodes' cluster secret file: the records are signed with it, as nodes started with
    /// it require (docs/cluster.md).
    #[arg(long, env = "HYCO_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
}

/// How a relay joins a cluster.
#[derive(Args)]
struct ClusterArgs {
    /// Run as a cluster node: the Redis URL (`redis://[:password@]host:port/db`, `rediss://…`,
    /// `redis+unix:///path`). Configuration and the listener directory live there instead of
    /// the data folder (which keeps the TLS material). docs/cluster.md.
    #[arg(long, env = "HYCO_CLUSTER", hide_env_values = true)]
    cluster: Option<String>,
    /// This node's id, unique in the cluster (letters, digits, '-', '_'). Required with --cluster.
    #[arg(long, env = "HYCO_NODE_ID", requires = "cluster")]
    node_id: Option<String>,
    /// `host:port` listeners dial to reach this very node (not the shared name) for rendezvous;
    /// the certificate must cover the host. Required with --cluster.
    #[arg(long, env = "HYCO_ADVERTISE", requires = "cluster")]
    advertise: Option<String>,
    /// Cluster name (key prefix), so several clusters can share one Redis.
    #[arg(long, default_value = "default", env = "HYCO_CLUSTER_NAME")]
    cluster_name: String,
    /// File with the key that authenticates messages between nodes (the same file on every
    /// node). Without it a key kept in Redis is used.
    #[arg(long, env = "HYCO_CLUSTER_SECRET_FILE", requires = "cluster")]
    cluster_secret_file: Option<PathBuf>,
    /// Seconds a node's lease lives without renewal (renewed every third of it): how long a dead
    /// node's listeners stay in the directory, and how soon a node cut off from Redis fences.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=300))]
    cluster_lease: u64,
}

#[derive(Args)]
struct RelayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:9443", env = "HYCO_LISTEN")]
    listen: SocketAddr,
    /// Data folder (store, generated certificate, root connection string).
    #[arg(long, default_value = "hyco-data", env = "HYCO_DATA")]
    data: PathBuf,
    /// Host name clients use for this relay (repeatable); certificate SAN and token audience.
    #[arg(long = "hostname")]
    hostnames: Vec<String>,
    /// `host:port` written into connection strings [default: first --hostname or localhost, with the bound port].
    #[arg(long)]
    public_host: Option<String>,
    /// Certificate chain (PEM). Without it a CA and certificate are generated in the data folder.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Seconds a sender waits for a listener to accept (1 to 3600).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    rendezvous_timeout: u64,
    /// HTTP mode: seconds a listener has to start its response (and the most a streamed body
    /// may stall) before the sender gets 504 (1 to 3600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_timeout: u64,
    /// Seconds a control channel outlives its token without renewal (0 to 86400).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    token_grace: u64,
    /// Resident memory (MiB) past which new connections are refused with 503 (running tunnels
    /// and the admin API go on). Default: no budget.
    #[arg(long)]
    max_memory_mib: Option<u64>,
    /// Failed authorizations one address may make before it is throttled (429), then one per
    /// second. 0 turns the throttle off.
    #[arg(long, default_value_t = 30)]
    auth_failure_burst: u32,
    /// Per-address limits (handshake slots, failed-authorization throttle) count IPv6 sources
    /// by this many leading bits: one budget per /64 by default (128: per address).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    ipv6_prefix: u8,
    /// Tunnels open at once; past it new ones are refused at once (503 to the sender) while descriptors
    /// remain to say so. Default: (RLIMIT_NOFILE - min(RLIMIT_NOFILE/4, 200)) / 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_tunnels: Option<u64>,

    /// Seconds running tunnels may drain after SIGTERM (0 to 86400).
    #[arg(long, default_value_t = hyco_io::tunnels::DRAIN_GRACE_SECS,
        value_parser = clap::value_parser!(u64).range(hyco_io::tunnels::DRAIN_GRACE_RANGE))]
    drain_grace: u64,
    /// Serve the status page and /metrics here (plain HTTP; keep it on loopback).
    #[arg(long, env = "HYCO_STATUS_LISTEN")]
    status_listen: Option<SocketAddr>,
    /// A host name the status page answers to besides loopback names (repeatable); requests
    /// with any other Host get 421 (a defence against DNS rebinding).
    #[arg(long = "status-host", value_name = "NAME")]
    status_hosts: Vec<String>,
    /// hyco extensions offered to hyco agents (advertised on 101s; Microsoft's clients never
    /// use them): `all`, `none`, or a list of `standby` (listeners park sockets, a new
    /// connection needs no rendezvous round trip), `early-data` (a sender's first bytes
    /// ride with its upgrade) and `reuse` (the agents' connections outlive their tunnels). See
    /// docs/design-notes.md.
    #[arg(long, env = "HYCO_EXTENSIONS", default_value = "all", value_name = "LIST",
        value_parser = hyco_relay::extensions_from_list)]
    extensions: hyco_proto::ext::Extensions,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
enum ManagerCmd {
    /// Run the manager service in the foreground.
    Run(ManagerRunArgs),
    #[command(flatten)]
    Client(manager_cli::ClientCmd),
}

#[derive(Args)]
struct ManagerRunArgs {
    /// A hybrid connection's connection string with EntityPath and a Listen key (repeatable).
    #[arg(long = "connection-string")]
    connection_strings: Vec<String>,
    /// TOML configuration file (`[[hybrid_connection]] connection_string = "…"`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Extra CA certificate to trust (PEM), besides the system roots.
    #[arg(long, env = "HYCO_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Endpoints this manager may dial (repeatable, or comma-separated; added to the
    /// configuration file's `allow_endpoints`): `*`, `db.corp`, `*.corp`, `10.0.0.0/8`,
    /// `[fd00::/8]`, each optionally with `:PORT` or `:FIRST-LAST` (`db.corp:5432`, `*:5432`).
    /// Without any, every endpoint but link-local and cloud metadata addresses, which only an
    /// address entry naming them allows.
    #[arg(
        long = "allow-endpoint",
        value_name = "HOST[:PORT]",
        value_delimiter = ','
    )]
    allow_endpoints: Vec<String>,
    /// Lifetime in seconds of the listener tokens minted from the keys; they are renewed on the
    /// open control channel before they expire.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// Serve the status page and /metrics here (plain HTTP; keep it on loopback).
    #[arg(long, env = "HYCO_STATUS_LISTEN")]
    status_listen: Option<SocketAddr>,
    /// Tunnels open at once; past it new ones are refused at once (the sender gets a 503 reject) while descriptors
    /// remain to say so. Default: (RLIMIT_NOFILE - min(RLIMIT_NOFILE/4, 200)) / 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_tunnels: Option<u64>,
    /// A host name the status page answers to besides loopback names (repeatable); requests
    /// with any other Host get 421 (a defence against DNS rebinding).
    #[arg(long = "status-host", value_name = "NAME")]
    status_hosts: Vec<String>,
    /// Seconds open tunnels and HTTP-mode requests may finish after SIGTERM (0 to 86400;
    /// default: the configuration file's `drain_grace_secs`, else 30).
    #[arg(long, value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(hyco_io::tunnels::DRAIN_GRACE_RANGE))]
    drain_grace: Option<u64>,
    /// Most sockets each listener keeps parked at a relay that offers them (the standby
    /// extension: a sender is joined to one at once); they count against --max-tunnels.
    /// 0: never park.
    #[arg(long, value_name = "N", env = "HYCO_STANDBY_MAX", default_value_t = 16)]
    standby_max: usize,
    #[command(flatten)]
    http: ManagerHttpArgs,
    #[command(flatten)]
    relay: RelayClientArgs,
}

/// HTTP mode of `manager run`.
#[derive(Args)]
struct ManagerHttpArgs {
    /// The endpoints of the `--connection-string` hybrid connections speak HTTP: HTTP-mode
    /// requests are forwarded to them (see also `manager add --http`).
    #[arg(long)]
    http: bool,
    /// HTTP mode: seconds to wait for the endpoint's response (and for each piece of a body)
    /// before answering 504. Keep it below the relay's own (60 s).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_timeout: Option<u64>,
    /// HTTP mode: largest request body passed on; larger ones are answered 413.
    #[arg(long, value_name = "BYTES")]
    http_max_body: Option<u64>,
}

#[derive(Args)]
struct ForwardArgs {
    /// `[BIND:]PORT:HC` (repeatable): listen on BIND:PORT (default 127.0.0.1) and carry each
    /// connection to hybrid connection HC.
    #[arg(short = 'L', long = "local", required = true)]
    locals: Vec<String>,
    /// Connection string with a Send key (EntityPath is replaced by each HC).
    #[arg(long, env = "HYCO_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// Extra CA certificate to trust (PEM), besides the system roots.
    #[arg(long, env = "HYCO_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Tunnels open at once; past it new ones are refused at once (the local connection is reset) while descriptors
    /// remain to say so. Default: (RLIMIT_NOFILE - min(RLIMIT_NOFILE/4, 200)) / 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_tunnels: Option<u64>,
    /// Seconds open tunnels may finish after SIGTERM (0 to 86400).
    #[arg(long, value_name = "SECS", default_value_t = hyco_io::tunnels::DRAIN_GRACE_SECS,
        value_parser = clap::value_parser!(u64).range(hyco_io::tunnels::DRAIN_GRACE_RANGE))]
    drain_grace: u64,
    #[command(flatten)]
    relay: RelayClientArgs,
}

/// How the manager and the forwarder reach the relay.
#[derive(Args)]
struct RelayClientArgs {
    /// Where the connection strings' endpoint can be reached, `HOST:PORT` (repeatable, or
    /// comma-separated): the nodes of a relay cluster behind one name. They are dialled in turn,
    /// from the one that last worked; TLS, Host and the token keep the endpoint's name.
    #[arg(
        long = "relay-addr",
        value_name = "HOST:PORT",
        env = "HYCO_RELAY_ADDRS",
        value_delimiter = ','
    )]
    relay_addrs: Vec<String>,
    /// Connections kept ready (TCP and TLS done) per relay address, so a new tunnel costs only
    /// the upgrade round trip; each is replaced before the relay's 10 s handshake deadline and
    /// none are kept after a minute without tunnels. 0 turns it off.
    #[arg(long, default_value_t = 1, env = "HYCO_WARM_CONNECTIONS", value_parser = clap::value_parser!(u64).range(0..=16))]
    warm_connections: u64,
}

/// Logs go to stderr, and also into `logs` (what `hyco manager logs` shows).
fn init_tracing(json: bool, logs: std::sync::Arc<hyco_manager::logs::LogBuffer>) {
    let filter = cli_env::var("HYCO_LOG")
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v.to_string_lossy()).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(manager_cli::Tee(logs));
    if json {
        b.json().init();
    } else {
        b.fmt_fields(logfmt::fields()).init();
    }
}

/// Resolves on SIGTERM or Ctrl-C and cancels `token`.
fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        info!("signal received; shutting down");
        token.cancel();
    });
}

/// A usage error: exit 64 (EX_USAGE).
#[derive(Debug)]
struct Usage(String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// A panic (a bug: every input path is meant to refuse, never to panic) is one error line in
/// the log, with where it happened; the task ends, its guards release what it held, and the
/// process goes on. No backtrace is captured, whatever RUST_BACKTRACE says: symbolising one
/// loads the binary's debug information, which once cost a relay 112 MB for good (issue 15 §1;
/// docs/design-notes.md).
fn log_panics_briefly() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("-").to_owned();
        tracing::error!(event = "Panic", thread = %thread, location = %location, message = ?message, "a task panicked; it ended and released what it held");
    }));
}

fn main() -> ExitCode {
    let cli: Cli = cli_env::parse();
    let _ = PROXY_FLAGS.set((cli.proxy.clone(), cli.no_proxy.clone()));
    let logs = std::sync::Arc::new(hyco_manager::logs::LogBuffer::default());
    init_tracing(cli.log_json, std::sync::Arc::clone(&logs));
    log_panics_briefly();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(&cli.cmd, cli.threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(cli.cmd, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors quote the manager's, the relay's and Redis's answers: escaped, each cause once.
            eprintln!(
                "error: {}",
                hyco_proto::escape::Escaped(&cli_env::error_chain(&e))
            );
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn run(cmd: Cmd, logs: std::sync::Arc<hyco_manager::logs::LogBuffer>) -> Result<()> {
    match cmd {
        Cmd::Relay(a) => relay(a).await,
        Cmd::Manager {
            cmd: ManagerCmd::Run(a),
            state,
        } => manager(a, &state, logs).await,
        Cmd::Manager {
            cmd: ManagerCmd::Client(c),
            state,
        } => manager_cli::run(c, &state).await,
        Cmd::Forward(a) => forward(a).await,
        Cmd::Cluster { cmd } => cluster_cmd(cmd).await,
        Cmd::Admin(a) => admin::run(a).await,
        Cmd::Completions(a) => generate::completions::<Cli>(&a),
        Cmd::Man(a) => generate::man::<Cli>(&a),
    }
}

async fn relay(a: RelayArgs) -> Result<()> {
    let listener = hyco_io::listener::bind(a.listen)
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let bound = listener.local_addr()?;
    let public_host = a.public_host.clone().unwrap_or_else(|| {
        let host = a
            .hostnames
            .first()
            .map(String::as_str)
            .unwrap_or("localhost");
        format!("{host}:{}", bound.port())
    });
    let mut cfg = hyco_relay::RelayConfig::new(&a.data, public_host);
    for h in &a.hostnames {
        let h = h.to_ascii_lowercase();
        if !cfg.hostnames.contains(&h) {
            cfg.hostnames.push(h);
        }
    }
    cfg.tls_files = a.cert.clone().zip(a.key.clone());
    cfg.limits.rendezvous_timeout = Duration::from_secs(a.rendezvous_timeout);
    cfg.limits.http_timeout = Duration::from_secs(a.http_timeout.max(1));
    cfg.limits.token_grace = Duration::from_secs(a.token_grace);
    cfg.limits.max_memory = a.max_memory_mib.map(|m| m << 20);
    cfg.limits.auth_failure_burst = a.auth_failure_burst;
    cfg.limits.ipv6_prefix = a.ipv6_prefix;
    cfg.limits.max_tunnels = tunnel_limit("relay", a.max_tunnels);
    cfg.drain_grace = Duration::from_secs(a.drain_grace);
    cfg.extensions = a.extensions;
    cfg.cluster = cluster_config(&a.cluster, bound.port())?;
    let relay = hyco_relay::Relay::prepare(cfg)
        .await
        .context("cannot prepare the relay")?;
    if relay.first_start {
        println!(
            "Namespace created. Root connection string (also in {}):",
            a.data.join("root.connection-string").display()
        );
        println!("{}", relay.root_connection_string);
        if let Some(ca) = &relay.ca_file {
            println!(
                "Clients must trust the generated CA: --ca-file {} (or HYCO_CA_FILE)",
                ca.display()
            );
        }
    }
    if let Some(addr) = a.status_listen {
        let l = hyco_io::listener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for the status page"))?;
        info!(status = %l.local_addr()?, "status page and metrics listening");
        relay.serve_status(l, a.status_hosts);
    }
    info!(listen = %bound, data = %a.data.display(), "relay listening");
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone());
    relay.run(listener, shutdown).await;
    Ok(())
}

/// The cluster settings; an `--advertise` without a port gets the port the relay listens on.
fn cluster_config(
    a: &ClusterArgs,
    bound_port: u16,
) -> Result<Option<hyco_relay::cluster::ClusterConfig>> {
    let Some(url) = &a.cluster else {
        return Ok(None);
    };
    let node_id = a
        .node_id
        .clone()
        .context("--cluster needs --node-id (this node's id, unique in the cluster)")?;
    let mut advertise = a.advertise.clone().context(
        "--cluster needs --advertise host[:port] (the address listeners dial to reach this node)",
    )?;
    let has_port = advertise
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !h.ends_with(':') && p.parse::<u16>().is_ok());
    if !has_port {
        advertise = if advertise.contains(':') && !advertise.starts_with('[') {
            format!("[{advertise}]:{bound_port}") // a bare IPv6 address
        } else {
            format!("{advertise}:{bound_port}")
        };
    }
    let mut c = hyco_relay::cluster::ClusterConfig::new(url, node_id, advertise);
    c.name = a.cluster_name.clone();
    c.lease = Duration::from_secs(a.cluster_lease);
    c.refresh = Duration::from_secs((a.cluster_lease / 3).max(1));
    if let Some(f) = &a.cluster_secret_file {
        c.secret = Some(read_cluster_secret(f)?);
    }
    Ok(Some(c))
}

/// A cluster secret file's key: its bytes without surrounding whitespace, at least 16.
fn read_cluster_secret(f: &std::path::Path) -> Result<Vec<u8>> {
    let key = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
    let key = key.trim_ascii().to_vec();
    if key.len() < 16 {
        bail!(
            "{}: the cluster secret must have at least 16 bytes",
            f.display()
        );
    }
    Ok(key)
}

async fn cluster_cmd(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Migrate(a) => {
            let prefix = format!("hyco:{}:", a.cluster_name);
            let secret = a
                .cluster_secret_file
                .as_deref()
                .map(read_cluster_secret)
                .transpose()?;
            let n = tokio::task::spawn_blocking(move || {
                hyco_relay::store::Store::migrate_to_redis(
                    &a.data,
                    &a.cluster,
                    &prefix,
                    secret.as_deref(),
                    a.replace,
                )
            })
            .await??;
            println!("Copied the namespace rules and {n} hybrid connection(s) into the cluster.");
            Ok(())
        }
    }
}

/// The client options of manager, forward and admin: `file` (the manager's configuration
/// file, or the defaults) with `--ca-file` and the proxy settings on top. The proxy is
/// `--proxy`, else the environment (`HTTPS_PROXY`, `https_proxy`, `ALL_PROXY`, `all_proxy`),
/// else the file's; the bypass list likewise (`--no-proxy`, `NO_PROXY`, `no_proxy`), as
/// `--ca-file` and `HYCO_CA_FILE` win over the file's `ca_file`.
fn client_options(file: ClientOptions, ca_file: Option<PathBuf>) -> Result<ClientOptions> {
    let (proxy_flag, no_proxy_flag) = PROXY_FLAGS.get().cloned().unwrap_or_default();
    let mut o = file;
    if ca_file.is_some() {
        o.ca_file = ca_file;
    }
    match proxy_flag.as_deref().map(str::trim) {
        Some("") => o.proxy = None,
        Some(url) => {
            o.proxy = Some(ProxyUrl::parse(url).map_err(|e| usage(format!("--proxy: {e}")))?)
        }
        None => {
            if let Some(p) = ClientOptions::proxy_from_env().map_err(|e| usage(e.to_string()))? {
                o.proxy = Some(p);
            }
        }
    }
    let no_proxy = match &no_proxy_flag {
        Some(list) => NoProxy::parse(list),
        None => ClientOptions::no_proxy_from_env(),
    };
    if no_proxy_flag.is_some() || !no_proxy.is_empty() {
        o.no_proxy = no_proxy;
    }
    if let Some(p) = &o.proxy {
        // Display masks the password.
        info!(proxy = %p, no_proxy = %o.no_proxy, "outbound connections go through the proxy");
    }
    Ok(o)
}

/// `--relay-addr` (or `HYCO_RELAY_ADDRS`) over the file's `relay_addrs`, checked: a bad entry
/// is a usage error that names it.
fn with_relay_addrs(mut o: ClientOptions, flags: Vec<String>) -> Result<ClientOptions> {
    if !flags.is_empty() {
        o.relay_addrs = flags;
    }
    o.parsed_relay_addrs()
        .map_err(|e| usage(format!("--relay-addr: {e}")))?;
    if !o.relay_addrs.is_empty() {
        info!(relay_addrs = %o.relay_addrs.join(","), "the relay endpoint is reached at these addresses");
    }
    Ok(o)
}

async fn manager(
    a: ManagerRunArgs,
    state: &manager_cli::StateDirArg,
    logs: std::sync::Arc<hyco_manager::logs::LogBuffer>,
) -> Result<()> {
    let mut cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
            hyco_manager::ManagerConfig::from_toml(&text)
                .map_err(|e| usage(format!("{}: {e}", path.display())))?
        }
        None => hyco_manager::ManagerConfig::default(),
    };
    for (i, s) in a.connection_strings.iter().enumerate() {
        let cs = ConnectionString::parse(s)
            .map_err(|e| usage(format!("--connection-string #{}: {e}", i + 1)))?;
        if let (true, Some(name)) = (a.http.http, &cs.entity_path) {
            cfg.hc_options
                .entry(name.to_ascii_lowercase())
                .or_default()
                .http = true;
        }
        cfg.connections.push(cs);
    }
    if let Some(t) = a.http.http_timeout {
        cfg.http.timeout = Duration::from_secs(t);
    }
    if a.http.http_max_body.is_some() {
        cfg.http.max_body = a.http.http_max_body;
    }
    if let Some(s) = a.drain_grace {
        cfg.drain_grace = Duration::from_secs(s);
    }
    cfg.client = client_options(cfg.client, a.ca_file.clone())?;
    cfg.client = with_relay_addrs(cfg.client, a.relay.relay_addrs.clone())?;
    cfg.client.warm_connections = a.relay.warm_connections as usize;
    if !a.allow_endpoints.is_empty() {
        let mut list = cfg.allow_endpoints.entries().to_vec();
        list.extend(
            hyco_manager::EndpointPolicy::parse(&a.allow_endpoints)
                .map_err(|e| usage(format!("--allow-endpoint {e}")))?
                .entries()
                .iter()
                .cloned(),
        );
        cfg.allow_endpoints = hyco_manager::EndpointPolicy::new(list);
    }
    info!(allow = %cfg.allow_endpoints, "endpoints this manager may dial");
    let lifetimes = hyco_manager::TOKEN_LIFETIME_SECS;
    if !lifetimes.contains(&a.token_lifetime) {
        return Err(usage(format!(
            "--token-lifetime {}: use {} to {} seconds (one year)",
            a.token_lifetime,
            lifetimes.start(),
            lifetimes.end()
        )));
    }
    cfg.token_lifetime = Duration::from_secs(a.token_lifetime);
    cfg.max_tunnels = tunnel_limit("manager", a.max_tunnels);
    cfg.standby_max = a.standby_max;
    let dir = state.ensure()?;
    let socket = state.socket();
    let control = hyco_manager::control::bind(&socket)
        .await
        .with_context(|| format!("control socket {}", socket.display()))?;
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone());
    let m = hyco_manager::Manager::start(cfg, Some(state.state_file()), shutdown.clone())
        .map_err(|e| usage(e.to_string()))?;
    if m.names().is_empty() {
        info!("no hybrid connections yet: add one with `hyco manager add <connection string>`");
    }
    tokio::spawn(hyco_manager::control::serve(
        control,
        socket.clone(),
        std::sync::Arc::clone(&m),
        logs,
        shutdown.clone(),
    ));
    info!(state = %dir.display(), socket = %socket.display(), "manager running");
    let board = m.board();
    if let Some(addr) = a.status_listen {
        let l = hyco_io::listener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for the status page"))?;
        info!(status = %l.local_addr()?, "status page and metrics listening");
        let (b1, b2) = (std::sync::Arc::clone(&board), std::sync::Arc::clone(&board));
        let sources = hyco_io::status::Sources {
            snapshot: std::sync::Arc::new(move || b1.snapshot()),
            metrics: std::sync::Arc::new(move || b2.encode_metrics()),
            events: None,
            hosts: a.status_hosts,
        };
        tokio::spawn(hyco_io::status::serve(l, sources, shutdown.clone()));
    }
    m.wait().await;
    Ok(())
}

/// `--max-tunnels`, or the default for this process's descriptor limit; logged.
fn tunnel_limit(role: &str, flag: Option<u64>) -> usize {
    let flag = flag.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let max = hyco_io::tunnels::max_tunnels(flag);
    let nofile = hyco_io::tunnels::nofile_limit();
    match (flag, nofile) {
        (Some(_), _) => info!(role, max_tunnels = max, "tunnel limit (--max-tunnels)"),
        (None, Some(n)) => {
            info!(
                role,
                max_tunnels = max,
                nofile = n,
                "tunnel limit derived from the descriptor limit"
            )
        }
        (None, None) => info!(role, "no descriptor limit: no tunnel limit"),
    }
    max
}

/// Parses `[BIND:]PORT:HC`.
fn parse_local(spec: &str) -> Result<(SocketAddr, String)> {
    let (addr, hc) = spec
        .rsplit_once(':')
        .ok_or_else(|| usage(format!("-L {spec}: expected [BIND:]PORT:HC")))?;
    if hc.is_empty() {
        return Err(usage(format!(
            "-L {spec}: the hybrid connection name is empty"
        )));
    }
    let addr: SocketAddr = if let Ok(port) = addr.parse::<u16>() {
        SocketAddr::from(([127, 0, 0, 1], port))
    } else {
        addr.parse()
            .map_err(|_| usage(format!("-L {spec}: '{addr}' is not PORT or BIND:PORT")))?
    };
    Ok((addr, hc.to_owned()))
}

async fn forward(a: ForwardArgs) -> Result<()> {
    let cs = ConnectionString::parse(&a.connection_string)
        .map_err(|e| usage(format!("--connection-string: {e}")))?;
    let mut opts = client_options(ClientOptions::default(), a.ca_file)?;
    opts.warm_connections = a.relay.warm_connections as usize;
    // Every rule's connection string has this endpoint; they share the connector.
    let connector = with_relay_addrs(opts, a.relay.relay_addrs)?.connector_for(&cs)?;
    let mut rules = Vec::new();
    for spec in &a.locals {
        let (addr, hc) = parse_local(spec)?;
        let listener =
            hyco_io::listener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        info!(local = %listener.local_addr()?, hc = %hc, "forwarding");
        rules.push(hyco_client::ForwardRule {
            listener,
            cs: cs.with_entity(&hc),
        });
    }
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone());
    let gate =
        hyco_io::tunnels::TunnelGate::new("forwarder", tunnel_limit("forwarder", a.max_tunnels));
    let grace = Duration::from_secs(a.drain_grace);
    if let Err(e) = hyco_client::run_forward_limited(rules, connector, gate, grace, shutdown).await
    {
        error!(error = %e, "forwarder failed");
        bail!("forwarder failed: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_take_half_the_cores_the_relay_all_and_the_flag_wins() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cli = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        let relay = cli(&["hyco", "relay"]);
        assert_eq!(worker_threads(&relay.cmd, relay.threads), cores);
        let fwd = cli(&[
            "hyco",
            "forward",
            "-L",
            "5432:db",
            "--connection-string",
            "x",
        ]);
        assert_eq!(worker_threads(&fwd.cmd, fwd.threads), (cores / 2).max(1));
        let mgr = cli(&["hyco", "manager", "run", "--connection-string", "x"]);
        assert_eq!(worker_threads(&mgr.cmd, mgr.threads), (cores / 2).max(1));
        let set = cli(&[
            "hyco",
            "--threads",
            "3",
            "forward",
            "-L",
            "1:a",
            "--connection-string",
            "x",
        ]);
        assert_eq!(worker_threads(&set.cmd, set.threads), 3);
        assert!(Cli::try_parse_from(["hyco", "--threads", "0", "relay"]).is_err());
    }

    /// Environment variables whose values may be shown in `--help`: none of them can carry a
    /// key or a password. Every other one must hide its value (issue 15 §4), so a new flag
    /// with an environment variable is classified here before it ships.
    const SHOWN_ENV: &[&str] = &[
        "HYCO_THREADS",
        "HYCO_DATA",
        "HYCO_CLUSTER_NAME",
        "HYCO_NODE_ID",
        "HYCO_ADVERTISE",
        "HYCO_CLUSTER_SECRET_FILE",
        "HYCO_LISTEN",
        "HYCO_STATUS_LISTEN",
        "HYCO_CA_FILE",
        "HYCO_RELAY_ADDRS",
        "HYCO_WARM_CONNECTIONS",
        "HYCO_STATE_DIR",
        "HYCO_EXTENSIONS",
        "HYCO_STANDBY_MAX",
    ];

    fn each_command(c: &clap::Command, f: &mut impl FnMut(&clap::Command)) {
        f(c);
        for s in c.get_subcommands() {
            each_command(s, f);
        }
    }

    #[test]
    fn every_flag_that_may_carry_a_secret_hides_its_environment_value() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        let mut seen = 0;
        each_command(&cmd, &mut |c| {
            for a in c.get_arguments() {
                let Some(env) = a.get_env() else { continue };
                let name = env.to_string_lossy();
                seen += 1;
                assert!(
                    a.is_hide_env_values_set() || SHOWN_ENV.contains(&name.as_ref()),
                    "{} --{}: {name} may carry a secret; add hide_env_values = true (or list it in SHOWN_ENV if it never can)",
                    c.get_name(),
                    a.get_id()
                );
            }
        });
        assert!(seen > 10, "the walk found the flags ({seen})");
    }

    #[test]
    fn local_specs() {
        assert_eq!(
            parse_local("5432:db").unwrap(),
            ("127.0.0.1:5432".parse().unwrap(), "db".into())
        );
        assert_eq!(
            parse_local("0.0.0.0:80:web").unwrap(),
            ("0.0.0.0:80".parse().unwrap(), "web".into())
        );
        assert!(parse_local("db").is_err());
        assert!(parse_local("x:db").is_err());
        assert!(parse_local("80:").is_err());
    }
}
