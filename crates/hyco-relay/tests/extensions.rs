//! The agents' side of the hyco extensions (docs/design-notes.md, "Connect in one round
//! trip") against the real relay, in-process: `hyco_client`'s listener parks standby sockets and
//! is joined to senders through them, its refusals travel as 4xxx Closes, its pool replaces
//! what senders use; a sender sends early data once the relay has said it may. With the
//! relay's extensions switched off, the same agents work the classic way.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{eventually, series, start, status_get, Env, T};

use hyco_client::{
    connect_with, ConnectOptions, HybridListener, HybridStream, Incoming, ListenerOptions,
    ListenerStatus,
};
use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The root key's connection string for `hc`.
fn cs(env: &Env, hc: &str) -> ConnectionString {
    ConnectionString::parse(&format!(
        "Endpoint=sb://localhost:{}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={hc}",
        env.port,
        env.key_name,
        env.key.expose()
    ))
    .unwrap()
}

async fn parked_now(env: &Env, hc: &str) -> f64 {
    series(
        &status_get(env, "/metrics").await,
        "hyco_standby_sockets",
        hc,
    )
}

/// A `hyco_client` listener on `hc`, once its control channel is up.
async fn listener(
    env: &Env,
    hc: &str,
    opts: ListenerOptions,
) -> (HybridListener, mpsc::Receiver<Incoming>, CancellationToken) {
    let stop = CancellationToken::new();
    let (l, rx) =
        HybridListener::start(cs(env, hc), env.connector.clone(), opts, stop.clone()).unwrap();
    let mut w = l.status_watch();
    tokio::time::timeout(T, async {
        while !matches!(*w.borrow_and_update(), ListenerStatus::Connected { .. }) {
            w.changed().await.unwrap();
        }
    })
    .await
    .expect("listener connected within 10 s");
    (l, rx, stop)
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a sender within 10 s")
        .unwrap()
}

/// A hyco sender: early data, and a parked socket may take it.
fn hyco_sender() -> ConnectOptions {
    ConnectOptions {
        early_data: true,
        ..ConnectOptions::default()
    }
}

/// A sender's connect and the listener's accept side by side (a classic connect completes only
/// once the listener accepted); returns the two ends and whether it came by a parked socket.
async fn pair(
    cs: &ConnectionString,
    env: &Env,
    opts: &ConnectOptions,
    rx: &mut mpsc::Receiver<Incoming>,
) -> (HybridStream, HybridStream, bool) {
    let (s, l) = tokio::join!(connect_with(cs, &env.connector, opts), async {
        let inc = next(rx).await;
        let standby = inc.is_standby();
        (inc.accept().await.unwrap(), standby)
    });
    (s.unwrap(), l.0, l.1)
}

/// Reads exactly `buf.len()` bytes, within 10 s.
async fn fill(s: &mut HybridStream, buf: &mut [u8]) {
    tokio::time::timeout(T, s.read_exact(buf))
        .await
        .unwrap()
        .unwrap();
}

/// `a` says `ping`, `b` answers `pong`.
async fn echo(a: &mut HybridStream, b: &mut HybridStream) {
    a.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    fill(b, &mut buf).await;
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").await.unwrap();
    fill(a, &mut buf).await;
    assert_eq!(&buf, b"pong");
}

/// What a sender reads after the listener refused it through its parked socket.
async fn close_seen(s: &mut HybridStream) -> Option<(u16, String)> {
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "end of stream");
    s.peer_close().cloned().flatten()
}

#[tokio::test]
async fn senders_are_joined_through_parked_sockets_and_the_pool_refills() {
    let env = start("ext-standby", |c| {
        c.extensions = hyco_relay::default_extensions()
    })
    .await;
    let (_l, mut rx, _stop) = listener(&env, "hc10", ListenerOptions::default()).await;
    // The pool starts at 2.
    eventually(|| async { parked_now(&env, "hc10").await == 2.0 }).await;

    let sender_cs = cs(&env, "hc10");
    let mut s = connect_with(&sender_cs, &env.connector, &hyco_sender())
        .await
        .unwrap();
    let inc = next(&mut rx).await;
    // Through a parked socket: no `accept` on the control channel, no rendezvous to dial.
    assert!(inc.is_standby(), "the sender came by the control channel");
    assert!(hyco_proto::address::is_valid_id(inc.id()));
    let mut l = inc.accept().await.unwrap();
    echo(&mut s, &mut l).await;
    echo(&mut l, &mut s).await;
    // The used socket is replaced at once (the tunnel stays open meanwhile).
    eventually(|| async { parked_now(&env, "hc10").await == 2.0 }).await;
    // A sender that does not take parked sockets (the library's default, Microsoft's
    // clients) gets the classic rendezvous although two are parked.
    let (mut ms, mut ml, standby) =
        pair(&sender_cs, &env, &ConnectOptions::default(), &mut rx).await;
    assert!(
        !standby,
        "a sender that did not opt in was joined to a parked socket"
    );
    echo(&mut ms, &mut ml).await;

    // A refusal is a 4000 + status Close, which the sender sees.
    let mut s2 = connect_with(&sender_cs, &env.connector, &hyco_sender())
        .await
        .unwrap();
    let inc = next(&mut rx).await;
    assert!(inc.is_standby());
    inc.reject(403, "not today").await.unwrap();
    assert_eq!(close_seen(&mut s2).await, Some((4403, "not today".into())));
    // A status outside 400..=599 is sent as 500.
    let mut s3 = connect_with(&sender_cs, &env.connector, &hyco_sender())
        .await
        .unwrap();
    next(&mut rx).await.reject(302, "moved").await.unwrap();
    assert_eq!(close_seen(&mut s3).await.map(|c| c.0), Some(4500));

    // The first tunnel still works after all that.
    echo(&mut s, &mut l).await;
    // A burst grows the pool: 4 senders in a moment ask for twice the busiest second's
    // arrivals (8, or at least 4 should the moment straddle a second).
    let mut held = Vec::new();
    for _ in 0..4 {
        // The pool may not have refilled yet: then the classic rendezvous runs.
        let (s, l, _) = pair(&sender_cs, &env, &hyco_sender(), &mut rx).await;
        held.push((s, l));
    }
    eventually(|| async { parked_now(&env, "hc10").await >= 4.0 }).await;
    for (s, l) in &mut held {
        echo(s, l).await;
    }
}

