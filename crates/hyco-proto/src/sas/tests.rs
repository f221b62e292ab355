use super::*;

const KEY1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const TOKEN1: &str = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1735689600&skn=RootManageSharedAccessKey";
const KEY2: &str = "Jj3g/w48YCk26egSP4G+GshXq1dARFG0V5YNpLzKrI0=";
const TOKEN2: &str = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco&sig=u2Ga3WbU9VicYre5q9q77UbenV91yincJ4Uwz1DQDb8%3D&se=1767225600&skn=defaultSender";

fn form_decode(q: &str) -> String {
    form_urlencoded::parse(q.as_bytes())
        .next()
        .unwrap()
        .1
        .into_owned()
}

#[test]
fn vector_1_signs_and_verifies() {
    let key = SecretKey::new(KEY1);
    let t = sign(
        "http://contoso.servicebus.windows.net/hyco/",
        "RootManageSharedAccessKey",
        &key,
        1735689600,
    );
    assert_eq!(t.as_str(), TOKEN1);
    let p = ParsedToken::parse(TOKEN1).unwrap();
    assert!(p.verify_signature(&[&key]));
    assert_eq!(p.key_name(), "RootManageSharedAccessKey");
    let a = p.audience().unwrap();
    assert_eq!(a.host(), "contoso.servicebus.windows.net");
    assert!(a.covers("contoso.servicebus.windows.net", "hyco"));
}

#[test]
fn vector_1_query_forms_decode_to_the_token() {
    let dotnet = "sb-hc-token=SharedAccessSignature+sr%3Dhttp%253A%252F%252Fcontoso.servicebus.windows.net%252Fhyco%252F%26sig%3DiLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%253D%26se%3D1735689600%26skn%3DRootManageSharedAccessKey";
    let python = "sb-hc-token=SharedAccessSignature%20sr%3Dhttp%253A%252F%252Fcontoso.servicebus.windows.net%252Fhyco%252F%26sig%3DiLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%253D%26se%3D1735689600%26skn%3DRootManageSharedAccessKey";
    assert_eq!(form_decode(dotnet), TOKEN1);
    assert_eq!(form_decode(python), TOKEN1);
}

#[test]
fn contrasts_lower_hex_valid_decoded_key_invalid() {
    let key = SecretKey::new(KEY1);
    let lower = "SharedAccessSignature sr=http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco%2f&sig=bqjpEj9l%2BG0xrzRyBCSKL6V%2ByeGW1pNQaR15rV7zfKE%3D&se=1735689600&skn=RootManageSharedAccessKey";
    assert!(ParsedToken::parse(lower).unwrap().verify_signature(&[&key]));
    let decoded_key = "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=bh5MCUW0U7EAIKyOqcBfyIPeJWOsLULgFWisEsNS2h8%3D&se=1735689600&skn=RootManageSharedAccessKey";
    assert!(!ParsedToken::parse(decoded_key)
        .unwrap()
        .verify_signature(&[&key]));
}

#[test]
fn vector_2_node_sender() {
    let p = ParsedToken::parse(TOKEN2).unwrap();
    assert!(p.verify_signature(&[&SecretKey::new("wrong"), &SecretKey::new(KEY2)]));
    assert!(p
        .audience()
        .unwrap()
        .covers("contoso.servicebus.windows.net:443", "hyco"));
    assert!(!p.verify_signature(&[]));
}

#[test]
fn audience_forms_of_each_client() {
    for uri in [
        "http://contoso.servicebus.windows.net/hyco/",
        "http://contoso.servicebus.windows.net:443/hyco",
        "sb://contoso.servicebus.windows.net/hyco",
        "wss://Contoso.Servicebus.Windows.Net/$hc/HYCO?x=1",
    ] {
        let a = Audience::parse(uri).unwrap();
        assert!(a.covers("contoso.servicebus.windows.net", "hyco"), "{uri}");
        assert!(
            a.covers("contoso.servicebus.windows.net", "hyco/sub"),
            "{uri}"
        );
        assert!(
            !a.covers("contoso.servicebus.windows.net", "hyco2"),
            "{uri}"
        );
        assert!(!a.covers("other.example", "hyco"), "{uri}");
    }
    let root = Audience::parse("sb://contoso.servicebus.windows.net").unwrap();
    assert!(root.is_namespace_root());
    assert!(root.covers("contoso.servicebus.windows.net", "anything"));
    let a = Audience::parse("http://ns/hc1").unwrap();
    for (e, ok) in [
        ("hc10", false),
        ("hc1x", false),
        ("HC1", true),
        ("hc1/", true),
        ("hc1/sub", true),
    ] {
        assert_eq!(a.covers("ns", e), ok, "{e}");
    }
    assert!(Audience::parse("nohost").is_err());
    assert!(Audience::parse("http:///x").is_err());
}

#[test]
fn malformed_tokens_are_refused_without_panic() {
    let base = |f: &str| format!("SharedAccessSignature {f}");
    let good_sig = "iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D";
    let cases = [
        base(&format!("sr=a&sr=b&sig={good_sig}&se=1&skn=k")),
        base(&format!("sr=a&sig={good_sig}&skn=k")),
        base(&format!(
            "sr=a&sig={good_sig}&se=99999999999999999999&skn=k"
        )),
        base(&format!("sr=a&sig={good_sig}&se=-1&skn=k")),
        base(&format!("sr=a&sig={good_sig}&se=1.5&skn=k")),
        base(&format!("sr=a&sig={good_sig}&se= 123&skn=k")),
        base("sr=a&sig=not*base64&se=1&skn=k"),
        base("sr=a&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8_&se=1&skn=k"),
        base(&format!(
            "sr=a&sig={good_sig}&se=1&skn={}",
            "k".repeat(10_000)
        )),
        base(&"a=b&".repeat(5000)),
        format!("SharedAccessSignature  sr=a&sig={good_sig}&se=1&skn=k"),
        "Bearer abc".into(),
        "".into(),
    ];
    for c in &cases {
        assert!(ParsedToken::parse(c).is_err(), "{}", &c[..c.len().min(80)]);
    }
    let lower = TOKEN1.replacen("SharedAccessSignature", "sharedaccesssignature", 1);
    assert!(ParsedToken::parse(&lower).is_ok());
}

#[test]
fn expiry_with_grace() {
    let p = ParsedToken::parse(TOKEN1).unwrap();
    assert!(!p.is_expired(1735689599, 0));
    assert!(p.is_expired(1735689600, 0));
    assert!(!p.is_expired(1735689600, 300));
}
