//! The in-process relay the integration tests run against, with a root key and helpers to
//! call it as a listener, a sender or an administrator.
#![allow(dead_code)] // each test file uses a different part
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyco_io::ws::{ConnectError, Connected, Connector};
use hyco_io::CancellationToken;
use hyco_proto::{ConnectionString, ConnectionStringAuth, SecretKey};
use hyco_relay::{Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const T: Duration = Duration::from_secs(10);

pub struct Env {
    pub port: u16,
    pub status_port: u16,
    pub ca: PathBuf,
    pub key_name: String,
    pub key: SecretKey,
    pub dir: PathBuf,
    pub connector: Connector,
    pub stop: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn start(tag: &str, tweak: impl FnOnce(&mut RelayConfig)) -> Env {
    let dir = std::env::temp_dir().join(format!(
        "hyco-relay-{tag}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = RelayConfig::new(&dir, format!("localhost:{port}"));
    // As `hyco relay` reads it: scripts/test runs the protocol tests with the extensions on
    // (the default) and off.
    if let Ok(list) = std::env::var("HYCO_EXTENSIONS") {
        cfg.extensions = hyco_relay::extensions_from_list(&list).expect("HYCO_EXTENSIONS");
    }
    tweak(&mut cfg);
    // With given certificate files, the test puts their CA next to them as `myca.pem`.
    let given_ca = cfg
        .tls_files
        .as_ref()
        .map(|(c, _)| c.with_file_name("myca.pem"));
    let relay = Relay::prepare(cfg).await.unwrap();
    let cs = ConnectionString::parse(&relay.root_connection_string).unwrap();
    let ConnectionStringAuth::Key { name, key } = cs.auth else {
        panic!("root has a key")
    };
    let ca = relay.ca_file.clone().or(given_ca).unwrap();
    let status = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let status_port = status.local_addr().unwrap().port();
    relay.serve_status(status, Vec::new());
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(listener, stop.clone()));
    let tls = hyco_io::tls::client_config(Some(&ca)).unwrap();
    let mut connector = Connector::new(Arc::clone(&tls));
    connector.timeout = T;
    let env = Env {
        port,
        status_port,
        ca,
        key_name: name,
        key,
        dir,
        connector,
        stop,
    };
    env.admin(
        http::Method::PUT,
        "/hybridconnections/hc1",
        r#"{"userMetadata":"[{\"key\":\"endpoint\",\"value\":\"127.0.0.1:9\"}]"}"#,
    )
    .await;
    env.admin(http::Method::PUT, "/hybridconnections/hc10", "{}")
        .await;
    env
}

impl Env {
    pub fn token(&self, entity: Option<&str>, expiry: u64) -> String {
        hyco_proto::sas::sign(
            &hyco_proto::sas::resource_uri("localhost", entity),
            &self.key_name,
            &self.key,
            expiry,
        )
        .as_str()
        .to_owned()
    }

    pub async fn admin(&self, method: http::Method, path: &str, body: &str) -> (u16, String) {
        let t = self.token(None, now() + 600);
        let a = self
            .connector
            .https_request(
                method,
                &format!("https://localhost:{}/$hyco/v1{path}", self.port),
                &[("Authorization", &t)],
                bytes::Bytes::from(body.to_owned()),
                1 << 20,
            )
            .await
            .unwrap();
        (a.status, String::from_utf8_lossy(&a.body).into_owned())
    }

    /// A rule on `hc` with `rights`, and a token signed with its key for 10 minutes.
    pub async fn rule_token(&self, hc: &str, name: &str, rights: &str) -> String {
        let (name, key) = self.rule(hc, name, rights).await;
        hyco_proto::sas::sign(
            &hyco_proto::sas::resource_uri("localhost", Some(hc)),
            &name,
            &key,
            now() + 600,
        )
        .as_str()
        .to_owned()
    }

    /// Regenerates the primary key of `rule` on `hc` through the admin API; its status.
    pub async fn regenerate_primary(&self, hc: &str, rule: &str) -> u16 {
        self.admin(
            http::Method::POST,
            &format!("/hybridconnections/{hc}/authorizationrules/{rule}/regeneratekeys"),
            r#"{"keyType":"PrimaryKey"}"#,
        )
        .await
        .0
    }

    /// A rule on `hc` with `rights`; returns (name, key).
    pub async fn rule(&self, hc: &str, name: &str, rights: &str) -> (String, SecretKey) {
        let (s, body) = self
            .admin(
                http::Method::PUT,
                &format!("/hybridconnections/{hc}/authorizationrules/{name}"),
                &format!(r#"{{"rights":{rights}}}"#),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            name.to_owned(),
            SecretKey::new(v["primaryKey"].as_str().unwrap()),
        )
    }

    pub fn url(&self, hc: &str, action: &str, extra: &str) -> String {
        format!(
            "wss://localhost:{}/$hc/{hc}?{extra}sb-hc-action={action}&sb-hc-id=test-{action}",
            self.port
        )
    }

    /// The status a listen attempt with `token` is refused with.
    pub async fn listen_refused(&self, hc: &str, token: &str) -> ConnectError {
        self.connector
            .connect(
                &self.url(hc, "listen", ""),
                &[("ServiceBusAuthorization", token)],
            )
            .await
            .map(|_| ())
            .unwrap_err()
    }

    pub async fn listen(&self, hc: &str) -> Connected {
        let t = self.token(Some(hc), now() + 600);
        self.connector
            .connect(
                &self.url(hc, "listen", ""),
                &[("ServiceBusAuthorization", &t)],
            )
            .await
            .unwrap()
    }

    pub async fn connect(
        &self,
        hc: &str,
        headers: &[(&str, &str)],
    ) -> Result<Connected, ConnectError> {
        let t = self.token(Some(hc), now() + 600);
        let mut h = headers.to_vec();
        h.push(("ServiceBusAuthorization", &t));
        self.connector
            .connect(&self.url(hc, "connect", "app=1&"), &h)
            .await
    }
}

/// Polls `f` every 50 ms until it holds; fails after 5 s.
pub async fn eventually<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 5 s");
}

/// GETs a path from the status server (plain HTTP on loopback) and returns the body.
pub async fn status_get(env: &Env, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.status_port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of one series in a Prometheus text exposition (0 when absent).
pub fn series(text: &str, name: &str, hc: &str) -> f64 {
    let prefix = format!("{name}{{hybrid_connection=\"{hc}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A TLS connection to the relay (trusting its CA, for the name `localhost`), for raw requests.
pub async fn tls(env: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = hyco_io::tls::client_config(Some(&env.ca)).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads an HTTP response head (to the empty line, at most 16 KiB) from a raw stream.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut one = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") && got.len() < 16 * 1024 {
        let n = tokio::time::timeout(T, s.read(&mut one))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection ended in the head: {got:?}");
        got.push(one[0]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// One masked frame of a client (payload under 126 bytes): `first` is FIN and opcode.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