#[tokio::test]
async fn a_stopped_listener_leaves_no_parked_socket_behind() {
    let env = start("ext-stop", |c| {
        c.extensions = hyco_relay::default_extensions()
    })
    .await;
    let (l, _rx, _stop) = listener(&env, "hc10", ListenerOptions::default()).await;
    eventually(|| async { parked_now(&env, "hc10").await == 2.0 }).await;
    drop(l);
    eventually(|| async { parked_now(&env, "hc10").await == 0.0 }).await;
    // standby_max 0: never parks, works the classic way.
    let (_l, mut rx, _stop) = listener(
        &env,
        "hc10",
        ListenerOptions {
            standby_max: 0,
            ..ListenerOptions::default()
        },
    )
    .await;
    let (mut s, mut l, standby) =
        pair(&cs(&env, "hc10"), &env, &ConnectOptions::default(), &mut rx).await;
    assert!(!standby);
    echo(&mut s, &mut l).await;
    assert_eq!(parked_now(&env, "hc10").await, 0.0);
}

#[tokio::test]
async fn early_data_goes_out_before_the_101_once_the_relay_said_so() {
    let env = start("ext-early", |c| {
        c.extensions = hyco_relay::default_extensions()
    })
    .await;
    let (_l, mut rx, _stop) = listener(&env, "hc10", ListenerOptions::default()).await;
    let sender_cs = cs(&env, "hc10");
    let early = ConnectOptions {
        early_data: true,
        ..ConnectOptions::default()
    };
    // The first connect is classic; its 101 says the relay takes early data.
    assert_eq!(env.connector.early_data_for("localhost", env.port), None);
    // (Side by side with the accept: before the pool has parked a socket, the classic
    // rendezvous runs, and its connect completes only once the listener accepted.)
    let (mut s, mut l, _) = pair(&sender_cs, &env, &early, &mut rx).await;
    assert!(!s.response_pending());
    assert!(env
        .connector
        .early_data_for("localhost", env.port)
        .is_some());
    echo(&mut s, &mut l).await;

    // Now the connect returns before the relay answered, and the first bytes go with it.
    let mut s = connect_with(&sender_cs, &env.connector, &early)
        .await
        .unwrap();
    assert!(s.response_pending());
    s.write_all(b"early bytes").await.unwrap();
    assert!(s.response_pending(), "written before the 101 was read");
    let mut l = next(&mut rx).await.accept().await.unwrap();
    let mut buf = [0u8; 11];
    fill(&mut l, &mut buf).await;
    assert_eq!(&buf, b"early bytes");
    l.write_all(b"pong").await.unwrap();
    let mut back = [0u8; 4];
    fill(&mut s, &mut back).await;
    assert_eq!(&back, b"pong");
    assert!(!s.response_pending());

    // A refusal after early data is the stream's error, carrying the relay's status.
    let mut s = connect_with(&cs(&env, "nosuchhc"), &env.connector, &early)
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let e = tokio::time::timeout(T, s.read(&mut back))
        .await
        .unwrap()
        .unwrap_err();
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<hyco_io::ws::ConnectError>())
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(inner.status(), Some(404), "{inner}");
}

#[tokio::test]
async fn with_the_extensions_off_the_same_agents_work_the_classic_way() {
    let env = start("ext-off", |c| {
        c.extensions = hyco_proto::ext::Extensions::default()
    })
    .await;
    let (_l, mut rx, _stop) = listener(&env, "hc10", ListenerOptions::default()).await;
    let sender_cs = cs(&env, "hc10");
    let early = ConnectOptions {
        early_data: true,
        ..ConnectOptions::default()
    };
    for _ in 0..2 {
        let (mut s, mut l, standby) = pair(&sender_cs, &env, &early, &mut rx).await;
        assert!(
            !s.response_pending(),
            "no early data without the relay's word"
        );
        assert!(!standby, "an accept on the control channel");
        echo(&mut s, &mut l).await;
    }
    assert_eq!(env.connector.early_data_for("localhost", env.port), None);
    assert_eq!(parked_now(&env, "hc10").await, 0.0);
    // A refusal is the classic reject, seen by the connect.
    let pending = tokio::spawn({
        let (cs, c) = (sender_cs.clone(), env.connector.clone());
        async move { connect_with(&cs, &c, &ConnectOptions::default()).await }
    });
    next(&mut rx).await.reject(403, "not today").await.unwrap();
    let e = pending.await.unwrap().unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
}
