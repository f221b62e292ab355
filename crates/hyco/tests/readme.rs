//! The README's quick start and the command blocks of docs/ that a user is told to paste, run
//! from the Markdown text itself (no second copy of the commands here): a README edit that
//! breaks a command fails this test.
//!
//! What the harness changes, and why (everything else runs as written, with bash, from a
//! temporary folder that stands for the clone's root):
//! * `cargo run --release --` (the README's relay command) runs the `hyco` binary this test run
//!   built, through `target/release/hyco` in that folder, which the quick start uses as well. A
//!   nested `cargo` would wait for the build lock `cargo test` holds and build a release binary
//!   for minutes; instead [`cargo_run_picks_hyco`] checks, from `cargo metadata`, that a plain
//!   `cargo run` selects exactly this binary (the bug this test was written for: three
//!   binaries in the default members).
//! * Ports: the documented ones (relay 9443, PostgreSQL 5432, forwarder 15432, status pages
//!   9464 and 9465) are replaced, as whole numbers, by free loopback ports ([`with_ports`]); the
//!   relay's default listen address comes from `HYCO_LISTEN=127.0.0.1:PORT` (so its command
//!   stays word for word). Tests bind loopback only and run side by side, so the fixed ports
//!   and `0.0.0.0` are not theirs to take.
//! * Servers that a reader starts in another terminal (or with `&`) run in the background, and
//!   the next command waits for the line the server prints when it is ready (bounded).
//! * `/etc/hyco/manager.toml` (the package's configuration) is `packaging/manager.toml`, the
//!   file the package installs there.
//! * The manager's state folder is a temporary one (`HYCO_STATE_DIR`), not `/var/lib/hyco`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{bin, T};
use hyco_testkit::{dead_port, Proc, TempDir};
use tokio::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The ```sh blocks of a Markdown text, in order: (line number of the fence, block text).
fn sh_blocks(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut cur, fence) {
            (None, true) if line.trim() == "```sh" => cur = Some((i + 1, String::new())),
            (None, true) => cur = Some((0, String::new())), // another language: skipped
            (Some(_), true) => {
                if let Some((n, text)) = cur.take() {
                    if n > 0 {
                        out.push((n, text));
                    }
                }
            }
            (Some((_, text)), false) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, false) => {}
        }
    }
    assert!(cur.is_none(), "an unclosed code block");
    out
}

