use super::*;

#[test]
fn app_query_kept_byte_for_byte() {
    // protocol.md §2.10 / HybridRequestTests.QueryString.
    for (raw, app) in [
        ("&foo=bar", "&foo=bar"),
        ("&foo=bar&", "&foo=bar&"),
        ("foo=bar&", "foo=bar&"),
        ("sb-hc-undefined", "sb-hc-undefined"),
        ("sb-hc-undefined&sb-hc-action=connect", "sb-hc-undefined"),
        ("x=%22&y=%b8&z=a+b", "x=%22&y=%b8&z=a+b"),
        ("&&", "&&"),
        ("a=1&sb-hc-id=7&b=2", "a=1&b=2"),
        ("sb-hc-id=7", ""),
        ("", ""),
        ("SB-HC-ACTION=connect&q", "q"),
        ("sb%2Dhc%2Did=7&q", "q"),
    ] {
        let q = HcQuery::parse(raw).unwrap();
        assert_eq!(q.app_query, app, "{raw}");
    }
}

#[test]
fn relay_parameters_are_decoded_once() {
    let q = HcQuery::parse(
        "&foo=bar&sb-hc-action=connect&sb-hc-id=a%2Db_G1&sb-hc-token=SharedAccessSignature+sr%3Dx%253A&sb-hc-rv=Qm9v&",
    )
    .unwrap();
    assert_eq!(q.action, Some(Action::Connect));
    assert_eq!(q.id.as_deref(), Some("a-b_G1"));
    // .NET: '+' is a space; the inner %25 becomes % once, not twice.
    assert_eq!(q.token.as_deref(), Some("SharedAccessSignature sr=x%3A"));
    assert_eq!(q.extra_sb, vec![("sb-hc-rv".to_owned(), "Qm9v".to_owned())]);
    assert_eq!(q.app_query, "&foo=bar&");
    let listen = HcQuery::parse("sb-hc-action=Listen").unwrap();
    assert_eq!(listen.action, Some(Action::Listen));
    for a in [
        Action::Listen,
        Action::Connect,
        Action::Accept,
        Action::Request,
    ] {
        assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        assert_eq!(a.to_string(), a.as_str());
    }
}

#[test]
fn duplicates_and_bad_actions_refused() {
    for (raw, name) in [
        ("sb-hc-action=listen&sb-hc-action=listen", "sb-hc-action"),
        ("sb-hc-action=listen&SB-HC-ACTION=connect", "sb-hc-action"),
        ("sb-hc-id=1&sb-hc-id=2", "sb-hc-id"),
        ("sb-hc-token=a&sb-hc-token=b", "sb-hc-token"),
        ("sb-hc-statusCode=1&sb-hc-statuscode=2", "sb-hc-statusCode"),
    ] {
        assert_eq!(
            HcQuery::parse(raw),
            Err(AddressError::Duplicate(name)),
            "{raw}"
        );
    }
    for raw in [
        "sb-hc-action=fly",
        "sb-hc-action=",
        "sb-hc-action=listen%00",
    ] {
        assert_eq!(HcQuery::parse(raw), Err(AddressError::BadAction), "{raw}");
    }
    assert_eq!("fly".parse::<Action>(), Err(AddressError::BadAction));
}

#[test]
fn reject_parameters_prefixed_and_node() {
    let dotnet = HcQuery::parse(
        "sb-hc-action=accept&sb-hc-id=1&sb-hc-statusCode=400&sb-hc-statusDescription=Rejected+by+user+code",
    )
    .unwrap();
    assert_eq!(dotnet.reject_status(), Some("400"));
    assert_eq!(dotnet.reject_description(), Some("Rejected by user code"));
    let node = HcQuery::parse(
        "sb-hc-action=accept&sb-hc-rv=abc&statusCode=404&statusDescription=no%20way",
    )
    .unwrap();
    assert_eq!(node.status_code, None);
    assert_eq!(node.node_status_code.as_deref(), Some("404"));
    assert_eq!(node.reject_status(), Some("404"));
    assert_eq!(node.reject_description(), Some("no way"));
    assert_eq!(node.app_query, "statusCode=404&statusDescription=no%20way");
    // Prefixed wins.
    let both = HcQuery::parse(
        "statusCode=404&statusDescription=node&sb-hc-statusCode=410&sb-hc-statusDescription=prefixed",
    )
    .unwrap();
    assert_eq!(both.reject_status(), Some("410"));
    assert_eq!(both.reject_description(), Some("prefixed"));
}

