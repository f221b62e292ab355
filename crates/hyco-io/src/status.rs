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
    Ok(Frame::data(Bytes::from(format!("data: {json}\n\n"))))
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
        "/api/status" => full(StatusCode::OK, "application/json", (src.snapshot)()),
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
