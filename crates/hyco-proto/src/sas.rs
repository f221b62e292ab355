//! Shared Access Signature tokens (protocol.md §3.1–3.5).
//!
//! The signature covers `sr` exactly as it appears in the token (clients differ in escaping,
//! so `sr` is never re-encoded) plus `"\n"` plus `se`, keyed with the UTF-8 bytes of the key
//! *text*. Parsing is strict and allocation-bounded; verification is constant-time and costs
//! the same for an unknown key name.
//!
//! The relay's order (protocol.md §3.3): [`ParsedToken::parse`], look up the rule named by
//! [`ParsedToken::key_name`], [`ParsedToken::verify_signature`] with its keys (or none),
//! [`ParsedToken::is_expired`], then [`ParsedToken::audience`] and [`Audience::covers`].
//! Time is always a parameter; nothing here reads a clock.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::secret::{constant_time_eq, SasToken, SecretKey};

const PREFIX: &str = "SharedAccessSignature";
const MAX_TOKEN: usize = 4096;
const MAX_FIELDS: usize = 8;

/// What `encodeURIComponent` leaves alone.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Why a token was refused. Messages never contain the signature or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// Longer than 4096 characters.
    #[error("token too long")]
    TooLong,
    /// Does not start with `SharedAccessSignature ` (one space).
    #[error("token must start with 'SharedAccessSignature '")]
    BadPrefix,
    /// A field without `=` (or an empty field).
    #[error("malformed token field")]
    BadField,
    /// More than 8 `&`-separated fields.
    #[error("too many token fields")]
    TooManyFields,
    /// A field given twice.
    #[error("duplicate token field '{0}'")]
    Duplicate(&'static str),
    /// One of sr, sig, se, skn missing.
    #[error("token field '{0}' missing")]
    Missing(&'static str),
    /// `se` is not 1-20 digits fitting in 64 bits.
    #[error("token expiry is not a valid number")]
    BadExpiry,
    /// `sig` is not standard base64 of 32 bytes.
    #[error("token signature is not valid base64")]
    BadSignature,
    /// `skn` empty or over 256 characters.
    #[error("token key name invalid")]
    BadKeyName,
    /// `sr` is empty or does not decode to `scheme://host[/path]`.
    #[error("token audience is not a valid URI")]
    BadAudience,
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; a panic is still safer than a
    // fallback value that could compare equal to an attacker's signature.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Percent-encodes like JavaScript's `encodeURIComponent` (upper-case hex).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// The audience .NET-style clients sign for: `http://{host}/{entity}`, host lower-cased and
/// without its port; `None` gives the namespace root `http://{host}/`.
pub fn resource_uri(host: &str, entity: Option<&str>) -> String {
    let h = host_without_port(host).to_ascii_lowercase();
    match entity {
        Some(e) => format!("http://{h}/{e}"),
        None => format!("http://{h}/"),
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`; a bare IPv6 literal (several colons) is left
/// alone, as is anything whose "port" is not all digits. The relay compares a request's Host
/// with an audience's host through this too, so both lose a port the same way.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.split_once(':') {
        Some((h, p))
            if !p.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            h
        }
        _ => host,
    }
}

/// Host names in audiences: DNS characters, or a bracketed IPv6 literal.
fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Signs a token for `resource_uri`, valid until `expiry_unix`: `sr` and `sig` encoded with
/// [`encode_component`], fields in the order every client uses (`sr, sig, se, skn`).
pub fn sign(resource_uri: &str, key_name: &str, key: &SecretKey, expiry_unix: u64) -> SasToken {
    let sr = encode_component(resource_uri);
    let se = expiry_unix.to_string();
    let sig = hmac(key.expose().as_bytes(), format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(sig);
    SasToken::new(format!(
        "{PREFIX} sr={sr}&sig={}&se={se}&skn={}",
        encode_component(&sig),
        encode_component(key_name)
    ))
}

/// A syntactically valid token, not yet verified. `Debug` omits the signature.
#[derive(Clone)]
pub struct ParsedToken {
    raw_sr: String,
    raw_se: String,
    sig: [u8; 32],
    expiry: u64,
    key_name: String,
}

impl std::fmt::Debug for ParsedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("sr", &self.raw_sr)
            .field("se", &self.expiry)
            .field("skn", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ParsedToken {
    /// Parses a token (already form-decoded once if it came in a query).
    ///
    /// Strict: the prefix `SharedAccessSignature` (any case) and exactly one space; at most
    /// 4096 bytes and 8 fields; field names case-insensitive, each at most once; `sr`, `sig`,
    /// `se`, `skn` required, others ignored; `se` 1–20 ASCII digits fitting `u64`; `sig`
    /// percent-decoded then standard base64 of 32 bytes; `skn` percent-decoded, 1–256
    /// characters; `sr` kept raw for signing.
    pub fn parse(token: &str) -> Result<ParsedToken, SasError> {
        if token.len() > MAX_TOKEN {
            return Err(SasError::TooLong);
        }
        let head = token.get(..PREFIX.len()).ok_or(SasError::BadPrefix)?;
        if !head.eq_ignore_ascii_case(PREFIX) {
            return Err(SasError::BadPrefix);
        }
        let rest = token[PREFIX.len()..]
            .strip_prefix(' ')
            .ok_or(SasError::BadPrefix)?;
        if rest.starts_with(char::is_whitespace) {
            return Err(SasError::BadPrefix);
        }
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for (i, part) in rest.split('&').enumerate() {
            if i >= MAX_FIELDS {
                return Err(SasError::TooManyFields);
            }
            let (k, v) = part.split_once('=').ok_or(SasError::BadField)?;
            let slot = match k.to_ascii_lowercase().as_str() {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                _ => continue,
            };
            if slot.0.is_some() {
                return Err(SasError::Duplicate(slot.1));
            }
            *slot.0 = Some(v);
        }
        let raw_sr = sr.ok_or(SasError::Missing("sr"))?;
        if raw_sr.is_empty() {
            return Err(SasError::BadAudience);
        }
        let sig = sig.ok_or(SasError::Missing("sig"))?;
        let se = se.ok_or(SasError::Missing("se"))?;
        let skn = skn.ok_or(SasError::Missing("skn"))?;
        if se.is_empty() || se.len() > 20 || !se.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SasError::BadExpiry);
        }
        let expiry: u64 = se.parse().map_err(|_| SasError::BadExpiry)?;
        let sig_text = percent_decode_str(sig)
            .decode_utf8()
            .map_err(|_| SasError::BadSignature)?;
        let sig_bytes = base64::engine::general_purpose::STANDARD
            .decode(sig_text.as_bytes())
            .map_err(|_| SasError::BadSignature)?;
        let sig: [u8; 32] = sig_bytes.try_into().map_err(|_| SasError::BadSignature)?;
        let key_name = percent_decode_str(skn)
            .decode_utf8()
            .map_err(|_| SasError::BadKeyName)?
            .into_owned();
        if key_name.is_empty() || key_name.chars().count() > 256 {
            return Err(SasError::BadKeyName);
        }
        Ok(ParsedToken {
            raw_sr: raw_sr.to_owned(),
            raw_se: se.to_owned(),
            sig,
            expiry,
            key_name,
        })
    }

    /// The rule name (`skn`).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// Expiry, seconds since the epoch.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// `sr` as received (still percent-encoded): what was signed.
    pub fn raw_resource(&self) -> &str {
        &self.raw_sr
    }

    /// The audience: `sr` percent-decoded once, then normalised by [`Audience::parse`].
    pub fn audience(&self) -> Result<Audience, SasError> {
        let decoded = percent_decode_str(&self.raw_sr)
            .decode_utf8()
            .map_err(|_| SasError::BadAudience)?;
        Audience::parse(&decoded)
    }

    /// Whether one of `keys` signed this token. Constant-time; every key is tried, and with no
    /// keys two dummy HMACs are still computed (a rule has two keys), so an unknown key name
    /// costs what a known one with a bad signature does (attacks A7).
    pub fn verify_signature(&self, keys: &[&SecretKey]) -> bool {
        let msg = format!("{}\n{}", self.raw_sr, self.raw_se);
        if keys.is_empty() {
            for dummy_key in [&b"hyco-dummy-primary"[..], b"hyco-dummy-secondary"] {
                let dummy = hmac(dummy_key, msg.as_bytes());
                let _ = constant_time_eq(&dummy, &self.sig);
            }
            return false;
        }
        let mut ok = false;
        for k in keys {
            let expected = hmac(k.expose().as_bytes(), msg.as_bytes());
            ok |= constant_time_eq(&expected, &self.sig);
        }
        ok
    }

    /// Expired when `now >= se + grace` (saturating, so a huge `se` never wraps).
    pub fn is_expired(&self, now_unix: u64, grace_secs: u64) -> bool {
        now_unix >= self.expiry.saturating_add(grace_secs)
    }
}

/// A token audience, normalised: scheme ignored; host lower-case without port; path segments
/// lower-case, without a leading `$hc` and without empty segments (so `http://h/hyco/`,
/// `http://h:443/hyco` and `sb://h/hyco` are the same audience).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    host: String,
    segments: Vec<String>,
}

impl Audience {
    /// Parses a decoded audience URI `scheme://host[:port][/path][?query][#fragment]`. Any
    /// alphabetic scheme is accepted (`http`, `https`, `sb`, `ws`, `wss` all occur); query and
    /// fragment are dropped; `.` and `..` segments and user-info are refused.
    pub fn parse(decoded_uri: &str) -> Result<Audience, SasError> {
        let (scheme, rest) = decoded_uri.split_once("://").ok_or(SasError::BadAudience)?;
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(SasError::BadAudience);
        }
        let rest = match rest.find(['?', '#']) {
            Some(i) => &rest[..i],
            None => rest,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let host = host_without_port(authority).to_ascii_lowercase();
        if !valid_host(&host) {
            return Err(SasError::BadAudience);
        }
        let mut segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if segments.first().is_some_and(|s| s == "$hc") {
            segments.remove(0);
        }
        if segments
            .iter()
            .any(|s| s == "." || s == ".." || s.chars().any(char::is_control))
        {
            return Err(SasError::BadAudience);
        }
        Ok(Audience { host, segments })
    }

    /// The host, lower-case, without port (IPv6 literals keep their brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The path segments, lower-case; empty for the namespace root.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// A token for the namespace root covers every entity.
    pub fn is_namespace_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// Whether the audience covers `entity` on `host`. The host compares case-insensitively
    /// and a `:port` on `host` is ignored; the audience path must be a prefix of the entity's
    /// lower-cased segments on segment boundaries (`hc1` covers `hc1` and `hc1/sub`, not
    /// `hc10`); the namespace root covers every entity. `entity` may go on into the request's
    /// path (a token signed for the whole URL, as Java's client makes); segments compare
    /// percent-decoded on both sides, so `extra%20Path` and `extra Path` are the same.
    pub fn covers(&self, host: &str, entity: &str) -> bool {
        if !host_without_port(host).eq_ignore_ascii_case(&self.host) {
            return false;
        }
        let decoded = |s: &str| -> String {
            percent_decode_str(s)
                .decode_utf8_lossy()
                .to_ascii_lowercase()
        };
        let target: Vec<String> = entity
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decoded)
            .collect();
        self.segments.len() <= target.len()
            && self
                .segments
                .iter()
                .zip(&target)
                .all(|(a, b)| decoded(a) == *b)
    }
}

#[cfg(test)]
mod tests;
