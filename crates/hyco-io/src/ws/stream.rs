//! [`WsStream`]: one WebSocket endpoint over any byte stream, usable two ways.
//!
//! * As a byte stream (`AsyncRead + AsyncWrite`): each write becomes one binary message, reads
//!   return payload bytes of data messages in order, a Close from the peer reads as end of
//!   stream, and `shutdown()` sends our Close while reading goes on. That is TCP half-close
//!   carried over WebSocket, which is what the tunnel needs.
//! * As a message channel (`recv`, `send_text`, …): whole messages with size and fragment
//!   limits, for the control channel.
//!
//! Pings are answered here (at most one pong pending, so a ping flood costs no memory), pongs
//! are ignored, and no Close is ever sent on the user's behalf: half-close is the caller's call.
//!
//! Every read path keeps its state in `self` and awaits only the inner `poll_read`, so
//! `recv` and `read` are cancel-safe and can sit in a `select!` beside a sender queue.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::early::Pending;
use super::frame::{
    apply_mask, close_payload, mask_copy, parse_close, FrameError, FrameHeader, OpCode,
};
use crate::bufpool;

/// Which side of the WebSocket we are: clients mask what they send, servers do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We opened the connection.
    Client,
    /// We accepted it.
    Server,
}

/// Limits for one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct WsConfig {
    /// Largest whole message `recv` assembles (control channel: 64 KiB).
    pub max_message: usize,
    /// Most frames one message may arrive in, for `recv`.
    pub max_fragments: usize,
    /// Largest frame a single `poll_write` produces.
    pub max_frame_out: usize,
    /// Read buffer for headers and small frames; large payloads are read straight into the
    /// caller's buffer. Small, since every tunnel end holds one for its whole life.
    pub read_buffer: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message: 64 * 1024,
            max_fragments: 64,
            max_frame_out: 256 * 1024,
            read_buffer: 2 * 1024,
        }
    }
}

/// The longest frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_HEADER: usize = 14;

/// A whole message, as `recv` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (validated UTF-8).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// The peer's Close: code and reason, or `None` when it carried no status.
    Close(Option<(u16, String)>),
}

/// A piece of a data message, as [`WsStream::recv_part`] returns it: for bodies too large to
/// hold whole (HTTP mode streams them as the fragments of one binary message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Payload bytes of a data message.
    Data {
        /// Whether the message is text (bytes are not checked for UTF-8 here).
        text: bool,
        /// The first piece of its message.
        first: bool,
        /// The last piece of its message (may be empty: an empty final frame).
        fin: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The peer's Close.
    Close(Option<(u16, String)>),
}

/// Errors of the message API.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The peer broke the framing rules; we queued a Close with the matching code.
    #[error("websocket protocol violation: {0}")]
    Protocol(#[from] FrameError),
    /// The connection ended without a Close frame.
    #[error("connection ended without a close frame")]
    Aborted,
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(io::Error),
}

impl From<io::Error> for WsError {
    fn from(e: io::Error) -> Self {
        if let Some(f) = e.get_ref().and_then(|i| i.downcast_ref::<FrameError>()) {
            return WsError::Protocol(*f);
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return WsError::Aborted;
        }
        WsError::Io(e)
    }
}

impl WsError {
    /// The close code to report for this error, where one applies.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(f) => Some(f.close_code()),
            _ => None,
        }
    }
}

/// A peer's Close: code and reason, or `None` when it carried no status.
pub type CloseInfo = Option<(u16, String)>;

struct Current {
    header: FrameHeader,
    remaining: u64,
    offset: usize,
}

/// Where a connection goes when its WebSocket ended normally and both ends keep it (the
/// `reuse` extension): a pool of the agent's. Dropped without [`Recycle::give_back`], it
/// learns that the connection will not come back.
pub trait Recycle<S>: Send + Sync {
    /// The connection, open, with the bytes read past the peer's Close.
    fn give_back(self: Box<Self>, io: S, rest: Vec<u8>);
}

