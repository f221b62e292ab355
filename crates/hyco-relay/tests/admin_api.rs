//! The management API against its contract, `docs/openapi.json`: every documented operation is
//! called, every answer's status must be documented for that operation, and every JSON body must
//! validate against the documented schema. Plus what the contract cannot say: key rotation
//! semantics, scopes, and the refusals that protect an operator from locking themselves out.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use common::{now, start, Env, T};
use hyco_io::ws::Message;
use hyco_proto::SecretKey;
use serde_json::{json, Value};

/// The contract, with schema references rewritten so each response schema can be validated
/// on its own (`#/components/schemas/X` → `#/$defs/X`).
struct Spec {
    doc: Value,
    defs: Value,
    /// (method, path template) pairs exercised so far.
    seen: Mutex<BTreeSet<(String, String)>>,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let text = std::fs::read_to_string(path)
            .unwrap()
            .replace("#/components/schemas/", "#/$defs/");
        let doc: Value = serde_json::from_str(&text).unwrap();
        let defs = doc["components"]["schemas"].clone();
        Spec {
            doc,
            defs,
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    /// Every documented operation.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for (method, _) in item.as_object().unwrap() {
                if method != "parameters" {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    /// Checks one answer against the operation `method template`.
    fn check(&self, method: &str, template: &str, status: u16, body: &[u8]) {
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_owned(), template.to_owned()));
        let mut resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {template} answered {status}, which is not documented: {}",
            String::from_utf8_lossy(body)
        );
        if let Some(r) = resp["$ref"].as_str() {
            let name = r.rsplit('/').next().unwrap();
            resp = &self.doc["components"]["responses"][name];
        }
        match resp["content"]["application/json"]["schema"].as_object() {
            None => assert!(
                body.is_empty(),
                "{method} {template} {status}: undocumented body"
            ),
            Some(schema) => {
                let mut schema = Value::Object(schema.clone());
                schema["$defs"] = self.defs.clone();
                let v = jsonschema::validator_for(&schema).unwrap();
                let instance: Value = serde_json::from_slice(body)
                    .unwrap_or_else(|e| panic!("{method} {template} {status}: not JSON ({e})"));
                if let Err(e) = v.validate(&instance) {
                    panic!("{method} {template} {status}: {e}\n{instance:#}");
                }
            }
        }
    }
}

/// The code of the Close a listener receives within 5 s (failing otherwise).
async fn close_code_of(l: &mut hyco_io::ws::Connected) -> Option<u16> {
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match l.ws.recv().await {
                Ok(Message::Close(c)) => return c,
                Ok(_) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("no Close within 5 s");
    closed.map(|c| c.0)
}

/// One call: (status, parsed JSON or Null).
async fn call(
    env: &Env,
    spec: &Spec,
    method: &str,
    template: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let root = env.token(None, now() + 600);
    let token = token.unwrap_or(&root);
    let a = env
        .connector
        .https_request(
            http::Method::from_bytes(method.as_bytes()).unwrap(),
            &format!("https://localhost:{}/$hyco/v1{path}", env.port),
            &[("Authorization", token)],
            bytes::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default()),
            1 << 20,
        )
        .await
        .unwrap();
    spec.check(method, template, a.status, &a.body);
    let v = if a.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&a.body).unwrap()
    };
    (a.status, v)
}

fn token_for(entity: Option<&str>, name: &str, key: &str) -> String {
    hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri("localhost", entity),
        name,
        &SecretKey::new(key),
        now() + 600,
    )
    .as_str()
    .to_owned()
}

