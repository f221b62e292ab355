//! SAS token parse + verify: what the relay does for every listen, connect and request.
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hyco_proto::sas::{encode_component, resource_uri, sign, ParsedToken};
use hyco_proto::SecretKey;

fn bench(c: &mut Criterion) {
    let key = SecretKey::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let other = SecretKey::new("Jj3g/w48YCk26egSP4G+GshXq1dARFG0V5YNpLzKrI0=");
    let token = sign(
        &resource_uri("relay.example", Some("hyco")),
        "RootManageSharedAccessKey",
        &key,
        4_000_000_000,
    );
    c.bench_function("sas parse", |b| {
        b.iter(|| ParsedToken::parse(black_box(token.as_str())))
    });
    let parsed = ParsedToken::parse(token.as_str()).expect("valid token");
    c.bench_function("sas verify (primary, secondary)", |b| {
        b.iter(|| parsed.verify_signature(black_box(&[&other, &key])))
    });
    c.bench_function("sas verify unknown rule (dummy HMAC)", |b| {
        b.iter(|| parsed.verify_signature(black_box(&[])))
    });
    // Attacks A7: a signature wrong in its first byte and one wrong in its last byte must
    // cost the same (constant-time comparison), and both what a good one costs.
    let with_flipped_sig_byte = |index: usize| {
        use base64::Engine as _;
        let t = token.as_str();
        let start = t.find("sig=").expect("a sig field") + 4;
        let end = start + t[start..].find('&').unwrap_or(t.len() - start);
        let text: String = form_urlencoded::parse(format!("s={}", &t[start..end]).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .expect("a value");
        let mut sig = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64");
        sig[index] ^= 1;
        let new = encode_component(&base64::engine::general_purpose::STANDARD.encode(sig));
        ParsedToken::parse(&format!("{}{new}{}", &t[..start], &t[end..])).expect("well-formed")
    };
    let wrong_first = with_flipped_sig_byte(0);
    let wrong_last = with_flipped_sig_byte(31);
    c.bench_function("sas verify, signature wrong in the first byte", |b| {
        b.iter(|| wrong_first.verify_signature(black_box(&[&other, &key])))
    });
    c.bench_function("sas verify, signature wrong in the last byte", |b| {
        b.iter(|| wrong_last.verify_signature(black_box(&[&other, &key])))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
