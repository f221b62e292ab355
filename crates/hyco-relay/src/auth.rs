//! Authorization: find the token, verify it against the store's rules, check audience and
//! rights (protocol.md §3.3).
//!
//! Order matters for what an attacker can learn: the token is verified before the entity's
//! existence is revealed, an unknown key name costs the same HMAC as a known one, and no error
//! text carries the signature or the key.

use hyco_proto::rights::Need;
use hyco_proto::sas::ParsedToken;
use hyco_proto::SecretKey;

use crate::error::RelayError;
use crate::store::{HybridConnection, Namespace, Rule};

/// What a verified token proved.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    /// Its expiry (seconds since the epoch).
    pub(crate) expiry: u64,
}

/// One right a request asks for: on the namespace itself (`on: None`, the admin API) or on an
/// entity (the path the token's audience must cover, and the hybrid connection when it exists).
pub(crate) struct Want<'a> {
    pub(crate) on: Option<(&'a str, Option<&'a HybridConnection>)>,
    pub(crate) need: Need,
}

/// The names a token's audience host may be for a request that came with `host`: the
/// namespace's host names, and the host the client addressed, lower-case, its port stripped
/// the way the audience's is (an IPv6 literal keeps its brackets, as in `sb://[::1]/hc`).
pub(crate) fn hosts(hostnames: &[String], host: &str) -> Vec<String> {
    let mut hosts = hostnames.to_vec();
    hosts.push(hyco_proto::sas::host_without_port(host).to_ascii_lowercase());
    hosts
}

/// The one place that decides a request's rights. Refused with 429 while `ip` is throttled
/// (before any token is looked at); then the token is verified against each of `wants` in
/// turn: the first that grants wins, else the last refusal stands, and a 401 counts against
/// `ip`'s throttle.
pub(crate) fn check(
    throttle: &crate::throttle::AuthThrottle,
    ip: std::net::IpAddr,
    ns: &Namespace,
    hosts: &[String],
    token: Result<Option<&str>, NotText>,
    wants: &[Want<'_>],
) -> Result<Grant, RelayError> {
    throttle
        .check(ip)
        .map_err(|wait| RelayError::TooManyFailures(wait.as_secs()))?;
    let verdict = token.map_err(RelayError::from).and_then(|token| {
        let mut last = Err(RelayError::Unauthorized(
            "A SharedAccessSignature token is required.",
        ));
        for want in wants {
            last = authorize(ns, hosts, want.on, token, want.need, crate::unix_now());
            if last.is_ok() {
                break;
            }
        }
        last
    });
    if matches!(verdict, Err(RelayError::Unauthorized(_))) {
        throttle.failed(ip);
    }
    verdict
}

/// A credential header that is not text (bytes outside visible ASCII): no token can be in
/// it, and the refusal says so rather than that no token came (issue 15 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotText(pub(crate) &'static str);

impl From<NotText> for RelayError {
    fn from(e: NotText) -> RelayError {
        RelayError::Unauthorized(e.0)
    }
}

/// Where the credential came from (query first, then headers: protocol.md §3.3, attacks A2).
pub(crate) fn find_token<'a>(
    query_token: Option<&'a str>,
    headers: &'a http::HeaderMap,
) -> Result<Option<&'a str>, NotText> {
    if let Some(t) = query_token {
        return Ok(Some(t));
    }
    if let Some(v) = headers.get("servicebusauthorization") {
        return v.to_str().map(Some).map_err(|_| {
            NotText("The ServiceBusAuthorization header is not valid text; a SharedAccessSignature token is printable ASCII.")
        });
    }
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        return v.to_str().map(Some).map_err(|_| {
            NotText("The Authorization header is not valid text; a SharedAccessSignature token is printable ASCII.")
        });
    }
    Ok(None)
}

/// Verifies `token` for `need` on `entity` (None: the namespace itself, e.g. the admin API),
/// as of `now` (0: expiry not checked).
///
/// `hosts` are the names the namespace answers to; the audience host must be one of them.
pub(crate) fn authorize(
    ns: &Namespace,
    hosts: &[String],
    entity: Option<(&str, Option<&HybridConnection>)>,
    token: Option<&str>,
    need: Need,
    now: u64,
) -> Result<Grant, RelayError> {
    let token = token.ok_or(RelayError::Unauthorized(
        "A SharedAccessSignature token is required.",
    ))?;
    let parsed = ParsedToken::parse(token)
        .map_err(|_| RelayError::Unauthorized("The token is malformed."))?;
    let rule = find_rule(ns, entity.and_then(|(_, hc)| hc), parsed.key_name());
    let keys: Vec<SecretKey> = rule
        .map(|r| {
            vec![
                SecretKey::new(r.primary_key.clone()),
                SecretKey::new(r.secondary_key.clone()),
            ]
        })
        .unwrap_or_default();
    let key_refs: Vec<&SecretKey> = keys.iter().collect();
    if !parsed.verify_signature(&key_refs) || rule.is_none() {
        return Err(RelayError::Unauthorized(
            "The token has an invalid signature.",
        ));
    }
    let rule = rule.ok_or(RelayError::Unauthorized(
        "The token has an invalid signature.",
    ))?;
    if parsed.is_expired(now, 0) {
        return Err(RelayError::Unauthorized("The token is expired."));
    }
    let audience = parsed.audience().map_err(|_| {
        RelayError::Unauthorized("InvalidAudience: The token audience is malformed.")
    })?;
    let host_ok = hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(audience.host()));
    let path_ok = match entity {
        Some((name, _)) => audience.covers(audience.host(), name),
        None => audience.is_namespace_root(),
    };
    if !host_ok || !path_ok {
        return Err(RelayError::Unauthorized(
            "InvalidAudience: The authorization header contains a token with a wrong audience.",
        ));
    }
    if !rule.rights.allows(need) {
        return Err(RelayError::Forbidden(match need {
            Need::Listen => "The token does not grant Listen.",
            Need::Send => "The token does not grant Send.",
            Need::Manage => "The token does not grant Manage.",
        }));
    }
    Ok(Grant {
        expiry: parsed.expiry(),
    })
}

fn find_rule<'a>(
    ns: &'a Namespace,
    hc: Option<&'a HybridConnection>,
    key_name: &str,
) -> Option<&'a Rule> {
    ns.rules
        .iter()
        .find(|r| r.name == key_name)
        .or_else(|| hc.and_then(|hc| hc.rules.iter().find(|r| r.name == key_name)))
}
