use super::*;
use crate::ws::{Message, Role, WsConfig, WsStream};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

type Client = WsStream<DuplexStream>;

/// Two clients joined by a splice running in its own task.
fn joined() -> (Client, Client, tokio::task::JoinHandle<SpliceEnd>) {
    let (ca, ra) = duplex(64 * 1024);
    let (cb, rb) = duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let counters = Counters::default();
        splice(ra, rb, SpliceConfig::default(), &counters).await
    });
    let cfg = WsConfig {
        max_message: 1 << 20,
        ..WsConfig::default()
    };
    (
        WsStream::new(ca, Role::Client, cfg),
        WsStream::new(cb, Role::Client, cfg),
        task,
    )
}

#[tokio::test]
async fn bytes_both_ways_with_half_close() {
    let (mut a, mut b, task) = joined();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = data.clone();
    let sender = tokio::spawn(async move {
        a.write_all(&d).await.unwrap();
        a.shutdown().await.unwrap();
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    b.write_all(b"the rest").await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(sender.await.unwrap(), b"the rest");
    assert!(matches!(task.await.unwrap(), SpliceEnd::Closed));
}

#[tokio::test]
async fn message_types_and_boundaries_are_kept() {
    let (mut a, mut b, _task) = joined();
    a.send_text("one").await.unwrap();
    a.send_binary(&[9; 70_000]).await.unwrap();
    a.send_text("").await.unwrap();
    assert_eq!(b.recv().await.unwrap(), Message::Text("one".into()));
    assert_eq!(b.recv().await.unwrap(), Message::Binary(vec![9; 70_000]));
    assert_eq!(b.recv().await.unwrap(), Message::Text(String::new()));
}

#[tokio::test]
async fn close_code_and_reason_are_forwarded_without_reply() {
    let (mut a, mut b, _task) = joined();
    a.send_close(4001, "done here").await.unwrap();
    assert_eq!(
        b.recv().await.unwrap(),
        Message::Close(Some((4001, "done here".into())))
    );
    // A got no automatic reply: B can still send, and A reads it.
    b.send_text("still here").await.unwrap();
    assert_eq!(a.recv().await.unwrap(), Message::Text("still here".into()));
}

#[tokio::test]
async fn abort_is_mirrored_as_abort() {
    let (a, mut b, task) = joined();
    drop(a);
    let mut buf = [0u8; 8];
    let err = b.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(matches!(
        task.await.unwrap(),
        SpliceEnd::Aborted { side: Side::A, .. }
    ));
}

#[tokio::test]
async fn unmasked_frame_gets_1002_and_the_other_side_is_dropped() {
    let (ca, ra) = duplex(1024);
    let (cb, rb) = duplex(1024);
    let task =
        tokio::spawn(
            async move { splice(ra, rb, SpliceConfig::default(), &Counters::default()).await },
        );
    let mut raw = ca;
    raw.write_all(&[0x82, 0x01, 0x55]).await.unwrap();
    let mut back = Vec::new();
    raw.read_to_end(&mut back).await.unwrap();
    assert_eq!(&back[..4], &[0x88, 0x02, 0x03, 0xEA]); // Close 1002
    let mut b = WsStream::new(cb, Role::Client, WsConfig::default());
    assert!(b.recv().await.is_err());
    assert!(matches!(
        task.await.unwrap(),
        SpliceEnd::Protocol {
            side: Side::A,
            error: FrameError::BadMask
        }
    ));
}

#[tokio::test]
async fn pings_are_answered_by_the_relay_not_forwarded() {
    let (ca, ra) = duplex(1024);
    let (cb, rb) = duplex(1024);
    let _task =
        tokio::spawn(
            async move { splice(ra, rb, SpliceConfig::default(), &Counters::default()).await },
        );
    let mut raw = ca;
    // Masked ping "hi" with a zero key.
    raw.write_all(&[0x89, 0x82, 0, 0, 0, 0, b'h', b'i'])
        .await
        .unwrap();
    let mut pong = [0u8; 4];
    raw.read_exact(&mut pong).await.unwrap();
    assert_eq!(pong, [0x8A, 0x02, b'h', b'i']);
    let mut b = WsStream::new(cb, Role::Client, WsConfig::default());
    raw.write_all(&[0x81, 0x81, 0, 0, 0, 0, b'z'])
        .await
        .unwrap();
    assert_eq!(b.recv().await.unwrap(), Message::Text("z".into()));
}

/// A transport that keeps written bytes until it is flushed, as a TLS stream does when its
/// socket is full.
struct HoldUntilFlush {
    inner: DuplexStream,
    held: Vec<u8>,
}

impl tokio::io::AsyncRead for HoldUntilFlush {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HoldUntilFlush {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.held.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let this = &mut *self;
            let n =
                std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
            this.held.drain(..n);
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn written_frames_are_flushed_before_the_splice_waits_for_more() {
    let (ca, ra) = duplex(64 * 1024);
    let (cb, rb) = duplex(64 * 1024);
    let held = HoldUntilFlush {
        inner: rb,
        held: Vec::new(),
    };
    let _task = tokio::spawn(async move {
        let counters = Counters::default();
        splice(ra, held, SpliceConfig::default(), &counters).await
    });
    let mut a = WsStream::new(ca, Role::Client, WsConfig::default());
    let mut b = WsStream::new(cb, Role::Client, WsConfig::default());
    a.send_text("ping me back").await.unwrap();
    // Nothing else is sent: the frame must arrive anyway.
    let got = tokio::time::timeout(std::time::Duration::from_secs(2), b.recv())
        .await
        .expect("the frame sat in the transport's buffer")
        .unwrap();
    assert_eq!(got, Message::Text("ping me back".into()));
}

/// `splice_keep` after both Closes: both connections come back open, each with what its peer
/// sent behind its Close (a kept connection's next request), which was not forwarded.
#[tokio::test]
async fn kept_connections_come_back_with_what_followed_each_close() {
    let (mut ca, ra) = duplex(64 * 1024);
    let (cb, rb) = duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let counters = Counters::default();
        splice_keep(ra, rb, SpliceConfig::default(), &counters).await
    });
    let mut b = WsStream::new(cb, Role::Client, WsConfig::default());
    // A: a frame, its Close and the start of what comes next, in one write.
    let mask = [1, 2, 3, 4];
    let masked = |op: u8, p: &[u8]| {
        let mut f = vec![0x80 | op, 0x80 | p.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]));
        f
    };
    let mut wire = masked(0x2, b"hi");
    wire.extend(masked(0x8, &1000u16.to_be_bytes()));
    wire.extend_from_slice(b"GET /next");
    ca.write_all(&wire).await.unwrap();
    let mut got = Vec::new();
    b.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hi", "nothing past the Close went on");
    b.shutdown().await.unwrap();
    b.get_mut().write_all(b"Z").await.unwrap();
    let (end, kept) = task.await.unwrap();
    assert!(matches!(end, SpliceEnd::Closed), "{end:?}");
    let mut k = *kept.expect("both closed: kept");
    assert_eq!(k.a_rest, b"GET /next");
    assert_eq!(k.b_rest, b"Z");
    // A got B's Close, and its connection is still open both ways.
    let mut close = [0u8; 4];
    ca.read_exact(&mut close).await.unwrap();
    assert_eq!(close, [0x88, 0x02, 0x03, 0xe8]);
    k.a.write_all(b"HTTP/1.1").await.unwrap();
    let mut next = [0u8; 8];
    ca.read_exact(&mut next).await.unwrap();
    assert_eq!(&next, b"HTTP/1.1");
    // However else a splice ends, nothing is kept.
    let (ca, ra) = duplex(1024);
    let (_cb, rb) = duplex(1024);
    drop(ca);
    let (end, kept) = splice_keep(ra, rb, SpliceConfig::default(), &Counters::default()).await;
    assert!(matches!(end, SpliceEnd::Aborted { .. }), "{end:?}");
    assert!(kept.is_none());
}
