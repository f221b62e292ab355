//! Early data (`hyco_io::ws::early`) against a real TLS server written here, which answers each
//! connection as its script says: the classic 101 that advertises `early-data`, then early-mode
//! answers (a 101, a 101 without the extension, a 404, a 101 with a wrong accept key). What the
//! server saw between the request head and its answer is reported back and checked: the first
//! frames right behind the head, and never more than the advertised budget.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::Duration;

use hyco_io::ws::handshake::accept_key;
use hyco_io::ws::{ConnectError, Connector, Role, WsConfig, WsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The budget the server advertises.
const BUDGET: usize = 1000;

/// How the server answers one connection.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A 101 to a classic upgrade, advertising `early-data;max=BUDGET`.
    Classic,
    /// Waits for `BUDGET` bytes of frames, then a 101 (with the extension or not) and a frame
    /// of its own in the same write; then reads the sender's payload to its Close.
    Early { ext: bool },
    /// Waits for the first early bytes, then refuses.
    Refuse,
    /// Waits for the first early bytes, then a 101 with a wrong `Sec-WebSocket-Accept`.
    BadKey,
    /// Waits for the first early bytes, then a 101 whose head never ends (32 KiB of headers).
    Endless,
    /// Reads what comes and never answers.
    Silent,
}

/// What the server saw on one connection.
#[derive(Debug, Default)]
struct Seen {
    head: String,
    /// Bytes that arrived behind the head before the server answered.
    before_answer: Vec<u8>,
    /// The sender's payload (Early only).
    payload: Vec<u8>,
}

/// Deletes the CA file the client trusts.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts the server; returns its port, the CA file and the channel of what it saw.
async fn server(script: Vec<Answer>) -> (u16, TempFile, mpsc::Receiver<Seen>) {
    let pki = hyco_io::tls::generate_pki(&["localhost".to_owned()]).unwrap();
    let certs = hyco_io::tls::parse_certs(pki.cert_pem.as_bytes(), "cert").unwrap();
    let key = hyco_io::tls::parse_key(pki.key_pem.as_bytes(), "key").unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(hyco_io::tls::server_config(certs, key).unwrap());
    let ca = TempFile(std::env::temp_dir().join(format!(
        "hyco-early-ca-{}-{}.pem",
        std::process::id(),
        rand::random::<u64>()
    )));
    std::fs::write(&ca.0, pki.ca_cert_pem).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for answer in script {
            let (tcp, _) = l.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let seen = serve(tls, answer).await;
                let _ = tx.send(seen).await;
            });
        }
    });
    (port, ca, rx)
}

async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    answer: Answer,
) -> Seen {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(buf.len() < 16 * 1024, "head too long");
        let n = tls.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let mut early = buf[end..].to_vec();
    let ws_key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap()
        .to_owned();
    let good = accept_key(ws_key.as_bytes());
    let ok = |accept: &str, ext: bool| {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{}\r\n",
            if ext { format!("Hyco-Extensions: standby;max=4;ttl=60, early-data;max={BUDGET}\r\n") } else { String::new() }
        )
    };
    // Early modes: wait (bounded) for the bytes the sender may send before the 101.
    let want = match answer {
        Answer::Classic => 0,
        Answer::Early { .. } => BUDGET,
        Answer::Refuse | Answer::BadKey | Answer::Endless | Answer::Silent => 1,
    };
    while early.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .expect("early bytes within 10 s")
            .unwrap();
        assert!(n > 0, "closed before the early bytes");
        early.extend_from_slice(&chunk[..n]);
    }
    if want == BUDGET {
        // The budget is spent: nothing more may come before our answer. (A bounded check of
        // absence; the sender has 2 * BUDGET more bytes queued and nothing else to wait for.)
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), tls.read(&mut chunk)).await
        {
            early.extend_from_slice(&chunk[..n]);
        }
    }
    let mut seen = Seen {
        head,
        before_answer: early.clone(),
        payload: Vec::new(),
    };
    match answer {
        Answer::Classic => {
            tls.write_all(ok(&good, true).as_bytes()).await.unwrap();
            // Hold the connection until the client goes.
            let _ = tls.read(&mut chunk).await;
        }
        Answer::Refuse => {
            tls.write_all(b"HTTP/1.1 404 No listener here\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = tls.shutdown().await;
        }
        Answer::Silent => {
            // Until the client goes.
            while matches!(tls.read(&mut chunk).await, Ok(n) if n > 0) {}
        }
        Answer::Endless => {
            let mut head = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
            while head.len() < 32 * 1024 {
                head.extend_from_slice(format!("X-Filler: {}\r\n", "a".repeat(1000)).as_bytes());
            }
            let _ = tls.write_all(&head).await;
            let _ = tls.read(&mut chunk).await;
        }
        Answer::BadKey => {
            tls.write_all(ok("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", true).as_bytes())
                .await
                .unwrap();
            let _ = tls.read(&mut chunk).await;
        }
        Answer::Early { ext } => {
            // The 101 and our first frame ("hi", unmasked binary) in one write.
            let mut answer = ok(&good, ext).into_bytes();
            answer.extend_from_slice(&[0x82, 2, b'h', b'i']);
            tls.write_all(&answer).await.unwrap();
            let mut ws = WsStream::with_prefix(tls, Role::Server, WsConfig::default(), &early);
            tokio::time::timeout(Duration::from_secs(10), ws.read_to_end(&mut seen.payload))
                .await
                .expect("payload within 10 s")
                .unwrap();
            let _ = ws.send_close(1000, "").await;
        }
    }
    seen
}

