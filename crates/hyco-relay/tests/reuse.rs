//! The relay's side of the `reuse` extension (docs/design-notes.md, "Connections that outlive
//! their tunnel"), against raw peers: a sender speaks HTTP and frames by hand on one TLS
//! connection, a listener parks a socket and gets it back from its stream. After a tunnel both
//! peers closed with 1000 the sender's connection carries its next upgrade and the listener's
//! socket is parked again; any other end, a peer that did not ask, or a relay that does not
//! offer it, and both connections end as before.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{eventually, now, series, start, status_get, Env, T};

use hyco_io::tls::ClientTls;
use hyco_io::ws::{Connected, Message, Recycle, Role, WsConfig, WsStream};
use hyco_proto::control::ListenerCommand;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTENER: &str = "test-listen";

/// Where a test's listener gets its socket back after a normal end.
struct Back(std::sync::mpsc::Sender<(ClientTls, Vec<u8>)>);

impl Recycle<ClientTls> for Back {
    fn give_back(self: Box<Self>, io: ClientTls, rest: Vec<u8>) {
        let _ = self.0.send((io, rest));
    }
}

/// A standby socket for `LISTENER` that asks for `reuse` when `ask`.
async fn park(env: &Env, ask: bool) -> Connected {
    park_with(env, &env.token(Some("hc1"), now() + 600), ask).await
}

/// A standby socket for `LISTENER` parked with `token`.
async fn park_with(env: &Env, token: &str, ask: bool) -> Connected {
    let url = format!(
        "wss://localhost:{}/$hc/hc1?sb-hc-action=standby&sb-hc-id={LISTENER}",
        env.port
    );
    let mut headers = vec![("ServiceBusAuthorization", token)];
    if ask {
        headers.push(("Hyco-Extensions", "reuse"));
    }
    env.connector.connect(&url, &headers).await.unwrap()
}

async fn parked(env: &Env, n: f64) {
    eventually(|| async {
        series(
            &status_get(env, "/metrics").await,
            "hyco_standby_sockets",
            "hc1",
        ) == n
    })
    .await;
}

/// A sender's upgrade request by hand, with `Hyco-Extensions: {ext}`.
fn connect_head(env: &Env, ext: &str) -> String {
    let t = env.token(Some("hc1"), now() + 600);
    format!(
        "GET /$hc/hc1?sb-hc-action=connect&sb-hc-id=raw HTTP/1.1\r\nHost: localhost:{}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nHyco-Extensions: {ext}\r\nServiceBusAuthorization: {t}\r\n\r\n",
        env.port
    )
}

use common::masked_frame as client_frame;

fn close_frame(code: u16) -> Vec<u8> {
    client_frame(0x88, &code.to_be_bytes())
}

/// Sends an upgrade request and `after` in one write; returns the response head.
async fn upgrade(s: &mut ClientTls, head: &str, after: &[u8]) -> String {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(after);
    s.write_all(&bytes).await.unwrap();
    common::read_head(s).await
}