/// Replaces each whole number `from` (not part of a longer run of digits) by `to`.
fn with_ports(text: &str, map: &[(u16, u16)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        let swapped = digits
            .parse::<u16>()
            .ok()
            .and_then(|n| map.iter().find(|(from, _)| *from == n))
            .map(|(_, to)| to.to_string());
        out.push_str(swapped.as_deref().unwrap_or(digits));
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

/// A command line without its trailing `# comment`.
fn code(line: &str) -> &str {
    match line.find(" #") {
        Some(i) => line[..i].trim_end(),
        None => line.trim_end(),
    }
}

/// The line a server prints when it is ready, by its command.
fn ready_line(cmd: &str) -> &'static str {
    if cmd.contains(" relay") {
        "relay listening"
    } else if cmd.contains("manager run") && cmd.contains("--connection-string") {
        "listener connected"
    } else if cmd.contains("manager run") {
        "manager running"
    } else if cmd.contains(" forward ") {
        "forwarding"
    } else {
        panic!("a server the test does not know how to wait for: {cmd}")
    }
}

/// Each line of `block` as bash runs it, servers sent to the background (with `&`) and followed
/// by a wait for their ready line. `servers` says which lines (by their start) are servers that
/// the text runs in the foreground because the reader would use another terminal.
fn script(block: &str, servers: &[&str]) -> String {
    let mut s = String::new();
    for line in block.lines() {
        let c = code(line);
        let foreground_server = servers.iter().any(|p| c.starts_with(p));
        if foreground_server {
            // `cmd   # comment` → `cmd &   # comment`
            s.push_str(&format!("{c} &{}", &line[c.len()..]));
        } else {
            s.push_str(line);
        }
        s.push('\n');
        if foreground_server || c.ends_with('&') {
            s.push_str(&format!("__ready '{}'\n", ready_line(c)));
        }
    }
    s
}

/// Bash with the harness's helpers; servers started with `&` are killed when it ends.
const PRELUDE: &str = r#"set -e
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
# Waits (at most 30 s) for a line in the output of the commands so far, while the last server
# started with `&` runs.
__ready() {
  for _ in $(seq 300); do
    grep -qF -- "$1" "$__log" && return 0
    kill -0 $! 2>/dev/null || { echo "README test: the server exited before '$1'" >&2; return 1; }
    sleep 0.1
  done
  echo "README test: no line '$1' within 30 s" >&2; return 1
}
"#;

/// A bash script run in `dir` with a fresh environment; killed (its whole process group) when
/// dropped, so background servers never outlive the test.
struct Shell {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Shell {
    fn start(dir: &Path, text: &str, env: &[(&str, String)], stdin: &str) -> Shell {
        let log = dir.join("output.log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("{PRELUDE}{text}"))
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("HYCO_LOG", "info")
            .env("__log", &log)
            .stdin(Stdio::piped())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("bash");
        let input = stdin.to_owned();
        if let Some(mut w) = child.stdin.take() {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = w.write_all(input.as_bytes()).await;
            });
        }
        Shell { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn finish(&mut self, within: Duration) -> (i32, String) {
        let st = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("not done within {within:?}:\n{}", self.output()))
            .expect("wait bash");
        (st.code().unwrap_or(-1), self.output())
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A folder that stands for the clone's root: `target/release/hyco` is this run's binary, and
/// `bin/hyco` too (for the docs' commands, which assume `hyco` on the PATH).
fn clone_root(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    for rel in ["target/release", "bin"] {
        std::fs::create_dir_all(d.0.join(rel)).expect("mkdir");
        std::os::unix::fs::symlink(bin(), d.0.join(rel).join("hyco")).expect("symlink");
    }
    d
}

async fn free_port() -> u16 {
    dead_port().await.port()
}

/// A private PostgreSQL (Debian's server binaries) on 127.0.0.1:`port`, trusting local users,
/// with the superuser `postgres`. Run as `nobody` when the test runs as root (PostgreSQL refuses
/// root).
struct Postgres {
    _proc: Proc,
    _dir: TempDir,
}

impl Postgres {
    async fn start(port: u16) -> Postgres {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("postgres").exists())
                    .max()
            })
            .expect(
                "PostgreSQL's server is not installed (Debian package postgresql; scripts/test \
                 installs it)",
            );
        let dir = TempDir::new("postgres");
        let data = dir.0.join("data");
        let prefix = hyco_testkit::unprivileged_in(&dir.0).expect("a folder for nobody");
        let mut init = prefix.clone();
        init.push(bindir.join("initdb").display().to_string());
        init.extend(
            [
                "-D",
                data.to_str().expect("path"),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ]
            .map(String::from),
        );
        let out = std::process::Command::new(&init[0])
            .args(&init[1..])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut run = prefix;
        run.push(bindir.join("postgres").display().to_string());
        let port = port.to_string();
        run.extend(
            [
                "-D",
                data.to_str().expect("path"),
                "-p",
                &port,
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
                dir.0.to_str().expect("path"),
            ]
            .map(String::from),
        );
        let args: Vec<&str> = run[1..].iter().map(String::as_str).collect();
        let proc = Proc::spawn("postgres", Path::new(&run[0]), &args, &[]);
        proc.wait_line("ready to accept connections", T).await;
        Postgres {
            _proc: proc,
            _dir: dir,
        }
    }
}

/// What `cargo run` decides: with no `-p`, it runs the one binary of the workspace's default
/// members (or the `default-run` of a single default member); with several it refuses ("could
/// not determine which binary to run").
#[test]
fn cargo_run_picks_hyco() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let defaults = m["workspace_default_members"]
        .as_array()
        .expect("workspace_default_members");
    let members: Vec<&serde_json::Value> = m["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| defaults.contains(&p["id"]))
        .collect();
    let bins: Vec<&str> = members
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&"bin".into()))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    let picked = match (members.as_slice(), bins.as_slice()) {
        (_, [one]) => Some(*one),
        ([p], _) => p["default_run"].as_str(),
        _ => None,
    };
    assert_eq!(
        picked,
        Some("hyco"),
        "`cargo run` cannot choose among the default members' binaries {bins:?}"
    );
}

