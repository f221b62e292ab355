use super::*;
use std::time::Duration;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

fn pair(
    cfg: WsConfig,
) -> (
    WsStream<tokio::io::DuplexStream>,
    WsStream<tokio::io::DuplexStream>,
) {
    let (a, b) = duplex(256 * 1024);
    (
        WsStream::new(a, Role::Client, cfg),
        WsStream::new(b, Role::Server, cfg),
    )
}

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_reads_as_eof() {
    let (mut c, mut s) = pair(WsConfig::default());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        c.write_all(&d2).await.unwrap();
        c.shutdown().await.unwrap();
        // Still readable after our half-close.
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, data);
    assert_eq!(s.peer_close(), Some(&Some((1000, String::new()))));
    s.write_all(b"reply after half-close").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(writer.await.unwrap(), b"reply after half-close");
}

#[tokio::test]
async fn messages_keep_type_and_limits_hold() {
    let cfg = WsConfig {
        max_message: 1000,
        ..WsConfig::default()
    };
    let (mut c, mut s) = pair(cfg);
    c.send_text("hello").await.unwrap();
    c.send_binary(&[1, 2, 3]).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), Message::Text("hello".into()));
    assert_eq!(s.recv().await.unwrap(), Message::Binary(vec![1, 2, 3]));
    c.send_binary(&[0u8; 1001]).await.unwrap();
    assert!(matches!(
        s.recv().await,
        Err(WsError::Protocol(FrameError::TooLarge {
            size: 1001,
            limit: 1000
        }))
    ));
    s.flush_pending().await.unwrap();
    // The offender learns why: Close 1009 naming the size cap.
    match c.recv().await.unwrap() {
        Message::Close(Some((code, reason))) => {
            assert_eq!(code, 1009);
            assert_eq!(
                reason,
                "message of 1001 bytes exceeds the limit of 1000 bytes"
            );
        }
        other => panic!("expected close, got {other:?}"),
    }
}

/// Issue 15 §7: a message of many tiny fragments is refused for its fragment count, and the
/// Close says so (it used to say "frame of 1 bytes exceeds the limit").
#[tokio::test]
async fn too_many_fragments_close_1009_naming_the_fragment_cap() {
    let cfg = WsConfig {
        max_fragments: 4,
        ..WsConfig::default()
    };
    let (mut c, mut s) = pair(cfg);
    for i in 0..5 {
        c.send_part(true, i == 0, false, b"x").await.unwrap();
    }
    assert!(matches!(
        s.recv().await,
        Err(WsError::Protocol(FrameError::TooManyFragments(4)))
    ));
    s.flush_pending().await.unwrap();
    match c.recv().await.unwrap() {
        Message::Close(Some((code, reason))) => {
            assert_eq!(code, 1009);
            assert_eq!(
                reason,
                "message in more than 4 fragments exceeds the fragment limit"
            );
        }
        other => panic!("expected close, got {other:?}"),
    }
}

#[tokio::test]
async fn pings_are_answered_and_unmasked_client_frames_refused() {
    let (mut c, mut s) = pair(WsConfig::default());
    s.send_ping(b"p1").await.unwrap();
    s.send_text("after ping").await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Message::Text("after ping".into()));
    c.send_text("x").await.unwrap();
    // The server sees the text; the client's pong was sent and ignored.
    assert_eq!(s.recv().await.unwrap(), Message::Text("x".into()));

    let (a, b) = duplex(1024);
    let mut raw = a;
    let mut srv = WsStream::new(b, Role::Server, WsConfig::default());
    raw.write_all(&[0x82, 0x01, 0xAA]).await.unwrap();
    assert!(matches!(
        srv.recv().await,
        Err(WsError::Protocol(FrameError::BadMask))
    ));
}

