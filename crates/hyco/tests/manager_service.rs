//! `hyco manager` as a service: the CLI talks to the running process over its control socket;
//! hybrid connections come and go without a restart while others carry data; the state file
//! survives restarts and holds the keys for its owner only.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{bin, echo_roundtrip, relay, Relay, T};
use hyco_testkit::{echo_server, eventually, run, Proc, TempDir};

/// `hyco manager …` against the manager whose state folder is `dir`.
async fn cli(dir: &str, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["manager"];
    full.extend_from_slice(args);
    run(&bin(), &full, &[("HYCO_STATE_DIR", dir)], T).await
}

async fn ok(dir: &str, args: &[&str]) -> String {
    let (code, out, err) = cli(dir, args).await;
    assert_eq!(code, 0, "manager {args:?}: {err}");
    out
}

async fn state_of(dir: &str, hc: &str) -> String {
    let out = ok(dir, &["show", hc, "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["state"].as_str().unwrap_or("").to_owned()
}

fn key_of(cs: &str) -> String {
    cs.split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap()
        .to_owned()
}

fn manager_in(r: &Relay, tag: &str, dir: &str, cs: Option<&str>) -> Proc {
    let ca = r.ca();
    let mut args = vec!["manager", "run", "--ca-file", &ca];
    if let Some(cs) = cs {
        args.extend_from_slice(&["--connection-string", cs]);
    }
    Proc::spawn(tag, &bin(), &args, &[("HYCO_STATE_DIR", dir)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_remove_restart_test_and_logs_while_tunnels_carry_data() {
    let r = relay("mgr-svc").await;
    let (e1, e2) = (echo_server().await, echo_server().await);
    let (la, sa) = r.hc("alpha", &e1.to_string()).await;
    let (lb, sb) = r.hc("beta", &e2.to_string()).await;
    let dir = r.dir.0.join("manager-state");
    let dir_s = dir.to_str().unwrap().to_owned();
    let d = dir_s.as_str();
    let m = manager_in(&r, "manager", d, Some(&la));
    m.wait_line("manager running", T).await;
    r.wait_listeners("alpha", 1).await;
    let (_fa, pa) = r.forward("alpha", &sa).await;
    let (_fb, pb) = r.forward("beta", &sb).await;

    // A long transfer on alpha runs through everything that follows.
    let transfer = tokio::spawn(echo_roundtrip(pa, 48 << 20));

    // Add beta at run time: it serves without a restart.
    let (code, _, err) = cli(d, &["add", &lb]).await;
    assert_eq!(code, 0, "{err}");
    r.wait_listeners("beta", 1).await;
    let (a, b, n) = echo_roundtrip(pb, 1 << 20).await;
    assert_eq!((a, n), (b, 1 << 20));
    let (code, _, err) = cli(d, &["add", &lb]).await;
    assert_eq!(code, 1);
    assert!(err.contains("already served"), "{err}");

    // The state file holds beta (added at run time), not alpha (command line), owner-only.
    let state = dir.join("manager-state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("EntityPath=beta") && !text.contains("EntityPath=alpha"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(dir.join("manager.sock"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // list and show: state, endpoint, relay listener count; never a key.
    let out = ok(d, &["list"]).await;
    assert!(
        out.contains("alpha") && out.contains("beta") && out.contains("Connected"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(d, &["show", "alpha", "--json"]).await).unwrap();
    assert_eq!(v["state"], "Connected");
    assert_eq!(v["endpoint"], e1.to_string());
    assert_eq!(v["relayListeners"], 1);
    let out = ok(d, &["show", "beta"]).await;
    assert!(out.contains("listeners on the relay"), "{out}");

    // test: end to end through this manager; a Listen-only key says what is missing.
    let out = ok(d, &["test", "alpha", "--send-connection-string", &sa]).await;
    assert!(out.contains("ok   tunnel"), "{out}");
    let (code, out, err) = cli(d, &["test", "alpha"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL tunnel") && out.contains("--send-connection-string"),
        "{out} {err}"
    );

    // restart: the listener comes back.
    ok(d, &["restart", "alpha"]).await;
    eventually("alpha connected again", T, || async {
        state_of(d, "alpha").await == "Connected"
    })
    .await;

    // remove beta: its listener leaves the relay; alpha's transfer is untouched.
    ok(d, &["remove", "beta"]).await;
    r.wait_listeners("beta", 0).await;
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(!text.contains("EntityPath=beta"), "{text}");
    let (code, _, err) = cli(d, &["show", "beta"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no hybrid connection 'beta'"), "{err}");
    let (a, b, n) = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a, n), (b, 48 << 20), "alpha's tunnel lost data");

    // logs: the service's own lines, without secrets.
    let logs = ok(d, &["logs", "-n", "500"]).await;
    assert!(
        logs.contains("HybridConnectionAdded") && logs.contains("HybridConnectionRemoved"),
        "{logs}"
    );
    for secret in [key_of(&la), key_of(&lb), key_of(&sa)] {
        assert!(!logs.contains(&secret), "a key in the logs");
        assert!(!ok(d, &["list", "--json"]).await.contains(&secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_connections_survive_a_restart_and_one_state_folder_has_one_manager() {
    let r = relay("mgr-state").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("svc", &echo.to_string()).await;
    let dir = r.dir.0.join("state");
    let d = dir.to_str().unwrap();
    let mut m = manager_in(&r, "manager", d, None);
    m.wait_line("no hybrid connections yet", T).await;
    m.wait_line("manager running", T).await;
    ok(d, &["add", &l]).await;
    r.wait_listeners("svc", 1).await;

    // A second manager on the same folder refuses to start, and says why.
    let mut second = manager_in(&r, "second", d, None);
    let status = second
        .wait_exit(T)
        .await
        .expect("the second manager kept running");
    assert!(!status.success());
    assert!(second.count("another manager is running") >= 1);

    // Killed and started again: the hybrid connection added at run time is served again.
    m.kill().await;
    r.wait_listeners("svc", 0).await;
    let _m2 = manager_in(&r, "manager2", d, None);
    r.wait_listeners("svc", 1).await;
    let (_f, port) = r.forward("svc", &s).await;
    let (a, b, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((a, n), (b, 100_000));

    // With no manager running, the CLI says so.
    let (code, _, err) = cli(r.dir.0.join("nobody").to_str().unwrap(), &["list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no manager is running"), "{err}");
}

/// `hyco manager add -` with the connection string on stdin, against the state folder `dir`.
async fn add_from_stdin(dir: &str, cs: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin())
        .args(["manager", "add", "-"])
        .env("HYCO_STATE_DIR", dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{cs}\n").as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("manager add did not finish")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CS: &str = "Endpoint=sb://localhost:9/;SharedAccessKeyName=l;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MDA=;EntityPath=hc";

/// Issue 14: a state folder that group or others may enter (0777) is refused with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_folder_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = TempDir::new("mgr-loose");
    let dir = base.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = dir.to_str().unwrap();
    let (code, _, err) = run(&bin(), &["manager", "run"], &[("HYCO_STATE_DIR", d)], T).await;
    assert_ne!(code, 0, "a 0777 state folder was accepted");
    assert!(
        err.contains("can be read by other users") && err.contains(&format!("chmod 700 {d}")),
        "{err}"
    );
    assert!(!dir.join("manager.sock").exists());
    // 0750 (group may enter) too; 0700 is fine (the manager starts and is stopped here).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let (code, _, err) = run(&bin(), &["manager", "run"], &[("HYCO_STATE_DIR", d)], T).await;
    assert_ne!(code, 0, "{err}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut m = Proc::spawn(
        "manager",
        &bin(),
        &["manager", "run"],
        &[("HYCO_STATE_DIR", d)],
    );
    m.wait_line("manager running", T).await;
    m.terminate(T).await;
}

/// Issue 14: a `manager.sock` put there by another user (here `nobody`, in a folder open to
/// all, as in the report) gets nothing: the CLI checks the socket's peer (SO_PEERCRED) before
/// it sends the connection string, and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_socket_served_by_another_user_gets_no_connection_string() {
    use std::os::unix::fs::PermissionsExt;
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(
        is_root,
        "this test runs as root (it serves a socket as user nobody)"
    );
    let base = TempDir::new("mgr-peer");
    let dir = base.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&base.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("manager.sock");
    // The impostor: Python as nobody (setpriv, util-linux), reporting what it received.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print('impostor listening', flush=True)
c, _ = s.accept()
c.settimeout(15)
got = b''
while True:
    try:
        b = c.recv(65536)
    except Exception:
        break
    if not b:
        break
    got += b
print('impostor received %d bytes' % len(got), flush=True)
"#;
    let fake = Proc::spawn(
        "impostor",
        std::path::Path::new("setpriv"),
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
            sock.to_str().unwrap(),
        ],
        &[],
    );
    fake.wait_line("impostor listening", T).await;
    let (code, _, err) = add_from_stdin(dir.to_str().unwrap(), CS).await;
    assert_ne!(code, 0, "the CLI trusted a socket served by another user");
    assert!(err.contains("served by user id"), "{err}");
    assert!(!err.contains("c2VjcmV0"), "{err}");
    let got = fake.wait_line("impostor received", T).await;
    assert_eq!(got.trim(), "impostor received 0 bytes");
}

/// Issue 14: a control socket that answers nothing, or not JSON, is an error (the CLI used to
/// print `added ?` and exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_malformed_answer_is_an_error() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let base = TempDir::new("mgr-empty");
    let dir = base.0.join("state");
    std::fs::create_dir(&dir).unwrap();
    let sock = tokio::net::UnixListener::bind(dir.join("manager.sock")).unwrap();
    for (answer, expected) in [
        (&b""[..], "no answer"),
        (&b"{\"added\":\"hc\"\n"[..], "not JSON"),
        (&b"{}\n"[..], "has no 'added'"),
        (&b"[1]\n"[..], "not a JSON object"),
    ] {
        let server = async {
            let (c, _) = sock.accept().await.unwrap();
            let (r, mut w) = c.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(r)
                .read_line(&mut line)
                .await
                .unwrap();
            w.write_all(answer).await.unwrap();
            line
        };
        let (line, (code, _, err)) =
            tokio::join!(server, add_from_stdin(dir.to_str().unwrap(), CS));
        assert!(line.contains("\"add\""), "{line}");
        assert_ne!(code, 0, "{answer:?} was taken for an answer");
        assert!(err.contains(expected), "{answer:?}: {err}");
    }
}
