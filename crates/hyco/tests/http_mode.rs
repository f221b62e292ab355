//! HTTP mode through `hyco manager`: HTTPS requests to `https://relay/{hc}/…` reach a real web
//! server (nginx from Debian's packages, and a hyper server that echoes what it received) and
//! its answers come back: methods, bodies of every size both ways, chunked framing, 204/304,
//! redirects, many headers, encoded query strings, hop-by-hop and forwarding headers, the
//! relay's token kept from the service, timeouts, a dead endpoint, a sender that leaves
//! mid-response, Unix-socket endpoints.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{bin, relay, Relay, T};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyco_testkit::{dead_port, eventually, run, Proc, TempDir};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(d: &[u8]) -> String {
    hex(&Sha256::digest(d))
}

/// Bytes that differ from position to position (a shifted copy shows as a wrong hash).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// The echo server: a hyper HTTP/1.1 server that reports what it received.

#[derive(Default)]
struct EchoState {
    /// `/endless` responses being written now.
    streaming: AtomicUsize,
}

struct Live(Arc<EchoState>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn echo(req: Request<Incoming>, state: Arc<EchoState>) -> Result<Response<Body>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().trim_start_matches("/api").to_owned();
    let method = req.method().to_string();
    let chunked = req.headers().contains_key("transfer-encoding");
    let length = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let seen: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let resp = match path.as_str() {
        "/headers" => Response::builder()
            .header("content-type", "application/json")
            .body(full(serde_json::to_vec(&seen).unwrap())),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Response::builder().body(full("late"))
        }
        "/stream" => {
            // 40 pieces of 16 KiB, no length: chunked to the manager.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
            tokio::spawn(async move {
                for i in 0..40u8 {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(vec![i; 16 * 1024]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Response::builder()
                .header("x-stream", "yes")
                .body(ChanBody(rx).boxed())
        }
        "/endless" => {
            state.streaming.fetch_add(1, Ordering::SeqCst);
            let live = Live(Arc::clone(&state));
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _live = live;
                // Bounded: 1 GiB at most, far more than any test reads.
                for _ in 0..16_384 {
                    if tx
                        .send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Response::builder().body(ChanBody(rx).boxed())
        }
        "/reason" => Response::builder()
            .status(299)
            .extension(hyper::ext::ReasonPhrase::from_static(b"Quite Fine"))
            .body(full("")),
        "/many" => {
            let mut b = Response::builder();
            for i in 0..100 {
                b = b.header(format!("x-h-{i}"), format!("value-{i}"));
            }
            b.header("set-cookie", "a=1; Path=/")
                .header("set-cookie", "b=2; Path=/")
                .header("connection", "x-hop-by-hop")
                .header("x-hop-by-hop", "must not pass")
                .header("keep-alive", "timeout=5")
                .body(full("many"))
        }
        _ => Response::builder()
            .header("x-method", method)
            .header("x-target", target)
            .header("x-len", body.len().to_string())
            .header("x-sha256", sha(&body))
            .header("x-request-chunked", if chunked { "1" } else { "0" })
            .header("x-request-length", length)
            .body(full(body)),
    };
    Ok(resp.unwrap())
}

/// A body fed by a channel.
struct ChanBody(mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx)
    }
}

async fn echo_server() -> (SocketAddr, Arc<EchoState>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let state = Arc::new(EchoState::default());
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let st = Arc::clone(&st);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| echo(r, Arc::clone(&st)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

// ---------------------------------------------------------------------------------------------
// nginx: a non-daemon child with its own prefix, pid and temp paths, killed on drop.

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("nginx is not installed (scripts/test installs Debian's nginx package)");
}

struct Nginx {
    _proc: Proc,
    dir: TempDir,
    port: u16,
}

impl Nginx {
    /// nginx on 127.0.0.1 (a port that was free a moment ago) and on a Unix socket, serving
    /// `www/` and passing `/api/` to `api`.
    async fn start(api: SocketAddr) -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.0.display().to_string();
        let www = dir.0.join("www");
        std::fs::create_dir_all(www.join("dir")).unwrap();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.0.join("tmp").join(t)).unwrap();
        }
        std::fs::write(
            www.join("index.html"),
            "<!doctype html><title>hi</title>hello\n",
        )
        .unwrap();
        std::fs::write(www.join("dir/index.html"), "in dir\n").unwrap();
        std::fs::write(www.join("a b+é.html"), "spaced\n").unwrap();
        std::fs::write(www.join("big.bin"), pattern(16 << 20)).unwrap();
        // A free port: bound, read, released (nginx binds it right after).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ text/html html; application/javascript js; image/png png; application/octet-stream bin; }}
    default_type application/octet-stream;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        listen unix:{d}/nginx.sock;
        root {d}/www;
        location = /moved {{ return 301 /index.html; }}
        location = /empty {{ return 204; }}
        location /api/ {{
            proxy_pass http://{api};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            client_max_body_size 64m;
        }}
    }}
}}
"#
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let proc = Proc::spawn(
            "nginx",
            &nginx_bin(),
            &["-p", &d, "-c", conf_path.to_str().unwrap(), "-e", "stderr"],
            &[],
        );
        // Ready when it accepts.
        eventually("nginx accepts connections", T, || async {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        Nginx {
            _proc: proc,
            dir,
            port,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn socket(&self) -> String {
        format!("unix:{}/nginx.sock", self.dir.0.display())
    }
}

// ---------------------------------------------------------------------------------------------
// The sender: HTTPS requests to the relay on one keep-alive connection.

struct Sender {
    tx: SendRequest<Body>,
    host: String,
    token: String,
}

async fn sender(r: &Relay, send_cs: &str) -> Sender {
    let tls = hyco_io::tls::client_config(Some(Path::new(&r.ca()))).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .max_headers(500)
        .handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let cs = hyco_proto::ConnectionString::parse(send_cs).unwrap();
    let (token, _) = hyco_client::mint_token(&cs, Duration::from_secs(3600))
        .unwrap()
        .unwrap();
    Sender {
        tx,
        host: format!("localhost:{}", r.port),
        token,
    }
}

struct Answer {
    status: u16,
    reason: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Sender {
    fn req(&self, method: &str, target: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(target)
            .header("host", &self.host)
            .header("ServiceBusAuthorization", &self.token)
    }

    async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        tokio::time::timeout(T, async {
            self.tx.ready().await.unwrap();
            self.tx.send_request(req).await.unwrap()
        })
        .await
        .expect("no answer in time")
    }

    async fn call(&mut self, req: Request<Body>) -> Answer {
        let resp = self.send(req).await;
        let status = resp.status().as_u16();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or("").to_owned());
        let headers = resp.headers().clone();
        let body = tokio::time::timeout(T, resp.into_body().collect())
            .await
            .expect("body in time")
            .unwrap()
            .to_bytes();
        Answer {
            status,
            reason,
            headers,
            body,
        }
    }

    async fn get(&mut self, target: &str) -> Answer {
        let req = self.req("GET", target).body(full("")).unwrap();
        self.call(req).await
    }
}

/// A chunked body of `pieces` pieces of `size` bytes of [`pattern`], sent as they are made.
fn chunked_body(pieces: usize, size: usize) -> (Body, Vec<u8>) {
    let all = pattern(pieces * size);
    let (tx, rx) = mpsc::channel(2);
    let copy = all.clone();
    tokio::spawn(async move {
        for c in copy.chunks(size) {
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(c))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    (ChanBody(rx).boxed(), all)
}

/// The manager's view of a hybrid connection (`manager show --json`).
async fn show(m: &Proc, hc: &str) -> serde_json::Value {
    let dir = m.state_dir.to_str().unwrap().to_owned();
    let (code, out, err) = run(
        &bin(),
        &["manager", "show", hc, "--json"],
        &[("HYCO_STATE_DIR", dir.as_str())],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

async fn http_manager(r: &Relay, listen_cs: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--http"];
    args.extend_from_slice(extra);
    let m = r.manager_with("manager", listen_cs, &args, &[]);
    m.wait_line("manager running", T).await;
    m
}

// ---------------------------------------------------------------------------------------------

/// Bodies of 0 B, 64 KiB and 16 MiB with GET, POST and PUT, framed with a length and chunked,
/// both ways; the method, the path below the hybrid connection and the query (encoded
/// characters as sent) arrive as sent; many headers and repeated `Set-Cookie` come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_bodies_of_every_size_reach_the_endpoint_and_come_back() {
    let r = relay("http-bodies").await;
    let (echo, _) = echo_server().await;
    let (l, s) = r.hc("api", &echo.to_string()).await;
    let _m = http_manager(&r, &l, &[]).await;
    r.wait_listeners("api", 1).await;
    let mut c = sender(&r, &s).await;

    for method in ["GET", "POST", "PUT"] {
        for len in [0usize, 64 << 10, 16 << 20] {
            let body = pattern(len);
            let req = c
                .req(method, "/api/echo/x")
                .body(full(body.clone()))
                .unwrap();
            let a = c.call(req).await;
            assert_eq!(
                a.status,
                200,
                "{method} {len}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert_eq!(a.h("x-method"), method);
            assert_eq!(a.h("x-target"), "/echo/x");
            assert_eq!(
                a.h("x-len"),
                len.to_string(),
                "{method} {len}: {:?}",
                a.headers
            );
            assert_eq!(a.h("x-sha256"), sha(&body), "{method} {len}");
            assert_eq!(a.body.len(), len, "{method} {len}");
            assert_eq!(sha(&a.body), sha(&body), "{method} {len}: response body");
        }
    }

    // A chunked request (unknown length) arrives whole; small ones with a length.
    let (body, all) = chunked_body(64, 4096 + 7);
    let a = c
        .call(c.req("POST", "/api/echo/chunked").body(body).unwrap())
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.h("x-sha256"), sha(&all));
    assert_eq!(a.h("x-request-chunked"), "1");
    let (body, all) = chunked_body(3, 100);
    let a = c
        .call(c.req("POST", "/api/echo/small").body(body).unwrap())
        .await;
    assert_eq!(a.h("x-sha256"), sha(&all));
    assert_eq!(
        (a.h("x-request-chunked"), a.h("x-request-length")),
        ("0", "300"),
        "a short body goes with its length"
    );

    // A response without a length (chunked from the endpoint) streams back.
    let a = c.get("/api/stream").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 40 * 16 * 1024);
    assert_eq!(a.h("x-stream"), "yes");
    assert!(a
        .body
        .chunks(16 * 1024)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b as usize == i)));

    // Query strings keep their encoding, empty segments and `+`; the relay's pairs are gone.
    for q in [
        "a=1&b=%2F%3F%26%3D&c=%E2%82%AC&d=x+y&e=",
        "&&x=%00%ff&y=%C3%A9",
        "k=v%20w&sb-hc-undefined&x=%22q%22",
    ] {
        let a = c.get(&format!("/api/echo/q?{q}")).await;
        assert_eq!(a.h("x-target"), format!("/echo/q?{q}"));
    }
    let a = c
        .get(&format!(
            "/api/echo/q?x=1&sb-hc-token={}",
            http_encode(&c.token.clone())
        ))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.h("x-target"),
        "/echo/q?x=1",
        "the relay's token reached the service"
    );
    // The path right at the hybrid connection is `/`.
    let a = c.get("/api?z=1").await;
    assert_eq!(a.h("x-target"), "/?z=1");

    // A custom reason phrase; many headers and repeated Set-Cookie; hop-by-hop ones dropped.
    let a = c.get("/api/reason").await;
    assert_eq!((a.status, a.reason.as_str()), (299, "Quite Fine"));
    let a = c.get("/api/many").await;
    assert_eq!(
        a.status,
        200,
        "{} {}",
        a.reason,
        String::from_utf8_lossy(&a.body)
    );
    for i in 0..100 {
        assert_eq!(a.h(&format!("x-h-{i}")), format!("value-{i}"));
    }
    let cookies: Vec<_> = a.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; Path=/"]);
    assert!(a.headers.get("x-hop-by-hop").is_none());
    assert!(a.headers.get("keep-alive").is_none());
    assert!(a.h("via").contains("localhost"), "the relay's Via");

    // Many request headers arrive (the relay takes at most 100 in all).
    let mut req = c.req("GET", "/api/headers");
    for i in 0..90 {
        req = req.header(format!("x-r-{i}"), format!("v{i}"));
    }
    let a = c.call(req.body(full("")).unwrap()).await;
    assert_eq!(a.status, 200);
    let seen: Vec<(String, String)> = serde_json::from_slice(&a.body).unwrap();
    for i in 0..90 {
        assert!(
            seen.contains(&(format!("x-r-{i}"), format!("v{i}"))),
            "x-r-{i}"
        );
    }
}

