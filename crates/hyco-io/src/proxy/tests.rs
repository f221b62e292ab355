use super::*;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

#[test]
fn proxy_urls() {
    let p = ProxyUrl::parse("http://hyco:p%40ss%3Aw0rd@proxy.corp:3128").unwrap();
    assert_eq!((p.host(), p.port()), ("proxy.corp", 3128));
    let basic = base64::engine::general_purpose::STANDARD.encode("hyco:p@ss:w0rd");
    assert_eq!(
        p.authorization.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(p.to_string(), "http://hyco:***@proxy.corp:3128");
    assert_eq!(
        format!("{p:?}"),
        "ProxyUrl(http://hyco:***@proxy.corp:3128)"
    );

    let p = ProxyUrl::parse("proxy.corp:8080").unwrap();
    assert_eq!(
        (p.to_string(), p.has_credentials()),
        ("http://proxy.corp:8080".into(), false)
    );
    assert_eq!(ProxyUrl::parse("http://proxy.corp/").unwrap().port(), 80);
    let p = ProxyUrl::parse("http://[::1]:3128").unwrap();
    assert_eq!(
        (p.host(), p.to_string()),
        ("::1", "http://[::1]:3128".into())
    );
    assert!(ProxyUrl::parse("http://u@h:1").unwrap().has_credentials());

    for (bad, says) in [
        ("https://proxy.corp:443", "https:// proxies"),
        ("socks5://proxy.corp:1080", "not supported"),
        ("http://:3128", "host"),
        ("http://proxy.corp:3128/path", "no path"),
        ("http://u:secret@proxy corp:3128", "not a URL"),
    ] {
        let e = ProxyUrl::parse(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
        assert!(!e.contains("secret"), "{bad}: {e}");
    }
}

#[test]
fn no_proxy_rules() {
    let cases: &[(&str, &str, u16, bool)] = &[
        // names: suffix on a dot boundary, leading dot or `*.` allowed, case-insensitive
        ("example.com", "example.com", 443, true),
        ("example.com", "relay.example.com", 443, true),
        ("example.com", "a.b.example.com", 443, true),
        ("example.com", "badexample.com", 443, false),
        ("example.com", "example.com.evil", 443, false),
        (".example.com", "example.com", 443, true),
        (".example.com", "relay.example.com", 443, true),
        ("*.example.com", "relay.example.com", 443, true),
        ("EXAMPLE.com", "Relay.Example.COM.", 443, true),
        (" foo , example.com ", "relay.example.com", 443, true),
        ("localhost", "localhost", 9443, true),
        ("localhost", "127.0.0.1", 9443, false),
        // `*`
        ("*", "anything.example", 1, true),
        ("foo,*", "10.0.0.1", 1, true),
        // ports
        ("example.com:9443", "relay.example.com", 9443, true),
        ("example.com:9443", "relay.example.com", 443, false),
        ("127.0.0.1:9443", "127.0.0.1", 9443, true),
        ("127.0.0.1:9443", "127.0.0.1", 443, false),
        // IP literals: exact address, never a name match
        ("127.0.0.1", "127.0.0.1", 443, true),
        ("127.0.0.1", "127.0.0.2", 443, false),
        ("0.0.1", "127.0.0.1", 443, false),
        ("::1", "::1", 443, true),
        ("::1", "[::1]", 443, true),
        ("[::1]", "::1", 443, true),
        ("[::1]:9443", "::1", 9443, true),
        ("[::1]:9443", "::1", 443, false),
        ("[0:0::1]", "::1", 443, true),
        // CIDR blocks
        ("10.0.0.0/8", "10.200.3.4", 443, true),
        ("10.0.0.0/8", "11.0.0.1", 443, false),
        ("192.168.1.0/24:443", "192.168.1.7", 443, true),
        ("192.168.1.0/24:443", "192.168.1.7", 80, false),
        ("0.0.0.0/0", "8.8.8.8", 443, true),
        ("fd00::/8", "fd12::1", 443, true),
        ("fd00::/8", "fe80::1", 443, false),
        ("10.0.0.0/8", "fd00::1", 443, false),
        // unusable entries are skipped, not matched
        ("", "example.com", 443, false),
        (",,", "example.com", 443, false),
        (".", "example.com", 443, false),
        ("example.com:http", "example.com", 443, false),
        ("10.0.0.0/33", "10.0.0.1", 443, false),
        ("[::1", "::1", 443, false),
        ("exa mple.com", "mple.com", 443, false),
    ];
    let mut checked = 0;
    for (list, host, port, want) in cases {
        assert_eq!(
            NoProxy::parse(list).matches(host, *port),
            *want,
            "NO_PROXY={list:?} host={host} port={port}"
        );
        checked += 1;
    }
    assert_eq!(checked, cases.len());
    assert!(NoProxy::parse(" , ").is_empty());
    assert_eq!(
        NoProxy::parse("Example.com, .foo.org,*.bar.net,10.0.0.0/8:22,[::1]:9443,*").to_string(),
        "example.com,foo.org,bar.net,10.0.0.0/8:22,[::1]:9443,*"
    );
}

#[test]
fn environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let proxy = |vars| {
        proxy_from_env_vars(env(vars))
            .unwrap()
            .map(|p| p.host().to_owned())
    };
    assert_eq!(proxy(&[]), None);
    assert!(no_proxy_from_env_vars(env(&[])).is_empty());
    assert_eq!(
        proxy(&[("https_proxy", "http://a:1"), ("ALL_PROXY", "http://b:1")]),
        Some("a".into())
    );
    assert_eq!(
        proxy(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:1")
        ]),
        Some("upper".into())
    );
    assert_eq!(
        proxy(&[("HTTPS_PROXY", " "), ("all_proxy", "http://all:1")]),
        Some("all".into())
    );
    assert_eq!(
        proxy(&[("HTTP_PROXY", "http://plain:1")]),
        None,
        "HTTP_PROXY is for plain HTTP, which hyco never speaks"
    );
    let n = no_proxy_from_env_vars(env(&[("no_proxy", "lower"), ("NO_PROXY", "upper")]));
    assert!(n.matches("upper", 1) && !n.matches("lower", 1));
    let n = no_proxy_from_env_vars(env(&[("no_proxy", ".corp")]));
    assert!(n.matches("relay.corp", 1));
    let e = proxy_from_env_vars(env(&[("https_proxy", "https://u:secret@p:1")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("https_proxy") && !e.contains("secret"), "{e}");
}

#[test]
fn bypass() {
    let p = Proxy {
        url: ProxyUrl::parse("http://p:3128").unwrap(),
        no_proxy: NoProxy::parse("localhost,10.0.0.0/8"),
    };
    assert!(p.for_target("localhost", 9443).is_none());
    assert!(p.for_target("10.1.1.1", 443).is_none());
    assert_eq!(
        p.for_target("relay.example", 443).map(|u| u.host()),
        Some("p")
    );
}

/// A one-shot proxy: reads the request head, hands it over, answers with `answer`
/// (written in the given pieces), then writes `after` as if from the tunnelled server.
async fn fake_proxy(
    answer: Vec<&'static [u8]>,
    after: &'static [u8],
) -> (ProxyUrl, tokio::sync::oneshot::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut s = BufReader::new(s);
        let mut req = String::new();
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            req.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let _ = tx.send(req);
        for piece in answer {
            s.get_mut().write_all(piece).await.unwrap();
            s.get_mut().flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        s.get_mut().write_all(after).await.unwrap();
        // Keep the connection until the client is done.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let url = ProxyUrl::parse(&format!("http://hyco:s3cr%40t@127.0.0.1:{port}")).unwrap();
    (url, rx)
}

#[tokio::test]
async fn tunnel_opens_and_keeps_the_bytes_after_the_head() {
    // The answer head and the server's first bytes arrive in one segment.
    let (url, req) = fake_proxy(
        vec![b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nfrom the relay"],
        b", and more",
    )
    .await;
    let mut s = open_tunnel(&url, "relay.example", 9443, T).await.unwrap();
    let req = req.await.unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode("hyco:s3cr@t");
    assert!(
        req.starts_with("CONNECT relay.example:9443 HTTP/1.1\r\nHost: relay.example:9443\r\n"),
        "{req}"
    );
    assert!(
        req.contains(&format!("\r\nProxy-Authorization: Basic {basic}\r\n")),
        "{req}"
    );
    let mut got = vec![0u8; "from the relay, and more".len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"from the relay, and more");
}

#[tokio::test]
async fn tunnel_head_split_anywhere() {
    // The blank line is split across writes, and HTTP/1.0 is fine.
    let (url, _req) = fake_proxy(vec![b"HTTP/1.0 200 OK\r", b"\n", b"\r", b"\nX"], b"Y").await;
    let mut s = open_tunnel(&url, "::1", 443, T).await.unwrap();
    let mut got = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"XY");
}

#[tokio::test]
async fn ipv6_targets_are_bracketed() {
    let (url, req) = fake_proxy(vec![b"HTTP/1.1 200 OK\r\n\r\n"], b"").await;
    open_tunnel(&url, "::1", 9443, T).await.unwrap();
    assert!(req
        .await
        .unwrap()
        .starts_with("CONNECT [::1]:9443 HTTP/1.1\r\n"));
}

#[tokio::test]
async fn refusals_name_the_proxy_and_the_status_line() {
    let (url, _) = fake_proxy(
        vec![b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n"],
        b"",
    )
    .await;
    let e = open_tunnel(&url, "relay.example", 443, T)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(407));
    let m = e.to_string();
    assert!(m.contains("http://hyco:***@127.0.0.1:"), "{m}");
    assert!(m.contains("CONNECT relay.example:443"), "{m}");
    assert!(
        m.contains("HTTP/1.1 407 Proxy Authentication Required"),
        "{m}"
    );
    assert!(m.contains("authentication failed"), "{m}");
    assert!(!m.contains("s3cr"), "{m}");

    // Without credentials, the hint says they are needed.
    let (url, _) = fake_proxy(vec![b"HTTP/1.1 407 Auth\r\n\r\n"], b"").await;
    let url = ProxyUrl::parse(&format!("http://127.0.0.1:{}", url.port())).unwrap();
    let m = open_tunnel(&url, "r", 443, T)
        .await
        .unwrap_err()
        .to_string();
    assert!(m.contains("authentication required"), "{m}");

    let (url, _) = fake_proxy(vec![b"HTTP/1.1 403 Forbidden\r\n\r\n"], b"").await;
    let e = open_tunnel(&url, "r", 443, T).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert!(e.to_string().ends_with("HTTP/1.1 403 Forbidden"), "{e}");
}

#[tokio::test]
async fn bad_answers() {
    let (url, _) = fake_proxy(vec![b"SSH-2.0-OpenSSH\r\n\r\n"], b"").await;
    let e = open_tunnel(&url, "r", 443, T).await.unwrap_err();
    assert!(matches!(e, ProxyError::Malformed { .. }), "{e}");

    // A head that never ends is cut at MAX_HEAD.
    static BIG: [u8; 20 * 1024] = [b'a'; 20 * 1024];
    let (url, _) = fake_proxy(vec![b"HTTP/1.1 200 OK\r\nX: ", &BIG], b"").await;
    let e = open_tunnel(&url, "r", 443, T).await.unwrap_err();
    assert!(matches!(e, ProxyError::HeadTooLarge { .. }), "{e}");

    // Closed before the head is complete.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).await;
        let _ = s.write_all(b"HTTP/1.1 200").await;
    });
    let url = ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let e = open_tunnel(&url, "r", 443, T).await.unwrap_err();
    assert!(matches!(e, ProxyError::Closed { .. }), "{e}");
}

#[tokio::test]
async fn silent_proxy_times_out_and_dead_proxy_is_named() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let url = ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    // Accepted by the kernel (backlog), never answered.
    let e = open_tunnel(&url, "r", 443, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, ProxyError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    drop(l);

    let e = open_tunnel(&url, "r", 443, T).await.unwrap_err();
    assert!(matches!(e, ProxyError::Connect { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot reach proxy http://127.0.0.1:{port}")),
        "{e}"
    );
}
