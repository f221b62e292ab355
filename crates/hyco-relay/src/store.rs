//! The store: the namespace's rules and its hybrid connections. Embedded (a redb file in the
//! data folder) or, for a cluster, in Redis.
//!
//! Reads come from an in-memory snapshot (`Arc<Namespace>`), so authorizing a connection never
//! touches the disk or the network. Writes are serialized, committed durably (redb fsyncs on
//! commit; Redis applies them in one `MULTI` with `cfg:ver` incremented) and only then published
//! to the snapshot: when an admin call returns, its change is stored.
//!
//! In Redis the records are the fields of the hash `cfg` (`namespace`, `hc/{key}`, the same JSON
//! as the embedded store). A write holds the lock `cfg:lock` and watches `cfg:ver`, so writes from
//! several nodes never interleave; other nodes reload when `cfg:ver` moves
//! (the `cluster` module).
//!
//! With a cluster secret the configuration is signed: the field `sig` of `cfg` holds a manifest
//! (`cfg:ver` and the SHA-256 of every other field) with an HMAC-SHA256 under a key derived
//! from the secret for this purpose alone ([`config_key`]). A node reads a configuration only
//! when the MAC verifies (constant time), the manifest's version is `cfg:ver` and the fields
//! are exactly the manifest's; otherwise it keeps the last good one ([`StoreError::Unverified`]).
//! A Redis client without the secret can thus neither add, alter, remove nor roll back one
//! record. Without a secret nothing is signed and Redis must be as private as the keys.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyco_proto::Rights;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
const NS_KEY: &str = "namespace";
const HC_PREFIX: &str = "hc/";
/// The field of `cfg` that holds the signed manifest.
const SIG_KEY: &str = "sig";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The key that signs configuration records: HMAC-SHA256 of a fixed label under the cluster
/// secret, so it differs from the key of node-to-node messages.
pub fn config_key(secret: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(secret) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(b"hyco cluster configuration records v1");
    mac.finalize().into_bytes().into()
}

