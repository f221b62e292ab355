//! The floor of bulk CPU per byte (issue 16, "Bulk"): what the path's design costs at least,
//! measured in the same run as hyco's figure, so that hyco's CPU per GB is a ratio to it.
//!
//! hyco's bulk path is app → forwarder → relay → manager → service: four loopback hops through
//! three relaying processes, and four AEAD passes (the forwarder seals, the relay opens and
//! seals, the manager opens). The floor is
//!
//! - the three relaying hops as plain TCP relays (256 KiB buffers, on one thread of this
//!   process): the CPU they spend per GB, measured with iperf3 through them; plus
//! - four AEAD passes per byte at the rate one core of this machine seals 16 KiB records with
//!   ring's AES-128-GCM (the suite hyco's TLS puts first); opening is taken to cost what sealing
//!   does.
//!
//! WebSocket framing and masking, TLS records, and the scheduling of three processes (the plain
//! relays share one thread) are above the floor: they are what the ratio shows.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The plaintext of one record.
const RECORD: usize = 16 * 1024;

/// Bytes per second of CPU time one thread seals 16 KiB records with AES-128-GCM in ring
/// (the crate and cipher of hyco's TLS: `hyco_io::tls` puts TLS13_AES_128_GCM_SHA256 first),
/// sealing for about `secs`. Per second on the CPU (the thread's run time from
/// `/proc/thread-self/schedstat`), not of the wall clock: the cores are shared, and the floor is
/// about CPU per byte. The wall clock when the kernel does not keep that figure.
pub fn seal_rate(secs: f64) -> Result<f64> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| anyhow::anyhow!("AES key"))?,
    );
    let mut record = vec![0x5au8; RECORD];
    let t0 = tokio::time::Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut sealed = 0u64;
    let mut seq = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&seq.to_be_bytes());
            // As a TLS 1.3 record: the 5-byte header is the additional data.
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([23u8, 3, 3, 0x40, 0x11]),
                    &mut record,
                )
                .map_err(|_| anyhow::anyhow!("seal"))?;
            let _ = std::hint::black_box(tag);
            seq += 1;
            sealed += RECORD as u64;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let secs = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    Ok(sealed as f64 / secs)
}

/// Nanoseconds this thread has run on a CPU (the first field of its schedstat).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A chain of `hops` plain TCP relays in front of `target`, on one thread of their own (a
/// single-threaded runtime: no worker wakes another, the least CPU a byte can cost to pass
/// them); the first one's address. They stop when the returned guard is dropped.
pub async fn plain_relays(target: SocketAddr, hops: usize) -> Result<(SocketAddr, PlainRelays)> {
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<Result<SocketAddr>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = addr_tx.send(Err(e.into()));
                return;
            }
        };
        rt.block_on(async move {
            match chain(target, hops).await {
                Ok((first, set)) => {
                    let _ = addr_tx.send(Ok(first));
                    let _ = stop_rx.await;
                    drop(set);
                }
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                }
            }
        });
    });
    let guard = PlainRelays {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    let first = addr_rx.await??;
    Ok((first, guard))
}

/// Stops the plain relays' thread when dropped.
pub struct PlainRelays {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PlainRelays {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn chain(target: SocketAddr, hops: usize) -> Result<(SocketAddr, JoinSet<()>)> {
    let mut set = JoinSet::new();
    let mut next = target;
    for _ in 0..hops {
        let l = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = l.local_addr()?;
        let upstream = next;
        set.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                while conns.try_join_next().is_some() {}
                conns.spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut down,
                        &mut up,
                        256 * 1024,
                        256 * 1024,
                    )
                    .await;
                });
            }
        });
        next = addr;
    }
    Ok((next, set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn seals_some() {
        let r = seal_rate(0.05).expect("seal");
        assert!(r > 0.0);
    }

    #[tokio::test]
    async fn relays_carry_bytes_both_ways() {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let target = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let (first, _relays) = plain_relays(target, 3).await.expect("relays");
        let mut s = TcpStream::connect(first).await.expect("connect");
        s.write_all(b"through three").await.expect("write");
        let mut b = [0u8; 13];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(&b, b"through three");
    }
}
