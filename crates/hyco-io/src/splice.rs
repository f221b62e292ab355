//! The relay's splice: two WebSocket connections (the relay is the server on both) joined frame
//! by frame.
//!
//! Each direction streams frames: the header is rewritten unmasked in place (it is always 4
//! bytes shorter than the masked one), the payload is unmasked in place in the read buffer and
//! written on. Whole frames are never buffered, so a frame announcing 2^40 bytes costs one
//! buffer, and a slow reader stops the other side through TCP back-pressure.
//!
//! Semantics, as protocol.md §5.4 asks:
//! * message type and boundaries are kept (FIN and opcode pass through). A data frame larger
//!   than [`MAX_FRAME`] goes on as several frames of at most that size, the first with its
//!   opcode and the rest continuations, FIN on the last only if the original had it: Azure
//!   delivers messages so, and Java's client (which caps frames at 64 KiB) relies on it;
//! * a Close from one peer is forwarded to the other with its code and reason and is **not**
//!   answered: the other direction keeps flowing until that peer closes too (half-close);
//! * a peer that vanishes without a Close (abort) ends the splice and the other connection is
//!   dropped without a Close, so it sees an error, not a clean end;
//! * a peer that breaks the framing rules gets a Close with the RFC code (1002, 1007), and the
//!   other side is dropped;
//! * pings are answered by the relay, pongs are dropped, neither is forwarded.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::bufpool;
use crate::ws::frame::{
    apply_mask, close_payload, parse_close, server_frame, FrameError, FrameHeader, OpCode,
};

/// Largest payload of a data frame the splice writes: Java's client refuses larger frames
/// (`ClientWebSocket.java` sets a 64 KiB message buffer, and Jetty checks each frame against it).
pub const MAX_FRAME: u64 = 64 * 1024;

/// Splice settings.
#[derive(Debug, Clone, Copy)]
pub struct SpliceConfig {
    /// Read buffer per direction. Large reads matter for throughput; memory is this times two
    /// per tunnel.
    pub buffer: usize,
    /// A write that makes no progress for this long ends the splice (a peer that stopped
    /// reading does not pin the tunnel forever).
    pub write_timeout: Duration,
}

impl Default for SpliceConfig {
    fn default() -> Self {
        SpliceConfig {
            buffer: crate::bufpool::SIZE,
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// Payload bytes moved, per direction, and the Close codes forwarded; shared so live views
/// can read them.
#[derive(Debug, Default)]
pub struct Counters {
    /// From peer A to peer B.
    pub a_to_b: AtomicU64,
    /// From peer B to peer A.
    pub b_to_a: AtomicU64,
    /// Close code peer A sent (0: none yet; 1005: a Close without a code).
    pub a_close: AtomicU32,
    /// Close code peer B sent.
    pub b_close: AtomicU32,
}

/// One of the two peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first argument of [`splice`].
    A,
    /// The second argument.
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// How a splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both peers sent Close; both Closes were forwarded.
    Closed,
    /// A peer's connection failed or ended without a Close; the other one was dropped.
    Aborted {
        /// The peer that went away.
        side: Side,
        /// What the socket said.
        error: io::Error,
    },
    /// A peer broke the WebSocket rules; it got a Close with the matching code.
    Protocol {
        /// The offender.
        side: Side,
        /// The violation.
        error: FrameError,
    },
    /// A peer did not accept data for [`SpliceConfig::write_timeout`].
    WriteStalled {
        /// The peer that stopped reading.
        side: Side,
    },
}

/// The pong a peer is owed; one slot, so a ping flood keeps one pending pong at most.
#[derive(Default)]
struct PongSlot {
    payload: Mutex<Option<Vec<u8>>>,
    notify: Notify,
}

impl PongSlot {
    fn set(&self, p: Vec<u8>) {
        if let Ok(mut g) = self.payload.lock() {
            *g = Some(p);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.payload.lock().ok().and_then(|mut g| g.take())
    }
}

enum DirError {
    Read(io::Error),
    Eof,
    Write(io::Error),
    Stalled,
    Protocol(FrameError),
}

/// Joins two server-side WebSocket connections until both have closed or one fails.
pub async fn splice<A, B>(a: A, b: B, cfg: SpliceConfig, counters: &Counters) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (end, kept) = splice_keep(a, b, cfg, counters).await;
    if let Some(k) = kept {
        let mut k = *k;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let _ = tokio::join!(k.a.shutdown(), k.b.shutdown());
        })
        .await;
    }
    end
}

