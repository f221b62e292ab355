//! The soak protocol between the client tasks and the in-process endpoint: a fixed header, then
//! per mode a payload whose every byte is derived from the header's seed, so both ends can check
//! what they got without keeping it.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Header length on the wire.
pub const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"HSK1";

/// What one transfer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Client sends `size` bytes; the endpoint echoes them and half-closes after the last one.
    Echo,
    /// The endpoint sends `size` bytes of the seed's stream, then half-closes.
    Download,
    /// Client sends `size` bytes; the endpoint answers with their SHA-256 and count.
    Upload,
    /// The endpoint half-closes at once; the client then sends `size` bytes, and the endpoint
    /// records their SHA-256 in process (data flowing after the peer's half-close).
    Sink,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 4] = [Mode::Echo, Mode::Download, Mode::Upload, Mode::Sink];

    fn code(self) -> u8 {
        match self {
            Mode::Echo => 1,
            Mode::Download => 2,
            Mode::Upload => 3,
            Mode::Sink => 4,
        }
    }

    fn from_code(c: u8) -> Option<Mode> {
        Some(match c {
            1 => Mode::Echo,
            2 => Mode::Download,
            3 => Mode::Upload,
            4 => Mode::Sink,
            _ => return None,
        })
    }

    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Download => "download",
            Mode::Upload => "upload",
            Mode::Sink => "sink",
        }
    }
}

/// The first bytes of every transfer, client to endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub mode: Mode,
    /// The client half-closes only after it has read everything (instead of as soon as it has
    /// sent everything), so the endpoint's half-close comes first.
    pub late_close: bool,
    /// Transfer id, unique in the run; links the endpoint's view to the client's.
    pub id: u64,
    /// Payload length in bytes.
    pub size: u64,
    /// Seed of the payload stream.
    pub seed: u64,
}

impl Header {
    /// Wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = self.mode.code();
        b[5] = u8::from(self.late_close);
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.seed.to_le_bytes());
        b
    }

    /// Parses the wire form; `None` for a wrong magic, mode or flag byte.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        if &b[..4] != MAGIC || b[5] > 1 || b[6] != 0 || b[7] != 0 {
            return None;
        }
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Some(Header {
            mode: Mode::from_code(b[4])?,
            late_close: b[5] == 1,
            id: u64_at(8),
            size: u64_at(16),
            seed: u64_at(24),
        })
    }
}

/// Length of the endpoint's answer in `upload` mode: SHA-256, then the byte count (LE).
pub const UPLOAD_ANSWER_LEN: usize = 40;

const BLOCK: usize = 64 * 1024;

/// The payload stream of a seed. Bytes come out the same however the reads are cut (a plain
/// `StdRng::fill_bytes` drops the tail of a word at each call, so it is drawn in whole blocks).
pub struct Payload {
    rng: StdRng,
    block: Box<[u8; BLOCK]>,
    pos: usize,
}

impl Payload {
    /// The stream of `seed`, from its first byte.
    pub fn new(seed: u64) -> Payload {
        Payload {
            rng: StdRng::seed_from_u64(seed),
            block: Box::new([0u8; BLOCK]),
            pos: BLOCK,
        }
    }

    /// Fills `out` with the next bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == BLOCK {
                self.rng.fill_bytes(&mut self.block[..]);
                self.pos = 0;
            }
            let n = (BLOCK - self.pos).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
    }
}

/// Checks received bytes against a seed's stream as they arrive: SHA-256 of what came, SHA-256
/// of what should have come, and the first offset where they differ.
pub struct Checker {
    expected: Payload,
    got_hash: sha2::Sha256,
    want_hash: sha2::Sha256,
    scratch: Vec<u8>,
    /// Bytes seen so far.
    pub len: u64,
    /// First differing offset, if any.
    pub first_diff: Option<u64>,
}

impl Checker {
    /// A checker for the stream of `seed`.
    pub fn new(seed: u64) -> Checker {
        use sha2::Digest;
        Checker {
            expected: Payload::new(seed),
            got_hash: sha2::Sha256::new(),
            want_hash: sha2::Sha256::new(),
            scratch: Vec::new(),
            len: 0,
            first_diff: None,
        }
    }

    /// Feeds the next received bytes.
    pub fn update(&mut self, got: &[u8]) {
        use sha2::Digest;
        self.scratch.resize(got.len(), 0);
        self.expected.fill(&mut self.scratch);
        if self.first_diff.is_none() && got != self.scratch.as_slice() {
            let i = got
                .iter()
                .zip(self.scratch.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.first_diff = Some(self.len + i as u64);
        }
        self.got_hash.update(got);
        self.want_hash.update(&self.scratch);
        self.len += got.len() as u64;
    }

    /// (SHA-256 received, SHA-256 expected for the same length).
    pub fn finish(self) -> ([u8; 32], [u8; 32]) {
        use sha2::Digest;
        (
            self.got_hash.finalize().into(),
            self.want_hash.finalize().into(),
        )
    }
}

/// SHA-256 of the first `size` bytes of a seed's stream.
#[cfg(test)]
pub fn stream_digest(seed: u64, size: u64) -> [u8; 32] {
    use sha2::Digest;
    let mut p = Payload::new(seed);
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut left = size;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        let h = Header {
            mode: Mode::Sink,
            late_close: true,
            id: 7,
            size: 1 << 40,
            seed: u64::MAX,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), None);
        let mut bad = b;
        bad[4] = 9;
        assert_eq!(Header::decode(&bad), None);
        let mut bad = b;
        bad[5] = 2;
        assert_eq!(Header::decode(&bad), None);
    }

    #[test]
    fn payload_does_not_depend_on_how_it_is_cut() {
        let total = 3 * BLOCK + 12_345;
        let mut whole = vec![0u8; total];
        Payload::new(42).fill(&mut whole);
        let mut p = Payload::new(42);
        let mut cut = Vec::new();
        let mut sizes = [1usize, 3, 7, 4096, 65_535, 65_537, 100_000].iter().cycle();
        while cut.len() < total {
            let n = (*sizes.next().unwrap()).min(total - cut.len());
            let mut b = vec![0u8; n];
            p.fill(&mut b);
            cut.extend_from_slice(&b);
        }
        assert_eq!(whole, cut);
        let mut other = vec![0u8; total];
        Payload::new(43).fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn checker_finds_the_first_difference() {
        let mut data = vec![0u8; 200_000];
        Payload::new(5).fill(&mut data);
        let mut ok = Checker::new(5);
        for c in data.chunks(777) {
            ok.update(c);
        }
        assert_eq!(ok.first_diff, None);
        let (got, want) = ok.finish();
        assert_eq!(got, want);
        assert_eq!(got, stream_digest(5, 200_000));

        data[150_001] ^= 1;
        let mut bad = Checker::new(5);
        for c in data.chunks(4096) {
            bad.update(c);
        }
        assert_eq!(bad.first_diff, Some(150_001));
        let (got, want) = bad.finish();
        assert_ne!(got, want);
    }
}
