//! HTTP mode through `hyco manager` to nginx, measured with `wrk`: requests per second and
//! p50/p99 latency of a small static page, with keep-alive and with a new connection per
//! request, three ways:
//!
//! * `direct`: wrk → nginx (plain HTTP on loopback);
//! * `tls_proxy`: wrk → nginx as a TLS reverse proxy → nginx (one TLS hop, keep-alive
//!   upstream): the floor for a relayed request on this machine;
//! * `relayed`: wrk → relay (TLS) → `hyco manager --http` → nginx.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::{spawn, Proc};

/// Body of the page every run fetches (about the size of nginx's default page).
fn page() -> String {
    let mut p = String::from("<!doctype html><title>bench</title><p>");
    while p.len() < 600 {
        p.push_str("hello from nginx ");
    }
    p.push('\n');
    p
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn nginx_bin() -> Result<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed")
}

/// nginx serving `page` on `port` and, when `tls` is given (cert, key, port), a TLS reverse
/// proxy to itself on that port, both in one non-daemon process under `dir`.
async fn nginx(dir: &Path, port: u16, tls: Option<(&Path, &Path, u16)>) -> Result<Proc> {
    let d = dir.display();
    for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(t))?;
    }
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), page())?;
    let proxy = match tls {
        None => String::new(),
        Some((cert, key, tport)) => format!(
            r#"
    upstream backend {{ server 127.0.0.1:{port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{tport} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"#,
            cert = cert.display(),
            key = key.display()
        ),
    };
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ text/html html; }}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {d}/www;
    }}{proxy}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let (prefix, conf, log) = (
        dir.to_string_lossy(),
        conf_path.to_string_lossy(),
        dir.join("error.log"),
    );
    let args = ["-p", &prefix, "-c", &conf, "-e", &log.to_string_lossy()];
    let opts = hyco_testkit::ProcOptions::long_run("warn");
    let child = hyco_testkit::Proc::start("nginx", Path::new(nginx_bin()?), &args, &[], opts)
        .context("starting nginx")?;
    // Ready when it accepts.
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(Proc(child, "nginx"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("nginx did not start listening on {port}")
}

/// One wrk run; `{requests_per_s, p50_ms, p99_ms, errors}`.
async fn wrk(url: &str, headers: &[String], conns: usize, secs: u64) -> Result<Value> {
    let mut args = vec![
        "-t2".to_owned(),
        format!("-c{conns}"),
        format!("-d{secs}s"),
        "--latency".to_owned(),
        "--timeout".to_owned(),
        "10s".to_owned(),
    ];
    for h in headers {
        args.push("-H".into());
        args.push(h.clone());
    }
    args.push(url.to_owned());
    let out = Command::new("wrk")
        .args(&args)
        .output()
        .await
        .context("wrk (Debian package wrk) did not run")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text).with_context(|| format!("wrk output: {text}"))
}

/// Reads wrk's `--latency` report.
fn parse_wrk(text: &str) -> Result<Value> {
    let ms = |v: &str| -> Option<f64> {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(ms)
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no Requests/sec")?;
    let errors: u64 = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .flat_map(|l| l.split(|c: char| !c.is_ascii_digit()))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    Ok(json!({
        "requests_per_s": rps,
        "p50_ms": pct("50%"),
        "p99_ms": pct("99%"),
        "errors": errors,
    }))
}

/// What the part needs from the bench's relay.
pub struct Inputs<'a> {
    /// The hyco binary.
    pub hyco: &'a Path,
    /// Scratch folder.
    pub scratch: &'a Path,
    /// The relay's port and data folder (CA, server certificate).
    pub relay_port: u16,
    pub relay_data: &'a Path,
    /// Root connection string (admin).
    pub root: &'a str,
    /// Seconds per wrk run.
    pub secs: u64,
}

