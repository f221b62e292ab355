//! One checked transfer from the client side: connect, send the header, play the mode, verify
//! by SHA-256 (and find the first wrong byte when there is one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::endpoint::{cut, Endpoint, SinkResult};
use crate::wire::{Checker, Header, Mode, Payload, UPLOAD_ANSWER_LEN};

/// How one transfer goes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub header: Header,
    /// Abort (RST, linger 0) once this many payload bytes moved either way.
    pub abort_at: Option<u64>,
}

impl Plan {
    /// A random plan: mode uniform, size log-uniform in 0..=max_size, half-close order random,
    /// an abort at a random point with probability `p_abort`.
    pub fn random(rng: &mut StdRng, id: u64, modes: &[Mode], max_size: u64, p_abort: f64) -> Plan {
        let mode = modes
            .get(rng.gen_range(0..modes.len().max(1)))
            .copied()
            .unwrap_or(Mode::Echo);
        let size = log_uniform(rng, max_size);
        let header = Header {
            mode,
            late_close: rng.gen_bool(0.5),
            id,
            size,
            seed: rng.gen(),
        };
        let total = match mode {
            Mode::Echo => 2 * size,
            _ => size,
        };
        let abort_at = rng.gen_bool(p_abort).then(|| rng.gen_range(0..=total));
        Plan { header, abort_at }
    }
}

/// Log-uniform in 0..=max: `exp(U(0, ln(max + 1))) - 1`, so every order of magnitude is
/// about as likely.
pub fn log_uniform(rng: &mut StdRng, max: u64) -> u64 {
    let hi = ((max as f64) + 1.0).ln();
    let v = rng.gen_range(0.0..=hi).exp() - 1.0;
    (v.max(0.0) as u64).min(max)
}

/// Bytes moved so far, shared by a transfer's two directions (each payload byte counted once,
/// when written by the client or read by it).
#[derive(Default)]
pub struct Moved {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// Where a transfer is, for the live line and for timeouts: which step, bytes each way, and the
/// client's local port (the forwarder logs it as the tunnel's `peer`).
#[derive(Default)]
pub struct Trace {
    phase: std::sync::atomic::AtomicU8,
    pub up: AtomicU64,
    pub down: AtomicU64,
    pub port: AtomicU64,
}

/// Step names, by [`Trace`] phase code.
const PHASES: [&str; 9] = [
    "connect",
    "header",
    "send",
    "half-close",
    "receive",
    "read answer",
    "late half-close",
    "wait for the endpoint's sink result",
    "verify",
];

impl Trace {
    /// Back to the start, for the next transfer.
    pub fn reset(&self) {
        self.phase.store(0, Relaxed);
        self.up.store(0, Relaxed);
        self.down.store(0, Relaxed);
        self.port.store(0, Relaxed);
    }
    fn at(&self, phase: u8) {
        self.phase.store(phase, Relaxed);
    }
    /// The current step's name.
    pub fn phase(&self) -> &'static str {
        PHASES
            .get(usize::from(self.phase.load(Relaxed)))
            .copied()
            .unwrap_or("?")
    }
}

