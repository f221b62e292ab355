//! Rows of `attacks.md` against an in-process relay, with raw bytes where the attack is about
//! bytes: each test names its rows, sends the fixed input and checks the exact outcome.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{now, start, Env, T};
use hyco_io::ws::Message;
use hyco_proto::control::ListenerCommand;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Tls = TlsStream<TcpStream>;

/// A TLS connection to the relay from `source` (a loopback address).
async fn tls_from(env: &Env, source: &str) -> Tls {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = sock
        .connect(format!("127.0.0.1:{}", env.port).parse().unwrap())
        .await
        .unwrap();
    let tls = hyco_io::tls::client_config(Some(&env.ca)).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads until the end of a response head (or close / 5 s); returns the text read.
async fn read_head(s: &mut Tls) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends raw bytes on a fresh connection and returns the status line ("" if closed).
async fn status_of(env: &Env, bytes: &[u8]) -> String {
    let mut s = tls_from(env, "127.0.0.1").await;
    if s.write_all(bytes).await.is_err() {
        return String::new();
    }
    read_head(&mut s)
        .await
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// A WebSocket upgrade written by hand; returns the stream after a 101.
async fn upgrade(env: &Env, target: &str, token: &str) -> Tls {
    let mut s = tls_from(env, "127.0.0.1").await;
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         ServiceBusAuthorization: {token}\r\n\r\n",
        env.port
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let h = read_head(&mut s).await;
    assert!(h.starts_with("HTTP/1.1 101"), "{h}");
    s
}

/// A raw listener control channel on `hc`.
async fn raw_listener(env: &Env, hc: &str) -> Tls {
    let t = env.token(Some(hc), now() + 600);
    upgrade(
        env,
        &format!("/$hc/{hc}?sb-hc-action=listen&sb-hc-id=raw"),
        &t,
    )
    .await
}

/// One frame as a client would send it (masked unless `mask` is false).
fn frame(fin: bool, rsv: u8, opcode: u8, mask: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x11, 0x22, 0x33, 0x44];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads frames until a Close; returns its code (None: closed without one, or no Close in 5 s).
async fn close_code(s: &mut Tls) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Parse what we have: server frames are unmasked.
        let mut i = 0;
        while buf.len() >= i + 2 {
            let op = buf[i] & 0x0f;
            let (len, hl) = match buf[i + 1] & 0x7f {
                126 if buf.len() >= i + 4 => {
                    (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4)
                }
                127 if buf.len() >= i + 10 => (
                    u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize,
                    10,
                ),
                n if n < 126 => (n as usize, 2),
                _ => break,
            };
            if buf.len() < i + hl + len {
                break;
            }
            if op == 8 {
                let p = &buf[i + hl..i + hl + len];
                return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
            }
            i += hl + len;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// D1–D6, D9, D10: framing violations on a listener control channel close it with the RFC
/// code; the relay stays up for everyone else.
#[tokio::test]
async fn d_rows_framing_violations_close_with_the_rfc_code() {
    let env = start("att-d", |_| {}).await;
    let close_payload = |code: u16, reason: &[u8]| {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    };
    let long_len = {
        // Header of a masked binary frame announcing 2^40 bytes, then 10 bytes.
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 40).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(&[0u8; 10]);
        f
    };
    let top_bit = {
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 63).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        f
    };
    let mut tiny_fragments = frame(false, 0, 1, true, b"a");
    for _ in 0..200 {
        tiny_fragments.extend(frame(false, 0, 0, true, b"b"));
    }
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("D1 unmasked", frame(true, 0, 2, false, b"x"), 1002),
        (
            "D2 RSV1 without extension",
            frame(true, 4, 2, true, b"x"),
            1002,
        ),
        ("D2 opcode 3", frame(true, 0, 3, true, b"x"), 1002),
        ("D2 opcode 0xB", frame(true, 0, 0xB, true, b""), 1002),
        (
            "D3 control frame of 126 bytes",
            frame(true, 0, 9, true, &[0u8; 126]),
            1002,
        ),
        ("D3 fragmented ping", frame(false, 0, 9, true, b"p"), 1002),
        ("D4 length with the top bit", top_bit, 1002),
        ("D4 2^40 announced on the control channel", long_len, 1009),
        (
            "D5 continuation without a message",
            frame(true, 0, 0, true, b"x"),
            1002,
        ),
        (
            "D5 text inside an unfinished message",
            [
                frame(false, 0, 1, true, b"a"),
                frame(true, 0, 1, true, b"b"),
            ]
            .concat(),
            1002,
        ),
        (
            "D6 close code 999",
            frame(true, 0, 8, true, &close_payload(999, b"")),
            1002,
        ),
        (
            "D6 close code 1005",
            frame(true, 0, 8, true, &close_payload(1005, b"")),
            1002,
        ),
        (
            "D6 close code 1006",
            frame(true, 0, 8, true, &close_payload(1006, b"")),
            1002,
        ),
        (
            "D6 close code 5000",
            frame(true, 0, 8, true, &close_payload(5000, b"")),
            1002,
        ),
        (
            "D6 close payload of 1 byte",
            frame(true, 0, 8, true, &[3]),
            1002,
        ),
        (
            "D6 close reason not UTF-8",
            frame(true, 0, 8, true, &close_payload(1000, &[0xff, 0xfe])),
            1007,
        ),
        (
            "D7 text not UTF-8 (control channel)",
            frame(true, 0, 1, true, &[0xc3, 0x28]),
            1007,
        ),
        (
            "D9 tiny-fragment flood (control channel)",
            tiny_fragments,
            1009,
        ),
        (
            "D10 65 KiB control message",
            frame(true, 0, 1, true, &vec![b' '; 65 * 1024 + 1]),
            1009,
        ),
    ];
    for (name, bytes, want) in cases {
        let mut s = raw_listener(&env, "hc1").await;
        s.write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut s).await, Some(want), "{name}");
    }
    // The relay still serves a normal listener.
    let _ok = env.listen("hc1").await;
}