/// What the `sig` field signs: the configuration version and the SHA-256 of every record.
#[derive(Serialize, Deserialize)]
struct Manifest {
    ver: i64,
    records: BTreeMap<String, String>,
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn manifest_mac(key: &[u8; 32], prefix: &str, manifest: &str) -> HmacSha256 {
    use hmac::Mac;
    let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    // The prefix binds the records to this cluster name.
    mac.update(prefix.as_bytes());
    mac.update(&[0]);
    mac.update(manifest.as_bytes());
    mac
}

/// The `sig` value for `records` (all fields of `cfg` but `sig`) at version `ver`.
fn sign(key: &[u8; 32], prefix: &str, ver: i64, records: &HashMap<String, Vec<u8>>) -> String {
    use hmac::Mac;
    let m = Manifest {
        ver,
        records: records
            .iter()
            .map(|(k, v)| (k.clone(), sha256_hex(v)))
            .collect(),
    };
    let json = serde_json::to_string(&m).unwrap_or_default();
    let tag = manifest_mac(key, prefix, &json).finalize().into_bytes();
    format!("{}.{json}", hex::encode(tag))
}

/// Checks the fields of `cfg` read at version `ver` against their `sig`; returns the records
/// (without `sig`) or why they are refused.
fn verify(
    key: &[u8; 32],
    prefix: &str,
    ver: i64,
    mut map: HashMap<String, Vec<u8>>,
) -> Result<HashMap<String, Vec<u8>>, String> {
    use hmac::Mac;
    let Some(sig) = map.remove(SIG_KEY) else {
        return if map.is_empty() && ver == 0 {
            Ok(map) // nothing stored yet
        } else {
            Err("the records are not signed".into())
        };
    };
    let sig = String::from_utf8(sig).map_err(|_| "the signature is not text".to_owned())?;
    let (tag, json) = sig
        .split_once('.')
        .ok_or_else(|| "the signature is malformed".to_owned())?;
    let tag = hex::decode(tag).map_err(|_| "the signature is malformed".to_owned())?;
    manifest_mac(key, prefix, json)
        .verify_slice(&tag) // constant time
        .map_err(|_| "the signature does not verify with this cluster secret".to_owned())?;
    let m: Manifest =
        serde_json::from_str(json).map_err(|_| "the signed manifest is malformed".to_owned())?;
    if m.ver != ver {
        return Err(format!(
            "cfg:ver is {ver} but the records were signed at version {}",
            m.ver
        ));
    }
    for (k, v) in &map {
        match m.records.get(k) {
            None => return Err(format!("record {k:?} is not signed")),
            Some(h) if *h != sha256_hex(v) => return Err(format!("record {k:?} was altered")),
            Some(_) => {}
        }
    }
    if let Some(k) = m.records.keys().find(|k| !map.contains_key(*k)) {
        return Err(format!("signed record {k:?} is missing"));
    }
    Ok(map)
}

/// A shared access rule: a key name, its rights and two keys.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// The `skn` of tokens signed with it.
    pub name: String,
    /// What tokens signed with it may do.
    pub rights: Rights,
    /// Primary key (base64 text, signed as its UTF-8 bytes).
    pub primary_key: String,
    /// Secondary key, for rotation.
    pub secondary_key: String,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// A hybrid connection entity.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HybridConnection {
    /// Name as created (lookups are case-insensitive).
    pub name: String,
    /// Senders need a Send token when true.
    pub requires_client_authorization: bool,
    /// Free text; App Service's JSON shape carries the endpoint.
    pub user_metadata: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Entity-scoped rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Everything the relay knows about its namespace.
#[derive(Clone, Debug, Default)]
pub struct Namespace {
    /// Namespace-scoped rules.
    pub rules: Vec<Rule>,
    /// Hybrid connections by lower-cased name.
    pub hcs: BTreeMap<String, HybridConnection>,
}

#[derive(Serialize, Deserialize, Default)]
struct NamespaceRecord {
    rules: Vec<Rule>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written; the source is the database's (or
    /// the file system's) own error.
    #[error("store: {0}")]
    Db(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A record did not decode.
    #[error("store record {key}: {msg}")]
    Corrupt {
        /// Record key.
        key: String,
        /// Decoder message.
        msg: String,
    },
    /// Create of something that exists.
    #[error("{0} already exists")]
    Exists(String),
    /// A change the rules refuse (the message says why).
    #[error("{0}")]
    Refused(String),
    /// Change of something that does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The shared store (Redis) cannot be reached; try again later.
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    /// The configuration in Redis is not signed with this cluster's secret, or was altered.
    #[error("the configuration in Redis (version {ver}) is refused: {reason}")]
    Unverified {
        /// `cfg:ver` of what was read.
        ver: i64,
        /// What did not verify.
        reason: String,
    },
}

fn db<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    backend: Backend,
    snapshot: RwLock<Arc<Namespace>>,
    /// Serializes writers so read-modify-write cycles do not interleave.
    write_lock: Mutex<()>,
    /// `cfg:ver` of the snapshot (Redis); the embedded store counts its own writes.
    version: AtomicI64,
}

enum Backend {
    Embedded(Database),
    Redis(Box<RedisStore>),
}

/// The configuration in Redis. Blocking calls: the store is used from blocking threads.
struct RedisStore {
    client: redis::Client,
    prefix: String,
    conn: Mutex<Option<redis::Connection>>,
    /// Signs and verifies the records ([`config_key`]); `None`: unsigned.
    key: Option<[u8; 32]>,
}

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Runs `f` on the connection, reconnecting first if the last one failed.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .map_err(unavailable)?;
            c.set_read_timeout(Some(REDIS_TIMEOUT))
                .map_err(unavailable)?;
            c.set_write_timeout(Some(REDIS_TIMEOUT))
                .map_err(unavailable)?;
            *g = Some(c);
        }
        let Some(c) = g.as_mut() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        let r = f(c);
        if matches!(r, Err(StoreError::Unavailable(_))) {
            *g = None;
        }
        r
    }

    /// The version and records, read atomically and verified.
    fn read(c: &mut redis::Connection, s: &RedisStore) -> Result<(i64, Namespace), StoreError> {
        let (ver, map) = Self::read_raw(c, s)?;
        let ns = decode(map.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        Ok((ver, ns))
    }

    /// The version and the records as stored (without `sig`), verified when signing is on.
    fn read_raw(
        c: &mut redis::Connection,
        s: &RedisStore,
    ) -> Result<(i64, HashMap<String, Vec<u8>>), StoreError> {
        let (ver, mut map): (Option<i64>, HashMap<String, Vec<u8>>) = redis::pipe()
            .atomic()
            .get(s.key("cfg:ver"))
            .hgetall(s.key("cfg"))
            .query(c)
            .map_err(unavailable)?;
        let ver = ver.unwrap_or(0);
        match &s.key {
            Some(key) => {
                let map = verify(key, &s.prefix, ver, map)
                    .map_err(|reason| StoreError::Unverified { ver, reason })?;
                Ok((ver, map))
            }
            None => {
                map.remove(SIG_KEY);
                Ok((ver, map))
            }
        }
    }
}

