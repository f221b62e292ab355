//! The in-process TCP endpoint the hybrid connection points at. It reads a [`Header`], plays its
//! side of the mode, and keeps counters of what it saw, including the anomalies the client
//! cannot see itself (its input ending early with a clean FIN, bytes after the announced size).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::wire::{Header, Mode, Payload, HEADER_LEN};

/// Longest the endpoint gives one connection (longer than the client's own bound, so the
/// client's timeout is what shows).
const SERVE_LIMIT: Duration = Duration::from_secs(180);

/// What the endpoint recorded for a `sink` transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkResult {
    /// Input ended with a clean FIN: its SHA-256 and length.
    Done { digest: [u8; 32], count: u64 },
    /// Input ended with an error (reset) after `count` bytes.
    Failed { count: u64 },
}

/// Something the endpoint saw that a healthy tunnel never produces on its own.
#[derive(Clone, Copy, Debug)]
pub struct Anomaly {
    pub id: u64,
    pub mode: Mode,
    pub kind: AnomalyKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnomalyKind {
    /// Fewer payload bytes than the header announced, then a clean end of stream.
    TruncatedCleanEof { got: u64, want: u64 },
    /// More bytes than the header announced.
    ExtraInput { extra: u64 },
}

/// The endpoint's counters.
#[derive(Default)]
pub struct EndpointStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Closed (cleanly or not) before a whole header arrived: a manager dials the endpoint
    /// before its rendezvous, so a sender that gave up early, or a manager that died, leaves
    /// these.
    pub no_header: AtomicU64,
    pub bad_header: AtomicU64,
    pub completed: AtomicU64,
    /// Input ended with an error (reset) mid-transfer.
    pub input_reset: AtomicU64,
    /// Writing failed mid-transfer.
    pub output_error: AtomicU64,
    pub truncated_clean_eof: AtomicU64,
    pub extra_input: AtomicU64,
    pub timeouts: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// The endpoint: listening socket, counters, sink results and anomalies.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub stats: EndpointStats,
    sinks: Mutex<HashMap<u64, SinkResult>>,
    sink_changed: Notify,
    anomalies: Mutex<Vec<Anomaly>>,
}