/// One WebSocket endpoint. See the module docs.
pub struct WsStream<S> {
    io: S,
    role: Role,
    cfg: WsConfig,
    /// Bytes read from `io` and not yet consumed: `rbuf[rstart..rend]`.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// The data frame whose payload is being read.
    cur: Option<Current>,
    /// Opcode of the fragmented data message in progress, for ordering checks.
    msg: Option<OpCode>,
    /// `recv`'s partial message.
    assembly: Vec<u8>,
    /// `recv_part`: opcode of the message being streamed, and whether a piece of it went out.
    part_op: Option<OpCode>,
    part_started: bool,
    assembly_op: Option<OpCode>,
    fragments: usize,
    /// A data frame from the byte-stream API waiting to be written: `dbuf[dpos..dlen]`, in a
    /// pooled buffer held only until it is written. It always goes out before `wbuf`.
    dbuf: bufpool::Slot,
    dpos: usize,
    dlen: usize,
    /// Other encoded frames waiting to be written (control frames, messages): `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The latest unanswered ping's payload; one slot, so floods cost nothing.
    pending_pong: Option<Vec<u8>>,
    /// Set once the peer's Close arrived.
    peer_closed: Option<CloseInfo>,
    /// Set once our Close is queued; nothing may be written after it.
    sent_close: bool,
    /// The code of our Close.
    sent_code: u16,
    /// Where the connection goes after a normal end ([`WsStream::recycle`]).
    recycle: Option<Box<dyn Recycle<S>>>,
    /// Frames read so far (pongs included): liveness for ping deadlines.
    frames: u64,
    /// A transport error met by a read that had already returned payload: reported by the
    /// next read.
    read_err: Option<io::Error>,
    /// Early data (`super::early`): the upgrade response has not been read yet. Reads read it
    /// first; writes let only its budget of bytes out before it.
    pending: Option<Box<Pending>>,
}