/// Both connections after both Close frames went through, for a caller that keeps them (the
/// `reuse` extension): each with the bytes its peer sent after its Close, which belong to
/// whatever the connection carries next.
pub struct Kept<A, B> {
    /// Peer A's connection.
    pub a: A,
    /// What A sent after its Close.
    pub a_rest: Vec<u8>,
    /// Peer B's connection.
    pub b: B,
    /// What B sent after its Close.
    pub b_rest: Vec<u8>,
}

/// How long the end of a splice may take (a Close for a rule breaker, the shutdowns).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// [`splice`], but a splice that ended with both Closes ([`SpliceEnd::Closed`]) gives both
/// connections back, open, instead of shutting them down (boxed: a caller that holds them
/// across its own awaits keeps a pointer in its state, not two TLS connections). However else
/// it ends they are closed as [`splice`] closes them, and `None` comes back.
pub async fn splice_keep<A, B>(
    a: A,
    b: B,
    cfg: SpliceConfig,
    counters: &Counters,
) -> (SpliceEnd, Option<Box<Kept<A, B>>>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let pong_a = PongSlot::default();
    let pong_b = PongSlot::default();
    let result = {
        let d1 = forward(
            &mut ar,
            &mut bw,
            cfg,
            &pong_a,
            &pong_b,
            (&counters.a_to_b, &counters.a_close),
        );
        let d2 = forward(
            &mut br,
            &mut aw,
            cfg,
            &pong_b,
            &pong_a,
            (&counters.b_to_a, &counters.b_close),
        );
        tokio::pin!(d1, d2);
        let (mut rest1, mut rest2) = (None, None);
        loop {
            tokio::select! {
                r = &mut d1, if rest1.is_none() => match r {
                    Ok(rest) => rest1 = Some(rest),
                    Err(e) => break Err((Side::A, e)),
                },
                r = &mut d2, if rest2.is_none() => match r {
                    Ok(rest) => rest2 = Some(rest),
                    Err(e) => break Err((Side::B, e)),
                },
            }
            if rest1.is_some() && rest2.is_some() {
                break Ok((
                    rest1.take().unwrap_or_default(),
                    rest2.take().unwrap_or_default(),
                ));
            }
        }
    };
    match result {
        Ok((a_rest, b_rest)) => (
            SpliceEnd::Closed,
            Some(Box::new(Kept {
                a: ar.unsplit(aw),
                a_rest,
                b: br.unsplit(bw),
                b_rest,
            })),
        ),
        Err((reader_side, e)) => (failed(reader_side, e, &mut aw, &mut bw).await, None),
    }
}

/// How a splice that failed ended; a peer that broke the rules gets its Close first.
async fn failed<WA, WB>(reader_side: Side, e: DirError, aw: &mut WA, bw: &mut WB) -> SpliceEnd
where
    WA: AsyncWrite + Unpin,
    WB: AsyncWrite + Unpin,
{
    match e {
        DirError::Read(error) => SpliceEnd::Aborted {
            side: reader_side,
            error,
        },
        DirError::Eof => SpliceEnd::Aborted {
            side: reader_side,
            error: io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a close frame"),
        },
        DirError::Write(error) => SpliceEnd::Aborted {
            side: reader_side.other(),
            error,
        },
        DirError::Stalled => SpliceEnd::WriteStalled {
            side: reader_side.other(),
        },
        DirError::Protocol(error) => {
            let frame = server_frame(OpCode::Close, &close_payload(error.close_code(), ""));
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                match reader_side {
                    Side::A => send_and_shut(aw, &frame).await,
                    Side::B => send_and_shut(bw, &frame).await,
                }
            })
            .await;
            SpliceEnd::Protocol {
                side: reader_side,
                error,
            }
        }
    }
}

async fn send_and_shut<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) {
    let _ = w.write_all(frame).await;
    let _ = w.shutdown().await;
}

async fn write_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    limit: Duration,
) -> Result<(), DirError> {
    match tokio::time::timeout(limit, w.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DirError::Write(e)),
        Err(_) => Err(DirError::Stalled),
    }
}

