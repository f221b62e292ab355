//! Early data (the `early-data` extension, `hyco_proto::ext`): a sender's first WebSocket
//! frames go out right behind its upgrade request, before the relay's 101.
//!
//! [`Connector::connect_early`](super::Connector::connect_early) writes the request head itself
//! and returns a [`super::WsStream`] whose response is still pending ([`Pending`]): the stream's
//! read path reads the response head first (at most [`MAX_HEAD`] bytes), checks the 101 and its
//! `Sec-WebSocket-Accept`, and only then parses frames. A refusal becomes an `io::Error` whose
//! inner error is [`ConnectError::Rejected`], as a classic connect would have returned it. Until
//! the 101, the stream lets at most the relay's advertised number of bytes of frames out; further
//! writes wait for the 101 (and drive the read of it, so a writer alone cannot deadlock).
//!
//! Which relays accept early data is remembered per `host:port` in an [`EarlyCache`], shared by
//! a connector's clones: learnt from a classic connect's 101, forgotten when a 101 in early mode
//! no longer advertises it.

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyco_proto::ext::Extensions;
use tokio::io::{AsyncRead, ReadBuf};

use super::dial::{ConnectError, Target};
use super::warm::Key;

/// Longest response head read in early mode.
pub const MAX_HEAD: usize = 16 * 1024;

/// Most relays remembered (a client talks to a handful).
const MAX_ENTRIES: usize = 256;

/// Most response headers looked at.
const MAX_HEADERS: usize = 64;

/// The relays that accept early data, and how much: `host:port` → bytes, and whether the relay
/// also keeps connections after their tunnels (`reuse`).
#[derive(Debug, Default)]
pub struct EarlyCache {
    relays: Mutex<HashMap<Key, (u32, bool)>>,
}

impl EarlyCache {
    /// How many bytes `key` accepts before its 101, if it said it accepts early data.
    pub fn get(&self, key: &Key) -> Option<u32> {
        self.lock().get(key).map(|e| e.0)
    }

    /// Whether `key`, which accepts early data, also offered `reuse`.
    pub fn reuse(&self, key: &Key) -> bool {
        self.lock().get(key).is_some_and(|e| e.1)
    }

