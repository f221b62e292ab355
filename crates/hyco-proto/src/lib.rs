//! The Hybrid Connections wire contract, without I/O and without a clock.
//!
//! What a relay and its clients must agree on: SAS tokens (sign, parse, verify with `now` as an
//! argument), connection strings, `$hc` addresses and `sb-hc-*` parameters, control-channel
//! JSON, the entity description. Everything here is pure so it can be unit tested and fuzzed.
//!
//! # Layout
//! * [`secret`]: key and token newtypes that never print themselves; constant-time compare.
//! * [`rights`]: Listen / Send / Manage.
//! * [`sas`]: tokens and audiences (protocol.md §3.1–3.5).
//! * [`connection_string`]: connection strings (§3.7).
//! * [`address`]: paths, queries, rendezvous ids, host:port (§2).
//! * [`control`]: `accept`, `request`, `response`, `renewToken` (§4).
//! * [`entity`]: endpoint metadata and the Atom entity description (§6).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod connection_string;
pub mod control;
pub mod entity;
pub mod rights;
pub mod sas;
pub mod secret;

pub use address::{Action, HcQuery, HostPort};
pub use connection_string::{ConnectionString, ConnectionStringAuth, Endpoint};
pub use rights::Rights;
pub use sas::{Audience, ParsedToken};
pub use secret::{SasToken, SecretKey};