/// A data frame being streamed through.
struct Streaming {
    /// Its masking key.
    mask: [u8; 4],
    /// Payload bytes still to come.
    left: u64,
    /// Offset into the payload (for the mask).
    off: usize,
    /// Bytes left of the frame being written (a piece of at most MAX_FRAME).
    piece_left: u64,
    /// Whether the frame read ends its message.
    fin: bool,
}

/// What one look at the read buffer did.
enum Step {
    /// Bytes were forwarded or state changed: look again.
    Again,
    /// Nothing more is complete in the buffer: read.
    NeedMore,
    /// The peer's Close went on: this direction is done.
    Closed,
}

/// One direction's writing half and state between reads.
struct Direction<'a, W> {
    w: &'a mut W,
    cfg: SpliceConfig,
    /// Pongs owed to the reading side's peer (written by the other direction).
    my_pong: &'a PongSlot,
    count: &'a AtomicU64,
    close_code: &'a AtomicU32,
    /// The data frame being streamed, if any.
    cur: Option<Streaming>,
    in_message: bool,
}

/// One direction: frames read from `r` (a client, so masked) are written unmasked to `w`.
/// `my_pong` collects pongs owed to `r`'s peer (written by the other direction); `their_pong`
/// holds pongs owed to `w`'s peer, which this direction writes between frames. Ends with the
/// bytes `r` sent after its Close.
async fn forward<R, W>(
    r: &mut R,
    w: &mut W,
    cfg: SpliceConfig,
    my_pong: &PongSlot,
    their_pong: &PongSlot,
    (count, close_code): (&AtomicU64, &AtomicU32),
) -> Result<Vec<u8>, DirError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Held only while bytes move (see `bufpool::ReadBuffer`).
    let mut big = bufpool::ReadBuffer::new(cfg.buffer.max(1024));
    let (mut start, mut end) = (0usize, 0usize);
    let mut d = Direction {
        w,
        cfg,
        my_pong,
        count,
        close_code,
        cur: None,
        in_message: false,
    };
    loop {
        // Forward everything that is complete in the buffer.
        while let Some(buf) = big.get_mut() {
            match d.step(buf, &mut start, end).await? {
                Step::Again => {}
                Step::NeedMore => break,
                Step::Closed => return Ok(buf[start..end].to_vec()),
            }
        }
        // Keep a partial header at the front, then read more.
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            if let Some(buf) = big.get_mut() {
                buf.copy_within(start..end, 0);
            }
            end -= start;
            start = 0;
        }
        // Everything complete is written; push it out before waiting for more. A TLS stream
        // may hold written bytes until it is flushed, and the peer may be waiting for exactly
        // those (found by the conformance run: echoes stalled until the next frame came).
        match tokio::time::timeout(cfg.write_timeout, d.w.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(DirError::Write(e)),
            Err(_) => return Err(DirError::Stalled),
        }
        let at_boundary = d.cur.is_none();
        let n = tokio::select! {
            biased;
            _ = their_pong.notify.notified(), if at_boundary => {
                if let Some(p) = their_pong.take() {
                    write_timed(d.w, &server_frame(OpCode::Pong, &p), cfg.write_timeout).await?;
                }
                continue;
            }
            r = std::future::poll_fn(|cx| big.poll_read_from(cx, std::pin::Pin::new(&mut *r), end)) => r.map_err(DirError::Read)?,
        };
        if n == 0 {
            return Err(DirError::Eof);
        }
        end += n;
    }
}

