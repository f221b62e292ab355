//! The listener registry: for each hybrid connection, its connected control channels.
//!
//! A sender is joined to one listener chosen at random among the eligible ones
//! (protocol.md §5.1), honouring `Microsoft-Relay-AllowedListeners` / `DisallowedListeners`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::mpsc;

/// A message for a listener's control channel task.
#[derive(Debug)]
pub enum ControlMsg {
    /// A command JSON to send as one text message.
    Command(String),
    /// An HTTP `request` JSON and, right after it with nothing between, its body as one
    /// binary message.
    Request {
        /// The full `request` command.
        json: String,
        /// The body, when not empty.
        body: Option<bytes::Bytes>,
    },
    /// Close the control channel with this code and reason.
    Close(u16, &'static str),
}

/// A change of the local listener set, for the directory writer.
#[derive(Debug)]
pub enum DirOp {
    /// A listener registered here.
    Up {
        /// Registry key of its hybrid connection.
        hc: String,
        /// Relay-internal id.
        conn_id: u64,
        /// Its `sb-hc-id`.
        listener_id: String,
    },
    /// It left.
    Down {
        /// Registry key of its hybrid connection.
        hc: String,
        /// Relay-internal id.
        conn_id: u64,
    },
}

/// One connected listener.
#[derive(Debug)]
pub struct ListenerEntry {
    /// Relay-internal id, unique for the process lifetime.
    pub conn_id: u64,
    /// The listener's own id (`sb-hc-id`), used by the allowed/disallowed headers.
    pub listener_id: String,
    /// Socket peer of the control channel.
    pub remote: SocketAddr,
    /// When it registered.
    pub since: SystemTime,
    /// The Host the listener reached us by: rendezvous addresses use it, so its TLS name
    /// check passes exactly as it did for the control channel.
    pub host: String,
    /// Queue to its control task.
    pub tx: mpsc::Sender<ControlMsg>,
    /// When a frame (a pong at least) last came from it, seconds since the epoch: health.
    pub last_seen: AtomicU64,
}

/// Why a listener was not registered.
#[derive(Debug)]
pub struct Full;

/// A listener's place in the registry (and so in a cluster's directory): given back when
/// dropped, however the task holding it ends (closed, cancelled, panicked), so no ending leaves
/// a ghost that senders are routed to and that counts against the listener cap.
pub struct Registration {
    registry: Arc<Registry>,
    hc: String,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(&self.hc, self.conn_id);
    }
}

/// All listeners of all hybrid connections.
#[derive(Default)]
pub struct Registry {
    by_hc: Mutex<HashMap<String, Vec<Arc<ListenerEntry>>>>,
    next_id: AtomicU64,
    /// In a cluster: every registration and removal, for the shared directory.
    directory: Option<mpsc::UnboundedSender<DirOp>>,
}

impl Registry {
    /// A registry that reports its changes to a cluster directory.
    pub fn with_directory(tx: mpsc::UnboundedSender<DirOp>) -> Registry {
        Registry {
            directory: Some(tx),
            ..Registry::default()
        }
    }

    /// A fresh process-unique id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<ListenerEntry>>>> {
        self.by_hc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a listener unless the hybrid connection already has `max`; it stays until
    /// the returned [`Registration`] is dropped (or the hybrid connection is evicted).
    pub fn add(
        self: &Arc<Self>,
        hc: &str,
        entry: Arc<ListenerEntry>,
        max: usize,
    ) -> Result<Registration, Full> {
        let mut g = self.lock();
        let list = g.entry(hc.to_owned()).or_default();
        if list.len() >= max {
            if list.is_empty() {
                g.remove(hc);
            }
            return Err(Full);
        }
        let conn_id = entry.conn_id;
        if let Some(d) = &self.directory {
            let _ = d.send(DirOp::Up {
                hc: hc.to_owned(),
                conn_id: entry.conn_id,
                listener_id: entry.listener_id.clone(),
            });
        }
        list.push(entry);
        Ok(Registration {
            registry: Arc::clone(self),
            hc: hc.to_owned(),
            conn_id,
        })
    }

