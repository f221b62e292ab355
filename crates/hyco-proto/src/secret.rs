//! Secrets as types: a key or token never prints itself, and comparing MACs is constant-time.
//!
//! [`SecretKey`] holds a shared access key's base64 *text* (what gets signed with,
//! protocol.md §3.2), [`SasToken`] a whole `SharedAccessSignature …` string. Both print as
//! `***`, both are wiped from memory when dropped. Logs may show a token only through
//! [`token_fingerprint`].

use std::fmt;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A shared access key: the base64 *text*, which is what gets signed with (protocol.md §3.2).
///
/// `Debug` and `Display` print `***`; equality is constant-time; the text is zeroed on drop.
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    /// Wraps key text.
    pub fn new(text: impl Into<String>) -> Self {
        SecretKey(text.into())
    }

    /// A new key from 32 random bytes: their standard base64, 44 characters (Azure's shape).
    /// The caller supplies the randomness so this crate stays free of I/O.
    pub fn generate_from(random32: [u8; 32]) -> Self {
        let mut bytes = random32;
        let key = SecretKey(base64::engine::general_purpose::STANDARD.encode(bytes));
        bytes.zeroize();
        key
    }

    /// The key text, for signing and for rendering connection strings.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for SecretKey {}

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

/// A whole `SharedAccessSignature sr=…` token (a bearer credential).
///
/// `Debug` and `Display` print `SharedAccessSignature ***`; the text is zeroed on drop.
#[derive(Clone)]
pub struct SasToken(String);

impl SasToken {
    /// Wraps token text.
    pub fn new(s: String) -> Self {
        SasToken(s)
    }

    /// The token text, for a header or a query.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for SasToken {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for SasToken {}

impl Drop for SasToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAccessSignature ***")
    }
}

impl fmt::Display for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAccessSignature ***")
    }
}

/// Constant-time equality: every byte is compared whatever the first difference. Only the
/// lengths (which are public for MACs) can end the comparison early.
#[inline(never)]
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// What logs may show of a token: the first 8 hex digits of its SHA-256.
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
        assert_eq!(format!("{t:?}"), "SharedAccessSignature ***");
        assert_eq!(t.to_string(), "SharedAccessSignature ***");
        assert_eq!(t.as_str(), "SharedAccessSignature sr=x&sig=y");
    }

    #[test]
    fn constant_time_compare_and_fingerprint() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
        // SHA-256("x") = 2d711642…
        assert_eq!(token_fingerprint("x"), "2d711642");
        assert_eq!(SecretKey::new("a"), SecretKey::new("a"));
        assert_ne!(SecretKey::new("a"), SecretKey::new("b"));
    }

    #[test]
    fn generated_keys_have_azure_shape() {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        let k = SecretKey::generate_from(bytes);
        assert_eq!(k.expose(), "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        assert_eq!(SecretKey::generate_from([0xff; 32]).expose().len(), 44);
    }
}