#[test]
fn query_limits() {
    assert!(HcQuery::parse(&"a=b&".repeat(255)).is_ok()); // 256 pairs, the last empty
    assert_eq!(
        HcQuery::parse(&"a=b&".repeat(300)),
        Err(AddressError::QueryTooLarge)
    );
    assert_eq!(
        HcQuery::parse(&"a".repeat(MAX_QUERY + 1)),
        Err(AddressError::QueryTooLarge)
    );
    assert!(HcQuery::parse(&"a".repeat(MAX_QUERY)).is_ok());
    // Invalid UTF-8 after decoding does not panic.
    assert!(HcQuery::parse("sb-hc-action=connect&x=%FF%FE&y=%").is_ok());
    assert_eq!(HcQuery::parse("sb-hc-id=%FF%FE"), Err(AddressError::BadId));
}

/// Issue 14: `sb-hc-id` is logged and echoed, so only id-like text gets in.
#[test]
fn sb_hc_id_is_bounded_in_length_and_alphabet() {
    for ok in [
        "7",
        "123456",
        "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
        "a1b2c3d4-e5f6-7890-abcd-ef1234567890_G12",
        "{a1b2c3d4-e5f6-7890-abcd-ef1234567890}",
        "host.example:42@x",
        &"a".repeat(MAX_ID),
    ] {
        let q = HcQuery::parse(&format!(
            "sb-hc-id={}",
            form_urlencoded::byte_serialize(ok.as_bytes()).collect::<String>()
        ));
        assert_eq!(q.map(|q| q.id), Ok(Some(ok.to_owned())), "{ok}");
    }
    for bad in [
        "",
        "ID%0D%0A2026-12-04T00:00:00Z%20%20INFO%20hyco_relay:%20FORGED%20admin%20login%20ok%1B%5B2J",
        "a%1Bb",
        "a+b",
        "a%22b",
        "a%3Db",
        "a%5Cb",
        "%C3%A9",
        &"a".repeat(MAX_ID + 1),
    ] {
        assert_eq!(HcQuery::parse(&format!("sb-hc-id={bad}")), Err(AddressError::BadId), "{bad}");
    }
}

#[test]
fn hc_paths() {
    assert_eq!(split_hc_path("/$hc/hc1").unwrap(), ["hc1"]);
    assert_eq!(split_hc_path("/$HC/hc1/sub/").unwrap(), ["hc1", "sub"]);
    assert_eq!(split_hc_path("/$hc/hc1%2Fsub").unwrap(), ["hc1%2Fsub"]);
    assert_eq!(split_hc_path("/$hc/%68c1").unwrap(), ["%68c1"]);
    for (bad, why) in [
        ("/$hc//hc1", AddressError::BadSegment),
        ("/$hc/./hc1", AddressError::BadSegment),
        ("/$hc/x/../hc1", AddressError::BadSegment),
        ("/$hc/hc1/..", AddressError::BadSegment),
        ("/$hc/hc1//", AddressError::BadSegment),
        ("/$hc/", AddressError::NoEntity),
        ("/$hc", AddressError::NoEntity),
        ("/hc1", AddressError::NotHc),
        ("/%24hc/hc1", AddressError::NotHc),
        ("$hc/hc1", AddressError::NotHc),
        ("/$hcx/hc1", AddressError::NotHc),
        ("", AddressError::NotHc),
    ] {
        assert_eq!(split_hc_path(bad), Err(why), "{bad}");
    }
}