    /// Records what a 101 from `key` advertised.
    pub fn learn(&self, key: &Key, ext: &Extensions) {
        let mut m = self.lock();
        match ext.early_data {
            Some(n) if m.len() < MAX_ENTRIES || m.contains_key(key) => {
                m.insert(key.clone(), (n, ext.reuse));
            }
            Some(_) => {}
            None => {
                m.remove(key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (u32, bool)>> {
        self.relays.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The upgrade request head, written by hand: the target checked as a path and query, every
/// header name and value checked as HTTP allows, names spelled as given.
pub(super) fn request_head(
    t: &Target,
    key: &str,
    headers: &[(&str, &str)],
) -> Result<Vec<u8>, ConnectError> {
    let bad = || ConnectError::BadUrl("invalid request header".into());
    http::uri::PathAndQuery::try_from(t.path_and_query.as_str())
        .map_err(|_| ConnectError::BadUrl("invalid request target".into()))?;
    let host = t.host_header();
    let fixed = [
        ("Host", host.as_str()),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ];
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(t.path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in fixed.iter().chain(headers.iter()) {
        http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?;
        http::HeaderValue::from_str(v).map_err(|_| bad())?;
        head.extend_from_slice(k.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(head)
}

/// Why an early-mode response did not become a WebSocket; kept so every later read and write
/// reports it again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Rejected { status: u16, reason: String },
    BadHandshake(&'static str),
    Closed,
    Timeout(Duration),
}

impl Failure {
    fn to_io(&self) -> io::Error {
        let e = match self {
            Failure::Rejected { status, reason } => ConnectError::Rejected {
                status: *status,
                reason: reason.clone(),
                body: String::new(),
            },
            Failure::BadHandshake(why) => ConnectError::BadHandshake(why),
            Failure::Closed => {
                return io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the relay closed the connection before answering the upgrade",
                )
            }
            Failure::Timeout(d) => ConnectError::Timeout(*d),
        };
        io::Error::other(e)
    }
}

/// A parsed 101.
#[derive(Debug)]
struct Head {
    /// Bytes of the head.
    len: usize,
    ext: Extensions,
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_head(buf: &[u8], expected_accept: &str) -> Result<Option<Head>, Failure> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::BadHandshake("too many response headers"))
        }
        Err(_) => return Err(Failure::BadHandshake("malformed response head")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(Failure::Rejected {
            status,
            reason: resp.reason.unwrap_or("").to_owned(),
        });
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("Sec-WebSocket-Accept") != Some(expected_accept.as_bytes()) {
        return Err(Failure::BadHandshake("wrong Sec-WebSocket-Accept"));
    }
    let ext = header(hyco_proto::ext::HEADER)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(Extensions::parse)
        .unwrap_or_default();
    Ok(Some(Head { len, ext }))
}

/// The state of a stream whose 101 has not arrived yet.
pub struct Pending {
    expected_accept: String,
    /// The response head read so far: `head[..hlen]`.
    head: Vec<u8>,
    hlen: usize,
    /// Bytes of frames that may still go out before the 101.
    budget: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    /// Where to record what the 101 advertised.
    learn: Option<(Arc<EarlyCache>, Key)>,
    failed: Option<Failure>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("budget", &self.budget)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// Waits for a 101 carrying `accept_key(key)` for at most `timeout`, letting `budget` bytes
    /// of frames out before it; records the 101's extensions in `learn`.
    pub fn new(
        expected_accept: String,
        budget: usize,
        timeout: Duration,
        learn: Option<(Arc<EarlyCache>, Key)>,
    ) -> Pending {
        Pending {
            expected_accept,
            head: Vec::new(),
            hlen: 0,
            budget,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            learn,
            failed: None,
        }
    }

    /// Bytes of frames that may still go out before the 101.
    pub(super) fn budget(&self) -> usize {
        self.budget
    }

    /// The error the response ended with, if it did.
    pub(super) fn failure(&self) -> Option<io::Error> {
        self.failed.as_ref().map(Failure::to_io)
    }

    /// Counts `n` bytes of frames written.
    pub(super) fn spent(&mut self, n: usize) {
        self.budget = self.budget.saturating_sub(n);
    }

    /// Reads the response head from `io`. Ready with the bytes that followed it (the first
    /// frames) once a good 101 arrived; with an error (the same one each time) otherwise.
    pub(super) fn poll_response<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Vec<u8>>> {
        loop {
            if let Some(f) = &self.failed {
                return Poll::Ready(Err(f.to_io()));
            }
            if self.hlen == MAX_HEAD {
                self.failed = Some(Failure::BadHandshake("response head too large"));
                continue;
            }
            if self.head.len() == self.hlen {
                let grown = (self.head.len() * 2).clamp(1024, MAX_HEAD);
                self.head.resize(grown, 0);
            }
            let mut rb = ReadBuf::new(&mut self.head[self.hlen..]);
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        self.failed = Some(Failure::Timeout(self.timeout));
                        continue;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    self.failed = Some(Failure::Closed);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                self.failed = Some(Failure::Closed);
                continue;
            }
            self.hlen += n;
            match parse_head(&self.head[..self.hlen], &self.expected_accept) {
                Err(f) => self.failed = Some(f),
                Ok(None) => {}
                Ok(Some(h)) => {
                    if let Some((cache, key)) = &self.learn {
                        cache.learn(key, &h.ext);
                    }
                    let rest = self.head[h.len..self.hlen].to_vec();
                    self.head = Vec::new();
                    return Poll::Ready(Ok(rest));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_refusals_keep_their_reason() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc\r\nHyco-Extensions: early-data;max=9\r\n\r\n\x82\x01x";
        let h = parse_head(ok, "abc").unwrap().unwrap();
        assert_eq!(h.len, ok.len() - 3);
        assert_eq!(h.ext.early_data, Some(9));
        assert!(parse_head(&ok[..20], "abc").unwrap().is_none());
        assert_eq!(
            parse_head(ok, "abd").unwrap_err(),
            Failure::BadHandshake("wrong Sec-WebSocket-Accept")
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 404 No listener here \r\n\r\n", "abc").unwrap_err(),
            Failure::Rejected {
                status: 404,
                reason: "No listener here ".into()
            }
        );
        assert!(parse_head(b"SMTP 220\r\n\r\n", "abc").is_err());
    }

    #[test]
    fn request_heads_refuse_what_http_refuses() {
        let t = Target::parse("wss://relay.example:9443/$hc/db?sb-hc-action=connect").unwrap();
        let head = request_head(&t, "k==", &[("ServiceBusAuthorization", "tok")]).unwrap();
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with(
            "GET /$hc/db?sb-hc-action=connect HTTP/1.1\r\nHost: relay.example:9443\r\n"
        ));
        assert!(
            text.ends_with("\r\nServiceBusAuthorization: tok\r\n\r\n"),
            "{text}"
        );
        for (k, v) in [("Bad Name", "v"), ("X", "a\r\nInjected: 1"), ("", "v")] {
            assert!(request_head(&t, "k", &[(k, v)]).is_err(), "{k:?}: {v:?}");
        }
        let mut bad = t.clone();
        bad.path_and_query = "/x y".into();
        assert!(request_head(&bad, "k", &[]).is_err());
    }

    #[test]
    fn the_cache_learns_forgets_and_is_bounded() {
        let c = EarlyCache::default();
        let k = ("relay".to_owned(), 443);
        let with = Extensions::parse("early-data;max=100");
        c.learn(&k, &with);
        assert_eq!(c.get(&k), Some(100));
        c.learn(&k, &Extensions::default());
        assert_eq!(c.get(&k), None);
        for i in 0..(MAX_ENTRIES as u16 + 10) {
            c.learn(&("r".to_owned(), i), &with);
        }
        assert_eq!(c.lock().len(), MAX_ENTRIES);
    }
}
