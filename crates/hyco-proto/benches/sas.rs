//! SAS token parse + verify: what the relay does for every listen, connect and request.
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hyco_proto::sas::{resource_uri, sign, ParsedToken};
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
