//! The manager dials only what its operator allows (issue 15 §6, confused deputy): anyone with
//! Manage on a hybrid connection can point its endpoint anywhere; the manager refuses
//! link-local and cloud metadata addresses by default and anything outside `--allow-endpoint`
//! when given, with a clear reject to the sender, one log line per change and a metric.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::{bin, echo_roundtrip, metric, relay, Relay, T};
use hyco_client::{connect_with, ConnectOptions};
use hyco_proto::ConnectionString;
use hyco_testkit::{echo_server, eventually, field, run, Proc};

const REFUSED_LOG: &str = "endpoint refused by the allow-list";
const REFUSED_METRIC: &str = "hyco_manager_sender_connections_endpoint_refused";

/// Points hybrid connection `hc` at `endpoint` through the admin API (PATCH, with the root
/// rule's Manage key), then has the manager re-read it; waits until the manager uses it.
async fn repoint(r: &Relay, m: &Proc, hc: &str, endpoint: &str) {
    let (code, _, err) = r.admin(&["hc", "update", hc, "--endpoint", endpoint]).await;
    assert_eq!(code, 0, "{err}");
    let needle = format!("endpoint={endpoint}");
    let resolved = || {
        m.lines()
            .iter()
            .filter(|l| l.contains("endpoint resolved") && l.contains(&needle))
            .count()
    };
    let before = resolved();
    let dir = m.state_dir.to_str().unwrap();
    let (code, _, err) = run(
        &bin(),
        &["manager", "restart", hc],
        &[("HYCO_STATE_DIR", dir)],
        T,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    eventually(&format!("manager resolved {endpoint}"), T, || async {
        resolved() > before
    })
    .await;
}

/// The refusal a sender gets once the manager listens again (bounded retries while the
/// listener comes back).
async fn refusal(r: &Relay, cs: &ConnectionString) -> hyco_client::ClientError {
    let c = r.connector();
    let mut last = None;
    for _ in 0..100 {
        match connect_with(cs, &c, &ConnectOptions::default()).await {
            Ok(_) => panic!("a sender got a tunnel to a refused endpoint"),
            Err(e) if e.status() == Some(403) => return e,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no 403 from the manager; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_refused_by_default_and_refused_by_the_list() {
    let r = relay("allow").await;
    let echo = echo_server().await;
    let (l, s) = r.hc("svc", &echo.to_string()).await;
    let cs = ConnectionString::parse(&s).unwrap();
    let allow = format!("127.0.0.1:{}", echo.port());
    let m = r.manager_with(
        "manager",
        &l,
        &["--allow-endpoint", &allow, "--status-listen", "127.0.0.1:0"],
        &[],
    );
    let status = field(
        &m.wait_line("status page and metrics listening", T).await,
        "status",
    )
    .unwrap();
    r.wait_listeners("svc", 1).await;

    // Allowed: the endpoint on the list carries data.
    let (_f, port) = r.forward("svc", &s).await;
    let (a, b, n) = echo_roundtrip(port, 100_000).await;
    assert_eq!((a, n), (b, 100_000));
    assert_eq!(metric(&status, REFUSED_METRIC).await, 0);

    // Refused by default: a Manage holder points it at the cloud metadata address. The
    // sender gets 403 with the reason; nothing is dialled; one log line for three senders.
    repoint(&r, &m, "svc", "169.254.169.254:80").await;
    for _ in 0..3 {
        let e = refusal(&r, &cs).await;
        assert!(
            e.to_string().contains(
                "Endpoint 169.254.169.254:80 is a cloud metadata address; this manager dials it only when --allow-endpoint names it"
            ),
            "{e}"
        );
    }
    assert_eq!(m.count(REFUSED_LOG), 1, "{:#?}", m.lines());
    assert!(metric(&status, REFUSED_METRIC).await >= 3);

    // Refused by the list: another port of the same host is not on it.
    let other = format!("127.0.0.1:{}", echo.port().wrapping_add(1).max(1));
    repoint(&r, &m, "svc", &other).await;
    let e = refusal(&r, &cs).await;
    assert!(
        e.to_string().contains(&format!(
            "Endpoint {other} is not in this manager's allow-list"
        )),
        "{e}"
    );
    eventually("the new refusal logged once", T, || async {
        m.count(REFUSED_LOG) == 2
    })
    .await;

    // Back on the list: it serves again.
    repoint(&r, &m, "svc", &echo.to_string()).await;
    let c = r.connector();
    eventually("the allowed endpoint serves again", T, || async {
        connect_with(&cs, &c, &ConnectOptions::default())
            .await
            .is_ok()
    })
    .await;
}

/// Without `--allow-endpoint`, ordinary endpoints are dialled and link-local ones are not;
/// a bad entry is a usage error that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_list_link_local_is_refused_and_bad_entries_are_usage_errors() {
    let r = relay("allow-default").await;
    let (l, s) = r.hc("ll", "169.254.1.1:22").await;
    let cs = ConnectionString::parse(&s).unwrap();
    let _m = r.manager("manager", &l);
    r.wait_listeners("ll", 1).await;
    let e = refusal(&r, &cs).await;
    assert!(
        e.to_string()
            .contains("Endpoint 169.254.1.1:22 is a link-local address"),
        "{e}"
    );

    let state = r.dir.0.join("state");
    let (code, _, err) = run(
        &bin(),
        &["manager", "run", "--allow-endpoint", "db.corp:99999"],
        &[("HYCO_STATE_DIR", state.to_str().unwrap())],
        T,
    )
    .await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--allow-endpoint 'db.corp:99999': the port is not 1-65535"),
        "{err}"
    );
}
