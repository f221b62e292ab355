//! A throw-away PostgreSQL (Debian's server binaries) for the pgbench figures, and pgbench
//! runs against a port.
//!
//! The cluster lives in a temporary folder, listens on 127.0.0.1 only (a free port the system
//! chose), trusts local users, and is stopped and removed when dropped. PostgreSQL refuses to
//! run as root, so as root it runs as `nobody` (uid 65534), as `tests/readme.rs` does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::process::Command;

use crate::{spawn, Proc};

/// A running cluster; stopped (`pg_ctl stop -m immediate`) and its folder removed on drop.
pub struct Postgres {
    pub port: u16,
    bindir: PathBuf,
    dir: PathBuf,
    /// `setpriv …` as root, nothing otherwise: how its commands are run.
    prefix: Vec<String>,
    _proc: Proc,
}

/// The newest `/usr/lib/postgresql/*/bin` with a server in it.
pub fn bindir() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists() && p.join("pgbench").exists())
        .max()
}

impl Postgres {
    pub async fn start() -> Result<Postgres> {
        let bindir = bindir().context(
            "PostgreSQL's server is not installed (Debian package postgresql; bench/run --wan \
             installs it)",
        )?;
        // Under /tmp: the bench's own folder may be closed to `nobody`.
        let dir = std::env::temp_dir().join(format!("hyco-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let prefix = hyco_testkit::unprivileged_in(&dir)?;
        let data = dir.join("data");
        let data_s = data.display().to_string();
        let mut init = prefix.clone();
        init.push(bindir.join("initdb").display().to_string());
        init.extend(
            ["-D", &data_s, "-U", "postgres", "--auth=trust", "--no-sync"].map(String::from),
        );
        let out = Command::new(&init[0]).args(&init[1..]).output().await?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("initdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        // A free port: PostgreSQL takes no port 0.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let port_s = port.to_string();
        let dir_s = dir.display().to_string();
        let mut run = prefix.clone();
        run.push(bindir.join("postgres").display().to_string());
        run.extend(
            [
                "-D",
                &data_s,
                "-p",
                &port_s,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=100",
                "-c",
                "fsync=off",
                "-k",
                &dir_s,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = run[1..].iter().map(String::as_str).collect();
        let proc = spawn(
            "postgres",
            Path::new(&run[0]),
            &args,
            &[],
            "ready to accept connections",
        )
        .await;
        let proc = match proc {
            Ok((p, _)) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let pg = Postgres {
            port,
            bindir,
            dir,
            prefix,
            _proc: proc,
        };
        // pgbench's tables, scale 1 (100 000 accounts).
        let out = pg
            .pgbench(port)
            .args(["-i", "-q", "-s", "1"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(pg)
    }

    /// pgbench against `port` on 127.0.0.1, database and user `postgres`, no TLS (the tunnels
    /// carry plain PostgreSQL; a refused SSLRequest would only add a round trip to each).
    fn pgbench(&self, port: u16) -> Command {
        let mut c = Command::new(self.bindir.join("pgbench"));
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .env("PGDATABASE", "postgres")
            .env("PGSSLMODE", "disable")
            .env("PGGSSENCMODE", "disable")
            .kill_on_drop(true);
        c
    }

    /// Select-only for `secs` with 8 clients, through `port`: a new connection per
    /// transaction (`-C`) or held connections. Transactions per second and mean latency.
    pub async fn select_only(&self, port: u16, new_conn: bool, secs: u64) -> Result<Value> {
        let mut c = self.pgbench(port);
        c.args(["-n", "-S", "-c", "8", "-j", "2", "-T", &secs.to_string()]);
        if new_conn {
            c.arg("-C");
        }
        let out = c.output().await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("pgbench: {}{}", text, String::from_utf8_lossy(&out.stderr));
        }
        Ok(json!({
            "tps": field(&text, "tps = "),
            "latency_ms": field(&text, "latency average = "),
            "transactions": field(&text, "number of transactions actually processed: "),
            "failed": field(&text, "number of failed transactions: "),
        }))
    }
}

/// The number after `key` on pgbench's output.
fn field(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(key))?;
    let rest = &line.trim_start()[key.len()..];
    rest.split(|c: char| c.is_whitespace() || c == '/' || c == '(')
        .next()?
        .parse()
        .ok()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.prefix.clone();
        stop.push(self.bindir.join("pg_ctl").display().to_string());
        stop.extend(
            [
                "-D",
                &self.dir.join("data").display().to_string(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "20",
                "stop",
            ]
            .map(String::from),
        );
        let _ = std::process::Command::new(&stop[0])
            .args(&stop[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        // The server is gone or killed with `_proc`; give it a moment to let go of the files.
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn reads_pgbench_output() {
        let out = "transaction type: <builtin: select only>\nnumber of transactions actually processed: 12345\nnumber of failed transactions: 0 (0.000%)\nlatency average = 6.481 ms\ninitial connection time = 4.2 ms\ntps = 1234.567890 (without initial connection time)\n";
        assert_eq!(field(out, "tps = "), Some(1234.56789));
        assert_eq!(field(out, "latency average = "), Some(6.481));
        assert_eq!(
            field(out, "number of transactions actually processed: "),
            Some(12345.0)
        );
        assert_eq!(field(out, "number of failed transactions: "), Some(0.0));
        assert_eq!(field(out, "nothing = "), None);
    }
}
