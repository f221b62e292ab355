//! The Debian package, installed as an operator would: `packaging/build-deb` packages the binary
//! this test run built (the debug one: what is checked is the packaging, not the optimiser, and a
//! release build would take minutes), `dpkg -i` installs it, the installed `hyco` runs, the
//! units pass `systemd-analyze verify`, the man pages and completions are there, and `dpkg -r`
//! then `dpkg -P` leave nothing behind.
//!
//! It changes the machine (a package, a system user), so it needs root (CI runs the suite as
//! root) and skips with a message otherwise, or when a `hyco` package is installed already.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::bin;
use hyco_testkit::TempDir;

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = sh(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{text}");
    text
}

fn installed() -> bool {
    sh("dpkg-query", &["-W", "-f=${db:Status-Status}", "hyco"]).1 == "installed"
}

fn user_exists() -> bool {
    sh("getent", &["passwd", "hyco"]).0
}

/// Purges the package if the test stops half-way.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "hyco"]).output();
    }
}

#[test]
fn debian_package_installs_verifies_and_purges() {
    if sh("id", &["-u"]).1.trim() != "0" {
        eprintln!("SKIPPED debian_package_installs_verifies_and_purges: needs root (dpkg -i)");
        return;
    }
    if !sh("dpkg-query", &["-W", "hyco"])
        .1
        .contains("no packages found")
    {
        eprintln!(
            "SKIPPED debian_package_installs_verifies_and_purges: a hyco package is known to dpkg \
             on this machine; this test would remove it"
        );
        return;
    }
    assert!(!user_exists(), "a user `hyco` exists already");
    let out = TempDir::new("deb");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/build-deb");
    let built = must(
        script.to_str().expect("path"),
        &[
            "--bin",
            bin().to_str().expect("path"),
            "--out",
            out.0.to_str().expect("path"),
            "--fast",
        ],
    );
    let deb = built
        .lines()
        .last()
        .expect("the .deb's path")
        .trim()
        .to_owned();

    let _purge = Purge;
    must("dpkg", &["-i", &deb]);
    assert!(installed());
    let version = must("/usr/bin/hyco", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("hyco {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let files: Vec<String> = must("dpkg", &["-L", "hyco"])
        .lines()
        .map(str::to_owned)
        .collect();
    for f in [
        "/usr/bin/hyco",
        "/usr/lib/systemd/system/hyco-relay.service",
        "/usr/lib/systemd/system/hyco-manager.service",
        "/etc/hyco/manager.toml",
        "/usr/share/man/man1/hyco.1.gz",
        "/usr/share/man/man1/hyco-relay.1.gz",
        "/usr/share/man/man1/hyco-manager-run.1.gz",
        "/usr/share/bash-completion/completions/hyco",
        "/usr/share/zsh/vendor-completions/_hyco",
        "/usr/share/fish/vendor_completions.d/hyco.fish",
    ] {
        assert!(files.iter().any(|l| l == f), "{f} is not in the package");
        assert!(Path::new(f).exists(), "{f} is not installed");
    }
    // The units, as systemd reads them (ExecStart points at the installed binary).
    for unit in ["hyco-relay", "hyco-manager"] {
        let path = format!("/usr/lib/systemd/system/{unit}.service");
        let text = std::fs::read_to_string(&path).expect("unit");
        assert!(text.contains("ExecStart=/usr/bin/hyco "), "{path}:\n{text}");
        must("systemd-analyze", &["verify", &path]);
    }
    // The system user, and the configuration only it (and root) can read.
    assert!(user_exists(), "postinst did not create the user");
    let conf = std::fs::metadata("/etc/hyco/manager.toml").expect("conffile");
    assert_eq!(conf.mode() & 0o777, 0o640);
    let group = must("stat", &["-c", "%G", "/etc/hyco/manager.toml"]);
    assert_eq!(group.trim(), "hyco");
    // The installed binary accepts the units' manager command line (parsing only: --help).
    let (ok, text) = sh(
        "/usr/bin/hyco",
        &[
            "manager",
            "run",
            "--config",
            "/etc/hyco/manager.toml",
            "--help",
        ],
    );
    assert!(ok, "{text}");
    // Man pages are roff, completions name the subcommands.
    let man = must(
        "sh",
        &["-c", "gzip -dc /usr/share/man/man1/hyco-relay.1.gz"],
    );
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(man.contains("status\\-listen"), "{man}");
    let bash =
        std::fs::read_to_string("/usr/share/bash-completion/completions/hyco").expect("bash");
    assert!(bash.contains("manager") && bash.contains("--status-listen"));

    // State the services would have written.
    std::fs::create_dir_all("/var/lib/hyco").expect("state dir");
    std::fs::write("/var/lib/hyco/manager-state.json", "{}").expect("state file");

    // Remove: the program goes, configuration and state stay.
    must("dpkg", &["-r", "hyco"]);
    assert!(!Path::new("/usr/bin/hyco").exists());
    assert!(
        Path::new("/etc/hyco/manager.toml").exists(),
        "-r removed the conffile"
    );
    assert!(Path::new("/var/lib/hyco/manager-state.json").exists());

    // Purge: nothing is left, not a file of the package, its state, its folder or its user.
    must("dpkg", &["-P", "hyco"]);
    assert!(!installed());
    assert!(sh("dpkg-query", &["-W", "hyco"])
        .1
        .contains("no packages found"));
    let shared_dirs = ["/", "/etc", "/usr", "/usr/bin", "/usr/lib", "/usr/share"];
    for f in &files {
        let p = Path::new(f);
        let ours = f.contains("hyco") || p.is_file() || p.is_symlink();
        if ours && !shared_dirs.contains(&f.as_str()) {
            assert!(
                !p.exists() || p.is_dir() && !f.contains("hyco"),
                "{f} is left after purge"
            );
        }
    }
    for p in ["/etc/hyco", "/var/lib/hyco", "/var/lib/hyco-relay"] {
        assert!(!Path::new(p).exists(), "{p} is left after purge");
    }
    assert!(!user_exists(), "the user hyco is left after purge");
    assert!(
        !sh("getent", &["group", "hyco"]).0,
        "the group hyco is left after purge"
    );
}