#[tokio::test]
async fn eof_without_close_is_an_error_not_a_clean_end() {
    let (a, b) = duplex(1024);
    let mut s = WsStream::new(b, Role::Server, WsConfig::default());
    drop(a);
    let mut buf = [0u8; 16];
    let err = s.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn fragmented_messages_reassemble_and_bad_order_is_refused() {
    let (mut raw, b) = duplex(1024);
    let mut s = WsStream::new(b, Role::Server, WsConfig::default());
    // "hel" (text, no FIN) + ping + "lo" (continuation, FIN), all masked with a zero key.
    raw.write_all(&[0x01, 0x83, 0, 0, 0, 0, b'h', b'e', b'l'])
        .await
        .unwrap();
    raw.write_all(&[0x89, 0x80, 0, 0, 0, 0]).await.unwrap();
    raw.write_all(&[0x80, 0x82, 0, 0, 0, 0, b'l', b'o'])
        .await
        .unwrap();
    assert_eq!(s.recv().await.unwrap(), Message::Text("hello".into()));
    // A continuation with no message started.
    raw.write_all(&[0x80, 0x81, 0, 0, 0, 0, b'x'])
        .await
        .unwrap();
    assert!(matches!(
        s.recv().await,
        Err(WsError::Protocol(FrameError::BadFragmentation))
    ));
}

#[tokio::test]
async fn parts_stream_a_large_message_and_mix_with_whole_messages() {
    let (mut c, mut s) = pair(WsConfig::default());
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let b2 = body.clone();
    let writer = tokio::spawn(async move {
        c.send_text("{\"response\":{}}").await.unwrap();
        let mut first = true;
        for chunk in b2.chunks(70_000) {
            c.send_part(false, first, false, chunk).await.unwrap();
            first = false;
        }
        // An empty final frame, as .NET ends a streamed response.
        c.send_part(false, false, true, &[]).await.unwrap();
        c.send_binary(b"next").await.unwrap();
        c.send_close(1000, "").await.unwrap();
    });
    assert_eq!(
        s.recv().await.unwrap(),
        Message::Text("{\"response\":{}}".into())
    );
    let mut got = Vec::new();
    let mut pieces = 0;
    loop {
        match s.recv_part(16 * 1024).await.unwrap() {
            Part::Data {
                text,
                first,
                fin,
                data,
            } => {
                assert!(!text);
                assert_eq!(first, pieces == 0);
                assert!(data.len() <= 16 * 1024);
                pieces += 1;
                got.extend_from_slice(&data);
                if fin {
                    break;
                }
            }
            Part::Close(c) => panic!("close before the end of the body: {c:?}"),
        }
        assert!(pieces < 1000);
    }
    assert_eq!(got, body);
    // The next message starts afresh, whole or in parts.
    match s.recv_part(1024).await.unwrap() {
        Part::Data {
            first, fin, data, ..
        } => {
            assert!(first && fin);
            assert_eq!(data, b"next");
        }
        other => panic!("expected data, got {other:?}"),
    }
    assert_eq!(
        s.recv_part(1024).await.unwrap(),
        Part::Close(Some((1000, String::new())))
    );
    writer.await.unwrap();
}

#[tokio::test]
async fn recv_in_the_middle_of_a_partly_read_message_is_refused() {
    // Found by the ws_frame fuzz target (fuzz/regressions/ws_frame): the rest of a message
    // begun with recv_part came out of recv as Binary, past max_message and unchecked UTF-8.
    let cfg = WsConfig {
        max_message: 2,
        ..WsConfig::default()
    };
    let (mut c, mut s) = pair(cfg);
    c.send_text("123456789").await.unwrap();
    match s.recv_part(4).await.unwrap() {
        Part::Data {
            first, fin, data, ..
        } => {
            assert!(first && !fin);
            assert_eq!(data, b"1234");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        s.recv().await.is_err(),
        "recv must not return the rest of the message"
    );
    // Finishing with recv_part still works.
    match s.recv_part(64).await.unwrap() {
        Part::Data { fin, data, .. } => {
            assert!(fin);
            assert_eq!(data, b"56789");
        }
        other => panic!("{other:?}"),
    }
}

/// Byte-stream writes go out as frames of at most `max_frame_out` from a pooled buffer that is
/// given back once written, with control frames queued behind a pending data frame kept in
/// order: data, then the Close.
#[tokio::test]
async fn data_frames_use_a_pooled_buffer_only_until_written() {
    let cfg = WsConfig {
        max_frame_out: 5000,
        ..WsConfig::default()
    };
    let (mut c, mut s) = pair(cfg);
    let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 241) as u8).collect();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        c.write_all(&d2).await.unwrap();
        c.flush().await.unwrap();
        assert!(!c.dbuf.is_held(), "flushed: no frame buffer held");
        c.shutdown().await.unwrap();
        c
    });
    // Frame by frame on the server side: every data frame is at most 5000 bytes.
    let mut got = Vec::new();
    let (mut frames, mut in_frame) = (0, 0);
    loop {
        match s.recv_part(1 << 20).await.unwrap() {
            Part::Data { data, fin, .. } => {
                got.extend_from_slice(&data);
                in_frame += data.len();
                if fin {
                    assert!(in_frame <= 5000, "frames capped at max_frame_out");
                    frames += 1;
                    in_frame = 0;
                }
            }
            Part::Close(c) => {
                assert_eq!(c, Some((1000, String::new())));
                break;
            }
        }
    }
    assert_eq!(got, data);
    assert_eq!(frames, data.len().div_ceil(5000));
    let c = writer.await.unwrap();
    assert!(!c.dbuf.is_held());
}

