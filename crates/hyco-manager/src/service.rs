//! The manager as a long-running service: hybrid connections added, removed and restarted while
//! it runs, the ones added at run time kept in a state file, and an end-to-end test per hybrid
//! connection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyco_client::{connect_with, ConnectOptions, Connector, ListenerOptions, ListenerStatus};
use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    resolve_into, supervise, Dialing, HcOptions, HttpSettings, ManagerConfig, ManagerError,
    StatusBoard,
};

/// The connection strings added at run time, in `manager-state.json` (mode 0600: it holds keys),
/// and the settings given with them, by lower-cased name.
#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    connection_strings: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    options: BTreeMap<String, HcOptions>,
}

struct Entry {
    cs: ConnectionString,
    /// The manager's own settings of this hybrid connection.
    options: HcOptions,
    /// Stops this hybrid connection's supervisor.
    stop: CancellationToken,
    /// Added at run time (kept in the state file), rather than from the command line or the
    /// configuration file.
    persisted: bool,
}

/// A running manager.
pub struct Manager {
    board: Arc<StatusBoard>,
    /// The connector without relay addresses; [`Manager::connector_for`] derives the one a
    /// connection string uses.
    connector: Connector,
    /// `--relay-addr` / `relay_addrs`: the relay nodes behind the connection strings' endpoint.
    relay_addrs: Vec<(String, u16)>,
    /// One connector per endpoint when there are relay addresses, so every hybrid connection
    /// on that endpoint shares which address last worked.
    by_endpoint: Mutex<HashMap<(String, u16), Connector>>,
    dial_timeout: Duration,
    /// The endpoints it may dial.
    policy: Arc<crate::EndpointPolicy>,
    /// The tunnel limit.
    gate: Arc<hyco_io::tunnels::TunnelGate>,
    token_lifetime: Duration,
    http: HttpSettings,
    shutdown: CancellationToken,
    hcs: Mutex<BTreeMap<String, Entry>>,
    state_file: Option<PathBuf>,
    /// The supervisors, one per hybrid connection.
    tasks: TaskTracker,
    /// The bridges the supervisors start; they outlive their supervisor until they end or the
    /// drain grace is over.
    bridges: TaskTracker,
    drain_grace: Duration,
    /// [`crate::ManagerConfig::standby_max`].
    standby_max: usize,
}

/// What `test` found, step by step.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TestReport {
    /// The hybrid connection.
    pub hybrid_connection: String,
    /// Whether every step passed.
    pub ok: bool,
    /// Each step: what, whether it passed, and what was seen.
    pub steps: Vec<TestStep>,
}

/// One step of a test.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TestStep {
    /// What was checked.
    pub step: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn name_of(cs: &ConnectionString) -> Result<String, ManagerError> {
    cs.entity_path
        .clone()
        .ok_or_else(|| ManagerError::Config("the connection string has no EntityPath".into()))
}

