//! Secrets as types: a key or token never prints itself, and comparing MACs is constant-time.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A shared access key: the base64 *text*, which is what gets signed with (protocol.md §3.2).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    /// Wraps key text.
    pub fn new(text: impl Into<String>) -> Self {
        SecretKey(text.into())
    }

    /// The key text, for signing and for rendering connection strings.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A whole `SharedAccessSignature sr=…` token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken(String);

impl SasToken {
    /// Wraps token text.
    pub fn new(s: String) -> Self {
        SasToken(s)
    }

    /// The token text, for a header.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAccessSignature ***")
    }
}

/// Constant-time equality: every byte is compared whatever the first difference.
#[inline(never)]
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// What logs may show of a token: 8 hex digits of its SHA-256.
pub fn token_fingerprint(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let k = SecretKey::new("c2VjcmV0");
        assert_eq!(format!("{k:?} {k}"), "*** ***");
        let t = SasToken::new("SharedAccessSignature sr=x&sig=y".into());
        assert!(!format!("{t:?}").contains("sig"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(token_fingerprint("x").len(), 8);
    }
}
