//! Large I/O buffers shared by the connections of a process.
//!
//! A tunnel holds a large buffer only while bytes are moving: when a read finds nothing to do,
//! the buffer goes back here and the wait for the next bytes uses a few hundred bytes of the
//! task's own state (see [`crate::copy`] and [`crate::splice`]). So ten thousand idle tunnels
//! cost no buffer memory, and a busy one reads up to 256 KiB per system call.
//!
//! Buffers come back dirty: callers only ever read what they filled. The pool keeps at most
//! [`MAX_FREE`] spare buffers; more go back to the allocator.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The size of a pooled buffer.
pub const SIZE: usize = 256 * 1024;

/// Spare buffers kept (8 MiB). Enough for the tunnels that are busy at one moment; more are
/// freed.
pub const MAX_FREE: usize = 32;

static FREE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// Buffers held by [`Slot`]s now.
static HELD: AtomicUsize = AtomicUsize::new(0);

fn free_list() -> std::sync::MutexGuard<'static, Vec<Box<[u8]>>> {
    FREE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A buffer of `len` bytes: a pooled one when `len` is [`SIZE`], a new one otherwise.
pub fn take(len: usize) -> Box<[u8]> {
    if len == SIZE {
        if let Some(b) = free_list().pop() {
            return b;
        }
    }
    vec![0u8; len].into_boxed_slice()
}

/// Returns a buffer; pooled when it has the pooled size and the pool has room, freed otherwise.
pub fn give(buf: Box<[u8]>) {
    if buf.len() == SIZE {
        let mut free = free_list();
        if free.len() < MAX_FREE {
            free.push(buf);
        }
    }
}

/// A place for one pooled buffer, empty while its owner is idle; the buffer goes back to the
/// pool when released or dropped.
#[derive(Default)]
pub struct Slot(Option<Box<[u8]>>);

impl Slot {
    /// The buffer, if one is held.
    pub fn get_mut(&mut self) -> Option<&mut [u8]> {
        self.0.as_deref_mut()
    }

    /// The buffer, if one is held.
    pub fn get(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }

    /// Whether a buffer is held.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Takes a buffer of `len` bytes (if none is held) and returns it.
    pub fn hold(&mut self, len: usize) -> &mut [u8] {
        self.0.get_or_insert_with(|| {
            HELD.fetch_add(1, Ordering::Relaxed);
            take(len)
        })
    }

    /// Gives the buffer back to the pool.
    pub fn release(&mut self) {
        if let Some(b) = self.0.take() {
            HELD.fetch_sub(1, Ordering::Relaxed);
            give(b);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// Bytes an idle reader waits with.
pub const SMALL: usize = 256;

/// A read buffer held only while bytes move: reads go into a pooled buffer while one is held;
/// a read that would wait, with nothing kept in the buffer, gives it back, and the wait reads
/// into [`SMALL`] bytes kept here. What arrives then moves into a buffer taken anew.
pub struct ReadBuffer {
    slot: Slot,
    small: [u8; SMALL],
    len: usize,
    /// An error met by a read that had already returned bytes: reported by the next read, so
    /// a reset is never mistaken for a clean end.
    deferred: Option<io::Error>,
}

impl ReadBuffer {
    /// Reads of up to `len` bytes (pooled when `len` is [`SIZE`]).
    pub fn new(len: usize) -> Self {
        ReadBuffer {
            slot: Slot::default(),
            small: [0; SMALL],
            len,
            deferred: None,
        }
    }

    /// The buffer, while one is held.
    pub fn get(&self) -> Option<&[u8]> {
        self.slot.get()
    }

    /// The buffer, while one is held.
    pub fn get_mut(&mut self) -> Option<&mut [u8]> {
        self.slot.get_mut()
    }

    /// Whether a buffer is held.
    pub fn is_held(&self) -> bool {
        self.slot.is_held()
    }

    /// Gives the buffer back.
    pub fn release(&mut self) {
        self.slot.release();
    }

    /// Reads from `r` to `buf[end..]` and returns how many bytes came (0: end of stream).
    /// `end > 0` means bytes are kept in the buffer, which then stays held. Cancel-safe: bytes
    /// are taken from `r` only in the poll that returns them.
    pub fn poll_read_from<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        end: usize,
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if let Some(buf) = self.slot.get_mut() {
            let mut rb = ReadBuf::new(&mut buf[end..]);
            return match r.poll_read(cx, &mut rb) {
                Poll::Ready(res) => Poll::Ready(res.map(|()| rb.filled().len())),
                Poll::Pending => {
                    if end == 0 {
                        self.slot.release();
                    }
                    Poll::Pending
                }
            };
        }
        if end > 0 {
            return Poll::Ready(Err(io::Error::other("read buffer missing")));
        }
        let mut rb = ReadBuf::new(&mut self.small);
        ready!(r.as_mut().poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let big = self.slot.hold(self.len);
        big[..n].copy_from_slice(&self.small[..n]);
        let mut total = n;
        // A full small read means more is likely waiting: take it now, so a burst goes on as
        // one large write rather than a small one first.
        if n == SMALL {
            let mut rb = ReadBuf::new(&mut big[n..]);
            match r.poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => total += rb.filled().len(),
                // Deliver what was read; the error comes with the next read.
                Poll::Ready(Err(e)) => self.deferred = Some(e),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(total))
    }
}

/// Buffers the [`Slot`]s of this process hold now: one per tunnel direction that is moving
/// bytes, none for an idle one. The relay exports it as `hyco_io_buffers_held`.
pub fn held() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// Spare buffers in the pool now.
pub fn spare() -> usize {
    free_list().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_bound_and_other_sizes_are_not_pooled() {
        // The pool is process-wide and other tests use it: look only at what this test adds.
        let bufs: Vec<_> = (0..MAX_FREE + 8).map(|_| take(SIZE)).collect();
        assert!(bufs.iter().all(|b| b.len() == SIZE));
        for b in bufs {
            give(b);
        }
        assert!(spare() <= MAX_FREE);
        let before = spare();
        give(vec![0u8; 100].into_boxed_slice());
        assert_eq!(spare(), before, "odd sizes are freed, not pooled");
        let b = take(SIZE);
        assert_eq!(b.len(), SIZE);
        assert!(spare() <= before);
        assert_eq!(take(100).len(), 100);
    }
}
