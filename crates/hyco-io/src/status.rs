//! A small loopback HTTP server for operators: `/metrics` (Prometheus text), `/api/status`
//! (a JSON snapshot), `/api/events` (the same snapshot pushed every second as Server-Sent
//! Events), `/api/history` (the last hour of samples of the snapshot, see [`history`]),
//! `/api/listener-events` (one Server-Sent Event per listener up or down, when the
//! process publishes them) and `/` (a status page that renders the snapshots; its assets are
//! embedded, no CDN).
//!
//! The relay and the manager both use it with their own sources. It binds where it is told:
//! keep it on loopback (the default) unless it sits behind something that authenticates,
//! because it shows listener addresses and hybrid connection names.
//!
//! It answers only requests whose `Host` is a loopback name or address (`localhost`,
//! `*.localhost`, `127.0.0.0/8`, `[::1]`) or one of [`Sources::hosts`]; any other gets 421.
//! Without that, a web page open in a browser on the same machine could read the pages by DNS
//! rebinding (its own name, re-pointed at 127.0.0.1, is same-origin for the page).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Produces a document describing the process now.
pub type Snapshot = Arc<dyn Fn() -> String + Send + Sync>;

/// What the status server shows.
#[derive(Clone)]
pub struct Sources {
    /// The JSON snapshot.
    pub snapshot: Snapshot,
    /// The Prometheus text.
    pub metrics: Snapshot,
    /// Discrete events (JSON), if the process publishes any.
    pub events: Option<broadcast::Sender<String>>,
    /// Host names (or addresses) the pages answer to besides loopback ones, as in a `Host`
    /// header without its port (`--status-host`); compared case-insensitively.
    pub hosts: Vec<String>,
}

/// Whether a `Host` header value names this server: a loopback name or address, or one of
/// `allowed`. The port, if any, is ignored; anything unparsable is refused.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || tail.starts_with(':') => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || lower
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
        || allowed.iter().any(|a| {
            let a = a
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(a);
            a.eq_ignore_ascii_case(name)
        })
}

pub mod history;

const PAGE: &str = include_str!("status/page.html");

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn sse<S>(stream: S) -> Response<Body>
where
    S: futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static,
{
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn data_frame(json: &str) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!(
        "data: {}\n\n",
        displayable(json)
    ))))
}

/// A JSON document with every control character in its strings (keys too) written as an
/// escape ([`hyco_proto::escape`]): the snapshots carry outside text (listener ids, endpoint
/// metadata in error details, reasons), and what the page shows must not hold control bytes.
pub fn displayable(json: &str) -> String {
    use hyco_proto::escape::{escaped, needs_escape};
    // serde_json writes C0 controls as `\…` escapes, so a document with no backslash and no
    // other escapable character has nothing to change.
    if !json.contains('\\') && !json.chars().any(needs_escape) {
        return json.to_owned();
    }
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = escaped(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            serde_json::Value::Object(o) => {
                *o = std::mem::take(o)
                    .into_iter()
                    .map(|(k, mut v)| {
                        walk(&mut v);
                        (escaped(&k), v)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(mut v) => {
            walk(&mut v);
            v.to_string()
        }
        // Not JSON (never from this crate's callers): shown as text, escaped.
        Err(_) => escaped(json),
    }
}

/// The snapshot now and then every second.
fn snapshots(snapshot: Snapshot, stop: CancellationToken) -> Response<Body> {
    sse(futures_util::stream::unfold(
        (snapshot, stop, true),
        |(snap, stop, first)| async move {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return None,
                }
            }
            Some((data_frame(&snap()), (snap, stop, false)))
        },
    ))
}

/// Each published event as it happens. A slow reader skips what it missed rather than making
/// the process hold memory for it.
fn event_stream(tx: &broadcast::Sender<String>, stop: CancellationToken) -> Response<Body> {
    sse(futures_util::stream::unfold(
        (tx.subscribe(), stop),
        |(mut rx, stop)| async move {
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    _ = stop.cancelled() => return None,
                };
                match msg {
                    Ok(m) => return Some((data_frame(&m), (rx, stop))),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    ))
}

async fn route(
    req: Request<Incoming>,
    src: Sources,
    past: Arc<history::History>,
    stop: CancellationToken,
) -> Result<Response<Body>, Infallible> {
    // A Host header is required; an absolute-form target's authority must pass as well.
    let host_ok = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| host_allowed(h, &src.hosts))
        && req
            .uri()
            .authority()
            .is_none_or(|a| host_allowed(a.as_str(), &src.hosts));
    if !host_ok {
        return Ok(full(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain",
            "unknown Host: this status page answers loopback names and its --status-host names\n",
        ));
    }
    if req.method() != Method::GET {
        return Ok(full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    Ok(match req.uri().path() {
        "/" => full(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/metrics" => full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            (src.metrics)(),
        ),
        "/api/status" => full(
            StatusCode::OK,
            "application/json",
            displayable(&(src.snapshot)()),
        ),
        "/api/events" => snapshots(src.snapshot, stop),
        "/api/history" => full(StatusCode::OK, "application/json", past.to_json()),
        "/api/listener-events" => match &src.events {
            Some(tx) => event_stream(tx, stop),
            None => full(StatusCode::NOT_FOUND, "text/plain", "no events here\n"),
        },
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Serves until `stop` fires; samples the snapshot into the history meanwhile.
pub async fn serve(listener: TcpListener, sources: Sources, stop: CancellationToken) {
    let past = Arc::new(history::History::default());
    let (snap, p, st) = (
        Arc::clone(&sources.snapshot),
        Arc::clone(&past),
        stop.clone(),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(history::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => p.record(&snap()),
                _ = st.cancelled() => return,
            }
        }
    });
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (src, past, st) = (sources.clone(), Arc::clone(&past), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                route(req, src.clone(), Arc::clone(&past), st.clone())
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_loopback_and_configured_hosts_are_allowed() {
        let cfg = vec!["status.example".to_owned(), "[fd00::5]".to_owned()];
        for ok in [
            "localhost",
            "LOCALHOST:9000",
            "localhost.",
            "app.localhost:1",
            "127.0.0.1",
            "127.1.2.3:8080",
            "[::1]",
            "[::1]:9000",
            "status.example",
            "Status.Example:443",
            "[fd00::5]:80",
        ] {
            assert!(host_allowed(ok, &cfg), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "evil.example",
            "evil.example:9000",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1",
            "[::2]",
            "::1",
            "[::1]x",
            "localhost:80:80",
            "status.example.evil",
        ] {
            assert!(!host_allowed(bad, &cfg), "{bad}");
        }
        assert!(!host_allowed("status.example", &[]));
    }
}
