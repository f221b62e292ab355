//! `hyco admin` against a relay process: every command, both output formats, key rotation
//! while a tunnel carries data, and durability of acknowledged writes across SIGKILL.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{echo_roundtrip, relay, Relay, T};
use hyco_testkit::echo_server;
use serde_json::Value;

async fn json(r: &Relay, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let (code, out, err) = r.admin(&full).await;
    assert_eq!(code, 0, "admin {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin {args:?}: not JSON ({e}): {out}"))
}

async fn ok(r: &Relay, args: &[&str]) -> String {
    let (code, out, err) = r.admin(args).await;
    assert_eq!(code, 0, "admin {args:?}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_command_in_both_formats() {
    let r = relay("admin-cli").await;
    // Hybrid connections.
    let v = json(&r, &["hc", "create", "db", "--endpoint", "127.0.0.1:5432"]).await;
    assert_eq!(v["name"], "db");
    let out = ok(&r, &["hc", "list"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("db ") && l.contains("127.0.0.1:5432")),
        "{out}"
    );
    let v = json(&r, &["hc", "list"]).await;
    assert_eq!(v["value"][0]["name"], "db");
    let v = json(
        &r,
        &[
            "hc",
            "update",
            "db",
            "--endpoint",
            "db.corp:6543",
            "--client-auth",
            "false",
        ],
    )
    .await;
    assert_eq!(v["requiresClientAuthorization"], false);
    assert!(v["userMetadata"].as_str().unwrap().contains("db.corp:6543"));
    let out = ok(&r, &["hc", "show", "db"]).await;
    assert!(
        out.contains("db.corp:6543") && out.contains("LISTENER") && out.contains("CONNECTION"),
        "{out}"
    );
    let v = json(&r, &["hc", "show", "db"]).await;
    assert_eq!(v["listeners"], Value::Array(vec![]));
    assert_eq!(
        json(&r, &["hc", "listeners", "db"]).await["value"],
        Value::Array(vec![])
    );
    assert_eq!(
        json(&r, &["hc", "connections", "db"]).await["value"],
        Value::Array(vec![])
    );
    ok(&r, &["hc", "listeners", "db"]).await;
    ok(&r, &["hc", "connections", "db"]).await;

    // Rules.
    let cs = ok(
        &r,
        &["rule", "create", "app", "--hc", "db", "--rights", "listen"],
    )
    .await;
    assert!(
        cs.trim().starts_with("Endpoint=sb://") && cs.contains("EntityPath=db"),
        "{cs}"
    );
    let v = json(
        &r,
        &[
            "rule",
            "update",
            "app",
            "--hc",
            "db",
            "--rights",
            "listen,send",
        ],
    )
    .await;
    assert_eq!(v["rights"], serde_json::json!(["Listen", "Send"]));
    assert_eq!(
        v["primaryConnectionString"].as_str().unwrap(),
        cs.trim(),
        "an update keeps the keys"
    );
    let out = ok(&r, &["rule", "list", "--hc", "db"]).await;
    assert!(out.contains("app") && out.contains("Listen,Send"), "{out}");
    let v = json(&r, &["rule", "list"]).await;
    assert!(v["value"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "RootManageSharedAccessKey"));
    let v = json(&r, &["rule", "show", "app", "--hc", "db"]).await;
    assert!(v.get("primaryKey").is_none());
    let keys = json(&r, &["rule", "keys", "app", "--hc", "db"]).await;
    let out = ok(&r, &["rule", "keys", "app", "--hc", "db"]).await;
    assert!(out.contains(keys["secondaryKey"].as_str().unwrap()));
    let second = ok(
        &r,
        &[
            "rule",
            "connection-string",
            "app",
            "--hc",
            "db",
            "--key",
            "secondary",
        ],
    )
    .await;
    assert_eq!(
        second.trim(),
        keys["secondaryConnectionString"].as_str().unwrap()
    );
    let fresh = ok(
        &r,
        &[
            "rule",
            "regenerate",
            "app",
            "--hc",
            "db",
            "--key",
            "primary",
        ],
    )
    .await;
    assert_ne!(
        fresh.trim(),
        keys["primaryConnectionString"].as_str().unwrap()
    );
    let after = json(&r, &["rule", "keys", "app", "--hc", "db"]).await;
    assert_eq!(
        after["secondaryKey"], keys["secondaryKey"],
        "the other key stays"
    );
    ok(&r, &["rule", "delete", "app", "--hc", "db"]).await;
    let ns_rule = ok(&r, &["rule", "create", "ops", "--rights", "manage"]).await;
    assert!(!ns_rule.contains("EntityPath"));
    ok(&r, &["rule", "delete", "ops"]).await;

    // Errors: the relay's message, and usage errors (exit 64).
    let (code, _, err) = r.admin(&["hc", "show", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("nope"), "{err}");
    let (code, _, err) = r
        .admin(&["rule", "delete", "RootManageSharedAccessKey"])
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("409") && err.contains("lock"), "{err}");
    let (code, _, err) = r
        .admin(&["hc", "update", "db", "--endpoint", "no-port"])
        .await;
    assert_eq!(code, 64, "{err}");
    let (code, _, _) = r.admin(&["hc", "update", "db"]).await;
    assert_eq!(code, 64);
    ok(&r, &["hc", "delete", "db"]).await;
    assert_eq!(
        json(&r, &["hc", "list"]).await["value"],
        Value::Array(vec![])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerating_keys_during_traffic_drops_nothing() {
    let r = relay("rotate").await;
    let echo = echo_server().await;
    let (_listen, send) = r.hc("svc", &echo.to_string()).await;
    // Rotation done right: the manager runs on the listen rule's secondary key, so replacing
    // the primaries touches no listener; the forwarder keeps the old send primary, so its
    // open tunnel shows that tunnels are never cut by a key change.
    let listen = ok(
        &r,
        &[
            "rule",
            "connection-string",
            "l",
            "--hc",
            "svc",
            "--key",
            "secondary",
        ],
    )
    .await;
    let _m = r.manager("manager", listen.trim());
    r.wait_listeners("svc", 1).await;
    let (_f, port) = r.forward("svc", &send).await;
    // A 48 MiB echo is in flight while both primaries are replaced.
    let transfer = tokio::spawn(echo_roundtrip(port, 48 << 20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_send = ok(
        &r,
        &["rule", "regenerate", "s", "--hc", "svc", "--key", "primary"],
    )
    .await;
    ok(
        &r,
        &["rule", "regenerate", "l", "--hc", "svc", "--key", "primary"],
    )
    .await;
    let (a, b, n) = tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a, n),
        (b, 48 << 20),
        "the tunnel open during rotation carried everything"
    );
    // The manager (secondary key) is still there and serves: a forwarder with the new primary,
    // and one with the untouched secondary, both get through.
    assert_eq!(r.listeners("svc").await, 1);
    let (_f2, port2) = r.forward("svc", new_send.trim()).await;
    let (a, b, n) = echo_roundtrip(port2, 100_000).await;
    assert_eq!((a, n), (b, 100_000));
    let secondary = ok(
        &r,
        &[
            "rule",
            "connection-string",
            "s",
            "--hc",
            "svc",
            "--key",
            "secondary",
        ],
    )
    .await;
    let (_f3, port3) = r.forward("svc", secondary.trim()).await;
    let (a, b, n) = echo_roundtrip(port3, 100_000).await;
    assert_eq!((a, n), (b, 100_000));
    // The old primary is refused for new tunnels: the forwarder resets the local connection,
    // which tokio reports from the connect itself when the reset comes first.
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect to the forwarder: {e}"),
        Ok(mut app) => {
            let mut buf = [0u8; 1];
            use tokio::io::AsyncReadExt;
            let end = tokio::time::timeout(T, app.read(&mut buf)).await.unwrap();
            assert!(
                matches!(end, Ok(0) | Err(_)),
                "a tunnel with the old key opened"
            );
        }
    }
    assert_eq!(
        r.proc.count("ListenerUnregistered"),
        0,
        "no listener was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut r = relay("durable").await;
    let connector = r.connector();
    let cs = hyco_proto::ConnectionString::parse(&r.root).unwrap();
    let hyco_proto::ConnectionStringAuth::Key { name, key } = &cs.auth else {
        panic!("root has a key")
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", None),
        name,
        key,
        now + 600,
    )
    .as_str()
    .to_owned();
    // Eight writers create hybrid connections as fast as the relay acknowledges them; the
    // relay is killed while they are at it.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let port = r.port;
    let mut writers = Vec::new();
    for w in 0..8 {
        let (connector, token, acked) = (connector.clone(), token.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let name = format!("w{w}-{i}");
                let res = connector
                    .https_request(
                        http::Method::PUT,
                        &format!("https://localhost:{port}/$hyco/v1/hybridconnections/{name}"),
                        &[("Authorization", token.as_str())],
                        bytes::Bytes::from_static(b"{}"),
                        1 << 16,
                    )
                    .await;
                match res {
                    Ok(a) if a.status == 201 => acked.lock().unwrap().push(name),
                    _ => return,
                }
            }
        }));
    }
    hyco_testkit::eventually("200 acknowledged writes", T, || async {
        acked.lock().unwrap().len() >= 200
    })
    .await;
    r.proc.kill().await;
    for w in writers {
        let _ = tokio::time::timeout(T, w).await;
    }
    let acked = acked.lock().unwrap().clone();
    let Relay { dir, port, .. } = r;
    let r = Relay::start(dir, port).await;
    let v = json(&r, &["hc", "list"]).await;
    let present: std::collections::HashSet<&str> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|n| !present.contains(n.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!(
        "{} acknowledged writes, all present after SIGKILL",
        acked.len()
    );
}

/// An admin command the CLI refuses before calling the relay: exit 64, `says` on stderr.
async fn refused(r: &Relay, args: &[&str], says: &str) {
    let (code, out, err) = r.admin(args).await;
    assert_eq!(code, 64, "admin {args:?}: {out}{err}");
    assert!(err.contains(says), "admin {args:?}: {err}");
}

/// Issue 15 §3: names are path segments, not paths. `rule delete .. --hc hca` used to delete
/// the hybrid connection `hca` with its rules, `rule delete victim --hc ..` the namespace rule
/// `victim`, and `rule show .. --hc hca` showed `hca` as a rule: dot segments collapsed in the
/// URL. The CLI refuses names outside Azure's rules (exit 64, the rule in the message) and
/// percent-encodes every segment, so a name with `/` addresses exactly one object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_names_are_path_segments_not_paths() {
    let r = relay("admin-names").await;
    ok(&r, &["hc", "create", "hca", "--endpoint", "127.0.0.1:9"]).await;
    ok(
        &r,
        &[
            "rule", "create", "inner", "--hc", "hca", "--rights", "listen",
        ],
    )
    .await;
    ok(&r, &["rule", "create", "victim", "--rights", "listen"]).await;
    let dot = "is a dot segment, never a name";
    refused(&r, &["rule", "delete", "..", "--hc", "hca"], dot).await;
    refused(&r, &["rule", "delete", "victim", "--hc", ".."], dot).await;
    refused(&r, &["rule", "show", "..", "--hc", "hca"], dot).await;
    refused(&r, &["rule", "keys", ".", "--hc", "hca"], dot).await;
    refused(&r, &["hc", "delete", ".."], dot).await;
    let rule = "a rule name is 1 to 50 letters, digits, '.', '-' or '_', starting and ending with a letter or digit";
    for name in ["a/b", "a%2Fb", "a?b", "a#b", "a b", "é"] {
        let args = ["rule", "create", name, "--hc", "hca", "--rights", "listen"];
        refused(&r, &args, rule).await;
    }
    refused(
        &r,
        &["hc", "show", "hca/../x y"],
        "a hybrid connection name is",
    )
    .await;
    // Nothing was deleted or created.
    let v = json(&r, &["hc", "show", "hca"]).await;
    assert_eq!(v["name"], "hca");
    let names: Vec<Value> = json(&r, &["rule", "list", "--hc", "hca"]).await["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(names, vec![Value::from("inner")]);
    assert_eq!(
        json(&r, &["rule", "show", "victim"]).await["name"],
        "victim"
    );

    // A hybrid connection name with '/' is one segment (%2F): created, shown, deleted alone.
    ok(
        &r,
        &["hc", "create", "db/prod", "--endpoint", "127.0.0.1:9"],
    )
    .await;
    ok(&r, &["hc", "create", "db", "--endpoint", "127.0.0.1:9"]).await;
    assert_eq!(
        json(&r, &["hc", "show", "db/prod"]).await["name"],
        "db/prod"
    );
    ok(
        &r,
        &[
            "rule", "create", "app", "--hc", "db/prod", "--rights", "send",
        ],
    )
    .await;
    ok(&r, &["hc", "delete", "db/prod"]).await;
    assert_eq!(json(&r, &["hc", "show", "db"]).await["name"], "db");
    let (code, _, err) = r.admin(&["hc", "show", "db/prod"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("relay answered 404"), "{err}");

    // An entity rule named like a namespace rule would sign tokens checked against the
    // namespace rule (every one a 401): refused with 409.
    let (code, out, err) = r
        .admin(&[
            "rule",
            "create",
            "RootManageSharedAccessKey",
            "--hc",
            "hca",
            "--rights",
            "listen",
        ])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("relay answered 409: The rule name 'RootManageSharedAccessKey' is taken by a namespace rule"),
        "{err}"
    );
    assert!(out.is_empty(), "no connection string printed: {out}");
}