impl Store {
    /// Opens (or creates) `hyco.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("hyco.redb");
        // Created 0600 before redb initializes it: it holds every rule's keys.
        drop(hyco_io::private::create_file(&path, false).map_err(db)?);
        let db = Database::create(path).map_err(db)?;
        let ns = load(&db)?;
        Ok(Store {
            backend: Backend::Embedded(db),
            snapshot: RwLock::new(Arc::new(ns)),
            write_lock: Mutex::new(()),
            version: AtomicI64::new(0),
        })
    }

    /// Opens the configuration kept in Redis under `prefix` (blocking). With `secret` (the
    /// cluster secret) records are signed and only verified ones are read.
    pub fn open_redis(url: &str, prefix: &str, secret: Option<&[u8]>) -> Result<Store, StoreError> {
        let client = redis::Client::open(url).map_err(db)?;
        let rs = RedisStore {
            client,
            prefix: prefix.to_owned(),
            conn: Mutex::new(None),
            key: secret.map(config_key),
        };
        let (ver, ns) = rs.with_conn(|c| RedisStore::read(c, &rs))?;
        Ok(Store {
            backend: Backend::Redis(Box::new(rs)),
            snapshot: RwLock::new(Arc::new(ns)),
            write_lock: Mutex::new(()),
            version: AtomicI64::new(ver),
        })
    }

    /// The configuration version of the snapshot.
    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Re-reads the configuration from Redis (blocking); `true` when it changed. The embedded
    /// store has only its own writes: `false`.
    pub fn reload(&self) -> Result<bool, StoreError> {
        let Backend::Redis(rs) = &self.backend else {
            return Ok(false);
        };
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (ver, ns) = rs.with_conn(|c| RedisStore::read(c, rs))?;
        if ver == self.version() {
            return Ok(false);
        }
        if ver == 0 && self.version() > 0 {
            // A Redis that lost its data (restarted without persistence, flushed) must not wipe
            // the namespace of every node: keep the cached configuration and say so.
            return Err(StoreError::Unavailable(
                "Redis has no configuration (cfg:ver is missing): it lost its data; keeping the cached configuration. Restore it with `hyco cluster migrate` from a node's backup or Redis persistence".into(),
            ));
        }
        self.publish(ns, ver);
        Ok(true)
    }

    fn publish(&self, ns: Namespace, version: i64) {
        let mut g = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        *g = Arc::new(ns);
        self.version.store(version, Ordering::Relaxed);
    }

    /// Copies the embedded store of `dir` into Redis under `prefix`, signed with `secret` when
    /// given. Refuses when Redis holds a configuration already, unless `replace`. Returns the
    /// number of hybrid connections.
    pub fn migrate_to_redis(
        dir: &Path,
        url: &str,
        prefix: &str,
        secret: Option<&[u8]>,
        replace: bool,
    ) -> Result<usize, StoreError> {
        let path = dir.join("hyco.redb");
        if !path.exists() {
            return Err(StoreError::NotFound(format!("{}", path.display())));
        }
        let local = Store::open(dir)?;
        let ns = local.snapshot();
        let client = redis::Client::open(url).map_err(db)?;
        let mut c = client
            .get_connection_with_timeout(REDIS_TIMEOUT)
            .map_err(unavailable)?;
        let cfg = format!("{prefix}cfg");
        let ver_key = format!("{prefix}cfg:ver");
        // The signature names the version the write creates: watch it so none slips between.
        redis::cmd("WATCH")
            .arg(&ver_key)
            .query::<()>(&mut c)
            .map_err(unavailable)?;
        let (n, ver): (usize, Option<i64>) = redis::pipe()
            .cmd("HLEN")
            .arg(&cfg)
            .get(&ver_key)
            .query(&mut c)
            .map_err(unavailable)?;
        if n > 0 && !replace {
            let _ = redis::cmd("UNWATCH").query::<()>(&mut c);
            return Err(StoreError::Refused(format!(
                "the cluster already has a configuration ({n} records); pass --replace to overwrite it"
            )));
        }
        let mut records = HashMap::new();
        let rec = NamespaceRecord {
            rules: ns.rules.clone(),
        };
        records.insert(NS_KEY.to_owned(), serde_json::to_vec(&rec).map_err(db)?);
        for (key, hc) in &ns.hcs {
            records.insert(
                format!("{HC_PREFIX}{key}"),
                serde_json::to_vec(hc).map_err(db)?,
            );
        }
        let new_ver = ver
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| StoreError::Refused("cfg:ver cannot grow any more".into()))?;
        let mut p = redis::pipe();
        p.atomic().del(&cfg).ignore();
        for (k, v) in &records {
            p.hset(&cfg, k, v).ignore();
        }
        if let Some(secret) = secret {
            let sig = sign(&config_key(secret), prefix, new_ver, &records);
            p.hset(&cfg, SIG_KEY, sig).ignore();
        }
        p.set(&ver_key, new_ver).ignore();
        let done: Option<()> = p.query(&mut c).map_err(unavailable)?;
        if done.is_none() {
            return Err(StoreError::Unavailable(
                "the configuration changed during the migration; try again".into(),
            ));
        }
        Ok(ns.hcs.len())
    }

    /// The current state.
    pub fn snapshot(&self) -> Arc<Namespace> {
        match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Applies `f` to a copy of the state, persists the records it names, publishes it.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Namespace) -> Result<(T, Vec<Change>), StoreError>,
    ) -> Result<T, StoreError> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let database = match &self.backend {
            Backend::Embedded(d) => d,
            Backend::Redis(rs) => return self.update_redis(rs, f),
        };
        let mut ns = (*self.snapshot()).clone();
        let (out, changes) = f(&mut ns)?;
        let txn = database.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(STATE).map_err(db)?;
            for c in changes {
                match record(&ns, c)? {
                    (k, Some(bytes)) => {
                        t.insert(k.as_str(), bytes.as_slice()).map_err(db)?;
                    }
                    (k, None) => {
                        t.remove(k.as_str()).map_err(db)?;
                    }
                }
            }
        }
        txn.commit().map_err(db)?;
        self.publish(ns, self.version() + 1);
        Ok(out)
    }

    /// The Redis write: under `cfg:lock`, read the current records, apply `f`, write what it
    /// changed and `INCR cfg:ver` in one `MULTI` that fails if `cfg:ver` moved meanwhile.
    fn update_redis<T>(
        &self,
        rs: &RedisStore,
        f: impl FnOnce(&mut Namespace) -> Result<(T, Vec<Change>), StoreError>,
    ) -> Result<T, StoreError> {
        rs.with_conn(|c| {
            let lock = rs.key("cfg:lock");
            let token = format!("{:032x}", rand::random::<u128>());
            take_lock(c, &lock, &token)?;
            let r = (|| {
                let ver_key = rs.key("cfg:ver");
                redis::cmd("WATCH")
                    .arg(&ver_key)
                    .query::<()>(c)
                    .map_err(unavailable)?;
                let (old_ver, mut records) = match RedisStore::read_raw(c, rs) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = redis::cmd("UNWATCH").query::<()>(c);
                        return Err(e);
                    }
                };
                let mut ns = decode(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
                let (out, changes) = match f(&mut ns) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = redis::cmd("UNWATCH").query::<()>(c);
                        return Err(e);
                    }
                };
                let cfg = rs.key("cfg");
                let mut p = redis::pipe();
                p.atomic();
                for ch in changes {
                    match record(&ns, ch)? {
                        (k, Some(bytes)) => {
                            p.hset(&cfg, &k, &bytes).ignore();
                            records.insert(k, bytes);
                        }
                        (k, None) => {
                            p.hdel(&cfg, &k).ignore();
                            records.remove(&k);
                        }
                    }
                }
                if let Some(key) = &rs.key {
                    // WATCH and the lock make this write's INCR land on old_ver + 1.
                    let new_ver = old_ver.checked_add(1).ok_or_else(|| {
                        StoreError::Refused("cfg:ver cannot grow any more".into())
                    })?;
                    p.hset(&cfg, SIG_KEY, sign(key, &rs.prefix, new_ver, &records))
                        .ignore();
                }
                p.incr(&ver_key, 1);
                let done: Option<(i64,)> = p.query(c).map_err(unavailable)?;
                let Some((ver,)) = done else {
                    return Err(StoreError::Unavailable(
                        "the configuration changed during this write; try again".into(),
                    ));
                };
                self.publish(ns, ver);
                Ok(out)
            })();
            // Released only if still ours: after 5 s it may be another writer's.
            let _ = redis::Script::new(RELEASE_LOCK)
                .key(&lock)
                .arg(&token)
                .invoke::<i64>(c);
            r
        })
    }

    /// Creates `rule` as the namespace's first rule unless it has rules already (several nodes
    /// may start at once). `true` when it was created.
    pub fn ensure_root(&self, rule: Rule) -> Result<bool, StoreError> {
        self.update(|ns| {
            if !ns.rules.is_empty() {
                return Ok((false, Vec::new()));
            }
            ns.rules.push(rule);
            Ok((true, vec![Change::Namespace]))
        })
    }

    /// True until the first namespace rule exists.
    pub fn is_empty(&self) -> bool {
        self.snapshot().rules.is_empty()
    }

    /// Creates or replaces a namespace-scoped rule.
    pub fn put_namespace_rule(&self, rule: Rule) -> Result<Rule, StoreError> {
        self.update(|ns| {
            ns.rules.retain(|r| r.name != rule.name);
            ns.rules.push(rule.clone());
            Ok((rule, vec![Change::Namespace]))
        })
    }

    /// Creates a hybrid connection; fails if the name exists.
    pub fn create_hc(&self, hc: HybridConnection) -> Result<HybridConnection, StoreError> {
        let key = hyco_proto::address::entity_key(&hc.name);
        self.update(|ns| {
            if ns.hcs.contains_key(&key) {
                return Err(StoreError::Exists(format!(
                    "hybrid connection '{}'",
                    hc.name
                )));
            }
            ns.hcs.insert(key.clone(), hc.clone());
            Ok((hc, vec![Change::Hc(key)]))
        })
    }

    /// Deletes a hybrid connection and its rules.
    pub fn delete_hc(&self, name: &str) -> Result<HybridConnection, StoreError> {
        let key = hyco_proto::address::entity_key(name);
        self.update(|ns| match ns.hcs.remove(&key) {
            Some(hc) => Ok((hc, vec![Change::Hc(key)])),
            None => Err(StoreError::NotFound(format!("hybrid connection '{name}'"))),
        })
    }

    /// Creates or replaces an entity-scoped rule.
    pub fn put_hc_rule(&self, hc_name: &str, rule: Rule) -> Result<Rule, StoreError> {
        let key = hyco_proto::address::entity_key(hc_name);
        self.update(|ns| match ns.hcs.get_mut(&key) {
            Some(hc) => {
                hc.rules.retain(|r| r.name != rule.name);
                hc.rules.push(rule.clone());
                Ok((rule, vec![Change::Hc(key)]))
            }
            None => Err(StoreError::NotFound(format!(
                "hybrid connection '{hc_name}'"
            ))),
        })
    }

    /// Changes a hybrid connection's settings; `None` leaves a field as it is.
    pub fn update_hc(
        &self,
        name: &str,
        requires_client_authorization: Option<bool>,
        user_metadata: Option<Option<String>>,
        updated_at: String,
    ) -> Result<HybridConnection, StoreError> {
        let key = hyco_proto::address::entity_key(name);
        self.update(|ns| match ns.hcs.get_mut(&key) {
            Some(hc) => {
                if let Some(r) = requires_client_authorization {
                    hc.requires_client_authorization = r;
                }
                if let Some(m) = user_metadata {
                    hc.user_metadata = m;
                }
                hc.updated_at = updated_at;
                Ok((hc.clone(), vec![Change::Hc(key)]))
            }
            None => Err(StoreError::NotFound(format!("hybrid connection '{name}'"))),
        })
    }

    /// Applies `f` to the rules of a scope (`None`: the namespace) and persists them.
    pub fn with_rules<T>(
        &self,
        scope: Option<&str>,
        f: impl FnOnce(&mut Vec<Rule>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.update(|ns| match scope {
            None => Ok((f(&mut ns.rules)?, vec![Change::Namespace])),
            Some(name) => {
                let key = hyco_proto::address::entity_key(name);
                match ns.hcs.get_mut(&key) {
                    Some(hc) => Ok((f(&mut hc.rules)?, vec![Change::Hc(key)])),
                    None => Err(StoreError::NotFound(format!("hybrid connection '{name}'"))),
                }
            }
        })
    }
}

