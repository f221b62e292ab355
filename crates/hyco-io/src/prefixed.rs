//! A stream with bytes already read from it put back in front: what hyper read past an
//! upgrade's request head belongs to the connection that follows.

/// A stream with bytes that hyper read past the handshake put back in front.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`, reading `prefix` first. The prefix is copied out: it is a slice of
    /// hyper's 8 KiB read buffer, which would otherwise stay allocated for the tunnel's life.
    pub fn new(inner: S, prefix: bytes::Bytes) -> Self {
        Prefixed {
            prefix: bytes::Bytes::copy_from_slice(&prefix),
            inner,
        }
    }

    /// Puts `front` back before what is still unread of the prefix: what a reader (hyper, the
    /// splice) read from this stream and did not consume. Same type, however often it is done.
    pub fn unread(mut self, front: &[u8]) -> Self {
        if !front.is_empty() {
            let mut v = Vec::with_capacity(front.len() + self.prefix.len());
            v.extend_from_slice(front);
            v.extend_from_slice(&self.prefix);
            self.prefix = bytes::Bytes::from(v);
        }
        self
    }

    /// Bytes still to be read before the stream's own.
    pub fn unread_len(&self) -> usize {
        self.prefix.len()
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                self.prefix = bytes::Bytes::new();
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
