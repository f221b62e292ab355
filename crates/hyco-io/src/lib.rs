//! Shared async plumbing for hyco, without hybrid-connection rules.
//!
//! # Layout
//! * [`ws`]: WebSocket frames ([`ws::frame`]), one endpoint as a byte stream or message channel
//!   ([`ws::WsStream`]), the server's upgrade checks ([`ws::handshake`]), the client's dialer
//!   (TCP, proxy, TLS, warm pool, upgrade: [`ws::dial`]) and plain HTTPS requests over it
//!   ([`ws::https`]).
//! * [`splice`]: the relay's frame-level join of two WebSocket connections.
//! * [`copy`]: both-ways byte copy for the client ends of a tunnel.
//! * [`listener`]: listening sockets with a backlog sized for bursts.
//! * [`bufpool`]: the large I/O buffers, held only while bytes move.
//! * [`tls`]: rustls configs and the generated development PKI.
//! * [`backoff`]: jittered reconnect delays.
//! * [`proxy`]: outbound HTTP proxies (`CONNECT` tunnels, `NO_PROXY` rules).
//! * [`prefixed`]: a stream with bytes read past a handshake put back in front.
//! * [`private`]: folders and files that hold keys (0700 / 0600, refused when exposed).
//! * [`status`]: the loopback status server (metrics, JSON, live page).
//! * [`tunnels`]: the tunnel limit that keeps a descriptor reserve.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod bufpool;
pub mod copy;
pub mod header_case;
pub mod listener;
pub mod prefixed;
pub mod private;
pub mod proxy;
pub mod splice;
pub mod status;
pub mod tls;
pub mod tunnels;

/// WebSocket framing, endpoints and handshakes.
pub mod ws {
    pub mod dial;
    pub mod early;
    pub mod frame;
    pub mod handshake;
    pub mod https;
    pub mod relay_addrs;
    pub mod stream;
    pub mod warm;

    pub use dial::{ConnectError, Connected, Connector};
    pub use https::HttpAnswer;
    pub use relay_addrs::{AddrFailure, RelayAddrs};
    pub use stream::{Message, Part, Recycle, Role, WsConfig, WsError, WsStream};
}

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;