/// The README's quick start: the relay command, then the block that creates a hybrid connection
/// for a local PostgreSQL, starts a manager and a forwarder, and runs psql through the tunnel.
#[tokio::test]
async fn readme_quick_start_runs_as_written() {
    let readme = read("README.md");
    let blocks = sh_blocks(&readme);
    // Every block is run here or covered elsewhere; a new one fails until it is one or the other.
    let elsewhere = [
        ("./scripts/test", "the suite itself"),
        (
            "packaging/build-deb",
            "tests/package.rs builds the package and installs it",
        ),
        (
            "sudo systemctl edit hyco-relay",
            "needs systemd as the init system; tests/package.rs verifies the units",
        ),
    ];
    for (line, b) in &blocks {
        let known = b.starts_with("cargo run")
            || b.contains("psql")
            || elsewhere.iter().any(|(start, _)| b.starts_with(start));
        assert!(
            known,
            "README.md:{line}: a command block this test neither runs nor explains:\n{b}"
        );
    }
    let relay_block = &blocks
        .iter()
        .find(|(_, b)| b.starts_with("cargo run"))
        .expect("the README's relay command")
        .1;
    let relay_cmd = relay_block.trim();
    let args = relay_cmd
        .strip_prefix("cargo run --release -- ")
        .unwrap_or_else(|| {
            panic!("the relay command is not `cargo run --release -- …`: {relay_cmd}")
        });
    assert!(
        !relay_cmd.contains('\n'),
        "one relay command: {relay_block}"
    );
    let quick = &blocks
        .iter()
        .find(|(_, b)| b.contains("psql"))
        .expect("the README's quick start block")
        .1;
    for needed in ["admin hc create", "manager run", "forward", "psql"] {
        assert!(quick.contains(needed), "the quick start lost `{needed}`");
    }

    let (relay_port, pg_port, fwd_port) = (free_port().await, free_port().await, free_port().await);
    let _pg = Postgres::start(pg_port).await;
    let root = clone_root("readme");
    let text = format!(
        "target/release/hyco {args} &\n__ready 'relay listening'\n{}",
        script(
            &with_ports(quick, &[(5432, pg_port), (15432, fwd_port)]),
            &[]
        )
    );
    let state = root.0.join("state");
    let mut sh = Shell::start(
        &root.0,
        &text,
        &[
            ("HYCO_LISTEN", format!("127.0.0.1:{relay_port}")),
            ("HYCO_STATE_DIR", state.display().to_string()),
            ("PGCONNECT_TIMEOUT", "20".into()),
        ],
        "SELECT 'through the tunnel: ' || 6 * 7 AS answer;\n",
    );
    let (code, out) = sh.finish(Duration::from_secs(90)).await;
    assert_eq!(code, 0, "the quick start failed:\n{out}");
    assert!(out.contains("Root connection string"), "{out}");
    assert!(
        out.contains("through the tunnel: 42"),
        "psql's answer is missing:\n{out}"
    );
}

