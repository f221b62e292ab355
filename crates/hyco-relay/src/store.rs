//! The embedded store: the namespace's rules and its hybrid connections, in a redb file in the
//! data folder.
//!
//! Reads come from an in-memory snapshot (`Arc<Namespace>`), so authorizing a connection never
//! touches the disk. Writes are serialized, committed durably (redb fsyncs on commit) and only
//! then published to the snapshot: when an admin call returns, its change survives a crash.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use hyco_proto::Rights;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
const NS_KEY: &str = "namespace";
const HC_PREFIX: &str = "hc/";

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
    /// The database could not be opened or written.
    #[error("store: {0}")]
    Db(String),
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
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    db: Database,
    snapshot: RwLock<Arc<Namespace>>,
    /// Serializes writers so read-modify-write cycles do not interleave.
    write_lock: Mutex<()>,
}

impl Store {
    /// Opens (or creates) `hyco.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = Database::create(dir.join("hyco.redb")).map_err(db)?;
        let ns = load(&db)?;
        Ok(Store {
            db,
            snapshot: RwLock::new(Arc::new(ns)),
            write_lock: Mutex::new(()),
        })
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
        let mut ns = (*self.snapshot()).clone();
        let (out, changes) = f(&mut ns)?;
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(STATE).map_err(db)?;
            for c in changes {
                match c {
                    Change::Namespace => {
                        let rec = NamespaceRecord {
                            rules: ns.rules.clone(),
                        };
                        let bytes = serde_json::to_vec(&rec).map_err(db)?;
                        t.insert(NS_KEY, bytes.as_slice()).map_err(db)?;
                    }
                    Change::Hc(key) => {
                        let k = format!("{HC_PREFIX}{key}");
                        match ns.hcs.get(&key) {
                            Some(hc) => {
                                let bytes = serde_json::to_vec(hc).map_err(db)?;
                                t.insert(k.as_str(), bytes.as_slice()).map_err(db)?;
                            }
                            None => {
                                t.remove(k.as_str()).map_err(db)?;
                            }
                        }
                    }
                }
            }
        }
        txn.commit().map_err(db)?;
        let mut g = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        *g = Arc::new(ns);
        Ok(out)
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

fn load(db: &Database) -> Result<Namespace, StoreError> {
    {
        // Make sure the table exists so read transactions can open it.
        let txn = db.begin_write().map_err(self::db)?;
        txn.open_table(STATE).map_err(self::db)?;
        txn.commit().map_err(self::db)?;
    }
    let txn = db.begin_read().map_err(self::db)?;
    let t = txn.open_table(STATE).map_err(self::db)?;
    let mut ns = Namespace::default();
    for item in t.iter().map_err(self::db)? {
        let (k, v) = item.map_err(self::db)?;
        let key = k.value().to_owned();
        let corrupt = |e: serde_json::Error| StoreError::Corrupt {
            key: key.clone(),
            msg: e.to_string(),
        };
        if key == NS_KEY {
            let rec: NamespaceRecord = serde_json::from_slice(v.value()).map_err(corrupt)?;
            ns.rules = rec.rules;
        } else if let Some(name) = key.strip_prefix(HC_PREFIX) {
            let hc: HybridConnection = serde_json::from_slice(v.value()).map_err(corrupt)?;
            ns.hcs.insert(name.to_owned(), hc);
        }
    }
    Ok(ns)
}
