//! HTTP mode: small requests per second and their latency, through the relay to a hyco-client
//! HTTP listener, against the same answer from a plain HTTP server on loopback. Both sides use
//! keep-alive connections, `conns` of them, each sending one request at a time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyco_client::http::HttpResponse;
use hyco_io::CancellationToken;
use hyco_proto::ConnectionString;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;

const ANSWER: &[u8] = b"hello from the listener\n";

/// A plain HTTP/1.1 server answering every request with [`ANSWER`].
async fn direct_server() -> Result<SocketAddr> {
    let l = hyco_io::listener::bind(([127, 0, 0, 1], 0).into())?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(ANSWER))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The same answer from a hyco-client HTTP listener on `listen` (a Listen connection string
/// with EntityPath).
async fn relayed_server(
    listen: ConnectionString,
    connector: hyco_client::Connector,
    stop: CancellationToken,
) -> Result<()> {
    let (listener, _ws, mut http) = hyco_client::HybridListener::start_with_http(
        listen,
        connector,
        hyco_client::ListenerOptions::default(),
        stop,
    )?;
    // Ready once its control channel is up.
    let mut status = listener.status_watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, hyco_client::ListenerStatus::Connected { .. })),
    )
    .await
    .context("the HTTP listener did not connect within 10 s")??;
    tokio::spawn(async move {
        let _keep = listener;
        while let Some(req) = http.recv().await {
            tokio::spawn(async move {
                let _ = req.respond(HttpResponse::new(200, ANSWER)).await;
            });
        }
    });
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Drives `conns` keep-alive connections for `secs`; `open` makes one connection's sender.
async fn load<F, Fut>(
    conns: usize,
    secs: u64,
    uri: String,
    headers: Vec<(String, String)>,
    open: F,
) -> Result<Value>
where
    F: Fn() -> Fut,
    Fut:
        std::future::Future<Output = Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut sender = open().await?;
        let (uri, headers) = (uri.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let mut b = hyper::Request::get(uri.as_str()).header("host", "localhost");
                for (k, v) in &headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let Ok(req) = b.body(Empty::<Bytes>::new()) else {
                    break;
                };
                let t = Instant::now();
                let ok =
                    match tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
                        .await
                    {
                        Ok(Ok(resp)) => {
                            let good = resp.status() == 200;
                            good && resp
                                .into_body()
                                .collect()
                                .await
                                .is_ok_and(|b| b.to_bytes() == ANSWER)
                        }
                        _ => false,
                    };
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                    if sender.ready().await.is_err() {
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    all.sort_by(f64::total_cmp);
    Ok(json!({
        "requests": all.len(),
        "errors": errors,
        "requests_per_s": all.len() as f64 / secs as f64,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
    }))
}

/// Runs both sides and returns `{direct: …, relayed: …}`.
pub async fn run(
    relay_port: u16,
    ca: &Path,
    listen: ConnectionString,
    send: ConnectionString,
    conns: usize,
    secs: u64,
) -> Result<Value> {
    let direct = direct_server().await?;
    let stop = CancellationToken::new();
    let connector = hyco_client::ClientOptions {
        ca_file: Some(ca.to_owned()),
        ..Default::default()
    }
    .connector()?;
    relayed_server(listen, connector, stop.clone()).await?;

    let direct_result = load(conns, secs, "/hello".into(), Vec::new(), || async move {
        let s = TcpStream::connect(direct).await?;
        let _ = s.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        Ok(sender)
    })
    .await?;

    let tls = hyco_io::tls::client_config(Some(ca)).context("client TLS")?;
    let (token, _) = hyco_client::mint_token(&send, Duration::from_secs(3600))?
        .context("the send connection string has no key")?;
    let entity = send.entity_path.clone().unwrap_or_default();
    let relayed_result = load(
        conns,
        secs,
        format!("/{entity}/hello"),
        vec![("ServiceBusAuthorization".into(), token)],
        || {
            let tls = Arc::clone(&tls);
            async move {
                let s = TcpStream::connect(("127.0.0.1", relay_port)).await?;
                let _ = s.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, s)
                    .await?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
                tokio::spawn(conn);
                Ok(sender)
            }
        },
    )
    .await?;
    stop.cancel();
    Ok(json!({ "direct": direct_result, "relayed": relayed_result }))
}