impl<W: AsyncWrite + Unpin> Direction<'_, W> {
    /// Forwards what is complete in `buf[*start..end]` of the current frame, or of the next
    /// one; moves `start` past what it consumed.
    async fn step(
        &mut self,
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
    ) -> Result<Step, DirError> {
        if let Some(c) = self.cur.as_ref() {
            if c.left == 0 {
                self.cur = None;
                return Ok(Step::Again);
            }
            if *start == end {
                return Ok(Step::NeedMore);
            }
            self.stream_on(buf, start, end).await?;
            return Ok(Step::Again);
        }
        let (h, hl) = match FrameHeader::parse(&buf[*start..end]) {
            Err(e) => return Err(DirError::Protocol(e)),
            Ok(None) => return Ok(Step::NeedMore),
            Ok(Some(x)) => x,
        };
        let Some(mask) = h.mask else {
            return Err(DirError::Protocol(FrameError::BadMask));
        };
        if h.opcode.is_control() {
            let (p, len) = (*start + hl, h.len as usize);
            if end - p < len {
                return Ok(Step::NeedMore);
            }
            *start = p + len;
            return self.control(h.opcode, mask, &mut buf[p..p + len]).await;
        }
        self.start_frame(h, hl, mask, buf, start, end).await?;
        Ok(Step::Again)
    }

    /// More payload of the data frame being streamed (`self.cur`).
    async fn stream_on(
        &mut self,
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
    ) -> Result<(), DirError> {
        let Some(c) = self.cur.as_mut() else {
            return Ok(());
        };
        // The next piece of a frame larger than MAX_FRAME starts with a continuation header of
        // its own. It goes in front of the payload in the buffer, over bytes already written,
        // when there is room (a piece rarely starts a read); else it is written alone.
        let mut from = *start;
        if c.piece_left == 0 {
            let out = FrameHeader {
                fin: c.fin && c.left <= MAX_FRAME,
                opcode: OpCode::Continuation,
                mask: None,
                len: c.left.min(MAX_FRAME),
            };
            let hn = out.encoded_len();
            if *start >= hn {
                from = *start - hn;
                out.encode(&mut buf[from..*start]);
            } else {
                let mut head = [0u8; 14];
                out.encode(&mut head);
                write_timed(self.w, &head[..hn], self.cfg.write_timeout).await?;
            }
            c.piece_left = out.len;
        }
        let n = (end - *start).min(c.piece_left as usize);
        apply_mask(&mut buf[*start..*start + n], c.mask, c.off);
        write_timed(self.w, &buf[from..*start + n], self.cfg.write_timeout).await?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        *start += n;
        c.left -= n as u64;
        c.piece_left -= n as u64;
        c.off += n;
        Ok(())
    }

    /// A control frame (`payload` still masked): a ping owes a pong, a pong is dropped, a Close
    /// goes on and ends this direction.
    async fn control(
        &mut self,
        op: OpCode,
        mask: [u8; 4],
        payload: &mut [u8],
    ) -> Result<Step, DirError> {
        apply_mask(payload, mask, 0);
        match op {
            OpCode::Ping => self.my_pong.set(payload.to_vec()),
            OpCode::Pong => {}
            _ => {
                let code = parse_close(payload)
                    .map_err(DirError::Protocol)?
                    .map_or(1005, |(c, _)| c);
                self.close_code.store(u32::from(code), Ordering::Relaxed);
                let frame = server_frame(OpCode::Close, payload);
                write_timed(self.w, &frame, self.cfg.write_timeout).await?;
                let _ = self.w.flush().await;
                return Ok(Step::Closed);
            }
        }
        Ok(Step::Again)
    }

    /// The start of a data frame: its header and whatever payload is already here.
    async fn start_frame(
        &mut self,
        h: FrameHeader,
        hl: usize,
        mask: [u8; 4],
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
    ) -> Result<(), DirError> {
        let ordered = match h.opcode {
            OpCode::Continuation => self.in_message,
            _ => !self.in_message,
        };
        if !ordered {
            return Err(DirError::Protocol(FrameError::BadFragmentation));
        }
        self.in_message = !h.fin;
        // Rewrite the header unmasked into the tail of the masked one (it is at least 4 bytes
        // shorter, also when a frame is cut to MAX_FRAME), then send it with whatever payload
        // is already here, in one write.
        let piece = h.len.min(MAX_FRAME);
        let out = FrameHeader {
            mask: None,
            fin: h.fin && h.len <= MAX_FRAME,
            len: piece,
            ..h
        };
        let ol = out.encoded_len();
        let hs = *start + hl - ol;
        out.encode(&mut buf[hs..*start + hl]);
        let n = (end - *start - hl).min(piece as usize);
        let p = *start + hl;
        apply_mask(&mut buf[p..p + n], mask, 0);
        write_timed(self.w, &buf[hs..p + n], self.cfg.write_timeout).await?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        *start = p + n;
        self.cur = Some(Streaming {
            mask,
            left: h.len - n as u64,
            off: n,
            piece_left: piece - n as u64,
            fin: h.fin,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