impl Endpoint {
    /// Binds on 127.0.0.1 and starts accepting.
    pub async fn start() -> anyhow::Result<Arc<Endpoint>> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let ep = Arc::new(Endpoint {
            addr: l.local_addr()?,
            stats: EndpointStats::default(),
            sinks: Mutex::new(HashMap::new()),
            sink_changed: Notify::new(),
            anomalies: Mutex::new(Vec::new()),
        });
        let ep2 = Arc::clone(&ep);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    // Out of descriptors or similar: keep serving.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let ep = Arc::clone(&ep2);
                tokio::spawn(async move { ep.serve(s).await });
            }
        });
        Ok(ep)
    }

    /// Anomalies so far.
    pub fn anomalies(&self) -> Vec<Anomaly> {
        self.anomalies.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn anomaly(&self, a: Anomaly) {
        match a.kind {
            AnomalyKind::TruncatedCleanEof { .. } => &self.stats.truncated_clean_eof,
            AnomalyKind::ExtraInput { .. } => &self.stats.extra_input,
        }
        .fetch_add(1, Relaxed);
        if let Ok(mut v) = self.anomalies.lock() {
            v.push(a);
        }
    }

    /// Waits for the sink result of transfer `id` (the caller bounds the wait) and removes it.
    pub async fn sink_result(&self, id: u64) -> SinkResult {
        loop {
            let changed = self.sink_changed.notified();
            if let Some(r) = self.sinks.lock().ok().and_then(|mut m| m.remove(&id)) {
                return r;
            }
            changed.await;
        }
    }

    /// Forgets the sink result of a transfer the client gave up on.
    pub fn forget_sink(&self, id: u64) {
        if let Ok(mut m) = self.sinks.lock() {
            m.remove(&id);
        }
    }

    fn put_sink(&self, id: u64, r: SinkResult) {
        if let Ok(mut m) = self.sinks.lock() {
            m.insert(id, r);
        }
        self.sink_changed.notify_waiters();
    }

    async fn serve(self: Arc<Self>, mut s: TcpStream) {
        self.stats.accepted.fetch_add(1, Relaxed);
        self.stats.active.fetch_add(1, Relaxed);
        let _ = s.set_nodelay(true);
        match tokio::time::timeout(SERVE_LIMIT, self.serve_inner(&mut s)).await {
            Ok(End::Done) => {
                self.stats.completed.fetch_add(1, Relaxed);
            }
            Ok(End::Reset) => {
                // Tell the peer it was not a clean end.
                let _ = s.set_zero_linger();
            }
            Ok(End::Quiet) => {}
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Relaxed);
                let _ = s.set_zero_linger();
            }
        }
        drop(s);
        self.stats.active.fetch_sub(1, Relaxed);
    }

    async fn serve_inner(&self, s: &mut TcpStream) -> End {
        let mut hb = [0u8; HEADER_LEN];
        if s.read_exact(&mut hb).await.is_err() {
            self.stats.no_header.fetch_add(1, Relaxed);
            return End::Quiet;
        }
        let Some(h) = Header::decode(&hb) else {
            self.stats.bad_header.fetch_add(1, Relaxed);
            return End::Reset;
        };
        let mut buf = vec![0u8; 256 * 1024];
        match h.mode {
            Mode::Echo => {
                let mut done = 0u64;
                while done < h.size {
                    let n = match self.read_piece(s, &mut buf, &h, done).await {
                        Ok(n) => n,
                        Err(end) => return end,
                    };
                    if s.write_all(&buf[..n]).await.is_err() {
                        return self.output_error();
                    }
                    self.stats.bytes_out.fetch_add(n as u64, Relaxed);
                    done += n as u64;
                }
                self.finish(s, &h, &mut buf).await
            }
            Mode::Download => {
                let mut p = Payload::new(h.seed);
                let mut cuts = StdRng::seed_from_u64(h.seed ^ 0x5eed_c0de);
                let mut done = 0u64;
                while done < h.size {
                    let n = cut(&mut cuts).min(h.size - done) as usize;
                    p.fill(&mut buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return self.output_error();
                    }
                    self.stats.bytes_out.fetch_add(n as u64, Relaxed);
                    done += n as u64;
                }
                self.finish(s, &h, &mut buf).await
            }
            Mode::Upload => {
                let mut hash = sha2::Sha256::new();
                let mut done = 0u64;
                while done < h.size {
                    let n = match self.read_piece(s, &mut buf, &h, done).await {
                        Ok(n) => n,
                        Err(end) => return end,
                    };
                    hash.update(&buf[..n]);
                    done += n as u64;
                }
                let mut answer = [0u8; crate::wire::UPLOAD_ANSWER_LEN];
                answer[..32].copy_from_slice(&hash.finalize());
                answer[32..].copy_from_slice(&done.to_le_bytes());
                if s.write_all(&answer).await.is_err() {
                    return self.output_error();
                }
                self.finish(s, &h, &mut buf).await
            }
            Mode::Sink => {
                if s.shutdown().await.is_err() {
                    return self.output_error();
                }
                let mut hash = sha2::Sha256::new();
                let mut done = 0u64;
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(_) => {
                            self.put_sink(h.id, SinkResult::Failed { count: done });
                            return self.input_reset();
                        }
                    };
                    self.stats.bytes_in.fetch_add(n as u64, Relaxed);
                    hash.update(&buf[..n]);
                    done += n as u64;
                }
                if done < h.size {
                    self.truncated(&h, done);
                } else if done > h.size {
                    self.anomaly(Anomaly {
                        id: h.id,
                        mode: h.mode,
                        kind: AnomalyKind::ExtraInput {
                            extra: done - h.size,
                        },
                    });
                }
                self.put_sink(
                    h.id,
                    SinkResult::Done {
                        digest: hash.finalize().into(),
                        count: done,
                    },
                );
                if done == h.size {
                    End::Done
                } else {
                    End::Reset
                }
            }
        }
    }

    /// Output complete: half-close, then read the client's end of stream (late or early),
    /// which must carry no more bytes.
    async fn finish(&self, s: &mut TcpStream, h: &Header, buf: &mut [u8]) -> End {
        if s.shutdown().await.is_err() {
            return self.output_error();
        }
        let mut extra = 0u64;
        loop {
            match s.read(buf).await {
                Ok(0) => break,
                Ok(n) => extra += n as u64,
                Err(_) => return self.input_reset(),
            }
        }
        if extra > 0 {
            self.anomaly(Anomaly {
                id: h.id,
                mode: h.mode,
                kind: AnomalyKind::ExtraInput { extra },
            });
            return End::Reset;
        }
        End::Done
    }

    /// Reads the next piece of the announced input, `done` bytes of it read so far; counted. A
    /// clean end before the announced size is an anomaly, a reset is counted.
    async fn read_piece(
        &self,
        s: &mut TcpStream,
        buf: &mut [u8],
        h: &Header,
        done: u64,
    ) -> Result<usize, End> {
        let want = (h.size - done).min(buf.len() as u64) as usize;
        match s.read(&mut buf[..want]).await {
            Ok(0) => Err(self.truncated(h, done)),
            Ok(n) => {
                self.stats.bytes_in.fetch_add(n as u64, Relaxed);
                Ok(n)
            }
            Err(_) => Err(self.input_reset()),
        }
    }

    fn truncated(&self, h: &Header, got: u64) -> End {
        self.anomaly(Anomaly {
            id: h.id,
            mode: h.mode,
            kind: AnomalyKind::TruncatedCleanEof { got, want: h.size },
        });
        End::Reset
    }

    fn input_reset(&self) -> End {
        self.stats.input_reset.fetch_add(1, Relaxed);
        End::Quiet
    }

    fn output_error(&self) -> End {
        self.stats.output_error.fetch_add(1, Relaxed);
        End::Reset
    }
}

enum End {
    /// Everything as the mode says.
    Done,
    /// Something was wrong: close with a reset.
    Reset,
    /// The peer is gone already.
    Quiet,
}

/// A write size: mostly large, sometimes tiny, so frames of every size travel.
pub fn cut(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..10) {
        0 => rng.gen_range(1..=16),
        1 => rng.gen_range(17..=1500),
        2..=5 => rng.gen_range(1501..=16 * 1024),
        _ => rng.gen_range(16 * 1024 + 1..=256 * 1024),
    }
}
