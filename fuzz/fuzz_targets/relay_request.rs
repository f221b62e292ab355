//! The relay's request handling: raw bytes (one or more HTTP/1.1 requests, WebSocket upgrades
//! or HTTP mode, and whatever follows an upgrade) sent to an in-process relay over loopback TLS.
//!
//! The relay starts once per process (its own data folder under the temp dir, hybrid
//! connections `hc1`, `hc10` and the anonymous `anon`). Each input is one TLS connection:
//! the bytes are written, the answer is read until the relay closes the connection or stays
//! silent for [`IDLE`]; then the harness closes its side (TLS close_notify) and reads to the end.
//!
//! `$QTOKEN` (form-encoded, for a query) and `$TOKEN` (plain, for a header or a control
//! message) in the input are replaced with a valid token for the whole namespace, so inputs
//! get past authorization, except when the input mentions `$hyco` (the admin API): the fuzzer
//! never manages the namespace, so hybrid connections and keys stay as they were. The token
//! is always [`TOKEN_LEN`] bytes ([`QTOKEN_LEN`] form-encoded), so a WebSocket frame that
//! carries it (a `renewToken` after a listen upgrade) can declare its length.
//!
//! Each connection comes from its own loopback address (127.1.x.y, in turn), so the relay's
//! per-address limits (handshake slots, failed-authorization throttle) never mix inputs.
//!
//! With `HYCO_FUZZ_SHOW=1` in the environment, the start of each answer is printed.
//!
//! Properties beyond "no panic" (a panic in any relay task aborts the process):
//! * an answer, if any, starts with an HTTP/1.1 (or, to an HTTP/1.0 request, 1.0) status line;
//! * no answer ever contains the namespace key;
//! * after every input, the relay still answers an entity GET with 200 on a separate
//!   keep-alive connection from another address.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyco_io::CancellationToken;
use hyco_proto::{ConnectionString, ConnectionStringAuth};
use hyco_relay::{Relay, RelayConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Length of the token `$TOKEN` stands for (`$QTOKEN`: [`QTOKEN_LEN`]).
const TOKEN_LEN: usize = 145;
/// Length of the form-encoded token `$QTOKEN` stands for.
const QTOKEN_LEN: usize = 169;
/// Largest input sent.
const MAX_INPUT: usize = 16 * 1024;
/// Most answer bytes read per input.
const MAX_ANSWER: usize = 1 << 20;
/// Silence after which the harness stops waiting for more answer and closes its side.
const IDLE: Duration = Duration::from_millis(4);
/// Longest wait for the relay to close a connection once the harness closed its side.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Harness {
    rt: Runtime,
    addr: SocketAddr,
    tls: TlsConnector,
    /// `$TOKEN`.
    token: String,
    /// `$QTOKEN`.
    qtoken: String,
    /// The namespace key, which no answer may show.
    key: String,
    /// The keep-alive connection of the liveness check.
    health: Mutex<Option<TlsStream<TcpStream>>>,
    /// Next source address, 127.1.x.y.
    next_source: AtomicU32,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Removes data folders of earlier runs whose process is gone.
fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix) {
            if !PathBuf::from(format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Harness {
    fn start() -> Harness {
        let prefix = "hyco-fuzz-relay-";
        remove_stale_dirs(prefix);
        let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut cfg = RelayConfig::new(&dir, format!("localhost:{}", addr.port()));
        // Short enough that no input holds the fuzzer for long.
        cfg.limits.handshake_timeout = Duration::from_secs(2);
        cfg.limits.http_timeout = Duration::from_secs(1);
        cfg.limits.rendezvous_timeout = Duration::from_millis(500);
        cfg.drain_grace = Duration::from_millis(100);
        let relay = {
            let _g = rt.enter();
            Relay::prepare(cfg).expect("relay prepares")
        };
        let cs = ConnectionString::parse(&relay.root_connection_string).expect("root string");
        let ConnectionStringAuth::Key { name, key } = cs.auth else {
            panic!("the root string has a key");
        };
        // An expiry whose signature needs no percent-escapes inside (no `+` or `/`), so the
        // token always has the same length and a frame carrying it can declare its length.
        let token = (0u64..10_000)
            .map(|i| {
                hyco_proto::sas::sign(
                    &hyco_proto::sas::resource_uri("localhost", None),
                    &name,
                    &key,
                    now_unix() + 10 * 365 * 86400 + i,
                )
                .as_str()
                .to_owned()
            })
            .find(|t| t.len() == TOKEN_LEN)
            .expect("some expiry gives a signature without '+' or '/'");
        let client = hyco_io::tls::client_config(relay.ca_file.as_deref()).expect("client TLS");
        rt.spawn(relay.run(listener, CancellationToken::new()));
        let qtoken: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        assert_eq!(qtoken.len(), QTOKEN_LEN);
        let h = Harness {
            rt,
            addr,
            tls: TlsConnector::from(client),
            token,
            qtoken,
            key: key.expose().to_owned(),
            health: Mutex::new(None),
            next_source: AtomicU32::new(0),
        };
        for (name, body) in [
            (
                "hc1",
                r#"{"userMetadata":"[{\"key\":\"endpoint\",\"value\":\"127.0.0.1:9\"}]"}"#,
            ),
            ("hc10", "{}"),
            ("anon", r#"{"requiresClientAuthorization":false}"#),
        ] {
            let req = format!(
                "PUT /$hyco/v1/hybridconnections/{name} HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                h.token,
                body.len()
            );
            let answer =
                h.rt.block_on(h.exchange(req.as_bytes(), source(2, 0), CLOSE_WAIT));
            assert!(
                answer.starts_with(b"HTTP/1.1 201"),
                "create {name}: {}",
                show(&answer)
            );
        }
        h
    }

    async fn connect(&self, from: IpAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(from, 0))?;
        let tcp = sock.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("a DNS name");
        self.tls.connect(name, tcp).await
    }

    /// One connection: send `input`, read the answer until `idle` passes without a byte (see
    /// the module docs).
    async fn exchange(&self, input: &[u8], from: IpAddr, idle: Duration) -> Vec<u8> {
        let mut answer = Vec::new();
        let Ok(mut s) = self.connect(from).await else {
            panic!("the relay does not accept connections");
        };
        if s.write_all(input).await.is_err() || s.flush().await.is_err() {
            return answer;
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(idle, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return answer,
                Ok(Ok(n)) => {
                    if answer.len() < MAX_ANSWER {
                        answer.extend_from_slice(&buf[..n]);
                    }
                }
                Err(_) => break,
            }
        }
        let _ = s.shutdown().await;
        let rest = tokio::time::timeout(CLOSE_WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if answer.len() < MAX_ANSWER {
                            answer.extend_from_slice(&buf[..n]);
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            rest.is_ok(),
            "the relay kept the connection open {CLOSE_WAIT:?} after the client closed"
        );
        answer
    }

    /// An entity GET on the keep-alive connection (reconnecting once if it was closed); the
    /// status code.
    async fn health_once(&self, conn: &mut Option<TlsStream<TcpStream>>) -> Option<u16> {
        if conn.is_none() {
            *conn = Some(self.connect(source(0, 2)).await.ok()?);
        }
        let s = conn.as_mut()?;
        let req = format!(
            "GET /hc1?api-version=2016-07 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\r\n",
            self.token
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1024];
        let end = loop {
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut byte).await.ok()?;
            if n == 0 || head.len() > 64 * 1024 {
                return None;
            }
            head.extend_from_slice(&byte[..n]);
        };
        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
        let status = text.get(9..12)?.parse().ok()?;
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        let mut have = head.len() - end;
        while have < len {
            let n = s.read(&mut byte).await.ok()?;
            if n == 0 {
                return None;
            }
            have += n;
        }
        Some(status)
    }

    fn check_alive(&self) {
        let mut conn = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let status = self.rt.block_on(async {
            for _ in 0..2 {
                let r = tokio::time::timeout(Duration::from_secs(5), self.health_once(&mut conn))
                    .await
                    .ok()
                    .flatten();
                if r.is_some() {
                    return r;
                }
                *conn = None;
            }
            None
        });
        assert_eq!(
            status,
            Some(200),
            "the relay no longer answers an entity GET"
        );
    }
}

fn source(x: u8, y: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, x, y))
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fn harness() -> &'static Harness {
    static H: OnceLock<Arc<Harness>> = OnceLock::new();
    H.get_or_init(|| Arc::new(Harness::start()))
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > MAX_INPUT {
        return;
    }
    let h = harness();
    let input = if contains(&data.to_ascii_lowercase(), b"$hyco") {
        data.to_vec()
    } else {
        let once = replace(data, b"$QTOKEN", h.qtoken.as_bytes());
        replace(&once, b"$TOKEN", h.token.as_bytes())
    };
    // 127.1.x.y with x in 16..=255: each address comes round again after 61,440 inputs.
    let n = h.next_source.fetch_add(1, Ordering::Relaxed) % (240 * 256);
    let from = source(16 + (n / 256) as u8, (n % 256) as u8);
    let answer = h.rt.block_on(h.exchange(&input, from, IDLE));
    if std::env::var_os("HYCO_FUZZ_SHOW").is_some() {
        eprintln!("answer ({} bytes): {}", answer.len(), show(&answer));
    }
    if !answer.is_empty() {
        let status_line = answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 ");
        assert!(status_line, "{}", show(&answer));
    }
    assert!(
        !contains(&answer, h.key.as_bytes()),
        "an answer shows the key"
    );
    h.check_alive();
});
