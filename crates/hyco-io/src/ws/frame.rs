//! WebSocket frame headers (RFC 6455 §5.2): parse, validate, encode, and the mask.
//!
//! This is the part of the frame format that every path in hyco shares: the relay's splice,
//! the relay's control channel and the client streams. Payloads are never buffered here; callers
//! stream them. A header is rejected before any payload byte is read, so an announced length of
//! 2^63 costs nothing.

use std::fmt;

/// The largest frame header: 2 + 8 (64-bit length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// Frame opcodes that RFC 6455 defines. Every other value is a protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// Continues a fragmented text or binary message.
    Continuation,
    /// Starts a text message.
    Text,
    /// Starts a binary message.
    Binary,
    /// Close control frame.
    Close,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why a frame header was refused. Each maps to a close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1-3 set, and we negotiate no extension.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// Opcode 3-7 or 0xB-0xF.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame longer than 125 bytes or without FIN.
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControlFrame,
    /// A 64-bit length with the most significant bit set.
    #[error("frame length has the most significant bit set")]
    LengthTopBit,
    /// The length is not in its minimal encoding.
    #[error("frame length not minimally encoded")]
    NonMinimalLength,
    /// A client sent an unmasked frame, or a server a masked one.
    #[error("frame masking does not match the peer's role")]
    BadMask,
    /// A message (its fragments so far plus the frame announced) is larger than this endpoint
    /// accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes of the message so far, the announced frame included.
        size: u64,
        /// The most this endpoint accepts.
        limit: u64,
    },
    /// A message came in more fragments than this endpoint accepts (whatever their size).
    #[error("message in more than {0} fragments exceeds the fragment limit")]
    TooManyFragments(usize),
    /// Continuation without a message, or a new message inside an unfinished one.
    #[error("fragmentation out of order")]
    BadFragmentation,
    /// A Close frame's code or payload is invalid.
    #[error("invalid close frame")]
    BadClose,
    /// A Close reason or a text message that is not UTF-8.
    #[error("invalid UTF-8")]
    BadUtf8,
}

impl FrameError {
    /// The close code RFC 6455 §7.4.1 assigns to this violation.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooLarge { .. } | FrameError::TooManyFragments(_) => 1009,
            FrameError::BadUtf8 => 1007,
            _ => 1002,
        }
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key, present on frames sent by clients.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
}

impl fmt::Debug for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameHeader")
            .field("fin", &self.fin)
            .field("opcode", &self.opcode)
            .field("masked", &self.mask.is_some())
            .field("len", &self.len)
            .finish()
    }
}

impl FrameHeader {
    /// Parses a header from the start of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed: an expected state while streaming, not a failure.
    /// On success returns the header and its encoded length.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        if b0 & 0x70 != 0 {
            return Err(FrameError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let (len, mut pos) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
                if len < 126 {
                    return Err(FrameError::NonMinimalLength);
                }
                (len, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthTopBit);
                }
                if len <= u16::MAX as u64 {
                    return Err(FrameError::NonMinimalLength);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        if opcode.is_control() && (!fin || len > 125) {
            return Err(FrameError::BadControlFrame);
        }
        let mask = if masked {
            if buf.len() < pos + 4 {
                return Ok(None);
            }
            let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            pos += 4;
            Some(m)
        } else {
            None
        };
        Ok(Some((
            FrameHeader {
                fin,
                opcode,
                mask,
                len,
            },
            pos,
        )))
    }

    /// Encoded length of this header.
    pub fn encoded_len(&self) -> usize {
        let base = match self.len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        base + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header into `out` (at least [`FrameHeader::encoded_len`] bytes) and returns
    /// its length.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        out[0] = (if self.fin { 0x80 } else { 0 }) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut pos = match self.len {
            0..=125 => {
                out[1] = mask_bit | self.len as u8;
                2
            }
            126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(self.len as u16).to_be_bytes());
                4
            }
            _ => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&self.len.to_be_bytes());
                10
            }
        };
        if let Some(m) = self.mask {
            out[pos..pos + 4].copy_from_slice(&m);
            pos += 4;
        }
        pos
    }
}

