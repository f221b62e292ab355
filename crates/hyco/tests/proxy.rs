//! The manager, the forwarder and admin through a real HTTP proxy (Debian's tinyproxy, started
//! per test on 127.0.0.1 with its own configuration): `CONNECT` tunnels with Basic
//! authentication, the proxy's refusals reported in the logs, `--no-proxy` and the environment
//! variables. tinyproxy is required: `./scripts/test` installs it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, echo_roundtrip, relay, Relay, T};

use std::path::{Path, PathBuf};

use hyco_testkit::{dead_port, echo_server, eventually, field, Proc, TempDir};

const USER: &str = "hyco";
/// tinyproxy's configuration syntax allows letters, digits, `-` and `_` in passwords.
const PASSWORD: &str = "s3cret-pw_9";
/// The same password with its `-` percent-encoded: the proxy only accepts it if hyco decodes
/// the URL's user info.
const PASSWORD_ENCODED: &str = "s3cret%2Dpw_9";

fn tinyproxy_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("tinyproxy"))
        .find(|c| Path::new(c).is_file())
        .expect(
            "tinyproxy is required by the proxy tests and was not found: run ./scripts/test, \
             which installs it (Debian package tinyproxy)",
        )
}

/// A tinyproxy on 127.0.0.1 that allows `CONNECT` to `relay_port` only, with Basic
/// authentication when `auth` is given. Its log (stdout) is the process's output.
struct Tinyproxy {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl Tinyproxy {
    async fn start(relay_port: u16, auth: Option<(&str, &str)>) -> Tinyproxy {
        let bin = tinyproxy_bin();
        let dir = TempDir::new("tinyproxy");
        let port = dead_port().await.port();
        // No LogFile/PidFile/User: log to stdout, run as the test's user, leave no files.
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 64\nAllow 127.0.0.1\n\
             ConnectPort {relay_port}\nLogLevel Info\n"
        );
        if let Some((user, password)) = auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf_path = dir.0.join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let proc = Proc::spawn(
            "tinyproxy",
            &bin,
            &["-d", "-c", conf_path.to_str().unwrap()],
            &[],
        );
        proc.wait_line("Accepting connections", T).await;
        Tinyproxy {
            proc,
            port,
            _dir: dir,
        }
    }

    fn url(&self, user_info: &str) -> String {
        format!("http://{user_info}127.0.0.1:{}", self.port)
    }

    /// `CONNECT`s to the relay the proxy received, and tunnels it opened.
    fn connects(&self, relay_port: u16) -> (usize, usize) {
        (
            self.proc.count(&format!(":{relay_port} HTTP/1.1")),
            self.proc.count("Established connection to host"),
        )
    }
}

/// `--proxy URL`, with an explicitly empty `--no-proxy` so that a `NO_PROXY` in the test
/// runner's environment cannot make the processes bypass the proxy under test.
fn via(url: &str) -> [&str; 4] {
    ["--proxy", url, "--no-proxy", ""]
}

