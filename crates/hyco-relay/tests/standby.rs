//! The relay's side of the hyco extensions (docs/design-notes.md, "Connect in one round
//! trip"), against raw peers: standby sockets and early data, what binds a parked socket, and
//! the relay with its extensions switched off.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{eventually, now, series, start, status_get, Env, T};

use std::time::Duration;

use hyco_io::ws::{Connected, Message};
use hyco_proto::control::{AcceptCommand, ListenerCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTENER: &str = "test-listen";

fn standby_url(env: &Env, hc: &str, listener: &str) -> String {
    format!(
        "wss://localhost:{}/$hc/{hc}?sb-hc-action=standby&sb-hc-id={listener}",
        env.port
    )
}

/// A socket parked for `LISTENER` with `token`.
async fn park_with(env: &Env, hc: &str, token: &str) -> Connected {
    env.connector
        .connect(
            &standby_url(env, hc, LISTENER),
            &[("ServiceBusAuthorization", token)],
        )
        .await
        .unwrap()
}

/// Why the relay refuses to park a socket for `listener` with a fresh Listen token.
async fn park_refused(env: &Env, listener: &str) -> hyco_io::ws::ConnectError {
    let t = env.token(Some("hc1"), now() + 600);
    env.connector
        .connect(
            &standby_url(env, "hc1", listener),
            &[("ServiceBusAuthorization", t.as_str())],
        )
        .await
        .map(|_| ())
        .unwrap_err()
}

/// A sender that did not say it takes parked sockets (as Microsoft's clients), connecting in
/// a task: a classic connect completes only once the listener answered.
fn classic_sender(
    env: &Env,
) -> tokio::task::JoinHandle<Result<Connected, hyco_io::ws::ConnectError>> {
    let c = env.connector.clone();
    let url = env.url("hc1", "connect", "");
    let t = env.token(Some("hc1"), now() + 600);
    tokio::spawn(async move {
        c.connect(&url, &[("ServiceBusAuthorization", t.as_str())])
            .await
    })
}

async fn park(env: &Env, hc: &str) -> Connected {
    park_with(env, hc, &env.token(Some(hc), now() + 600)).await
}

async fn parked_now(env: &Env, hc: &str) -> f64 {
    series(
        &status_get(env, "/metrics").await,
        "hyco_standby_sockets",
        hc,
    )
}

/// Waits until the relay holds `n` parked sockets for `hc`.
async fn parked(env: &Env, hc: &str, n: f64) {
    eventually(|| async { parked_now(env, hc).await == n }).await;
}

/// The `accept` a parked socket gets when a sender is joined to it (or a control channel when
/// one is offered).
async fn accept_on(s: &mut Connected) -> AcceptCommand {
    match tokio::time::timeout(T, s.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Accept(a) => a,
            other => panic!("expected accept, got {other:?}"),
        },
        other => panic!("expected the accept text, got {other:?}"),
    }
}

/// Reads `want` from a socket's stream, within `T`.
async fn reads(s: &mut Connected, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    tokio::time::timeout(T, s.ws.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, want);
}

/// The Close a socket gets, with nothing before it.
async fn close_of(s: &mut Connected) -> Option<(u16, String)> {
    match tokio::time::timeout(T, s.ws.recv()).await.unwrap() {
        Ok(Message::Close(c)) => c,
        other => panic!("expected a close, got {other:?}"),
    }
}

/// The whole response head of a raw request (TLS, then `head` and `after` in one write).
async fn raw_exchange(
    env: &Env,
    head: &str,
    after: &[u8],
) -> (
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut s = common::tls(env).await;
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(after);
    s.write_all(&bytes).await.unwrap();
    (common::read_head(&mut s).await, s)
}

fn connect_head(env: &Env, hc: &str, token: &str) -> String {
    format!(
        "GET /$hc/{hc}?sb-hc-action=connect&sb-hc-id=early HTTP/1.1\r\nHost: localhost:{}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nHyco-Extensions: standby\r\nServiceBusAuthorization: {token}\r\n\r\n",
        env.port
    )
}

/// What a hyco sender adds to its connect: it may be joined to a parked socket.
const HYCO_SENDER: (&str, &str) = ("Hyco-Extensions", "standby");

/// One masked binary frame (a client's).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    common::masked_frame(0x82, payload)
}

