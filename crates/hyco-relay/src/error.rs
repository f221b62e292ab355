//! Relay errors and their one mapping to HTTP answers.
//!
//! Every refusal the relay makes goes through [`RelayError::into_response`]: the status, the
//! reason phrase (Microsoft's clients build their exception text from it) and an Azure-shaped
//! JSON body `{"error":{"code","message"}}` without internal details.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// The body type the relay answers with: whole (errors, admin, entity) or streamed (HTTP mode).
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A body held whole.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// No body.
pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A refusal, tagged with who caused it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// Malformed request (bad path, bad upgrade, bad query).
    #[error("{0}")]
    BadRequest(String),
    /// A WebSocket version other than 13.
    #[error("Sec-WebSocket-Version must be 13")]
    UpgradeRequired,
    /// Missing, malformed, expired or wrongly signed token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Valid token without the needed right, or too many listeners.
    #[error("{0}")]
    Forbidden(&'static str),
    /// No such hybrid connection, or nothing to route to.
    #[error("{0}")]
    NotFound(String),
    /// A rendezvous address that is unknown, used or expired.
    #[error("The rendezvous address is invalid, already used or expired.")]
    RendezvousInvalid,
    /// Name clash on create.
    #[error("{0}")]
    Conflict(String),
    /// The listener refused the connection with this status and reason.
    #[error("{reason}")]
    ListenerRejected {
        /// Status chosen by the listener (sanitized to 400..=599).
        status: u16,
        /// Reason chosen by the listener (sanitized).
        reason: String,
    },
    /// HTTP mode: nobody listens on the hybrid connection (protocol.md §5.3: 502).
    #[error("No listener is connected for hybrid connection '{0}'.")]
    NoListener(String),
    /// HTTP mode: the listener's answer cannot be relayed.
    #[error("{0}")]
    BadGateway(String),
    /// HTTP mode: the listener did not start its response in time.
    #[error("The request was routed to the listener but the listener did not respond within {0} seconds.")]
    HttpTimeout(u64),
    /// HTTP mode: the request head does not fit in one control message.
    #[error("The request headers are too large to relay.")]
    HeadersTooLarge,
    /// The chosen listeners disconnected before answering.
    #[error("The listener went away before accepting the connection.")]
    ListenerGone,
    /// The listener did not answer within the rendezvous deadline.
    #[error("The listener did not accept the connection within {0} seconds.")]
    ListenerTimeout(u64),
    /// Too many failed authorizations from this address; retry after the seconds given.
    #[error("Too many failed authorization attempts from this address; retry in {0} s.")]
    TooManyFailures(u64),
    /// A per-listener or per-connection cap (not a throttle: no `Retry-After`).
    #[error("{0}")]
    TooMany(&'static str),
    /// A known management path with a method it does not take.
    #[error("This operation does not take that HTTP method.")]
    MethodNotAllowed,
    /// Overload or shutdown.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The cluster store (Redis) cannot be reached.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Our own fault.
    #[error("internal error")]
    Internal(String),
}

impl RelayError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            RelayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            RelayError::UpgradeRequired => (StatusCode::UPGRADE_REQUIRED, "BadRequest"),
            RelayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "TokenMissingOrInvalid"),
            RelayError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            RelayError::NotFound(_) => (StatusCode::NOT_FOUND, "EndpointNotFound"),
            RelayError::RendezvousInvalid => (StatusCode::FORBIDDEN, "RendezvousInvalid"),
            RelayError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            RelayError::ListenerRejected { status, .. } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
                "ListenerRejected",
            ),
            RelayError::ListenerGone => (StatusCode::BAD_GATEWAY, "ListenerGone"),
            RelayError::NoListener(_) => (StatusCode::BAD_GATEWAY, "NoListener"),
            RelayError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "BadGateway"),
            RelayError::HttpTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
            RelayError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "HeadersTooLarge",
            ),
            RelayError::ListenerTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
            RelayError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            RelayError::TooManyFailures(_) | RelayError::TooMany(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests")
            }
            RelayError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServerBusy"),
            RelayError::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable")
            }
            RelayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        }
    }

    /// The HTTP status this refusal is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    /// Whether the peer (rather than the relay) is at fault: decides the log level.
    pub(crate) fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            RelayError::Internal(_) | RelayError::Unavailable(_) | RelayError::StoreUnavailable(_)
        )
    }

    /// The HTTP answer for this refusal.
    pub(crate) fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        let resp = error_response(status, code, &message);
        self.add_headers(resp)
    }

    /// The answer for this refusal on a management (`api-version`) path: the same status,
    /// reason and headers, with Azure's XML error body, which .NET's management client reads.
    pub(crate) fn into_xml_response(self) -> Response<Body> {
        let (status, _) = self.status_and_code();
        let message = self.to_string();
        let mut resp = error_response(status, "", &message);
        *resp.body_mut() = full(hyco_proto::entity::render_error_xml(
            status.as_u16(),
            &message,
        ));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml; charset=utf-8"),
        );
        self.add_headers(resp)
    }

    fn add_headers(self, mut resp: Response<Body>) -> Response<Body> {
        let status = resp.status();
        if let RelayError::TooManyFailures(secs) = self {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            // A 401 without a challenge is a protocol violation to Jetty (Java's client), which
            // then reports that instead of the reason.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("SharedAccessSignature"),
            );
        }
        if matches!(self, RelayError::UpgradeRequired) {
            resp.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        resp
    }
}

/// An error answer: status, reason phrase = message, JSON body.
pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let reason = hyco_proto::address::sanitize_reason(message);
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Ok(rp) = hyper::ext::ReasonPhrase::try_from(reason.into_bytes()) {
        resp.extensions_mut().insert(rp);
    }
    resp
}
