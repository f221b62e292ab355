//! Issue 15: what an independent attack test broke, as fixed inputs with exact outcomes.
//! §1 numbers from the network never panic (token `se` at the ends of its range on listen,
//! connect, renewToken and HTTP mode); §2 a listener task that panics leaves no ghost (registry,
//! listener cap, gauges, hybrid connection deletion); §7 refusals name their real cause.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{eventually, now, series, start, status_get, Env, T};

use std::sync::Arc;
use std::time::Duration;

use hyco_io::ws::{Connected, Message};
use hyco_proto::control::{ListenerCommand, RenewTokenCommand, ResponseCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Token expiries at the ends of the range, and whether a token with each is valid now.
/// `now` and `now-1` are expired (expired when `now >= se`, protocol.md §3.3).
fn expiries() -> Vec<(&'static str, u64, bool)> {
    let n = now();
    vec![
        ("0", 0, false),
        ("1", 1, false),
        ("now-1", n - 1, false),
        ("now", n, false),
        ("now+1", n + 1, true),
        ("i64::MAX", i64::MAX as u64, true),
        ("u64::MAX", u64::MAX, true),
    ]
}

/// Checks one outcome for an expiry; `true` asks for a retry: `se = now+1` is valid only
/// within the second it was made in, so a 401 for it after the clock moved on is tried again.
fn retry(label: &str, valid: bool, r: Result<(), u16>, made: u64) -> bool {
    match r {
        Ok(()) if valid => false,
        Err(401) if !valid => false,
        Err(401) if label == "now+1" && now() > made => true,
        other => panic!(
            "se = {label}: expected {}, got {other:?}",
            if valid { "success" } else { "401" }
        ),
    }
}

/// Runs `$body` (a `Result<(), u16>` using `$se`) for every expiry of [`expiries`], at most
/// three times each (see [`retry`]).
macro_rules! each_expiry {
    (|$se:ident| $body:expr) => {
        for (label, first, valid) in expiries() {
            let mut $se = first;
            let mut tries = 0;
            loop {
                let made = now();
                let r: Result<(), u16> = $body;
                tries += 1;
                if !retry(label, valid, r, made) {
                    break;
                }
                assert!(tries < 3, "se = {label}: the clock kept moving");
                $se = now() + 1;
            }
        }
    };
}

fn listen_url(env: &Env, id: &str) -> String {
    format!(
        "wss://localhost:{}/$hc/hc1?sb-hc-action=listen&sb-hc-id={id}",
        env.port
    )
}

async fn listen_with(env: &Env, id: &str, token: &str) -> Result<Connected, u16> {
    env.connector
        .connect(&listen_url(env, id), &[("ServiceBusAuthorization", token)])
        .await
        .map_err(|e| e.status().unwrap_or(0))
}

async fn next_text(l: &mut Connected) -> Result<String, String> {
    loop {
        match tokio::time::timeout(T, l.ws.recv()).await {
            Ok(Ok(Message::Text(t))) => return Ok(t),
            Ok(Ok(Message::Binary(_))) => continue,
            Ok(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}")),
            Ok(Err(e)) => return Err(format!("{e}")),
            Err(_) => return Err("nothing within 10 s".into()),
        }
    }
}

/// A sender with a token expiring at `se` (only to listener `id`), accepted by `l`: Ok when
/// the tunnel opened, or the sender's refusal status.
async fn connect_through(env: &Arc<Env>, l: &mut Connected, id: &str, se: u64) -> Result<(), u16> {
    let t = env.token(Some("hc1"), se);
    let (e2, id2) = (Arc::clone(env), id.to_owned());
    let mut sender = tokio::spawn(async move {
        e2.connector
            .connect(
                &e2.url("hc1", "connect", ""),
                &[
                    ("ServiceBusAuthorization", &t),
                    ("Microsoft-Relay-AllowedListeners", &id2),
                ],
            )
            .await
            .map(|_| ())
            .map_err(|e| e.status().unwrap_or(0))
    });
    // A refused sender never reaches the listener.
    let accept = tokio::select! {
        r = next_text(l) => r,
        done = &mut sender => return done.unwrap(),
    };
    let accept = match ListenerCommand::parse(&accept.expect("the listener's channel is alive")) {
        Ok(ListenerCommand::Accept(a)) => a,
        other => panic!("expected accept, got {other:?}"),
    };
    env.connector.connect(&accept.address, &[]).await.unwrap();
    tokio::time::timeout(T, sender).await.unwrap().unwrap()
}

/// After a renewToken: the relay's Close 1008, which must name the expiry (401), or, when the
/// renewal was taken, a sender served through the channel (Ok).
async fn after_renewal(r: &mut Connected, env: &Arc<Env>, id: &str) -> Result<(), u16> {
    let t = env.token(Some("hc1"), now() + 600);
    let (e2, id2) = (Arc::clone(env), id.to_owned());
    let sender = tokio::spawn(async move {
        e2.connector
            .connect(
                &e2.url("hc1", "connect", ""),
                &[
                    ("ServiceBusAuthorization", &t),
                    ("Microsoft-Relay-AllowedListeners", &id2),
                ],
            )
            .await
            .map(|_| ())
    });
    let accept = match tokio::time::timeout(T, r.ws.recv()).await.unwrap() {
        Ok(Message::Close(Some((1008, reason)))) => {
            sender.abort();
            assert_eq!(reason, "The token is expired.");
            return Err(401);
        }
        Ok(Message::Text(t)) => match ListenerCommand::parse(&t) {
            Ok(ListenerCommand::Accept(a)) => a,
            other => panic!("expected accept, got {other:?}"),
        },
        other => panic!("expected an accept or Close 1008, got {other:?}"),
    };
    env.connector.connect(&accept.address, &[]).await.unwrap();
    tokio::time::timeout(T, sender)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    Ok(())
}

/// An HTTP-mode request with a token expiring at `se`, answered 200 by `l`.
async fn request_through(env: &Arc<Env>, l: &mut Connected, se: u64) -> Result<(), u16> {
    let t = env.token(Some("hc1"), se);
    let e2 = Arc::clone(env);
    let mut sender = tokio::spawn(async move {
        e2.connector
            .https_request(
                http::Method::GET,
                &format!("https://localhost:{}/hc1/x", e2.port),
                &[("ServiceBusAuthorization", &t)],
                bytes::Bytes::new(),
                1 << 20,
            )
            .await
            .unwrap()
            .status
    });
    let req = tokio::select! {
        r = next_text(l) => r,
        done = &mut sender => return Err(done.unwrap()),
    };
    let req = match ListenerCommand::parse(&req.expect("the listener's channel is alive")) {
        Ok(ListenerCommand::Request(r)) => r,
        other => panic!("expected request, got {other:?}"),
    };
    let resp = ListenerCommand::Response(ResponseCommand {
        request_id: req.id,
        status_code: 200,
        status_description: None,
        response_headers: None,
        body: false,
    })
    .to_json();
    l.ws.send_text(&resp).await.unwrap();
    match tokio::time::timeout(T, sender).await.unwrap().unwrap() {
        200 => Ok(()),
        s => Err(s),
    }
}

/// Issue 15 §1: a validly signed token with `se` = 2^64-1 used to panic the control-channel
/// task ("overflow when adding duration to instant"), on listen and on renewToken. Every
/// expiry at the ends of the range gets its exact answer on every path, and the relay keeps
/// serving.
#[tokio::test]
async fn token_expiries_at_the_ends_of_the_range_get_exact_answers_everywhere() {
    let env = Arc::new(start("expiries", |_| {}).await);

    // Listen: 101 and a working channel, or 401.
    each_expiry!(|se| {
        let id = format!("listen-{se}");
        match listen_with(&env, &id, &env.token(Some("hc1"), se)).await {
            Ok(mut l) => connect_through(&env, &mut l, &id, now() + 600).await,
            Err(s) => Err(s),
        }
    });

    // Connect and HTTP mode, to a listener with an ordinary token.
    let mut l = listen_with(&env, "steady", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    each_expiry!(|se| connect_through(&env, &mut l, "steady", se).await);
    each_expiry!(|se| request_through(&env, &mut l, se).await);

    // renewToken: the channel goes on (and serves), or closes 1008 naming the cause.
    each_expiry!(|se| {
        let id = format!("renew-{se}");
        let mut r = listen_with(&env, &id, &env.token(Some("hc1"), now() + 600))
            .await
            .unwrap();
        let renew = ListenerCommand::RenewToken(RenewTokenCommand {
            token: env.token(Some("hc1"), se),
        })
        .to_json();
        r.ws.send_text(&renew).await.unwrap();
        after_renewal(&mut r, &env, &id).await
    });

    // Still serving: the steady listener takes a sender, and a new listener registers.
    connect_through(&env, &mut l, "steady", now() + 600)
        .await
        .unwrap();
    let mut fresh = listen_with(&env, "fresh", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    connect_through(&env, &mut fresh, "fresh", now() + 600)
        .await
        .unwrap();
}

async fn listener_count(env: &Env, hc: &str) -> u64 {
    let (s, body) = env
        .admin(http::Method::GET, &format!("/hybridconnections/{hc}"), "")
        .await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["listenerCount"].as_u64().unwrap()
}

/// Issue 15 §2: the panic of §1 left a "ghost" listener, registered for good; 25 ghosts made
/// the 26th listener 403 MaximumListenersPerEndpoint, and neither key regeneration nor deleting
/// the hybrid connection removed them. With the relay's test hook, 25 control-channel tasks
/// panic right after registering: the registry, the listener cap and the gauge are as before,
/// and a 26th listener is served.
#[tokio::test]
async fn panicking_listener_tasks_leave_no_ghost() {
    let env = Arc::new(
        start("ghosts", |c| {
            c.panic_listener_prefix = Some("ghost-".into())
        })
        .await,
    );
    let gauge = "hyco_active_listeners";
    assert_eq!(
        series(&status_get(&env, "/metrics").await, gauge, "hc1"),
        0.0
    );
    for i in 0..25 {
        let t = env.token(Some("hc1"), now() + 600);
        let mut g = listen_with(&env, &format!("ghost-{i}"), &t).await.unwrap();
        // The task panicked: the channel ends without a command.
        assert!(next_text(&mut g).await.is_err());
    }
    eventually(|| async { listener_count(&env, "hc1").await == 0 }).await;
    assert_eq!(
        series(&status_get(&env, "/metrics").await, gauge, "hc1"),
        0.0
    );

    // The 26th listener registers and is served.
    let mut l = listen_with(&env, "real", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    connect_through(&env, &mut l, "real", now() + 600)
        .await
        .unwrap();
    assert_eq!(listener_count(&env, "hc1").await, 1);
    assert_eq!(
        series(&status_get(&env, "/metrics").await, gauge, "hc1"),
        1.0
    );

    // Deleting the hybrid connection takes its listeners out at once; one created again under
    // the same name starts empty.
    let (s, _) = env
        .admin(http::Method::DELETE, "/hybridconnections/hc1", "")
        .await;
    assert_eq!(s, 204);
    let (s, _) = env
        .admin(http::Method::PUT, "/hybridconnections/hc1", "{}")
        .await;
    assert_eq!(s, 201);
    assert_eq!(listener_count(&env, "hc1").await, 0);
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap() {
        Ok(Message::Close(Some((1001, _)))) => {}
        other => panic!("expected Close 1001, got {other:?}"),
    }
    drop(l);
    eventually(|| async { series(&status_get(&env, "/metrics").await, gauge, "hc1") == 0.0 }).await;
}

/// A raw request over TLS; the whole response as text (the connection is closed after it).
async fn raw(env: &Env, head: &[u8]) -> String {
    let mut s = common::tls(env).await;
    s.write_all(head).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Issue 15 §7: a `ServiceBusAuthorization` header that is not text was answered "A
/// SharedAccessSignature token is required"; it is refused for what it is, on listen, on
/// HTTP mode and on the admin API.
#[tokio::test]
async fn a_credential_header_that_is_not_text_is_refused_as_such() {
    let env = start("not-text", |_| {}).await;
    let expected = "The ServiceBusAuthorization header is not valid text; a SharedAccessSignature token is printable ASCII.";
    for (what, line) in [
        (
            "listen",
            "GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        ("http mode", "GET /hc1/x HTTP/1.1\r\n"),
        ("admin", "GET /$hyco/v1/hybridconnections HTTP/1.1\r\n"),
    ] {
        let mut head = line.as_bytes().to_vec();
        head.extend_from_slice(b"Host: localhost\r\nConnection: close\r\n");
        head.extend_from_slice(b"ServiceBusAuthorization: SharedAccessSignature sr=\xff\xfe\r\n\r\n");
        let resp = raw(&env, &head).await;
        assert!(resp.starts_with("HTTP/1.1 401 "), "{what}: {resp}");
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {resp}"));
        assert_eq!(v["error"]["message"], expected, "{what}");
    }
}

/// Issue 15 §7: the control channel's fragment cap closed with 1009 "frame of 1 bytes exceeds
/// the limit"; the Close names the fragment cap.
#[tokio::test]
async fn the_fragment_cap_is_named_when_it_closes_a_control_channel() {
    let env = Arc::new(start("fragments", |_| {}).await);
    let id = "fragmented";
    let mut l = listen_with(&env, id, &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    for i in 0..65 {
        l.ws.send_part(true, i == 0, false, b"x").await.unwrap();
    }
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap() {
        Ok(Message::Close(Some((code, reason)))) => {
            assert_eq!(code, 1009);
            assert_eq!(
                reason,
                "message in more than 64 fragments exceeds the fragment limit"
            );
        }
        other => panic!("expected Close 1009, got {other:?}"),
    }
    let mut again = listen_with(&env, "after", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    connect_through(&env, &mut again, "after", now() + 600)
        .await
        .unwrap();
}

/// One raw admin call with the root token; (status, error message or body).
async fn raw_admin(env: &Env, method: &str, path: &str, body: &str) -> (u16, String) {
    let t = env.token(None, now() + 600);
    let head = format!(
        "{method} /$hyco/v1{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: {t}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = raw(env, head.as_bytes()).await;
    let status = resp
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {resp}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned());
    (status, msg)
}

/// Issue 15 §3, the relay's side: `..` was accepted as a rule name (201). Path segments are
/// decoded once and must be names by Azure's rules; `.` and `..` never are, raw or encoded,
/// wherever they stand. An entity rule named like a namespace rule (and the reverse) is 409.
#[tokio::test]
async fn admin_names_are_segments_by_azures_rules() {
    let env = start("admin-names", |_| {}).await;
    let rights = r#"{"rights":["Listen"]}"#;
    let (s, m) = raw_admin(&env, "PUT", "/authorizationrules/victim", rights).await;
    assert_eq!(s, 201, "{m}");
    let rule_rule = "a rule name is 1 to 50 letters, digits, '.', '-' or '_', starting and ending with a letter or digit";
    let (s, m) = raw_admin(
        &env,
        "PUT",
        "/hybridconnections/hc1/authorizationrules/..",
        rights,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        m,
        format!("Invalid rule name '..': '..' is a dot segment, never a name: {rule_rule}.")
    );
    for (method, path) in [
        ("PUT", "/hybridconnections/hc1/authorizationrules/%2E%2E"),
        ("PUT", "/authorizationrules/."),
        ("DELETE", "/hybridconnections/hc1/authorizationrules/.."),
        ("GET", "/hybridconnections/hc1/authorizationrules/%2e"),
        ("POST", "/authorizationrules/../listkeys"),
        ("DELETE", "/hybridconnections/../authorizationrules/victim"),
        (
            "DELETE",
            "/hybridconnections/%2E%2E/authorizationrules/victim",
        ),
        ("GET", "/hybridconnections/.."),
        ("DELETE", "/hybridconnections/hc1%2F.."),
    ] {
        let (s, m) = raw_admin(&env, method, path, rights).await;
        assert_eq!(s, 400, "{method} {path}: {m}");
        assert!(
            m.contains("is a dot segment, never a name"),
            "{method} {path}: {m}"
        );
    }
    for name in [
        "a%2Fb",
        "a%3Fb",
        "a%23b",
        "a%20b",
        "%C3%A9",
        "-a",
        "a.",
        &"a".repeat(51),
    ] {
        let (s, m) = raw_admin(
            &env,
            "PUT",
            &format!("/hybridconnections/hc1/authorizationrules/{name}"),
            rights,
        )
        .await;
        assert_eq!(s, 400, "{name}: {m}");
        assert!(m.ends_with(&format!("{rule_rule}.")), "{name}: {m}");
    }
    let (s, m) = raw_admin(
        &env,
        "PUT",
        "/hybridconnections/hc1/authorizationrules/%FF",
        rights,
    )
    .await;
    assert_eq!(
        (s, m.as_str()),
        (
            400,
            "Bad path: a path segment is not UTF-8 once percent-decoded."
        )
    );
    for name in ["a%20b", "a%3Fb", "a-", "%C3%A9"] {
        let (s, m) = raw_admin(&env, "PUT", &format!("/hybridconnections/{name}"), "{}").await;
        assert_eq!(s, 400, "{name}: {m}");
        assert!(
            m.contains("a hybrid connection name is 1 to 260"),
            "{name}: {m}"
        );
    }
    // Nothing above touched hc1, its (no) rules, or the namespace rule `victim`.
    let (s, _) = raw_admin(&env, "GET", "/hybridconnections/hc1", "").await;
    assert_eq!(s, 200);
    let (s, m) = raw_admin(&env, "GET", "/hybridconnections/hc1/authorizationrules", "").await;
    assert_eq!((s, m.as_str()), (200, r#"{"value":[]}"#));
    let (s, _) = raw_admin(&env, "GET", "/authorizationrules/victim", "").await;
    assert_eq!(s, 200);

    // A name with '/' is one segment, %2F-encoded.
    let (s, m) = raw_admin(&env, "PUT", "/hybridconnections/db%2Fprod", "{}").await;
    assert_eq!(s, 201, "{m}");
    let (s, m) = raw_admin(&env, "GET", "/hybridconnections/db%2Fprod", "").await;
    assert_eq!(s, 200, "{m}");
    assert!(m.contains(r#""name":"db/prod""#), "{m}");

    // Same rule name in two scopes: refused either way.
    let (s, m) = raw_admin(
        &env,
        "PUT",
        "/hybridconnections/hc1/authorizationrules/RootManageSharedAccessKey",
        rights,
    )
    .await;
    assert_eq!(s, 409);
    assert_eq!(m, "The rule name 'RootManageSharedAccessKey' is taken by a namespace rule; tokens name their rule only by name, so choose another.");
    let (s, m) = raw_admin(
        &env,
        "PUT",
        "/hybridconnections/hc1/authorizationrules/app",
        rights,
    )
    .await;
    assert_eq!(s, 201, "{m}");
    let (s, m) = raw_admin(&env, "PUT", "/authorizationrules/APP", rights).await;
    assert_eq!(s, 409);
    assert_eq!(m, "The rule name 'APP' is taken by a rule of hybrid connection 'hc1'; tokens name their rule only by name, so choose another.");
    // Changing the rights of an existing rule is not a new name.
    let (s, m) = raw_admin(
        &env,
        "PUT",
        "/hybridconnections/hc1/authorizationrules/app",
        r#"{"rights":["Send"]}"#,
    )
    .await;
    assert_eq!(s, 200, "{m}");
}

/// A `redis-server` on a Unix socket in a temporary folder (Debian's package; scripts/test
/// installs it), stopped when dropped.
struct Redis {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Redis {
    fn start(tag: &str) -> Redis {
        let dir = std::env::temp_dir().join(format!("hyco-trust-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is not installed (Debian package redis-server; scripts/test installs it)");
        let redis = Redis { child, dir };
        // Ready when it answers PING (at most 5 s).
        for _ in 0..100 {
            if redis.client().get_connection().is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not come up within 5 s");
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Entries of a hybrid connection's listener directory.
    fn directory_len(&self, hc: &str) -> u64 {
        let mut c = self.client().get_connection().unwrap();
        redis::cmd("HLEN")
            .arg(format!("hyco:default:lst:{hc}"))
            .query(&mut c)
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Issue 15 §2 in a cluster: a listener task that panics leaves no entry in the shared listener
/// directory (other nodes would route senders to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_listener_tasks_leave_no_directory_entry() {
    let redis = Redis::start("directory");
    let url = redis.url();
    let env = Arc::new(
        start("ghosts-cluster", |c| {
            c.cluster = Some(hyco_relay::cluster::ClusterConfig::new(
                url,
                "n1",
                c.public_host.clone(),
            ));
            c.panic_listener_prefix = Some("ghost-".into());
        })
        .await,
    );
    let mut l = listen_with(&env, "real", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    for i in 0..5 {
        let t = env.token(Some("hc1"), now() + 600);
        let mut g = listen_with(&env, &format!("ghost-{i}"), &t).await.unwrap();
        assert!(next_text(&mut g).await.is_err());
    }
    eventually(|| async { listener_count(&env, "hc1").await == 1 }).await;
    // The directory writer applies ups and downs in order, so once the entry of a listener
    // registered after the ghosts is there, their ups and downs are applied too.
    let mut marker = listen_with(&env, "marker", &env.token(Some("hc1"), now() + 600))
        .await
        .unwrap();
    eventually(|| async { redis.directory_len("hc1") == 2 }).await;
    connect_through(&env, &mut l, "real", now() + 600)
        .await
        .unwrap();
    connect_through(&env, &mut marker, "marker", now() + 600)
        .await
        .unwrap();
    drop((l, marker));
    eventually(|| async { redis.directory_len("hc1") == 0 }).await;
}