/// D8: a ping flood never read costs at most one pending pong; the channel keeps working.
#[tokio::test]
async fn d8_ping_flood_keeps_one_pong_and_the_channel_works() {
    let env = start("att-d8", |_| {}).await;
    let mut s = raw_listener(&env, "hc1").await;
    let ping = frame(true, 0, 9, true, b"flood");
    let mut burst = Vec::new();
    for _ in 0..1000 {
        burst.extend_from_slice(&ping);
    }
    for _ in 0..100 {
        s.write_all(&burst).await.unwrap();
    }
    // 100 000 pings sent without reading; the relay answered at most one per read, and the
    // channel still routes: a sender's accept reaches it.
    let e = std::sync::Arc::new(env);
    let e2 = std::sync::Arc::clone(&e);
    let sender = tokio::spawn(async move { e2.connect("hc1", &[]).await.map(|_| ()) });
    let mut seen = Vec::new();
    let mut chunk = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + T;
    while !String::from_utf8_lossy(&seen).contains("\"accept\"") {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&chunk[..n]),
            other => panic!("the flooded channel stopped working: {other:?}"),
        }
    }
    let pongs = seen
        .windows(7)
        .filter(|w| w[0] == 0x8A && w[1] == 5 && &w[2..] == b"flood")
        .count();
    assert!(pongs < 100_000, "every ping got its own pong: {pongs}");
    sender.abort();
}

