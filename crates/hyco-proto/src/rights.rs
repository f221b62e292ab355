//! Rights a rule grants: any subset of Listen, Send, Manage (protocol.md §3.6).
//!
//! Serialized as ARM does it, an array such as `["Listen","Send"]`; displayed as
//! `Listen, Send`. Manage implies Listen and Send when checking what an operation needs.

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

    /// Only Listen.
    pub const LISTEN: Rights = Rights {
        listen: true,
        send: false,
        manage: false,
    };

    /// Only Send.
    pub const SEND: Rights = Rights {
        listen: false,
        send: true,
        manage: false,
    };

    /// Parses a comma-separated list such as `listen,send` or `Listen, Send, Manage`
    /// (case-insensitive). An empty list or an unknown word is an error naming it.
    pub fn parse_list(s: &str) -> Result<Rights, RightsError> {
        let mut r = Rights::default();
        let mut any = false;
        for w in s.split(',').map(str::trim) {
            if w.is_empty() {
                continue;
            }
            any = true;
            r.add_word(w)?;
        }
        if any {
            Ok(r)
        } else {
            Err(RightsError::Empty)
        }
    }

    fn add_word(&mut self, w: &str) -> Result<(), RightsError> {
        if w.eq_ignore_ascii_case("listen") {
            self.listen = true;
        } else if w.eq_ignore_ascii_case("send") {
            self.send = true;
        } else if w.eq_ignore_ascii_case("manage") {
            self.manage = true;
        } else {
            return Err(RightsError::Unknown(w.chars().take(32).collect()));
        }
        Ok(())
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
        // Element by element, so `["Listen,Send"]` is not smuggled in as two rights and an
        // empty array round-trips as no rights (the caller decides whether that is allowed).
        let names: Vec<String> = Vec::deserialize(d)?;
        let mut r = Rights::default();
        for name in &names {
            r.add_word(name.trim()).map_err(serde::de::Error::custom)?;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_list_forms() {
        let r = Rights::parse_list("Listen, send").unwrap();
        assert!(r.listen && r.send && !r.manage);
        assert_eq!(Rights::parse_list("Listen, Send, Manage"), Ok(Rights::ALL));
        assert_eq!(Rights::parse_list("LISTEN"), Ok(Rights::LISTEN));
        assert_eq!(Rights::parse_list("send,"), Ok(Rights::SEND));
        assert_eq!(
            Rights::parse_list("listen,fly"),
            Err(RightsError::Unknown("fly".into()))
        );
        assert_eq!(Rights::parse_list(" , "), Err(RightsError::Empty));
        assert_eq!(Rights::parse_list(""), Err(RightsError::Empty));
        assert!(Rights::parse_list("listen send").is_err());
        let long = Rights::parse_list(&"x".repeat(1000)).unwrap_err();
        assert!(long.to_string().len() < 100);
    }

    #[test]
    fn manage_implies_listen_and_send() {
        let m = Rights {
            manage: true,
            ..Rights::default()
        };
        assert!(m.allows(Need::Listen) && m.allows(Need::Send) && m.allows(Need::Manage));
        assert!(Rights::LISTEN.allows(Need::Listen));
        assert!(!Rights::LISTEN.allows(Need::Send));
        assert!(!Rights::SEND.allows(Need::Manage));
        assert!(!Rights::default().allows(Need::Listen));
    }

    #[test]
    fn serde_and_display() {
        assert_eq!(
            serde_json::to_string(&Rights::ALL).unwrap(),
            r#"["Listen","Send","Manage"]"#
        );
        assert_eq!(Rights::ALL.to_string(), "Listen, Send, Manage");
        assert_eq!(Rights::SEND.to_string(), "Send");
        let back: Rights = serde_json::from_str(r#"["manage","LISTEN"]"#).unwrap();
        assert!(back.manage && back.listen && !back.send);
        let none: Rights = serde_json::from_str("[]").unwrap();
        assert_eq!(none, Rights::default());
        assert_eq!(
            serde_json::from_str::<Rights>(&serde_json::to_string(&none).unwrap()).unwrap(),
            none
        );
        assert!(serde_json::from_str::<Rights>(r#"["Listen,Send"]"#).is_err());
        assert!(serde_json::from_str::<Rights>(r#"["fly"]"#).is_err());
        assert!(serde_json::from_str::<Rights>(r#""Listen""#).is_err());
    }
}
