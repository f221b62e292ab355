//! Warm connections (`hyco_io::ws::warm`): a connect that finds one uses it and opens no new
//! TCP connection. The relay is reached through a counting TCP relay in the test; once it stops
//! forwarding new connections, only a warm connection can still carry a connect.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{relay, T};
use hyco_client::{connect_with, ConnectOptions};
use hyco_io::ws::warm::WarmConfig;
use hyco_proto::ConnectionString;
use hyco_testkit::{echo_server, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Forwards TCP connections to `to`, counting them; while `frozen`, new ones are held open and
/// never forwarded.
async fn gate(to: u16, frozen: Arc<AtomicBool>, count: Arc<AtomicUsize>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if frozen.load(Ordering::SeqCst) {
                held.push(s);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut r) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut r).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_uses_a_warm_connection_and_opens_no_new_one() {
    let r = relay("warm").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("w", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("w", 1).await;
    let (frozen, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let port = gate(r.port, frozen.clone(), count.clone()).await;
    let mut c = r.connector();
    c.timeout = Duration::from_secs(5);
    c.set_relay_addrs("localhost", r.port, vec![("127.0.0.1".into(), port)]);
    c.set_warm(WarmConfig {
        size: 1,
        ..WarmConfig::default()
    });
    let cs = ConnectionString::parse(&s).unwrap();
    let echo_once = |c: hyco_client::Connector, cs: ConnectionString| async move {
        let mut st = connect_with(&cs, &c, &ConnectOptions::default()).await?;
        st.write_all(b"w").await?;
        let mut b = [0u8; 1];
        st.read_exact(&mut b).await?;
        anyhow::Ok(())
    };
    // The first connect dials; the pool then keeps one connection ready.
    echo_once(c.clone(), cs.clone()).await.unwrap();
    eventually("one warm connection", T, || async { c.warm_held() == 1 }).await;
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // New TCP connections no longer reach the relay: the next connect succeeds only on the
    // warm one.
    frozen.store(true, Ordering::SeqCst);
    echo_once(c.clone(), cs.clone())
        .await
        .expect("the connect did not use the warm connection");
    // With the gate frozen, the refill cannot complete, and a connect without a warm
    // connection fails: the pool really was what carried the previous one.
    eventually("the refill dialled", T, || async {
        count.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(c.warm_held(), 0);
    assert!(echo_once(c.clone(), cs.clone()).await.is_err());
}

/// A burst of connects grows the pool to the burst's size, so the next burst finds a warm
/// connection for each of its connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_grows_the_pool_to_the_burst() {
    let r = relay("warm-burst").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("w", &echo.to_string()).await;
    let _m = r.manager("manager", &l);
    r.wait_listeners("w", 1).await;
    let mut c = r.connector();
    c.timeout = Duration::from_secs(5);
    c.set_warm(WarmConfig {
        size: 1,
        ..WarmConfig::default()
    });
    let cs = ConnectionString::parse(&s).unwrap();
    let burst = (0..4).map(|_| {
        let (c, cs) = (c.clone(), cs.clone());
        tokio::spawn(async move {
            let mut st = connect_with(&cs, &c, &ConnectOptions::default())
                .await
                .unwrap();
            st.write_all(b"b").await.unwrap();
            let mut b = [0u8; 1];
            st.read_exact(&mut b).await.unwrap();
        })
    });
    for t in burst.collect::<Vec<_>>() {
        t.await.unwrap();
    }
    eventually("four warm connections", T, || async { c.warm_held() == 4 }).await;
}
