//! The relay against raw protocol peers, in-process: what Microsoft's clients rely on
//! (protocol.md §2–§5) and the refusals of attacks.md that belong to the core.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{eventually, now, series, start, status_get, Env, T};

use std::sync::Arc;
use std::time::Duration;

use hyco_io::ws::{ConnectError, Connected, Connector, Message};
use hyco_proto::control::ListenerCommand;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn next_accept(l: &mut Connected) -> hyco_proto::control::AcceptCommand {
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Accept(a) => a,
            other => panic!("expected accept, got {other:?}"),
        },
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn accept_carries_headers_and_the_rendezvous_is_single_use() {
    let env = start("accept", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let env = Arc::new(env);
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        let mut s = e2
            .connect(
                "hc1",
                &[("X-Tenant", "blue"), ("Sec-WebSocket-Protocol", "chat.v2")],
            )
            .await
            .unwrap();
        assert_eq!(
            s.protocol.as_deref(),
            Some("chat.v2"),
            "listener's sub-protocol echoed"
        );
        s.ws.write_all(b"ping").await.unwrap();
        s.ws.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.ws.read_to_end(&mut back).await.unwrap();
        back
    });
    let a = next_accept(&mut l).await;
    let h = |n: &str| {
        a.connect_headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h("X-Tenant").as_deref(), Some("blue"));
    assert!(
        h("Sec-WebSocket-Key").is_some() && h("Sec-WebSocket-Version").as_deref() == Some("13")
    );
    assert!(h("Host").is_some());
    assert!(
        h("Servicebusauthorization").is_none() && h("ServiceBusAuthorization").is_none(),
        "credentials never forwarded"
    );
    assert!(!a.address.contains("sb-hc-token"));
    assert!(
        a.address.contains("app=1&"),
        "the sender's query is kept: {}",
        a.address
    );
    assert_eq!(a.remote_endpoint.as_ref().unwrap().address, "127.0.0.1");
    let mut r = env
        .connector
        .connect(&a.address, &[("Sec-WebSocket-Protocol", "chat.v2")])
        .await
        .unwrap();
    let mut got = Vec::new();
    r.ws.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    r.ws.write_all(b"pong").await.unwrap();
    r.ws.shutdown().await.unwrap();
    assert_eq!(sender.await.unwrap(), b"pong");
    // B1: the address works once.
    let again = env.connector.connect(&a.address, &[]).await.unwrap_err();
    assert_eq!(again.status(), Some(403));
    // B2: a made-up capability.
    let forged = a.address.split("sb-hc-rv=").next().unwrap().to_owned()
        + "sb-hc-rv=00000000000000000000000000000000";
    assert_eq!(
        env.connector
            .connect(&forged, &[])
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
}

#[tokio::test]
async fn reject_reaches_the_sender_and_the_listener_gets_410() {
    let env = Arc::new(start("reject", |_| {}).await);
    let mut l = env.listen("hc1").await;
    for (status, reason, node_style, expect_status) in [
        (418u16, "I'm a teapot today", false, 418u16),
        (404, "no such room", true, 404),
        (200, "fake success", false, 502),
    ] {
        let e2 = Arc::clone(&env);
        let sender =
            tokio::spawn(async move { e2.connect("hc1", &[]).await.map(|_| ()).unwrap_err() });
        let a = next_accept(&mut l).await;
        let url = if node_style {
            format!(
                "{}&statusCode={status}&statusDescription={}",
                a.address,
                reason.replace(' ', "%20")
            )
        } else {
            hyco_proto::address::reject_url(&a.address, status, reason)
        };
        let ans = env.connector.connect(&url, &[]).await.unwrap_err();
        assert_eq!(ans.status(), Some(410), "reject delivered");
        match sender.await.unwrap() {
            ConnectError::Rejected {
                status, reason: r, ..
            } => {
                assert_eq!(status, expect_status);
                assert_eq!(r, reason);
            }
            other => panic!("{other}"),
        }
    }
}

#[tokio::test]
async fn a_listener_that_never_answers_gives_504() {
    let env = start("timeout", |c| {
        c.limits.rendezvous_timeout = Duration::from_secs(1)
    })
    .await;
    let mut l = env.listen("hc1").await;
    let (e, _) = tokio::join!(env.connect("hc1", &[]), next_accept(&mut l));
    let e = e.map(|_| ()).unwrap_err();
    assert_eq!(e.status(), Some(504), "{e}");
}

