//! HTTP mode in the SDK: serving requests that senders make to `https://{relay}/{hc}/…`
//! ([`RelayedRequest`], from [`crate::HybridListener::start_with_http`]) and making such
//! requests ([`request`]).
//!
//! A request arrives whole on the control channel (small bodies) or over a request rendezvous
//! (large or chunked bodies, streamed with [`RelayedRequest::next_chunk`]). The response goes
//! back the way protocol.md §4.7 asks: on the control channel when it fits in 64 KiB, otherwise
//! over the request's rendezvous, streamed as the fragments of one binary message.

use std::time::Duration;

use bytes::Bytes;
use hyco_io::ws::{Connector, HttpAnswer, Message, Part};
use hyco_proto::control::{ListenerCommand, RemoteEndpoint, RequestCommand, ResponseCommand};
use hyco_proto::ConnectionString;
use tokio::sync::mpsc;

use crate::{entity_of, mint_token, ClientError, ClientOptions, HybridStream};

/// Most a response may carry (JSON and body) on the control channel (protocol.md §4.7).
const CONTROL_MAX: usize = 64 * 1024;
/// Frame size for streamed bodies.
const PIECE: usize = 64 * 1024;

/// A message for the control channel: a `response` JSON and, right after it, its body.
pub(crate) type ControlReply = (String, Option<Bytes>);

/// Where the body of a request comes from.
enum BodySource {
    /// Arrived with the request (may be empty); `None` once read.
    Inline(Option<Bytes>),
    /// Streams on the rendezvous; `true` once its final piece was read.
    Rendezvous(bool),
}

/// Where the response goes.
enum Reply {
    /// The request came on the control channel: answer there, or open its rendezvous.
    Control {
        ctl: mpsc::Sender<ControlReply>,
        address: String,
        connector: Connector,
    },
    /// The request came on a rendezvous: answer on it.
    Rendezvous(Box<HybridStream>),
}

/// An HTTP request relayed to this listener. Answer it with [`RelayedRequest::respond`] or
/// [`RelayedRequest::respond_streaming`]; dropping it unanswered leaves the sender to the
/// relay's timeout (504).
pub struct RelayedRequest {
    /// Request id.
    pub id: String,
    /// HTTP method.
    pub method: String,
    /// Path (entity name included) percent-decoded, as Azure delivers it, except escapes of `/`,
    /// `?`, `#`, `%` and control characters; then the query as sent, without `sb-hc-*` pairs.
    /// `hyco_proto::address::request_line_path` makes it fit for an HTTP request line again.
    pub target: String,
    /// Headers after the relay's stripping; repeated ones joined with ", ".
    pub headers: Vec<(String, String)>,
    /// The sender's address, when the relay tells it.
    pub remote: Option<RemoteEndpoint>,
    body: BodySource,
    reply: Reply,
}

impl std::fmt::Debug for RelayedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayedRequest")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A whole response.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Reason phrase; the standard one when `None`.
    pub reason: Option<String>,
    /// Headers (framing headers are the relay's business and are dropped by it).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A response with a status and body.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        HttpResponse {
            status,
            body: body.into(),
            ..HttpResponse::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

fn standard_reason(status: u16) -> String {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
        .to_owned()
}

fn response_json(
    id: &str,
    status: u16,
    reason: Option<String>,
    headers: Vec<(String, String)>,
    body: bool,
) -> String {
    ListenerCommand::Response(ResponseCommand {
        request_id: id.to_owned(),
        status_code: status,
        status_description: Some(reason.unwrap_or_else(|| standard_reason(status))),
        response_headers: Some(headers),
        body,
    })
    .to_json()
}

fn ws_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Http(e.to_string())
}

impl RelayedRequest {
    /// A request that came whole on the control channel.
    pub(crate) fn from_control(
        cmd: RequestCommand,
        body: Bytes,
        ctl: mpsc::Sender<ControlReply>,
        connector: Connector,
    ) -> Self {
        RelayedRequest {
            id: cmd.id,
            method: cmd.method.unwrap_or_default(),
            target: cmd.request_target.unwrap_or_default(),
            headers: cmd.request_headers.unwrap_or_default(),
            remote: cmd.remote_endpoint,
            body: BodySource::Inline(Some(body)),
            reply: Reply::Control {
                ctl,
                address: cmd.address,
                connector,
            },
        }
    }

