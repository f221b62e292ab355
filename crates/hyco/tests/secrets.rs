//! Secrets never leave the process (issue 15 §4): no `--help` prints a secret taken from the
//! environment, and the folders that hold keys (the relay's data folder, the manager's state
//! folder) are the owner's alone, or the process refuses to start and says which `chmod` fixes
//! it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{bin, relay, T};
use hyco_testkit::{run, Proc, TempDir};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// The subcommand names listed under `Commands:` in a help text (`help` left out).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("      "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "help")
        .collect()
}

/// Every subcommand's `--help`, found by walking the tree the binary itself lists (a new
/// subcommand is covered without touching this test), with secrets in every environment
/// variable that can carry one: none of them may appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_help_text_prints_a_secret_from_the_environment() {
    let secrets = [
        ("HYCO_CONNECTION_STRING", "Endpoint=sb://relay:9443/;SharedAccessKeyName=k;SharedAccessKey=S3cretConnKey0000000000000000000000000000=", "S3cretConnKey"),
        ("HYCO_SEND_CONNECTION_STRING", "Endpoint=sb://relay:9443/;SharedAccessKeyName=s;SharedAccessKey=S3cretSendKey000000000000000000000000000=;EntityPath=db", "S3cretSendKey"),
        ("HYCO_CLUSTER", "redis://:S3cretRedisPw@redis.corp:6379/0", "S3cretRedisPw"),
        ("HTTPS_PROXY", "http://u:S3cretProxyPw@proxy.corp:3128", "S3cretProxyPw"),
        ("ALL_PROXY", "http://u:S3cretProxyPw2@proxy.corp:3128", "S3cretProxyPw2"),
    ];
    let env: Vec<(&str, &str)> = secrets.iter().map(|(k, v, _)| (*k, *v)).collect();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = Vec::new();
    let mut all_help = String::new();
    // Bounded: the tree has a few dozen commands.
    while let Some(path) = todo.pop() {
        assert!(seen.len() < 200, "the command tree does not end: {seen:?}");
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (code, out, err) = run(&bin(), &args, &env, T).await;
        assert_eq!(code, 0, "hyco {args:?}: {err}");
        for (var, _, secret) in &secrets {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "hyco {args:?} prints the value of {var}:\n{out}"
            );
        }
        for sub in subcommands(&out) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        all_help.push_str(&out);
        seen.push(path.join(" "));
    }
    // The walk reached the commands that read these variables, and they name them.
    for cmd in [
        "relay",
        "forward",
        "manager run",
        "manager test",
        "cluster migrate",
        "admin hc create",
    ] {
        assert!(seen.iter().any(|s| s == cmd), "{cmd} not reached: {seen:?}");
    }
    for var in [
        "HYCO_CONNECTION_STRING",
        "HYCO_SEND_CONNECTION_STRING",
        "HYCO_CLUSTER]",
    ] {
        assert!(
            all_help.contains(&format!("[env: {var}")),
            "{var} not in any help"
        );
    }
}

/// The relay's data folder after the first start: 0700, every file 0600 (the store with every
/// key was 0644 in a 0755 folder). A folder or store that others can read is refused at the
/// next start, with the `chmod` that fixes it; after the fix the relay starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_folder_is_private_and_an_exposed_one_is_refused() {
    let mut r = relay("private-data").await;
    let data = r.dir.0.join("data");
    assert_eq!(mode(&data), 0o700, "data folder");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        files.push(p.file_name().unwrap().to_string_lossy().into_owned());
    }
    for f in [
        "hyco.redb",
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "root.connection-string",
    ] {
        assert!(files.iter().any(|x| x == f), "{f} missing: {files:?}");
    }
    r.proc.kill().await;

    let start = || async {
        run(
            &bin(),
            &[
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--data",
                data.to_str().unwrap(),
            ],
            &[],
            T,
        )
        .await
    };
    let store = data.join("hyco.redb");
    chmod(&store, 0o644);
    let (code, _, err) = start().await;
    assert_ne!(code, 0, "started with a readable store");
    assert!(
        err.contains(&format!("chmod 600 {}", store.display())) && err.contains("mode 0644"),
        "{err}"
    );
    chmod(&store, 0o600);
    chmod(&data, 0o755);
    let (code, _, err) = start().await;
    assert_ne!(code, 0, "started with a readable data folder");
    assert!(
        err.contains(&format!("chmod 700 {}", data.display())),
        "{err}"
    );
    chmod(&data, 0o700);
    let p = Proc::spawn(
        "relay",
        &bin(),
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
    );
    p.wait_line("relay listening", T).await;
}

/// The manager's state folder: 0700 with a 0600 state file and socket (kept so), and a folder
/// or state file that others can read is refused with its `chmod`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_state_folder_is_private_and_an_exposed_one_is_refused() {
    let r = relay("private-state").await;
    let (l, _) = r.hc("svc", "127.0.0.1:9").await;
    let base = TempDir::new("private-state-dir");
    let dir = base.0.join("state");
    let d = dir.to_str().unwrap();
    let ca = r.ca();
    let mut m = Proc::spawn(
        "manager",
        &bin(),
        &["manager", "run", "--ca-file", &ca],
        &[("HYCO_STATE_DIR", d)],
    );
    m.wait_line("manager running", T).await;
    let (code, _, err) = run(&bin(), &["manager", "add", &l], &[("HYCO_STATE_DIR", d)], T).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("manager-state.json")), 0o600);
    assert_eq!(mode(&dir.join("manager.sock")), 0o600);
    m.kill().await;

    let start = || async {
        run(
            &bin(),
            &["manager", "run", "--ca-file", &ca],
            &[("HYCO_STATE_DIR", d)],
            T,
        )
        .await
    };
    chmod(&dir, 0o755);
    let (code, _, err) = start().await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(&format!("chmod 700 {d}")), "{err}");
    chmod(&dir, 0o700);
    let state = dir.join("manager-state.json");
    chmod(&state, 0o640);
    let (code, _, err) = start().await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", state.display())),
        "{err}"
    );
}
