use super::*;

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn accept_serializes_like_the_section_4_2_example() {
    let a = ListenerCommand::Accept(AcceptCommand {
        address: "wss://relay.example.net:443/$hc/hyco/room7?lang=en&sb-hc-action=accept&sb-hc-id=4cb542c3-047a-4d40-a19f-bdc66441e736&sb-hc-rv=Qm9vdHN0cmFw".into(),
        id: "4cb542c3-047a-4d40-a19f-bdc66441e736".into(),
        connect_headers: headers(&[
            ("Host", "relay.example.net"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "chat.v2"),
            ("X-Tenant", "blue"),
        ]),
        remote_endpoint: Some(RemoteEndpoint {
            address: "203.0.113.9".into(),
            port: 51544,
        }),
    });
    // protocol.md §4.2, whitespace removed.
    let example = r#"{"accept":{
  "address":"wss://relay.example.net:443/$hc/hyco/room7?lang=en&sb-hc-action=accept&sb-hc-id=4cb542c3-047a-4d40-a19f-bdc66441e736&sb-hc-rv=Qm9vdHN0cmFw",
  "id":"4cb542c3-047a-4d40-a19f-bdc66441e736",
  "connectHeaders":{
    "Host":"relay.example.net",
    "Upgrade":"websocket",
    "Connection":"Upgrade",
    "Sec-WebSocket-Key":"dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version":"13",
    "Sec-WebSocket-Protocol":"chat.v2",
    "X-Tenant":"blue"},
  "remoteEndpoint":{"address":"203.0.113.9","port":51544}}}"#;
    let compact: String = example.lines().map(str::trim_start).collect();
    assert_eq!(a.to_json(), compact);
    assert_eq!(ListenerCommand::parse(example).unwrap(), a);
    assert_eq!(a.name(), "accept");
}

#[test]
fn accept_without_remote_endpoint_keeps_connect_headers() {
    let a = ListenerCommand::Accept(AcceptCommand {
        address: "wss://h/$hc/e?sb-hc-action=accept".into(),
        id: "1".into(),
        connect_headers: Vec::new(),
        remote_endpoint: None,
    });
    // Java throws without connectHeaders, so an empty object is always sent.
    assert_eq!(
        a.to_json(),
        r#"{"accept":{"address":"wss://h/$hc/e?sb-hc-action=accept","id":"1","connectHeaders":{}}}"#
    );
}

