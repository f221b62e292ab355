//! The relay against the wire behaviour of Microsoft's Java and .NET clients (issue 17). Neither
//! client runs here, so each test plays what the client does, as its source shows (file:line
//! cited on each test; Azure/azure-relay-java, Azure/azure-relay-dotnet, Azure/azure-relay-node),
//! against the real relay over TLS and real WebSocket frames.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{now, start, Env, T};

use std::sync::Arc;

use hyco_io::ws::frame::{FrameHeader, OpCode};
use hyco_io::ws::{ConnectError, Connected, Message, Part};
use hyco_proto::address::is_guid;
use hyco_proto::control::{AcceptCommand, ListenerCommand, RequestCommand, ResponseCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn next_command(l: &mut Connected) -> ListenerCommand {
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => ListenerCommand::parse(&t).unwrap(),
        other => panic!("expected a command, got {other:?}"),
    }
}

async fn next_accept(l: &mut Connected) -> AcceptCommand {
    match next_command(l).await {
        ListenerCommand::Accept(a) => a,
        other => panic!("expected accept, got {other:?}"),
    }
}

async fn next_request(
    ws: &mut hyco_io::ws::WsStream<hyco_io::ws::handshake::ClientTls>,
) -> RequestCommand {
    match tokio::time::timeout(T, ws.recv()).await.unwrap().unwrap() {
        Message::Text(t) => match ListenerCommand::parse(&t).unwrap() {
            ListenerCommand::Request(r) => r,
            other => panic!("expected request, got {other:?}"),
        },
        other => panic!("expected text, got {other:?}"),
    }
}

fn response(id: &str, status: u16, body: bool) -> String {
    ListenerCommand::Response(ResponseCommand {
        request_id: id.to_owned(),
        status_code: status,
        status_description: None,
        response_headers: None,
        body,
    })
    .to_json()
}