impl<S> std::fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("role", &self.role)
            .field("peer_closed", &self.peer_closed.is_some())
            .field("sent_close", &self.sent_close)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps a stream on which the WebSocket handshake is complete.
    pub fn new(io: S, role: Role, cfg: WsConfig) -> Self {
        WsStream {
            io,
            role,
            rbuf: vec![0u8; cfg.read_buffer.max(256)].into_boxed_slice(),
            cfg,
            rstart: 0,
            rend: 0,
            cur: None,
            msg: None,
            assembly: Vec::new(),
            assembly_op: None,
            part_op: None,
            part_started: false,
            fragments: 0,
            dbuf: bufpool::Slot::default(),
            dpos: 0,
            dlen: 0,
            wbuf: Vec::new(),
            wpos: 0,
            pending_pong: None,
            peer_closed: None,
            sent_close: false,
            sent_code: 0,
            recycle: None,
            frames: 0,
            read_err: None,
            pending: None,
        }
    }

    /// A client endpoint whose upgrade request went out and whose response has not been read:
    /// see [`super::early`].
    pub fn with_pending_response(io: S, cfg: WsConfig, pending: Pending) -> Self {
        let mut s = Self::new(io, Role::Client, cfg);
        s.pending = Some(Box::new(pending));
        s
    }

    /// Whether the upgrade response is still to be read (early data).
    pub fn response_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Reads the pending upgrade response, if any; the bytes behind it go into the read buffer.
    /// Ready with how many did.
    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(p) = self.pending.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let rest = ready!(p.poll_response(&mut self.io, cx))?;
        self.pending = None;
        // Nothing was read into `rbuf` while the response was pending.
        if rest.len() > self.rbuf.len() - self.rend {
            let mut grown = vec![0u8; self.rend + rest.len()].into_boxed_slice();
            grown[..self.rend].copy_from_slice(&self.rbuf[..self.rend]);
            self.rbuf = grown;
        }
        self.rbuf[self.rend..self.rend + rest.len()].copy_from_slice(&rest);
        self.rend += rest.len();
        Poll::Ready(Ok(rest.len()))
    }

    /// How many bytes may be written to the transport now: all of them, but while the upgrade
    /// response is pending only what is left of the early-data budget; with none left, waits
    /// for (and reads) the response.
    fn poll_write_cap(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match &self.pending {
            None => Poll::Ready(Ok(usize::MAX)),
            Some(p) if p.failure().is_some() => Poll::Ready(Err(p
                .failure()
                .unwrap_or_else(|| io::Error::other("refused")))),
            Some(p) if p.budget() > 0 => Poll::Ready(Ok(p.budget())),
            Some(_) => {
                ready!(self.poll_response(cx))?;
                Poll::Ready(Ok(usize::MAX))
            }
        }
    }

    /// A write failed: while the response is pending, the relay's answer (a refusal it sent
    /// before it closed) explains it better than the broken pipe.
    fn write_failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if self.pending.is_some() {
            if let Poll::Ready(Err(answer)) = self.poll_response(cx) {
                return answer;
            }
        }
        e
    }

    /// Counts bytes written while the response is pending.
    fn wrote(&mut self, n: usize) {
        if let Some(p) = self.pending.as_mut() {
            p.spent(n);
        }
    }

    /// Like [`WsStream::new`], with bytes that were read past the handshake.
    pub fn with_prefix(io: S, role: Role, cfg: WsConfig, prefix: &[u8]) -> Self {
        let mut s = Self::new(io, role, cfg);
        if prefix.len() > s.rbuf.len() {
            s.rbuf = vec![0u8; prefix.len()].into_boxed_slice();
        }
        s.rbuf[..prefix.len()].copy_from_slice(prefix);
        s.rend = prefix.len();
        s
    }

    /// The peer's Close, once it arrived.
    pub fn peer_close(&self) -> Option<&CloseInfo> {
        self.peer_closed.as_ref()
    }

    /// Frames received so far, pongs included. A ping deadline compares two readings.
    pub fn frames_received(&self) -> u64 {
        self.frames
    }

    /// Whether our Close has been queued.
    pub fn close_sent(&self) -> bool {
        self.sent_close
    }

    /// Where the connection goes after a normal end, for [`WsStream::recycle`].
    pub fn set_recycle(&mut self, to: Box<dyn Recycle<S>>) {
        self.recycle = Some(to);
    }

    /// Whether [`WsStream::recycle`] would give the connection back now: a place to give it
    /// to, both Closes through with 1000, and nothing of ours or the peer's half-done.
    pub fn reusable(&self) -> bool {
        self.recycle.is_some()
            && self.sent_close
            && self.sent_code == 1000
            && matches!(self.peer_closed, Some(Some((1000, _))))
            && self.cur.is_none()
            && self.pending.is_none()
            && self.read_err.is_none()
            && self.dpos == self.dlen
            && self.wpos == self.wbuf.len()
    }

    /// Ends the endpoint. A connection both ends keep after a normal end (see
    /// [`WsStream::reusable`]: the relay applies the same rule) goes back where
    /// [`WsStream::set_recycle`] said, with the bytes read past the peer's Close; otherwise it
    /// is dropped. Returns whether it went back.
    pub fn recycle(self) -> bool {
        let reusable = self.reusable();
        let WsStream {
            io,
            rbuf,
            rstart,
            rend,
            recycle,
            ..
        } = self;
        match recycle {
            Some(to) if reusable => {
                to.give_back(io, rbuf[rstart..rend].to_vec());
                true
            }
            _ => false,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The underlying stream. Reading from it skips whatever this endpoint has buffered; once
    /// both Close frames are through, it shows how the transport itself ends.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    // === reading ===

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.pending.is_some() {
            let n = ready!(self.poll_response(cx))?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > 0 && self.rbuf.len() - self.rend < 256 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let mut rb = ReadBuf::new(&mut self.rbuf[self.rend..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.rend += n;
        Poll::Ready(Ok(n))
    }

    /// Makes sure `n` bytes (n ≤ 125 + header) are buffered; `false` on end of stream.
    fn poll_need(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<io::Result<bool>> {
        while self.rend - self.rstart < n {
            if self.rbuf.len() - self.rstart < n {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(false));
            }
        }
        Poll::Ready(Ok(true))
    }

    fn fail(&mut self, e: FrameError) -> io::Error {
        if !self.sent_close {
            self.queue_frame(
                OpCode::Close,
                true,
                &close_payload(e.close_code(), &e.to_string()),
            );
            self.sent_close = true;
            self.sent_code = e.close_code();
        }
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// Reads the next frame header; `None` on end of stream.
    fn poll_header(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<FrameHeader>>> {
        loop {
            match FrameHeader::parse(&self.rbuf[self.rstart..self.rend]) {
                Err(e) => return Poll::Ready(Err(self.fail(e))),
                Ok(Some((h, n))) => {
                    self.rstart += n;
                    self.frames += 1;
                    let masked_ok = match self.role {
                        Role::Server => h.mask.is_some(),
                        Role::Client => h.mask.is_none(),
                    };
                    if !masked_ok {
                        return Poll::Ready(Err(self.fail(FrameError::BadMask)));
                    }
                    if !h.opcode.is_control() {
                        let ok = match (h.opcode, self.msg) {
                            (OpCode::Continuation, None) => false,
                            (OpCode::Continuation, Some(_)) => true,
                            (_, Some(_)) => false,
                            (op, None) => {
                                if !h.fin {
                                    self.msg = Some(op);
                                }
                                true
                            }
                        };
                        if !ok {
                            return Poll::Ready(Err(self.fail(FrameError::BadFragmentation)));
                        }
                        if h.opcode == OpCode::Continuation && h.fin {
                            self.msg = None;
                        }
                    }
                    return Poll::Ready(Ok(Some(h)));
                }
                Ok(None) => {
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Ok(None));
                    }
                }
            }
        }
    }

    /// Reads and handles a control frame's payload. Returns the Close info for a Close.
    fn poll_control(
        &mut self,
        cx: &mut Context<'_>,
        h: FrameHeader,
    ) -> Poll<io::Result<Option<CloseInfo>>> {
        let len = h.len as usize;
        if !ready!(self.poll_need(cx, len))? {
            return Poll::Ready(Err(aborted()));
        }
        let payload = &mut self.rbuf[self.rstart..self.rstart + len];
        if let Some(m) = h.mask {
            apply_mask(payload, m, 0);
        }
        let payload = payload.to_vec();
        self.rstart += len;
        match h.opcode {
            OpCode::Ping => {
                self.pending_pong = Some(payload);
                let _ = self.poll_flush_wbuf(cx);
                Poll::Ready(Ok(None))
            }
            OpCode::Pong => Poll::Ready(Ok(None)),
            _ => match parse_close(&payload) {
                Err(e) => Poll::Ready(Err(self.fail(e))),
                Ok(info) => {
                    let info = info.map(|(c, r)| (c, r.to_owned()));
                    self.peer_closed = Some(info.clone());
                    Poll::Ready(Ok(Some(info)))
                }
            },
        }
    }

    /// Receives one whole message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Message, WsError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll form of [`WsStream::recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, WsError>> {
        if self.part_started {
            // The rest of a message begun with `recv_part` would come out without its type and
            // size checks (found by fuzzing): it must be finished with `recv_part`.
            return Poll::Ready(Err(WsError::Io(io::Error::other(
                "recv called in the middle of a message being read with recv_part",
            ))));
        }
        let _ = self.poll_flush_wbuf(cx);
        loop {
            if let Some(info) = &self.peer_closed {
                return Poll::Ready(Ok(Message::Close(info.clone())));
            }
            if let Some(cur) = &mut self.cur {
                if cur.remaining > 0 {
                    if self.rstart == self.rend && ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(WsError::Aborted));
                    }
                    let cur = self.cur.as_mut().expect("current frame checked above");
                    let n = (self.rend - self.rstart).min(cur.remaining as usize);
                    let chunk = &mut self.rbuf[self.rstart..self.rstart + n];
                    if let Some(m) = cur.header.mask {
                        apply_mask(chunk, m, cur.offset);
                    }
                    self.assembly.extend_from_slice(chunk);
                    self.rstart += n;
                    cur.remaining -= n as u64;
                    cur.offset += n;
                    continue;
                }
                let fin = cur.header.fin;
                self.cur = None;
                if fin {
                    return Poll::Ready(self.finish_message());
                }
                continue;
            }
            let Some(h) = ready!(self.poll_header(cx))? else {
                return Poll::Ready(Err(WsError::Aborted));
            };
            if h.opcode.is_control() {
                if let Some(info) = ready!(self.poll_control(cx, h))? {
                    return Poll::Ready(Ok(Message::Close(info)));
                }
                continue;
            }
            if h.opcode != OpCode::Continuation {
                self.assembly_op = Some(h.opcode);
                self.assembly.clear();
                self.fragments = 0;
            }
            self.fragments = self.fragments.saturating_add(1);
            // Each refusal names its own cap (issue 15 §7: a 65th one-byte fragment used to be
            // reported as "frame of 1 bytes exceeds the limit").
            let size = (self.assembly.len() as u64).saturating_add(h.len);
            let limit = self.cfg.max_message as u64;
            if size > limit {
                let e = FrameError::TooLarge { size, limit };
                return Poll::Ready(Err(self.fail(e).into()));
            }
            if self.fragments > self.cfg.max_fragments {
                let e = FrameError::TooManyFragments(self.cfg.max_fragments);
                return Poll::Ready(Err(self.fail(e).into()));
            }
            self.assembly.reserve(h.len as usize);
            self.cur = Some(Current {
                header: h,
                remaining: h.len,
                offset: 0,
            });
        }
    }

    /// Receives the next piece of a data message (at most `max` bytes), or the peer's Close.
    /// Messages of any size stream through without being assembled. Cancel-safe.
    pub async fn recv_part(&mut self, max: usize) -> Result<Part, WsError> {
        poll_fn(|cx| self.poll_recv_part(cx, max.max(1))).await
    }

    fn poll_recv_part(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Result<Part, WsError>> {
        let _ = self.poll_flush_wbuf(cx);
        loop {
            if let Some(info) = &self.peer_closed {
                return Poll::Ready(Ok(Part::Close(info.clone())));
            }
            if let Some(cur) = &self.cur {
                let fin_frame = cur.header.fin;
                let mut data = Vec::new();
                if cur.remaining > 0 {
                    if self.rstart == self.rend && ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(WsError::Aborted));
                    }
                    let cur = self.cur.as_mut().expect("current frame checked above");
                    let n = (self.rend - self.rstart)
                        .min(max)
                        .min(usize::try_from(cur.remaining).unwrap_or(usize::MAX));
                    let chunk = &mut self.rbuf[self.rstart..self.rstart + n];
                    if let Some(m) = cur.header.mask {
                        apply_mask(chunk, m, cur.offset);
                    }
                    data.extend_from_slice(chunk);
                    self.rstart += n;
                    cur.remaining -= n as u64;
                    cur.offset += n;
                }
                let frame_done = self.cur.as_ref().is_some_and(|c| c.remaining == 0);
                if frame_done {
                    self.cur = None;
                }
                let fin = frame_done && fin_frame;
                if data.is_empty() && !fin {
                    continue;
                }
                let first = !self.part_started;
                self.part_started = !fin;
                let text = self.part_op == Some(OpCode::Text);
                return Poll::Ready(Ok(Part::Data {
                    text,
                    first,
                    fin,
                    data,
                }));
            }
            let Some(h) = ready!(self.poll_header(cx))? else {
                return Poll::Ready(Err(WsError::Aborted));
            };
            if h.opcode.is_control() {
                if let Some(info) = ready!(self.poll_control(cx, h))? {
                    return Poll::Ready(Ok(Part::Close(info)));
                }
                continue;
            }
            if h.opcode != OpCode::Continuation {
                self.part_op = Some(h.opcode);
            }
            self.cur = Some(Current {
                header: h,
                remaining: h.len,
                offset: 0,
            });
        }
    }

    fn finish_message(&mut self) -> Result<Message, WsError> {
        let data = std::mem::take(&mut self.assembly);
        match self.assembly_op.take() {
            Some(OpCode::Text) => match String::from_utf8(data) {
                Ok(s) => Ok(Message::Text(s)),
                Err(_) => Err(self.fail(FrameError::BadUtf8).into()),
            },
            _ => Ok(Message::Binary(data)),
        }
    }

    // === writing ===

    fn queue_frame(&mut self, opcode: OpCode, fin: bool, payload: &[u8]) {
        let mask = match self.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        let h = FrameHeader {
            fin,
            opcode,
            mask,
            len: payload.len() as u64,
        };
        let start = self.wbuf.len();
        let body = start + h.encoded_len();
        self.wbuf.resize(body + payload.len(), 0);
        h.encode(&mut self.wbuf[start..body]);
        match mask {
            Some(m) => mask_copy(&mut self.wbuf[body..], payload, m, 0),
            None => self.wbuf[body..].copy_from_slice(payload),
        }
    }

    /// Frames `data` as one binary data frame in a pooled buffer (at most what fits); returns
    /// the payload bytes taken. Only called with nothing queued.
    fn queue_data(&mut self, data: &[u8]) -> usize {
        let n = data
            .len()
            .min(self.cfg.max_frame_out)
            .min(bufpool::SIZE - MAX_HEADER);
        let mask = match self.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        let h = FrameHeader {
            fin: true,
            opcode: OpCode::Binary,
            mask,
            len: n as u64,
        };
        let buf = self.dbuf.hold(bufpool::SIZE);
        let hl = h.encode(buf);
        match mask {
            Some(m) => mask_copy(&mut buf[hl..hl + n], &data[..n], m, 0),
            None => buf[hl..hl + n].copy_from_slice(&data[..n]),
        }
        self.dpos = 0;
        self.dlen = hl + n;
        n
    }

    fn poll_flush_wbuf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.dpos < self.dlen {
            let cap = ready!(self.poll_write_cap(cx))?;
            let Some(buf) = self.dbuf.get() else {
                return Poll::Ready(Err(io::Error::other("frame buffer missing")));
            };
            let end = self.dlen.min(self.dpos.saturating_add(cap));
            let n = match ready!(Pin::new(&mut self.io).poll_write(cx, &buf[self.dpos..end])) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.write_failed(cx, e))),
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote(n);
            self.dpos += n;
            if self.dpos == self.dlen {
                self.dbuf.release();
                (self.dpos, self.dlen) = (0, 0);
            }
        }
        loop {
            if self.wpos == self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
                match self.pending_pong.take() {
                    Some(p) if !self.sent_close => self.queue_frame(OpCode::Pong, true, &p),
                    _ => return Poll::Ready(Ok(())),
                }
            }
            let cap = ready!(self.poll_write_cap(cx))?;
            let end = self.wbuf.len().min(self.wpos.saturating_add(cap));
            let n = match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..end]))
            {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.write_failed(cx, e))),
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote(n);
            self.wpos += n;
        }
    }

    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_wbuf(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    async fn send_frame(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        self.send_frame_fin(opcode, true, payload).await
    }

    async fn send_frame_fin(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
    ) -> io::Result<()> {
        if self.sent_close {
            return Err(closed_for_writing());
        }
        poll_fn(|cx| self.poll_flush_wbuf(cx)).await?;
        self.queue_frame(opcode, fin, payload);
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    /// Sends one frame of a message streamed in pieces: `first` opens it (text or binary),
    /// later pieces continue it, `fin` ends it. The caller keeps the order; a control frame
    /// may go between pieces.
    pub async fn send_part(
        &mut self,
        text: bool,
        first: bool,
        fin: bool,
        data: &[u8],
    ) -> io::Result<()> {
        let op = match (first, text) {
            (false, _) => OpCode::Continuation,
            (true, true) => OpCode::Text,
            (true, false) => OpCode::Binary,
        };
        self.send_frame_fin(op, fin, data).await
    }

    /// Sends one text message.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send_frame(OpCode::Text, text.as_bytes()).await
    }

    /// Sends one binary message.
    pub async fn send_binary(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_frame(OpCode::Binary, data).await
    }

    /// Sends a text message and, right after it, `body` as one binary message: the shape of
    /// an HTTP-mode `request` or `response` with its body (nothing of ours comes between).
    pub async fn send_text_then_binary(
        &mut self,
        text: &str,
        body: Option<&[u8]>,
    ) -> io::Result<()> {
        // Both frames in one write (one TLS record when they fit): a request or response is
        // one message to its reader, and two flushes cost a second record and system call.
        if self.sent_close {
            return Err(closed_for_writing());
        }
        poll_fn(|cx| self.poll_flush_wbuf(cx)).await?;
        self.queue_frame(OpCode::Text, true, text.as_bytes());
        if let Some(b) = body {
            self.queue_frame(OpCode::Binary, true, b);
        }
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    /// Sends a ping.
    pub async fn send_ping(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send_frame(OpCode::Ping, payload).await
    }

    /// Sends our Close (once) and flushes. Reading may go on until the peer's Close.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if self.sent_close {
            return Ok(());
        }
        poll_fn(|cx| self.poll_flush_wbuf(cx)).await?;
        self.queue_frame(OpCode::Close, true, &close_payload(code, reason));
        self.sent_close = true;
        self.sent_code = code;
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    /// Flushes what is queued (a Close queued by a protocol error, a pong).
    pub async fn flush_pending(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush_all(cx)).await
    }

    /// Shuts the transport down (TLS close_notify, then FIN).
    pub async fn shutdown_transport(&mut self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
    }

    /// Ends the connection cleanly (RFC 6455 §7.1.1). When our Close went out first, waits at
    /// most `wait` for the peer's, discarding whatever data was already on its way; then shuts
    /// the transport down (at most one more second).
    ///
    /// Dropping the socket before the peer's Close (or a pong) arrives makes the kernel answer
    /// those bytes with a reset; a peer that meets the reset before it has read our Close sees
    /// an abnormal closure (1006) instead of our code.
    pub async fn finish_close(&mut self, wait: std::time::Duration) {
        if self.sent_close {
            let _ = tokio::time::timeout(wait, async {
                while let Ok(Part::Data { .. }) = self.recv_part(CLOSE_DRAIN_PIECE).await {}
            })
            .await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.shutdown_transport())
            .await;
    }
}

