//! The management API, under the reserved prefix `/$hyco/v1` (no entity name can start with
//! `$`). Authorized by a token with Manage on the namespace (or on the entity for per-entity
//! calls). JSON in and out; errors as `{"error":{"code","message"}}`.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /$hyco/v1/hybridconnections` | list |
//! | `PUT /$hyco/v1/hybridconnections/{hc}` | create (`{"requiresClientAuthorization", "userMetadata"}`) |
//! | `GET /$hyco/v1/hybridconnections/{hc}` | get |
//! | `DELETE /$hyco/v1/hybridconnections/{hc}` | delete; its listeners are closed with 1001 |
//! | `PATCH /$hyco/v1/hybridconnections/{hc}` | update `requiresClientAuthorization` and/or `userMetadata` (`null` clears it) |
//! | `GET /$hyco/v1/hybridconnections/{hc}/listeners` | live listeners: id, remote address, since, last seen |
//! | `GET /$hyco/v1/hybridconnections/{hc}/connections` | live tunnels: id, sender address, since, bytes each way |
//! | `…/authorizationrules` | list rules (name and rights, no keys) |
//! | `PUT …/authorizationrules/{rule}` | create (`{"rights":["Listen","Send"]}`, 201) or change rights keeping the keys (200); returns keys and connection strings |
//! | `GET …/authorizationrules/{rule}` | name and rights |
//! | `DELETE …/authorizationrules/{rule}` | delete (not the last namespace rule with Manage) |
//! | `POST …/authorizationrules/{rule}/listkeys` | keys and connection strings |
//! | `POST …/authorizationrules/{rule}/regeneratekeys` | `{"keyType":"PrimaryKey"}` or `SecondaryKey`: a new key; tokens signed with the other keep working |
//!
//! `…` is `/$hyco/v1` for namespace rules or `/$hyco/v1/hybridconnections/{hc}` for entity rules.
//! The full contract, with schemas, is `docs/openapi.json`.

use std::sync::Arc;

