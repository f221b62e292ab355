use super::*;

const K: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TOKEN: &str = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1735689600&skn=RootManageSharedAccessKey";

fn parse(s: &str) -> ConnectionString {
    ConnectionString::parse(s).unwrap()
}

fn err(s: &str) -> ConnectionStringError {
    ConnectionString::parse(s).unwrap_err()
}

#[test]
fn namespace_key_string() {
    let cs = parse(&format!(
        "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={K}"
    ));
    assert_eq!(cs.endpoint.scheme, "sb");
    assert_eq!(cs.endpoint.host_port(), "contoso.servicebus.windows.net");
    assert_eq!(cs.endpoint.port_or_default(), 443);
    assert_eq!(cs.entity_path, None);
    assert_eq!(cs.operation_timeout, None);
    // '=' padding in the key survives the split on the first '='.
    assert!(
        matches!(&cs.auth, ConnectionStringAuth::Key { name, key } if name == "RootManageSharedAccessKey" && key.expose() == K)
    );
}

#[test]
fn entity_key_string_with_case_insensitive_keys_and_timeout() {
    let cs = parse(&format!(
        "endpoint=sb://localhost:9443;sharedaccesskeyname=defaultListener;SHAREDACCESSKEY={K};entityPATH=hyco;OperationTimeout=00:01:30;"
    ));
    assert_eq!(cs.endpoint.port, Some(9443));
    assert_eq!(cs.endpoint.port_or_default(), 9443);
    assert_eq!(cs.endpoint.host_port(), "localhost:9443");
    assert_eq!(cs.entity_path.as_deref(), Some("hyco"));
    assert_eq!(cs.operation_timeout, Some(Duration::from_secs(90)));
}

#[test]
fn signature_string_keeps_its_equals_signs() {
    let cs = parse(&format!(
        "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessSignature={TOKEN};EntityPath=hyco"
    ));
    match &cs.auth {
        ConnectionStringAuth::Signature(t) => assert_eq!(t.as_str(), TOKEN),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cs.render(),
        format!("Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessSignature={TOKEN};EntityPath=hyco")
    );
    assert_eq!(
        err("Endpoint=sb://ns/;SharedAccessSignature=Bearer x"),
        ConnectionStringError::BadValue(
            "SharedAccessSignature",
            "must start with 'SharedAccessSignature '"
        )
    );
}

#[test]
fn managed_identity_and_anonymous() {
    for v in ["Managed Identity", "ManagedIdentity", "managed_identity"] {
        let cs = parse(&format!(
            "Endpoint=sb://ns/;Authentication={v};EntityPath=h"
        ));
        assert_eq!(cs.auth, ConnectionStringAuth::ManagedIdentity, "{v}");
        assert_eq!(
            cs.render(),
            "Endpoint=sb://ns/;Authentication=Managed Identity;EntityPath=h"
        );
    }
    assert!(matches!(
        err("Endpoint=sb://ns/;Authentication=Password"),
        ConnectionStringError::BadValue("Authentication", _)
    ));
    assert_eq!(
        err(&format!(
            "Endpoint=sb://ns/;Authentication=Managed Identity;SharedAccessKeyName=a;SharedAccessKey={K}"
        )),
        ConnectionStringError::AuthenticationAndKey
    );
    let anon = parse("Endpoint=sb://ns/;EntityPath=h");
    assert_eq!(anon.auth, ConnectionStringAuth::None);
    assert_eq!(anon.render(), "Endpoint=sb://ns/;EntityPath=h");
}

#[test]
fn timespans() {
    for (s, d) in [
        ("00:00:30", Duration::from_secs(30)),
        ("01:00:00", Duration::from_secs(3600)),
        ("1.02:03:04", Duration::from_secs(93784)),
        ("1.02:03:04.5", Duration::new(93784, 500_000_000)),
        ("00:00:01.0000001", Duration::new(1, 100)),
    ] {
        assert_eq!(parse_timespan(s), Some(d), "{s}");
    }
    for s in [
        "",
        "30",
        "00:60:00",
        "24:00:00",
        "00:00:60",
        "+1:00:00",
        "00:00:01.12345678",
        "00:00:01.",
        "1.2.03:04:05",
        "00:00:00:00",
        "-00:00:01",
        "a.00:00:01",
    ] {
        assert_eq!(parse_timespan(s), None, "{s}");
    }
    assert_eq!(
        err("Endpoint=sb://ns/;OperationTimeout=soon"),
        ConnectionStringError::BadValue("OperationTimeout", "expected hh:mm:ss or d.hh:mm:ss")
    );
}