fn http_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the service sees of the sender: hop-by-hop headers gone (those `Connection` names
/// too), forwarding headers set from what the relay saw and never taken from the sender, the
/// relay's token absent, `Host` the endpoint's, an application's own `Authorization` kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_sees_forwarding_headers_not_hop_by_hop_ones_nor_the_relays_token() {
    let r = relay("http-headers").await;
    let (echo, _) = echo_server().await;
    let (l, s) = r.hc("hdr", &echo.to_string()).await;
    let _m = http_manager(&r, &l, &[]).await;
    r.wait_listeners("hdr", 1).await;
    let mut c = sender(&r, &s).await;
    let req = c
        .req("POST", "/hdr/headers?q=1")
        .header("connection", "keep-alive, x-private-hop")
        .header("x-private-hop", "secret-hop")
        .header("keep-alive", "timeout=9")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "forged.example")
        .header("x-forwarded-proto", "gopher")
        .header("forwarded", "for=6.6.6.6;host=forged.example")
        .header("authorization", "Bearer the-apps-own")
        .header("x-app", "kept")
        .body(full("abc"))
        .unwrap();
    let a = c.call(req).await;
    assert_eq!(a.status, 200);
    let seen: Vec<(String, String)> = serde_json::from_slice(&a.body).unwrap();
    let get = |n: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for gone in [
        "x-private-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "servicebusauthorization",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(get(gone).is_empty(), "{gone} reached the service: {seen:?}");
    }
    assert!(
        !a.body.windows(10).any(|w| w == &c.token.as_bytes()[..10]),
        "the relay's token reached the service"
    );
    assert_eq!(get("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(get("x-forwarded-proto"), ["https"]);
    assert_eq!(get("x-forwarded-host"), [c.host.as_str()]);
    assert_eq!(
        get("forwarded"),
        [format!("for=127.0.0.1;host=\"{}\";proto=https", c.host).as_str()]
    );
    assert_eq!(get("host"), [echo.to_string().as_str()]);
    assert_eq!(get("authorization"), ["Bearer the-apps-own"]);
    assert_eq!(get("x-app"), ["kept"]);
    assert_eq!(get("content-length"), ["3"]);

    // A relay token sent as Authorization (the relay passes it on when it used another
    // credential) stays with the relay too.
    let req = c
        .req("GET", "/hdr/headers")
        .header("authorization", c.token.clone())
        .body(full(""))
        .unwrap();
    let a = c.call(req).await;
    let seen: Vec<(String, String)> = serde_json::from_slice(&a.body).unwrap();
    assert!(!seen.iter().any(|(k, _)| k == "authorization"), "{seen:?}");
}

/// nginx behind the manager: static pages, a 16 MiB file, 304 on a matching ETag, 204,
/// redirects rewritten to the relay's URL, a chunked upload through nginx to an API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_pages_redirects_and_conditional_requests_through_the_relay() {
    let r = relay("http-nginx").await;
    let (echo, _) = echo_server().await;
    let nginx = Nginx::start(echo).await;
    let (l, s) = r.hc("web", &nginx.addr()).await;
    let _m = http_manager(&r, &l, &[]).await;
    r.wait_listeners("web", 1).await;
    let mut c = sender(&r, &s).await;

    let a = c.get("/web/").await;
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).contains("hello"));
    assert_eq!(a.h("content-type"), "text/html");
    let etag = a.h("etag").to_owned();
    assert!(!etag.is_empty());

    // The relay hands the manager the path decoded (as Azure does); the manager encodes it
    // again for nginx, so a file whose name needs escapes is still found.
    let a = c.get("/web/a%20b+%C3%A9.html").await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], b"spaced\n");

    let a = c.get("/web/big.bin").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 16 << 20);
    assert_eq!(sha(&a.body), sha(&pattern(16 << 20)));

    let a = c
        .call(
            c.req("GET", "/web/index.html")
                .header("if-none-match", &etag)
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 304);
    assert!(a.body.is_empty());
    let a = c.get("/web/empty").await;
    assert_eq!(a.status, 204);

    // nginx's own redirects: an absolute path, and the directory redirect with its absolute
    // URL of the endpoint; both lead back through the relay.
    let a = c.get("/web/moved").await;
    assert_eq!(a.status, 301);
    assert_eq!(
        a.h("location"),
        format!("https://{}/web/index.html", c.host)
    );
    let a = c.get("/web/dir").await;
    assert_eq!(a.status, 301);
    assert_eq!(a.h("location"), format!("https://{}/web/dir/", c.host));
    let a = c.get("/web/dir/").await;
    assert_eq!(a.body.as_ref(), b"in dir\n");

    // HEAD: headers only.
    let a = c
        .call(c.req("HEAD", "/web/big.bin").body(full("")).unwrap())
        .await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_empty());

    // A chunked upload through nginx (which passes it on unbuffered) to the API behind it.
    let (body, all) = chunked_body(256, 4096);
    let a = c
        .call(c.req("PUT", "/web/api/echo/up?n=1").body(body).unwrap())
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.h("x-sha256"), sha(&all));
    assert_eq!(a.h("x-target"), "/api/echo/up?n=1");
}

