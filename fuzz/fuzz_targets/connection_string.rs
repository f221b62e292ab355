//! Connection strings (protocol.md §3.7): `ConnectionString::parse` and `render`.
//!
//! Properties beyond "no panic":
//! * render → parse gives back the same value (minus `OperationTimeout`, which is not
//!   rendered), and rendering is a fixed point;
//! * the text of a refusal and the `Debug` of a success do not depend on the secrets: the
//!   input with every `SharedAccessKey` / `SharedAccessSignature` value altered (letters and
//!   digits shifted, everything else kept) prints the same.
#![no_main]

use hyco_proto::ConnectionString;
use libfuzzer_sys::fuzz_target;

/// Shifts ASCII letters and digits by one within their class; keeps every other character, so
/// the altered value is the same shape (length, spaces, separators) as the original.
fn shift(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            c if c.is_ascii_alphanumeric() => (c as u8 + 1) as char,
            c => c,
        })
        .collect()
}

/// The input with each secret value shifted, split the way the parser splits (on `;`, then on
/// the first `=`). A signature keeps its `SharedAccessSignature ` prefix, which is checked.
fn with_secrets_altered(s: &str) -> String {
    s.split(';')
        .map(|part| {
            let Some((k, v)) = part.split_once('=') else {
                return part.to_owned();
            };
            let key = k.trim().to_ascii_lowercase();
            if key == "sharedaccesskey" {
                format!("{k}={}", shift(v))
            } else if key == "sharedaccesssignature" {
                let cut = v
                    .char_indices()
                    .map(|(i, _)| i)
                    .find(|&i| {
                        v[..i]
                            .trim_start()
                            .eq_ignore_ascii_case("SharedAccessSignature ")
                    })
                    .unwrap_or(v.len());
                format!("{k}={}{}", &v[..cut], shift(&v[cut..]))
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ConnectionString::parse(text);
    let altered = ConnectionString::parse(&with_secrets_altered(text));
    match (&parsed, &altered) {
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "error shows a secret"),
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "Debug shows a secret"),
        _ => panic!("a secret's letters changed the outcome: {parsed:?} / {altered:?}"),
    }
    if let Ok(cs) = parsed {
        let rendered = cs.render();
        let back = ConnectionString::parse(&rendered).expect("what we render parses");
        let mut expected = cs.clone();
        expected.operation_timeout = None;
        assert!(back == expected, "{rendered:?}: {back:?} != {expected:?}");
        assert_eq!(back.render(), rendered);
        let _ = cs.endpoint.port_or_default();
        let other = cs.with_entity("other/hc");
        assert_eq!(other.entity_path.as_deref(), Some("other/hc"));
    }
});