/// The value of `key` in an address's query.
fn query_value(address: &str, key: &str) -> Option<String> {
    let q = address.split_once('?')?.1;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// An HTTP-mode request with a token for `hc1`, sent from a task.
fn send_http(
    env: &Env,
    method: http::Method,
    target: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> tokio::task::JoinHandle<Result<hyco_io::ws::HttpAnswer, ConnectError>> {
    let c = env.connector.clone();
    let t = env.token(Some("hc1"), now() + 600);
    let url = format!("https://localhost:{}{target}", env.port);
    tokio::spawn(async move {
        let mut h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        h.push(("ServiceBusAuthorization", &t));
        c.https_request(method, &url, &h, bytes::Bytes::from(body), 8 << 20)
            .await
    })
}

/// A listener without an `sb-hc-id` of its own, as `Connected`.
async fn listen_plain(env: &Env, hc: &str) -> Connected {
    let t = env.token(Some(hc), now() + 600);
    let url = format!("wss://localhost:{}/$hc/{hc}?sb-hc-action=listen", env.port);
    env.connector
        .connect(&url, &[("ServiceBusAuthorization", &t)])
        .await
        .unwrap()
}

/// A sender's connect with `query` before the relay's pairs and no `sb-hc-id`.
async fn connect_plain(
    env: &Env,
    hc: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Connected, ConnectError> {
    let url = format!(
        "wss://localhost:{}/$hc/{hc}?{query}sb-hc-action=connect",
        env.port
    );
    env.connector.connect(&url, headers).await
}

// Point 1. Java's listener turns every id it gets into a UUID: the accept `id`
// (HybridConnectionListener.java's accept path through TrackingContext.create,
// TrackingContext.java:55-57, `UUID.fromString` on the first 36 characters) and the request id
// of HTTP mode (HybridHttpConnection.java:93-103, the `sb-hc-id` of the rendezvous address). A
// non-GUID throws, the control channel drops, and every HTTP request fails with 502.
// Azure may append `_G<n>`, which TrackingContext.removeSuffix (TrackingContext.java:90-98) strips.
#[tokio::test]
async fn every_id_the_relay_makes_is_a_dashed_guid() {
    let env = Arc::new(start("ids", |_| {}).await);
    let mut l = listen_plain(&env, "hc1").await;
    // A sender without an sb-hc-id of its own: the relay makes the accept id.
    let e2 = Arc::clone(&env);
    let t = env.token(Some("hc1"), now() + 600);
    let sender = tokio::spawn(async move {
        connect_plain(&e2, "hc1", "", &[("ServiceBusAuthorization", &t)])
            .await
            .map(|_| ())
    });
    let a = next_accept(&mut l).await;
    assert!(is_guid(&a.id), "accept id {:?}", a.id);
    let in_address = query_value(&a.address, "sb-hc-id").unwrap();
    assert_eq!(in_address, a.id);
    env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();

    // HTTP mode, small request on the control channel.
    let s = send_http(&env, http::Method::POST, "/hc1/x", vec![], b"hi".to_vec());
    let r = next_request(&mut l.ws).await;
    assert!(is_guid(&r.id), "request id {:?}", r.id);
    assert_eq!(query_value(&r.address, "sb-hc-id").unwrap(), r.id);
    match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
        Message::Binary(b) => assert_eq!(b, b"hi"),
        other => panic!("{other:?}"),
    }
    l.ws.send_text(&response(&r.id, 200, false)).await.unwrap();
    assert_eq!(s.await.unwrap().unwrap().status, 200);

    // HTTP mode, large request: address-only, then the full request on the rendezvous.
    let s = send_http(
        &env,
        http::Method::PUT,
        "/hc1/y",
        vec![],
        vec![7u8; 100_000],
    );
    let short = next_request(&mut l.ws).await;
    assert!(is_guid(&short.id), "request id {:?}", short.id);
    assert_eq!(query_value(&short.address, "sb-hc-id").unwrap(), short.id);
    let mut rdv = env.connector.connect(&short.address, &[]).await.unwrap().ws;
    let full = next_request(&mut rdv).await;
    assert_eq!(full.id, short.id);
    for _ in 0..100 {
        match tokio::time::timeout(T, rdv.recv_part(1 << 20))
            .await
            .unwrap()
            .unwrap()
        {
            Part::Data { fin: true, .. } => break,
            Part::Data { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    rdv.send_text(&response(&full.id, 204, false))
        .await
        .unwrap();
    assert_eq!(s.await.unwrap().unwrap().status, 204);
}

/// A response over a request rendezvous as Java's listener writes it: the `response` JSON, body
/// pieces as binary frames without FIN and never a final frame (HybridHttpConnection.java:261-268
/// writes each buffer with isEnd = false), then a Close (HybridHttpConnection.java:279-284 closes
/// with NORMAL_CLOSURE). Returns what the sender got.
async fn java_style_response(
    env: &Env,
    close: Option<u16>,
) -> Result<hyco_io::ws::HttpAnswer, ConnectError> {
    let mut l = env.listen("hc1").await;
    let s = send_http(env, http::Method::GET, "/hc1/big", vec![], vec![]);
    let r = next_request(&mut l.ws).await;
    let mut rdv = env.connector.connect(&r.address, &[]).await.unwrap().ws;
    rdv.send_text(&response(&r.id, 200, true)).await.unwrap();
    rdv.send_part(false, true, false, &[1u8; 65_536])
        .await
        .unwrap();
    rdv.send_part(false, false, false, &[2u8; 30_000])
        .await
        .unwrap();
    match close {
        Some(code) => rdv.send_close(code, "NormalClosure").await.unwrap(),
        None => {
            // A Close frame without a status code.
            let mut frame = [0u8; 8];
            let n = FrameHeader {
                fin: true,
                opcode: OpCode::Close,
                mask: Some([1, 2, 3, 4]),
                len: 0,
            }
            .encode(&mut frame);
            rdv.get_mut().write_all(&frame[..n]).await.unwrap();
            rdv.get_mut().flush().await.unwrap();
        }
    }
    tokio::time::timeout(T, s).await.unwrap().unwrap()
}

// Point 2. Java's own live tests against Azure (SendReceiveTest.java's httpGETAndLargeResponseTest
// and httpLargePOSTAndSmallResponseTest) expect the whole body, so a normal Close after
// `body: true` ends the body there; any other code still aborts it.
#[tokio::test]
async fn a_normal_close_ends_a_rendezvous_response_body_as_java_sends_it() {
    let env = start("java-close", |_| {}).await;
    for close in [Some(1000), None] {
        let a = java_style_response(&env, close).await.unwrap();
        assert_eq!(a.status, 200, "{close:?}");
        assert_eq!(a.body.len(), 95_536, "{close:?}: the whole body");
        assert_eq!((a.body[0], a.body[95_535]), (1, 2));
    }
    // An abnormal close still cuts the body: the sender does not get a complete response.
    match java_style_response(&env, Some(1011)).await {
        Err(_) => {}
        Ok(a) => panic!("a 1011 close delivered a complete body of {}", a.body.len()),
    }
}

// Point 4. Java's client dials with Jetty, whose HTTP client treats a 401 without
// `WWW-Authenticate` as a protocol violation ("Authentication challenge without WWW-Authenticate
// header") and reports that instead of the relay's reason (ClientWebSocket.java:120-134 turns
// the failed upgrade into the exception the application sees).
#[tokio::test]
async fn every_401_carries_a_www_authenticate_challenge() {
    let env = start("challenge", |_| {}).await;
    // WebSocket mode: a listen with a broken token, over a raw upgrade to see the headers.
    let head = raw_head(
        &env,
        &format!(
            "GET /$hc/hc1?sb-hc-action=listen&sb-hc-token=SharedAccessSignature%20sr%3Dx HTTP/1.1\r\n\
             Host: localhost:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            env.port
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nwww-authenticate: sharedaccesssignature\r\n"),
        "{head}"
    );
    // HTTP mode and the entity read, without any token.
    for target in ["/hc1/x", "/hc1?api-version=2017-04"] {
        let a = env
            .connector
            .https_request(
                http::Method::GET,
                &format!("https://localhost:{}{target}", env.port),
                &[],
                bytes::Bytes::new(),
                1 << 20,
            )
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{target}");
        assert_eq!(
            a.headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("SharedAccessSignature"),
            "{target}"
        );
    }
}

/// Sends a raw request over TLS and returns the response head.
async fn raw_head(env: &Env, head: &str) -> String {
    let mut s = common::tls(env).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        got.extend_from_slice(&buf[..n]);
        if n == 0 || got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned() + "\r\n"
}

// Point 5. .NET's HybridRequestTests.cs:975 and :1064 send with AllowedListeners naming no
// connected listener, and with DisallowedListeners naming all of them, and assert 404 with a
// reason containing "None of the connected listeners meet the AllowedListeners/
// DisallowedListeners criteria" (HybridConnectionTestBase.cs:358-377 checks the reason phrase).
#[tokio::test]
async fn listener_choice_headers_that_rule_out_every_listener_get_404() {
    let env = Arc::new(start("none-qualify", |_| {}).await);
    let text =
        "None of the connected listeners meet the AllowedListeners/DisallowedListeners criteria";
    // Nobody connected: as before (HTTP 502, WebSocket 404 "No listener is connected").
    let s = send_http(
        &env,
        http::Method::GET,
        "/hc1/x",
        vec![("Microsoft-Relay-AllowedListeners".into(), "nobody".into())],
        vec![],
    );
    let a = s.await.unwrap().unwrap();
    assert_eq!(a.status, 502);
    assert!(!a.reason.contains(text));
    let l1 = listen_as_id(&env, "hc1", "2e3f2b8c-0000-4000-8000-000000000001").await;
    let l2 = listen_as_id(&env, "hc1", "2e3f2b8c-0000-4000-8000-000000000002").await;
    for (header, value) in [
        (
            "Microsoft-Relay-AllowedListeners",
            "6f1c1d7e-1111-4000-8000-00000000000f",
        ),
        (
            "Microsoft-Relay-DisallowedListeners",
            "2e3f2b8c-0000-4000-8000-000000000001,2e3f2b8c-0000-4000-8000-000000000002",
        ),
    ] {
        let a = send_http(
            &env,
            http::Method::GET,
            "/hc1/x",
            vec![(header.into(), value.into())],
            vec![],
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(a.status, 404, "{header}: {}", a.reason);
        assert!(a.reason.contains(text), "{header}: {}", a.reason);
        match env.connect("hc1", &[(header, value)]).await {
            Err(ConnectError::Rejected { status, reason, .. }) => {
                assert_eq!(status, 404, "{header}");
                assert!(reason.contains(text), "{header}: {reason}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{header}: connected"),
        }
    }
    drop((l1, l2));
}

/// A listener with its own `sb-hc-id`.
async fn listen_as_id(env: &Env, hc: &str, id: &str) -> Connected {
    let t = env.token(Some(hc), now() + 600);
    let url = format!(
        "wss://localhost:{}/$hc/{hc}?sb-hc-action=listen&sb-hc-id={id}",
        env.port
    );
    env.connector
        .connect(&url, &[("ServiceBusAuthorization", &t)])
        .await
        .unwrap()
}

// Point 6. On a hybrid connection without client authorization, the sender's `Authorization`
// header is the application's: .NET's listener hands the accept's headers to AcceptHandler
// (HybridConnectionListener.cs, RelayedHttpListenerContext built from connectHeaders) and Node's
// verifyClient gets them (HybridConnectionWebSocketServer.js). The relay removes it only when it
// was the credential it checked.
#[tokio::test]
async fn authorization_reaches_the_listener_unless_it_was_the_relays_credential() {
    let env = Arc::new(start("authz-header", |_| {}).await);
    let (s, body) = env
        .admin(
            http::Method::PUT,
            "/hybridconnections/open",
            r#"{"requiresClientAuthorization":false}"#,
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {body}");
    let authorization = |a: &AcceptCommand| {
        a.connect_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.clone())
    };
    // No client authorization: the header is the application's.
    let mut l = env.listen("open").await;
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        connect_plain(&e2, "open", "", &[("Authorization", "Bearer app-token")])
            .await
            .map(|_| ())
    });
    let a = next_accept(&mut l).await;
    assert_eq!(authorization(&a).as_deref(), Some("Bearer app-token"));
    env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();
    // Client authorization with the token in ServiceBusAuthorization: Authorization is still
    // the application's.
    let mut l = env.listen("hc1").await;
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        e2.connect("hc1", &[("Authorization", "Bearer app-token")])
            .await
            .map(|_| ())
    });
    let a = next_accept(&mut l).await;
    assert_eq!(authorization(&a).as_deref(), Some("Bearer app-token"));
    env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();
    // The token in Authorization: it was the relay's credential, and never reaches the listener.
    let e2 = Arc::clone(&env);
    let t = env.token(Some("hc1"), now() + 600);
    let sender = tokio::spawn(async move {
        connect_plain(&e2, "hc1", "", &[("Authorization", &t)])
            .await
            .map(|_| ())
    });
    let a = next_accept(&mut l).await;
    assert_eq!(authorization(&a), None);
    env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();
}

// Point 7. Node's listener rejects by appending `&statusCode=…&statusDescription=…` to the
// accept address (HybridConnectionWebSocketServer.js:295); the address starts with the sender's
// own query. A sender whose URL carries `statusCode` of its own must still connect, and the
// listener's appended reject must still work.
#[tokio::test]
async fn a_senders_own_status_code_parameter_does_not_reject_it() {
    let env = Arc::new(start("statuscode", |_| {}).await);
    let mut l = env.listen("hc1").await;
    let t = env.token(Some("hc1"), now() + 600);
    let e2 = Arc::clone(&env);
    let t2 = t.clone();
    let sender = tokio::spawn(async move {
        connect_plain(
            &e2,
            "hc1",
            "page=2&statusCode=404&statusDescription=gone&",
            &[("ServiceBusAuthorization", &t2)],
        )
        .await
        .map(|c| c.protocol)
    });
    let a = next_accept(&mut l).await;
    assert!(a.address.contains("statusCode=404"), "{}", a.address);
    let mut r = env.connector.connect(&a.address, &[]).await.unwrap();
    sender.await.unwrap().unwrap();
    r.ws.shutdown().await.unwrap();
    // The listener's own reject, appended after the relay's pairs, still rejects.
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move {
        connect_plain(
            &e2,
            "hc1",
            "statusCode=200&",
            &[("ServiceBusAuthorization", &t)],
        )
        .await
        .map(|_| ())
    });
    let a = next_accept(&mut l).await;
    let url = format!("{}&statusCode=418&statusDescription=teapot", a.address);
    let ans = env.connector.connect(&url, &[]).await.unwrap_err();
    assert_eq!(ans.status(), Some(410));
    match sender.await.unwrap() {
        Err(ConnectError::Rejected { status, reason, .. }) => {
            assert_eq!((status, reason.as_str()), (418, "teapot"));
        }
        other => panic!("{other:?}"),
    }
}

// Point 8. .NET's management client reads a failed entity GET's body as
// `<Error><Code>…</Code><Detail>…</Detail></Error>` and takes `Detail` for its exception text
// (ManagementOperations.cs:153-170; the status picks the exception, :122-150).
#[tokio::test]
async fn entity_read_errors_come_as_azures_xml() {
    let env = start("entity-xml", |_| {}).await;
    let get = |path: String, token: Option<String>| {
        let c = env.connector.clone();
        let url = format!("https://localhost:{}{path}", env.port);
        async move {
            let h: Vec<(&str, &str)> = token
                .as_deref()
                .map(|t| vec![("Authorization", t)])
                .unwrap_or_default();
            c.https_request(http::Method::GET, &url, &h, bytes::Bytes::new(), 1 << 20)
                .await
                .unwrap()
        }
    };
    let root = env.token(None, now() + 600);
    for (path, token, status) in [
        (
            "/missing?api-version=2017-04".to_owned(),
            Some(root.clone()),
            404u16,
        ),
        ("/hc1?api-version=2017-04".to_owned(), None, 401),
        (
            "/hc1?api-version=2017-04".to_owned(),
            Some(root.replace("sig=", "sig=AA")),
            401,
        ),
        // A query the relay cannot read (a repeated `sb-hc-token`) is refused in XML too.
        (
            "/hc1?api-version=2017-04&sb-hc-token=a&sb-hc-token=b".to_owned(),
            Some(root.clone()),
            400,
        ),
    ] {
        let a = get(path.clone(), token).await;
        assert_eq!(a.status, status, "{path}");
        let body = String::from_utf8_lossy(&a.body).into_owned();
        let detail = body
            .strip_prefix(&format!("<Error><Code>{status}</Code><Detail>"))
            .and_then(|r| r.strip_suffix("</Detail></Error>"))
            .unwrap_or_else(|| panic!("{path}: {body}"));
        assert_eq!(detail, a.reason, "{path}: the detail is the reason");
        assert!(
            a.headers["content-type"].to_str().unwrap().contains("xml"),
            "{path}"
        );
    }
    // The description itself is unchanged.
    let a = get("/hc1?api-version=2017-04".into(), Some(root)).await;
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).contains("<HybridConnectionDescription"));
}

/// Reads WebSocket frames straight off the socket until a message ends: each frame's header
/// (the payload is collected).
async fn raw_frames(
    ws: &mut hyco_io::ws::WsStream<hyco_io::ws::handshake::ClientTls>,
) -> (Vec<FrameHeader>, Vec<u8>) {
    let io = ws.get_mut();
    let (mut buf, mut frames, mut data) = (Vec::new(), Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        while let Some((h, hl)) = FrameHeader::parse(&buf).unwrap() {
            if buf.len() < hl + h.len as usize {
                break;
            }
            data.extend_from_slice(&buf[hl..hl + h.len as usize]);
            buf.drain(..hl + h.len as usize);
            frames.push(h);
            if h.fin {
                return (frames, data);
            }
        }
        let n = tokio::time::timeout(T, io.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection ended mid-message");
        buf.extend_from_slice(&chunk[..n]);
    }
    panic!("no end of message");
}

// Point 9. Java's client caps WebSocket messages at 64 KiB (ClientWebSocket.java:323-324 set the
// session's binary and text buffers to RelayConstants.DEFAULT_CONNECTION_BUFFER_SIZE,
// RelayConstants.java:20) and sends each message as one frame (ClientWebSocket.java:229-257,
// `sendBinary(buffer, isEnd)`); Jetty checks every frame against the cap. Java's
// SendReceiveTest.java websocketLargeSendLargeResponseTest (64 KiB + 1 both ways, Java on both
// ends) passes against Azure, so Azure hands on frames of at most 64 KiB. The splice does the
// same in both directions.
#[tokio::test]
async fn frames_over_64_kib_reach_the_other_side_as_continuations() {
    let env = Arc::new(start("refragment", |_| {}).await);
    let mut l = env.listen("hc1").await;
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move { e2.connect("hc1", &[]).await.unwrap() });
    let a = next_accept(&mut l).await;
    let mut listener_side = env.connector.connect(&a.address, &[]).await.unwrap();
    let mut sender_side = sender.await.unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    // Sender to listener, then listener to sender.
    one_way(&mut sender_side, &mut listener_side, &big).await;
    one_way(&mut listener_side, &mut sender_side, &big).await;
}

/// `big` sent as one frame from `from` arrives at `to` as frames of at most 64 KiB.
async fn one_way(from: &mut Connected, to: &mut Connected, big: &[u8]) {
    from.ws.send_binary(big).await.unwrap();
    let (frames, data) = raw_frames(&mut to.ws).await;
    assert!(data == big, "payload intact");
    assert!(frames.len() >= 16, "{} frames", frames.len());
    assert_eq!(frames[0].opcode, OpCode::Binary);
    for f in &frames[1..] {
        assert_eq!(f.opcode, OpCode::Continuation);
    }
    for f in &frames {
        assert!(f.len <= 64 * 1024, "a frame of {} bytes", f.len);
    }
    assert!(frames[..frames.len() - 1].iter().all(|f| !f.fin));
    // A message at the cap passes as one frame, as before.
    from.ws.send_binary(&big[..65_536]).await.unwrap();
    let (frames, data) = raw_frames(&mut to.ws).await;
    assert_eq!(frames.len(), 1);
    assert!(data == big[..65_536]);
}

// Java's parseRequestPathWithSpacesAndQueryTest (HybridConnectionListenerTest.java) signs the
// whole request URL, `/extra%20Path/extra%20%20Path2` and query included, with
// TokenProvider.getTokenAsync (TokenProvider.java:67-75: the URL, normalized, is the audience)
// and expects 200 from Azure. The audience may go on past the entity into the request's path.
#[tokio::test]
async fn a_token_signed_for_the_whole_request_url_is_accepted() {
    let env = start("whole-url", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let target = "/hc1/extra%20Path/extra%20%20Path2?queryKey=queryValue&queryKey2=queryValue;";
    let url = format!("https://localhost:{}{target}", env.port);
    let sign = |resource: &str| {
        hyco_proto::sas::sign(resource, &env.key_name, &env.key, now() + 600)
            .as_str()
            .to_owned()
    };
    let whole = sign(&url);
    let c = env.connector.clone();
    let u = url.clone();
    let sender = tokio::spawn(async move {
        c.https_request(
            http::Method::GET,
            &u,
            &[("ServiceBusAuthorization", whole.as_str())],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap()
    });
    let r = next_request(&mut l.ws).await;
    // The path as Azure hands it over: decoded (HybridHttpConnection.java:208-222 encodes it
    // again before parsing it; the test then expects `/hc/extra Path/extra  Path2` as the
    // URI's path), the query as sent.
    assert_eq!(
        r.request_target.as_deref(),
        Some("/hc1/extra Path/extra  Path2?queryKey=queryValue&queryKey2=queryValue;")
    );
    l.ws.send_text(&response(&r.id, 200, false)).await.unwrap();
    assert_eq!(
        tokio::time::timeout(T, sender)
            .await
            .unwrap()
            .unwrap()
            .status,
        200
    );
    // A token for another path under the entity does not open this one.
    let other = sign(&format!("https://localhost:{}/hc1/elsewhere", env.port));
    let a = env
        .connector
        .https_request(
            http::Method::GET,
            &url,
            &[("ServiceBusAuthorization", other.as_str())],
            bytes::Bytes::new(),
            1 << 20,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 401);
}

// Header names keep the spelling their sender used, in both directions. Java's listener keeps
// `requestHeaders` and `connectHeaders` in case-sensitive `HashMap`s (ListenerCommand.java:147-149,
// :233-235; RelayedHttpListenerRequest.java:24) and its HTTP sender reads the response through
// `HttpURLConnection.getHeaderFields()`; HybridConnectionListenerTest.java:82 (`customHeadersTest`)
// sends a name made of every token character and looks it up by that exact spelling on the
// listener (HTTP request and WebSocket accept) and on the sender (the listener's response header).
#[tokio::test]
async fn header_names_reach_the_other_side_as_spelled() {
    let env = Arc::new(start("header-case", |_| {}).await);
    let odd = "!#$%&*+-.^_`~*|ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz1234567890";
    let value = "!#$%&*+-.^_`~*|\"'(){}[]<>=/,:;@\\ABCxyz123";
    let mut l = env.listen("hc1").await;

    // HTTP mode: the request's names to the listener, the response's names to the sender.
    let t = env.token(Some("hc1"), now() + 600);
    let head = format!(
        "GET /hc1/x HTTP/1.1\r\nHost: localhost\r\nServiceBusAuthorization: {t}\r\n{odd}: {value}\r\nX-MiXeD-case: 1\r\nConnection: close\r\n\r\n"
    );
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move { raw_head(&e2, &head).await });
    let r = next_request(&mut l.ws).await;
    let got = r.request_headers.clone().unwrap_or_default();
    assert!(got.iter().any(|(k, v)| k == odd && v == value), "{got:?}");
    assert!(got.iter().any(|(k, _)| k == "X-MiXeD-case"), "{got:?}");
    let answer = ListenerCommand::Response(ResponseCommand {
        request_id: r.id.clone(),
        status_code: 200,
        status_description: None,
        response_headers: Some(vec![
            (odd.to_owned(), "w".to_owned()),
            ("X-Listener-SPELLING".to_owned(), "1".to_owned()),
        ]),
        body: false,
    })
    .to_json();
    l.ws.send_text(&answer).await.unwrap();
    let resp = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&format!("\r\n{odd}: w\r\n")), "{resp}");
    assert!(resp.contains("\r\nX-Listener-SPELLING: 1\r\n"), "{resp}");

    // WebSocket mode (Java's sender is Jetty's upgrade request, names as the application gave
    // them): the sender's names in the accept's connectHeaders.
    let head = format!(
        "GET /$hc/hc1?sb-hc-action=connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nServiceBusAuthorization: {t}\r\n{odd}: {value}\r\nx-lower-case: 2\r\n\r\n"
    );
    let e2 = Arc::clone(&env);
    let sender = tokio::spawn(async move { raw_head(&e2, &head).await });
    let a = next_accept(&mut l).await;
    let h = &a.connect_headers;
    assert!(h.iter().any(|(k, v)| k == odd && v == value), "{h:?}");
    assert!(h.iter().any(|(k, _)| k == "x-lower-case"), "{h:?}");
    assert!(h.iter().any(|(k, _)| k == "Sec-WebSocket-Key"), "{h:?}");
    env.connector.connect(&a.address, &[]).await.unwrap();
    let resp = tokio::time::timeout(T, sender).await.unwrap().unwrap();
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
}

