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

/// Seals 16 KiB records with AES-128-GCM in `$provider` (ring and aws-lc-rs share the API)
/// for about `$secs` of wall clock; bytes per CPU second of this thread (see [`seal_rate`]).
macro_rules! seal_loop {
    ($provider:ident, $secs:expr) => {{
        use $provider::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| anyhow::anyhow!("AES key"))?,
        );
        let mut record = vec![0x5au8; RECORD];
        let t0 = tokio::time::Instant::now();
        let cpu0 = thread_cpu_ns();
        let mut sealed = 0u64;
        let mut seq = 0u64;
        // At least one batch, whatever `$secs` is: the rate is never 0 / 0.
        loop {
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
            if t0.elapsed().as_secs_f64() >= $secs {
                break;
            }
        }
        let secs = cpu_secs_since(cpu0, t0);
        anyhow::Ok(sealed as f64 / secs)
    }};
}

/// One side's X25519 work in a TLS 1.3 handshake (a key pair, then the shared secret) in
/// `$provider`: microseconds of this thread's CPU each, over about `$secs`.
macro_rules! x25519_loop {
    ($provider:ident, $secs:expr, $agree:expr) => {{
        use $provider::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519};
        let rng = $provider::rand::SystemRandom::new();
        let peer = EphemeralPrivateKey::generate(&X25519, &rng)
            .and_then(|k| k.compute_public_key())
            .map_err(|_| anyhow::anyhow!("X25519 key"))?;
        let peer = UnparsedPublicKey::new(&X25519, peer.as_ref().to_vec());
        let t0 = tokio::time::Instant::now();
        let cpu0 = thread_cpu_ns();
        let mut n = 0u64;
        // At least one batch, whatever `$secs` is: never a division by 0.
        loop {
            for _ in 0..32 {
                let key = EphemeralPrivateKey::generate(&X25519, &rng)
                    .map_err(|_| anyhow::anyhow!("X25519 key"))?;
                let public = key
                    .compute_public_key()
                    .map_err(|_| anyhow::anyhow!("X25519"))?;
                let _ = std::hint::black_box(public);
                $agree(key, &peer)?;
                n += 1;
            }
            if t0.elapsed().as_secs_f64() >= $secs {
                break;
            }
        }
        anyhow::Ok(cpu_secs_since(cpu0, t0) / n as f64 * 1e6)
    }};
}

/// Bytes per second of CPU time one thread seals 16 KiB records with AES-128-GCM in ring
/// (the crate and cipher of hyco's TLS: `hyco_io::tls` puts TLS13_AES_128_GCM_SHA256 first),
/// sealing for about `secs`. Per second on the CPU (the thread's run time from
/// `/proc/thread-self/schedstat`), not of the wall clock: the cores are shared, and the floor is
/// about CPU per byte. The wall clock when the kernel does not keep that figure.
pub fn seal_rate(secs: f64) -> Result<f64> {
    seal_loop!(ring, secs)
}

/// The two crypto providers rustls offers, on this CPU: AES-128-GCM bytes sealed per CPU
/// second (every byte of a tunnel is sealed and opened twice) and the CPU of one side's
/// X25519 in a handshake (every new tunnel costs two resumed handshakes, each two sides).
/// hyco uses the one this shows ahead for bulk; docs/BENCHMARKS.md, "Crypto provider".
pub fn providers(secs: f64) -> Result<serde_json::Value> {
    let ring_agree = |k, p: &ring::agreement::UnparsedPublicKey<Vec<u8>>| {
        ring::agreement::agree_ephemeral(k, p, |s| {
            let _ = std::hint::black_box(s.len());
        })
        .map_err(|_| anyhow::anyhow!("X25519 agree"))
    };
    let lc_agree = |k, p: &aws_lc_rs::agreement::UnparsedPublicKey<Vec<u8>>| {
        aws_lc_rs::agreement::agree_ephemeral(k, p, (), |s| {
            let _ = std::hint::black_box(s.len());
            Ok(())
        })
        .map_err(|_| anyhow::anyhow!("X25519 agree"))
    };
    let round = |x: f64, digits: i32| {
        let m = 10f64.powi(digits);
        (x * m).round() / m
    };
    Ok(serde_json::json!({
        "ring": {
            "seal_gb_per_s": round(seal_loop!(ring, secs)? / 1e9, 2),
            "x25519_us": round(x25519_loop!(ring, secs, ring_agree)?, 1),
        },
        "aws-lc-rs": {
            "seal_gb_per_s": round(seal_loop!(aws_lc_rs, secs)? / 1e9, 2),
            "x25519_us": round(x25519_loop!(aws_lc_rs, secs, lc_agree)?, 1),
        },
    }))
}

/// Seconds of this thread's CPU since `cpu0` (from [`thread_cpu_ns`]), else of the wall
/// clock since `t0`.
fn cpu_secs_since(cpu0: Option<u64>, t0: tokio::time::Instant) -> f64 {
    match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => t0.elapsed().as_secs_f64(),
    }
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

    #[test]
    fn compares_both_providers() {
        // 0 s still measures one batch each: finite, positive figures.
        for secs in [0.0, 0.02] {
            let v = providers(secs).expect("providers");
            for p in ["ring", "aws-lc-rs"] {
                let seal = v[p]["seal_gb_per_s"].as_f64().expect("seal");
                let x = v[p]["x25519_us"].as_f64().expect("x25519");
                assert!(seal.is_finite() && seal > 0.0, "{v}");
                assert!(x.is_finite() && x > 0.0, "{v}");
            }
        }
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
