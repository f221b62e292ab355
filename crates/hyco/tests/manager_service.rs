//! `hyco manager` as a service: the CLI talks to the running process over its control socket;
//! hybrid connections come and go without a restart while others carry data; the state file
//! survives restarts and holds the keys for its owner only.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{bin, echo_roundtrip, relay, Relay, T};
use hyco_testkit::{echo_server, eventually, run, Proc};

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