fn connector(ca: &TempFile) -> Connector {
    let mut c = Connector::new(hyco_io::tls::client_config(Some(&ca.0)).unwrap());
    c.timeout = Duration::from_secs(10);
    c
}

fn payload() -> Vec<u8> {
    (0..3 * BUDGET).map(|i| (i % 251) as u8).collect()
}

/// Sends `payload()` and half-closes while reading what comes back; returns it.
async fn exchange(ws: WsStream<hyco_io::tls::ClientTls>) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(ws);
    let writer = async move {
        w.write_all(&payload()).await?;
        w.shutdown().await
    };
    let reader = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map(|_| got)
    };
    let (wr, rd) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("exchange within 20 s");
    wr?;
    rd
}

fn connect_error(e: &std::io::Error) -> &ConnectError {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<ConnectError>())
        .unwrap_or_else(|| panic!("not a ConnectError: {e:?}"))
}

#[tokio::test]
async fn early_frames_go_right_behind_the_head_and_stop_at_the_budget() {
    let (port, ca, mut seen) = server(vec![
        Answer::Classic,
        Answer::Early { ext: true },
        Answer::Early { ext: false },
    ])
    .await;
    let c = connector(&ca);
    let url = format!("wss://localhost:{port}/$hc/db?sb-hc-action=connect&sb-hc-id=1");
    let headers = [("ServiceBusAuthorization", "SharedAccessSignature x")];

    // The first connect is classic; its 101 teaches the connector.
    assert_eq!(c.early_data_for("localhost", port), None);
    let first = c.connect_early(&url, &headers).await.unwrap();
    assert!(!first.ws.response_pending());
    assert_eq!(first.extensions.early_data, Some(BUDGET as u32));
    assert_eq!(c.early_data_for("LocalHost", port), Some(BUDGET as u32));
    drop(first);
    let s = seen.recv().await.unwrap();
    assert!(
        s.before_answer.is_empty(),
        "classic: nothing before the 101"
    );

    // A clone shares what was learnt: this connect returns before any answer.
    let second = c.clone().connect_early(&url, &headers).await.unwrap();
    assert!(second.ws.response_pending());
    let back = exchange(second.ws).await.unwrap();
    assert_eq!(back, b"hi");
    let s = seen.recv().await.unwrap();
    assert!(
        s.head.starts_with(
            "GET /$hc/db?sb-hc-action=connect&sb-hc-id=1 HTTP/1.1\r\nHost: localhost:"
        ),
        "{}",
        s.head
    );
    assert!(s
        .head
        .contains("\r\nServiceBusAuthorization: SharedAccessSignature x\r\n"));
    assert!(s.head.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    // Right behind the head: a masked binary frame. And never more than the budget before
    // the 101.
    assert_eq!(s.before_answer[0], 0x82, "{:?}", &s.before_answer[..8]);
    assert_eq!(s.before_answer[1] & 0x80, 0x80, "masked");
    assert_eq!(
        s.before_answer.len(),
        BUDGET,
        "exactly the budget before the 101"
    );
    assert_eq!(s.payload, payload(), "every byte arrives, in order");
    assert_eq!(c.early_data_for("localhost", port), Some(BUDGET as u32));

    // This 101 no longer advertises early data: the exchange works, and it is forgotten.
    let third = c.connect_early(&url, &headers).await.unwrap();
    assert!(third.ws.response_pending());
    assert_eq!(exchange(third.ws).await.unwrap(), b"hi");
    assert_eq!(seen.recv().await.unwrap().payload, payload());
    assert_eq!(
        c.early_data_for("localhost", port),
        None,
        "next connect classic"
    );
}

#[tokio::test]
async fn a_refusal_or_a_bad_101_is_the_streams_error() {
    let (port, ca, mut seen) = server(vec![Answer::Classic, Answer::Refuse, Answer::BadKey]).await;
    let c = connector(&ca);
    let url = format!("wss://localhost:{port}/$hc/db?sb-hc-action=connect");
    drop(c.connect_early(&url, &[]).await.unwrap());
    seen.recv().await.unwrap();

    // 404: the reason phrase as sent, no body, and the same error on every later use.
    let mut ws = c.connect_early(&url, &[]).await.unwrap().ws;
    ws.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let e = ws.read(&mut buf).await.unwrap_err();
    match connect_error(&e) {
        ConnectError::Rejected {
            status,
            reason,
            body,
        } => {
            assert_eq!(*status, 404);
            assert_eq!(reason, "No listener here");
            assert!(body.is_empty());
        }
        other => panic!("{other}"),
    }
    let e = ws.read(&mut buf).await.unwrap_err();
    assert_eq!(connect_error(&e).status(), Some(404));
    let e = async {
        loop {
            ws.write_all(&[0u8; 512]).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    }
    .await
    .unwrap_err();
    assert_eq!(
        connect_error(&e).status(),
        Some(404),
        "writes fail the same way"
    );
    let s = seen.recv().await.unwrap();
    assert_eq!(&s.before_answer[..1], &[0x82]);
    assert_eq!(
        c.early_data_for("localhost", port),
        Some(BUDGET as u32),
        "a refusal says nothing about the relay"
    );

    // A 101 whose accept key is wrong is not a WebSocket.
    let mut ws = c.connect_early(&url, &[]).await.unwrap().ws;
    ws.write_all(b"x").await.unwrap();
    let e = ws.read(&mut buf).await.unwrap_err();
    assert!(
        matches!(
            connect_error(&e),
            ConnectError::BadHandshake("wrong Sec-WebSocket-Accept")
        ),
        "{e}"
    );
    drop(ws);
    seen.recv().await.unwrap();
}

/// A head too large to be a 101 is refused, not buffered without end.
#[tokio::test]
async fn an_endless_response_head_is_cut_at_16_kib() {
    let (port, ca, mut seen) = server(vec![Answer::Classic, Answer::Endless]).await;
    let c = connector(&ca);
    let url = format!("wss://localhost:{port}/$hc/db?sb-hc-action=connect");
    drop(c.connect_early(&url, &[]).await.unwrap());
    seen.recv().await.unwrap();
    let mut ws = c.connect_early(&url, &[]).await.unwrap().ws;
    ws.write_all(b"x").await.unwrap();
    let e = ws.read(&mut [0u8; 16]).await.unwrap_err();
    assert!(
        matches!(
            connect_error(&e),
            ConnectError::BadHandshake("response head too large")
        ),
        "{e}"
    );
}

/// A relay that never answers: the stream gives up after the connector's timeout, as a classic
/// connect would.
#[tokio::test]
async fn a_relay_that_never_answers_times_out() {
    let (port, ca, mut seen) = server(vec![Answer::Classic, Answer::Silent]).await;
    let mut c = connector(&ca);
    let url = format!("wss://localhost:{port}/$hc/db?sb-hc-action=connect");
    drop(c.connect_early(&url, &[]).await.unwrap());
    seen.recv().await.unwrap();
    c.timeout = Duration::from_secs(1);
    let mut ws = c.connect_early(&url, &[]).await.unwrap().ws;
    ws.write_all(b"x").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), ws.read(&mut [0u8; 16]))
        .await
        .expect("the stream's own deadline came first")
        .unwrap_err();
    assert!(
        matches!(connect_error(&e), ConnectError::Timeout(d) if *d == Duration::from_secs(1)),
        "{e}"
    );
    drop(ws);
    assert_eq!(seen.recv().await.unwrap().before_answer.len(), 2 + 4 + 1);
}