    /// Opens the rendezvous of an address-only request and reads the full request there.
    pub(crate) async fn from_rendezvous(
        address: &str,
        connector: &Connector,
    ) -> Result<Self, ClientError> {
        let mut ws = connector.connect(address, &[]).await?.ws;
        let text = match tokio::time::timeout(Duration::from_secs(30), ws.recv()).await {
            Ok(Ok(Message::Text(t))) => t,
            Ok(Ok(other)) => return Err(ws_err(format!("expected a request, got {other:?}"))),
            Ok(Err(e)) => return Err(ws_err(e)),
            Err(_) => return Err(ws_err("the relay sent no request on the rendezvous")),
        };
        let cmd = match ListenerCommand::parse(&text) {
            Ok(ListenerCommand::Request(r)) => r,
            Ok(other) => return Err(ws_err(format!("expected a request, got {}", other.name()))),
            Err(e) => return Err(ws_err(e)),
        };
        let has_body = cmd.body == Some(true);
        Ok(RelayedRequest {
            id: cmd.id,
            method: cmd.method.unwrap_or_default(),
            target: cmd.request_target.unwrap_or_default(),
            headers: cmd.request_headers.unwrap_or_default(),
            remote: cmd.remote_endpoint,
            body: BodySource::Rendezvous(!has_body),
            reply: Reply::Rendezvous(Box::new(ws)),
        })
    }

    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The next piece of the body, `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        match (&mut self.body, &mut self.reply) {
            (BodySource::Inline(b), _) => Ok(b.take().filter(|b| !b.is_empty())),
            (BodySource::Rendezvous(true), _) => Ok(None),
            (BodySource::Rendezvous(done), Reply::Rendezvous(ws)) => loop {
                match ws.recv_part(PIECE).await.map_err(ws_err)? {
                    Part::Data { data, fin, .. } => {
                        *done = fin;
                        if !data.is_empty() {
                            return Ok(Some(Bytes::from(data)));
                        }
                        if fin {
                            return Ok(None);
                        }
                    }
                    Part::Close(_) => return Err(ws_err("the relay closed the request")),
                }
            },
            (BodySource::Rendezvous(_), Reply::Control { .. }) => Ok(None),
        }
    }

    /// The whole body, refusing more than `limit` bytes.
    pub async fn body(&mut self, limit: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk().await? {
            if out.len() + c.len() > limit {
                return Err(ClientError::Http(format!(
                    "request body larger than {limit} bytes"
                )));
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// Reads and drops what is left of the body (the relay sends it all before it reads the
    /// response).
    async fn drain(&mut self) -> Result<(), ClientError> {
        while self.next_chunk().await?.is_some() {}
        Ok(())
    }

    /// Sends a whole response: on the control channel when it fits, else over the rendezvous.
    pub async fn respond(mut self, resp: HttpResponse) -> Result<(), ClientError> {
        self.drain().await?;
        let has_body = !resp.body.is_empty();
        let json = response_json(&self.id, resp.status, resp.reason, resp.headers, has_body);
        if let Reply::Control { ctl, .. } = &self.reply {
            if json.len() + resp.body.len() <= CONTROL_MAX {
                return ctl
                    .send((json, has_body.then_some(resp.body)))
                    .await
                    .map_err(|_| ws_err("the control channel is gone"));
            }
        }
        let mut ws = self.rendezvous().await?;
        ws.send_text(&json).await.map_err(ws_err)?;
        if has_body {
            send_body(&mut ws, &resp.body).await?;
        }
        finish(ws).await;
        Ok(())
    }

    /// Starts a streamed response (always over the rendezvous): write the body in pieces,
    /// then [`ResponseWriter::finish`].
    pub async fn respond_streaming(
        mut self,
        status: u16,
        reason: Option<String>,
        headers: Vec<(String, String)>,
    ) -> Result<ResponseWriter, ClientError> {
        self.drain().await?;
        let json = response_json(&self.id, status, reason, headers, true);
        let mut ws = self.rendezvous().await?;
        ws.send_text(&json).await.map_err(ws_err)?;
        Ok(ResponseWriter {
            ws: Box::new(ws),
            first: true,
        })
    }

    async fn rendezvous(self) -> Result<HybridStream, ClientError> {
        match self.reply {
            Reply::Rendezvous(ws) => Ok(*ws),
            Reply::Control {
                address, connector, ..
            } => Ok(connector.connect(&address, &[]).await?.ws),
        }
    }
}

async fn send_body(ws: &mut HybridStream, body: &[u8]) -> Result<(), ClientError> {
    let mut first = true;
    for chunk in body.chunks(PIECE) {
        ws.send_part(false, first, false, chunk)
            .await
            .map_err(ws_err)?;
        first = false;
    }
    ws.send_part(false, first, true, &[]).await.map_err(ws_err)
}

/// Ends a rendezvous: our Close, then the relay's (briefly awaited).
async fn finish(mut ws: HybridStream) {
    let _ = ws.send_close(1000, "Normal Closure").await;
    ws.finish_close(Duration::from_secs(2)).await;
}

/// The body of a streamed response.
pub struct ResponseWriter {
    ws: Box<HybridStream>,
    first: bool,
}

impl ResponseWriter {
    /// Sends one piece (empty pieces are skipped).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(PIECE) {
            self.ws
                .send_part(false, self.first, false, chunk)
                .await
                .map_err(ws_err)?;
            self.first = false;
        }
        Ok(())
    }

    /// Ends the body and the rendezvous.
    pub async fn finish(mut self) -> Result<(), ClientError> {
        self.ws
            .send_part(false, self.first, true, &[])
            .await
            .map_err(ws_err)?;
        finish(*self.ws).await;
        Ok(())
    }
}

/// Makes an HTTP-mode request to the connection string's hybrid connection:
/// `https://{endpoint}/{entity}{path_and_query}`, with a Send token when the string has a key.
/// The response body is read up to `limit` bytes.
pub async fn request(
    cs: &ConnectionString,
    connector: &Connector,
    method: http::Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    limit: usize,
) -> Result<HttpAnswer, ClientError> {
    let entity = entity_of(cs)?;
    let suffix = match path_and_query {
        "" => String::new(),
        s if s.starts_with('/') || s.starts_with('?') => s.to_owned(),
        s => format!("/{s}"),
    };
    let url = format!("https://{}/{entity}{suffix}", cs.endpoint.host_port());
    let token = mint_token(cs, ClientOptions::default().token_lifetime)?;
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if let Some((t, _)) = &token {
        h.push(("ServiceBusAuthorization", t.as_str()));
    }
    Ok(connector
        .https_request(method, &url, &h, body, limit)
        .await?)
}