/// The endpoint too slow → 504 with the reason (`--http-timeout`); the endpoint down → 502
/// with the reason; a body over `--http-max-body` → 413; a sender that leaves mid-response
/// leaves nothing behind: the endpoint's stream ends, the manager's counters and endpoint
/// connections return to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_dead_endpoints_body_caps_and_senders_that_leave() {
    let r = relay("http-errors").await;
    let (echo, state) = echo_server().await;
    let dead = dead_port().await;
    let (l, s) = r.hc("err", &echo.to_string()).await;
    let (ld, sd) = r.hc("down", &dead.to_string()).await;
    let ca = r.ca();
    let m = Proc::spawn(
        "manager",
        &bin(),
        &[
            "manager",
            "run",
            "--ca-file",
            &ca,
            "--connection-string",
            &l,
            "--connection-string",
            &ld,
            "--http",
            "--http-timeout",
            "1",
            "--http-max-body",
            "1000000",
        ],
        &[],
    );
    m.wait_line("manager running", T).await;
    r.wait_listeners("err", 1).await;
    r.wait_listeners("down", 1).await;
    let mut c = sender(&r, &s).await;

    let a = c.get("/err/slow").await;
    assert_eq!(a.status, 504, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.reason.contains("did not answer within 1 s"),
        "{}",
        a.reason
    );

    let mut cd = sender(&r, &sd).await;
    let a = cd.get("/down/x").await;
    assert_eq!(a.status, 502);
    assert!(
        a.reason.contains(&dead.to_string()) && a.reason.to_lowercase().contains("refused"),
        "{}",
        a.reason
    );

    let a = c
        .call(
            c.req("POST", "/err/echo")
                .body(full(pattern(1_000_001)))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 413, "{}", a.reason);
    let a = c
        .call(
            c.req("POST", "/err/echo")
                .body(full(pattern(1_000_000)))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200);

    // A sender reads a little of an endless response and goes away.
    let before = show(&m, "err").await;
    assert_eq!(before["activeConnections"], 0);
    for _ in 0..3 {
        let mut leaver = sender(&r, &s).await;
        let resp = leaver
            .send(leaver.req("GET", "/err/endless").body(full("")).unwrap())
            .await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0;
        while got < 1 << 20 {
            let f = tokio::time::timeout(T, body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got += f.into_data().map(|d| d.len()).unwrap_or(0);
        }
        assert!(state.streaming.load(Ordering::SeqCst) >= 1);
        drop(body);
        drop(leaver);
    }
    eventually("the endpoint's endless responses ended", T, || async {
        state.streaming.load(Ordering::SeqCst) == 0
    })
    .await;
    eventually("the manager's counters are back", T, || async {
        let v = show(&m, "err").await;
        v["activeConnections"] == 0 && v["endpointConnections"].as_i64().unwrap_or(99) <= 2
    })
    .await;
    // And it still serves.
    let a = c.get("/err/echo/after").await;
    assert_eq!(a.status, 200);
}

