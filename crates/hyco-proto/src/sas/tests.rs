use super::*;
use crate::address::HcQuery;

// protocol.md §3.8, vector 1 (.NET listener) and vector 2 (Node sender).
const KEY1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TOKEN1: &str = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1735689600&skn=RootManageSharedAccessKey";
const QUERY1_DOTNET: &str = "sb-hc-token=SharedAccessSignature+sr%3Dhttp%253A%252F%252Fcontoso.servicebus.windows.net%252Fhyco%252F%26sig%3DiLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%253D%26se%3D1735689600%26skn%3DRootManageSharedAccessKey";
const QUERY1_PYTHON: &str = "sb-hc-token=SharedAccessSignature%20sr%3Dhttp%253A%252F%252Fcontoso.servicebus.windows.net%252Fhyco%252F%26sig%3DiLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%253D%26se%3D1735689600%26skn%3DRootManageSharedAccessKey";
const KEY2: &str = "Jj3g/w48YCk26egSP4G+GshXq1dARFG0V5YNpLzKrI0=";
const TOKEN2: &str = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco&sig=u2Ga3WbU9VicYre5q9q77UbenV91yincJ4Uwz1DQDb8%3D&se=1767225600&skn=defaultSender";
const SENDER_URL2_QUERY: &str = "sb-hc-action=connect&sb-hc-token=SharedAccessSignature%20sr%3Dhttp%253A%252F%252Fcontoso.servicebus.windows.net%253A443%252Fhyco%26sig%3Du2Ga3WbU9VicYre5q9q77UbenV91yincJ4Uwz1DQDb8%253D%26se%3D1767225600%26skn%3DdefaultSender&sb-hc-id=4cb542c3-047a-4d40-a19f-bdc66441e736";
const HOST: &str = "contoso.servicebus.windows.net";

fn key1() -> SecretKey {
    SecretKey::new(KEY1)
}

#[test]
fn vector_1_sign_produces_the_exact_token() {
    let resource = resource_uri(HOST, Some("hyco/"));
    assert_eq!(resource, "http://contoso.servicebus.windows.net/hyco/");
    assert_eq!(
        encode_component(&resource),
        "http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F"
    );
    let t = sign(&resource, "RootManageSharedAccessKey", &key1(), 1735689600);
    assert_eq!(t.as_str(), TOKEN1);
}

#[test]
fn vector_1_verifies() {
    let p = ParsedToken::parse(TOKEN1).unwrap();
    assert!(p.verify_signature(&[&key1()]));
    assert_eq!(p.key_name(), "RootManageSharedAccessKey");
    assert_eq!(p.expiry(), 1735689600);
    assert_eq!(
        p.raw_resource(),
        "http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F"
    );
    let a = p.audience().unwrap();
    assert_eq!(a.host(), HOST);
    assert_eq!(a.segments(), ["hyco"]);
    assert!(a.covers(HOST, "hyco"));
    assert!(!p.verify_signature(&[&SecretKey::new("wrong")]));
}

#[test]
fn vector_1_query_forms_verify_after_one_form_decode() {
    for q in [QUERY1_DOTNET, QUERY1_PYTHON] {
        let token = HcQuery::parse(q).unwrap().token.unwrap();
        assert_eq!(token, TOKEN1);
        let p = ParsedToken::parse(&token).unwrap();
        assert!(p.verify_signature(&[&key1()]), "{q}");
        assert!(p.audience().unwrap().covers(HOST, "hyco"));
    }
}

#[test]
fn contrast_a_lower_hex_is_accepted() {
    let lower = "SharedAccessSignature sr=http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco%2f&sig=bqjpEj9l%2BG0xrzRyBCSKL6V%2ByeGW1pNQaR15rV7zfKE%3D&se=1735689600&skn=RootManageSharedAccessKey";
    let p = ParsedToken::parse(lower).unwrap();
    assert!(p.verify_signature(&[&key1()]));
    assert!(p.audience().unwrap().covers(HOST, "hyco"));
    // A literal '+' in sig (not %2B) is base64, not a space.
    let literal_plus = lower.replace("%2B", "+");
    assert!(ParsedToken::parse(&literal_plus)
        .unwrap()
        .verify_signature(&[&key1()]));
}

