//! Addresses (protocol.md §2): `HcQuery::parse`, `split_hc_path`, `split_http_path`,
//! `validate_entity_name`, `HostPort`, `sanitize_reason`, and the URLs built from them
//! (`ws_url`, `reject_url`).
//!
//! Properties beyond "no panic":
//! * the `sb-hc-*` values of a parsed query survive being written back (form-encoded, as the
//!   clients write them) and parsed again, and so does the application's query;
//! * `ws_url` and `reject_url` produce queries that parse to the action, id, status and
//!   description they were given;
//! * path segments are non-empty, never `.`/`..`, and join back to the path;
//! * a valid entity name splits as an HTTP path into its own segments;
//! * `HostPort` display → parse round-trips; `sanitize_reason` is bounded and idempotent.
#![no_main]

use hyco_proto::address::{
    self, entity_key, reject_url, sanitize_reason, split_hc_path, split_http_path,
    validate_entity_name, ws_url, Action, HcQuery, MAX_QUERY,
};
use hyco_proto::HostPort;
use libfuzzer_sys::fuzz_target;

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Writes the relay parameters back after the application's query, as a client would.
fn rebuild(q: &HcQuery) -> String {
    let mut pairs: Vec<String> = Vec::new();
    if !q.app_query.is_empty() {
        pairs.push(q.app_query.clone());
    }
    if let Some(a) = q.action {
        pairs.push(format!("sb-hc-action={a}"));
    }
    for (k, v) in [
        ("sb-hc-id", &q.id),
        ("sb-hc-token", &q.token),
        ("sb-hc-statusCode", &q.status_code),
        ("sb-hc-statusDescription", &q.status_description),
    ] {
        if let Some(v) = v {
            pairs.push(format!("{k}={}", enc(v)));
        }
    }
    for (k, v) in &q.extra_sb {
        pairs.push(format!("{}={}", enc(k), enc(v)));
    }
    pairs.join("&")
}

fn check_query(text: &str) {
    let Ok(q) = HcQuery::parse(text) else {
        return;
    };
    let again = rebuild(&q);
    if again.len() <= MAX_QUERY {
        assert_eq!(
            HcQuery::parse(&again),
            Ok(q.clone()),
            "rebuilt as {again:?}"
        );
    }
    let _ = (q.reject_status(), q.reject_description());
    if let Some(a) = q.action {
        assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        let id = q.id.clone().unwrap_or_default();
        let url = ws_url(
            "relay.example:443",
            "hc",
            Some(&format!("/x?{}", q.app_query)),
            a,
            &id,
        );
        let (_, query) = url.split_once('?').expect("ws_url writes a query");
        if query.len() <= MAX_QUERY {
            let back = HcQuery::parse(query).expect("ws_url writes a valid query");
            assert_eq!(back.action, Some(a), "{url}");
            assert_eq!(back.id.as_deref(), Some(id.as_str()), "{url}");
        }
        if q.status_code.is_none() && q.status_description.is_none() {
            let reason = q.app_query.as_str();
            let url = reject_url(&format!("wss://h/$hc/hc?{}", q.app_query), 404, reason);
            let (_, query) = url.split_once('?').expect("reject_url writes a query");
            if query.len() <= MAX_QUERY {
                let back = HcQuery::parse(query).expect("reject_url writes a valid query");
                assert_eq!(back.status_code.as_deref(), Some("404"), "{url}");
                assert_eq!(back.status_description.as_deref(), Some(reason), "{url}");
            }
        }
    }
}

fn check_segments(tail: &str, segs: &[&str]) {
    assert!(!segs.is_empty());
    for s in segs {
        assert!(!s.is_empty() && *s != "." && *s != "..", "{segs:?}");
    }
    let joined = segs.join("/");
    assert!(
        tail == joined || tail.strip_suffix('/') == Some(joined.as_str()),
        "{tail:?} → {segs:?}"
    );
}

fn check_paths(text: &str) {
    if let Ok(segs) = split_hc_path(text) {
        let rest = &text[1..];
        let tail = rest.split_once('/').map_or("", |(_, t)| t);
        check_segments(tail, &segs);
    }
    if let Ok(segs) = split_http_path(text) {
        check_segments(text.strip_prefix('/').unwrap_or(text), &segs);
    }
    if validate_entity_name(text).is_ok() {
        let path = format!("/{text}");
        let segs = split_http_path(&path).expect("a valid name is a valid path");
        assert_eq!(segs.join("/"), text);
        let key = entity_key(text);
        assert_eq!(entity_key(&key), key);
        assert!(validate_entity_name(&key).is_ok());
        let path = format!("/$hc/{text}/");
        let hc = split_hc_path(&path).expect("a valid name is a valid $hc path");
        assert_eq!(hc.join("/"), text);
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_query(&text);
    check_paths(&text);
    if let Ok(hp) = text.parse::<HostPort>() {
        assert_eq!(hp.to_string().parse::<HostPort>(), Ok(hp.clone()), "{hp}");
    }
    let r = sanitize_reason(&text);
    assert!(r.chars().count() <= address::MAX_REASON);
    assert!(
        r.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
        "{r:?}"
    );
    assert_eq!(sanitize_reason(&r), r);
    let _ = Action::from_wire(&text);
});
