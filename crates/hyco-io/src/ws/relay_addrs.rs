//! Several network addresses for one relay endpoint: the nodes of a relay cluster behind one
//! namespace name.
//!
//! [`RelayAddrs`] is what [`Connector::set_relay_addrs`](super::Connector::set_relay_addrs)
//! installs. When a connect targets exactly the endpoint (`host:port`, host compared without
//! regard to case), the TCP step goes to these addresses in turn instead of to the endpoint's
//! own name; everything above TCP (TLS server name, certificate check, `Host` header, the token
//! audience) still uses the endpoint's name. URLs for any other `host:port` (the rendezvous
//! addresses a relay puts in accept commands, for instance) are not affected.
//!
//! This file only chooses addresses. What one dial is (direct, or a `CONNECT` through a proxy)
//! is the connector's business, passed in as a closure, so the cursor logic can be tested
//! with plain TCP listeners.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The alternate addresses of one endpoint, and where the next connect starts.
#[derive(Debug)]
pub struct RelayAddrs {
    /// The endpoint's host, lower case, an IPv6 literal without brackets (as
    /// [`Target`](super::dial::Target) holds it).
    host: String,
    /// The endpoint's port.
    port: u16,
    /// Where the endpoint can be reached: host name or IP literal (IPv6 without brackets), port.
    addrs: Vec<(String, u16)>,
    /// Index of the address that last worked: every connect starts there. Shared by all clones
    /// of a connector (they share this value through an `Arc`), so once one task has found a
    /// node down, the others go straight to the one that answered.
    cursor: AtomicUsize,
}

/// Every address failed; each with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrFailure {
    /// `host:port` dialled.
    pub addr: String,
    /// What went wrong there.
    pub error: String,
}

