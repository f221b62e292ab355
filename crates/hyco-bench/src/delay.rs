//! A delayed link in user space (this kernel has no netem): a TCP proxy on 127.0.0.1 that
//! holds every byte for a fixed one-way delay in each direction before passing it on, keeps
//! the order, bounds what it holds per direction, and can limit the rate.
//!
//! Model: a chunk read at `t` is written at `t + delay` (with a rate limit, at
//! `max(t, previous departure) + len / rate + delay`, the serialization of a link). The timer
//! rounds up to the next millisecond, so a byte is held at least `delay`, never less. The TCP
//! handshake is not charged: the proxy accepts locally and dials its upstream at once, so a
//! new connection pays the delays of the bytes it exchanges (TLS handshakes, HTTP upgrades,
//! the application's data), not the SYN round trip. Every path measured through these links
//! gets the same treatment.
//!
//! At most `queue_bytes` per direction are held in user space (read but not yet written);
//! beyond that the proxy stops reading and TCP's flow control pushes back on the sender. So
//! a direction carries at most `queue_bytes / delay` bytes per second.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One direction's largest read.
const CHUNK: usize = 16 * 1024;

/// How a link behaves (the same in both directions).
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Added one way, in each direction.
    pub delay: Duration,
    /// Bytes held per direction at most (read, not yet written); at least 1.
    pub queue_bytes: usize,
    /// Bytes per second per direction; `None`: no limit.
    pub rate: Option<u64>,
}

impl LinkConfig {
    /// `delay` each way, 4 MiB held per direction at most, no rate limit.
    pub fn with_delay(delay: Duration) -> LinkConfig {
        LinkConfig {
            delay,
            queue_bytes: 4 << 20,
            rate: None,
        }
    }
}

/// What a link has held, summed over its connections and directions.
#[derive(Default, Debug)]
pub struct LinkStats {
    held: AtomicUsize,
    /// The most bytes held by one direction of one connection at any time.
    held_high: AtomicUsize,
}

impl LinkStats {
    /// The most bytes one direction of one connection held at once.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn held_high_water(&self) -> usize {
        self.held_high.load(Ordering::Relaxed)
    }

    /// Bytes held now, all connections and directions.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// A running link: connections to [`DelayLink::addr`] are relayed to the upstream. Stops
/// (and drops every connection) when dropped.
pub struct DelayLink {
    addr: SocketAddr,
    stats: Arc<LinkStats>,
    accept: JoinHandle<()>,
}