/// The allow-list binds HTTP mode as it binds tunnels (issue 15 §6, docs/usage.md "Endpoints
/// the manager may dial"): the request of a hybrid connection whose TCP endpoint is off the
/// list is answered 403 with the reason and the endpoint is never dialled; the refusal is said
/// once in the log, not per request; an endpoint on the list is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_binds_http_mode_requests() {
    let r = relay("http-allow").await;
    let (echo, _) = echo_server().await;
    // Off the list: a listener nobody accepts from, to see whether anything dialled it.
    let off = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    off.set_nonblocking(true).unwrap();
    let off_addr = off.local_addr().unwrap();
    let (lok, sok) = r.hc("listed", &echo.to_string()).await;
    let (loff, soff) = r.hc("unlisted", &off_addr.to_string()).await;
    let allow = format!("127.0.0.1:{}", echo.port());
    let ca = r.ca();
    let m = Proc::spawn(
        "manager",
        &bin(),
        &[
            "manager",
            "run",
            "--ca-file",
            &ca,
            "--connection-string",
            &lok,
            "--connection-string",
            &loff,
            "--http",
            "--allow-endpoint",
            &allow,
        ],
        &[],
    );
    m.wait_line("manager running", T).await;
    r.wait_listeners("listed", 1).await;
    r.wait_listeners("unlisted", 1).await;

    let mut c = sender(&r, &sok).await;
    let a = c.get("/listed/echo/x").await;
    assert_eq!(a.status, 200, "{}", a.reason);

    let mut c = sender(&r, &soff).await;
    for _ in 0..3 {
        let a = c.get("/unlisted/x").await;
        assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
        assert!(
            a.reason.contains(&format!(
                "Endpoint {off_addr} is not in this manager's allow-list"
            )),
            "{}",
            a.reason
        );
    }
    // Nothing was dialled: no connection waits in the listener's backlog.
    assert_eq!(
        off.accept().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock),
        "the refused endpoint was dialled"
    );
    assert_eq!(
        m.count("endpoint refused by the allow-list"),
        1,
        "{:#?}",
        m.lines()
    );
}