fn advertised(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("hyco-extensions")
            .then(|| v.trim().to_owned())
    })
}

#[tokio::test]
async fn a_sender_is_joined_to_a_parked_socket_without_a_rendezvous() {
    let env = start("standby-join", |_| {}).await;
    let mut ctl = env.listen("hc1").await;
    let mut first = park(&env, "hc1").await;
    parked(&env, "hc1", 1.0).await;
    let mut second = park(&env, "hc1").await;
    parked(&env, "hc1", 2.0).await;
    let mut s = env
        .connect("hc1", &[("X-Tenant", "blue"), HYCO_SENDER])
        .await
        .unwrap();
    s.ws.write_all(b"hello").await.unwrap();
    s.ws.shutdown().await.unwrap();
    // The oldest parked socket takes it: the accept first, then the sender's bytes.
    let a = accept_on(&mut first).await;
    assert_eq!(a.id, "test-connect");
    assert!(
        a.connect_headers
            .iter()
            .any(|(k, v)| k == "X-Tenant" && v == "blue"),
        "{:?}",
        a.connect_headers
    );
    assert!(
        !a.connect_headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("servicebusauthorization")),
        "credentials never forwarded"
    );
    assert!(!a.address.contains("sb-hc-rv"), "{}", a.address);
    assert_eq!(a.remote_endpoint.unwrap().address, "127.0.0.1");
    let mut got = Vec::new();
    first.ws.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello");
    first.ws.write_all(b"world").await.unwrap();
    first.ws.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.ws.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"world");
    let metrics = status_get(&env, "/metrics").await;
    assert_eq!(series(&metrics, "hyco_standby_pairings_total", "hc1"), 1.0);
    assert_eq!(series(&metrics, "hyco_standby_sockets", "hc1"), 1.0);
    // Nothing came on the control channel (a sender offered there would be an accept).
    ctl.ws.send_ping(b"x").await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), ctl.ws.recv()).await;
    assert!(quiet.is_err(), "control channel got {quiet:?}");
    // A sender that did not say it takes a parked socket (Microsoft's clients) gets the
    // protocol's rendezvous, and a listener's refusal as its status, although one is parked.
    let microsoft = classic_sender(&env);
    let a = accept_on(&mut ctl).await;
    assert!(a.address.contains("sb-hc-rv="), "{}", a.address);
    let reject = hyco_proto::address::reject_url(&a.address, 503, "busy");
    let e = env
        .connector
        .connect(&reject, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.status(), Some(410));
    let e = microsoft.await.unwrap().map(|_| ()).unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert_eq!(parked_now(&env, "hc1").await, 1.0);
    // The second is still parked and takes the next hyco sender.
    let mut s2 = env.connect("hc1", &[HYCO_SENDER]).await.unwrap();
    s2.ws.write_all(b"again").await.unwrap();
    accept_on(&mut second).await;
    let mut buf = [0u8; 5];
    second.ws.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
    parked(&env, "hc1", 0.0).await;
    // With none parked, the classic rendezvous: the accept comes on the control channel.
    let sender = classic_sender(&env);
    let a = accept_on(&mut ctl).await;
    assert!(a.address.contains("sb-hc-rv="));
    env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_extensions_are_advertised_on_101s_and_refused_when_off() {
    let on = start("standby-adv", |_| {}).await;
    let _ctl = on.listen("hc1").await;
    let _p = park(&on, "hc1").await;
    let t = on.token(Some("hc1"), now() + 600);
    let (head, _s) = raw_exchange(&on, &connect_head(&on, "hc1", &t), b"").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        advertised(&head).as_deref(),
        Some("standby;max=32;ttl=60, early-data;max=65536, reuse"),
        "{head}"
    );

    let off = start("standby-off", |c| {
        c.extensions = hyco_proto::ext::Extensions::default()
    })
    .await;
    let _ctl = off.listen("hc1").await;
    let e = park_refused(&off, LISTENER).await;
    assert_eq!(e.status(), Some(400), "{e}");
    let t = off.token(Some("hc1"), now() + 600);
    let listen_head = format!(
        "GET /$hc/hc1?sb-hc-action=listen&sb-hc-id=raw HTTP/1.1\r\nHost: localhost:{}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nServiceBusAuthorization: {t}\r\n\r\n",
        off.port
    );
    let (lh, _l) = raw_exchange(&off, &listen_head, b"").await;
    assert!(lh.starts_with("HTTP/1.1 101"), "{lh}");
    assert_eq!(advertised(&lh), None, "{lh}");
}