#[test]
fn request_full_and_address_only_forms() {
    let full = ListenerCommand::Request(RequestCommand {
        address: "wss://relay.example.net:443/$hc/hyco?sb-hc-action=request&sb-hc-id=9f1c2d3e-0001&sb-hc-rv=cmVxLTE".into(),
        id: "9f1c2d3e-0001".into(),
        request_target: Some("/hyco/api/items?x=1".into()),
        method: Some("POST".into()),
        remote_endpoint: Some(RemoteEndpoint {
            address: "198.51.100.23".into(),
            port: 40022,
        }),
        request_headers: Some(headers(&[
            ("Host", "relay.example.net"),
            ("Content-Type", "application/json"),
            ("Accept", "*/*"),
            ("Via", "1.1 proxy.corp"),
        ])),
        body: Some(true),
    });
    let example = r#"{"request":{"address":"wss://relay.example.net:443/$hc/hyco?sb-hc-action=request&sb-hc-id=9f1c2d3e-0001&sb-hc-rv=cmVxLTE","id":"9f1c2d3e-0001","requestTarget":"/hyco/api/items?x=1","method":"POST","remoteEndpoint":{"address":"198.51.100.23","port":40022},"requestHeaders":{"Host":"relay.example.net","Content-Type":"application/json","Accept":"*/*","Via":"1.1 proxy.corp"},"body":true}}"#;
    assert_eq!(full.to_json(), example);
    assert_eq!(ListenerCommand::parse(example).unwrap(), full);

    let short = r#"{"request":{"address":"wss://relay.example.net:443/$hc/hyco?sb-hc-action=request&sb-hc-id=9f1c2d3e-0002&sb-hc-rv=cmVxLTI","id":"9f1c2d3e-0002"}}"#;
    match ListenerCommand::parse(short).unwrap() {
        ListenerCommand::Request(r) => {
            assert_eq!(r.id, "9f1c2d3e-0002");
            assert_eq!((&r.method, r.body, &r.request_target), (&None, None, &None));
            assert_eq!(ListenerCommand::Request(r).to_json(), short);
        }
        other => panic!("{other:?}"),
    }
    // Address only, no id at all.
    assert!(matches!(
        ListenerCommand::parse(r#"{"request":{"address":"wss://h/x"}}"#),
        Ok(ListenerCommand::Request(RequestCommand { ref id, .. })) if id.is_empty()
    ));
}

#[test]
fn responses_of_each_client_parse() {
    for j in [
        // .NET (DataContractJsonSerializer: alphabetical, '/' escaped)
        r#"{"response":{"body":true,"requestId":"r","responseHeaders":{"Content-Type":"application\/json"},"statusCode":200,"statusDescription":"OK"}}"#,
        // Java
        r#"{"response":{"requestId":"r","body":true,"statusCode":200,"statusDescription":"OK","responseHeaders":{"Content-Type":"application/json"}}}"#,
        // Node
        r#"{"response":{"requestId":"r","statusCode":200,"statusDescription":"OK","responseHeaders":{"Content-Type":"application/json"},"body":true}}"#,
        // The guide's example: statusCode as a string.
        r#"{"response":{"requestId":"r","statusCode":"200","statusDescription":"OK","responseHeaders":{"Content-Type":"application/json"},"body":true}}"#,
    ] {
        let want = ResponseCommand {
            request_id: "r".into(),
            status_code: 200,
            status_description: Some("OK".into()),
            response_headers: Some(headers(&[("Content-Type", "application/json")])),
            body: true,
        };
        assert_eq!(
            ListenerCommand::parse(j).unwrap(),
            ListenerCommand::Response(want),
            "{j}"
        );
    }
    let minimal = ListenerCommand::Response(ResponseCommand {
        request_id: "r".into(),
        status_code: 204,
        status_description: None,
        response_headers: None,
        body: false,
    });
    let j = minimal.to_json();
    assert_eq!(
        j,
        r#"{"response":{"requestId":"r","statusCode":204,"body":false}}"#
    );
    assert_eq!(ListenerCommand::parse(&j).unwrap(), minimal);
}

#[test]
fn bad_response_fields_are_invalid() {
    for j in [
        r#"{"response":{"requestId":"r","statusCode":"abc","body":false}}"#,
        r#"{"response":{"requestId":"r","statusCode":70000,"body":false}}"#,
        r#"{"response":{"requestId":"r","statusCode":-1,"body":false}}"#,
        r#"{"response":{"requestId":"r","statusCode":200.5,"body":false}}"#,
        r#"{"response":{"requestId":"r","body":false}}"#,
        r#"{"response":{"statusCode":200,"body":false}}"#,
        r#"{"response":{"requestId":"r","statusCode":200,"responseHeaders":{"A":1}}}"#,
        r#"{"response":{"requestId":"r","statusCode":200,"body":"yes"}}"#,
        r#"{"response":[]}"#,
        r#"{"renewToken":{"token":5}}"#,
        r#"{"renewToken":{}}"#,
    ] {
        assert!(
            matches!(ListenerCommand::parse(j), Err(ControlError::Invalid(_))),
            "{j}"
        );
    }
}

#[test]
fn renew_token_round_trips() {
    let token = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=x%3D&se=1735693200&skn=RootManageSharedAccessKey";
    let c = ListenerCommand::RenewToken(RenewTokenCommand {
        token: token.into(),
    });
    assert_eq!(
        c.to_json(),
        format!(r#"{{"renewToken":{{"token":"{token}"}}}}"#)
    );
    assert_eq!(ListenerCommand::parse(&c.to_json()).unwrap(), c);
    assert_eq!(c.name(), "renewToken");
}

#[test]
fn limits() {
    let big = format!(r#"{{"renewToken":{{"token":"{}"}}}}"#, "a".repeat(70_000));
    assert_eq!(
        ListenerCommand::parse(&big),
        Err(ControlError::TooLarge { len: big.len() })
    );
    let just_fits = format!(
        r#"{{"renewToken":{{"token":"{}"}}}}"#,
        "a".repeat(MAX_CONTROL_MESSAGE - 27)
    );
    assert_eq!(just_fits.len(), MAX_CONTROL_MESSAGE);
    assert!(ListenerCommand::parse(&just_fits).is_ok());
    for deep in [
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!(r#"{{"accept":{}}}"#, "{\"a\":".repeat(10_000)),
        "[".repeat(33),
    ] {
        assert_eq!(ListenerCommand::parse(&deep), Err(ControlError::TooDeep));
    }
    // Brackets inside strings (escaped quotes too) do not count.
    let in_string = format!(r#"{{"renewToken":{{"token":"\"{}"}}}}"#, "[".repeat(1000));
    assert!(ListenerCommand::parse(&in_string).is_ok());
    let at_limit = format!(
        r#"{{"accept":{{"address":"a","id":"b","connectHeaders":{{}},"x":{}1{}}}}}"#,
        "[".repeat(29),
        "]".repeat(29)
    );
    assert!(ListenerCommand::parse(&at_limit).is_ok(), "{at_limit}");
}

#[test]
fn unknown_and_malformed_messages() {
    assert_eq!(
        ListenerCommand::parse(r#"{"foo":{}}"#),
        Err(ControlError::UnknownCommand("foo".into()))
    );
    assert_eq!(
        ListenerCommand::parse(r#"{"injectFault":{"delay":"00:01:00"}}"#),
        Err(ControlError::UnknownCommand("injectFault".into()))
    );
    let long = format!(r#"{{"{}":{{}}}}"#, "x".repeat(1000));
    match ListenerCommand::parse(&long) {
        Err(ControlError::UnknownCommand(n)) => assert_eq!(n.len(), 64),
        other => panic!("{other:?}"),
    }
    for j in [
        r#"{"a":1,"b":2}"#,
        r#"{"accept":{"address":"a","id":"b","connectHeaders":{}},"response":{}}"#,
        r#"{"accept":{"address":"a","id":"b","connectHeaders":{}},"accept":{"address":"a","id":"b","connectHeaders":{}}}"#,
        "{}",
        "[]",
        "null",
        "\"accept\"",
        "",
        "{",
        r#"{"accept":{"address":"a","id":"b","connectHeaders":{}}} trailing"#,
    ] {
        assert!(
            matches!(ListenerCommand::parse(j), Err(ControlError::Invalid(_))),
            "{j}"
        );
    }
}
