//! Reading a request: the pieces every stage of the pipeline takes from its line and head.
//! A leaf: it knows the store's types and the protocol's, and no handler.

use std::sync::Arc;

use http::{header, Request};
use hyco_proto::address::{self, HcQuery};

use crate::error::RelayError;
use crate::store::{HybridConnection, Namespace};

/// The hybrid connection a path names, as the store has it now.
pub(crate) struct Entity {
    ns: Arc<Namespace>,
    /// Registry key and the path after the entity's name, when it exists.
    found: Option<(String, String)>,
    /// The name as addressed: the segments joined, for messages about a missing entity.
    addressed: String,
}

impl Entity {
    /// The longest existing hybrid connection the segments start with.
    pub(crate) fn resolve(ns: Arc<Namespace>, segments: &[&str]) -> Entity {
        let found = resolve(&ns, segments).map(|(key, _, rest)| (key, rest));
        Entity {
            ns,
            found,
            addressed: segments.join("/"),
        }
    }

    /// Like [`Entity::resolve`], but only a path that is exactly the entity's name finds it.
    pub(crate) fn exact(ns: Arc<Namespace>, segments: &[&str]) -> Entity {
        let mut e = Entity::resolve(ns, segments);
        e.found = e.found.filter(|(_, rest)| rest.is_empty());
        e
    }

    /// The namespace snapshot it was resolved in.
    pub(crate) fn ns(&self) -> &Namespace {
        &self.ns
    }

    /// The hybrid connection, when it exists.
    pub(crate) fn hc(&self) -> Option<&HybridConnection> {
        self.found
            .as_ref()
            .and_then(|(key, _)| self.ns.hcs.get(key))
    }

    /// Its registry key, when it exists.
    pub(crate) fn key(&self) -> Option<&str> {
        self.found.as_ref().map(|(key, _)| key.as_str())
    }

    /// The path after its name (the sender's arguments); empty when it does not exist.
    pub(crate) fn rest(&self) -> &str {
        self.found.as_ref().map_or("", |(_, rest)| rest.as_str())
    }

    /// Its name as created, or as addressed when it does not exist.
    pub(crate) fn name(&self) -> String {
        self.hc()
            .map_or_else(|| self.addressed.clone(), |hc| hc.name.clone())
    }

    /// The path a token's audience must cover: the entity and the path after it (a token may
    /// be signed for the whole URL, as Java's client does).
    pub(crate) fn audience(&self) -> String {
        match self.hc() {
            Some(hc) => format!("{}{}", hc.name, self.rest()),
            None => self.addressed.clone(),
        }
    }

    /// 404 for a hybrid connection that does not exist.
    pub(crate) fn missing(&self) -> RelayError {
        RelayError::NotFound(format!(
            "Endpoint does not exist. No hybrid connection '{}' in this namespace.",
            self.name()
        ))
    }
}

/// The longest existing hybrid connection that the segments start with, and the rest.
pub(crate) fn resolve<'a>(
    ns: &'a Namespace,
    segments: &[&str],
) -> Option<(String, &'a HybridConnection, String)> {
    for k in (1..=segments.len()).rev() {
        let name = segments[..k].join("/");
        if let Some(hc) = ns.hcs.get(&address::entity_key(&name)) {
            let rest: String = segments[k..].iter().map(|s| format!("/{s}")).collect();
            return Some((address::entity_key(&name), hc, rest));
        }
    }
    None
}

/// The `Host` the request came with (or its URI's authority), as sent.
pub(crate) fn host_of<B>(req: &Request<B>) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

/// A host without its port; an IPv6 literal loses its brackets too.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Whether a path is `/$hc` or under it (any case).
pub(crate) fn is_hc_path(path: &str) -> bool {
    path.len() >= 4
        && path[..4].eq_ignore_ascii_case("/$hc")
        && (path.len() == 4 || path.as_bytes()[4] == b'/')
}

/// Paths may carry an application's arguments; keep log lines short.
pub(crate) fn path_for_log(path: &str) -> &str {
    let mut end = path.len().min(120);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// The `sb-hc-*` parameters of a request, or 400.
pub(crate) fn parse_query(raw: Option<&str>) -> Result<HcQuery, RelayError> {
    HcQuery::parse(raw.unwrap_or("")).map_err(|e| RelayError::BadRequest(format!("Bad query: {e}")))
}

/// An accept or request-rendezvous address, read: its capability (`sb-hc-rv`) and the registry
/// key of the hybrid connection it names. Either missing: 403, as for a wrong capability.
pub(crate) fn rendezvous_address(
    ns: &Namespace,
    segments: &[&str],
    query: &HcQuery,
) -> Result<(String, String), RelayError> {
    let rv = query
        .extra_sb
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("sb-hc-rv"))
        .map(|(_, v)| v.clone())
        .ok_or(RelayError::RendezvousInvalid)?;
    let (hc_key, _, _) = resolve(ns, segments).ok_or(RelayError::RendezvousInvalid)?;
    Ok((rv, hc_key))
}

/// Header names the way Microsoft's clients spell them (Java looks them up case-sensitively).
fn canonical_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            if part.eq_ignore_ascii_case("websocket") {
                "WebSocket".to_owned()
            } else {
                let mut c = part.chars();
                match c.next() {
                    Some(f) => {
                        f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase()
                    }
                    None => String::new(),
                }
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// A sender's headers as a listener gets them: those `skip` names (lower-case) left out, names
/// in the usual capitalisation, repeated headers joined with ", ", non-text values dropped.
pub(crate) fn forwarded_headers(
    headers: &http::HeaderMap,
    skip: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        let n = name.as_str();
        if skip(n) {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            out.push((canonical_header_name(n), values.join(", ")));
        }
    }
    out
}