#[test]
fn contrast_b_decoded_key_is_rejected() {
    let decoded_key = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=bh5MCUW0U7EAIKyOqcBfyIPeJWOsLULgFWisEsNS2h8%3D&se=1735689600&skn=RootManageSharedAccessKey";
    let p = ParsedToken::parse(decoded_key).unwrap();
    assert!(!p.verify_signature(&[&key1()]));
}

#[test]
fn vector_2_node_sender_verifies() {
    let key = SecretKey::new(KEY2);
    let resource = "http://contoso.servicebus.windows.net:443/hyco";
    assert_eq!(
        sign(resource, "defaultSender", &key, 1767225600).as_str(),
        TOKEN2
    );
    let p = ParsedToken::parse(TOKEN2).unwrap();
    // Every key is tried: the right one second still verifies.
    assert!(p.verify_signature(&[&SecretKey::new("wrong"), &key]));
    assert!(p.verify_signature(&[&key, &SecretKey::new("wrong")]));
    let a = p.audience().unwrap();
    assert_eq!(a.host(), HOST);
    assert!(a.covers("contoso.servicebus.windows.net:443", "hyco"));
    assert!(!p.verify_signature(&[]));
    let q = HcQuery::parse(SENDER_URL2_QUERY).unwrap();
    assert_eq!(q.token.as_deref(), Some(TOKEN2));
    assert_eq!(q.app_query, "");
}

#[test]
fn audience_forms_of_each_client() {
    for uri in [
        "http://contoso.servicebus.windows.net/hyco/", // .NET
        "http://contoso.servicebus.windows.net:443/hyco", // Node
        "sb://contoso.servicebus.windows.net/hyco",    // Java listener
        "https://contoso.servicebus.windows.net/hyco",
        "wss://Contoso.Servicebus.Windows.Net/$hc/HYCO?sb-hc-action=listen#frag",
        "ws://contoso.servicebus.windows.net/$HC/hyco/",
    ] {
        let a = Audience::parse(uri).unwrap();
        assert_eq!(a.host(), HOST, "{uri}");
        assert_eq!(a.segments(), ["hyco"], "{uri}");
        assert!(!a.is_namespace_root(), "{uri}");
        assert!(a.covers(HOST, "hyco"), "{uri}");
        assert!(
            a.covers("CONTOSO.servicebus.windows.net:9443", "hyco"),
            "{uri}"
        );
        assert!(a.covers(HOST, "hyco/sub"), "{uri}");
        assert!(!a.covers(HOST, "hyco2"), "{uri}");
        assert!(!a.covers("other.example", "hyco"), "{uri}");
    }
    // Java sender: namespace only; also the .NET test helper's root form.
    for uri in [
        "sb://contoso.servicebus.windows.net",
        "http://contoso.servicebus.windows.net/",
        "http://contoso.servicebus.windows.net/$hc/",
    ] {
        let root = Audience::parse(uri).unwrap();
        assert!(root.is_namespace_root(), "{uri}");
        assert!(root.covers(HOST, "anything"));
        assert!(root.covers(HOST, "a/b/c"));
    }
}

#[test]
fn audience_prefix_only_on_segment_boundaries() {
    let a = Audience::parse("http://ns/hc1").unwrap();
    for (e, ok) in [
        ("hc1", true),
        ("HC1", true),
        ("hc1/", true),
        ("hc1/sub", true),
        ("Hc1/Sub/deeper", true),
        ("hc10", false),
        ("hc1x", false),
        ("hc", false),
        ("hc2/hc1", false),
        ("", false),
    ] {
        assert_eq!(a.covers("ns", e), ok, "{e}");
    }
    let nested = Audience::parse("http://ns/a/b/").unwrap();
    assert!(nested.covers("ns", "a/b/c"));
    assert!(!nested.covers("ns", "a"));
    assert!(!nested.covers("ns", "a/bc"));
}