/// An HTTP-mode request in flight counts against the tunnel limit (`--max-tunnels`) like a
/// tunnel: with a limit of 1 and one endless response streaming, the next request is answered
/// 503 with the reason; once the first sender leaves, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_requests_count_against_the_tunnel_limit() {
    let r = relay("http-limit").await;
    let (echo, state) = echo_server().await;
    let (l, s) = r.hc("lim", &echo.to_string()).await;
    let _m = http_manager(&r, &l, &["--max-tunnels", "1"]).await;
    r.wait_listeners("lim", 1).await;

    let mut first = sender(&r, &s).await;
    let resp = first
        .send(first.req("GET", "/lim/endless").body(full("")).unwrap())
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    tokio::time::timeout(T, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let mut c = sender(&r, &s).await;
    let a = c.get("/lim/echo/x").await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert!(a.reason.contains("tunnel limit"), "{}", a.reason);

    drop(body);
    drop(first);
    eventually("the endless response ended", T, || async {
        state.streaming.load(Ordering::SeqCst) == 0
    })
    .await;
    let mut c = sender(&r, &s).await;
    let mut last = 0;
    for _ in 0..100 {
        last = c.get("/lim/echo/y").await.status;
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, 200, "served again once the first request ended");
}

/// Unix-socket endpoints from the manager's configuration: nginx on a socket in HTTP mode, a
/// Unix echo server in TCP mode (through `hyco forward`); the user metadata's endpoint (a dead
/// port here) is not used for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_endpoints_serve_tunnels_and_http() {
    let r = relay("http-unix").await;
    let (echo, _) = echo_server().await;
    let nginx = Nginx::start(echo).await;
    let dead = dead_port().await.to_string();
    let (lw, sw) = r.hc("usite", &dead).await;
    let (lt, st) = r.hc("utcp", &dead).await;
    // A Unix echo server for the tunnel.
    let sock = nginx.dir.0.join("echo.sock");
    let ul = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = ul.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
                }
            });
        }
    });
    let cfg = nginx.dir.0.join("manager.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[hybrid_connection]]\nconnection_string = \"{lw}\"\nhttp = true\nendpoint = \"{}\"\n\
             [[hybrid_connection]]\nconnection_string = \"{lt}\"\nendpoint = \"unix:{}\"\n",
            nginx.socket(),
            sock.display()
        ),
    )
    .unwrap();
    let ca = r.ca();
    let m = Proc::spawn(
        "manager",
        &bin(),
        &[
            "manager",
            "run",
            "--ca-file",
            &ca,
            "--config",
            cfg.to_str().unwrap(),
            // The operator's own Unix sockets are not bound by the endpoint allow-list.
            "--allow-endpoint",
            "10.0.0.0/8",
        ],
        &[],
    );
    m.wait_line("manager running", T).await;
    r.wait_listeners("usite", 1).await;
    r.wait_listeners("utcp", 1).await;

    let mut c = sender(&r, &sw).await;
    let a = c.get("/usite/index.html").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(String::from_utf8_lossy(&a.body).contains("hello"));
    let a = c.get("/usite/big.bin").await;
    assert_eq!(sha(&a.body), sha(&pattern(16 << 20)));
    let v = show(&m, "usite").await;
    assert_eq!(v["endpoint"], nginx.socket());
    assert_eq!(v["mode"], "http");

    let (_f, port) = r.forward("utcp", &st).await;
    let (a, b, n) = common::echo_roundtrip(port, 1 << 20).await;
    assert_eq!((a, n), (b, 1 << 20));
    let v = show(&m, "utcp").await;
    assert_eq!(v["mode"], "tcp");

    // A hybrid connection without HTTP answers HTTP-mode requests 501, as before.
    let mut c = sender(&r, &st).await;
    let a = c.get("/utcp/x").await;
    assert_eq!(a.status, 501);
}