/// XORs `buf` with `mask`, where `buf` starts `offset` bytes into the payload.
///
/// Works a word at a time; the payload is touched once, in place.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Copies `src` into `dst` (same length) XORed with `mask`, where `src` starts `offset` bytes
/// into the payload: the copy a client needs to mask bytes it does not own, in one pass.
pub fn mask_copy(dst: &mut [u8], src: &[u8], mask: [u8; 4], offset: usize) {
    debug_assert_eq!(dst.len(), src.len());
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (dc, sc) in (&mut d).zip(&mut s) {
        let mut w = [0u8; 8];
        w.copy_from_slice(sc);
        dc.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    for (i, (db, sb)) in d.into_remainder().iter_mut().zip(s.remainder()).enumerate() {
        *db = sb ^ m[i % 4];
    }
}

/// Checks a Close frame payload (RFC 6455 §5.5.1, §7.4).
///
/// Returns the code and reason, or `None` for an empty payload (no status).
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, FrameError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(FrameError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(FrameError::BadClose);
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::BadUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Close codes a peer may send on the wire.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A whole unmasked frame (a server's), FIN set: `op` and `payload`.
pub fn server_frame(op: OpCode, payload: &[u8]) -> Vec<u8> {
    let h = FrameHeader {
        fin: true,
        opcode: op,
        mask: None,
        len: payload.len() as u64,
    };
    let mut out = vec![0u8; h.encoded_len() + payload.len()];
    let n = h.encode(&mut out);
    out[n..].copy_from_slice(payload);
    out
}

/// Builds a Close payload: code plus a reason cut to fit the 125-byte control frame limit on a
/// character boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = Vec::with_capacity(2 + cut);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(h: FrameHeader) {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut out);
        assert_eq!(n, h.encoded_len());
        let (p, m) = FrameHeader::parse(&out[..n]).unwrap().unwrap();
        assert_eq!(p, h);
        assert_eq!(m, n);
        for short in 0..n {
            assert_eq!(FrameHeader::parse(&out[..short]).unwrap(), None);
        }
    }

    #[test]
    fn headers_round_trip_at_every_length_class() {
        for len in [0u64, 1, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                roundtrip(FrameHeader {
                    fin: true,
                    opcode: OpCode::Binary,
                    mask,
                    len,
                });
            }
        }
    }

    #[test]
    fn rejects_violations_before_any_payload() {
        assert_eq!(
            FrameHeader::parse(&[0xC2, 0x80]),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            FrameHeader::parse(&[0x83, 0x80]),
            Err(FrameError::UnknownOpcode(3))
        );
        assert_eq!(
            FrameHeader::parse(&[0x8B, 0x80]),
            Err(FrameError::UnknownOpcode(0xB))
        );
        assert_eq!(
            FrameHeader::parse(&[0x09, 0x80]),
            Err(FrameError::BadControlFrame)
        );
        assert_eq!(
            FrameHeader::parse(&[0x89, 0xFE, 0, 126]),
            Err(FrameError::BadControlFrame)
        );
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(FrameHeader::parse(&huge), Err(FrameError::LengthTopBit));
        assert_eq!(
            FrameHeader::parse(&[0x82, 126, 0, 5]),
            Err(FrameError::NonMinimalLength)
        );
    }

    #[test]
    fn mask_is_an_involution_at_any_offset() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mask = [0xde, 0xad, 0xbe, 0xef];
        for split in [0usize, 1, 3, 7, 8, 9, 500] {
            let mut buf = data.clone();
            let (a, b) = buf.split_at_mut(split);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, split);
            for (i, (x, y)) in buf.iter().zip(&data).enumerate() {
                assert_eq!(*x, y ^ mask[i % 4]);
            }
        }
    }

    #[test]
    fn mask_copy_equals_copy_then_mask_at_any_offset_and_length() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mask = [0x01, 0x80, 0x7f, 0xfe];
        for (off, len) in [(0usize, 0usize), (0, 1), (1, 7), (3, 8), (5, 9), (2, 999)] {
            let mut want = data[..len].to_vec();
            apply_mask(&mut want, mask, off);
            let mut got = vec![0u8; len];
            mask_copy(&mut got, &data[..len], mask, off);
            assert_eq!(got, want, "offset {off}, length {len}");
        }
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(FrameError::BadClose));
        for bad in [999u16, 1004, 1005, 1006, 1015, 5000] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()),
                Err(FrameError::BadClose),
                "{bad}"
            );
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xff]), Err(FrameError::BadUtf8));
        assert_eq!(
            parse_close(&close_payload(1000, "bye")),
            Ok(Some((1000, "bye")))
        );
        let long = "é".repeat(100);
        let p = close_payload(1001, &long);
        assert!(p.len() <= 125);
        assert!(parse_close(&p).is_ok());
    }
}
