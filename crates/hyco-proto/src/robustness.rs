//! Every parser against mutated and random input: no panic, ever (attacks.md A6, D10, D11).
//! A tiny deterministic generator stands in for the fuzzer so this runs with `cargo test`.

use crate::address::{split_hc_path, split_http_path, validate_entity_name};
use crate::control::ListenerCommand;
use crate::entity::{parse_endpoint_metadata, parse_entity_atom};
use crate::{Audience, ConnectionString, HcQuery, HostPort, ParsedToken, Rights, SecretKey};

/// xorshift64*: deterministic, good enough to shuffle bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const ALPHABET: &[char] = &[
    'a',
    'Z',
    '0',
    '9',
    '=',
    '&',
    ';',
    '%',
    '+',
    ' ',
    '/',
    ':',
    '?',
    '#',
    '[',
    ']',
    '{',
    '}',
    '"',
    '\\',
    '<',
    '>',
    '!',
    '.',
    '-',
    '_',
    '$',
    '\0',
    '\n',
    '\r',
    '\t',
    'é',
    '€',
    '\u{1F600}',
    '\'',
];

fn mutate(rng: &mut Rng, seed: &str) -> String {
    let mut chars: Vec<char> = seed.chars().collect();
    for _ in 0..=rng.below(4) {
        let c = ALPHABET[rng.below(ALPHABET.len())];
        let at = rng.below(chars.len() + 1);
        match rng.below(4) {
            0 if at < chars.len() => chars[at] = c,
            1 if at < chars.len() => {
                chars.remove(at);
            }
            2 => {
                // Duplicate a slice: repeated fields, nested brackets.
                let end = (at + rng.below(16)).min(chars.len());
                let piece: Vec<char> = chars[at..end].to_vec();
                for (i, p) in piece.into_iter().enumerate() {
                    chars.insert(end + i, p);
                }
            }
            _ => chars.insert(at, c),
        }
    }
    chars.into_iter().collect()
}

fn random(rng: &mut Rng) -> String {
    (0..rng.below(64))
        .map(|_| ALPHABET[rng.below(ALPHABET.len())])
        .collect()
}

const SEEDS: &[&str] = &[
    "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1735689600&skn=RootManageSharedAccessKey",
    "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=l;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=;EntityPath=hyco;OperationTimeout=1.00:01:00.5",
    "&foo=bar&sb-hc-action=accept&sb-hc-id=1&sb-hc-token=SharedAccessSignature+sr%3Dx&statusCode=404&sb-hc-undefined&",
    "/$hc/hyco/sub/./x",
    r#"{"response":{"requestId":"r","statusCode":"200","responseHeaders":{"A":"b"},"body":true}}"#,
    r#"{"accept":{"address":"wss://h/$hc/e?x","id":"1","connectHeaders":{"Host":"h"},"remoteEndpoint":{"address":"::1","port":1}}}"#,
    r#"[{"key":"endpoint","value":"[::1]:1433"}]"#,
    "<entry><title>t</title><content><HybridConnectionDescription><UserMetadata>a&amp;b</UserMetadata><ListenerCount>1</ListenerCount></HybridConnectionDescription></content></entry>",
    "http://[::1]:443/$hc/hyco?x#y",
    "db.corp:5432",
    "Listen, Send",
];

fn exercise(input: &str) {
    if let Ok(t) = ParsedToken::parse(input) {
        let _ = t
            .audience()
            .map(|a| a.covers("contoso.servicebus.windows.net:443", input));
        let _ = t.verify_signature(&[&SecretKey::new("k")]);
        let _ = t.is_expired(u64::MAX, u64::MAX);
        let _ = format!("{t:?}");
    }
    if let Ok(cs) = ConnectionString::parse(input) {
        let _ = cs.render();
        let _ = format!("{cs:?}");
        // What we render, we parse back to the same thing.
        assert_eq!(
            ConnectionString::parse(&cs.render()).map(|c| c.render()),
            Ok(cs.render()),
            "{input:?}"
        );
    }
    let _ = HcQuery::parse(input);
    let _ = split_hc_path(input);
    let _ = split_http_path(input);
    let _ = validate_entity_name(input);
    if let Ok(hp) = input.parse::<HostPort>() {
        assert_eq!(
            hp.to_string().parse::<HostPort>(),
            Ok(hp.clone()),
            "{input:?}"
        );
    }
    if let Ok(c) = ListenerCommand::parse(input) {
        assert_eq!(ListenerCommand::parse(&c.to_json()), Ok(c), "{input:?}");
    }
    let _ = parse_endpoint_metadata(input);
    let _ = parse_entity_atom(input);
    let _ = Audience::parse(input);
    let _ = Rights::parse_list(input);
    let _ = crate::address::sanitize_reason(input);
}

#[test]
fn parsers_survive_mutated_and_random_input() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut runs = 0;
    for seed in SEEDS {
        exercise(seed);
        for _ in 0..400 {
            exercise(&mutate(&mut rng, seed));
            runs += 1;
        }
    }
    for _ in 0..2000 {
        exercise(&random(&mut rng));
        runs += 1;
    }
    assert_eq!(runs, SEEDS.len() * 400 + 2000);
}
