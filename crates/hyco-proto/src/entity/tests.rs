use super::*;

// protocol.md §6.3, as printed there.
const SECTION_6_3: &str = r#"<entry xmlns="http://www.w3.org/2005/Atom">
  <id>https://contoso.servicebus.windows.net/hyco?api-version=2016-07</id>
  <title type="text">hyco</title>
  <updated>2025-01-01T00:00:00Z</updated>
  <content type="application/xml">
    <HybridConnectionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
                                 xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
      <CreatedAt>2024-12-01T10:00:00Z</CreatedAt>
      <UpdatedAt>2024-12-02T10:00:00Z</UpdatedAt>
      <RequiresClientAuthorization>true</RequiresClientAuthorization>
      <UserMetadata>[{"key":"endpoint","value":"sqlserver01.corp.example:1433"}]</UserMetadata>
      <ListenerCount>1</ListenerCount>
    </HybridConnectionDescription>
  </content>
</entry>"#;

fn sample() -> EntityDescription {
    EntityDescription {
        name: "hyco".into(),
        created_at: "2024-12-01T10:00:00Z".into(),
        updated_at: "2024-12-02T10:00:00Z".into(),
        requires_client_authorization: true,
        user_metadata: Some(
            r#"[{"key":"endpoint","value":"sqlserver01.corp.example:1433"}]"#.into(),
        ),
        listener_count: 1,
    }
}

