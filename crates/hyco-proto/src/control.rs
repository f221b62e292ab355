//! Control-channel messages (protocol.md §4): one JSON object per text message, with exactly one
//! top-level property naming the command.
//!
//! Field names are exactly the wire's (camelCase) and are emitted in the order of §4.2/§4.3
//! (the .NET data contracts declare it); parsing accepts any order, `statusCode` as a number or
//! a numeric string, and ignores unknown fields. [`ListenerCommand::parse`] checks size and
//! nesting depth with a cheap byte scan before any JSON parser runs (attacks.md D10), so a
//! hostile listener cannot make the relay allocate or recurse deeply.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// Largest control message accepted (the .NET listener's buffer).
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// Deepest JSON nesting accepted.
pub const MAX_DEPTH: usize = 32;

/// Why a control message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Over 64 KiB.
    #[error("control message of {len} bytes exceeds 64 KiB")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Nested deeper than 32.
    #[error("control message nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A command this side does not know.
    #[error("unknown control command '{0}'")]
    UnknownCommand(String),
    /// Not one object with one property, or bad fields.
    #[error("invalid control message: {0}")]
    Invalid(String),
}

/// A sender's (or listener's) address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    /// IP literal.
    pub address: String,
    /// Port.
    pub port: u16,
}

/// Headers as an ordered JSON object.
mod ordered_headers {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(v.len()))?;
        for (k, val) in v {
            m.serialize_entry(k, val)?;
        }
        m.end()
    }

    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = a.next_entry::<String, String>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        d.deserialize_map(V)
    }

    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            v: &Option<Vec<(String, String)>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<(String, String)>>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(with = "super")] Vec<(String, String)>);
            Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// `accept` (relay → listener).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptCommand {
    /// Rendezvous URL, used as is.
    pub address: String,
    /// Connection id.
    pub id: String,
    /// The sender's handshake headers.
    #[serde(with = "ordered_headers", default)]
    pub connect_headers: Vec<(String, String)>,
    /// The sender's socket address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub remote_endpoint: Option<RemoteEndpoint>,
}

/// `request` (relay → listener), full or address-only form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestCommand {
    /// Rendezvous URL for this request.
    pub address: String,
    /// Request id (the address-only form may omit it; it is then in the address's `sb-hc-id`).
    #[serde(default)]
    pub id: String,
    /// Origin-form target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_target: Option<String>,
    /// HTTP method (absent in the address-only form).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    /// Sender address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub remote_endpoint: Option<RemoteEndpoint>,
    /// Request headers.
    #[serde(
        with = "ordered_headers::opt",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub request_headers: Option<Vec<(String, String)>>,
    /// A binary body message follows (absent in the address-only form).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body: Option<bool>,
}

fn status_code<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u16),
        Str(String),
    }
    match N::deserialize(d)? {
        N::Num(n) => Ok(n),
        N::Str(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

/// `response` (listener → relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseCommand {
    /// The request's id.
    pub request_id: String,
    /// HTTP status (number, or numeric string).
    #[serde(deserialize_with = "status_code")]
    pub status_code: u16,
    /// Reason phrase.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status_description: Option<String>,
    /// Response headers.
    #[serde(
        with = "ordered_headers::opt",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub response_headers: Option<Vec<(String, String)>>,
    /// A binary body message follows.
    #[serde(default)]
    pub body: bool,
}

/// `renewToken` (listener → relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewTokenCommand {
    /// The new token, plain.
    pub token: String,
}

fn invalid(e: serde_json::Error) -> ControlError {
    ControlError::Invalid(e.to_string().chars().take(200).collect())
}

/// Any control command, as it travels: `{"<name>":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerCommand {
    /// A sender waits.
    Accept(AcceptCommand),
    /// An HTTP request.
    Request(RequestCommand),
    /// An HTTP response.
    Response(ResponseCommand),
    /// A fresh token.
    RenewToken(RenewTokenCommand),
}

/// Whether `[`/`{` nesting outside strings stays within [`MAX_DEPTH`].
fn depth_ok(text: &str) -> bool {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

impl ListenerCommand {
    /// The wire name: `accept`, `request`, `response` or `renewToken`.
    pub fn name(&self) -> &'static str {
        match self {
            ListenerCommand::Accept(_) => "accept",
            ListenerCommand::Request(_) => "request",
            ListenerCommand::Response(_) => "response",
            ListenerCommand::RenewToken(_) => "renewToken",
        }
    }

    /// The JSON text (one line, fields in wire order).
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one control message: at most 64 KiB ([`ControlError::TooLarge`]), nesting at most
    /// 32 deep ([`ControlError::TooDeep`]), one object with exactly one property naming a known
    /// command ([`ControlError::UnknownCommand`] otherwise, including `injectFault`), fields of
    /// the right types ([`ControlError::Invalid`]).
    pub fn parse(text: &str) -> Result<ListenerCommand, ControlError> {
        if text.len() > MAX_CONTROL_MESSAGE {
            return Err(ControlError::TooLarge { len: text.len() });
        }
        if !depth_ok(text) {
            return Err(ControlError::TooDeep);
        }
        // First the shape, without building the values: one object, one known property.
        // (Duplicate keys collapse here; the typed pass below then refuses them.)
        let top: BTreeMap<String, IgnoredAny> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                ControlError::Invalid("not a JSON object".into())
            } else {
                invalid(e)
            }
        })?;
        let mut names = top.keys();
        let (Some(name), None) = (names.next(), names.next()) else {
            return Err(ControlError::Invalid(format!(
                "expected one command property, found {}",
                top.len()
            )));
        };
        if !matches!(
            name.as_str(),
            "accept" | "request" | "response" | "renewToken"
        ) {
            return Err(ControlError::UnknownCommand(
                name.chars().take(64).collect(),
            ));
        }
        // Then the typed pass, straight from the text so header order is kept.
        serde_json::from_str(text).map_err(invalid)
    }
}

#[cfg(test)]
mod tests;
