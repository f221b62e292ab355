//! SAS tokens (protocol.md §3): `ParsedToken::parse`, signature check with a fixed key,
//! audience parsing and coverage, and the rights list.
//!
//! Properties beyond "no panic":
//! * a refusal carries no text of the input: every `SasError` prints one of its fixed messages;
//! * a parsed token's `Debug` does not depend on its signature;
//! * sign → parse → verify round-trips for any resource, key name and expiry taken from the
//!   input, the audience of the signed token is `Audience::parse` of the resource, and another
//!   key does not verify it;
//! * `Audience::covers` accepts every entity whose segments extend the audience's own.
#![no_main]

use hyco_proto::sas::{self, Audience, ParsedToken};
use hyco_proto::{Rights, SasError, SecretKey};
use libfuzzer_sys::fuzz_target;

/// protocol.md §3.8, vector 1.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "Jj3g/w48YCk26egSP4G+GshXq1dARFG0V5YNpLzKrI0=";

/// Every message a `SasError` can print.
fn fixed_messages() -> Vec<String> {
    [
        SasError::TooLong,
        SasError::BadPrefix,
        SasError::BadField,
        SasError::TooManyFields,
        SasError::Duplicate("sr"),
        SasError::Duplicate("sig"),
        SasError::Duplicate("se"),
        SasError::Duplicate("skn"),
        SasError::Missing("sr"),
        SasError::Missing("sig"),
        SasError::Missing("se"),
        SasError::Missing("skn"),
        SasError::BadExpiry,
        SasError::BadSignature,
        SasError::BadKeyName,
        SasError::BadAudience,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// The token with the value of its `sig` field replaced by another well-formed signature.
fn with_other_signature(token: &str) -> Option<String> {
    let (head, rest) = token.split_at_checked("SharedAccessSignature ".len())?;
    let fields: Vec<String> = rest
        .split('&')
        .map(|f| match f.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("sig") => {
                format!("{k}=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s%3D")
            }
            _ => f.to_owned(),
        })
        .collect();
    Some(format!("{head}{}", fields.join("&")))
}

fn check_parse(text: &str, key: &SecretKey) {
    match ParsedToken::parse(text) {
        Err(e) => {
            let msg = e.to_string();
            assert!(fixed_messages().contains(&msg), "{msg:?}");
        }
        Ok(t) => {
            let _ = t.verify_signature(&[key]);
            let _ = t.verify_signature(&[]);
            let _ = t.is_expired(0, u64::MAX);
            let _ = t.is_expired(u64::MAX, u64::MAX);
            if let Ok(a) = t.audience() {
                let entity = a.segments().join("/");
                assert!(a.covers(a.host(), &entity), "{a:?}");
                assert!(a.covers(&format!("{}:443", a.host()), &format!("{entity}/x")));
            }
            // Debug never shows the signature: swapping it changes nothing printed.
            let other = with_other_signature(text).expect("a parsed token has the prefix");
            let t2 = ParsedToken::parse(&other).expect("same fields, valid signature");
            assert_eq!(format!("{t:?}"), format!("{t2:?}"));
        }
    }
}

fn check_sign(data: &[u8], key: &SecretKey, other: &SecretKey) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // resource \n key name \n expiry
    let mut parts = text.splitn(3, '\n');
    let (Some(resource), Some(name)) = (parts.next(), parts.next()) else {
        return;
    };
    let expiry = parts
        .next()
        .and_then(|e| e.parse::<u64>().ok())
        .unwrap_or(1);
    let token = sas::sign(resource, name, key, expiry);
    let parsed = ParsedToken::parse(token.as_str());
    let acceptable = !resource.is_empty()
        && !name.is_empty()
        && name.chars().count() <= 256
        && token.as_str().len() <= 4096;
    let Ok(t) = parsed else {
        assert!(!acceptable, "{parsed:?} for {resource:?} / {name:?}");
        return;
    };
    assert!(acceptable, "{t:?}");
    assert!(t.verify_signature(&[key]));
    assert!(t.verify_signature(&[other, key]));
    assert!(!t.verify_signature(&[other]));
    assert_eq!(t.key_name(), name);
    assert_eq!(t.expiry(), expiry);
    assert_eq!(t.raw_resource(), sas::encode_component(resource));
    assert_eq!(t.audience(), Audience::parse(resource));
}

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::new(KEY);
    let other = SecretKey::new(OTHER_KEY);
    let text = String::from_utf8_lossy(data);
    check_parse(&text, &key);
    check_sign(data, &key, &other);
    let _ = Audience::parse(&text);
    let _ = sas::resource_uri(&text, Some("hyco"));
    if let Ok(r) = Rights::parse_list(&text) {
        assert_eq!(Rights::parse_list(&r.to_string()), Ok(r), "{r}");
    }
});