impl std::fmt::Display for AddrFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.addr, self.error)
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `host:port`, with brackets around an IPv6 literal.
pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl RelayAddrs {
    /// The addresses for `endpoint_host:endpoint_port`; `None` when `addrs` is empty. Hosts may
    /// be written with or without brackets around IPv6 literals.
    pub fn new(endpoint_host: &str, endpoint_port: u16, addrs: Vec<(String, u16)>) -> Option<Self> {
        if addrs.is_empty() {
            return None;
        }
        Some(RelayAddrs {
            host: unbracket(endpoint_host).to_ascii_lowercase(),
            port: endpoint_port,
            addrs: addrs
                .into_iter()
                .map(|(h, p)| (unbracket(&h).to_owned(), p))
                .collect(),
            cursor: AtomicUsize::new(0),
        })
    }

    /// Whether a connect to `host:port` goes through these addresses.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        port == self.port && unbracket(host).eq_ignore_ascii_case(&self.host)
    }

    /// The endpoint, `host:port`.
    pub fn endpoint(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The addresses, in the order given.
    pub fn addrs(&self) -> &[(String, u16)] {
        &self.addrs
    }

    /// Index of the address the next connect starts at.
    pub fn cursor(&self) -> usize {
        self.cursor.load(Ordering::Relaxed) % self.addrs.len()
    }

    /// How long one address may take for its TCP step: an equal share of the whole connect's
    /// `timeout`, at least one second, so an address that drops packets leaves time for the
    /// next ones.
    pub fn attempt_timeout(&self, timeout: Duration) -> Duration {
        let n = u32::try_from(self.addrs.len()).unwrap_or(u32::MAX);
        (timeout / n).max(Duration::from_secs(1))
    }

    /// Dials the addresses in turn, starting at the cursor, each at most once, each limited
    /// to `limit`. The first that works becomes the cursor. When none works, the failures come
    /// back in the order tried.
    pub async fn dial<T, E, F, Fut>(
        &self,
        limit: Duration,
        mut dial: F,
    ) -> Result<T, Vec<AddrFailure>>
    where
        F: FnMut(String, u16) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let n = self.addrs.len();
        let start = self.cursor();
        let mut failures = Vec::with_capacity(n);
        for i in 0..n {
            let idx = (start + i) % n;
            let (host, port) = &self.addrs[idx];
            let error = match tokio::time::timeout(limit, dial(host.clone(), *port)).await {
                Ok(Ok(conn)) => {
                    self.cursor.store(idx, Ordering::Relaxed);
                    return Ok(conn);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {limit:?}"),
            };
            let addr = authority(host, *port);
            if i + 1 < n {
                tracing::warn!(endpoint = %self.endpoint(), addr = %addr, error = %error,
                    "relay address unreachable; trying the next");
            }
            failures.push(AddrFailure { addr, error });
        }
        Err(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A port that refuses: bound, then released.
    async fn refusing() -> (String, u16) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        ("127.0.0.1".into(), port)
    }

    async fn live() -> (TcpListener, (String, u16)) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        (l, ("127.0.0.1".into(), port))
    }

    async fn tcp(host: String, port: u16) -> std::io::Result<TcpStream> {
        TcpStream::connect((host.as_str(), port)).await
    }

    const LIMIT: Duration = Duration::from_secs(5);

    /// One connect through `r` over plain TCP; with the ports tried, in order.
    async fn dial_noting(r: &RelayAddrs) -> (Result<TcpStream, Vec<AddrFailure>>, Vec<u16>) {
        let mut tried = Vec::new();
        let s = r
            .dial(LIMIT, |h, p| {
                tried.push(p);
                tcp(h, p)
            })
            .await;
        (s, tried)
    }

    #[tokio::test]
    async fn a_refusing_address_is_skipped_and_the_cursor_sticks_to_the_live_one() {
        let dead = refusing().await;
        let (_l, up) = live().await;
        let r = RelayAddrs::new("relay.example", 443, vec![dead.clone(), up.clone()]).unwrap();
        assert_eq!(r.cursor(), 0);
        let (s, tried) = dial_noting(&r).await;
        assert_eq!(s.unwrap().peer_addr().unwrap().port(), up.1);
        assert_eq!(tried, vec![dead.1, up.1]);
        assert_eq!(r.cursor(), 1);
        // The next connect starts at the live address and does not touch the dead one.
        let (s, tried) = dial_noting(&r).await;
        s.unwrap();
        assert_eq!(tried, vec![up.1]);
    }

    #[tokio::test]
    async fn when_the_sticky_address_dies_the_next_one_is_tried_wrapping_around() {
        let (l0, a0) = live().await;
        let (l1, a1) = live().await;
        let r = RelayAddrs::new("relay.example", 443, vec![a0.clone(), a1.clone()]).unwrap();
        r.dial(LIMIT, tcp).await.unwrap();
        assert_eq!(r.cursor(), 0);
        drop(l0);
        let s = r.dial(LIMIT, tcp).await.unwrap();
        assert_eq!(s.peer_addr().unwrap().port(), a1.1);
        assert_eq!(r.cursor(), 1);
        // Now 1 dies and 0 is back: the search wraps from 1 to 0.
        let _l0 = TcpListener::bind(("127.0.0.1", a0.1)).await.unwrap();
        drop(l1);
        let (s, tried) = dial_noting(&r).await;
        assert_eq!(s.unwrap().peer_addr().unwrap().port(), a0.1);
        assert_eq!(tried, vec![a1.1, a0.1]);
        assert_eq!(r.cursor(), 0);
    }

    #[tokio::test]
    async fn all_failing_names_every_address_once_and_keeps_the_cursor() {
        let (d0, d1, d2) = (refusing().await, refusing().await, refusing().await);
        let r = RelayAddrs::new(
            "relay.example",
            443,
            vec![d0.clone(), d1.clone(), d2.clone()],
        )
        .unwrap();
        let mut calls = 0;
        let failures = r
            .dial(LIMIT, |h, p| {
                calls += 1;
                tcp(h, p)
            })
            .await
            .unwrap_err();
        assert_eq!(calls, 3);
        let named: Vec<_> = failures.iter().map(|f| f.addr.clone()).collect();
        assert_eq!(
            named,
            [&d0, &d1, &d2].map(|(h, p)| format!("{h}:{p}")).to_vec()
        );
        assert!(failures.iter().all(|f| !f.error.is_empty()));
        assert_eq!(r.cursor(), 0);
    }

    #[tokio::test]
    async fn an_address_that_does_not_answer_times_out_and_the_next_is_tried() {
        let (_l, up) = live().await;
        let r = RelayAddrs::new(
            "relay.example",
            443,
            vec![("black.hole".into(), 1), up.clone()],
        )
        .unwrap();
        let s = r
            .dial(Duration::from_millis(100), |h, p| async move {
                if h == "black.hole" {
                    std::future::pending::<()>().await;
                }
                tcp(h, p).await
            })
            .await
            .unwrap();
        assert_eq!(s.peer_addr().unwrap().port(), up.1);
        assert_eq!(r.cursor(), 1);
    }

    #[test]
    fn matching_is_exact_on_port_and_case_blind_on_host() {
        let r = RelayAddrs::new("Relay.Example", 9443, vec![("10.0.0.1".into(), 9443)]).unwrap();
        assert!(r.matches("relay.example", 9443));
        assert!(r.matches("RELAY.EXAMPLE", 9443));
        assert!(!r.matches("relay.example", 443));
        assert!(!r.matches("node1.relay.example", 9443));
        assert!(!r.matches("127.0.0.1", 9443));
        let v6 = RelayAddrs::new("[::1]", 9443, vec![("[::2]".into(), 1)]).unwrap();
        assert!(v6.matches("::1", 9443));
        assert_eq!(v6.endpoint(), "[::1]:9443");
        assert_eq!(v6.addrs(), &[("::2".to_owned(), 1)]);
        assert!(RelayAddrs::new("relay.example", 443, Vec::new()).is_none());
    }

    #[test]
    fn each_address_gets_a_share_of_the_timeout() {
        let r = RelayAddrs::new("r", 443, vec![("a".into(), 1), ("b".into(), 2)]).unwrap();
        assert_eq!(
            r.attempt_timeout(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            r.attempt_timeout(Duration::from_millis(500)),
            Duration::from_secs(1)
        );
    }
}