/// A5, A6, H2: wrong rights and malformed tokens: 401/403 with the Azure error shape and
/// nothing internal in the body; the case-insensitive prefix is accepted.
#[tokio::test]
async fn a_rows_malformed_tokens_and_wrong_rights() {
    let env = start("att-a", |_| {}).await;
    let (ln, lk) = env.rule("hc1", "listen-only", r#"["Listen"]"#).await;
    let listen_only = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", Some("hc1")),
        &ln,
        &lk,
        now() + 600,
    );
    let connect = |token: String| {
        let port = env.port;
        let c = env.connector.clone();
        async move {
            c.connect(
                &format!("wss://localhost:{port}/$hc/hc1?sb-hc-action=connect"),
                &[("ServiceBusAuthorization", token.as_str())],
            )
            .await
            .map(|_| ())
            .unwrap_err()
        }
    };
    let e = connect(listen_only.as_str().to_owned()).await;
    assert_eq!(e.status(), Some(403), "A5: {e:?}");
    let good = env.token(Some("hc1"), now() + 600);
    let long_skn = "k".repeat(10_000);
    let many_pairs = "&a=b".repeat(5_000);
    let malformed = vec![
        format!("{good}&sr=http%3A%2F%2Flocalhost%2Fhc10"),
        good.replace("&se=", "&xx="),
        good.replace(&format!("se={}", now() + 600), "se=99999999999999999999"),
        good.replace(&format!("se={}", now() + 600), "se=-1"),
        good.replace(&format!("se={}", now() + 600), "se=1.5"),
        good.replace(&format!("se={}", now() + 600), "se= 123"),
        good.replace("sig=", "sig=%%%"),
        good.replace("skn=", &format!("skn={long_skn}")),
        format!("{good}{many_pairs}"),
        good.replacen("SharedAccessSignature ", "SharedAccessSignature  ", 1),
        "SharedAccessSignature".into(),
        "Bearer abc".into(),
    ];
    for t in malformed {
        let e = connect(t.clone()).await;
        assert_eq!(e.status(), Some(401), "A6 {}: {e:?}", &t[..t.len().min(80)]);
    }
    // Clients differ in the prefix's case: accepted.
    let lower = good.replacen("SharedAccessSignature", "sharedaccesssignature", 1);
    let mut l = env.listen("hc1").await;
    let port = env.port;
    let c = env.connector.clone();
    let sender = tokio::spawn(async move {
        c.connect(
            &format!("wss://localhost:{port}/$hc/hc1?sb-hc-action=connect"),
            &[("ServiceBusAuthorization", lower.as_str())],
        )
        .await
        .map(|_| ())
    });
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => assert!(t.contains("\"accept\"")),
        other => panic!("{other:?}"),
    }
    sender.abort();
    // H2: refusal bodies are {"error":{"code","message"}} and name nothing internal.
    for (target, token) in [
        (
            "/hc1/x",
            "SharedAccessSignature sr=x&sig=y&se=1&skn=z".to_owned(),
        ),
        ("/nosuch/x", env.token(None, now() + 600)),
    ] {
        let a = env
            .connector
            .https_request(
                http::Method::GET,
                &format!("https://localhost:{}{target}", env.port),
                &[("ServiceBusAuthorization", token.as_str())],
                bytes::Bytes::new(),
                1 << 16,
            )
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1);
        assert_eq!(v["error"].as_object().unwrap().len(), 2, "{v}");
        let body = String::from_utf8_lossy(&a.body);
        for internal in ["127.0.0.1", "/tmp", "hyco-relay", "redb", "panicked"] {
            assert!(!body.contains(internal), "H2: {internal} in {body}");
        }
    }
}