#[tokio::test]
async fn rights_audience_and_existence_are_checked_in_order() {
    let env = start("auth", |_| {}).await;
    let (sn, sk) = env.rule("hc1", "send-only", r#"["Send"]"#).await;
    let send_token = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", Some("hc1")),
        &sn,
        &sk,
        now() + 600,
    );
    // A4: Send-only token cannot listen, and nothing is registered.
    let e = env
        .connector
        .connect(
            &env.url("hc1", "listen", ""),
            &[("ServiceBusAuthorization", send_token.as_str())],
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert_eq!(
        env.connect("hc1", &[])
            .await
            .map(|_| ())
            .unwrap_err()
            .status(),
        Some(404),
        "still no listener"
    );
    // A1: a token for hc1 does not open hc10.
    let t = env.token(Some("hc1"), now() + 600);
    let e = env.listen_refused("hc10", &t).await;
    assert_eq!(e.status(), Some(401), "{e}");
    // A8: a bad token to a missing HC is 401, like to an existing one; 404 only after auth.
    let bad = t.replace("sig=", "sig=AA");
    for hc in ["hc1", "missing"] {
        let e = env.listen_refused(hc, &bad).await;
        assert_eq!(e.status(), Some(401), "{hc}: {e}");
    }
    let root = env.token(None, now() + 600);
    let e = env.listen_refused("missing", &root).await;
    assert_eq!(e.status(), Some(404), "{e}");
    // The token may come in the query instead, form-encoded (.NET style).
    let q = format!(
        "sb-hc-token={}&",
        form_urlencoded::byte_serialize(root.as_bytes()).collect::<String>()
    );
    env.connector
        .connect(&env.url("hc1", "listen", &q), &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn control_channel_closes_1008_on_expiry_unless_renewed() {
    let env = start("renew", |c| c.limits.token_grace = Duration::from_secs(1)).await;
    let short = env.token(Some("hc1"), now() + 2);
    let mut quiet = env.listen_with_token("hc1", &short).await;
    let mut renewing = env.listen_with_token("hc1", &short).await;
    let fresh = env.token(Some("hc1"), now() + 600);
    let renew =
        ListenerCommand::RenewToken(hyco_proto::control::RenewTokenCommand { token: fresh })
            .to_json();
    renewing.ws.send_text(&renew).await.unwrap();
    match tokio::time::timeout(T, quiet.ws.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Close(Some((code, _))) => assert_eq!(code, 1008),
        other => panic!("expected 1008, got {other:?}"),
    }
    // The renewed one is still listed as a listener.
    let (s, body) = env
        .admin(http::Method::GET, "/hybridconnections/hc1", "")
        .await;
    assert_eq!(s, 200);
    assert!(body.contains(r#""listenerCount":1"#), "{body}");
    // An invalid renewal closes at once with 1008.
    let bad = ListenerCommand::RenewToken(hyco_proto::control::RenewTokenCommand {
        token: "SharedAccessSignature sr=x&sig=AA%3D&se=1&skn=k".into(),
    })
    .to_json();
    renewing.ws.send_text(&bad).await.unwrap();
    match tokio::time::timeout(T, renewing.ws.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Close(Some((code, _))) => assert_eq!(code, 1008),
        other => panic!("expected 1008, got {other:?}"),
    }
}

/// A listener that keeps answering pings when its token runs out gets the relay's 1008, can
/// answer it, and then sees the connection end cleanly (close_notify, FIN). A relay that let the
/// socket go right after its Close met the pongs still on their way with a TCP reset, and a
/// listener that met the reset before reading the Close saw an abnormal closure instead (hyco-ws
/// reported 1006).
#[tokio::test]
async fn expiry_close_reaches_a_listener_busy_with_pongs_and_the_connection_ends_cleanly() {
    let env = start("expiry-clean", |c| {
        c.limits.token_grace = Duration::from_secs(1);
        c.limits.ping_interval = Duration::from_millis(2);
    })
    .await;
    let short = env.token(Some("hc1"), now() + 1);
    let mut l = env.listen_with_token("hc1", &short).await;
    // Reading answers each ping with a pong; the Close comes after expiry plus grace.
    let close = match tokio::time::timeout(T, l.ws.recv())
        .await
        .expect("closed within the test's bound")
    {
        Ok(Message::Close(c)) => c,
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => panic!("the control channel failed before its Close: {e}"),
    };
    assert_eq!(close.map(|(code, _)| code), Some(1008));
    // A little later, as a busy client would: the relay is still there to read the answer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    l.ws.send_close(1000, "").await.expect("our Close went out");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(T, l.ws.get_mut().read_to_end(&mut rest))
        .await
        .expect("the relay ended the connection");
    assert!(
        end.is_ok(),
        "the connection ended with {end:?}, not cleanly"
    );
    // Had our Close (or a pong) reached a socket already let go, the kernel would have
    // answered with a reset by now, and the next write on the connection would fail.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probe = l.ws.get_mut().get_mut().0.write_all(&[0]).await;
    assert!(probe.is_ok(), "the relay reset the connection: {probe:?}");
}

#[tokio::test]
async fn deleting_a_hybrid_connection_closes_its_listeners_with_1001() {
    let env = start("delete", |_| {}).await;
    let mut l = env.listen("hc10").await;
    let (s, _) = env
        .admin(http::Method::DELETE, "/hybridconnections/hc10", "")
        .await;
    assert_eq!(s, 204);
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Close(Some((code, _))) => assert_eq!(code, 1001),
        other => panic!("expected 1001, got {other:?}"),
    }
    let (s, body) = env
        .admin(http::Method::DELETE, "/hybridconnections/hc10", "")
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(body.contains(r#""error""#), "{body}");
}

#[tokio::test]
async fn entity_get_with_a_listen_key_shows_metadata_and_live_listeners() {
    let env = start("entity", |_| {}).await;
    let (ln, lk) = env.rule("hc1", "listen-only", r#"["Listen"]"#).await;
    let _l = env.listen("hc1").await;
    let t = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", Some("hc1")),
        &ln,
        &lk,
        now() + 600,
    );
    let a = env
        .connector
        .https_request(
            http::Method::GET,
            &format!("https://localhost:{}/hc1?api-version=2016-07", env.port),
            &[("Authorization", t.as_str())],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let d = hyco_proto::entity::parse_entity_atom(&String::from_utf8_lossy(&a.body)).unwrap();
    assert_eq!(d.listener_count, 1);
    assert_eq!(
        hyco_proto::entity::parse_endpoint_metadata(d.user_metadata.as_deref().unwrap())
            .unwrap()
            .to_string(),
        "127.0.0.1:9"
    );
}

/// Sends a raw request head over TLS and returns the status line.
async fn raw(env: &Env, head: &str) -> String {
    let mut s = common::tls(env).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn bad_upgrades_get_clear_statuses_and_disturb_nothing() {
    let env = start("bad", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let up = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n")
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        (
            up(
                "/$hc/hc1?sb-hc-action=connect",
                &format!("{key}Sec-WebSocket-Version: 8\r\n"),
            ),
            "426",
        ),
        (
            up(
                "/$hc/hc1?sb-hc-action=connect",
                "Sec-WebSocket-Version: 13\r\n",
            ),
            "400",
        ),
        (
            up("/$hc/hc1", &format!("{key}Sec-WebSocket-Version: 13\r\n")),
            "400",
        ),
        (
            up(
                "/$hc//hc1?sb-hc-action=listen",
                &format!("{key}Sec-WebSocket-Version: 13\r\n"),
            ),
            "400",
        ),
        (
            up(
                "/$hc/hc1?sb-hc-action=fly",
                &format!("{key}Sec-WebSocket-Version: 13\r\n"),
            ),
            "400",
        ),
        (
            up(
                "/$hc/hc1?sb-hc-action=listen",
                &format!("{key}Sec-WebSocket-Version: 13\r\nServiceBusAuthorization: Bearer x\r\n"),
            ),
            "401",
        ),
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
            "404",
        ),
        (
            format!(
                "GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            ),
            "431",
        ),
    ];
    for (head, want) in &cases {
        let line = raw(&env, head).await;
        assert!(
            line.contains(want),
            "{} -> {line}",
            head.lines().next().unwrap()
        );
    }
    // The listener that was connected all along still works.
    let e2 = Arc::new(env);
    let e3 = Arc::clone(&e2);
    let s = tokio::spawn(async move { e3.connect("hc1", &[]).await.map(|_| ()) });
    let a = next_accept(&mut l).await;
    e2.connector.connect(&a.address, &[]).await.unwrap();
    s.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_listener_that_leaves_before_answering_hands_the_sender_to_another() {
    let env = Arc::new(start("failover", |_| {}).await);
    let mut first = env.listen("hc1").await;
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move { e2.connect("hc1", &[]).await.map(|c| c.protocol) });
    // The only listener gets the accept and disappears without answering.
    let _ = next_accept(&mut first).await;
    let mut second = env.listen("hc1").await;
    drop(first);
    // The sender is offered to the second listener well before the 30 s deadline.
    let a = next_accept(&mut second).await;
    env.connector.connect(&a.address, &[]).await.unwrap();
    tokio::time::timeout(T, sender)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // With no listener left to try, the sender learns at once: 502.
    let e3 = Arc::clone(&env);
    let sender = tokio::spawn(async move { e3.connect("hc1", &[]).await.map(|_| ()) });
    let _ = next_accept(&mut second).await;
    drop(second);
    let e = tokio::time::timeout(T, sender)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
}

/// A TLS connection from `source` (a loopback address) that sends `head` and reads the answer;
/// returns the status line, or "" when the relay closed without one.
async fn raw_from(env: &Env, source: &str, head: &str) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = sock
        .connect(format!("127.0.0.1:{}", env.port).parse().unwrap())
        .await
        .unwrap();
    let tls = hyco_io::tls::client_config(Some(&env.ca)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut s) = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    else {
        return String::new();
    };
    if s.write_all(head.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(T, s.read(&mut buf)).await.unwrap() {
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
        Err(_) => String::new(),
    }
}

/// Reads until the relay closes; returns how long that took.
async fn time_to_close(mut s: impl tokio::io::AsyncRead + Unpin) -> Duration {
    let t0 = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("relay never closed")
        {
            Ok(0) | Err(_) => return t0.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn slow_or_silent_clients_are_cut_at_the_handshake_deadline() {
    let env = start("slowloris", |c| {
        c.limits.handshake_timeout = Duration::from_secs(1)
    })
    .await;
    // C1: TCP and then nothing.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    // C3: TLS done, request head one byte at a time.
    let tls = hyco_io::tls::client_config(Some(&env.ca)).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut drip = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let dripper = tokio::spawn(async move {
        let t0 = tokio::time::Instant::now();
        for b in b"GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\nHost: localhost\r\n"
            .iter()
            .cycle()
            .take(200)
        {
            if drip.write_all(&[*b]).await.is_err() || drip.flush().await.is_err() {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("still accepted bytes after 20 s");
    });
    // Meanwhile a normal client is served.
    let _l = env.listen("hc1").await;
    let silent_closed = time_to_close(silent).await;
    assert!(silent_closed < Duration::from_secs(3), "{silent_closed:?}");
    let drip_cut = dripper.await.unwrap();
    assert!(drip_cut < Duration::from_secs(4), "{drip_cut:?}");
}

#[tokio::test]
async fn unfinished_handshakes_are_capped_per_address() {
    let env = start("perip", |c| {
        c.limits.max_handshakes_per_ip = 4;
        c.limits.max_handshake_waiters_per_ip = 0;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", env.port))
                .await
                .unwrap(),
        );
    }
    // The fifth from the same address is closed at once.
    let fifth = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    assert!(time_to_close(fifth).await < Duration::from_secs(2));
    // Another address is unaffected.
    let other = raw_from(
        &env,
        "127.0.0.2",
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(other.contains("404"), "{other:?}");
    // Released slots are reusable.
    drop(idle);
    let env_ref = &env;
    eventually(|| async move {
        raw_from(
            env_ref,
            "127.0.0.1",
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .contains("404")
    })
    .await;
}

#[tokio::test]
async fn pending_senders_are_capped_per_hybrid_connection() {
    let env = Arc::new(start("pending", |c| c.limits.max_pending_per_hc = 2).await);
    let mut silent_listener = env.listen("hc1").await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let e = Arc::clone(&env);
        waiting.push(tokio::spawn(async move {
            e.connect("hc1", &[]).await.map(|_| ())
        }));
    }
    // Both are pending once the listener has their accepts; the third is refused at once.
    next_accept(&mut silent_listener).await;
    next_accept(&mut silent_listener).await;
    let e = tokio::time::timeout(Duration::from_secs(5), env.connect("hc1", &[]))
        .await
        .expect("the third sender was not refused at once")
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    for w in &waiting {
        assert!(!w.is_finished(), "a pending sender was dropped");
    }
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn a_sender_that_stops_reading_is_cut_after_the_write_timeout() {
    let env = Arc::new(
        start("stall", |c| {
            c.splice.write_timeout = Duration::from_secs(1);
        })
        .await,
    );
    let mut l = env.listen("hc1").await;
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        let c = e2.connect("hc1", &[]).await.unwrap();
        // Hold the connection open and never read.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(c);
    });
    let a = next_accept(&mut l).await;
    let mut r = env.connector.connect(&a.address, &[]).await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let flood = async {
        for _ in 0..8192 {
            if r.ws.write_all(&chunk).await.is_err() || r.ws.flush().await.is_err() {
                return true;
            }
        }
        false
    };
    let cut = tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("listener never blocked and was never cut");
    assert!(cut, "512 MiB went into a sender that never reads");
    sender.abort();
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let env = Arc::new(start("metrics", |_| {}).await);
    let before = status_get(&env, "/metrics").await;
    let mut l = env.listen("hc1").await;
    // One refused sender (bad token): a client error.
    let bad = env
        .token(Some("hc1"), now() + 600)
        .replace("sig=", "sig=AA");
    let _ = env
        .connector
        .connect(
            &env.url("hc1", "connect", ""),
            &[("ServiceBusAuthorization", &bad)],
        )
        .await
        .map(|_| ())
        .unwrap_err();
    // One tunnel carrying 1000 bytes each way.
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        let mut s = e2.connect("hc1", &[]).await.unwrap();
        s.ws.write_all(&[1u8; 1000]).await.unwrap();
        s.ws.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.ws.read_to_end(&mut back).await.unwrap();
        back.len()
    });
    let a = next_accept(&mut l).await;
    let mut r = env.connector.connect(&a.address, &[]).await.unwrap();
    let mut got = Vec::new();
    r.ws.read_to_end(&mut got).await.unwrap();
    r.ws.write_all(&[2u8; 1000]).await.unwrap();
    r.ws.shutdown().await.unwrap();
    assert_eq!(sender.await.unwrap(), 1000);
    let after = async {
        loop {
            let m = status_get(&env, "/metrics").await;
            if series(&m, "hyco_sender_disconnects_total", "hc1") >= 1.0 {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let after = tokio::time::timeout(T, after)
        .await
        .expect("tunnel close not counted");
    let d = |name: &str| series(&after, name, "hc1") - series(&before, name, "hc1");
    assert_eq!(d("hyco_listener_connections_success_total"), 1.0);
    assert_eq!(d("hyco_sender_connections_client_error_total"), 1.0);
    assert_eq!(d("hyco_sender_connections_success_total"), 1.0);
    assert_eq!(d("hyco_sender_disconnects_total"), 1.0);
    assert_eq!(d("hyco_bytes_transferred_total"), 2000.0);
    assert_eq!(series(&after, "hyco_active_listeners", "hc1"), 1.0);
    assert_eq!(series(&after, "hyco_active_connections", "hc1"), 0.0);
    assert!(
        after.contains("hyco_sender_connect_latency_seconds_count{hybrid_connection=\"hc1\"} 1"),
        "{after}"
    );
    assert!(!after.contains(env.key.expose()));
    // The JSON view agrees.
    let js: serde_json::Value =
        serde_json::from_str(&status_get(&env, "/api/status").await).unwrap();
    let hc1 = js["hybridConnections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "hc1")
        .unwrap();
    assert_eq!(hc1["state"], "Connected");
    assert_eq!(hc1["listeners"].as_array().unwrap().len(), 1);
    assert_eq!(hc1["bytes"], 2000);
    assert_eq!(hc1["endpoint"], "127.0.0.1:9");
    drop(l);
}

#[tokio::test]
async fn listener_up_and_down_are_published_as_events() {
    let env = start("events", |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.status_port))
        .await
        .unwrap();
    s.write_all(b"GET /api/listener-events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Read until the response head is in, so the subscription exists before the listener comes.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&buf).contains("\r\n\r\n") {
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let l = env.listen("hc1").await;
    drop(l);
    let mut events = Vec::new();
    while events.len() < 2 {
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "event stream ended");
        buf.extend_from_slice(&chunk[..n]);
        events = String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap())
            .collect();
    }
    assert_eq!(events[0]["event"], "NewListenerRegistered");
    assert_eq!(events[0]["hybridConnection"], "hc1");
    assert_eq!(events[0]["listenerId"], "test-listen");
    assert_eq!(events[1]["event"], "ListenerUnregistered");
    assert!(events[1]["reason"].is_string());
}

#[tokio::test]
async fn certificate_files_replace_the_generated_ones() {
    let dir = std::env::temp_dir().join(format!("hyco-relay-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = hyco_io::tls::generate_pki(&["localhost".to_owned()]).unwrap();
    let (cert, key, ca) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("myca.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();
    std::fs::write(&ca, &pki.ca_cert_pem).unwrap();
    let env = start("certs", |c| c.tls_files = Some((cert.clone(), key.clone()))).await;
    assert!(
        !env.dir.join("ca.pem").exists(),
        "a CA was generated although files were given"
    );
    // A client trusting only the given CA gets through; one trusting the system roots does not.
    let tls = hyco_io::tls::client_config(Some(&ca)).unwrap();
    let mut mine = Connector::new(tls);
    mine.timeout = T;
    let t = env.token(Some("hc1"), now() + 600);
    mine.connect(
        &env.url("hc1", "listen", ""),
        &[("ServiceBusAuthorization", &t)],
    )
    .await
    .unwrap();
    let system = Connector::new(hyco_io::tls::client_config(None).unwrap());
    let e = system
        .connect(
            &env.url("hc1", "listen", ""),
            &[("ServiceBusAuthorization", &t)],
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_burst_from_one_address_waits_for_handshake_slots_instead_of_failing() {
    let env = Arc::new(
        start("burst", |c| {
            c.limits.max_handshakes_per_ip = 2;
            c.limits.max_handshake_waiters_per_ip = 64;
        })
        .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let e = Arc::clone(&env);
        tasks.push(tokio::spawn(async move {
            raw_from(&e, "127.0.0.1", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await
        }));
    }
    for t in tasks {
        let line = t.await.unwrap();
        assert!(line.contains("404"), "a burst connection failed: {line:?}");
    }
}

// === HTTP mode (protocol.md §2.7, §2.8, §4.3–4.7) ===

async fn http_send(
    env: &Env,
    method: http::Method,
    target: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> hyco_io::ws::HttpAnswer {
    let t = env.token(Some("hc1"), now() + 600);
    let mut h = headers.to_vec();
    h.push(("ServiceBusAuthorization", &t));
    env.connector
        .https_request(
            method,
            &format!("https://localhost:{}{target}", env.port),
            &h,
            bytes::Bytes::from(body),
            8 << 20,
        )
        .await
        .unwrap()
}

async fn next_request(
    ws: &mut hyco_io::ws::WsStream<hyco_io::ws::handshake::ClientTls>,
) -> hyco_proto::control::RequestCommand {
    match tokio::time::timeout(T, ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Request(r) => r,
            other => panic!("expected request, got {other:?}"),
        },
        other => panic!("expected text, got {other:?}"),
    }
}

fn response_json(id: &str, status: u16, body: bool) -> String {
    ListenerCommand::Response(hyco_proto::control::ResponseCommand {
        request_id: id.to_owned(),
        status_code: status,
        status_description: Some("Fine Thanks".into()),
        response_headers: Some(vec![
            ("X-Answer".into(), "42".into()),
            ("Content-Length".into(), "999999".into()),
        ]),
        body,
    })
    .to_json()
}

#[tokio::test]
async fn small_http_requests_travel_on_the_control_channel() {
    let env = start("http-small", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let sender = {
        let env_port = env.port;
        let t = env.token(Some("hc1"), now() + 600);
        let c = env.connector.clone();
        tokio::spawn(async move {
            c.https_request(
                http::Method::POST,
                &format!("https://localhost:{env_port}/hc1/api/items?x=1&sb-hc-trace=zzz&y=2"),
                &[
                    ("ServiceBusAuthorization", t.as_str()),
                    ("Content-Type", "text/plain"),
                    ("X-Multi", "a"),
                ],
                bytes::Bytes::from_static(b"hello listener"),
                1 << 20,
            )
            .await
            .unwrap()
        })
    };
    let r = next_request(&mut l.ws).await;
    assert_eq!(r.method.as_deref(), Some("POST"));
    assert_eq!(r.request_target.as_deref(), Some("/hc1/api/items?x=1&y=2"));
    assert_eq!(r.body, Some(true));
    assert!(r.address.contains("sb-hc-action=request"));
    assert!(r.address.contains(&format!("sb-hc-id={}", r.id)));
    let headers = r.request_headers.clone().unwrap();
    assert!(headers
        .iter()
        .any(|(k, v)| k == "Content-Type" && v == "text/plain"));
    assert!(headers.iter().any(|(k, _)| k == "Host"));
    assert!(!headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ServiceBusAuthorization")
            || k.eq_ignore_ascii_case("Content-Length")));
    assert!(r.remote_endpoint.is_some());
    // The body comes next, as one binary message.
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Binary(b) => assert_eq!(b, b"hello listener"),
        other => panic!("expected the body, got {other:?}"),
    }
    l.ws.send_text(&response_json(&r.id, 201, true))
        .await
        .unwrap();
    l.ws.send_binary(b"created").await.unwrap();
    let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_eq!(a.status, 201);
    assert_eq!(a.reason, "Fine Thanks");
    assert_eq!(a.body.as_ref(), b"created");
    assert_eq!(a.headers["x-answer"], "42");
    assert_eq!(
        a.headers["content-length"], "7",
        "the relay frames the body itself"
    );
    assert!(a.headers["via"].to_str().unwrap().contains("localhost"));

    // A GET without a body: `body: false` and nothing follows.
    let c = env.connector.clone();
    let t = env.token(Some("hc1"), now() + 600);
    let port = env.port;
    let sender = tokio::spawn(async move {
        c.https_request(
            http::Method::GET,
            &format!("https://localhost:{port}/hc1?sb-hc-undefined"),
            &[("ServiceBusAuthorization", t.as_str())],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap()
    });
    let r = next_request(&mut l.ws).await;
    assert_eq!(r.body, Some(false));
    assert_eq!(r.request_target.as_deref(), Some("/hc1?sb-hc-undefined"));
    l.ws.send_text(&response_json(&r.id, 204, false))
        .await
        .unwrap();
    let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_eq!(a.status, 204);
}

/// Issue 14: the query token is accepted under every spelling of its name that the parser
/// decodes to `sb-hc-token` (case, `%2D`, any percent-encoded letter), and under none of them
/// does it reach the listener's request target.
#[tokio::test]
async fn http_mode_never_forwards_the_token_however_its_name_is_encoded() {
    let env = start("http-token-names", |_| {}).await;
    let mut l = env.listen("hc1").await;
    for name in [
        "sb-hc-token",
        "SB-HC-TOKEN",
        "sb%2Dhc%2Dtoken",
        "sb%2dhc%2dtoken",
        "%73%62-hc-%74oken",
        "Sb-Hc%2DToKeN",
    ] {
        let t = env.token(Some("hc1"), now() + 600);
        let sig: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
        let url = format!("https://localhost:{}/hc1/p?x=1&{name}={sig}&y=2", env.port);
        let c = env.connector.clone();
        let sender = tokio::spawn(async move {
            c.https_request(http::Method::GET, &url, &[], bytes::Bytes::new(), 1 << 20)
                .await
                .unwrap()
        });
        let r = next_request(&mut l.ws).await;
        assert_eq!(
            r.request_target.as_deref(),
            Some("/hc1/p?x=1&y=2"),
            "{name}"
        );
        let seen = format!("{r:?}");
        assert!(
            !seen.contains("SharedAccessSignature"),
            "{name}: the token reached the listener: {seen}"
        );
        l.ws.send_text(&response_json(&r.id, 204, false))
            .await
            .unwrap();
        let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
        assert_eq!(a.status, 204, "{name}");
    }
}

#[tokio::test]
async fn large_http_bodies_go_over_the_request_rendezvous_both_ways() {
    let env = start("http-large", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let sent = body.clone();
    let c = env.connector.clone();
    let t = env.token(Some("hc1"), now() + 600);
    let port = env.port;
    let sender = tokio::spawn(async move {
        c.https_request(
            http::Method::PUT,
            &format!("https://localhost:{port}/hc1/upload"),
            &[("ServiceBusAuthorization", t.as_str())],
            bytes::Bytes::from(sent),
            8 << 20,
        )
        .await
        .unwrap()
    });
    // Address-only: neither method nor body.
    let short = next_request(&mut l.ws).await;
    assert!(short.method.is_none() && short.body.is_none());
    let mut rdv = env.connector.connect(&short.address, &[]).await.unwrap().ws;
    let full = next_request(&mut rdv).await;
    assert_eq!(full.method.as_deref(), Some("PUT"));
    assert_eq!(full.body, Some(true));
    assert_eq!(full.id, short.id);
    let mut got = Vec::new();
    for _ in 0..10_000 {
        match tokio::time::timeout(T, rdv.recv_part(64 * 1024))
            .await
            .unwrap()
            .unwrap()
        {
            hyco_io::ws::Part::Data { data, fin, .. } => {
                got.extend_from_slice(&data);
                if fin {
                    break;
                }
            }
            other => panic!("expected body, got {other:?}"),
        }
    }
    assert_eq!(got, body);
    // The response streams back: JSON, then fragments, then an empty final frame.
    rdv.send_text(&response_json(&full.id, 200, true))
        .await
        .unwrap();
    let mut first = true;
    for chunk in body.chunks(100_000) {
        rdv.send_part(false, first, false, chunk).await.unwrap();
        first = false;
    }
    rdv.send_part(false, false, true, &[]).await.unwrap();
    let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), body.len());
    assert!(a.body.as_ref() == body.as_slice());
    assert!(a.headers.get("content-length").is_none());
    assert_eq!(a.headers["transfer-encoding"], "chunked");
    // The relay closes the rendezvous after the response.
    match tokio::time::timeout(T, rdv.recv()).await.unwrap().unwrap() {
        Message::Close(Some((1000, _))) => {}
        other => panic!("expected close, got {other:?}"),
    }
    // A rendezvous address works once.
    let again = env
        .connector
        .connect(&short.address, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(again, ConnectError::Rejected { status: 403, .. }),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_large_response_to_a_small_request_comes_over_a_rendezvous() {
    let env = start("http-bigresp", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let c = env.connector.clone();
    let t = env.token(Some("hc1"), now() + 600);
    let port = env.port;
    let sender = tokio::spawn(async move {
        c.https_request(
            http::Method::GET,
            &format!("https://localhost:{port}/hc1/big"),
            &[("ServiceBusAuthorization", t.as_str())],
            bytes::Bytes::new(),
            8 << 20,
        )
        .await
        .unwrap()
    });
    let r = next_request(&mut l.ws).await;
    let mut rdv = env.connector.connect(&r.address, &[]).await.unwrap().ws;
    rdv.send_text(&response_json(&r.id, 200, true))
        .await
        .unwrap();
    rdv.send_part(false, true, false, &[7u8; 70_000])
        .await
        .unwrap();
    rdv.send_part(false, false, true, &[8u8; 70_000])
        .await
        .unwrap();
    let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 140_000);
    assert_eq!(a.body[139_999], 8);
}

#[tokio::test]
async fn http_mode_errors_no_listener_502_silent_listener_504_auth_401() {
    let env = start("http-errors", |c| {
        c.limits.http_timeout = Duration::from_secs(1);
    })
    .await;
    let a = http_send(&env, http::Method::GET, "/hc1/x", &[], vec![]).await;
    assert_eq!(a.status, 502, "{}", String::from_utf8_lossy(&a.body));
    assert!(a.headers.get("via").is_none(), "relay errors carry no Via");
    let _l = env.listen("hc1").await;
    let a = http_send(&env, http::Method::GET, "/hc1/x", &[], vec![]).await;
    assert_eq!(a.status, 504);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "GatewayTimeout");
    let a = env
        .connector
        .https_request(
            http::Method::GET,
            &format!("https://localhost:{}/hc1/x", env.port),
            &[],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 401);
    // The token may come in the query too (removed before the listener sees it); with a
    // namespace-wide one, an unknown name is a 404.
    let ns_token = env.token(None, now() + 600);
    let q: String = form_urlencoded::byte_serialize(ns_token.as_bytes()).collect();
    let a = env
        .connector
        .https_request(
            http::Method::GET,
            &format!("https://localhost:{}/nosuch/x?sb-hc-token={q}", env.port),
            &[],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 404);
}

// === Listener details (protocol.md §5.1, §5.6) ===

impl Env {
    /// A control channel on `hc` opened with `token`.
    async fn listen_with_token(&self, hc: &str, token: &str) -> Connected {
        self.listen_at(&self.url(hc, "listen", ""), token).await
    }

    /// A listener with its own `sb-hc-id`.
    async fn listen_as(&self, hc: &str, id: &str) -> Connected {
        let t = self.token(Some(hc), now() + 600);
        let url = format!(
            "wss://localhost:{}/$hc/{hc}?sb-hc-action=listen&sb-hc-id={id}",
            self.port
        );
        self.listen_at(&url, &t).await
    }

    async fn listen_at(&self, url: &str, token: &str) -> Connected {
        self.connector
            .connect(url, &[("ServiceBusAuthorization", token)])
            .await
            .unwrap()
    }
}

/// Which of the listeners gets the next `request` (read with a short timeout each).
async fn who_gets_it(ls: &mut [(&str, Connected)]) -> String {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        for (id, l) in ls.iter_mut() {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), l.ws.recv()).await {
                match r.unwrap() {
                    Message::Text(t) => {
                        if let Ok(ListenerCommand::Request(req)) = ListenerCommand::parse(&t) {
                            let resp = response_json(&req.id, 200, false);
                            l.ws.send_text(&resp).await.unwrap();
                            return (*id).to_owned();
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no listener got the request"
        );
    }
}

#[tokio::test]
async fn allowed_and_disallowed_listener_headers_choose_among_listeners() {
    let env = Arc::new(start("allowed", |_| {}).await);
    let mut ls = vec![
        ("alpha", env.listen_as("hc1", "alpha").await),
        ("beta", env.listen_as("hc1", "beta").await),
        ("gamma", env.listen_as("hc1", "gamma").await),
    ];
    for (header, value, expect) in [
        ("Microsoft-Relay-AllowedListeners", "beta", &["beta"][..]),
        (
            "Microsoft-Relay-AllowedListeners",
            "gamma, alpha",
            &["gamma", "alpha"][..],
        ),
        (
            "Microsoft-Relay-DisallowedListeners",
            "alpha,beta",
            &["gamma"][..],
        ),
    ] {
        for _ in 0..4 {
            let e = Arc::clone(&env);
            let sender = tokio::spawn(async move {
                http_send(&e, http::Method::GET, "/hc1/x", &[(header, value)], vec![]).await
            });
            let got = who_gets_it(&mut ls).await;
            assert!(
                expect.contains(&got.as_str()),
                "{header}: {value} went to {got}"
            );
            assert_eq!(sender.await.unwrap().status, 200);
        }
    }
    // Nobody eligible: the sender learns at once, with Azure's 404 (tests/clients.rs).
    let a = http_send(
        &env,
        http::Method::GET,
        "/hc1/x",
        &[("Microsoft-Relay-AllowedListeners", "nobody")],
        vec![],
    )
    .await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn the_26th_listener_is_refused_with_maximum_listeners() {
    let env = start("maxl", |_| {}).await;
    let mut keep = Vec::new();
    for i in 0..25 {
        keep.push(env.listen_as("hc1", &format!("l{i}")).await);
    }
    let t = env.token(Some("hc1"), now() + 600);
    let e = env.listen_refused("hc1", &t).await;
    match e {
        ConnectError::Rejected { status, reason, .. } => {
            assert_eq!(status, 403);
            assert!(reason.contains("MaximumListenersPerEndpoint"), "{reason}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    drop(keep.pop());
    // A freed place is usable again (the relay notices the close promptly).
    let mut ok = false;
    for _ in 0..50 {
        let t = env.token(Some("hc1"), now() + 600);
        if env
            .connector
            .connect(
                &env.url("hc1", "listen", ""),
                &[("ServiceBusAuthorization", &t)],
            )
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the 25th place did not free up");
}

#[tokio::test]
async fn a_listener_that_stops_answering_pings_leaves_the_rotation() {
    let env = start("deadl", |c| {
        c.limits.ping_interval = Duration::from_millis(200);
        c.limits.dead_after = Duration::from_secs(1);
    })
    .await;
    // Connected but never read from: its pings go unanswered.
    let _silent = env.listen_as("hc1", "silent").await;
    let mut alive = env.listen_as("hc1", "alive").await;
    // Keep `alive` answering pings while the silent one is found dead.
    let pump = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + T;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), alive.ws.recv()).await {
                Ok(Ok(Message::Text(t))) => {
                    if let Ok(ListenerCommand::Request(r)) = ListenerCommand::parse(&t) {
                        alive
                            .ws
                            .send_text(&response_json(&r.id, 200, false))
                            .await
                            .unwrap();
                    }
                }
                Ok(other) => panic!("alive listener got {other:?}"),
                Err(_) => {}
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every request now reaches the live one: none waits for the dead one (were it still in
    // the rotation, 10 random picks would all miss it with odds of 1 in 1 024).
    for _ in 0..10 {
        let a = tokio::time::timeout(
            Duration::from_secs(5),
            http_send(&env, http::Method::GET, "/hc1/x", &[], vec![]),
        )
        .await
        .expect("a request went to the dead listener");
        assert_eq!(a.status, 200);
    }
    pump.abort();
}