/// Runs the part; returns `{keep_alive: {direct, tls_proxy, relayed}, new_connection: {…}}`.
pub async fn run(i: Inputs<'_>) -> Result<Value> {
    let dir = i.scratch.join("nginx");
    let (port, tport) = (free_port()?, free_port()?);
    let _nginx = nginx(
        &dir,
        port,
        Some((
            &i.relay_data.join("server.pem"),
            &i.relay_data.join("server-key.pem"),
            tport,
        )),
    )
    .await?;
    let ca = i.relay_data.join("ca.pem");
    let ca_s = ca.to_string_lossy().to_string();
    let endpoint = format!("127.0.0.1:{port}");
    let (listen, send) = crate::provision(
        i.hyco,
        &ca_s,
        i.root,
        &[("site", endpoint.parse()?)],
        ("lsite", "ssite"),
    )
    .await?;
    let state = i.scratch.join("manager-http-state");
    let state_s = state.to_string_lossy().to_string();
    let cs = format!("{listen};EntityPath=site");
    let (_manager, _) = spawn(
        "manager-http",
        i.hyco,
        &["manager", "run", "--http", "--connection-string", &cs],
        &[("HYCO_CA_FILE", &ca_s), ("HYCO_STATE_DIR", &state_s)],
        "listener connected",
    )
    .await?;
    let send_cs: hyco_proto::ConnectionString = format!("{send};EntityPath=site").parse()?;
    let (token, _) = hyco_client::mint_token(&send_cs, Duration::from_secs(3600))?
        .context("the send connection string has no key")?;
    let auth = format!("ServiceBusAuthorization: {token}");

    let conns = 16;
    let mut out = json!({});
    for (mode, extra) in [
        ("keep_alive", None),
        ("new_connection", Some("Connection: close")),
    ] {
        let mut h: Vec<String> = extra.map(str::to_owned).into_iter().collect();
        eprintln!("http-nginx {mode}: direct …");
        let direct = wrk(
            &format!("http://127.0.0.1:{port}/index.html"),
            &h,
            conns,
            i.secs,
        )
        .await?;
        eprintln!("http-nginx {mode}: TLS reverse proxy …");
        let proxy = wrk(
            &format!("https://localhost:{tport}/index.html"),
            &h,
            conns,
            i.secs,
        )
        .await?;
        eprintln!("http-nginx {mode}: relay → manager …");
        h.push(auth.clone());
        let relayed = wrk(
            &format!("https://localhost:{}/site/index.html", i.relay_port),
            &h,
            conns,
            i.secs,
        )
        .await?;
        let ratio = |k: &str| match (relayed[k].as_f64(), proxy[k].as_f64()) {
            (Some(r), Some(p)) if p > 0.0 => json!(r / p),
            _ => Value::Null,
        };
        out[mode] = json!({
            "direct": direct,
            "tls_proxy": proxy.clone(),
            "relayed": relayed.clone(),
            "relayed_vs_tls_proxy": {
                "requests_per_s": ratio("requests_per_s"),
                "p50_ms": ratio("p50_ms"),
                "p99_ms": ratio("p99_ms"),
            },
        });
    }
    Ok(out)
}

/// The table of this part.
pub fn print(v: &Value) {
    let f = |x: &Value| {
        x.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    if let Some(e) = v["error"].as_str() {
        println!("\nHTTP mode to nginx: {e}");
        return;
    }
    println!("\nHTTP mode to nginx (wrk, 16 connections, 600 B page):");
    println!(
        "{:<15} {:<10} {:>12} {:>9} {:>9} {:>7}",
        "", "", "requests/s", "p50 ms", "p99 ms", "errors"
    );
    for mode in ["keep_alive", "new_connection"] {
        for side in ["direct", "tls_proxy", "relayed"] {
            let c = &v[mode][side];
            println!(
                "{:<15} {:<10} {:>12} {:>9} {:>9} {:>7}",
                mode,
                side,
                f(&c["requests_per_s"]),
                f(&c["p50_ms"]),
                f(&c["p99_ms"]),
                c["errors"].as_u64().unwrap_or(0)
            );
        }
        let r = &v[mode]["relayed_vs_tls_proxy"];
        println!(
            "{:<15} relayed / TLS proxy: requests/s {} x, p50 {} x, p99 {} x",
            mode,
            f(&r["requests_per_s"]),
            f(&r["p50_ms"]),
            f(&r["p99_ms"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  2 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   210.05us  100.00us   5.00ms   90.00%\n  Latency Distribution\n     50%  180.00us\n     75%  220.00us\n     90%  300.00us\n     99%    1.20ms\n  100 requests in 2.00s, 1.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  41234.56\nTransfer/sec:      5.00MB\n";
        let v = parse_wrk(text).unwrap();
        assert_eq!(v["requests_per_s"], 41234.56);
        assert_eq!(v["p50_ms"], 0.18);
        assert_eq!(v["p99_ms"], 1.2);
        assert_eq!(v["errors"], 3);
    }
}