/// A3: odd spellings of one path either resolve to the same entity under the same audience
/// check or are refused; none reaches an entity the token does not cover.
#[tokio::test]
async fn a3_path_variants_never_reach_another_entity() {
    let env = start("att-a3", |_| {}).await;
    let other = env.token(Some("hc10"), now() + 600);
    for path in [
        "/$hc/hc1",
        "/%24hc/hc1",
        "/$hc/%68c1",
        "/$hc//hc1",
        "/$hc/./hc1",
        "/$hc/x/../hc1",
        "/$hc/hc1%2Fsub",
    ] {
        let mut s = tls_from(&env, "127.0.0.1").await;
        let head = format!(
            "GET {path}?sb-hc-action=listen HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nServiceBusAuthorization: {other}\r\n\r\n",
            env.port
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let h = read_head(&mut s).await;
        let status = h.lines().next().unwrap_or("");
        assert!(
            ["400", "401", "403", "404"]
                .iter()
                .any(|c| status.contains(c)),
            "{path} with a token for hc10: {status}"
        );
    }
}

/// B3, B7: a rendezvous dialled after the deadline is refused; a listener's reject status
/// outside 400–599 reaches the sender as 502, never as a fake success.
#[tokio::test]
async fn b_rows_late_rendezvous_and_odd_reject_statuses() {
    let env = std::sync::Arc::new(
        start("att-b", |c| {
            c.limits.rendezvous_timeout = Duration::from_secs(1);
        })
        .await,
    );
    let mut l = env.listen("hc1").await;
    let e2 = std::sync::Arc::clone(&env);
    let sender = tokio::spawn(async move { e2.connect("hc1", &[]).await.map(|_| ()).unwrap_err() });
    let a = match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Accept(a) => a,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(sender.await.unwrap().status(), Some(504));
    let late = env
        .connector
        .connect(&a.address, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(late.status(), Some(403), "B3");
    for code in ["200", "999", "101"] {
        let e2 = std::sync::Arc::clone(&env);
        let sender =
            tokio::spawn(async move { e2.connect("hc1", &[]).await.map(|_| ()).unwrap_err() });
        let a = match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
            Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
                ListenerCommand::Accept(a) => a,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let reject = format!(
            "{}&sb-hc-statusCode={code}&sb-hc-statusDescription=fine",
            a.address
        );
        let _ = env.connector.connect(&reject, &[]).await;
        assert_eq!(sender.await.unwrap().status(), Some(502), "B7 {code}");
    }
}

/// C4, C5, C6, C8: oversized and ambiguous request heads are refused before any work.
#[tokio::test]
async fn c_rows_oversized_and_ambiguous_heads() {
    let env = start("att-c", |_| {}).await;
    let host = format!("Host: localhost:{}\r\n", env.port);
    let big = format!(
        "GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\n{host}X-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let s = status_of(&env, big.as_bytes()).await;
    assert!(s.is_empty() || s.contains("431"), "C4: {s}");
    let mut many = format!("GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\n{host}");
    for i in 0..2000 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let s = status_of(&env, many.as_bytes()).await;
    assert!(s.is_empty() || s.contains("431"), "C5: {s}");
    let spaces = format!(
        "GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: b{}x\r\n\r\n",
        " ".repeat(100_000)
    );
    let s = status_of(&env, spaces.as_bytes()).await;
    assert!(
        s.is_empty() || s.contains("431") || s.contains("400"),
        "C6: {s}"
    );
    let smuggle = format!(
        "POST /hc1/x HTTP/1.1\r\n{host}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    // hyper lets Transfer-Encoding win (RFC 9112 §6.3) and the relay re-frames bodies into
    // JSON, so nothing can be smuggled; what must hold is that a request pipelined behind
    // the ambiguous one is never served on that connection.
    let pipelined = format!("{smuggle}GET /hc1?api-version=2016-07 HTTP/1.1\r\n{host}\r\n");
    let mut st = tls_from(&env, "127.0.0.1").await;
    st.write_all(pipelined.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), st.read_to_end(&mut all)).await;
    let all = String::from_utf8_lossy(&all);
    eprintln!("C8 CL+TE answer: {}", all.lines().next().unwrap_or(""));
    assert!(
        all.matches("HTTP/1.1 ").count() <= 1,
        "C8: a request behind CL+TE was served: {all}"
    );
    let bare_cr = format!("GET /hc1/x HTTP/1.1\r\n{host}X-A: a\rb\r\n\r\n");
    let s = status_of(&env, bare_cr.as_bytes()).await;
    assert!(s.is_empty() || s.contains("400"), "C8 bare CR: {s}");
    let folded = format!("GET /hc1/x HTTP/1.1\r\n{host}X-A: a\r\n  folded\r\n\r\n");
    let s = status_of(&env, folded.as_bytes()).await;
    assert!(s.is_empty() || s.contains("400"), "C8 obs-fold: {s}");
    // H3: the root and unknown paths are a neutral 404.
    let root = format!("GET / HTTP/1.1\r\n{host}\r\n");
    let mut st = tls_from(&env, "127.0.0.1").await;
    st.write_all(root.as_bytes()).await.unwrap();
    let h = read_head(&mut st).await;
    assert!(h.starts_with("HTTP/1.1 404"), "H3: {h}");
    assert!(
        !h.to_ascii_lowercase().contains("server:"),
        "H3: a product banner: {h}"
    );
}

/// C10: the sender's address in `accept` is the socket peer, whatever X-Forwarded-For says.
#[tokio::test]
async fn c10_forwarded_for_does_not_set_the_remote_endpoint() {
    let env = std::sync::Arc::new(start("att-c10", |_| {}).await);
    let mut l = env.listen("hc1").await;
    let e2 = std::sync::Arc::clone(&env);
    let sender = tokio::spawn(async move {
        let _ = e2.connect("hc1", &[("X-Forwarded-For", "1.2.3.4")]).await;
    });
    let a = match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Accept(a) => a,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(a.remote_endpoint.unwrap().address, "127.0.0.1");
    sender.abort();
}

/// F1, F2, F3: what a listener puts in an HTTP response cannot inject headers or statuses.
#[tokio::test]
async fn f_rows_listener_responses_are_sanitised() {
    let env = std::sync::Arc::new(
        start("att-f", |c| {
            c.limits.http_timeout = Duration::from_secs(5);
        })
        .await,
    );
    let mut l = env.listen("hc1").await;
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "F1 CR/LF in the reason",
            r#"{"response":{"requestId":"ID","statusCode":200,"statusDescription":"OK\r\nSet-Cookie: x=1","body":false}}"#.into(),
            200,
        ),
        (
            "F2 bad header names and values",
            r#"{"response":{"requestId":"ID","statusCode":200,"responseHeaders":{"Bad Name":"1","Bad:Colon":"2","X-Crlf":"a\r\nSet-Cookie: y=2","X-Nul":"a\u0000b","X-Good":"ok"},"body":false}}"#.into(),
            200,
        ),
        ("F3 status 99", r#"{"response":{"requestId":"ID","statusCode":99,"body":false}}"#.into(), 502),
        ("F3 status 101", r#"{"response":{"requestId":"ID","statusCode":101,"body":false}}"#.into(), 502),
        ("F3 status 600", r#"{"response":{"requestId":"ID","statusCode":600,"body":false}}"#.into(), 502),
        ("F3 status -1", r#"{"response":{"requestId":"ID","statusCode":-1,"body":false}}"#.into(), 502),
        ("D11 status abc", r#"{"response":{"requestId":"ID","statusCode":"abc","body":false}}"#.into(), 502),
    ];
    for (name, template, want) in cases {
        let e2 = std::sync::Arc::clone(&env);
        let sender = tokio::spawn(async move {
            let t = e2.token(Some("hc1"), now() + 600);
            e2.connector
                .https_request(
                    http::Method::GET,
                    &format!("https://localhost:{}/hc1/x", e2.port),
                    &[("ServiceBusAuthorization", t.as_str())],
                    bytes::Bytes::new(),
                    1 << 16,
                )
                .await
                .unwrap()
        });
        let id = match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
            Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
                ListenerCommand::Request(r) => r.id,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        l.ws.send_text(&template.replace("ID", &id)).await.unwrap();
        let a = tokio::time::timeout(T, sender).await.unwrap().unwrap();
        assert_eq!(a.status, want, "{name}");
        assert!(
            a.headers.get("set-cookie").is_none(),
            "{name}: injected header"
        );
        assert!(
            !a.reason.contains('\r') && !a.reason.contains('\n'),
            "{name}"
        );
        if name.starts_with("F2") {
            assert_eq!(a.headers["x-good"], "ok");
            for bad in ["bad name", "bad:colon", "x-crlf", "x-nul"] {
                assert!(a.headers.get(bad).is_none(), "F2: {bad} passed");
            }
        }
    }
    // D11: a response for a request this listener never got changes nothing.
    l.ws.send_text(r#"{"response":{"requestId":"never-sent","statusCode":200,"body":false}}"#)
        .await
        .unwrap();
    l.ws.send_ping(b"alive").await.unwrap();
}

/// Token brute force (issue 7 #2): failures from one address are throttled (429 with
/// Retry-After, before any token is checked); other addresses are unaffected.
#[tokio::test]
async fn failed_authorizations_are_throttled_per_source_address() {
    let env = start("att-throttle", |c| {
        c.limits.auth_failure_burst = 10;
        c.limits.auth_failures_per_sec = 0.5;
    })
    .await;
    let bad = "SharedAccessSignature sr=http%3A%2F%2Flocalhost%2Fhc1&sig=AAAA&se=9999999999&skn=RootManageSharedAccessKey";
    let good = env.token(Some("hc1"), now() + 600);
    let request = |token: &str| {
        format!(
            "GET /hc1?api-version=2016-07 HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n",
            env.port
        )
    };
    let mut statuses = Vec::new();
    for _ in 0..25 {
        let mut s = tls_from(&env, "127.0.0.1").await;
        s.write_all(request(bad).as_bytes()).await.unwrap();
        statuses.push(read_head(&mut s).await);
    }
    let unauthorized = statuses
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 401"))
        .count();
    let throttled: Vec<&String> = statuses
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 429"))
        .collect();
    assert_eq!(unauthorized, 10, "the burst is answered normally");
    assert_eq!(throttled.len(), 15);
    assert!(
        throttled[0].to_ascii_lowercase().contains("retry-after:"),
        "{}",
        throttled[0]
    );
    // Throttled means throttled: even a good token from that address waits.
    let mut s = tls_from(&env, "127.0.0.1").await;
    s.write_all(request(&good).as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 429"));
    // Another address: unaffected, both ways.
    let mut s = tls_from(&env, "127.0.0.2").await;
    s.write_all(request(&good).as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut s = tls_from(&env, "127.0.0.2").await;
    s.write_all(request(bad).as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 401"));
}

/// E6: past the memory budget, new connections get 503; the admin API still answers.
#[tokio::test]
async fn e6_over_the_memory_budget_new_connections_get_503() {
    let env = start("att-e6", |c| {
        c.limits.max_memory = Some(1 << 20); // any process is past 1 MiB
    })
    .await;
    let t = env.token(Some("hc1"), now() + 600);
    let e = env.listen_refused("hc1", &t).await;
    assert_eq!(e.status(), Some(503), "{e:?}");
    let a = env
        .connector
        .https_request(
            http::Method::GET,
            &format!("https://localhost:{}/hc1/x", env.port),
            &[("ServiceBusAuthorization", t.as_str())],
            bytes::Bytes::new(),
            1 << 16,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 503);
    let (s, _) = env.admin(http::Method::GET, "/hybridconnections", "").await;
    assert_eq!(s, 200, "the admin API is not cut off");
}

/// A request addressed to an IPv6 literal (`Host: [::1]:port`) is checked against audiences
/// for `[::1]` the same way for every kind of request: the Host loses its port as the
/// audience's host does (`hyco_proto::sas::host_without_port`), brackets kept. Before the one
/// authorization (issue 18), listen, connect, HTTP mode and the entity read stripped the
/// brackets too and refused such a token (401), while the admin API took it.
#[tokio::test]
async fn an_ipv6_literal_host_is_one_audience_for_every_kind_of_request() {
    let env = start("v6host", |_| {}).await;
    let sign = |host: &str, entity: Option<&str>| {
        hyco_proto::sas::sign(
            &hyco_proto::sas::resource_uri(host, entity),
            &env.key_name,
            &env.key,
            now() + 600,
        )
        .as_str()
        .to_owned()
    };
    let host = format!("[::1]:{}", env.port);
    let upgrade = |target: &str, token: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             ServiceBusAuthorization: {token}\r\n\r\n"
        )
    };
    let get = |target: &str, token: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n\r\n")
    };
    let listen = "/$hc/hc1?sb-hc-action=listen&sb-hc-id=v6";
    let entity = "/hc1?api-version=2017-04";
    let admin = "/$hyco/v1/hybridconnections";
    let hc1 = sign("[::1]", Some("hc1"));
    let root = sign("[::1]", None);
    assert!(status_of(&env, upgrade(listen, &hc1).as_bytes())
        .await
        .starts_with("HTTP/1.1 101"));
    assert!(status_of(&env, get(entity, &hc1).as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(status_of(&env, get(admin, &root).as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    // Another literal is another host.
    let other = sign("[::2]", Some("hc1"));
    assert!(status_of(&env, upgrade(listen, &other).as_bytes())
        .await
        .starts_with("HTTP/1.1 401"));
    assert!(status_of(&env, get(entity, &other).as_bytes())
        .await
        .starts_with("HTTP/1.1 401"));
    let other_root = sign("[::2]", None);
    assert!(status_of(&env, get(admin, &other_root).as_bytes())
        .await
        .starts_with("HTTP/1.1 401"));
}