/// Why a transfer did not complete with verified data.
#[derive(Debug)]
pub enum Failure {
    /// Connecting to the forwarder's port failed (refused: it is being restarted).
    Connect(std::io::ErrorKind),
    /// A read, write or half-close failed (reset, broken pipe...) in `phase`.
    Io {
        kind: std::io::ErrorKind,
        phase: &'static str,
    },
    /// Fewer bytes than expected came back, then a clean end of stream.
    ShortCleanEof { got: u64, want: u64 },
    /// More bytes than expected came back.
    Extra { got: u64, want: u64 },
    /// All bytes came (the count is right) but their SHA-256 is wrong.
    HashMismatch { len: u64, first_diff: Option<u64> },
    /// In `upload`/`sink`, the endpoint counted fewer bytes than were sent with a clean end.
    EndpointShort { got: u64, want: u64 },
    /// In `sink`, the endpoint's input ended with an error.
    EndpointReset { got: u64 },
    /// The client aborted on purpose (RST).
    Aborted,
    /// Over the per-transfer bound, stuck in this step.
    Timeout { phase: &'static str },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(k) => write!(f, "connect: {k:?}"),
            Failure::Io { kind, phase } => write!(f, "{phase}: {kind:?}"),
            Failure::ShortCleanEof { got, want } => {
                write!(f, "{got} of {want} bytes, then a clean end of stream")
            }
            Failure::Extra { got, want } => write!(f, "{got} bytes where {want} were expected"),
            Failure::HashMismatch { len, first_diff } => write!(
                f,
                "SHA-256 mismatch over {len} bytes (first wrong byte: {})",
                first_diff.map_or("unknown".into(), |d| d.to_string())
            ),
            Failure::EndpointShort { got, want } => {
                write!(
                    f,
                    "the endpoint got {got} of {want} bytes, then a clean end"
                )
            }
            Failure::EndpointReset { got } => {
                write!(f, "the endpoint's input was reset after {got} bytes")
            }
            Failure::Aborted => write!(f, "aborted by the client"),
            Failure::Timeout { phase } => write!(f, "timed out in {phase}"),
        }
    }
}

impl Failure {
    fn io(phase: &'static str) -> impl Fn(std::io::Error) -> Failure {
        move |e| Failure::Io {
            kind: e.kind(),
            phase,
        }
    }
}

/// Abort trigger shared by a transfer's two directions.
struct Progress<'a> {
    moved: AtomicU64,
    abort_at: Option<u64>,
    trace: &'a Trace,
}

impl Progress<'_> {
    fn check(&self) -> Result<(), Failure> {
        match self.abort_at {
            Some(a) if self.moved.load(Relaxed) >= a => Err(Failure::Aborted),
            _ => Ok(()),
        }
    }
    fn advance(&self, n: usize) -> Result<(), Failure> {
        self.moved.fetch_add(n as u64, Relaxed);
        self.check()
    }
}

/// Runs one transfer against `addr`. The caller bounds it in time; the socket is reset when
/// the client aborts.
pub async fn run(
    addr: SocketAddr,
    plan: Plan,
    endpoint: &Endpoint,
    moved: &Moved,
    trace: &Trace,
) -> Result<(), Failure> {
    trace.reset();
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Connect(e.kind()))?;
    let _ = s.set_nodelay(true);
    if let Ok(a) = s.local_addr() {
        trace.port.store(u64::from(a.port()), Relaxed);
    }
    let prog = Progress {
        moved: AtomicU64::new(0),
        abort_at: plan.abort_at,
        trace,
    };
    let r = drive(&mut s, &plan.header, &prog, endpoint, moved).await;
    if matches!(r, Err(Failure::Aborted)) {
        let _ = s.set_zero_linger();
    }
    if r.is_err() && plan.header.mode == Mode::Sink {
        endpoint.forget_sink(plan.header.id);
    }
    r
}