#[test]
fn http_paths() {
    assert_eq!(
        split_http_path("/hyco/api/items").unwrap(),
        ["hyco", "api", "items"]
    );
    assert_eq!(split_http_path("/hyco/").unwrap(), ["hyco"]);
    assert_eq!(split_http_path("/"), Err(AddressError::NoEntity));
    assert_eq!(split_http_path("/a//b"), Err(AddressError::BadSegment));
    assert_eq!(split_http_path("/a/./b"), Err(AddressError::BadSegment));
}

#[test]
fn entity_names() {
    for ok in ["hyco", "db/prod-1", "A.b_c-d", "9", &"a".repeat(260)] {
        assert_eq!(validate_entity_name(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "$hc",
        "a/$HC",
        "a b",
        "-a",
        ".a",
        "a/",
        "/a",
        "a//b",
        "é",
        "a%2Fb",
        &"a".repeat(261),
    ] {
        assert!(validate_entity_name(bad).is_err(), "{bad}");
    }
    assert_eq!(entity_key("/Hyco/Sub/"), "hyco/sub");
}

#[test]
fn urls() {
    assert_eq!(
        ws_url(
            "localhost:9443",
            "hyco",
            Some("/x?a=1"),
            Action::Connect,
            "id 1"
        ),
        "wss://localhost:9443/$hc/hyco/x?a=1&sb-hc-action=connect&sb-hc-id=id+1"
    );
    assert_eq!(
        ws_url("h", "hyco", None, Action::Listen, "g"),
        "wss://h/$hc/hyco?sb-hc-action=listen&sb-hc-id=g"
    );
    assert_eq!(
        ws_url("h", "hyco", Some("room7"), Action::Connect, "g"),
        "wss://h/$hc/hyco/room7?sb-hc-action=connect&sb-hc-id=g"
    );
    assert_eq!(
        ws_url("h", "hyco", Some("?a=1&"), Action::Connect, "g"),
        "wss://h/$hc/hyco?a=1&sb-hc-action=connect&sb-hc-id=g"
    );
    // The URL parses back to what was put in.
    let u = ws_url("h", "hyco", Some("/x?lang=en"), Action::Accept, "{a@b:c}");
    let q = HcQuery::parse(u.split_once('?').unwrap().1).unwrap();
    assert_eq!(q.action, Some(Action::Accept));
    assert_eq!(q.id.as_deref(), Some("{a@b:c}"));
    assert_eq!(q.app_query, "lang=en");

    let addr = "wss://h/$hc/e?sb-hc-action=accept&sb-hc-id=1";
    let r = reject_url(addr, 502, "no route: a&b");
    assert_eq!(
        r,
        "wss://h/$hc/e?sb-hc-action=accept&sb-hc-id=1&sb-hc-statusCode=502&sb-hc-statusDescription=no+route%3A+a%26b"
    );
    let q = HcQuery::parse(r.split_once('?').unwrap().1).unwrap();
    assert_eq!(q.reject_status(), Some("502"));
    assert_eq!(q.reject_description(), Some("no route: a&b"));
    assert_eq!(
        reject_url("wss://h/$hc/e", 400, "x"),
        "wss://h/$hc/e?sb-hc-statusCode=400&sb-hc-statusDescription=x"
    );
}

#[test]
fn reasons_and_ids() {
    assert_eq!(sanitize_reason("OK\r\nSet-Cookie: x"), "OKSet-Cookie: x");
    assert_eq!(sanitize_reason("a\0b\tc\u{7f}d é"), "ab cd");
    assert_eq!(sanitize_reason(&"x".repeat(2000)).len(), 512);
    assert_eq!(sanitize_reason("  Gone  "), "Gone");
    let id = new_connection_id([0xab; 16]);
    assert_eq!(id, "abababab-abab-abab-abab-abababababab");
    assert_eq!(
        new_connection_id([0; 16]),
        "00000000-0000-0000-0000-000000000000"
    );
    // Each byte's high digit first, in byte order.
    assert_eq!(
        new_connection_id([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10
        ]),
        "01234567-89ab-cdef-fedc-ba9876543210"
    );
    assert!(is_guid(&id));
    assert!(is_guid("1c048eb5-77c4-4b85-96fd-fa526801af35_G0"));
    assert!(is_guid("1C048EB5-77C4-4B85-96FD-FA526801AF35_G21"));
    for bad in [
        "ab".repeat(16),
        "abababab-abab-abab-abab-abababababab_G".into(),
        "abababab-abab-abab-abab-abababababab_Gx".into(),
        "abababab-abab-abab-abab-ababababababab".into(),
        "abababab-abab-abab-abab_abababababab".into(),
    ] {
        assert!(!is_guid(&bad), "{bad}");
    }
}

#[test]
fn host_ports() {
    for (s, host, port) in [
        ("db.corp:5432", "db.corp", 5432),
        (
            "sqlserver01.corp.example:1433",
            "sqlserver01.corp.example",
            1433,
        ),
        ("10.0.0.1:1", "10.0.0.1", 1),
        ("my_host:65535", "my_host", 65535),
        ("[::1]:80", "::1", 80),
        ("[fe80::1:2]:443", "fe80::1:2", 443),
    ] {
        let hp = HostPort::parse(s).unwrap();
        assert_eq!((hp.host.as_str(), hp.port), (host, port), "{s}");
        assert_eq!(hp.to_string(), s);
        assert_eq!(hp.to_string().parse::<HostPort>().unwrap(), hp);
    }
    for (bad, names) in [
        ("db", "host:port"),
        ("db:0", "port"),
        ("db:70000", "port"),
        ("db:+80", "port"),
        ("db:", "port"),
        ("db:080000", "port"),
        (":80", "host"),
        ("a b:1", "host"),
        ("a..b:1", "host"),
        ("a.:1", "host"),
        ("::1:80", "IPv6"),
        ("[::1]", "ipv6"),
        ("[nope]:1", "IPv6"),
        ("http://db:1", "host"),
    ] {
        let e = HostPort::parse(bad).unwrap_err().to_string();
        assert!(e.contains(names), "{bad}: {e}");
    }
}

#[test]
fn listener_paths_are_decoded_but_keep_their_structure() {
    for (sent, listener) in [
        (
            "/hc/extra%20Path/extra%20%20Path2",
            "/hc/extra Path/extra  Path2",
        ),
        ("/hc/caf%C3%A9/%e2%82%ac", "/hc/café/€"),
        ("/hc/a%2Fb%3Fc%23d%25e", "/hc/a%2Fb%3Fc%23d%25e"),
        ("/hc/%00%0a%7F", "/hc/%00%0a%7F"),
        ("/hc/%zz%4", "/hc/%zz%4"),
        ("/hc/plain", "/hc/plain"),
        // Not UTF-8 once decoded: kept as sent, whole.
        ("/hc/%20%FF", "/hc/%20%FF"),
        ("/hc/%2B+", "/hc/++"),
    ] {
        assert_eq!(listener_path(sent), listener, "{sent}");
    }
}

#[test]
fn request_line_paths_undo_the_listener_decoding() {
    for sent in [
        "/hc/extra%20Path/extra%20%20Path2",
        "/hc/caf%C3%A9",
        "/hc/a%2Fb%3Fc%23d%25e",
        "/hc/%22%3C%3E%5C%5E%60%7B%7C%7D",
        "/hc/plain",
    ] {
        assert_eq!(request_line_path(&listener_path(sent)), sent, "{sent}");
    }
    // The query goes as it came; only the path is encoded.
    assert_eq!(
        request_line_path("/hc/a b?x=a%20b&y=;"),
        "/hc/a%20b?x=a%20b&y=;"
    );
}