/// The side that closes first reads until the peer's Close before it lets the socket go. A
/// peer that is still sending (a pong, the tail of a message) when our Close reaches it must
/// see our code and a clean end, not a reset: over real TCP, dropping a socket with bytes
/// arriving makes the kernel answer them with RST.
#[tokio::test]
async fn finish_close_waits_for_the_peers_close_so_the_peer_never_meets_a_reset() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = WsStream::new(tcp, Role::Server, WsConfig::default());
        s.send_close(1008, "The token has expired.").await.unwrap();
        s.finish_close(Duration::from_secs(10)).await;
        // The peer's Close, read while waiting.
        s.peer_close().cloned()
    });
    // The client side by hand, so that it can answer late and watch how the socket ends.
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = [0u8; 2];
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(head, [0x88, 2 + 22], "our Close comes first");
    let mut payload = [0u8; 24];
    c.read_exact(&mut payload).await.unwrap();
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
    // The peer answers late, after more data of its own (masked with a zero key).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut binary = vec![0x82, 0xfe, 0x03, 0xe8, 0, 0, 0, 0];
    binary.extend_from_slice(&[7u8; 1000]);
    c.write_all(&binary).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xf0])
        .await
        .unwrap();
    // A clean end (FIN), not ECONNRESET.
    let mut tail = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut tail))
        .await
        .expect("the server let go within its wait");
    assert!(end.is_ok(), "the peer met {end:?}");
    assert!(tail.is_empty());
    let peer = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peer, Some(Some((1008, String::new()))));
}

/// Where a test's recycled stream goes: the transport and its rest on `Some`, `None` when the
/// place was dropped without it.
struct Place(std::sync::mpsc::Sender<Option<Vec<u8>>>, bool);

impl Recycle<tokio::io::DuplexStream> for Place {
    fn give_back(mut self: Box<Self>, _io: tokio::io::DuplexStream, rest: Vec<u8>) {
        self.1 = true;
        let _ = self.0.send(Some(rest));
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.0.send(None);
        }
    }
}

/// A stream goes back only after both Closes with 1000, with what the peer sent behind its
/// Close; any other end drops the place, which learns it.
#[tokio::test]
async fn recycle_gives_the_transport_back_only_after_a_normal_end() {
    for (ours, theirs, kept) in [(1000, 1000, true), (1000, 1001, false), (4001, 1000, false)] {
        let (mut c, mut s) = pair(WsConfig::default());
        let (tx, rx) = std::sync::mpsc::channel();
        c.set_recycle(Box::new(Place(tx, false)));
        c.send_close(ours, "").await.unwrap();
        assert!(!c.reusable(), "not before the peer's Close");
        assert!(matches!(s.recv().await.unwrap(), Message::Close(_)));
        s.send_close(theirs, "").await.unwrap();
        s.get_mut().write_all(b"next").await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(c.reusable(), kept, "{ours}/{theirs}");
        assert_eq!(c.recycle(), kept);
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got.is_some(), kept, "{ours}/{theirs}");
        if let Some(rest) = got {
            assert_eq!(rest, b"next", "the bytes behind the peer's Close");
        }
    }
    // Without a place, nothing to give back.
    let (c, _s) = pair(WsConfig::default());
    assert!(!c.reusable());
    assert!(!c.recycle());
}