    /// Removes a listener (nothing when it is gone already). [`Registration`] calls this.
    fn remove(&self, hc: &str, conn_id: u64) {
        let mut g = self.lock();
        if let Some(list) = g.get_mut(hc) {
            let before = list.len();
            list.retain(|e| e.conn_id != conn_id);
            if list.len() < before {
                if let Some(d) = &self.directory {
                    let _ = d.send(DirOp::Down {
                        hc: hc.to_owned(),
                        conn_id,
                    });
                }
            }
            if list.is_empty() {
                g.remove(hc);
            }
        }
    }

    /// The listener `conn_id` of a hybrid connection, if it is still here.
    pub fn find(&self, hc: &str, conn_id: u64) -> Option<Arc<ListenerEntry>> {
        self.lock()
            .get(hc)?
            .iter()
            .find(|e| e.conn_id == conn_id)
            .cloned()
    }

    /// Keys of the hybrid connections that have listeners.
    pub fn hc_keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Every listener with its hybrid connection's key.
    pub fn all(&self) -> Vec<(String, Arc<ListenerEntry>)> {
        self.lock()
            .iter()
            .flat_map(|(hc, list)| list.iter().map(move |e| (hc.clone(), Arc::clone(e))))
            .collect()
    }

    /// The listeners of a hybrid connection.
    pub fn list(&self, hc: &str) -> Vec<Arc<ListenerEntry>> {
        self.lock().get(hc).cloned().unwrap_or_default()
    }

    /// Number of listeners of a hybrid connection.
    pub fn count(&self, hc: &str) -> usize {
        self.lock().get(hc).map_or(0, Vec::len)
    }

    /// The listeners a sender may be joined to, the `tried` ones left out.
    pub fn eligible(
        &self,
        hc: &str,
        allowed: Option<&[String]>,
        disallowed: &[String],
        tried: &[u64],
    ) -> Vec<Arc<ListenerEntry>> {
        let g = self.lock();
        let Some(list) = g.get(hc) else {
            return Vec::new();
        };
        list.iter()
            .filter(|e| eligible_id(&e.listener_id, allowed, disallowed))
            .filter(|e| !tried.contains(&e.conn_id))
            .cloned()
            .collect()
    }

    /// Asks every listener of a hybrid connection to close.
    pub fn close_all(&self, hc: &str, code: u16, reason: &'static str) {
        let g = self.lock();
        for e in g.get(hc).into_iter().flatten() {
            let _ = e.tx.try_send(ControlMsg::Close(code, reason));
        }
    }

    /// Removes every listener of a hybrid connection at once (it was deleted) and asks each
    /// to close: even a listener whose task is stuck is no longer routed to, nor counted
    /// against a hybrid connection created later under the same name.
    pub fn evict(&self, hc: &str, code: u16, reason: &'static str) {
        let gone = self.lock().remove(hc).unwrap_or_default();
        for e in gone {
            if let Some(d) = &self.directory {
                let _ = d.send(DirOp::Down {
                    hc: hc.to_owned(),
                    conn_id: e.conn_id,
                });
            }
            let _ = e.tx.try_send(ControlMsg::Close(code, reason));
        }
    }
}

/// Whether a listener id passes `Microsoft-Relay-AllowedListeners` / `DisallowedListeners`.
pub fn eligible_id(id: &str, allowed: Option<&[String]>, disallowed: &[String]) -> bool {
    allowed.is_none_or(|a| a.iter().any(|x| x.eq_ignore_ascii_case(id)))
        && !disallowed.iter().any(|x| x.eq_ignore_ascii_case(id))
}

/// Parses a comma-separated listener id header.
pub fn id_list(v: Option<&http::HeaderValue>) -> Option<Vec<String>> {
    let s = v?.to_str().ok()?;
    Some(
        s.split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect(),
    )
}
