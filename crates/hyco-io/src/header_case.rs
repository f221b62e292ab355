//! Header names in the spelling their sender used.
//!
//! HTTP header names are case-insensitive, but Microsoft's Java client is not: its listener keeps
//! `connectHeaders` and `requestHeaders` in a case-sensitive `HashMap`
//! (azure-relay-java ListenerCommand.java:147-149 and :233-235, RelayedHttpListenerRequest.java:24),
//! and its HTTP senders read the response through `HttpURLConnection.getHeaderFields()`, whose map
//! is case-sensitive too. Java's own suite against Azure (HybridConnectionListenerTest.java:82,
//! `customHeadersTest`) looks a header up by the exact name the other side sent, in both
//! directions, so Azure passes names through as spelled.
//!
//! hyper parses and writes header names in lower case. With `preserve_header_case` it records the
//! received spelling, but in an extension type it keeps private and that only its own HTTP/1
//! codec reads. So both directions go through that codec over an in-memory pipe, which keeps us
//! on hyper's public API and its parser:
//! - [`Spelling::of`]: the request's extensions (holding the recorded spelling) go on a probe
//!   request that hyper's client writes into the pipe; the names are read back with `httparse`.
//! - [`respell`]: the listener's header names are written as a request head that hyper's server
//!   parses with `preserve_header_case`; the extensions it records go on the sender's response,
//!   and hyper's server writes those names as the listener spelled them.
//!
//! - [`recorded`]: the same record for names of our own making, which hyco's clients put on the
//!   requests they send, so the relay and any listener see the names the application gave, as
//!   from Microsoft's clients.
//!
//! Either step failing (it cannot for heads hyper itself produced or accepted) leaves the names
//! as they were: the usual capitalisation toward a listener, lower case toward a sender. Each
//! step is one pass of hyper's codec over a head without values, a few microseconds against the
//! round trips of a connect.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Room for one probe head: names only (values are one byte), so at most the relay's request
/// buffer (32 KiB, `serve_connection`) plus the request line.
const PROBE_LIMIT: usize = 64 * 1024;

/// Lower-case header name → the spelling its sender used first.
#[derive(Debug, Default)]
pub struct Spelling(HashMap<String, String>);

impl Spelling {
    /// The spelling of `req`'s header names as received. The connection must be served with
    /// `preserve_header_case`, as the relay's are: without it every name reads as lower case.
    pub async fn of<B>(req: &Request<B>) -> Spelling {
        let mut probe = Request::new(Empty::<Bytes>::new());
        for name in req.headers().keys() {
            // Framing headers would make hyper's client frame a body the probe does not have.
            if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
                probe
                    .headers_mut()
                    .append(name.clone(), HeaderValue::from_static("x"));
            }
        }
        *probe.extensions_mut() = req.extensions().clone();
        let head = write_with_client(probe).await.unwrap_or_default();
        Spelling(parse_names(&head))
    }

    /// Replaces each name in `headers` (any case) with its sender's spelling where known.
    pub fn apply(&self, headers: &mut [(String, String)]) {
        for (name, _) in headers.iter_mut() {
            if let Some(original) = self.0.get(&name.to_ascii_lowercase()) {
                name.clone_from(original);
            }
        }
    }
}

/// Makes hyper write `resp`'s headers in the spelling of `names` (the listener's header names,
/// in the order and number they were added to `resp`).
pub async fn respell<B>(resp: &mut Response<B>, names: &[&str]) {
    if let Some(ext) = recorded(names).await {
        resp.extensions_mut().extend(ext);
    }
}

/// Extensions that make hyper's HTTP/1 codec write header names as `names` spell them (in the
/// order and number the headers appear), for a request or a response; `None` when every name
/// is lower case already or none is usable.
pub async fn recorded(names: &[&str]) -> Option<http::Extensions> {
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    let mut any = false;
    for name in names {
        // Only names hyper accepted into the response; lower-case ones need nothing.
        if HeaderName::from_bytes(name.as_bytes()).is_ok() {
            any |= name.bytes().any(|b| b.is_ascii_uppercase());
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": x\r\n");
        }
    }
    if !any || head.len() > PROBE_LIMIT {
        return None;
    }
    head.extend_from_slice(b"\r\n");
    if let Some(ext) = RECORDED.get(&head) {
        return Some(ext);
    }
    let ext = parse_with_server(head.clone()).await?;
    RECORDED.put(head, &ext);
    Some(ext)
}

/// Heads up to this long are remembered by [`recorded`] (a usual response's names take a few
/// hundred bytes).
const REMEMBERED_HEAD: usize = 4 * 1024;
/// How many heads [`recorded`] remembers: far more than the distinct sets of names a few
/// services answer with, and at most about 2 × 256 × 4 KiB of memory.
const REMEMBERED: usize = 256;

/// The extensions [`recorded`] made for each probe head, so that a listener answering with
/// the same names again and again (every response of one service) costs one pass of hyper's
/// codec, not one per response. Full: forgotten all at once, and filled again.
static RECORDED: Remembered = Remembered(Mutex::new(None));

struct Remembered(Mutex<Option<HashMap<Vec<u8>, http::Extensions>>>);

