//! Text from outside (ids, endpoint metadata, header values, reasons) on its way to a log line,
//! a terminal or a page: [`Escaped`] shows it with every control character written as an
//! escape, so it can neither end a log line, start a forged one, nor drive a terminal.
//!
//! Escaped are the C0 and C1 controls and DEL (`\r`, `\n`, `\t` by name, others as `\x1b` or
//! `\u{85}`), and the Unicode line and paragraph separators and bidirectional controls (as
//! `\u{2028}`), which some viewers treat as line breaks or use to reorder what is shown. Every
//! other character, backslashes included, is kept as it is.

use std::fmt;

/// Whether `c` is written as an escape by [`Escaped`].
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
        )
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Displays a string with its control characters escaped (see the module documentation).
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x80 => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `s` with its control characters escaped, as an owned string.
pub fn escaped(s: &str) -> String {
    Escaped(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escaped("ID\r\n2026 INFO FORGED\x1b[2J"),
            "ID\\r\\n2026 INFO FORGED\\x1b[2J"
        );
        assert_eq!(
            escaped("evil\r\nFAKE LINE\x1b[31m"),
            "evil\\r\\nFAKE LINE\\x1b[31m"
        );
        assert_eq!(escaped("a\tb\0c\x7f"), "a\\tb\\x00c\\x7f");
        assert_eq!(
            escaped("x\u{85}y\u{2028}z\u{202e}"),
            "x\\u{85}y\\u{2028}z\\u{202e}"
        );
        assert_eq!(escaped("plain é ✓ \\n"), "plain é ✓ \\n");
        assert_eq!(escaped(""), "");
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let e = escaped(&c.to_string());
            assert!(!e.chars().any(needs_escape), "{c:?} -> {e:?}");
        }
    }
}
