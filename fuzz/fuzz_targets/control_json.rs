//! Control-channel messages (protocol.md §4): `ListenerCommand::parse` and `to_json`.
//!
//! Properties beyond "no panic":
//! * parse → to_json → parse gives back the same command, and `to_json` is a fixed point;
//! * the JSON written has exactly one top-level property, the command's `name()`;
//! * nothing over 64 KiB is accepted, and `TooLarge` reports the real length;
//! * an unknown command's name is cut to 64 characters in the error.
#![no_main]

use hyco_proto::control::{ListenerCommand, MAX_CONTROL_MESSAGE};
use hyco_proto::ControlError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ListenerCommand::parse(text) {
        Ok(cmd) => {
            assert!(text.len() <= MAX_CONTROL_MESSAGE);
            let json = cmd.to_json();
            let prefix = format!("{{\"{}\":", cmd.name());
            assert!(json.starts_with(&prefix), "{json}");
            let back = ListenerCommand::parse(&json);
            if json.len() <= MAX_CONTROL_MESSAGE {
                assert_eq!(back.as_ref(), Ok(&cmd), "{json}");
                assert_eq!(cmd.to_json(), json);
            } else {
                // Escaping can make the text longer than what came in.
                assert_eq!(back, Err(ControlError::TooLarge { len: json.len() }));
            }
        }
        Err(ControlError::TooLarge { len }) => {
            assert_eq!(len, text.len());
            assert!(len > MAX_CONTROL_MESSAGE);
        }
        Err(ControlError::UnknownCommand(name)) => assert!(name.chars().count() <= 64),
        Err(ControlError::Invalid(why)) => assert!(why.chars().count() <= 200),
        Err(ControlError::TooDeep) => {}
    }
});