async fn drive(
    s: &mut TcpStream,
    h: &Header,
    prog: &Progress<'_>,
    endpoint: &Endpoint,
    moved: &Moved,
) -> Result<(), Failure> {
    let t = prog.trace;
    t.at(1);
    s.write_all(&h.encode())
        .await
        .map_err(Failure::io("header"))?;
    t.at(2);
    prog.check()?;
    let mut cuts = StdRng::seed_from_u64(h.seed.rotate_left(17) ^ h.id);
    match h.mode {
        Mode::Echo => {
            let (mut r, mut w) = s.split();
            let send = async {
                let d = send(&mut w, h, prog, &mut cuts, moved).await?;
                if !h.late_close {
                    w.shutdown().await.map_err(Failure::io("half-close"))?;
                }
                // Sending done: what is left is receiving.
                t.at(4);
                Ok(d)
            };
            let (sent, got) = tokio::try_join!(send, receive(&mut r, h.seed, prog, moved))?;
            if h.late_close {
                t.at(6);
                s.shutdown().await.map_err(Failure::io("late half-close"))?;
            }
            t.at(8);
            verify(got, h.size, Some(sent))
        }
        Mode::Download => {
            if !h.late_close {
                t.at(3);
                s.shutdown().await.map_err(Failure::io("half-close"))?;
            }
            t.at(4);
            let got = receive(s, h.seed, prog, moved).await?;
            if h.late_close {
                t.at(6);
                s.shutdown().await.map_err(Failure::io("late half-close"))?;
            }
            t.at(8);
            verify(got, h.size, None)
        }
        Mode::Upload => {
            let sent = send(s, h, prog, &mut cuts, moved).await?;
            if !h.late_close {
                t.at(3);
                s.shutdown().await.map_err(Failure::io("half-close"))?;
            }
            t.at(5);
            let mut answer = Vec::with_capacity(UPLOAD_ANSWER_LEN);
            (&mut *s)
                .take(1024)
                .read_to_end(&mut answer)
                .await
                .map_err(Failure::io("read answer"))?;
            t.down.store(answer.len() as u64, Relaxed);
            if h.late_close {
                t.at(6);
                s.shutdown().await.map_err(Failure::io("late half-close"))?;
            }
            t.at(8);
            if answer.len() < UPLOAD_ANSWER_LEN {
                return Err(Failure::ShortCleanEof {
                    got: answer.len() as u64,
                    want: UPLOAD_ANSWER_LEN as u64,
                });
            }
            if answer.len() > UPLOAD_ANSWER_LEN {
                return Err(Failure::Extra {
                    got: answer.len() as u64,
                    want: UPLOAD_ANSWER_LEN as u64,
                });
            }
            let mut count = [0u8; 8];
            count.copy_from_slice(&answer[32..40]);
            let count = u64::from_le_bytes(count);
            if count != h.size {
                return Err(Failure::EndpointShort {
                    got: count,
                    want: h.size,
                });
            }
            if answer[..32] != sent {
                return Err(Failure::HashMismatch {
                    len: count,
                    first_diff: None,
                });
            }
            Ok(())
        }
        Mode::Sink => {
            let (mut r, mut w) = s.split();
            let send = async {
                let d = send(&mut w, h, prog, &mut cuts, moved).await?;
                t.at(3);
                w.shutdown().await.map_err(Failure::io("half-close"))?;
                Ok(d)
            };
            let eof = async {
                let mut b = [0u8; 64];
                let n = r.read(&mut b).await.map_err(Failure::io("read eof"))?;
                if n > 0 {
                    return Err(Failure::Extra {
                        got: n as u64,
                        want: 0,
                    });
                }
                Ok(())
            };
            let (sent, ()) = tokio::try_join!(send, eof)?;
            t.at(7);
            let result = endpoint.sink_result(h.id).await;
            t.at(8);
            match result {
                SinkResult::Done { count, .. } if count < h.size => Err(Failure::EndpointShort {
                    got: count,
                    want: h.size,
                }),
                SinkResult::Done { count, .. } if count > h.size => Err(Failure::Extra {
                    got: count,
                    want: h.size,
                }),
                SinkResult::Done { digest, count } => {
                    if digest == sent {
                        Ok(())
                    } else {
                        Err(Failure::HashMismatch {
                            len: count,
                            first_diff: None,
                        })
                    }
                }
                SinkResult::Failed { count } => Err(Failure::EndpointReset { got: count }),
            }
        }
    }
}

/// Sends the header's `size` bytes of its seed's stream in random cuts; returns their SHA-256.
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    h: &Header,
    prog: &Progress<'_>,
    cuts: &mut StdRng,
    moved: &Moved,
) -> Result<[u8; 32], Failure> {
    let mut p = Payload::new(h.seed);
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    while done < h.size {
        let n = cut(cuts).min(h.size - done) as usize;
        p.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).await.map_err(Failure::io("write"))?;
        moved.up.fetch_add(n as u64, Relaxed);
        prog.trace.up.fetch_add(n as u64, Relaxed);
        done += n as u64;
        prog.advance(n)?;
    }
    Ok(hash.finalize().into())
}