impl Manager {
    /// Starts the hybrid connections of `cfg` and of the state file (if any); returns the
    /// manager. It runs until `shutdown`; [`Manager::wait`] waits for it to wind down.
    pub fn start(
        cfg: ManagerConfig,
        state_file: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Manager>, ManagerError> {
        let connector = cfg.client.connector()?;
        let gate = hyco_io::tunnels::TunnelGate::new("manager", cfg.max_tunnels);
        let mut board = StatusBoard::new(&[]);
        board.register_tunnel_gate(&gate);
        let m = Arc::new(Manager {
            board: Arc::new(board),
            gate,
            connector,
            relay_addrs: cfg.client.parsed_relay_addrs()?,
            by_endpoint: Mutex::new(HashMap::new()),
            dial_timeout: cfg.dial_timeout,
            policy: Arc::new(cfg.allow_endpoints),
            token_lifetime: cfg.token_lifetime,
            http: cfg.http.clone(),
            shutdown,
            hcs: Mutex::new(BTreeMap::new()),
            state_file,
            tasks: TaskTracker::new(),
            bridges: TaskTracker::new(),
            drain_grace: cfg.drain_grace,
            standby_max: cfg.standby_max,
        });
        for (i, cs) in cfg.connections.into_iter().enumerate() {
            let options = cs
                .entity_path
                .as_ref()
                .and_then(|n| cfg.hc_options.get(&n.to_ascii_lowercase()))
                .cloned()
                .unwrap_or_default();
            m.add_inner(cs, options, false)
                .map_err(|e| ManagerError::invalid(format!("connection string #{}", i + 1), e))?;
        }
        if let Some(path) = m.state_file.clone() {
            let mut state = load_state(&path)?;
            for s in state.connection_strings {
                let cs = ConnectionString::parse(&s).map_err(|e| {
                    ManagerError::invalid(format!("{}: a connection string", path.display()), e)
                })?;
                let options = cs
                    .entity_path
                    .as_ref()
                    .and_then(|n| state.options.remove(&n.to_ascii_lowercase()))
                    .unwrap_or_default();
                match m.add_inner(cs, options, true) {
                    Ok(_) => {}
                    Err(ManagerError::Exists(name)) => {
                        warn!(hc = %name, "in the state file and in the configuration; the configuration's is used")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(m)
    }

    /// The connector for `cs`: with the relay addresses for its endpoint, if there are any
    /// (the same connector, and so the same cursor, for every connection string there).
    fn connector_for(&self, cs: &ConnectionString) -> Connector {
        if self.relay_addrs.is_empty() {
            return self.connector.clone();
        }
        let port = cs.endpoint.port_or_default();
        lock(&self.by_endpoint)
            .entry((cs.endpoint.host.to_ascii_lowercase(), port))
            .or_insert_with(|| {
                let mut c = self.connector.clone();
                c.set_relay_addrs(&cs.endpoint.host, port, self.relay_addrs.clone());
                c
            })
            .clone()
    }

    /// The status board (status page, metrics).
    pub fn board(&self) -> Arc<StatusBoard> {
        Arc::clone(&self.board)
    }

    /// Adds a hybrid connection at run time, with its settings, and records both in the
    /// state file.
    pub fn add(&self, cs: ConnectionString, options: HcOptions) -> Result<String, ManagerError> {
        if self.state_file.is_none() {
            return Err(ManagerError::Config(
                "this manager runs without a state file; adding at run time is off".into(),
            ));
        }
        let name = self.add_inner(cs, options, true)?;
        if let Err(e) = self.save() {
            self.remove(&name)?;
            return Err(e);
        }
        info!(hc = %name, event = "HybridConnectionAdded", "added");
        Ok(name)
    }

    fn add_inner(
        &self,
        cs: ConnectionString,
        options: HcOptions,
        persisted: bool,
    ) -> Result<String, ManagerError> {
        let name = name_of(&cs)?;
        let key = name.to_ascii_lowercase();
        let mut g = lock(&self.hcs);
        if g.contains_key(&key) {
            return Err(ManagerError::Exists(name));
        }
        let stop = self.shutdown.child_token();
        self.spawn_supervisor(&cs, &options, &name, stop.clone());
        g.insert(
            key,
            Entry {
                cs,
                options,
                stop,
                persisted,
            },
        );
        Ok(name)
    }

    fn spawn_supervisor(
        &self,
        cs: &ConnectionString,
        options: &HcOptions,
        name: &str,
        stop: CancellationToken,
    ) {
        let st = self.board.add(name);
        st.set_listener(ListenerStatus::Connecting);
        let opts = ListenerOptions {
            token_lifetime: self.token_lifetime,
            standby_max: self.standby_max,
            // Parked sockets (at most --standby-max, one descriptor each) come out of the
            // descriptor reserve, not --max-tunnels: a permit held by a parked socket would be
            // one a sender on the classic path is refused for.
            standby_gate: None,
            ..ListenerOptions::default()
        };
        self.tasks.spawn(supervise(
            cs.clone(),
            self.connector_for(cs),
            opts,
            Dialing {
                timeout: self.dial_timeout,
                policy: Arc::clone(&self.policy),
                gate: Arc::clone(&self.gate),
                bridges: self.bridges.clone(),
            },
            stop,
            st,
            crate::Local {
                options: options.clone(),
                http: self.http.clone(),
            },
        ));
    }

    /// Stops listening for a hybrid connection and forgets it (tunnels open on it finish on
    /// their own). A hybrid connection from the configuration comes back at the next start.
    pub fn remove(&self, name: &str) -> Result<String, ManagerError> {
        let e = lock(&self.hcs)
            .remove(&name.to_ascii_lowercase())
            .ok_or_else(|| ManagerError::NotFound(name.to_owned()))?;
        e.stop.cancel();
        self.board.remove(name);
        if e.persisted {
            self.save()?;
        }
        let name = e.cs.entity_path.unwrap_or_default();
        info!(hc = %name, event = "HybridConnectionRemoved", "removed");
        Ok(name)
    }

    /// Drops the listener of a hybrid connection and starts a fresh one (endpoint re-read).
    pub fn restart(&self, name: &str) -> Result<String, ManagerError> {
        let mut g = lock(&self.hcs);
        let e = g
            .get_mut(&name.to_ascii_lowercase())
            .ok_or_else(|| ManagerError::NotFound(name.to_owned()))?;
        e.stop.cancel();
        let stop = self.shutdown.child_token();
        let n = e.cs.entity_path.clone().unwrap_or_default();
        self.board.remove(&n);
        self.spawn_supervisor(&e.cs, &e.options, &n, stop.clone());
        e.stop = stop;
        info!(hc = %n, event = "HybridConnectionRestarted", "restarted");
        Ok(n)
    }

    /// Names of the hybrid connections, and whether each came from the state file.
    pub fn names(&self) -> Vec<(String, bool)> {
        lock(&self.hcs)
            .values()
            .map(|e| (e.cs.entity_path.clone().unwrap_or_default(), e.persisted))
            .collect()
    }

    /// Re-reads the entity (endpoint, listener count on the relay) of a hybrid connection.
    pub async fn refresh(&self, name: &str) -> Result<(), ManagerError> {
        let (cs, options) = self.cs_of(name)?;
        if let Some(st) = self.board.get(name) {
            let _ = resolve_into(&st, &options, &cs, &self.connector_for(&cs)).await;
        }
        Ok(())
    }

    fn cs_of(&self, name: &str) -> Result<(ConnectionString, HcOptions), ManagerError> {
        lock(&self.hcs)
            .get(&name.to_ascii_lowercase())
            .map(|e| (e.cs.clone(), e.options.clone()))
            .ok_or_else(|| ManagerError::NotFound(name.to_owned()))
    }

    /// End to end: the relay answers for the entity, this manager's listener is registered,
    /// and a sender routed to this very listener (`Microsoft-Relay-AllowedListeners`) gets a
    /// tunnel, which means the manager dialled the endpoint. A sender needs Send: the
    /// manager's own key if it has it, or `send` (a connection string with Send).
    pub async fn test(
        &self,
        name: &str,
        send: Option<ConnectionString>,
    ) -> Result<TestReport, ManagerError> {
        let (cs, options) = self.cs_of(name)?;
        let st = self
            .board
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_owned()))?;
        let mut steps = Vec::new();
        let mut step = |s: &str, ok: bool, d: String| {
            steps.push(TestStep {
                step: s.into(),
                ok,
                detail: d,
            })
        };
        let started = Instant::now();
        let entity_ok = match resolve_into(&st, &options, &cs, &self.connector_for(&cs)).await {
            Ok(()) => {
                let n = st
                    .relay_listeners
                    .load(std::sync::atomic::Ordering::Relaxed);
                let ep = lock(&st.endpoint)
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                step(
                    "relay",
                    true,
                    format!(
                        "entity read in {} ms: endpoint {ep}, {n} listener(s) on the relay",
                        started.elapsed().as_millis()
                    ),
                );
                true
            }
            Err(e) => {
                step("relay", false, format!("cannot read the entity: {e}"));
                false
            }
        };
        let listener_id = lock(&st.listener_id).clone();
        let connected = matches!(*lock(&st.listener), ListenerStatus::Connected { .. });
        step(
            "listener",
            connected,
            match (&listener_id, connected) {
                (Some(id), true) => format!("connected as {id}"),
                _ => format!("not connected: {}", st.to_json()["state"]),
            },
        );
        if entity_ok && connected {
            let mut sender = send.unwrap_or_else(|| cs.clone());
            sender.entity_path = cs.entity_path.clone();
            let opts = ConnectOptions {
                headers: vec![(
                    "Microsoft-Relay-AllowedListeners".into(),
                    listener_id.unwrap_or_default(),
                )],
                ..ConnectOptions::default()
            };
            let t = Instant::now();
            match tokio::time::timeout(
                self.dial_timeout.saturating_add(Duration::from_secs(10)),
                connect_with(&sender, &self.connector_for(&sender), &opts),
            )
            .await
            {
                Ok(Ok(mut s)) => {
                    let setup = t.elapsed().as_millis();
                    // Some services speak first (SSH, SMTP, …): note what arrives in 500 ms.
                    let mut buf = [0u8; 256];
                    let first =
                        tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
                    let seen = match first {
                        Ok(Ok(n)) if n > 0 => format!("; the service sent {n} byte(s) first"),
                        _ => String::new(),
                    };
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
                    step(
                        "tunnel",
                        true,
                        format!(
                            "sender → relay → this manager → endpoint connected in {setup} ms{seen}"
                        ),
                    );
                }
                Ok(Err(e)) => {
                    let hint = match e.status() {
                        Some(401 | 403) => " (a sender needs Send: pass --send-connection-string)",
                        _ => "",
                    };
                    step("tunnel", false, format!("{e}{hint}"));
                }
                Err(_) => step("tunnel", false, "no tunnel within the dial timeout".into()),
            }
        }
        let ok = steps.iter().all(|s| s.ok) && steps.len() == 3;
        Ok(TestReport {
            hybrid_connection: st.name.clone(),
            ok,
            steps,
        })
    }

    /// Waits until the manager has stopped (after `shutdown`): its supervisors have ended, so
    /// no new bridge starts, and the open bridges have finished or the drain grace is over.
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
        self.tasks.close();
        self.tasks.wait().await;
        self.bridges.close();
        let open = self.bridges.len();
        if open == 0 {
            return;
        }
        let grace = self.drain_grace;
        info!(
            bridges = open,
            grace_secs = grace.as_secs(),
            "draining open bridges"
        );
        if tokio::time::timeout(grace, self.bridges.wait())
            .await
            .is_err()
        {
            warn!(
                grace_secs = grace.as_secs(),
                "drain grace over; cutting remaining bridges"
            );
        }
    }

    fn save(&self) -> Result<(), ManagerError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let g = lock(&self.hcs);
        let state = StateFile {
            connection_strings: g
                .values()
                .filter(|e| e.persisted)
                .map(|e| e.cs.render())
                .collect(),
            options: g
                .iter()
                .filter(|(_, e)| e.persisted && e.options != HcOptions::default())
                .map(|(k, e)| (k.clone(), e.options.clone()))
                .collect(),
        };
        drop(g);
        write_private(path, &serde_json::to_vec_pretty(&state).unwrap_or_default()).map_err(
            |source| ManagerError::StateFile {
                action: "write",
                path: path.to_owned(),
                source,
            },
        )
    }
}

fn load_state(path: &Path) -> Result<StateFile, ManagerError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| ManagerError::invalid(path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(source) => Err(ManagerError::StateFile {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes a file readable by its owner only, atomically (temporary file, fsync, rename).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