// Java's client signs the whole request URL, path after the entity and query included, with
// spaces as `%20` (HybridConnectionListenerTest.java's parseRequestPathWithSpacesAndQueryTest
// passes that URL to TokenProvider.getTokenAsync, TokenProvider.java:67-75). Such an audience
// covers that path, spelled either way, and nothing beside it.
#[test]
fn an_audience_may_name_the_path_after_the_entity() {
    let url = "https://localhost:443/javatest/extra%20Path/extra%20%20Path2?queryKey=queryValue&queryKey2=queryValue;";
    let token = sign(url, "k", &SecretKey::new(KEY1), 1);
    let t = ParsedToken::parse(token.as_str()).unwrap();
    let a = t.audience().unwrap();
    assert!(a.covers("localhost", "javatest/extra%20Path/extra%20%20Path2"));
    assert!(a.covers("localhost", "javatest/extra Path/extra  Path2"));
    assert!(a.covers("localhost", "javatest/extra%20path/extra%20%20path2/more"));
    assert!(!a.covers("localhost", "javatest"));
    assert!(!a.covers("localhost", "javatest/extra%20Path"));
    assert!(!a.covers("localhost", "javatest/other/extra%20%20Path2"));
}

#[test]
fn audience_ipv6_and_refusals() {
    let a = Audience::parse("http://[::1]:9443/hyco").unwrap();
    assert_eq!(a.host(), "[::1]");
    assert!(a.covers("[::1]:9443", "hyco"));
    assert!(a.covers("[::1]", "hyco"));
    assert_eq!(
        resource_uri("[::1]:9443", Some("hyco")),
        "http://[::1]/hyco"
    );
    assert_eq!(
        resource_uri("Contoso.Example:9443", None),
        "http://contoso.example/"
    );
    for bad in [
        "nohost",
        "http:///x",
        "://h/x",
        "ht tp://h/x",
        "http://user@h/x",
        "http://h:abc/x",
        "http://h/./x",
        "http://h/x/../y",
        "http://[zz]/x",
        "http://h\r\n/x",
        "",
    ] {
        assert!(Audience::parse(bad).is_err(), "{bad:?}");
    }
    let empty_sr =
        "SharedAccessSignature sr=&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1&skn=k";
    assert_eq!(
        ParsedToken::parse(empty_sr).err(),
        Some(SasError::BadAudience)
    );
    let bad_utf8 = "SharedAccessSignature sr=%FF&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1&skn=k";
    assert_eq!(
        ParsedToken::parse(bad_utf8).unwrap().audience(),
        Err(SasError::BadAudience)
    );
}

#[test]
fn encode_component_matches_encode_uri_component() {
    assert_eq!(
        encode_component("a b+c/d=e&f?g:h%i"),
        "a%20b%2Bc%2Fd%3De%26f%3Fg%3Ah%25i"
    );
    assert_eq!(encode_component("-_.!~*'()AZaz09"), "-_.!~*'()AZaz09");
    assert_eq!(encode_component("é"), "%C3%A9");
}

fn tok(fields: &str) -> String {
    format!("SharedAccessSignature {fields}")
}

const SIG: &str = "iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D";