/// Reads to the end of stream, checking against the seed's stream as it comes.
async fn receive<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    prog: &Progress<'_>,
    moved: &Moved,
) -> Result<Checker, Failure> {
    let mut c = Checker::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.map_err(Failure::io("read"))?;
        if n == 0 {
            return Ok(c);
        }
        c.update(&buf[..n]);
        moved.down.fetch_add(n as u64, Relaxed);
        prog.trace.down.fetch_add(n as u64, Relaxed);
        prog.advance(n)?;
    }
}

fn verify(got: Checker, size: u64, sent: Option<[u8; 32]>) -> Result<(), Failure> {
    let len = got.len;
    let first_diff = got.first_diff;
    let (got_hash, want_hash) = got.finish();
    if len < size {
        return Err(Failure::ShortCleanEof {
            got: len,
            want: size,
        });
    }
    if len > size {
        return Err(Failure::Extra {
            got: len,
            want: size,
        });
    }
    if got_hash != want_hash || first_diff.is_some() || sent.is_some_and(|s| s != got_hash) {
        return Err(Failure::HashMismatch { len, first_diff });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes_cover_the_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let v: Vec<u64> = (0..20_000)
            .map(|_| log_uniform(&mut rng, 8 << 20))
            .collect();
        assert!(v.iter().all(|&x| x <= 8 << 20));
        assert!(v.contains(&0));
        assert!(v.iter().any(|&x| x < 100));
        assert!(v.iter().any(|&x| x > 4 << 20));
    }

    /// Every mode, both half-close orders, straight to the endpoint (no hyco in between).
    #[tokio::test]
    async fn every_mode_verifies_directly() {
        let ep = Endpoint::start().await.unwrap();
        let moved = Moved::default();
        let mut id = 0;
        for mode in Mode::ALL {
            for late_close in [false, true] {
                for size in [0u64, 1, 70_000, 1 << 20] {
                    id += 1;
                    let plan = Plan {
                        header: Header {
                            mode,
                            late_close,
                            id,
                            size,
                            seed: id * 31,
                        },
                        abort_at: None,
                    };
                    let r = tokio::time::timeout(
                        Duration::from_secs(20),
                        run(ep.addr, plan, &ep, &moved, &Trace::default()),
                    )
                    .await
                    .expect("bounded");
                    assert!(r.is_ok(), "{mode:?} late={late_close} size={size}: {r:?}");
                }
            }
        }
        assert!(ep.anomalies().is_empty(), "{:?}", ep.anomalies());
    }

    /// An abort mid-transfer fails with `Aborted`, and the endpoint sees a reset (not a clean,
    /// short input).
    #[tokio::test]
    async fn abort_resets() {
        let ep = Endpoint::start().await.unwrap();
        let moved = Moved::default();
        let plan = Plan {
            header: Header {
                mode: Mode::Upload,
                late_close: false,
                id: 1,
                size: 4 << 20,
                seed: 9,
            },
            abort_at: Some(1 << 20),
        };
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            run(ep.addr, plan, &ep, &moved, &Trace::default()),
        )
        .await
        .expect("bounded");
        assert!(matches!(r, Err(Failure::Aborted)), "{r:?}");
        hyco_testkit::eventually("a reset seen", Duration::from_secs(10), || async {
            ep.stats.input_reset.load(Relaxed) > 0
        })
        .await;
        assert!(ep.anomalies().is_empty());
    }

    /// A connection that ends cleanly before the announced size is caught on both sides.
    #[tokio::test]
    async fn short_input_is_an_anomaly() {
        let ep = Endpoint::start().await.unwrap();
        let mut s = TcpStream::connect(ep.addr).await.unwrap();
        let h = Header {
            mode: Mode::Echo,
            late_close: false,
            id: 77,
            size: 1000,
            seed: 3,
        };
        s.write_all(&h.encode()).await.unwrap();
        let mut part = vec![0u8; 10];
        Payload::new(3).fill(&mut part);
        s.write_all(&part).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
            .await
            .expect("bounded");
        // The 10 bytes come back, then a reset (not a clean end).
        assert!(r.is_err(), "{r:?}");
        let a = ep.anomalies();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].id, 77);
        assert_eq!(
            a[0].kind,
            crate::endpoint::AnomalyKind::TruncatedCleanEof {
                got: 10,
                want: 1000
            }
        );
    }
}