// A listener's response with content and no Content-Type. Java's listener never sets one
// (nothing in azure-relay-java's src/main names it), and the JDK's
// `HttpURLConnection.getContent()`, which HybridConnectionListenerTest.java:373
// (`parseRequestPathWithSpacesAndQueryTest`) calls, throws "no content-type" without it. The
// relay states what RFC 9110 §8.3 lets a recipient assume: application/octet-stream. A type the
// listener gave is kept, and a response without content gets none.
#[tokio::test]
async fn content_without_a_type_is_sent_as_octet_stream() {
    let env = start("untyped", |_| {}).await;
    let mut l = env.listen("hc1").await;
    let typed = vec![("Content-Type".to_owned(), "text/plain".to_owned())];
    for (headers, status, body, expect) in [
        (
            None,
            200,
            &b"{\"foo\":\"bar\"}"[..],
            Some("application/octet-stream"),
        ),
        (Some(typed), 200, &b"x"[..], Some("text/plain")),
        (None, 204, &b""[..], None),
        (None, 200, &b""[..], None),
    ] {
        let s = send_http(&env, http::Method::GET, "/hc1/x", vec![], vec![]);
        let r = next_request(&mut l.ws).await;
        let answer = ListenerCommand::Response(ResponseCommand {
            request_id: r.id.clone(),
            status_code: status,
            status_description: None,
            response_headers: headers,
            body: !body.is_empty(),
        })
        .to_json();
        l.ws.send_text(&answer).await.unwrap();
        if !body.is_empty() {
            l.ws.send_binary(body).await.unwrap();
        }
        let a = s.await.unwrap().unwrap();
        assert_eq!(a.status, status);
        assert_eq!(&a.body[..], body);
        let got = a.headers.get("content-type").map(|v| v.to_str().unwrap());
        assert_eq!(got, expect, "status {status}, body {body:?}");
    }
}