fn assert_no_secret(procs: &[&Proc]) {
    for p in procs {
        for l in p.lines() {
            assert!(
                !l.contains(PASSWORD) && !l.contains(PASSWORD_ENCODED),
                "{} logged the proxy password: {l}",
                p.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_forwarder_and_admin_through_an_authenticating_proxy() {
    let r = relay("proxy-auth").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let proxy = Tinyproxy::start(r.port, Some((USER, PASSWORD))).await;
    let url = proxy.url(&format!("{USER}:{PASSWORD_ENCODED}@"));

    let m = r.manager_with("manager", &l, &via(&url), &[]);
    let line = m
        .wait_line("outbound connections go through the proxy", T)
        .await;
    assert!(
        line.contains(&format!("http://{USER}:***@127.0.0.1:{}", proxy.port)),
        "the proxy is logged with its password masked: {line}"
    );
    r.wait_listeners("echo", 1).await;
    let (f, port) = r.forward_with("echo", &s, &via(&url)).await;
    for len in [1, 100_000, 1 << 20] {
        let (sent, got, n) = echo_roundtrip(port, len).await;
        assert_eq!(
            (n, sent),
            (len, got),
            "echo of {len} bytes through the proxy"
        );
    }
    m.wait_line("connection served", T).await;
    // Entity GET and control channel (manager), then per connection the sender's connect
    // (forwarder) and the rendezvous (manager): every one a CONNECT the proxy let through.
    eventually("the proxy tunnelled every connection", T, || async {
        let (asked, opened) = proxy.connects(r.port);
        asked >= 2 + 2 * 3 && opened >= 2 + 2 * 3
    })
    .await;

    // Admin too.
    let (before, _) = proxy.connects(r.port);
    let mut args = vec!["hc", "list"];
    args.extend_from_slice(&via(&url));
    let (code, out, err) = r.admin(&args).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("echo"), "{out}");
    assert!(
        proxy.connects(r.port).0 > before,
        "admin went through the proxy"
    );
    assert!(
        !err.contains(PASSWORD) && !err.contains(PASSWORD_ENCODED),
        "{err}"
    );
    assert_no_secret(&[&m, &f]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication_failures_are_reported() {
    let r = relay("proxy-407").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let proxy = Tinyproxy::start(r.port, Some((USER, PASSWORD))).await;
    let masked = format!("proxy http://{USER}:***@127.0.0.1:{}", proxy.port);

    // Wrong password. (tinyproxy answers it with 401 where RFC 9110 says 407; hyco treats
    // both as the proxy's authentication failing.)
    let wrong = proxy.url(&format!("{USER}:wrong-{PASSWORD_ENCODED}@"));
    let m = r.manager_with("manager-wrong-password", &l, &via(&wrong), &[]);
    let line = m.wait_line("authentication failed", T).await;
    assert!(line.contains(&masked), "names the proxy: {line}");
    assert!(line.contains("refused CONNECT"), "{line}");
    assert!(
        line.contains("HTTP/1.0 401") || line.contains("HTTP/1.0 407"),
        "quotes the proxy's status line: {line}"
    );

    // No credentials at all: tinyproxy's 407.
    let none = proxy.url("");
    let m2 = r.manager_with("manager-no-credentials", &l, &via(&none), &[]);
    let line = m2.wait_line("proxy authentication required", T).await;
    assert!(
        line.contains(&format!("proxy http://127.0.0.1:{}", proxy.port))
            && line.contains("407 Proxy Authentication Required"),
        "{line}"
    );

    // The forwarder's sender connect fails the same way, per connection.
    let (f, port) = r.forward_with("echo", &s, &via(&wrong)).await;
    // The forwarder may reset the connection before connect() has returned (the proxy's
    // refusal is that fast): either result is fine, the log line below is the check.
    let c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    let line = f.wait_line("tunnel not opened", T).await;
    assert!(
        line.contains(&masked) && line.contains("authentication failed"),
        "{line}"
    );
    drop(c);
    assert_eq!(r.listeners("echo").await, 0, "no listener got through");
    assert_no_secret(&[&m, &m2, &f]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_a_dead_proxy() {
    let r = relay("no-proxy").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let dead = dead_port().await;
    let url = format!("http://{dead}");

    // Without the bypass the dead proxy is used, and named in the error.
    let m0 = r.manager_with("manager-via-dead-proxy", &l, &via(&url), &[]);
    let line = m0.wait_line("cannot reach proxy", T).await;
    assert!(line.contains(&url), "{line}");

    let bypass = ["--proxy", &url, "--no-proxy", "127.0.0.1,localhost"];
    let _m = r.manager_with("manager", &l, &bypass, &[]);
    r.wait_listeners("echo", 1).await;
    let (_f, port) = r.forward_with("echo", &s, &bypass).await;
    let (sent, got, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((n, sent), (100_000, got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_settings_from_the_environment() {
    let r = relay("proxy-env").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("echo", &echo.to_string()).await;
    let proxy = Tinyproxy::start(r.port, Some((USER, PASSWORD))).await;
    let url = proxy.url(&format!("{USER}:{PASSWORD_ENCODED}@"));

    // Lower-case https_proxy, and no bypass.
    let _m = r.manager_with(
        "manager",
        &l,
        &[],
        &[
            ("https_proxy", url.as_str()),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ],
    );
    r.wait_listeners("echo", 1).await;
    eventually(
        "the manager's entity GET and control channel through the proxy",
        T,
        || async { proxy.connects(r.port).1 >= 2 },
    )
    .await;

    // Upper-case HTTPS_PROXY pointing nowhere, lower-case no_proxy bypassing it.
    let dead = format!("http://{}", dead_port().await);
    let f = forward_with_env(
        &r,
        "echo",
        &s,
        &[
            ("HTTPS_PROXY", dead.as_str()),
            ("no_proxy", "localhost,127.0.0.1"),
        ],
    )
    .await;
    let (sent, got, n) = echo_roundtrip(f.1, 10_000).await;
    assert_eq!((n, sent), (10_000, got));
}

/// `Relay::forward_with`, with environment variables instead of arguments.
async fn forward_with_env(r: &Relay, hc: &str, cs: &str, env: &[(&str, &str)]) -> (Proc, u16) {
    let (spec, ca) = (format!("127.0.0.1:0:{hc}"), r.ca());
    let p = Proc::spawn(
        "forward",
        &bin(),
        &[
            "forward",
            "-L",
            &spec,
            "--connection-string",
            cs,
            "--ca-file",
            &ca,
        ],
        env,
    );
    let line = p.wait_line("forwarding", T).await;
    let port = field(&line, "local")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (p, port)
}