#[test]
fn metadata_round_trip() {
    let hp: HostPort = "sql01.corp:1433".parse().unwrap();
    let m = endpoint_metadata(&hp);
    assert_eq!(m, r#"[{"key":"endpoint","value":"sql01.corp:1433"}]"#);
    assert_eq!(parse_endpoint_metadata(&m).unwrap(), hp);
    let v6: HostPort = "[::1]:80".parse().unwrap();
    assert_eq!(
        parse_endpoint_metadata(&endpoint_metadata(&v6)).unwrap(),
        v6
    );
}

#[test]
fn metadata_lookup_rules() {
    let hp = parse_endpoint_metadata(
        r#"[{"key":"other","value":"x"},{"key":"Endpoint","value":" db:5432 "},{"key":"endpoint","value":"second:1"}]"#,
    )
    .unwrap();
    assert_eq!(hp.to_string(), "db:5432");
    for (m, want) in [
        (r#"[{"key":"x","value":"y"}]"#, EntityError::NoEndpoint),
        ("[]", EntityError::NoEndpoint),
        (r#"[1,"endpoint",{"value":"a:1"}]"#, EntityError::NoEndpoint),
        (
            r#"{"key":"endpoint","value":"a:1"}"#,
            EntityError::MetadataNotArray,
        ),
        (r#""a:1""#, EntityError::MetadataNotArray),
        (r#"[{"key":"endpoint"}]"#, EntityError::EndpointNotString),
        (
            r#"[{"key":"endpoint","value":1433}]"#,
            EntityError::EndpointNotString,
        ),
    ] {
        assert_eq!(parse_endpoint_metadata(m), Err(want), "{m}");
    }
    for m in ["nope", "", "db:1433"] {
        assert!(
            matches!(
                parse_endpoint_metadata(m),
                Err(EntityError::MetadataNotJson(_))
            ),
            "{m}"
        );
    }
    match parse_endpoint_metadata(r#"[{"key":"endpoint","value":"nohost"}]"#) {
        Err(e @ EntityError::BadEndpoint(_)) => assert!(e.to_string().contains("nohost")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn parses_the_documented_entry() {
    assert_eq!(parse_entity_atom(SECTION_6_3).unwrap(), sample());
}

#[test]
fn render_has_the_documented_shape_and_round_trips() {
    let id = "https://contoso.servicebus.windows.net/hyco?api-version=2016-07";
    let xml = render_entity_atom(id, &sample());
    let compact: String = SECTION_6_3
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("")
        .replace(r#"connect"xmlns:i"#, r#"connect" xmlns:i"#)
        .replace(
            "<updated>2025-01-01T00:00:00Z</updated>",
            "<updated>2024-12-02T10:00:00Z</updated>",
        );
    assert_eq!(xml, compact);
    assert_eq!(parse_entity_atom(&xml).unwrap(), sample());

    let tricky = EntityDescription {
        name: "a&b".into(),
        user_metadata: Some(r#"[{"key":"endpoint","value":"a<b>:1"}] & ]]>"#.into()),
        requires_client_authorization: false,
        listener_count: 25,
        ..sample()
    };
    let xml = render_entity_atom("https://h/a&b?x=<1>", &tricky);
    assert!(xml.contains("&lt;") && xml.contains("&amp;") && !xml.contains("<b>"));
    assert_eq!(parse_entity_atom(&xml).unwrap(), tricky);
    let none = EntityDescription {
        user_metadata: None,
        ..sample()
    };
    let xml = render_entity_atom("https://h/hyco", &none);
    assert!(!xml.contains("UserMetadata"));
    assert_eq!(parse_entity_atom(&xml).unwrap(), none);
}

#[test]
fn tolerant_of_unknown_elements_and_cdata() {
    let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<entry xmlns="http://www.w3.org/2005/Atom" xmlns:a="x"><a:extra><title>not me</title></a:extra>
<title type="text">hyco</title><author><name>svc</name></author>
<content type="application/xml"><HybridConnectionDescription>
<Unknown><Deep>1</Deep></Unknown>
<UserMetadata><![CDATA[[{"key":"endpoint","value":"db:1"}]]]></UserMetadata>
<ListenerCount>0</ListenerCount><Status>Active</Status>
</HybridConnectionDescription></content></entry>"#;
    let d = parse_entity_atom(xml).unwrap();
    assert_eq!(d.name, "hyco");
    assert_eq!(
        d.user_metadata.as_deref(),
        Some(r#"[{"key":"endpoint","value":"db:1"}]"#)
    );
    assert!(
        d.requires_client_authorization,
        "Azure's default when absent"
    );
    assert_eq!(d.listener_count, 0);
    let empty_meta = parse_entity_atom(
        "<entry><content><HybridConnectionDescription><UserMetadata/></HybridConnectionDescription></content></entry>",
    )
    .unwrap();
    assert_eq!(empty_meta.user_metadata.as_deref(), Some(""));
}

#[test]
fn feed_means_not_found() {
    for xml in [
        r#"<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title><id>uuid:1</id><updated>2025-01-01T00:00:00Z</updated></feed>"#,
        r#"<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"/>"#,
        "<a:feed xmlns:a=\"http://www.w3.org/2005/Atom\"></a:feed>",
    ] {
        assert_eq!(parse_entity_atom(xml), Err(EntityError::NotFound), "{xml}");
    }
}

#[test]
fn malformed_descriptions() {
    assert_eq!(
        parse_entity_atom("<html/>"),
        Err(EntityError::UnexpectedRoot("html".into()))
    );
    assert_eq!(
        parse_entity_atom("<Error><Code>401</Code><Detail>no</Detail></Error>"),
        Err(EntityError::UnexpectedRoot("Error".into()))
    );
    assert_eq!(
        parse_entity_atom("<entry><title>x</title></entry>"),
        Err(EntityError::NoDescription)
    );
    assert_eq!(parse_entity_atom(""), Err(EntityError::NoDescription));
    assert_eq!(
        parse_entity_atom(
            "<entry><content><HybridConnectionDescription><ListenerCount>many</ListenerCount></HybridConnectionDescription></content></entry>"
        ),
        Err(EntityError::BadMember("ListenerCount"))
    );
    assert_eq!(
        parse_entity_atom(
            "<entry><content><HybridConnectionDescription><RequiresClientAuthorization>yes</RequiresClientAuthorization></HybridConnectionDescription></content></entry>"
        ),
        Err(EntityError::BadMember("RequiresClientAuthorization"))
    );
    for bad in [
        "<entry><content></entry>",
        "<entry><content>",
        "<entry>&bogus;</entry>",
        "<entry><title>&xxe;</title></entry>",
    ] {
        assert!(
            matches!(parse_entity_atom(bad), Err(EntityError::Xml(_))),
            "{bad}: {:?}",
            parse_entity_atom(bad)
        );
    }
    let deep = format!("<entry>{}", "<a>".repeat(10_000));
    assert!(matches!(parse_entity_atom(&deep), Err(EntityError::Xml(_))));
    let big = format!("<entry>{}</entry>", " ".repeat(MAX_ATOM));
    assert_eq!(parse_entity_atom(&big), Err(EntityError::TooLarge));
    // A DOCTYPE with an entity definition is not expanded.
    let dtd = r#"<!DOCTYPE entry [<!ENTITY x "boom">]><entry><title>&x;</title></entry>"#;
    assert!(matches!(parse_entity_atom(dtd), Err(EntityError::Xml(_))));
}
