//! Rights a rule grants: any subset of Listen, Send, Manage (protocol.md §3.6).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of rights.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Rights {
    /// May open control channels.
    pub listen: bool,
    /// May connect as a sender.
    pub send: bool,
    /// May manage; implies Listen and Send.
    pub manage: bool,
}

/// A right an operation needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// Listen.
    Listen,
    /// Send.
    Send,
    /// Manage.
    Manage,
}

/// A rights list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RightsError {
    /// Nothing given.
    #[error("no rights given (use listen, send, manage)")]
    Empty,
    /// A word that is not a right.
    #[error("unknown right '{0}' (use listen, send, manage)")]
    Unknown(String),
}

impl Rights {
    /// All three.
    pub const ALL: Rights = Rights {
        listen: true,
        send: true,
        manage: true,
    };

    /// Parses `listen,send` (case-insensitive, spaces allowed).
    pub fn parse_list(s: &str) -> Result<Rights, RightsError> {
        let mut r = Rights::default();
        let mut any = false;
        for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            any = true;
            match w.to_ascii_lowercase().as_str() {
                "listen" => r.listen = true,
                "send" => r.send = true,
                "manage" => r.manage = true,
                _ => return Err(RightsError::Unknown(w.chars().take(32).collect())),
            }
        }
        if any {
            Ok(r)
        } else {
            Err(RightsError::Empty)
        }
    }

    /// Whether these rights cover `need` (Manage implies Listen and Send).
    pub fn allows(&self, need: Need) -> bool {
        match need {
            Need::Listen => self.listen || self.manage,
            Need::Send => self.send || self.manage,
            Need::Manage => self.manage,
        }
    }

    fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.listen {
            v.push("Listen");
        }
        if self.send {
            v.push("Send");
        }
        if self.manage {
            v.push("Manage");
        }
        v
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

impl Serialize for Rights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Rights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        Rights::parse_list(&v.join(",")).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_serde() {
        let r = Rights::parse_list("Listen, send").unwrap();
        assert!(r.listen && r.send && !r.manage);
        assert_eq!(
            Rights::parse_list("listen,fly"),
            Err(RightsError::Unknown("fly".into()))
        );
        assert_eq!(Rights::parse_list(" , "), Err(RightsError::Empty));
        assert_eq!(
            serde_json::to_string(&Rights::ALL).unwrap(),
            r#"["Listen","Send","Manage"]"#
        );
        let back: Rights = serde_json::from_str(r#"["manage"]"#).unwrap();
        assert!(back.allows(Need::Send) && back.allows(Need::Listen));
        assert!(!r.allows(Need::Manage));
    }
}
