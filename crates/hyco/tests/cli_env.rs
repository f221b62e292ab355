//! What a user meets at the shell: an empty `HYCO_*` variable counts as unset (as shells and
//! other tools treat it), and an error's causes are each printed once.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use common::{bin, relay, T};
use hyco_testkit::{dead_port, run, Proc};

/// Every `HYCO_*` variable a flag of any subcommand reads, from the help texts (`[env: NAME=…]`),
/// so a flag added later is covered without a list here.
async fn hyco_variables() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        seen += 1;
        assert!(seen < 200, "too many subcommands");
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (code, out, err) = run(&bin(), &args, &[], T).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        let mut rest = out.as_str();
        while let Some(i) = rest.find("[env: HYCO_") {
            let name: String = rest[i + 6..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            names.insert(name);
            rest = &rest[i + 7..];
        }
        // Subcommands: the lines under "Commands:" up to the next blank line.
        if let Some(cmds) = out.split("Commands:\n").nth(1) {
            for line in cmds.lines().take_while(|l| !l.trim().is_empty()) {
                let Some(sub) = line.split_whitespace().next() else {
                    continue;
                };
                if sub != "help" {
                    let mut p = path.clone();
                    p.push(sub.to_owned());
                    todo.push(p);
                }
            }
        }
    }
    names
}

#[tokio::test]
async fn empty_variables_count_as_unset() {
    let vars = hyco_variables().await;
    for v in [
        "HYCO_CA_FILE",
        "HYCO_CONNECTION_STRING",
        "HYCO_LISTEN",
        "HYCO_THREADS",
        "HYCO_CLUSTER",
    ] {
        assert!(
            vars.contains(v),
            "{v} not found in the help texts: {vars:?}"
        );
    }
    let r = relay("empty-env").await;
    let ca = r.ca();
    // Every variable empty but the ones this command needs.
    let mut env: Vec<(&str, &str)> = vars.iter().map(|v| (v.as_str(), "")).collect();
    env.retain(|(k, _)| *k != "HYCO_CONNECTION_STRING");
    env.push(("HYCO_CONNECTION_STRING", &r.root));
    env.push(("HYCO_LOG", ""));
    // The case: `HYCO_CA_FILE= hyco admin hc list` (the CA given as a flag here).
    let (code, out, err) = run(&bin(), &["admin", "hc", "list", "--ca-file", &ca], &env, T).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(!err.contains("a value is required"), "{err}");
    // A relay with every variable empty starts on its flags (HYCO_CLUSTER= is no cluster).
    let data = r.dir.0.join("second");
    let env: Vec<(&str, &str)> = vars.iter().map(|v| (v.as_str(), "")).collect();
    let p = Proc::spawn(
        "relay-empty-env",
        &bin(),
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
        ],
        &env,
    );
    p.wait_line("relay listening", T).await;
    assert_eq!(p.count("joined the cluster"), 0);
}

#[tokio::test]
async fn each_cause_of_an_error_is_printed_once() {
    let dead = dead_port().await;
    let cs = format!(
        "Endpoint=sb://127.0.0.1:{}/;SharedAccessKeyName=a;SharedAccessKey=b",
        dead.port()
    );
    let (code, _, err) = run(
        &bin(),
        &["admin", "hc", "list", "--connection-string", &cs],
        &[],
        T,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .expect("an error line");
    assert!(
        line.contains(&format!("127.0.0.1:{}", dead.port())),
        "{line}"
    );
    // No cause is repeated: each ": "-separated part appears once.
    let parts: Vec<&str> = line.trim_start_matches("error: ").split(": ").collect();
    let unique: BTreeSet<&str> = parts.iter().copied().collect();
    assert_eq!(parts.len(), unique.len(), "a cause is repeated: {line}");
    assert_eq!(line.matches("os error 111").count(), 1, "{line}");
}