#[tokio::test]
async fn every_operation_answers_as_documented() {
    let env = start("admin-api", |_| {}).await;
    let spec = Spec::load();
    let hcs = "/hybridconnections";
    let one = "/hybridconnections/{name}";

    // Hybrid connections.
    let (s, v) = call(&env, &spec, "GET", hcs, hcs, None, None).await;
    assert_eq!(s, 200);
    assert!(v["value"].as_array().unwrap().len() >= 2);
    let meta = r#"[{"key":"endpoint","value":"db.corp:5432"}]"#;
    let (s, v) = call(
        &env,
        &spec,
        "PUT",
        one,
        "/hybridconnections/web",
        Some(json!({"userMetadata": meta})),
        None,
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(v["requiresClientAuthorization"], true);
    let (s, _) = call(
        &env,
        &spec,
        "PUT",
        one,
        "/hybridconnections/web",
        None,
        None,
    )
    .await;
    assert_eq!(s, 409);
    let (s, _) = call(
        &env,
        &spec,
        "PUT",
        one,
        "/hybridconnections/bad$name",
        None,
        None,
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = call(
        &env,
        &spec,
        "GET",
        one,
        "/hybridconnections/WEB",
        None,
        None,
    )
    .await;
    assert_eq!(
        (s, v["name"].as_str()),
        (200, Some("web")),
        "names are case-insensitive"
    );
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        one,
        "/hybridconnections/nope",
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, v) = call(
        &env,
        &spec,
        "PATCH",
        one,
        "/hybridconnections/web",
        Some(json!({"requiresClientAuthorization": false})),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["requiresClientAuthorization"], false);
    assert_eq!(v["userMetadata"], meta, "a field left out is kept");
    let (s, v) = call(
        &env,
        &spec,
        "PATCH",
        one,
        "/hybridconnections/web",
        Some(json!({"userMetadata": null})),
        None,
    )
    .await;
    assert_eq!((s, &v["userMetadata"]), (200, &Value::Null));
    let (s, _) = call(
        &env,
        &spec,
        "PATCH",
        one,
        "/hybridconnections/web",
        Some(json!({"colour": "red"})),
        None,
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = call(
        &env,
        &spec,
        "PATCH",
        one,
        "/hybridconnections/nope",
        Some(json!({})),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // Live listeners and connections.
    let mut l = env.listen("web").await;
    let (s, v) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}/listeners",
        "/hybridconnections/web/listeners",
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["value"].as_array().unwrap().len(), 1);
    assert_eq!(v["value"][0]["id"], "test-listen");
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}/listeners",
        "/hybridconnections/nope/listeners",
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let conns = "/hybridconnections/{name}/connections";
    let (s, v) = call(
        &env,
        &spec,
        "GET",
        conns,
        "/hybridconnections/web/connections",
        None,
        None,
    )
    .await;
    assert_eq!((s, v["value"].as_array().unwrap().len()), (200, 0));
    {
        // One tunnel, with bytes on it.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let env2 = &env;
        let (sender, accepted) = tokio::join!(env2.connect("web", &[]), async {
            let a = match tokio::time::timeout(T, l.ws.recv()).await.unwrap().unwrap() {
                Message::Text(t) => {
                    match hyco_proto::control::ListenerCommand::parse(&t).unwrap() {
                        hyco_proto::control::ListenerCommand::Accept(a) => a,
                        other => panic!("{other:?}"),
                    }
                }
                other => panic!("{other:?}"),
            };
            env2.connector.connect(&a.address, &[]).await.unwrap()
        });
        let mut sender = sender.unwrap();
        let mut accepted = accepted;
        sender.ws.write_all(&[1u8; 1000]).await.unwrap();
        let mut buf = [0u8; 1000];
        accepted.ws.read_exact(&mut buf).await.unwrap();
        let (s, v) = call(
            &env,
            &spec,
            "GET",
            conns,
            "/hybridconnections/web/connections",
            None,
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["value"].as_array().unwrap().len(), 1);
        common::eventually(|| async {
            let (_, v) = call(
                &env,
                &spec,
                "GET",
                conns,
                "/hybridconnections/web/connections",
                None,
                None,
            )
            .await;
            v["value"][0]["bytesSenderToListener"].as_u64().unwrap_or(0) >= 1000
        })
        .await;
    }
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        conns,
        "/hybridconnections/nope/connections",
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);

    // Rules in both scopes.
    for (base, list_t, one_t) in [
        ("", "/authorizationrules", "/authorizationrules/{rule}"),
        (
            "/hybridconnections/web",
            "/hybridconnections/{name}/authorizationrules",
            "/hybridconnections/{name}/authorizationrules/{rule}",
        ),
    ] {
        let rules = format!("{base}/authorizationrules");
        let ops = format!("{rules}/ops");
        let (s, _) = call(&env, &spec, "GET", list_t, &rules, None, None).await;
        assert_eq!(s, 200);
        let (s, created) = call(
            &env,
            &spec,
            "PUT",
            one_t,
            &ops,
            Some(json!({"rights": ["Listen"]})),
            None,
        )
        .await;
        assert_eq!(s, 201);
        let (s, updated) = call(
            &env,
            &spec,
            "PUT",
            one_t,
            &ops,
            Some(json!({"rights": ["Listen", "Send"]})),
            None,
        )
        .await;
        assert_eq!(s, 200, "a second PUT updates");
        assert_eq!(
            updated["primaryKey"], created["primaryKey"],
            "an update keeps the keys"
        );
        assert_eq!(updated["rights"], json!(["Listen", "Send"]));
        let (s, _) = call(
            &env,
            &spec,
            "PUT",
            one_t,
            &ops,
            Some(json!({"rights": ["Fly"]})),
            None,
        )
        .await;
        assert_eq!(s, 400);
        let (s, v) = call(&env, &spec, "GET", one_t, &ops, None, None).await;
        assert_eq!((s, v["name"].as_str()), (200, Some("ops")));
        assert!(v.get("primaryKey").is_none(), "GET shows no keys");
        let (s, _) = call(
            &env,
            &spec,
            "GET",
            one_t,
            &format!("{rules}/nope"),
            None,
            None,
        )
        .await;
        assert_eq!(s, 404);
        let (s, v) = call(&env, &spec, "GET", list_t, &rules, None, None).await;
        assert_eq!(s, 200);
        assert!(v["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "ops"));
        let lk = format!("{one_t}/listkeys");
        let (s, keys) = call(
            &env,
            &spec,
            "POST",
            &lk,
            &format!("{ops}/listkeys"),
            None,
            None,
        )
        .await;
        assert_eq!((s, &keys["primaryKey"]), (200, &created["primaryKey"]));
        let rk = format!("{one_t}/regeneratekeys");
        let (s, regen) = call(
            &env,
            &spec,
            "POST",
            &rk,
            &format!("{ops}/regeneratekeys"),
            Some(json!({"keyType": "PrimaryKey"})),
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_ne!(regen["primaryKey"], created["primaryKey"]);
        assert_eq!(regen["secondaryKey"], created["secondaryKey"]);
        let (s, _) = call(
            &env,
            &spec,
            "POST",
            &rk,
            &format!("{ops}/regeneratekeys"),
            Some(json!({"keyType": "TertiaryKey"})),
            None,
        )
        .await;
        assert_eq!(s, 400);
        let (s, _) = call(
            &env,
            &spec,
            "POST",
            &lk,
            &format!("{rules}/nope/listkeys"),
            None,
            None,
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = call(&env, &spec, "DELETE", one_t, &ops, None, None).await;
        assert_eq!(s, 204);
        let (s, _) = call(&env, &spec, "DELETE", one_t, &ops, None, None).await;
        assert_eq!(s, 404);
    }
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}/authorizationrules",
        "/hybridconnections/nope/authorizationrules",
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);

    // The last namespace rule with Manage cannot go.
    let (s, v) = call(
        &env,
        &spec,
        "DELETE",
        "/authorizationrules/{rule}",
        &format!("/authorizationrules/{}", env.key_name),
        None,
        None,
    )
    .await;
    assert_eq!(s, 409, "{v}");

    // Deleting a hybrid connection closes its listeners with 1001.
    let (s, _) = call(
        &env,
        &spec,
        "DELETE",
        one,
        "/hybridconnections/web",
        None,
        None,
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(close_code_of(&mut l).await, Some(1001));
    let (s, _) = call(
        &env,
        &spec,
        "DELETE",
        one,
        "/hybridconnections/web",
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);

    // Refusals: no token, a token without Manage.
    let (s, v) = call(&env, &spec, "GET", hcs, hcs, None, Some("")).await;
    assert_eq!(s, 401);
    assert!(v["error"]["code"].is_string());
    let (ln, lk) = env.rule("hc1", "reader", r#"["Listen"]"#).await;
    let listen_token = token_for(Some("hc1"), &ln, lk.expose());
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}",
        "/hybridconnections/hc1",
        None,
        Some(&listen_token),
    )
    .await;
    assert_eq!(s, 403);

    // Every documented operation was exercised.
    let missing: Vec<_> = spec
        .operations()
        .difference(&spec.seen.lock().unwrap())
        .cloned()
        .collect();
    assert!(missing.is_empty(), "not exercised: {missing:?}");
}

#[tokio::test]
async fn scopes_methods_and_rotation_behave() {
    let env = start("admin-scope", |_| {}).await;
    let spec = Spec::load();
    // An entity-scoped Manage rule manages its own hybrid connection only.
    let (mn, mk) = env.rule("hc1", "hc1-admin", r#"["Manage"]"#).await;
    let t = token_for(Some("hc1"), &mn, mk.expose());
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}",
        "/hybridconnections/hc1",
        None,
        Some(&t),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}",
        "/hybridconnections/hc10",
        None,
        Some(&t),
    )
    .await;
    assert_eq!(s, 401, "a token for hc1 is not one for hc10");
    let (s, _) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections",
        "/hybridconnections",
        None,
        Some(&t),
    )
    .await;
    assert_eq!(s, 401);

    // A known path with a method it does not take: 405, not 404.
    let root = env.token(None, now() + 600);
    for (m, p) in [
        ("DELETE", "/hybridconnections"),
        ("POST", "/hybridconnections/hc1"),
        ("GET", "/authorizationrules/x/listkeys"),
    ] {
        let a = env
            .connector
            .https_request(
                http::Method::from_bytes(m.as_bytes()).unwrap(),
                &format!("https://localhost:{}/$hyco/v1{p}", env.port),
                &[("Authorization", root.as_str())],
                bytes::Bytes::new(),
                1 << 20,
            )
            .await
            .unwrap();
        assert_eq!(a.status, 405, "{m} {p}");
    }

    // Rotation: after the primary key is regenerated, tokens signed with the secondary still
    // work and tokens with the old primary do not.
    let (s, keys) = call(
        &env,
        &spec,
        "PUT",
        "/hybridconnections/{name}/authorizationrules/{rule}",
        "/hybridconnections/hc1/authorizationrules/app",
        Some(json!({"rights": ["Listen", "Send"]})),
        None,
    )
    .await;
    assert_eq!(s, 201);
    let old_primary = keys["primaryKey"].as_str().unwrap().to_owned();
    let secondary = keys["secondaryKey"].as_str().unwrap().to_owned();
    let listen_with = |key: &str| {
        let t = token_for(Some("hc1"), "app", key);
        let url = format!(
            "wss://localhost:{}/$hc/hc1?sb-hc-action=listen&sb-hc-id=rot",
            env.port
        );
        let c = env.connector.clone();
        async move {
            c.connect(&url, &[("ServiceBusAuthorization", t.as_str())])
                .await
        }
    };
    let mut live = listen_with(&old_primary).await.unwrap();
    let (s, _) = call(
        &env,
        &spec,
        "POST",
        "/hybridconnections/{name}/authorizationrules/{rule}/regeneratekeys",
        "/hybridconnections/hc1/authorizationrules/app/regeneratekeys",
        Some(json!({"keyType": "PrimaryKey"})),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        listen_with(&old_primary)
            .await
            .map(|_| ())
            .unwrap_err()
            .status(),
        Some(401)
    );
    let mut second = listen_with(&secondary).await.unwrap();
    // Attacks A10: the listener whose token was signed with the replaced key is closed with
    // 1008 at once; the one on the secondary key stays.
    assert_eq!(close_code_of(&mut live).await, Some(1008));
    let (s, v) = call(
        &env,
        &spec,
        "GET",
        "/hybridconnections/{name}/listeners",
        "/hybridconnections/hc1/listeners",
        None,
        None,
    )
    .await;
    assert_eq!((s, v["value"].as_array().unwrap().len()), (200, 1));
    second.ws.send_ping(b"still here").await.unwrap();
    // Deleting the rule closes the rest.
    let (s, _) = call(
        &env,
        &spec,
        "DELETE",
        "/hybridconnections/{name}/authorizationrules/{rule}",
        "/hybridconnections/hc1/authorizationrules/app",
        None,
        None,
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(close_code_of(&mut second).await, Some(1008));
}
