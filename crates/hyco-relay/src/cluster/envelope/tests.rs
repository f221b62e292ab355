//! The envelope and its replay window, on wire forms sealed here. Each test names the check it
//! stands for; without that check in `open` it fails.

use super::*;

const KEY: &[u8] = b"cluster secret of the tests";
/// A time well inside the range of `u64` milliseconds (2026).
const NOW: u64 = 1_780_000_000_000;

fn envelopes() -> Envelopes {
    Envelopes::new(KEY, "n1").unwrap()
}

fn deliver(command: &str) -> Body {
    Body::Deliver {
        hc: "hyco".into(),
        epoch: "0123456789abcdef".into(),
        conn_id: 7,
        command: command.into(),
    }
}

/// A message sealed at `sent_at` by another envelope holder with the same key.
fn sealed_at(sent_at: u64) -> String {
    envelopes().seal(deliver("{}"), sent_at).unwrap().1
}

#[test]
fn a_sealed_message_opens_with_what_was_sealed() {
    let e = envelopes();
    let (id, wire) = e.seal(deliver(r#"{"accept":{}}"#), NOW).unwrap();
    let env = envelopes().open(wire.as_bytes(), NOW).unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.from, "n1");
    assert_eq!(env.sent_at_ms, NOW);
    assert_eq!(env.body, deliver(r#"{"accept":{}}"#));
    // The wire form other node versions read: lowercase hex HMAC-SHA256, a dot, the JSON.
    let (tag, json) = wire.split_once('.').unwrap();
    assert_eq!(tag.len(), 64);
    assert!(tag
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert!(json.starts_with(&format!(r#"{{"id":"{id}","from":"n1","sentAtMs":{NOW},"#)));
}

#[test]
fn a_flipped_bit_anywhere_is_refused() {
    let wire = sealed_at(NOW).into_bytes();
    for i in 0..wire.len() {
        for bit in 0..8 {
            let mut bad = wire.clone();
            bad[i] ^= 1 << bit;
            // A fresh window each time: only the MAC (or the split) may refuse it.
            let r = envelopes().open(&bad, NOW);
            assert!(
                matches!(r, Err(Refused::Mac)),
                "byte {i} bit {bit}: {r:?} for {:?}",
                String::from_utf8_lossy(&bad)
            );
        }
    }
}

#[test]
fn a_wrong_key_is_refused() {
    let wire = sealed_at(NOW);
    for key in [&b"cluster secret of the test"[..], b"", &[0u8; 200][..]] {
        let other = Envelopes::new(key, "n2").unwrap();
        assert_eq!(other.open(wire.as_bytes(), NOW).err(), Some(Refused::Mac));
    }
    // And what the other key seals, this one refuses.
    let (_, theirs) = Envelopes::new(b"another", "n2")
        .unwrap()
        .seal(deliver("{}"), NOW)
        .unwrap();
    assert_eq!(
        envelopes().open(theirs.as_bytes(), NOW).err(),
        Some(Refused::Mac)
    );
}

#[test]
fn truncated_input_is_refused() {
    let wire = sealed_at(NOW).into_bytes();
    for n in 0..wire.len() {
        let e = envelopes();
        assert_eq!(
            e.open(&wire[..n], NOW).err(),
            Some(Refused::Mac),
            "first {n}"
        );
        assert_eq!(
            e.open(&wire[n + 1..], NOW).err(),
            Some(Refused::Mac),
            "from {n}"
        );
    }
}

#[test]
fn overlong_input_is_refused() {
    let wire = sealed_at(NOW);
    for tail in [" ", "\n", "x", ".", "}", "\u{0}"] {
        let long = format!("{wire}{tail}");
        assert_eq!(
            envelopes().open(long.as_bytes(), NOW).err(),
            Some(Refused::Mac),
            "{tail:?} appended"
        );
    }
    // Signed with the right key, but longer than any message a node sends: refused before
    // the MAC is computed over it.
    let e = envelopes();
    let big = "a".repeat(MAX_WIRE_LEN);
    let (_, wire) = e.seal(deliver(&big), NOW).unwrap();
    assert!(wire.len() > MAX_WIRE_LEN);
    assert_eq!(e.open(wire.as_bytes(), NOW).err(), Some(Refused::TooLong));
}

#[test]
fn a_replayed_message_is_refused() {
    let e = envelopes();
    let wire = sealed_at(NOW);
    assert!(e.open(wire.as_bytes(), NOW).is_ok());
    // Played again at once, or later but still young enough to pass the age check.
    assert_eq!(e.open(wire.as_bytes(), NOW).err(), Some(Refused::Replayed));
    assert_eq!(
        e.open(wire.as_bytes(), NOW + MAX_MESSAGE_AGE_MS).err(),
        Some(Refused::Replayed)
    );
    // Other messages still pass, each once.
    let other = sealed_at(NOW + 5);
    assert!(e.open(other.as_bytes(), NOW + 10).is_ok());
    assert_eq!(
        e.open(other.as_bytes(), NOW + 10).err(),
        Some(Refused::Replayed)
    );
    // Once its age refuses it, the window forgets it: still refused.
    assert_eq!(
        e.open(wire.as_bytes(), NOW + MAX_MESSAGE_AGE_MS + 1).err(),
        Some(Refused::Age)
    );
}

#[test]
fn a_message_older_than_the_window_is_refused() {
    let e = envelopes();
    let edge = sealed_at(NOW - MAX_MESSAGE_AGE_MS);
    assert!(e.open(edge.as_bytes(), NOW).is_ok());
    for sent_at in [NOW - MAX_MESSAGE_AGE_MS - 1, NOW - 60_000, 1, 0] {
        assert_eq!(
            e.open(sealed_at(sent_at).as_bytes(), NOW).err(),
            Some(Refused::Age),
            "sent at {sent_at}"
        );
    }
}

#[test]
fn a_message_from_beyond_the_allowed_skew_is_refused() {
    let e = envelopes();
    let edge = sealed_at(NOW + MAX_MESSAGE_AGE_MS);
    assert!(e.open(edge.as_bytes(), NOW).is_ok());
    for sent_at in [NOW + MAX_MESSAGE_AGE_MS + 1, NOW + 3_600_000] {
        assert_eq!(
            e.open(sealed_at(sent_at).as_bytes(), NOW).err(),
            Some(Refused::Age),
            "sent at {sent_at}"
        );
    }
}

#[test]
fn hostile_timestamps_do_not_panic() {
    let e = envelopes();
    for sent_at in [u64::MAX, u64::MAX - MAX_MESSAGE_AGE_MS, 0] {
        assert_eq!(
            e.open(sealed_at(sent_at).as_bytes(), NOW).err(),
            Some(Refused::Age),
            "sent at {sent_at}"
        );
    }
    // A clock at the end of time: the window's expiry of a message sent then saturates.
    for now in [u64::MAX, u64::MAX - 1] {
        let wire = sealed_at(u64::MAX);
        assert!(e.open(wire.as_bytes(), now).is_ok(), "at {now}");
        assert_eq!(e.open(wire.as_bytes(), now).err(), Some(Refused::Replayed));
    }
    // And one at the start: nothing older than zero.
    let early = Envelopes::new(KEY, "n1").unwrap();
    assert!(early.open(sealed_at(0).as_bytes(), 0).is_ok());
    assert!(early
        .open(sealed_at(MAX_MESSAGE_AGE_MS).as_bytes(), 0)
        .is_ok());
}

#[test]
fn a_signed_message_of_another_shape_is_refused() {
    let e = envelopes();
    for json in [
        "{}".to_owned(),
        "not json".to_owned(),
        format!(r#"{{"id":"x","from":"n1","sentAtMs":{NOW},"body":{{"kind":"unknown"}}}}"#),
        r#"{"id":"x","from":"n1","sentAtMs":-1,"body":{"kind":"configChanged","version":1}}"#
            .to_owned(),
    ] {
        let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
        mac.update(json.as_bytes());
        let wire = format!("{}.{json}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            e.open(wire.as_bytes(), NOW).err(),
            Some(Refused::Shape),
            "{json}"
        );
    }
}

#[test]
fn the_replay_window_forgets_what_its_age_refuses() {
    let mut w = ReplayWindow::default();
    for i in 0..100u64 {
        assert!(w.admit(&format!("id{i}"), NOW + i, NOW + i));
    }
    assert_eq!(w.seen.len(), 100);
    // Past every message's age: the next admission forgets them all.
    assert!(w.admit(
        "late",
        NOW + 100 + MAX_MESSAGE_AGE_MS,
        NOW + 100 + MAX_MESSAGE_AGE_MS
    ));
    assert_eq!(w.seen.len(), 1);
    assert_eq!(w.order.len(), 1);
}