use base64::Engine as _;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyco_proto::rights::Need;
use hyco_proto::{ConnectionString, Rights};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::auth::{Grant, Want};
use crate::error::{Body, RelayError};
use crate::store::{HybridConnection, Namespace, Rule, StoreError};
use crate::Shared;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HcCreate {
    #[serde(default)]
    requires_client_authorization: Option<bool>,
    #[serde(default)]
    user_metadata: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HcUpdate {
    #[serde(default)]
    requires_client_authorization: Option<bool>,
    /// Absent: unchanged; `null`: cleared.
    #[serde(default, deserialize_with = "present")]
    user_metadata: Option<Option<String>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleCreate {
    rights: Rights,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Regenerate {
    #[serde(default)]
    key_type: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RuleView {
    name: String,
    rights: Rights,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListenerView {
    id: String,
    remote_address: String,
    since: String,
    last_seen: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionView {
    id: String,
    sender_address: String,
    since: String,
    bytes_sender_to_listener: u64,
    bytes_listener_to_sender: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HcView {
    name: String,
    requires_client_authorization: bool,
    user_metadata: Option<String>,
    created_at: String,
    updated_at: String,
    listener_count: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RuleKeys {
    key_name: String,
    rights: Rights,
    primary_key: String,
    secondary_key: String,
    primary_connection_string: String,
    secondary_connection_string: String,
}

fn store_err(e: StoreError) -> RelayError {
    match e {
        StoreError::Exists(what) => RelayError::Conflict(format!("{what}.")),
        StoreError::NotFound(what) => RelayError::NotFound(format!("{what}.")),
        StoreError::Refused(why) => RelayError::Conflict(why),
        StoreError::Unavailable(why) => {
            RelayError::StoreUnavailable(format!("The cluster store is unavailable: {why}"))
        }
        e @ StoreError::Unverified { .. } => RelayError::StoreUnavailable(format!(
            "{e}; restore it with `hyco cluster migrate --replace --cluster-secret-file …`"
        )),
        other => RelayError::Internal(other.to_string()),
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Result<Response<Body>, RelayError> {
    let body = serde_json::to_vec(v).map_err(|e| RelayError::Internal(e.to_string()))?;
    let mut resp = Response::new(crate::error::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    Ok(resp)
}

async fn read_json<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, RelayError> {
    let body = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| {
            RelayError::BadRequest("Request body too large or broken (64 KiB max).".into())
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| RelayError::BadRequest(format!("Invalid JSON body: {e}")))
}

/// A fresh key: base64 of 256 random bits, like Azure's.
pub(crate) fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Renders a connection string for a rule.
pub(crate) fn connection_string(
    shared: &Shared,
    rule: &str,
    key: &str,
    entity: Option<&str>,
) -> Result<String, RelayError> {
    let mut s = format!(
        "Endpoint=sb://{}/;SharedAccessKeyName={rule};SharedAccessKey={key}",
        shared.cfg.public_host
    );
    if let Some(e) = entity {
        s.push_str(";EntityPath=");
        s.push_str(e);
    }
    // Round-trip through the parser so we never print a string our clients refuse.
    ConnectionString::parse(&s)
        .map(|cs| cs.render())
        .map_err(|e| {
            RelayError::Internal(format!("rendered connection string does not parse: {e}"))
        })
}

fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// An admin call, parsed: its method and its path's segments, each percent-decoded once
/// (names are segments, never paths: issue 15 §3).
pub(crate) struct Call {
    method: Method,
    parts: Vec<String>,
    ns: Arc<Namespace>,
}

impl Call {
    /// Reads `/$hyco/v1/…` against the store as it is now (`ns`); 404 outside it, 400 for a
    /// segment that does not decode.
    pub(crate) fn parse<B>(req: &Request<B>, ns: Arc<Namespace>) -> Result<Call, RelayError> {
        let rest = req
            .uri()
            .path()
            .strip_prefix("/$hyco/v1/")
            .ok_or_else(|| RelayError::NotFound("Not found.".into()))?;
        let parts: Vec<String> = rest
            .split('/')
            .filter(|p| !p.is_empty())
            .map(hyco_proto::names::decode_segment)
            .collect::<Result<_, _>>()
            .map_err(|e| RelayError::BadRequest(format!("Bad path: {e}.")))?;
        Ok(Call {
            method: req.method().clone(),
            parts,
            ns,
        })
    }

    /// The hybrid connection a per-entity call names.
    fn entity(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [first, name, ..] if first == "hybridconnections" => Some(name.as_str()),
            _ => None,
        }
    }

    /// The rights it needs: Manage on the namespace, or (per-entity calls) on the entity.
    /// `check` is the pipeline's one authorization, given the store as it is now.
    pub(crate) fn authorize(
        &self,
        check: impl FnOnce(&Namespace, &[Want<'_>]) -> Result<Grant, RelayError>,
    ) -> Result<Grant, RelayError> {
        let ns = &self.ns;
        let mut wants = vec![Want {
            on: None,
            need: Need::Manage,
        }];
        if let Some(name) = self.entity() {
            let hc = ns.hcs.get(&hyco_proto::address::entity_key(name));
            wants.push(Want {
                on: Some((name, hc)),
                need: Need::Manage,
            });
        }
        check(ns, &wants)
    }
}

/// Handles an authorized `/$hyco/v1/…` call.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    call: Call,
) -> Result<Response<Body>, RelayError> {
    if let Some(name) = call.entity() {
        hyco_proto::names::check_hc_ref(name).map_err(|e| {
            RelayError::BadRequest(format!(
                "Invalid hybrid connection name '{}': {e}.",
                shown(name)
            ))
        })?;
    }
    let ns = &call.ns;
    let parts: Vec<&str> = call.parts.iter().map(String::as_str).collect();
    match (call.method.clone(), parts.as_slice()) {
        (Method::GET, ["hybridconnections"]) => {
            let list: Vec<HcView> = ns.hcs.iter().map(|(k, hc)| view(shared, k, hc)).collect();
            json(StatusCode::OK, &serde_json::json!({ "value": list }))
        }
        (Method::GET, ["hybridconnections", name]) => {
            let (key, hc) = existing(ns, name)?;
            json(StatusCode::OK, &view(shared, &key, hc))
        }
        (Method::PUT, ["hybridconnections", name]) => create_hc(shared, req, name).await,
        (Method::PATCH, ["hybridconnections", name]) => update_hc(shared, req, name).await,
        (Method::DELETE, ["hybridconnections", name]) => delete_hc(shared, name).await,
        (Method::GET, ["hybridconnections", name, "listeners"]) => {
            listeners(shared, &existing(ns, name)?.0)
        }
        (Method::GET, ["hybridconnections", name, "connections"]) => {
            connections(shared, &existing(ns, name)?.0)
        }
        (m, ["hybridconnections", name, "authorizationrules", rest @ ..]) => {
            let hc = ns.hcs.get(&hyco_proto::address::entity_key(name));
            let entity = hc.map(|h| h.name.clone()).ok_or_else(|| {
                RelayError::NotFound(format!("Hybrid connection '{name}' does not exist."))
            })?;
            rules(shared, req, m, Some(&entity), rest).await
        }
        (m, ["authorizationrules", rest @ ..]) => rules(shared, req, m, None, rest).await,
        (_, ["hybridconnections"])
        | (_, ["hybridconnections", _])
        | (_, ["hybridconnections", _, "listeners" | "connections"]) => {
            Err(RelayError::MethodNotAllowed)
        }
        _ => Err(RelayError::NotFound("No such management operation.".into())),
    }
}

/// `PUT …/hybridconnections/{hc}`.
async fn create_hc(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, RelayError> {
    hyco_proto::names::validate_hc_name(name).map_err(|e| {
        RelayError::BadRequest(format!(
            "Invalid hybrid connection name '{}': {e}.",
            shown(name)
        ))
    })?;
    let body: HcCreate = read_json(req).await?;
    check_metadata(body.user_metadata.as_deref())?;
    let now = now_rfc3339();
    let hc = HybridConnection {
        name: name.to_owned(),
        requires_client_authorization: body.requires_client_authorization.unwrap_or(true),
        user_metadata: body.user_metadata,
        created_at: now.clone(),
        updated_at: now,
        rules: Vec::new(),
    };
    let created = write(shared, move |s| s.create_hc(hc)).await?;
    info!(event = "HybridConnectionCreated", hc = %created.name, "admin");
    let key = hyco_proto::address::entity_key(name);
    json(StatusCode::CREATED, &view(shared, &key, &created))
}

/// `PATCH …/hybridconnections/{hc}`.
async fn update_hc(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, RelayError> {
    let body: HcUpdate = read_json(req).await?;
    if let Some(Some(m)) = &body.user_metadata {
        check_metadata(Some(m))?;
    }
    let n = name.to_owned();
    let updated = write(shared, move |s| {
        s.update_hc(
            &n,
            body.requires_client_authorization,
            body.user_metadata,
            now_rfc3339(),
        )
    })
    .await?;
    info!(event = "HybridConnectionUpdated", hc = %updated.name, "admin");
    let key = hyco_proto::address::entity_key(name);
    json(StatusCode::OK, &view(shared, &key, &updated))
}

/// `DELETE …/hybridconnections/{hc}`.
async fn delete_hc(shared: &Arc<Shared>, name: &str) -> Result<Response<Body>, RelayError> {
    let n = name.to_owned();
    let deleted = write(shared, move |s| s.delete_hc(&n)).await?;
    // Its listeners leave the registry now, each asked to close with 1001; their control
    // channels also see the change (`control.rs`), here and on other nodes.
    shared.registry.evict(
        &hyco_proto::address::entity_key(&deleted.name),
        1001,
        "The hybrid connection was deleted.",
    );
    info!(event = "HybridConnectionDeleted", hc = %deleted.name, "admin");
    no_content()
}

/// `GET …/hybridconnections/{hc}/listeners`.
fn listeners(shared: &Shared, key: &str) -> Result<Response<Body>, RelayError> {
    let list: Vec<ListenerView> = shared
        .registry
        .list(key)
        .iter()
        .map(|e| ListenerView {
            id: e.listener_id.clone(),
            remote_address: e.remote.to_string(),
            since: rfc3339(e.since),
            last_seen: rfc3339(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(
                        e.last_seen.load(std::sync::atomic::Ordering::Relaxed),
                    ),
            ),
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "value": list }))
}

/// `GET …/hybridconnections/{hc}/connections`.
fn connections(shared: &Shared, key: &str) -> Result<Response<Body>, RelayError> {
    let mut list: Vec<ConnectionView> = crate::lock(&shared.tunnels)
        .values()
        .filter(|t| t.hc_key == key)
        .map(|t| ConnectionView {
            id: t.id.clone(),
            sender_address: t.peer.to_string(),
            since: rfc3339(t.since),
            bytes_sender_to_listener: t.counters.a_to_b.load(std::sync::atomic::Ordering::Relaxed),
            bytes_listener_to_sender: t.counters.b_to_a.load(std::sync::atomic::Ordering::Relaxed),
        })
        .collect();
    list.sort_by(|a, b| a.since.cmp(&b.since));
    json(StatusCode::OK, &serde_json::json!({ "value": list }))
}

/// Rules of one scope: `entity` is `None` for the namespace.
async fn rules(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    method: Method,
    entity: Option<&str>,
    rest: &[&str],
) -> Result<Response<Body>, RelayError> {
    let ns = shared.store.snapshot();
    let current: &[Rule] = match entity {
        None => &ns.rules,
        Some(e) => existing(&ns, e)?.1.rules.as_slice(),
    };
    let find = |name: &str| {
        current.iter().find(|r| r.name == name).ok_or_else(|| {
            RelayError::NotFound(format!("Authorization rule '{name}' does not exist."))
        })
    };
    if let Some(name) = rest.first() {
        hyco_proto::names::check_rule_ref(name).map_err(|e| {
            RelayError::BadRequest(format!("Invalid rule name '{}': {e}.", shown(name)))
        })?;
    }
    let action = rest.get(1).map(|a| a.to_ascii_lowercase());
    match (method, rest.first(), action.as_deref(), rest.len()) {
        (Method::GET, None, None, 0) => {
            let list: Vec<RuleView> = current.iter().map(rule_view).collect();
            json(StatusCode::OK, &serde_json::json!({ "value": list }))
        }
        (Method::GET, Some(name), None, 1) => json(StatusCode::OK, &rule_view(find(name)?)),
        (Method::PUT, Some(name), None, 1) => {
            let body: RuleCreate = read_json(req).await?;
            let fresh = make_rule(name, body)?;
            if !current.iter().any(|r| r.name == fresh.name) {
                same_name_elsewhere(&ns, entity, name)?;
            }
            put_rule(shared, entity, fresh).await
        }
        (Method::DELETE, Some(name), None, 1) => {
            find(name)?;
            delete_rule(shared, entity, name).await
        }
        (Method::POST, Some(name), Some("listkeys"), 2) => {
            json(StatusCode::OK, &keys_view(shared, find(name)?, entity)?)
        }
        (Method::POST, Some(name), Some("regeneratekeys"), 2) => {
            find(name)?;
            let body: Regenerate = read_json(req).await?;
            regenerate_key(shared, entity, name, body).await
        }
        (_, _, None, 0 | 1) | (_, _, Some("listkeys" | "regeneratekeys"), 2) => {
            Err(RelayError::MethodNotAllowed)
        }
        _ => Err(RelayError::NotFound("No such management operation.".into())),
    }
}

/// `PUT …/authorizationrules/{rule}`: creates the rule (201), or changes its rights and keeps
/// its keys (200).
async fn put_rule(
    shared: &Arc<Shared>,
    entity: Option<&str>,
    fresh: Rule,
) -> Result<Response<Body>, RelayError> {
    let scope = entity.map(str::to_owned);
    let (rule, created) = write(shared, move |s| {
        s.with_rules(scope.as_deref(), |rules| {
            if let Some(r) = rules.iter_mut().find(|r| r.name == fresh.name) {
                // An update changes rights and keeps the keys.
                r.rights = fresh.rights;
                return Ok((r.clone(), false));
            }
            if rules.len() >= MAX_RULES_PER_SCOPE {
                return Err(StoreError::Refused(format!(
                    "A scope holds at most {MAX_RULES_PER_SCOPE} rules."
                )));
            }
            rules.push(fresh.clone());
            Ok((fresh, true))
        })
    })
    .await?;
    info!(event = if created { "AuthorizationRuleCreated" } else { "AuthorizationRuleUpdated" }, rule = %rule.name, hc = entity.unwrap_or("-"), "admin");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json(status, &keys_view(shared, &rule, entity)?)
}

/// `DELETE …/authorizationrules/{rule}` (not the last namespace rule with Manage).
async fn delete_rule(
    shared: &Arc<Shared>,
    entity: Option<&str>,
    name: &str,
) -> Result<Response<Body>, RelayError> {
    let scope = entity.map(str::to_owned);
    let n = name.to_owned();
    write(shared, move |s| {
        s.with_rules(scope.as_deref(), |rules| {
            let remaining_managers = rules
                .iter()
                .filter(|r| r.name != n && r.rights.manage)
                .count();
            if scope.is_none() && remaining_managers == 0 {
                return Err(StoreError::Refused(
                    "This is the last namespace rule with Manage; deleting it would lock everyone out."
                        .into(),
                ));
            }
            rules.retain(|r| r.name != n);
            Ok(())
        })
    })
    .await?;
    info!(event = "AuthorizationRuleDeleted", rule = %name, hc = entity.unwrap_or("-"), "admin");
    no_content()
}

/// `POST …/authorizationrules/{rule}/regeneratekeys`: a new primary or secondary key; tokens
/// signed with the other keep working.
async fn regenerate_key(
    shared: &Arc<Shared>,
    entity: Option<&str>,
    name: &str,
    body: Regenerate,
) -> Result<Response<Body>, RelayError> {
    let primary = match body.key_type.as_deref() {
        Some(k) if k.eq_ignore_ascii_case("PrimaryKey") => true,
        Some(k) if k.eq_ignore_ascii_case("SecondaryKey") => false,
        _ => {
            return Err(RelayError::BadRequest(
                "keyType must be \"PrimaryKey\" or \"SecondaryKey\".".into(),
            ))
        }
    };
    let scope = entity.map(str::to_owned);
    let n = name.to_owned();
    let key = new_key();
    let rule = write(shared, move |s| {
        s.with_rules(scope.as_deref(), |rules| {
            let r = rules
                .iter_mut()
                .find(|r| r.name == n)
                .ok_or_else(|| StoreError::NotFound(format!("authorization rule '{n}'")))?;
            if primary {
                r.primary_key = key;
            } else {
                r.secondary_key = key;
            }
            Ok(r.clone())
        })
    })
    .await?;
    info!(event = "AuthorizationRuleKeyRegenerated", rule = %rule.name, hc = entity.unwrap_or("-"), key = if primary { "primary" } else { "secondary" }, "admin");
    json(StatusCode::OK, &keys_view(shared, &rule, entity)?)
}

/// Rules per scope, as Azure allows (protocol.md §5.7).
const MAX_RULES_PER_SCOPE: usize = 12;

fn existing<'a>(
    ns: &'a crate::store::Namespace,
    name: &str,
) -> Result<(String, &'a HybridConnection), RelayError> {
    let key = hyco_proto::address::entity_key(name);
    match ns.hcs.get(&key) {
        Some(hc) => Ok((key, hc)),
        None => Err(RelayError::NotFound(format!(
            "Hybrid connection '{name}' does not exist."
        ))),
    }
}

fn check_metadata(m: Option<&str>) -> Result<(), RelayError> {
    match m {
        Some(m) if m.len() > 1024 => Err(RelayError::BadRequest(
            "userMetadata is limited to 1024 characters.".into(),
        )),
        _ => Ok(()),
    }
}

/// Runs a store write off the async threads (it fsyncs) and maps its errors. Afterwards the
/// control channels re-check their tokens against the new keys.
async fn write<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RelayError> {
    let s = Arc::clone(shared);
    let out = tokio::task::spawn_blocking(move || f(&s.store))
        .await
        .map_err(|e| RelayError::Internal(e.to_string()))?
        .map_err(store_err)?;
    shared.keys_changed.send_modify(|g| *g += 1);
    if let Some(c) = &shared.cluster {
        c.config_changed(shared.store.version()).await;
    }
    Ok(out)
}

fn no_content() -> Result<Response<Body>, RelayError> {
    let mut resp = Response::new(crate::error::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn rule_view(r: &Rule) -> RuleView {
    RuleView {
        name: r.name.clone(),
        rights: r.rights,
    }
}

/// A name for an error message: at most 64 characters, control characters escaped.
fn shown(name: &str) -> String {
    name.chars().take(64).flat_map(char::escape_debug).collect()
}

/// A token names its rule only by `skn`, and namespace rules are looked up first: a new rule
/// whose name another scope already uses would sign tokens that verify against the other rule
/// (an entity rule named like a namespace rule: every token 401), or take over that name for
/// the other scope's tokens (a namespace rule named like an entity rule). Refused with 409.
fn same_name_elsewhere(
    ns: &crate::store::Namespace,
    entity: Option<&str>,
    name: &str,
) -> Result<(), RelayError> {
    let clash = |r: &Rule| r.name.eq_ignore_ascii_case(name);
    let other = match entity {
        Some(_) => ns
            .rules
            .iter()
            .any(clash)
            .then(|| "a namespace rule".to_owned()),
        None => ns
            .hcs
            .values()
            .find(|hc| hc.rules.iter().any(clash))
            .map(|hc| format!("a rule of hybrid connection '{}'", hc.name)),
    };
    match other {
        Some(other) => Err(RelayError::Conflict(format!(
            "The rule name '{name}' is taken by {other}; tokens name their rule only by name, so choose another."
        ))),
        None => Ok(()),
    }
}

fn make_rule(name: &str, body: RuleCreate) -> Result<Rule, RelayError> {
    hyco_proto::names::validate_rule_name(name).map_err(|e| {
        RelayError::BadRequest(format!("Invalid rule name '{}': {e}.", shown(name)))
    })?;
    if body.rights == Rights::default() {
        return Err(RelayError::BadRequest(
            "A rule needs at least one right (Listen, Send, Manage).".into(),
        ));
    }
    Ok(Rule {
        name: name.to_owned(),
        rights: body.rights,
        primary_key: new_key(),
        secondary_key: new_key(),
    })
}

fn view(shared: &Shared, key: &str, hc: &HybridConnection) -> HcView {
    HcView {
        name: hc.name.clone(),
        requires_client_authorization: hc.requires_client_authorization,
        user_metadata: hc.user_metadata.clone(),
        created_at: hc.created_at.clone(),
        updated_at: hc.updated_at.clone(),
        listener_count: shared.registry.count(key),
    }
}

fn keys_view(shared: &Shared, rule: &Rule, entity: Option<&str>) -> Result<RuleKeys, RelayError> {
    Ok(RuleKeys {
        key_name: rule.name.clone(),
        rights: rule.rights,
        primary_key: rule.primary_key.clone(),
        secondary_key: rule.secondary_key.clone(),
        primary_connection_string: connection_string(
            shared,
            &rule.name,
            &rule.primary_key,
            entity,
        )?,
        secondary_connection_string: connection_string(
            shared,
            &rule.name,
            &rule.secondary_key,
            entity,
        )?,
    })
}