/// Reads payload of the current frame from `io` straight into `out` (at most what is left of
/// the frame), unmasks it there and moves the frame's cursor on. Returns the bytes read.
fn poll_payload<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    cur: &mut Current,
    out: &mut ReadBuf<'_>,
) -> Poll<io::Result<usize>> {
    let want = (cur.remaining.min(out.remaining() as u64)) as usize;
    let dst = out.initialize_unfilled_to(want);
    let mut rb = ReadBuf::new(dst);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    if let Some(m) = cur.header.mask {
        apply_mask(&mut dst[..n], m, cur.offset);
    }
    out.advance(n);
    cur.remaining -= n as u64;
    cur.offset += n;
    Poll::Ready(Ok(n))
}

/// What [`WsStream::finish_close`] reads at a time while it waits for the peer's Close.
const CLOSE_DRAIN_PIECE: usize = 64 * 1024;

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "websocket peer went away without a close frame",
    )
}

fn closed_for_writing() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed for writing")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _ = this.poll_flush_wbuf(cx);
        if let Some(e) = this.read_err.take() {
            return Poll::Ready(Err(e));
        }
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.peer_closed.is_some() {
                return Poll::Ready(Ok(()));
            }
            if let Some(cur) = &mut this.cur {
                if cur.remaining == 0 {
                    this.cur = None;
                    continue;
                }
                let avail = this.rend - this.rstart;
                let want = (cur.remaining.min(out.remaining() as u64)) as usize;
                if avail > 0 {
                    let n = avail.min(want);
                    let chunk = &mut this.rbuf[this.rstart..this.rstart + n];
                    if let Some(m) = cur.header.mask {
                        apply_mask(chunk, m, cur.offset);
                    }
                    out.put_slice(chunk);
                    this.rstart += n;
                    cur.remaining -= n as u64;
                    cur.offset += n;
                    // More of this frame may be ready: read it straight into the caller's
                    // buffer too, so the caller gets one large read rather than the buffered
                    // head first. Waiting is not worth it: what we have is returned.
                    // (0 bytes is end of stream: the next read reports it.)
                    if cur.remaining > 0 && out.remaining() > 0 {
                        if let Poll::Ready(Err(e)) = poll_payload(&mut this.io, cx, cur, out) {
                            this.read_err = Some(e);
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                // Nothing buffered: read the payload straight into the caller's buffer.
                if ready!(poll_payload(&mut this.io, cx, cur, out))? == 0 {
                    return Poll::Ready(Err(aborted()));
                }
                return Poll::Ready(Ok(()));
            }
            let Some(h) = ready!(this.poll_header(cx))? else {
                return Poll::Ready(Err(aborted()));
            };
            if h.opcode.is_control() {
                if ready!(this.poll_control(cx, h))?.is_some() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if h.len > 0 {
                this.cur = Some(Current {
                    header: h,
                    remaining: h.len,
                    offset: 0,
                });
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.sent_close {
            return Poll::Ready(Err(closed_for_writing()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_flush_wbuf(cx))?;
        let n = this.queue_data(data);
        if let Poll::Ready(Err(e)) = this.poll_flush_wbuf(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_all(cx)
    }

    /// Sends our Close (1000) and flushes; the transport stays open so reading can go on.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.sent_close {
            ready!(this.poll_flush_wbuf(cx))?;
            this.queue_frame(OpCode::Close, true, &close_payload(1000, ""));
            this.sent_close = true;
            this.sent_code = 1000;
        }
        this.poll_flush_all(cx)
    }
}

#[cfg(test)]
mod tests;
