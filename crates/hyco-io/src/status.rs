//! A small loopback HTTP server for operators: `/metrics` (Prometheus text), `/api/status`
//! (a JSON snapshot), `/api/events` (the same snapshot pushed every second as Server-Sent
//! Events) and `/` (a status page that renders the events; its assets are embedded, no CDN).
//!
//! The relay and the manager both use it with their own snapshot functions. It binds where it
//! is told: keep it on loopback (the default) unless it sits behind something that
//! authenticates, because it shows listener addresses and hybrid connection names.

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
use tokio_util::sync::CancellationToken;

/// Produces a JSON document describing the process now.
pub type Snapshot = Arc<dyn Fn() -> String + Send + Sync>;

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

fn events(snapshot: Snapshot, stop: CancellationToken) -> Response<Body> {
    let stream =
        futures_util::stream::unfold((snapshot, stop, true), |(snap, stop, first)| async move {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return None,
                }
            }
            let chunk = format!("data: {}\n\n", snap());
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                (snap, stop, false),
            ))
        });
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

async fn route(
    req: Request<Incoming>,
    snapshot: Snapshot,
    metrics: Snapshot,
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
            metrics(),
        ),
        "/api/status" => full(StatusCode::OK, "application/json", snapshot()),
        "/api/events" => events(snapshot, stop),
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    snapshot: Snapshot,
    metrics: Snapshot,
    stop: CancellationToken,
) {
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
        let (snap, met, st) = (snapshot.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                route(req, snap.clone(), met.clone(), st.clone())
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = conn.await;
        });
    }
}
