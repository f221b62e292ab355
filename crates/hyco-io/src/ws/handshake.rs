//! The server side of the WebSocket opening handshake (RFC 6455 §4) on hyper's HTTP/1.1: check
//! an upgrade request and build the 101. [`accept_key`] is shared with the client side
//! ([`super::dial`]), which checks the 101 it gets back.

use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use sha1::{Digest, Sha1};

/// The client's TLS stream, re-exported here for the paths that name it so; it lives in
/// [`crate::tls`].
pub use crate::tls::ClientTls;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Whether a request asks for a protocol upgrade at all (routing decision).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

/// A refused upgrade: the status and reason to answer with.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {reason}")]
pub struct UpgradeError {
    /// 400, or 426 for a wrong version.
    pub status: StatusCode,
    /// Human-readable reason for the status line.
    pub reason: &'static str,
}

fn bad(reason: &'static str) -> UpgradeError {
    UpgradeError {
        status: StatusCode::BAD_REQUEST,
        reason,
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Checks an upgrade request and returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade<B>(req: &Request<B>) -> Result<String, UpgradeError> {
    if req.method() != http::Method::GET {
        return Err(bad("WebSocket upgrade requires GET"));
    }
    let h = req.headers();
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(bad("Upgrade must be websocket"));
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(bad("Connection must include Upgrade"));
    }
    let versions: Vec<_> = h.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
    if versions.len() != 1 || versions[0] != "13" {
        return Err(UpgradeError {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "Sec-WebSocket-Version must be 13",
        });
    }
    let keys: Vec<_> = h.get_all(header::SEC_WEBSOCKET_KEY).iter().collect();
    if keys.len() != 1 {
        return Err(bad("exactly one Sec-WebSocket-Key is required"));
    }
    let key = keys[0].as_bytes();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(accept_key(key)),
        _ => Err(bad("Sec-WebSocket-Key must be 16 bytes in base64")),
    }
}

/// The 101 answer, echoing the chosen sub-protocol if any.
pub fn switching_protocols<B: Default>(accept: &str, protocol: Option<&str>) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_checks() {
        let ok = Request::get("/")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert!(check_upgrade(&ok).is_ok());
        let v8 = Request::get("/")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "8")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert_eq!(check_upgrade(&v8).unwrap_err().status, 426);
        let dup = Request::get("/")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        assert_eq!(check_upgrade(&dup).unwrap_err().status, 400);
        let h2c = Request::post("/")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert_eq!(check_upgrade(&h2c).unwrap_err().status, 400);
    }
}
