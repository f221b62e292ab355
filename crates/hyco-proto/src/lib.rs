//! The Hybrid Connections wire contract, without I/O and without a clock.
//!
//! What a relay and its clients must agree on: SAS tokens (sign, parse, verify with `now` as an
//! argument), connection strings, `$hc` addresses and `sb-hc-*` parameters, control-channel
//! JSON, the entity description. Everything here is pure so it can be unit tested and fuzzed;
//! randomness (keys, ids) and time (`now_unix`) are always parameters. Section numbers in the
//! docs refer to `protocol.md`.
//!
//! What is not here: sockets, TLS, WebSocket framing, tokio, logging. Those live in `hyco-io`
//! and the role crates.
//!
//! # Layout
//! * [`secret`]: key and token newtypes that never print themselves; constant-time compare.
//! * [`rights`]: Listen / Send / Manage.
//! * [`sas`]: tokens and audiences (§3.1–3.5, test vectors §3.8).
//! * [`connection_string`]: connection strings (§3.7).
//! * [`address`]: paths, queries, entity names, rendezvous ids, `host:port` (§2).
//! * [`control`]: `accept`, `request`, `response`, `renewToken` (§4).
//! * [`entity`]: endpoint metadata and the Atom entity description (§6).
//! * [`names`]: hybrid connection and rule names (Azure's rules) as URL path segments.
//! * [`error`]: every error enum, and [`ProtoError`] wrapping them.
//! * [`escape`]: outside text made safe for logs, terminals and pages.
//! * [`ext`]: hyco's protocol extensions (standby, early data) and their `Hyco-Extensions`
//!   header.
//! * [`headers`]: which HTTP headers are hop-by-hop (HTTP mode, relay and manager alike).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod connection_string;
pub mod control;
pub mod entity;
pub mod error;
pub mod escape;
pub mod ext;
pub mod headers;
pub mod names;
pub mod rights;
pub mod sas;
pub mod secret;

pub use address::{Action, HcQuery, HostPort};
pub use connection_string::{ConnectionString, ConnectionStringAuth, Endpoint};
pub use error::{
    AddressError, ConnectionStringError, ControlError, EntityError, ProtoError, RightsError,
    SasError,
};
pub use rights::{Need, Rights};
pub use sas::{Audience, ParsedToken};
pub use secret::{SasToken, SecretKey};

#[cfg(test)]
mod robustness;