impl DelayLink {
    /// Listens on 127.0.0.1, port chosen by the system, and relays to `upstream`.
    pub async fn start(upstream: SocketAddr, cfg: LinkConfig) -> std::io::Result<DelayLink> {
        let cfg = LinkConfig {
            queue_bytes: cfg.queue_bytes.max(1),
            ..cfg
        };
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(LinkStats::default());
        let st = Arc::clone(&stats);
        let accept = tokio::spawn(async move {
            // Every connection's tasks end with the link: aborted when this task is.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (down, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(_) => {
                        // Out of descriptors, most likely: try again shortly.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                while conns.try_join_next().is_some() {}
                let st = Arc::clone(&st);
                conns.spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    // Aborted with this task (the guards drop).
                    let mut a = AbortOnDrop(tokio::spawn(direction(dr, uw, cfg, Arc::clone(&st))));
                    let mut b = AbortOnDrop(tokio::spawn(direction(ur, dw, cfg, st)));
                    let _ = tokio::join!(&mut a.0, &mut b.0);
                });
            }
        });
        Ok(DelayLink {
            addr,
            stats,
            accept,
        })
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the link has held.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One direction: a reader stamps each chunk with its departure time and queues it (holding
/// budget from a byte semaphore), a writer sends it at that time. EOF is passed on as a
/// shutdown of the write side once the queue is drained; an error ends both.
async fn direction<R, W>(mut r: R, mut w: W, cfg: LinkConfig, stats: Arc<LinkStats>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let chunk = CHUNK.min(cfg.queue_bytes);
    let budget = Arc::new(Semaphore::new(cfg.queue_bytes));
    // Bytes this direction holds (for the high-water mark).
    let mine = Arc::new(AtomicUsize::new(0));
    // Unbounded in count, bounded in bytes: each queued chunk holds its length in `budget`.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = {
        let budget = Arc::clone(&budget);
        let stats = Arc::clone(&stats);
        let mine = Arc::clone(&mine);
        tokio::spawn(async move {
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                let n = bytes.len();
                let ok = w.write_all(&bytes).await.is_ok();
                drop(bytes);
                mine.fetch_sub(n, Ordering::Relaxed);
                stats.held.fetch_sub(n, Ordering::Relaxed);
                budget.add_permits(n);
                if !ok {
                    // The reader must not wait for room that will never be given back.
                    budget.close();
                    return;
                }
            }
            let _ = w.shutdown().await;
        })
    };
    let mut writer = AbortOnDrop(writer);
    let mut buf = vec![0u8; chunk];
    // When the link is free again (with a rate limit).
    let mut free_at = Instant::now();
    loop {
        // Room for a whole read first, so the bytes held never pass `queue_bytes`.
        let Ok(permit) = budget.acquire_many(chunk as u32).await else {
            return;
        };
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Keep `n` of the reserved bytes for the queued chunk; give the rest back.
        permit.forget();
        budget.add_permits(chunk - n);
        let now = Instant::now();
        let departs = match cfg.rate {
            Some(rate) if rate > 0 => {
                let wire = Duration::from_secs_f64(n as f64 / rate as f64);
                free_at = free_at.max(now) + wire;
                free_at
            }
            _ => now,
        };
        let held = mine.fetch_add(n, Ordering::Relaxed) + n;
        stats.held.fetch_add(n, Ordering::Relaxed);
        stats.held_high.fetch_max(held, Ordering::Relaxed);
        if tx.send((departs + cfg.delay, buf[..n].to_vec())).is_err() {
            return;
        }
    }
    drop(tx);
    // Let the writer drain and pass the EOF on.
    let _ = (&mut writer.0).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that echoes everything back.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let a = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    const T: Duration = Duration::from_secs(30);

    /// Everything `r` yields up to its end, within `T`.
    async fn read_all(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(T, r.read_to_end(&mut got))
            .await
            .expect("within the time")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn keeps_the_order_of_many_small_writes_both_ways() {
        let link = DelayLink::start(
            echo().await,
            LinkConfig {
                delay: Duration::from_millis(5),
                // Smaller than what is sent, so the queue fills and drains many times.
                queue_bytes: 40_000,
                rate: None,
            },
        )
        .await
        .expect("link");
        let s = TcpStream::connect(link.addr()).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        let data = pattern(1_000_000);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Writes of 1 to 5 000 bytes.
            let mut off = 0;
            let mut step = 1;
            while off < sent.len() {
                let end = (off + step).min(sent.len());
                w.write_all(&sent[off..end]).await.expect("write");
                off = end;
                step = step * 3 % 4999 + 1;
            }
            w.shutdown().await.expect("shutdown");
        });
        let got = read_all(&mut r).await;
        writer.await.expect("writer");
        assert_eq!(got.len(), data.len(), "every byte came back, and the EOF");
        assert!(got == data, "in the order sent");
    }

    #[tokio::test]
    async fn holds_each_direction_at_least_the_delay() {
        let delay = Duration::from_millis(60);
        let link = DelayLink::start(echo().await, LinkConfig::with_delay(delay))
            .await
            .expect("link");
        let mut s = TcpStream::connect(link.addr()).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        for round in 0..3u8 {
            let t0 = Instant::now();
            s.write_all(&[round; 100]).await.expect("write");
            let mut b = [0u8; 100];
            tokio::time::timeout(T, s.read_exact(&mut b))
                .await
                .expect("within the time")
                .expect("read");
            assert_eq!(b, [round; 100]);
            // Out through the link and back: two one-way delays.
            let rtt = t0.elapsed();
            assert!(rtt >= 2 * delay, "round trip {rtt:?} < 2 × {delay:?}");
        }
    }

    #[tokio::test]
    async fn a_rate_limit_spaces_the_bytes() {
        // 200 000 bytes at 1 MB/s take at least 0.2 s on the wire, plus the delay.
        let link = DelayLink::start(
            echo().await,
            LinkConfig {
                delay: Duration::from_millis(10),
                queue_bytes: 1 << 20,
                rate: Some(1_000_000),
            },
        )
        .await
        .expect("link");
        let s = TcpStream::connect(link.addr()).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        let data = pattern(200_000);
        let t0 = Instant::now();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.expect("write");
            w.shutdown().await.expect("shutdown");
        });
        let got = read_all(&mut r).await;
        writer.await.expect("writer");
        let took = t0.elapsed();
        assert!(got == data, "all bytes, in order");
        assert!(
            took >= Duration::from_millis(200 + 10),
            "200 kB at 1 MB/s arrived in {took:?}"
        );
    }

    #[tokio::test]
    async fn holds_no_more_than_its_queue_when_the_reader_is_slow() {
        // A server that accepts and reads nothing until told to.
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let upstream = l.local_addr().expect("addr");
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let _ = go_rx.await;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        });
        let queue = 256 * 1024;
        let link = DelayLink::start(
            upstream,
            LinkConfig {
                delay: Duration::from_millis(1),
                queue_bytes: queue,
                rate: None,
            },
        )
        .await
        .expect("link");
        let s = TcpStream::connect(link.addr()).await.expect("connect");
        let (_r, mut w) = s.into_split();
        // Write until a write waits for a whole second (the proxy stopped reading and the
        // kernel's buffers are full), or 64 MiB: far more than the queue and the buffers.
        let block = pattern(64 * 1024);
        let mut written = 0usize;
        while written < 64 << 20 {
            let off = written % block.len();
            // A `write` that has to wait writes nothing, so the count stays exact.
            match tokio::time::timeout(Duration::from_secs(1), w.write(&block[off..])).await {
                Ok(r) => written += r.expect("write"),
                Err(_) => break,
            }
        }
        let high = link.stats().held_high_water();
        assert!(
            written < 64 << 20,
            "the writer was never held back: {written} bytes went in"
        );
        assert!(high > 0, "the link held nothing");
        assert!(
            high <= queue,
            "held {high} bytes, more than the {queue} allowed"
        );
        // The reader catches up: everything that went in arrives, in order.
        let _ = go_tx.send(());
        w.shutdown().await.expect("shutdown");
        let got = tokio::time::timeout(T, server)
            .await
            .expect("within the time")
            .expect("server");
        assert_eq!(got.len(), written);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, b)| *b == block[i % block.len()]),
            "in order"
        );
        assert_eq!(link.stats().held(), 0, "nothing left held");
    }
}