#[test]
fn endpoints() {
    let e = |s: &str| parse(&format!("Endpoint={s}")).endpoint;
    assert_eq!(e("sb://ns").host_port(), "ns");
    assert_eq!(e("SB://ns:1/").port, Some(1));
    let v6 = e("sb://[::1]:9443/");
    assert_eq!(v6.host, "[::1]");
    assert_eq!(v6.host_port(), "[::1]:9443");
    assert_eq!(e("sb://127.0.0.1/").host, "127.0.0.1");
    for bad in [
        "https://ns/",
        "ns",
        "sb://",
        "sb:///",
        "sb://ns:0/",
        "sb://ns:99999/",
        "sb://ns:+80/",
        "sb://ns:/",
        "sb://ns:1:2/",
        "sb://ns/path",
        "sb://ns/?x=1",
        "sb://user@ns/",
        "sb://n s/",
        "sb://[::1/",
        "sb://[zz]/",
        "sb://-ns/",
    ] {
        match err(&format!("Endpoint={bad}")) {
            ConnectionStringError::BadEndpoint(why) => {
                assert!(why.contains(bad), "{why}");
                assert!(
                    format!("{}", ConnectionStringError::BadEndpoint(why.clone()))
                        .starts_with("Endpoint ")
                );
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn errors_name_the_part_and_hide_keys() {
    assert_eq!(
        err("Endpoint=sb://ns/;Foo=bar"),
        ConnectionStringError::UnknownKey("Foo".into())
    );
    assert!(err("Endpoint=sb://ns/;Foo=bar")
        .to_string()
        .contains("'Foo'"));
    assert_eq!(
        err("SharedAccessKeyName=a;SharedAccessKey=b"),
        ConnectionStringError::MissingEndpoint
    );
    assert_eq!(err(""), ConnectionStringError::MissingEndpoint);
    assert_eq!(
        err("Endpoint=sb://ns/;SharedAccessKeyName=a"),
        ConnectionStringError::KeyPair
    );
    assert_eq!(
        err(&format!("Endpoint=sb://ns/;SharedAccessKey={K}")),
        ConnectionStringError::KeyPair
    );
    assert_eq!(
        err("Endpoint=sb://ns/;garbage"),
        ConnectionStringError::NoEquals {
            part: 2,
            shown: " ('garbage')".into()
        }
    );
    assert_eq!(
        err(&format!(
            "Endpoint=sb://ns/;SharedAccessSignature={TOKEN};SharedAccessKeyName=a"
        )),
        ConnectionStringError::SignatureAndKey
    );
    assert_eq!(
        err("Endpoint=sb://a/;Endpoint=sb://b/"),
        ConnectionStringError::Duplicate("Endpoint")
    );
    assert_eq!(
        err("Endpoint=sb://a/;EntityPath=x;entitypath=y"),
        ConnectionStringError::Duplicate("EntityPath")
    );
    assert_eq!(
        err("Endpoint=sb://a/;EntityPath="),
        ConnectionStringError::BadValue("EntityPath", "empty")
    );
    // A key pasted with the wrong separator is never echoed.
    for s in [
        format!("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey:{K}"),
        format!(
            "Endpoint=sb://ns/;SharedAccessKeyName=a;{}",
            K.trim_end_matches('=')
        ),
        format!("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey={K};SharedAccessKey={K}"),
        format!("Endpoint=sb://ns/;SharedAccessKey={K}"),
        format!("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey={K};Foo"),
    ] {
        let msg = err(&s).to_string();
        assert!(!msg.contains(&K[..20]), "{msg}");
    }
}

#[test]
fn render_round_trips_and_debug_masks() {
    let s = format!(
        "Endpoint=sb://localhost:9443/;SharedAccessKeyName=l;SharedAccessKey={K};EntityPath=hyco"
    );
    let cs = parse(&s);
    assert_eq!(cs.render(), s);
    assert_eq!(parse(&cs.render()), cs);
    let from_str: ConnectionString = s.parse().unwrap();
    assert_eq!(from_str, cs);
    let no_entity = format!("Endpoint=sb://ns/;SharedAccessKeyName=l;SharedAccessKey={K}");
    assert_eq!(parse(&no_entity).render(), no_entity);
    // Non-canonical input renders canonically.
    let messy = format!(" EntityPath = hyco ; sharedaccesskey={K};;SHAREDACCESSKEYNAME=l;endpoint=sb://localhost:9443");
    assert_eq!(parse(&messy).render(), s);
    let dbg = format!("{cs:?}");
    assert!(!dbg.contains(K), "{dbg}");
    assert!(dbg.contains("***") && dbg.contains("hyco"), "{dbg}");
    let sig = parse(&format!("Endpoint=sb://ns/;SharedAccessSignature={TOKEN}"));
    let dbg = format!("{sig:?}");
    assert!(!dbg.contains("iLqy"), "{dbg}");
    let other = cs.with_entity("other");
    assert_eq!(other.entity_path.as_deref(), Some("other"));
    assert_eq!(other.endpoint, cs.endpoint);
    assert!(other.render().ends_with(";EntityPath=other"));
}