impl Remembered {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<Vec<u8>, http::Extensions>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, head: &[u8]) -> Option<http::Extensions> {
        self.lock().as_ref()?.get(head).cloned()
    }

    fn put(&self, head: Vec<u8>, ext: &http::Extensions) {
        if head.len() > REMEMBERED_HEAD {
            return;
        }
        let mut g = self.lock();
        let map = g.get_or_insert_with(HashMap::new);
        if map.len() >= REMEMBERED {
            map.clear();
        }
        map.insert(head, ext.clone());
    }
}

/// hyper's client writes `probe` into a pipe; the bytes of its head come back.
async fn write_with_client(probe: Request<Empty<Bytes>>) -> Option<Vec<u8>> {
    let (ours, theirs) = tokio::io::duplex(PROBE_LIMIT);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(theirs))
        .await
        .ok()?;
    let send = async move {
        // No answer ever comes: the head is all the probe is for.
        let _ = sender.send_request(probe).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        head = read_head(ours) => head,
        _ = conn => None,
        _ = send => None,
    }
}

/// hyper's server parses `head` from a pipe; the extensions of the request it made come back.
async fn parse_with_server(head: Vec<u8>) -> Option<http::Extensions> {
    let (mut ours, theirs) = tokio::io::duplex(PROBE_LIMIT);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        if let Some(tx) = tx.lock().ok().and_then(|mut g| g.take()) {
            let _ = tx.send(req.extensions().clone());
        }
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(Empty::<
            Bytes,
        >::new(
        ))))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .max_buf_size(PROBE_LIMIT)
        .serve_connection(TokioIo::new(theirs), svc);
    let recorded = async move {
        ours.write_all(&head).await.ok()?;
        let recorded = rx.await.ok();
        drop(ours);
        recorded
    };
    tokio::select! {
        r = recorded => r,
        _ = conn => None,
    }
}

/// Reads from `pipe` until the end of one HTTP head (bounded by [`PROBE_LIMIT`]).
async fn read_head(mut pipe: tokio::io::DuplexStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = pipe.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > PROBE_LIMIT {
            return None;
        }
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(buf);
        }
    }
}

/// The header names of a request head, first spelling of each name kept.
fn parse_names(head: &[u8]) -> HashMap<String, String> {
    let mut names = HashMap::new();
    // One slot per line: every header is a line of its own.
    let lines = head.iter().filter(|&&b| b == b'\n').count();
    let mut slots = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut slots);
    if let Ok(httparse::Status::Complete(_)) = req.parse(head) {
        for h in req.headers.iter() {
            names
                .entry(h.name.to_ascii_lowercase())
                .or_insert_with(|| h.name.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as hyper's server makes it from `head` with `preserve_header_case`.
    async fn parsed(head: &str) -> Request<()> {
        let ext = parse_with_server(head.as_bytes().to_vec())
            .await
            .expect("hyper parses the head");
        let mut req = Request::new(());
        *req.extensions_mut() = ext;
        for line in head.lines().skip(1).take_while(|l| !l.is_empty()) {
            let (n, v) = line.split_once(':').expect("a header line");
            req.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v.trim()).expect("value"),
            );
        }
        req
    }

    #[tokio::test]
    async fn a_request_keeps_every_token_character_and_case_of_its_names() {
        let odd = "!#$%&*+-.^_`~*|ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz1234567890";
        let head = format!(
            "GET / HTTP/1.1\r\nHost: h\r\n{odd}: v\r\nX-MiXeD: 1\r\nx-mixed: 2\r\nContent-Length: 0\r\n\r\n"
        );
        let req = parsed(&head).await;
        let spelling = Spelling::of(&req).await;
        let mut headers = vec![
            (odd.to_ascii_lowercase(), "v".to_owned()),
            ("X-Mixed".to_owned(), "1, 2".to_owned()),
            ("Host".to_owned(), "h".to_owned()),
            ("Content-Length".to_owned(), "0".to_owned()),
        ];
        spelling.apply(&mut headers);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        // The first spelling of a repeated name wins; a name the probe leaves out keeps its own.
        assert_eq!(names, [odd, "X-MiXeD", "Host", "Content-Length"]);
    }

    #[tokio::test]
    async fn a_response_is_written_with_the_listeners_spelling() {
        // The second time from what `recorded` remembered of the first.
        for _ in 0..2 {
            response_is_written_with_the_listeners_spelling().await;
        }
    }

    async fn response_is_written_with_the_listeners_spelling() {
        let mut resp = Response::new(Empty::<Bytes>::new());
        resp.headers_mut()
            .append("content-type", HeaderValue::from_static("text/plain"));
        resp.headers_mut()
            .append("x-weird~name", HeaderValue::from_static("v"));
        respell(&mut resp, &["Content-TYPE", "X-Weird~Name"]).await;
        // hyper's server writes it: the wire shows the listener's spelling.
        let (mut client, server) = tokio::io::duplex(PROBE_LIMIT);
        let resp = std::sync::Mutex::new(Some(resp));
        let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
            let r = resp.lock().ok().and_then(|mut g| g.take());
            std::future::ready(r.ok_or("answered twice"))
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
        let talk = async {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                .await
                .expect("write");
            read_head(client).await.expect("a response head")
        };
        let head = tokio::select! {
            h = talk => h,
            _ = conn => panic!("connection ended before the response"),
        };
        let text = String::from_utf8_lossy(&head);
        assert!(text.contains("\r\nContent-TYPE: text/plain\r\n"), "{text}");
        assert!(text.contains("\r\nX-Weird~Name: v\r\n"), "{text}");
    }
}
