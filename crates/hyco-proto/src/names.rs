//! Names of hybrid connections and shared access rules, and how they go into a URL.
//!
//! A name is one path segment of the management API (issue 15 §3): `..` as a rule name once
//! made `DELETE …/hybridconnections/hca/authorizationrules/..` delete `hca`, because clients
//! and proxies collapse dot segments. So names follow Azure's rules, dot segments are refused
//! everywhere, and every segment is percent-encoded on the way out ([`encode_segment`]) and
//! decoded once on the way in ([`decode_segment`]).
//!
//! Azure's rules, from Microsoft's ARM template reference (learn.microsoft.com, "Microsoft.Relay
//! namespaces/hybridConnections" and "namespaces/hybridConnections/authorizationRules", API
//! version 2017-04-01, "Property values"):
//! * hybrid connection: 1–260 characters; letters, digits, periods, hyphens, underscores and
//!   slashes; starts and ends with a letter or digit;
//! * authorization rule: 1–50 characters; letters, digits, periods, hyphens and underscores;
//!   starts and ends with a letter or digit.
//!
//! New names must follow them ([`validate_rule_name`], [`validate_hc_name`]). Names that earlier
//! versions allowed (rules of up to 256 of those characters, hybrid connections ending in `.`,
//! `-` or `_`) stay addressable, so they can still be shown and deleted ([`check_rule_ref`],
//! [`check_hc_ref`]); `.` and `..` never are.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Longest rule name Azure allows.
pub const MAX_RULE_NAME: usize = 50;

/// Longest rule name earlier versions created (still addressable).
const MAX_LEGACY_RULE_NAME: usize = 256;

/// Azure's rule for new rule names, as error messages state it.
pub const RULE_NAME_RULE: &str = "a rule name is 1 to 50 letters, digits, '.', '-' or '_', starting and ending with a letter or digit";

/// Azure's rule for new hybrid connection names, as error messages state it.
pub const HC_NAME_RULE: &str = "a hybrid connection name is 1 to 260 letters, digits, '.', '-', '_' or '/', starting and ending with a letter or digit, each '/'-separated part starting with a letter or digit";

/// What URL path segments leave as they are: RFC 3986 unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a name was refused; the message states the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// `.` or `..`: a dot segment, which URL handling collapses into the parent path.
    #[error("'{0}' is a dot segment, never a name: {1}")]
    DotSegment(&'static str, &'static str),
    /// Outside the naming rule.
    #[error("{0}")]
    Rule(&'static str),
    /// A path segment whose percent-encoding does not decode to UTF-8.
    #[error("a path segment is not UTF-8 once percent-decoded")]
    NotUtf8,
}

fn alnum(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric())
}

fn dot_segment(name: &str, rule: &'static str) -> Result<(), NameError> {
    match name {
        "." => Err(NameError::DotSegment(".", rule)),
        ".." => Err(NameError::DotSegment("..", rule)),
        _ => Ok(()),
    }
}

/// Characters of a rule name.
fn rule_chars(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A new rule's name, by Azure's rule.
pub fn validate_rule_name(name: &str) -> Result<(), NameError> {
    dot_segment(name, RULE_NAME_RULE)?;
    if name.is_empty()
        || name.len() > MAX_RULE_NAME
        || !rule_chars(name)
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        return Err(NameError::Rule(RULE_NAME_RULE));
    }
    Ok(())
}

/// A rule name to look up: Azure's characters (up to 256 of them, as earlier versions allowed),
/// never `.` or `..`.
pub fn check_rule_ref(name: &str) -> Result<(), NameError> {
    dot_segment(name, RULE_NAME_RULE)?;
    if name.is_empty() || name.len() > MAX_LEGACY_RULE_NAME || !rule_chars(name) {
        return Err(NameError::Rule(RULE_NAME_RULE));
    }
    Ok(())
}

/// A new hybrid connection's name, by Azure's rule (and `$hc` reserved).
pub fn validate_hc_name(name: &str) -> Result<(), NameError> {
    check_hc_ref(name)?;
    if !alnum(name.chars().last()) {
        return Err(NameError::Rule(HC_NAME_RULE));
    }
    Ok(())
}

/// A hybrid connection name to look up: what [`crate::address::validate_entity_name`] allows
/// (no segment is `.` or `..`: each starts with a letter or digit).
pub fn check_hc_ref(name: &str) -> Result<(), NameError> {
    for part in name.split('/') {
        dot_segment(part, HC_NAME_RULE)?;
    }
    crate::address::validate_entity_name(name).map_err(|_| NameError::Rule(HC_NAME_RULE))
}

/// A name as one URL path segment: everything but RFC 3986 unreserved characters
/// percent-encoded (`/` too, so `db/prod` stays one segment).
pub fn encode_segment(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// One URL path segment as a name: percent-decoded once, UTF-8 required.
pub fn decode_segment(segment: &str) -> Result<String, NameError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| NameError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_follow_azure() {
        for ok in [
            "a",
            "RootManageSharedAccessKey",
            "a.b-c_d",
            "9",
            &"a".repeat(50),
        ] {
            assert_eq!(validate_rule_name(ok), Ok(()), "{ok}");
            assert_eq!(check_rule_ref(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "...",
            "-a",
            "a-",
            "_a",
            "a.",
            "a/b",
            "a%2Fb",
            "a?b",
            "a#b",
            "a b",
            "é",
            "a\u{0}",
            &"a".repeat(51),
        ] {
            assert!(validate_rule_name(bad).is_err(), "{bad}");
        }
        // Names earlier versions created stay addressable; dot segments never are.
        for legacy in ["-a", "a.", "...", &"a".repeat(256)] {
            assert_eq!(check_rule_ref(legacy), Ok(()), "{legacy}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(257)] {
            assert!(check_rule_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_rule_name("..").unwrap_err().to_string(),
            format!("'..' is a dot segment, never a name: {RULE_NAME_RULE}")
        );
    }

    #[test]
    fn hc_names_follow_azure() {
        for ok in ["hyco", "db/prod-1", "A.b_c-d", "9", &"a".repeat(260)] {
            assert_eq!(validate_hc_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/..",
            "a/.",
            "a-",
            "a.",
            "$hc",
            "a b",
            "a?b",
            "a#b",
            "a%2Fb",
            "é",
            "/a",
            "a/",
            &"a".repeat(261),
        ] {
            assert!(validate_hc_name(bad).is_err(), "{bad}");
        }
        assert_eq!(check_hc_ref("a-"), Ok(()));
        assert!(check_hc_ref("..").is_err());
    }

    #[test]
    fn segments_round_trip_and_never_hold_a_separator() {
        for name in [
            "a", "db/prod", "a b", "a%2Fb", "a?b#c", "é/ü", "..", "~x_y.z-",
        ] {
            let seg = encode_segment(name);
            assert!(!seg.contains(['/', '?', '#', ' ']), "{seg}");
            assert_eq!(decode_segment(&seg).unwrap(), name);
        }
        assert_eq!(encode_segment("db/prod"), "db%2Fprod");
        assert_eq!(encode_segment("a%2Fb"), "a%252Fb");
        assert_eq!(decode_segment("%FF"), Err(NameError::NotUtf8));
    }
}