#[test]
fn a6_malformed_tokens_are_refused_without_panic() {
    let cases: Vec<(String, SasError)> = vec![
        (
            tok(&format!("sr=a&sr=b&sig={SIG}&se=1&skn=k")),
            SasError::Duplicate("sr"),
        ),
        (
            tok(&format!("sr=a&SR=b&sig={SIG}&se=1&skn=k")),
            SasError::Duplicate("sr"),
        ),
        (
            tok(&format!("sr=a&sig={SIG}&skn=k")),
            SasError::Missing("se"),
        ),
        (tok("sr=a&se=1&skn=k"), SasError::Missing("sig")),
        (
            tok(&format!("sig={SIG}&se=1&skn=k")),
            SasError::Missing("sr"),
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1")),
            SasError::Missing("skn"),
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=99999999999999999999&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=123456789012345678901&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=-1&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=+1&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1.5&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se= 123&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=&skn=k")),
            SasError::BadExpiry,
        ),
        (
            tok("sr=a&sig=not*base64!&se=1&skn=k"),
            SasError::BadSignature,
        ),
        (
            // URL-safe alphabet (the same 32 bytes as vector 1 would need '-' or '_').
            tok("sr=a&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8_&se=1&skn=k"),
            SasError::BadSignature,
        ),
        (
            tok("sr=a&sig=-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_8%3D&se=1&skn=k"),
            SasError::BadSignature,
        ),
        (
            // Valid base64 of 16 bytes: wrong length.
            tok("sr=a&sig=AAAAAAAAAAAAAAAAAAAAAA%3D%3D&se=1&skn=k"),
            SasError::BadSignature,
        ),
        (
            // Missing padding.
            tok("sr=a&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8&se=1&skn=k"),
            SasError::BadSignature,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn={}", "k".repeat(10_000))),
            SasError::TooLong,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn={}", "k".repeat(300))),
            SasError::BadKeyName,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn=")),
            SasError::BadKeyName,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn=%FF")),
            SasError::BadKeyName,
        ),
        (tok(&"a=b&".repeat(5000)), SasError::TooLong),
        (tok(&"a=b&".repeat(20)), SasError::TooManyFields),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn=k&junk")),
            SasError::BadField,
        ),
        (
            tok(&format!("sr=a&sig={SIG}&se=1&skn=k&")),
            SasError::BadField,
        ),
        (
            format!("SharedAccessSignature  sr=a&sig={SIG}&se=1&skn=k"),
            SasError::BadPrefix,
        ),
        (
            format!("SharedAccessSignature\tsr=a&sig={SIG}&se=1&skn=k"),
            SasError::BadPrefix,
        ),
        (
            format!("SharedAccessSignaturesr=a&sig={SIG}&se=1&skn=k"),
            SasError::BadPrefix,
        ),
        ("Bearer eyJhbGciOi".into(), SasError::BadPrefix),
        ("SharedAccessSignature".into(), SasError::BadPrefix),
        ("Shared\u{e9}".into(), SasError::BadPrefix),
        ("".into(), SasError::BadPrefix),
    ];
    let n = cases.len();
    for (input, want) in &cases {
        let got = ParsedToken::parse(input);
        assert_eq!(
            got.as_ref().err(),
            Some(want),
            "{}",
            &input[..input.len().min(80)]
        );
    }
    assert_eq!(n, 33, "every case ran");
}

#[test]
fn a6_prefix_case_and_extra_fields_accepted() {
    let lower = TOKEN1.replacen("SharedAccessSignature", "sharedaccesssignature", 1);
    assert!(ParsedToken::parse(&lower)
        .unwrap()
        .verify_signature(&[&key1()]));
    let reordered = "SharedAccessSignature skn=RootManageSharedAccessKey&SE=1735689600&Sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&x=y&sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F";
    assert!(ParsedToken::parse(reordered)
        .unwrap()
        .verify_signature(&[&key1()]));
    // se "0001735689600" parses to the same number but was not what was signed.
    let padded = TOKEN1.replace("se=1735689600", "se=0001735689600");
    let p = ParsedToken::parse(&padded).unwrap();
    assert_eq!(p.expiry(), 1735689600);
    assert!(!p.verify_signature(&[&key1()]));
    let max = tok(&format!("sr=a&sig={SIG}&se=18446744073709551615&skn=k"));
    assert_eq!(ParsedToken::parse(&max).unwrap().expiry(), u64::MAX);
}

#[test]
fn debug_and_errors_never_show_the_signature() {
    let p = ParsedToken::parse(TOKEN1).unwrap();
    let d = format!("{p:?}");
    assert!(!d.contains("iLqy8P8174"), "{d}");
    let e = ParsedToken::parse(&tok(
        "sr=a&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrm&se=1&skn=k",
    ))
    .unwrap_err();
    assert!(!e.to_string().contains("iLqy"));
}

#[test]
fn expiry_with_grace() {
    let p = ParsedToken::parse(TOKEN1).unwrap();
    assert!(!p.is_expired(1735689599, 0));
    assert!(p.is_expired(1735689600, 0));
    assert!(!p.is_expired(1735689600, 300));
    assert!(!p.is_expired(1735689899, 300));
    assert!(p.is_expired(1735689900, 300));
    let max = tok(&format!("sr=a&sig={SIG}&se=18446744073709551615&skn=k"));
    assert!(!ParsedToken::parse(&max)
        .unwrap()
        .is_expired(u64::MAX - 1, u64::MAX));
}
