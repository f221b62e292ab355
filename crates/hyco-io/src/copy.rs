//! Copying both ways between two byte streams, with large buffers held only while bytes move.
//!
//! [`copy_bidirectional`] keeps the contract of tokio's function of that name: each direction
//! copies until its reader ends, then shuts the other side's writer down (half-close) and
//! the other direction goes on; the first error ends both. What differs is memory: each
//! direction reads 256 KiB at a time into a buffer from [`crate::bufpool`] while data keeps
//! coming, and gives the buffer back as soon as a read would wait. The wait itself reads into a
//! few hundred bytes kept in the direction's state. An idle tunnel then costs no buffer
//! memory, where tokio's function holds its two buffers for the life of the connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::bufpool;

/// One direction's buffer and progress.
struct Dir {
    /// `buf[pos..cap]` is still to be written.
    buf: bufpool::ReadBuffer,
    pos: usize,
    cap: usize,
    amt: u64,
    read_done: bool,
    need_flush: bool,
    state: State,
}

#[derive(Clone, Copy)]
enum State {
    Running,
    ShuttingDown,
    Done,
}

impl Dir {
    fn new() -> Self {
        Dir {
            buf: bufpool::ReadBuffer::new(bufpool::SIZE),
            pos: 0,
            cap: 0,
            amt: 0,
            read_done: false,
            need_flush: false,
            state: State::Running,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                self.pos = 0;
                self.cap = 0;
                match self.buf.poll_read_from(cx, r.as_mut(), 0) {
                    Poll::Ready(Ok(0)) => self.read_done = true,
                    Poll::Ready(Ok(n)) => self.cap = n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to read: push out what was written before waiting.
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.get() else {
                    return Poll::Ready(Err(io::Error::other("copy buffer missing")));
                };
                let n = ready!(w.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into writer",
                    )));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                self.buf.release();
                ready!(w.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }

    /// Runs this direction to its end: copy, then shut the writer down.
    fn poll_transfer<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.state {
                State::Running => {
                    ready!(self.poll_copy(cx, r.as_mut(), w.as_mut()))?;
                    self.state = State::ShuttingDown;
                }
                State::ShuttingDown => {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(self.amt)),
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both reach end of stream; returns the bytes copied
/// each way, `(a → b, b → a)`. See the module docs.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Dir::new();
    let mut ba = Dir::new();
    poll_fn(|cx| {
        let a_to_b = ab.poll_transfer(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let b_to_a = ba.poll_transfer(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        let a_to_b = ready!(a_to_b);
        let b_to_a = ready!(b_to_a);
        Poll::Ready(Ok((a_to_b, b_to_a)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    /// Bytes through both directions, with sizes that cross the small and large buffers, and
    /// half-close passing through: each side still reads after the other finished writing.
    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_gives_buffers_back() {
        let (mut app, mut a) = tokio::io::duplex(1 << 20);
        let (mut b, mut svc) = tokio::io::duplex(1 << 20);
        let pump = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..777_777u32).map(|i| (i % 13) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let app_side = tokio::spawn(async move {
            // A tiny write first, then bulk, then half-close. (The idle path itself is checked
            // step by step in the next test.)
            app.write_all(&up2[..1]).await?;
            app.write_all(&up2[1..]).await?;
            app.shutdown().await?;
            let mut got = Vec::new();
            app.read_to_end(&mut got).await?;
            std::io::Result::Ok(got)
        });
        let mut got_up = Vec::new();
        svc.read_to_end(&mut got_up).await.unwrap();
        assert_eq!(got_up, up, "a → b intact, and its end reached b");
        // b's side still writes after a finished: half-close.
        svc.write_all(&down2).await.unwrap();
        svc.shutdown().await.unwrap();
        assert_eq!(app_side.await.unwrap().unwrap(), down);
        let (ab, ba) = tokio::time::timeout(std::time::Duration::from_secs(10), pump)
            .await
            .expect("pump ends once both sides ended")
            .unwrap()
            .unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// A side that returns bytes and then, in the next read, a reset.
    struct Resets {
        reads: std::collections::VecDeque<io::Result<Vec<u8>>>,
    }

    impl AsyncRead for Resets {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.reads.pop_front() {
                Some(Ok(b)) => {
                    buf.put_slice(&b);
                    Poll::Ready(Ok(()))
                }
                Some(Err(e)) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Resets {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A reset right behind a full small read (the read that tops up the large buffer meets
    /// it) still ends the copy with the error: the other side never sees a clean end.
    #[tokio::test]
    async fn a_reset_behind_the_first_bytes_is_an_error_not_an_end() {
        let mut a = Resets {
            reads: [
                Ok(vec![1u8; bufpool::SMALL]),
                Err(io::Error::from(io::ErrorKind::ConnectionReset)),
                Ok(Vec::new()),
            ]
            .into(),
        };
        let (mut b, mut peer) = tokio::io::duplex(1 << 16);
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            copy_bidirectional(&mut a, &mut b),
        )
        .await
        .expect("the copy ends")
        .expect_err("a reset is an error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        drop(b);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got,
            vec![1u8; bufpool::SMALL],
            "the bytes before the reset arrived"
        );
    }

    /// While both sides are idle the copy holds no large buffer: an idle tunnel costs only its
    /// state. Checked through the pool: buffers taken while data moved came back.
    #[tokio::test]
    async fn an_idle_direction_holds_no_large_buffer() {
        let (mut app, mut a) = tokio::io::duplex(1 << 16);
        let (mut b, mut svc) = tokio::io::duplex(1 << 16);
        let mut ab = Dir::new();
        let mut ba = Dir::new();
        app.write_all(b"ping").await.unwrap();
        let mut idle_checks = 0;
        // Poll until the bytes arrived at svc and both directions wait.
        for _ in 0..100 {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let p1 = ab.poll_transfer(&mut cx, Pin::new(&mut a), Pin::new(&mut b));
            let p2 = ba.poll_transfer(&mut cx, Pin::new(&mut b), Pin::new(&mut a));
            assert!(p1.is_pending() && p2.is_pending());
            if ab.amt == 4 {
                idle_checks += 1;
                assert!(
                    !ab.buf.is_held() && !ba.buf.is_held(),
                    "idle: no large buffer"
                );
                break;
            }
        }
        assert_eq!(idle_checks, 1);
        let mut got = [0u8; 4];
        svc.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