/// HTTP mode switched on by the hybrid connection's user metadata (`admin hc create --http`),
/// and by `manager add --http` on a running manager (kept in its state file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_from_the_metadata_and_from_manager_add() {
    let r = relay("http-meta").await;
    let (echo, _) = echo_server().await;
    let (code, _, err) = r
        .admin(&[
            "hc",
            "create",
            "meta",
            "--endpoint",
            &echo.to_string(),
            "--http",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, lm, _) = r
        .admin(&[
            "rule",
            "create",
            "l",
            "--hc",
            "meta",
            "--rights",
            "listen,send",
        ])
        .await;
    let lm = lm.trim().to_owned();
    let (la, sa) = r.hc("added", &echo.to_string()).await;
    let m = r.manager_with("manager", &lm, &[], &[]);
    m.wait_line("manager running", T).await;
    r.wait_listeners("meta", 1).await;
    let mut c = sender(&r, &lm).await;
    let a = c.get("/meta/echo/m?x=1").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.h("x-target"), "/echo/m?x=1");

    let dir = m.state_dir.to_str().unwrap().to_owned();
    let (code, _, err) = run(
        &bin(),
        &["manager", "add", &la, "--http"],
        &[("HYCO_STATE_DIR", dir.as_str())],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    r.wait_listeners("added", 1).await;
    let mut c = sender(&r, &sa).await;
    let a = c.get("/added/echo/a").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let state = std::fs::read_to_string(m.state_dir.join("manager-state.json")).unwrap();
    assert!(state.contains("\"http\": true"), "{state}");
}
