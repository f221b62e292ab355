//! Shared helpers of the process tests: a relay process with its data folder, and the admin,
//! manager and forwarder processes that work against it.
#![allow(dead_code)] // each test file uses a different part

use std::path::PathBuf;
use std::time::Duration;

use hyco_client::ClientOptions;
use hyco_testkit::{eventually, field, Admin, Proc, TempDir};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const T: Duration = Duration::from_secs(20);

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyco"))
}

pub struct Relay {
    pub proc: Proc,
    pub dir: TempDir,
    pub port: u16,
    pub root: String,
}

impl Relay {
    pub async fn start(dir: TempDir, port: u16) -> Relay {
        Self::start_with(dir, port, &[]).await
    }

    pub async fn start_with(dir: TempDir, port: u16, extra: &[&str]) -> Relay {
        Self::start_on(dir, &format!("127.0.0.1:{port}"), extra).await
    }

    /// A relay listening on `listen` (an address of a network namespace the test made).
    pub async fn start_on(dir: TempDir, listen: &str, extra: &[&str]) -> Relay {
        Self::start_via(dir, listen, extra, None).await
    }

    /// A relay on 127.0.0.1 port 0 whose descriptor limit is `nofile`.
    pub async fn start_with_nofile(dir: TempDir, nofile: u32, extra: &[&str]) -> Relay {
        Self::start_via(dir, "127.0.0.1:0", extra, Some(nofile)).await
    }

    async fn start_via(dir: TempDir, listen: &str, extra: &[&str], nofile: Option<u32>) -> Relay {
        let listen = listen.to_owned();
        let data = dir.0.join("data");
        let mut args = vec![
            "relay",
            "--listen",
            &listen,
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let proc = match nofile {
            None => Proc::spawn("relay", &bin(), &args, &[]),
            Some(n) => spawn_with_nofile("relay", n, &args, &[]),
        };
        let line = proc.wait_line("relay listening", T).await;
        let port: u16 = field(&line, "listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let root = std::fs::read_to_string(data.join("root.connection-string"))
            .unwrap()
            .trim()
            .to_owned();
        Relay {
            proc,
            dir,
            port,
            root,
        }
    }

    pub fn ca(&self) -> String {
        self.dir.0.join("data/ca.pem").display().to_string()
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HYCO_CA_FILE", self.ca()),
            ("HYCO_CONNECTION_STRING", self.root.clone()),
        ]
    }

    pub async fn admin(&self, args: &[&str]) -> (i32, String, String) {
        let admin = Admin {
            bin: bin(),
            ca: self.ca().into(),
            root: self.root.clone(),
            within: T,
        };
        admin.output(args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates an HC for `endpoint` and returns (listen cs, send cs).
    pub async fn hc(&self, name: &str, endpoint: &str) -> (String, String) {
        let (code, _, err) = self
            .admin(&["hc", "create", name, "--endpoint", endpoint])
            .await;
        assert_eq!(code, 0, "{err}");
        let (code, l, err) = self
            .admin(&["rule", "create", "l", "--hc", name, "--rights", "listen"])
            .await;
        assert_eq!(code, 0, "{err}");
        let (code, s, err) = self
            .admin(&["rule", "create", "s", "--hc", name, "--rights", "send"])
            .await;
        assert_eq!(code, 0, "{err}");
        (l.trim().to_owned(), s.trim().to_owned())
    }

    pub fn manager(&self, tag: &str, cs: &str) -> Proc {
        self.manager_with(tag, cs, &[], &[])
    }

    /// A manager for `cs` with extra arguments (global flags such as `--log-json` included).
    pub fn manager_with(&self, tag: &str, cs: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let ca = self.ca();
        let mut args = vec![
            "manager",
            "run",
            "--connection-string",
            cs,
            "--ca-file",
            &ca,
        ];
        args.extend_from_slice(extra);
        Proc::spawn(tag, &bin(), &args, env)
    }

    pub async fn forward(&self, hc: &str, cs: &str) -> (Proc, u16) {
        self.forward_with(hc, cs, &[]).await
    }

    /// A forwarder for `hc` with extra arguments; returns it and its local port.
    pub async fn forward_with(&self, hc: &str, cs: &str, extra: &[&str]) -> (Proc, u16) {
        let (spec, ca) = (format!("127.0.0.1:0:{hc}"), self.ca());
        let mut args = vec![
            "forward",
            "-L",
            &spec,
            "--connection-string",
            cs,
            "--ca-file",
            &ca,
        ];
        args.extend_from_slice(extra);
        let p = Proc::spawn("forward", &bin(), &args, &[]);
        let line = p.wait_line("forwarding", T).await;
        // Text logs say `local=127.0.0.1:PORT`; JSON logs `"local":"127.0.0.1:PORT"`.
        let port = field(&line, "local")
            .or_else(|| {
                let v: serde_json::Value = serde_json::from_str(&line).ok()?;
                v["fields"]["local"].as_str().map(str::to_owned)
            })
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (p, port)
    }

    pub async fn listeners(&self, hc: &str) -> u64 {
        let (_, out, _) = self.admin(&["hc", "list"]).await;
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(hc))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub async fn wait_listeners(&self, hc: &str, n: u64) {
        eventually(&format!("{n} listener(s) on {hc}"), T, || async {
            self.listeners(hc).await == n
        })
        .await;
    }

    pub fn connector(&self) -> hyco_client::Connector {
        ClientOptions {
            ca_file: Some(PathBuf::from(self.ca())),
            ..ClientOptions::default()
        }
        .connector()
        .unwrap()
    }
}

/// `hyco args…` with a descriptor limit (soft and hard) of `nofile`: a shell sets it with
/// `ulimit -n`, then becomes the process.
pub fn spawn_with_nofile(tag: &str, nofile: u32, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let script = format!("ulimit -n {nofile} && exec \"$0\" \"$@\"");
    let hyco = bin();
    let mut full = vec!["-c", script.as_str(), hyco.to_str().unwrap()];
    full.extend_from_slice(args);
    Proc::spawn(tag, std::path::Path::new("sh"), &full, env)
}

pub async fn relay(tag: &str) -> Relay {
    Relay::start(TempDir::new(tag), 0).await
}

/// Sends `len` random bytes and reads the echo concurrently; returns (sent hash, received hash).
pub async fn echo_roundtrip(port: u16, len: usize) -> ([u8; 32], [u8; 32], usize) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill_bytes(&mut buf[..n]);
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
        <[u8; 32]>::from(h.finalize())
    });
    let mut h = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .expect("echo stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    (writer.await.unwrap(), h.finalize().into(), total)
}

/// `GET path` from a plain-HTTP status address.
pub async fn http_get(addr: &str, path: &str) -> String {
    http_get_as(addr, addr, path).await
}

/// `GET path` from a plain-HTTP status address with the given `Host`; the whole answer.
pub async fn http_get_as(addr: &str, host: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The sum of a metric's series.
pub async fn metric(addr: &str, name: &str) -> u64 {
    http_get(addr, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