enum Change {
    Namespace,
    Hc(String),
}

/// The record a change writes: its key and its new bytes, or `None` where it is removed.
fn record(ns: &Namespace, change: Change) -> Result<(String, Option<Vec<u8>>), StoreError> {
    Ok(match change {
        Change::Namespace => {
            let rec = NamespaceRecord {
                rules: ns.rules.clone(),
            };
            (
                NS_KEY.to_owned(),
                Some(serde_json::to_vec(&rec).map_err(db)?),
            )
        }
        Change::Hc(key) => {
            let bytes = ns.hcs.get(&key).map(serde_json::to_vec).transpose();
            (format!("{HC_PREFIX}{key}"), bytes.map_err(db)?)
        }
    })
}

/// Takes the configuration lock `lock` (for 5 s at most) as `token`, waiting up to 5 s: a
/// writer on another node holds it for one read-modify-write.
fn take_lock(c: &mut redis::Connection, lock: &str, token: &str) -> Result<(), StoreError> {
    for _ in 0..=250 {
        let got: Option<String> = redis::cmd("SET")
            .arg(lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(5000)
            .query(c)
            .map_err(unavailable)?;
        if got.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(StoreError::Unavailable(
        "another node holds the configuration lock".into(),
    ))
}

/// Deletes the lock `KEYS[1]` if it still holds the token `ARGV[1]`.
const RELEASE_LOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

fn load(db: &Database) -> Result<Namespace, StoreError> {
    {
        // Make sure the table exists so read transactions can open it.
        let txn = db.begin_write().map_err(self::db)?;
        txn.open_table(STATE).map_err(self::db)?;
        txn.commit().map_err(self::db)?;
    }
    let txn = db.begin_read().map_err(self::db)?;
    let t = txn.open_table(STATE).map_err(self::db)?;
    let mut records = Vec::new();
    for item in t.iter().map_err(self::db)? {
        let (k, v) = item.map_err(self::db)?;
        records.push((k.value().to_owned(), v.value().to_vec()));
    }
    decode(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// Builds the namespace from its records (`namespace`, `hc/{key}`).
fn decode<'a>(records: impl Iterator<Item = (&'a str, &'a [u8])>) -> Result<Namespace, StoreError> {
    let mut ns = Namespace::default();
    for (key, v) in records {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            key: key.to_owned(),
            msg: e.to_string(),
        };
        if key == NS_KEY {
            let rec: NamespaceRecord = serde_json::from_slice(v).map_err(corrupt)?;
            ns.rules = rec.rules;
        } else if let Some(name) = key.strip_prefix(HC_PREFIX) {
            let hc: HybridConnection = serde_json::from_slice(v).map_err(corrupt)?;
            ns.hcs.insert(name.to_owned(), hc);
        }
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// Removes the test's folder however the test ends.
    struct Folder(std::path::PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A database error keeps the error under it as its source (it was only its text), and
    /// says the same as before: `store: ` and that error.
    #[test]
    fn a_database_error_keeps_its_source() {
        let dir = Folder(
            std::env::temp_dir().join(format!("hyco-store-db-error-{}", std::process::id())),
        );
        // The database file cannot be created: a folder stands where it goes.
        std::fs::create_dir_all(dir.0.join("hyco.redb")).unwrap();
        let Err(e) = Store::open(&dir.0) else {
            panic!("a store opened over a folder");
        };
        assert!(matches!(e, StoreError::Db(_)), "{e:?}");
        let io = e
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io error is the source");
        assert_eq!(e.to_string(), format!("store: {io}"));
    }
}