#[tokio::test]
async fn standby_refusals_say_why() {
    let env = start("standby-refused", |c| {
        c.extensions.standby = Some(hyco_proto::ext::StandbyParams {
            max: 2,
            ttl_secs: 60,
        })
    })
    .await;
    let token = env.token(Some("hc1"), now() + 600);
    let try_park = |listener: &'static str, token: String| {
        let c = env.connector.clone();
        let url = standby_url(&env, "hc1", listener);
        async move {
            c.connect(&url, &[("ServiceBusAuthorization", token.as_str())])
                .await
                .map(|_| ())
                .unwrap_err()
        }
    };
    // No control channel of that listener on this relay.
    let e = try_park(LISTENER, token.clone()).await;
    assert_eq!(e.status(), Some(404), "{e}");
    let _ctl = env.listen("hc1").await;
    // A Send-only key may not park.
    let send = env.rule_token("hc1", "sendonly", r#"["Send"]"#).await;
    let e = try_park(LISTENER, send).await;
    assert!(matches!(e.status(), Some(401 | 403)), "{e}");
    // Another listener's id.
    let e = try_park("someone-else", token.clone()).await;
    assert_eq!(e.status(), Some(404), "{e}");
    // The cap.
    let _a = park(&env, "hc1").await;
    let _b = park(&env, "hc1").await;
    parked(&env, "hc1", 2.0).await;
    let e = try_park(LISTENER, token.clone()).await;
    assert_eq!(e.status(), Some(429), "{e}");
}