/// Every ```sh block of the docs a user pastes is either run here or named with the reason it
/// cannot run; a new block fails this test until it is one or the other.
#[tokio::test]
async fn docs_command_blocks_run_or_parse() {
    // Blocks that cannot run here: each `hyco` command is parsed by the binary (`--help`
    // appended: an unknown flag or a bad value fails), the rest is only read.
    let parse_only: &[(&str, &str, &str)] = &[
        (
            "docs/cluster.md",
            "hyco relay --listen 0.0.0.0:9443 --data /var/lib/hyco",
            "needs Redis with a password at redis.internal, a certificate for relay.example.com \
             and its DNS names",
        ),
        (
            "docs/cluster.md",
            "hyco cluster migrate",
            "needs a stopped relay's data folder and a cluster's Redis; its optional parts are in \
             brackets",
        ),
    ];
    let mut seen = 0;
    for doc in ["docs/usage.md", "docs/operations.md", "docs/cluster.md"] {
        for (line, block) in sh_blocks(&read(doc)) {
            seen += 1;
            if block.contains("curl -N http://127.0.0.1:9464/api/listener-events") {
                operations_block(&block).await;
                continue;
            }
            let (_, _, why) = parse_only
                .iter()
                .find(|(d, start, _)| *d == doc && block.trim_start().starts_with(start))
                .unwrap_or_else(|| {
                    panic!(
                        "{doc}:{line}: a command block this test neither runs nor explains:\n{block}"
                    )
                });
            parse_commands(doc, line, &block, why).await;
        }
    }
    assert_eq!(
        seen, 3,
        "the docs' command blocks changed: update this test"
    );
}

/// `--help` appended to each `hyco` command of the block (continuation lines joined, optional
/// `[…]` parts included): exit 0 means every flag exists and every value parses.
async fn parse_commands(doc: &str, line: usize, block: &str, why: &str) {
    let joined = block.replace("\\\n", " ");
    for cmd in joined.lines().map(code).filter(|c| c.starts_with("hyco ")) {
        let cmd = cmd.replace(['[', ']'], "");
        let args: Vec<&str> = cmd.split_whitespace().skip(1).chain(["--help"]).collect();
        let (code, _, err) = hyco_testkit::run(&bin(), &args, &[], T).await;
        assert_eq!(
            code, 0,
            "{doc}:{line}: `{cmd}` (not run here: {why}) is not accepted: {err}"
        );
    }
}

/// docs/operations.md: a relay and a manager with status pages, and `curl -N` following the
/// relay's listener events; then (the harness, not the doc) a listener joins, and curl shows it.
async fn operations_block(block: &str) {
    let (relay, rs, ms) = (free_port().await, free_port().await, free_port().await);
    let root = clone_root("ops");
    let config = repo().join("packaging/manager.toml");
    let block = with_ports(block, &[(9464, rs), (9465, ms)])
        .replace("/etc/hyco/manager.toml", config.to_str().expect("path"));
    let mut run = String::new();
    for line in block.lines() {
        let c = code(line);
        if c.starts_with("curl -N ") {
            // Follows forever: in the background, to the log the harness reads.
            run.push_str(&format!("{c} &\n"));
        } else {
            run.push_str(&script(line, &["hyco relay", "hyco manager run"]));
        }
        if c.starts_with("hyco relay") {
            // The manager below trusts the relay's generated CA through the environment.
            run.push_str("export HYCO_CA_FILE=$PWD/hyco-data/ca.pem\n");
        }
    }
    run.push_str(
        r#"# Not from the doc: a listener joins, and the event stream must show it.
export HYCO_CONNECTION_STRING="$(cat hyco-data/root.connection-string)"
hyco admin hc create ops --endpoint 127.0.0.1:9
hyco manager add "$(hyco admin rule create l --hc ops --rights listen)"
__ready '"event":"NewListenerRegistered","hybridConnection":"ops"'
"#,
    );
    let mut sh = Shell::start(
        &root.0,
        &run,
        &[
            (
                "PATH",
                format!(
                    "{}:{}",
                    root.0.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            ("HYCO_LISTEN", format!("127.0.0.1:{relay}")),
            ("HYCO_STATE_DIR", root.0.join("state").display().to_string()),
        ],
        "",
    );
    let (code, out) = sh.finish(Duration::from_secs(60)).await;
    assert_eq!(code, 0, "docs/operations.md's commands failed:\n{out}");
}

#[test]
fn ports_are_replaced_as_whole_numbers() {
    assert_eq!(
        with_ports(
            "-L 15432:pg 127.0.0.1:5432 54321 5432",
            &[(5432, 7), (15432, 8)]
        ),
        "-L 8:pg 127.0.0.1:7 54321 7"
    );
}