/// A raw sender's connection whose upgrade (`Hyco-Extensions: {ext}`, a `ping` frame behind
/// it) was answered with 101; the response head.
async fn raw_sender(env: &Env, ext: &str) -> (ClientTls, String) {
    let mut s = common::tls(env).await;
    let head = upgrade(
        &mut s,
        &connect_head(env, ext),
        &client_frame(0x82, b"ping"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// Reads exactly `want` (a server's frames, unmasked) from the raw sender.
async fn expect(s: &mut ClientTls, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    tokio::time::timeout(T, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, want);
}

/// The raw sender's connection ends (close_notify or FIN, or a reset) with nothing before it.
async fn ends(s: &mut ClientTls) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(T, s.read(&mut buf)).await.unwrap() {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected the end, got {:?}", &buf[..n]),
    }
}

/// The listener's side of one tunnel on a parked socket: the accept, the sender's `ping`, our
/// `pong`, our Close 1000, the sender's Close (its `code`).
async fn serve_one(ws: &mut WsStream<ClientTls>, sender_code: u16) {
    match tokio::time::timeout(T, ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => assert!(matches!(
            ListenerCommand::parse(&t).unwrap(),
            ListenerCommand::Accept(_)
        )),
        other => panic!("expected the accept, got {other:?}"),
    }
    let mut ping = [0u8; 4];
    ws.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
    ws.write_all(b"pong").await.unwrap();
    ws.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, ws.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(ws.peer_close().unwrap().as_ref().unwrap().0, sender_code);
}

/// The sender's side of one tunnel on its raw connection, after its 101: `ping` went with the
/// request; `pong` and the listener's Close come back; then our Close with `code`.
async fn sender_one(s: &mut ClientTls, code: u16) {
    expect(s, b"\x82\x04pong").await;
    expect(s, &[0x88, 0x02, 0x03, 0xe8]).await;
    s.write_all(&close_frame(code)).await.unwrap();
}

#[tokio::test]
async fn a_connection_that_asked_for_reuse_carries_the_next_tunnel() {
    let env = start("reuse", |c| c.extensions = hyco_relay::default_extensions()).await;
    let _ctl = env.listen("hc1").await;
    let l = park(&env, true).await;
    assert!(l.extensions.reuse, "advertised on the standby 101");
    let mut ws = l.ws;
    parked(&env, 1.0).await;
    let mut s = common::tls(&env).await;
    let ping = client_frame(0x82, b"ping");
    for round in 0..3 {
        let head = upgrade(&mut s, &connect_head(&env, "standby, reuse"), &ping).await;
        assert!(head.starts_with("HTTP/1.1 101"), "round {round}: {head}");
        assert!(head.contains("reuse"), "{head}");
        let (tx, rx) = std::sync::mpsc::channel();
        ws.set_recycle(Box::new(Back(tx)));
        let (_, ()) = tokio::join!(serve_one(&mut ws, 1000), sender_one(&mut s, 1000));
        assert!(ws.reusable(), "round {round}");
        assert!(ws.recycle());
        let (io, rest) = rx.recv_timeout(T).unwrap();
        // Parked again at the relay, on the same connection: the next sender is joined to it.
        ws = WsStream::with_prefix(io, Role::Client, WsConfig::default(), &rest);
        parked(&env, 1.0).await;
    }
    let metrics = status_get(&env, "/metrics").await;
    assert_eq!(series(&metrics, "hyco_standby_pairings_total", "hc1"), 3.0);
    assert_eq!(
        series(&metrics, "hyco_sender_disconnects_total", "hc1"),
        3.0
    );
}

#[tokio::test]
async fn any_other_end_closes_both_connections_as_before() {
    let env = start("reuse-not", |c| {
        c.extensions = hyco_relay::default_extensions()
    })
    .await;
    let _ctl = env.listen("hc1").await;
    // The sender closes with 1001: neither connection is kept, whatever was asked.
    let mut l = park(&env, true).await;
    parked(&env, 1.0).await;
    let (mut s, _) = raw_sender(&env, "standby, reuse").await;
    let (_, ()) = tokio::join!(serve_one(&mut l.ws, 1001), sender_one(&mut s, 1001));
    ends(&mut s).await;
    let mut probe = [0u8; 1];
    let end = tokio::time::timeout(T, l.ws.get_mut().read(&mut probe))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    parked(&env, 0.0).await;
    // A sender and a listener that did not ask: both connections end after a normal close.
    let mut l = park(&env, false).await;
    assert!(l.extensions.reuse, "offered all the same");
    parked(&env, 1.0).await;
    let (mut s, _) = raw_sender(&env, "standby").await;
    let (_, ()) = tokio::join!(serve_one(&mut l.ws, 1000), sender_one(&mut s, 1000));
    ends(&mut s).await;
    let end = tokio::time::timeout(T, l.ws.get_mut().read(&mut probe))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    parked(&env, 0.0).await;
}

#[tokio::test]
async fn a_relay_that_does_not_offer_it_keeps_nothing() {
    let env = start("reuse-off", |c| {
        c.extensions = hyco_relay::default_extensions();
        c.extensions.reuse = false;
    })
    .await;
    let _ctl = env.listen("hc1").await;
    let mut l = park(&env, true).await;
    assert!(!l.extensions.reuse, "not advertised");
    parked(&env, 1.0).await;
    let (mut s, head) = raw_sender(&env, "standby, reuse").await;
    assert!(!head.contains("reuse"), "{head}");
    let (_, ()) = tokio::join!(serve_one(&mut l.ws, 1000), sender_one(&mut s, 1000));
    ends(&mut s).await;
    parked(&env, 0.0).await;
}

/// A socket back from its tunnel is held to what binds a parked socket: a key regenerated
/// while the tunnel ran closes it (1008) instead of parking it again.
#[tokio::test]
async fn a_key_regenerated_during_the_tunnel_retires_the_socket_after_it() {
    let env = start("reuse-keys", |c| {
        c.extensions = hyco_relay::default_extensions()
    })
    .await;
    let mut ctl = env.listen("hc1").await;
    let with_app = env.rule_token("hc1", "app", r#"["Listen"]"#).await;
    let mut l = park_with(&env, &with_app, true).await;
    parked(&env, 1.0).await;
    let (mut s, head) = raw_sender(&env, "standby, reuse").await;
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(_) => {}
        other => panic!("expected the accept, got {other:?}"),
    }
    assert_eq!(env.regenerate_primary("hc1", "app").await, 200);
    // The tunnel itself goes on to its end, as any tunnel does after a key change.
    let mut ping = [0u8; 4];
    l.ws.read_exact(&mut ping).await.unwrap();
    l.ws.write_all(b"pong").await.unwrap();
    l.ws.shutdown().await.unwrap();
    sender_one(&mut s, 1000).await;
    let mut rest = Vec::new();
    l.ws.read_to_end(&mut rest).await.unwrap();
    // Both closed with 1000; the sender's connection is kept (its token was checked on its
    // own upgrade), the listener's socket gets the parked socket's Close for its key.
    let (tx, rx) = std::sync::mpsc::channel();
    l.ws.set_recycle(Box::new(Back(tx)));
    assert!(l.ws.recycle());
    let (io, rest) = rx.recv_timeout(T).unwrap();
    let mut back = WsStream::with_prefix(io, Role::Client, WsConfig::default(), &rest);
    match tokio::time::timeout(T, back.recv()).await.unwrap() {
        Ok(Message::Close(c)) => assert_eq!(c.map(|c| c.0), Some(1008)),
        other => panic!("expected a close, got {other:?}"),
    }
    parked(&env, 0.0).await;
    // The kept sender connection carries its next request; with nothing parked, through the
    // protocol's rendezvous.
    let listener = async {
        let a = match tokio::time::timeout(T, ctl.ws.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
                ListenerCommand::Accept(a) => a,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        env.connector.connect(&a.address, &[]).await.unwrap()
    };
    let (next, ping) = (
        connect_head(&env, "standby, reuse"),
        client_frame(0x82, b"ping"),
    );
    let (head, mut rendezvous) = tokio::join!(upgrade(&mut s, &next, &ping), listener);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ping = [0u8; 4];
    rendezvous.ws.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
}