#[tokio::test]
async fn early_data_reaches_the_listener_only_behind_an_authorized_upgrade() {
    let env = start("standby-early", |_| {}).await;
    let _ctl = env.listen("hc1").await;
    let mut p = park(&env, "hc1").await;
    parked(&env, "hc1", 1.0).await;
    // A forged token with early data behind it: 401, and the parked socket stays untouched.
    let forged = env.token(Some("hc1"), now() + 600).replace("sig=", "sig=A");
    let (head, _s) = raw_exchange(
        &env,
        &connect_head(&env, "hc1", &forged),
        &client_frame(b"secret"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(parked_now(&env, "hc1").await, 1.0);
    // A valid one: the frame right behind the head arrives right behind the accept.
    let t = env.token(Some("hc1"), now() + 600);
    let (head, _s) = raw_exchange(
        &env,
        &connect_head(&env, "hc1", &t),
        &client_frame(b"early"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let a = accept_on(&mut p).await;
    assert_eq!(a.id, "early");
    reads(&mut p, b"early").await;
}

#[tokio::test]
async fn early_data_waits_for_a_classic_rendezvous_too() {
    let env = start("standby-early-classic", |_| {}).await;
    let mut ctl = env.listen("hc1").await;
    let t = env.token(Some("hc1"), now() + 600);
    let head = connect_head(&env, "hc1", &t);
    let sender = tokio::spawn({
        let env_port = env.port;
        let ca = env.ca.clone();
        async move {
            let config = hyco_io::tls::client_config(Some(&ca)).unwrap();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", env_port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .unwrap();
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&client_frame(b"before the 101"));
            s.write_all(&bytes).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(T, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    });
    let a = accept_on(&mut ctl).await;
    let mut r = env.connector.connect(&a.address, &[]).await.unwrap();
    reads(&mut r, b"before the 101").await;
    assert!(sender.await.unwrap().starts_with("HTTP/1.1 101"));
}

#[tokio::test]
async fn parked_sockets_are_retired_by_what_binds_them() {
    let env = start("standby-retire", |c| {
        c.extensions.standby = Some(hyco_proto::ext::StandbyParams {
            max: 8,
            ttl_secs: 2,
        })
    })
    .await;
    let mut ctl = env.listen("hc1").await;
    // Time to live: 1000.
    let mut old = park(&env, "hc1").await;
    assert_eq!(close_of(&mut old).await.map(|c| c.0), Some(1000));
    // The token's expiry (before the time to live): 1008.
    let mut short = park_with(&env, "hc1", &env.token(Some("hc1"), now() + 1)).await;
    assert_eq!(
        close_of(&mut short).await,
        Some((1008, "The token has expired.".into()))
    );
    // A listener that writes on a parked socket: 1008.
    let mut chatty = park(&env, "hc1").await;
    chatty.ws.write_all(b"hi").await.unwrap();
    assert_eq!(close_of(&mut chatty).await.map(|c| c.0), Some(1008));
    // A key regenerated: the socket parked with it goes (1008); the control channel, on the
    // root key, stays.
    let with_app = env.rule_token("hc1", "app", r#"["Listen"]"#).await;
    let mut app = park_with(&env, "hc1", &with_app).await;
    parked(&env, "hc1", 1.0).await;
    assert_eq!(env.regenerate_primary("hc1", "app").await, 200);
    assert_eq!(close_of(&mut app).await.map(|c| c.0), Some(1008));
    // The listener's control channel closing: 1001.
    let mut orphan = park(&env, "hc1").await;
    parked(&env, "hc1", 1.0).await;
    ctl.ws.send_close(1000, "bye").await.unwrap();
    assert_eq!(close_of(&mut orphan).await.map(|c| c.0), Some(1001));
    parked(&env, "hc1", 0.0).await;
}

#[tokio::test]
async fn a_listener_refuses_a_joined_sender_with_a_close_it_sees() {
    let env = start("standby-refuse", |_| {}).await;
    let _ctl = env.listen("hc1").await;
    let mut p = park(&env, "hc1").await;
    parked(&env, "hc1", 1.0).await;
    let mut s = env.connect("hc1", &[HYCO_SENDER]).await.unwrap();
    accept_on(&mut p).await;
    p.ws.send_close(4503, "The listener is busy.")
        .await
        .unwrap();
    match tokio::time::timeout(T, s.ws.recv()).await.unwrap() {
        Ok(Message::Close(c)) => assert_eq!(c, Some((4503, "The listener is busy.".into()))),
        other => panic!("{other:?}"),
    }
}

/// A parked socket holds a tunnel permit, and the tunnel a sender is joined to it by keeps
/// that one; parked sockets leave a tenth of the limit to senders. At the relay's tunnel
/// limit a hyco sender still gets its listener's parked socket (one permit per tunnel); a
/// sender with none to take gets the permit of a socket parked for another hybrid connection,
/// which is closed with 1001 (going away; 1013 is not a code RFC 6455 lets a peer send); with nothing parked, 503 at once.
#[tokio::test]
async fn a_tunnel_through_a_parked_socket_costs_one_permit() {
    let env = start("standby-permits", |c| c.limits.max_tunnels = 3).await;
    let mut ctl = env.listen("hc1").await;
    let _ctl10 = env.listen("hc10").await;
    let mut a = park(&env, "hc1").await;
    parked(&env, "hc1", 1.0).await;
    let mut b = park(&env, "hc10").await;
    parked(&env, "hc10", 1.0).await;
    // The last tenth (one permit) is not for parked sockets: 429, as past the listener's cap.
    let e = park_refused(&env, LISTENER).await;
    assert_eq!(e.status(), Some(429), "{e}");
    // A classic tunnel takes it.
    let classic = classic_sender(&env);
    let acc = accept_on(&mut ctl).await;
    let _rendezvous = env.connector.connect(&acc.address, &[]).await.unwrap();
    let _classic = classic.await.unwrap().unwrap();
    // The gate is full. A hyco sender is joined to its listener's parked socket, which
    // carries its data.
    let mut s1 = env.connect("hc1", &[HYCO_SENDER]).await.unwrap();
    s1.ws.write_all(b"one").await.unwrap();
    accept_on(&mut a).await;
    reads(&mut a, b"one").await;
    // hc1 has nothing parked now: a classic sender takes the permit of hc10's parked socket,
    // which is told why it goes.
    let classic = classic_sender(&env);
    let acc = accept_on(&mut ctl).await;
    let _rendezvous2 = env.connector.connect(&acc.address, &[]).await.unwrap();
    let _classic2 = classic.await.unwrap().unwrap();
    let (code, reason) = close_of(&mut b).await.unwrap();
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("tunnel limit"), "{reason}");
    parked(&env, "hc10", 0.0).await;
    // Three tunnels, three permits, nothing parked: the next sender gets 503 at once.
    let e = env
        .connect("hc1", &[HYCO_SENDER])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
}
