//! One plain HTTPS request on a fresh connection (the entity GET, the admin API), over the same
//! dialer as the WebSocket connects: proxy, relay addresses and TLS trust all apply.

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

use super::dial::{reason_phrase, ConnectError, Connector, Target};

/// A plain HTTPS exchange's answer (entity GET, admin API).
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Reason phrase as sent, or the canonical one.
    pub reason: String,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body, at most the limit given.
    pub body: Bytes,
}

impl Connector {
    /// One HTTPS request on a fresh connection. `url` is `https://host[:port]/path?query`.
    /// The body is read up to `limit` bytes.
    pub async fn https_request(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        limit: usize,
    ) -> Result<HttpAnswer, ConnectError> {
        let t = Target::parse(url)?;
        tokio::time::timeout(self.timeout, async {
            let tls = self.dial(&t).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = Request::builder()
                .method(method)
                .uri(t.path_and_query.as_str())
                .header(header::HOST, t.host_header());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let mut req = req
                .body(http_body_util::Full::new(body))
                .map_err(|_| ConnectError::BadUrl("invalid request header".into()))?;
            // Names on the wire as the caller wrote them.
            let names: Vec<&str> = std::iter::once("Host")
                .chain(headers.iter().map(|(k, _)| *k))
                .collect();
            if let Some(ext) = crate::header_case::recorded(&names).await {
                req.extensions_mut().extend(ext);
            }
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let reason = reason_phrase(&resp);
            let headers = resp.headers().clone();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|_| ConnectError::BadHandshake("response body too large or broken"))?
                .to_bytes();
            Ok(HttpAnswer {
                status,
                reason,
                headers,
                body,
            })
        })
        .await
        .map_err(|_| ConnectError::Timeout(self.timeout))?
    }
}
