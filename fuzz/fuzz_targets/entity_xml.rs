//! The entity description (protocol.md §6): `parse_entity_atom` and `parse_endpoint_metadata`.
//!
//! Properties beyond "no panic":
//! * a parsed description rendered with `render_entity_atom` parses back to itself (what the
//!   relay serves, the manager reads the same);
//! * parsed endpoint metadata rendered with `endpoint_metadata` parses back to itself;
//! * error texts are bounded (they quote at most a short piece of the input).
#![no_main]

use hyco_proto::entity::{
    endpoint_metadata, parse_endpoint_metadata, parse_entity_atom, render_entity_atom, MAX_ATOM,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_entity_atom(text) {
        Ok(d) => {
            let xml = render_entity_atom("https://relay.example/hc?api-version=2016-07", &d);
            if xml.len() <= MAX_ATOM {
                let back = parse_entity_atom(&xml);
                assert_eq!(back.as_ref(), Ok(&d), "{xml}");
            }
        }
        Err(e) => assert!(e.to_string().chars().count() <= 300, "{e}"),
    }
    match parse_endpoint_metadata(text) {
        Ok(hp) => {
            let json = endpoint_metadata(&hp);
            assert_eq!(parse_endpoint_metadata(&json), Ok(hp), "{json}");
        }
        Err(e) => assert!(e.to_string().chars().count() <= 300, "{e}"),
    }
});
