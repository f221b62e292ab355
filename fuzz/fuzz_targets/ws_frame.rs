//! WebSocket framing (RFC 6455): `FrameHeader::parse`, `parse_close`, `apply_mask`, and a
//! `WsStream` reading the input as what a peer sent, through each of its read paths.
//!
//! Input layout: byte 0 picks the read path (bits 0-1: `recv`, `recv_part`, `AsyncRead`, or
//! `recv` and `recv_part` in turn, switching between messages), the role (bit 2) and whether the first bytes come as a
//! `with_prefix` prefix (bit 3); byte 1 the transport's read size (1-256); byte 2 the limits;
//! the rest is the byte stream. The header and close parsers see the whole input.
//!
//! Properties beyond "no panic" (allocation is bounded by running with `-malloc_limit_mb`):
//! * a parsed header re-encodes to exactly the bytes it came from;
//! * a parsed Close payload re-encodes to itself;
//! * the stream never returns more than its limits allow, nor more payload than came in,
//!   and always makes progress (no `Pending` from a transport that is never pending);
//! * every byte the stream writes (pongs, its Close after a violation) is a well-formed frame
//!   for its role, nothing follows its Close, and after a protocol error that Close carries
//!   the error's code.
#![no_main]

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use hyco_io::ws::frame::{apply_mask, close_payload, parse_close, FrameHeader, OpCode};
use hyco_io::ws::{Message, Part, Role, WsConfig, WsError, WsStream};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A transport that is never pending: reads hand out `input` `chunk` bytes at a time, writes
/// are kept.
struct Mem {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    out: Vec<u8>,
}

impl AsyncRead for Mem {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .chunk
            .min(buf.remaining())
            .min(self.input.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.input[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Mem {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls a future that must complete at once (its transport is never pending).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("pending although the transport never is"),
    }
}

fn check_header(data: &[u8]) {
    if let Ok(Some((h, n))) = FrameHeader::parse(data) {
        assert!(n <= hyco_io::ws::frame::MAX_HEADER_LEN);
        assert_eq!(n, h.encoded_len());
        let mut out = [0u8; hyco_io::ws::frame::MAX_HEADER_LEN];
        assert_eq!(h.encode(&mut out), n);
        assert_eq!(&out[..n], &data[..n], "{h:?}");
        assert!(!h.opcode.is_control() || (h.fin && h.len <= 125));
    }
}

fn check_close(data: &[u8]) {
    if let Ok(Some((code, reason))) = parse_close(data) {
        if reason.len() <= 123 {
            assert_eq!(close_payload(code, reason), data);
        }
        let p = close_payload(code, reason);
        assert!(p.len() <= 125);
        assert!(parse_close(&p).is_ok());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    let offset = data.first().map_or(0, |b| *b as usize);
    let mut buf = data.to_vec();
    apply_mask(&mut buf, mask, offset);
    apply_mask(&mut buf, mask, offset);
    assert_eq!(buf, data);
}

/// What the stream wrote must be frames of its role, ending at its Close if it sent one.
fn check_output(out: &[u8], role: Role, error_code: Option<u16>) {
    let mut rest = out;
    let mut last_close = None;
    while !rest.is_empty() {
        assert!(last_close.is_none(), "a frame after our Close");
        let (h, n) = FrameHeader::parse(rest)
            .expect("we write valid headers")
            .expect("we write whole headers");
        assert_eq!(h.mask.is_some(), role == Role::Client, "{h:?}");
        assert!(
            h.fin && h.opcode.is_control(),
            "only pongs and Close: {h:?}"
        );
        let len = h.len as usize;
        assert!(rest.len() >= n + len, "a truncated frame");
        let mut payload = rest[n..n + len].to_vec();
        if let Some(m) = h.mask {
            apply_mask(&mut payload, m, 0);
        }
        if h.opcode == OpCode::Close {
            let info = parse_close(&payload).expect("our Close is valid");
            last_close = Some(info.map(|(c, _)| c));
        }
        rest = &rest[n + len..];
    }
    if let Some(code) = error_code {
        assert_eq!(
            last_close,
            Some(Some(code)),
            "a protocol error without its Close"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check_header(data);
    check_close(data);
    if data.len() < 3 || data.len() > 64 * 1024 {
        return;
    }
    let (mode, chunk, limits) = (data[0], data[1], data[2]);
    let role = if mode & 4 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let cfg = WsConfig {
        max_message: 1 << (limits % 17),
        max_fragments: 1 + (limits as usize >> 4),
        max_frame_out: 1024,
        read_buffer: if limits & 0x80 == 0 { 256 } else { 16 * 1024 },
    };
    let stream = &data[3..];
    let split = if mode & 8 == 0 {
        0
    } else {
        stream.len().min(chunk as usize)
    };
    let io = Mem {
        input: stream[split..].to_vec(),
        pos: 0,
        chunk: 1 + chunk as usize,
        out: Vec::new(),
    };
    let mut ws = WsStream::with_prefix(io, role, cfg, &stream[..split]);
    let mut delivered = 0usize;
    let mut error_code = None;
    // Mode 3 switches between `recv` and `recv_part` only between messages, as every caller
    // does: `recv` after a partial `recv_part` is not supported (see README.md, known issues).
    let mut mid_message = false;
    // Every step consumes at least one frame header (2 bytes) or ends the loop.
    for step in 0..=stream.len() {
        let part_max = 1 + (step * 7 + chunk as usize) % 300;
        let use_part = match mode & 3 {
            0 => false,
            1 => true,
            3 => mid_message || step % 2 == 1,
            _ => {
                let mut buf = vec![0u8; part_max];
                let mut rb = ReadBuf::new(&mut buf);
                match now(std::future::poll_fn(|cx| {
                    Pin::new(&mut ws).poll_read(cx, &mut rb)
                })) {
                    Ok(()) if rb.filled().is_empty() => break,
                    Ok(()) => {
                        delivered += rb.filled().len();
                        continue;
                    }
                    Err(e) => {
                        error_code = WsError::from(e).close_code();
                        break;
                    }
                }
            }
        };
        let result = if use_part {
            now(ws.recv_part(part_max)).map(|p| match p {
                Part::Data { data, fin, .. } => {
                    assert!(data.len() <= part_max);
                    mid_message = !fin;
                    Some(data.len())
                }
                Part::Close(_) => None,
            })
        } else {
            now(ws.recv()).map(|m| match m {
                Message::Text(t) => Some(t.len()),
                Message::Binary(b) => Some(b.len()),
                Message::Close(_) => None,
            })
        };
        match result {
            Ok(Some(n)) => {
                assert!(
                    use_part || n <= cfg.max_message,
                    "{n} > {}",
                    cfg.max_message
                );
                delivered += n;
            }
            Ok(None) => break,
            Err(e) => {
                error_code = e.close_code();
                break;
            }
        }
        assert!(step < stream.len(), "no progress");
    }
    assert!(
        delivered <= stream.len(),
        "{delivered} payload bytes from {}",
        stream.len()
    );
    let _ = now(ws.flush_pending());
    check_output(&ws.get_ref().out, role, error_code);
});
