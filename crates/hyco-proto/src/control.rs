//! Control-channel messages (protocol.md §4): one JSON object per text message, with exactly one
//! top-level property naming the command.

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
    /// Request id.
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

/// Any control command.
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
    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one control message, within the size and depth limits.
    pub fn parse(text: &str) -> Result<ListenerCommand, ControlError> {
        if text.len() > MAX_CONTROL_MESSAGE {
            return Err(ControlError::TooLarge { len: text.len() });
        }
        if !depth_ok(text) {
            return Err(ControlError::TooDeep);
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ControlError::Invalid("not a JSON object".into()))?;
        if obj.len() != 1 {
            return Err(ControlError::Invalid(format!(
                "expected one command property, found {}",
                obj.len()
            )));
        }
        let name = obj.keys().next().cloned().unwrap_or_default();
        if !matches!(
            name.as_str(),
            "accept" | "request" | "response" | "renewToken"
        ) {
            return Err(ControlError::UnknownCommand(
                name.chars().take(64).collect(),
            ));
        }
        serde_json::from_value(v).map_err(|e| ControlError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_serializes_in_wire_order() {
        let a = ListenerCommand::Accept(AcceptCommand {
            address: "wss://h/$hc/e?sb-hc-action=accept".into(),
            id: "1".into(),
            connect_headers: vec![
                ("Host".into(), "h".into()),
                ("Sec-WebSocket-Key".into(), "k".into()),
            ],
            remote_endpoint: Some(RemoteEndpoint {
                address: "127.0.0.1".into(),
                port: 5,
            }),
        });
        let j = a.to_json();
        assert_eq!(
            j,
            r#"{"accept":{"address":"wss://h/$hc/e?sb-hc-action=accept","id":"1","connectHeaders":{"Host":"h","Sec-WebSocket-Key":"k"},"remoteEndpoint":{"address":"127.0.0.1","port":5}}}"#
        );
        assert_eq!(ListenerCommand::parse(&j).unwrap(), a);
    }

    #[test]
    fn responses_of_each_client_parse() {
        for j in [
            r#"{"response":{"body":true,"requestId":"r","responseHeaders":{"A":"b"},"statusCode":200,"statusDescription":"OK"}}"#,
            r#"{"response":{"requestId":"r","body":true,"statusCode":200,"statusDescription":"OK","responseHeaders":{"A":"b"}}}"#,
            r#"{"response":{"requestId":"r","statusCode":"200","statusDescription":"OK","responseHeaders":{"A":"b"},"body":true}}"#,
        ] {
            match ListenerCommand::parse(j).unwrap() {
                ListenerCommand::Response(r) => {
                    assert_eq!(r.status_code, 200);
                    assert!(r.body);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            ListenerCommand::parse(
                r#"{"response":{"requestId":"r","statusCode":"abc","body":false}}"#
            ),
            Err(ControlError::Invalid(_))
        ));
    }

    #[test]
    fn limits_and_unknowns() {
        let big = format!(r#"{{"renewToken":{{"token":"{}"}}}}"#, "a".repeat(70_000));
        assert!(matches!(
            ListenerCommand::parse(&big),
            Err(ControlError::TooLarge { .. })
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(ListenerCommand::parse(&deep), Err(ControlError::TooDeep));
        assert_eq!(
            ListenerCommand::parse(r#"{"foo":{}}"#),
            Err(ControlError::UnknownCommand("foo".into()))
        );
        assert!(ListenerCommand::parse(r#"{"a":1,"b":2}"#).is_err());
        assert!(matches!(
            ListenerCommand::parse(r#"{"renewToken":{"token":"SharedAccessSignature x"}}"#),
            Ok(ListenerCommand::RenewToken(_))
        ));
    }
}
