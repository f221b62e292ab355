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
//! | `PUT /$hyco/v1/hybridconnections/{hc}/authorizationrules/{rule}` | create an entity rule (`{"rights":["Listen","Send"]}`), returns keys and connection strings |
//! | `PUT /$hyco/v1/authorizationrules/{rule}` | create a namespace rule |

use std::sync::Arc;

use base64::Engine as _;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyco_proto::rights::Need;
use hyco_proto::{ConnectionString, Rights};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::{Body, RelayError};
use crate::store::{HybridConnection, Rule, StoreError};
use crate::{unix_now, Shared};

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
struct RuleCreate {
    rights: Rights,
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
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Renders a connection string for a rule.
pub fn connection_string(
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
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Handles `/$hyco/v1/…`.
pub async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let path = req.uri().path().to_owned();
    let rest = path
        .strip_prefix("/$hyco/v1/")
        .ok_or_else(|| RelayError::NotFound("Not found.".into()))?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let method = req.method().clone();
    let ns = shared.store.snapshot();
    // Per-entity calls accept an entity-scoped Manage rule too.
    let entity = match parts.as_slice() {
        ["hybridconnections", name, ..] => Some(*name),
        _ => None,
    };
    let hc = entity.and_then(|n| ns.hcs.get(&hyco_proto::address::entity_key(n)));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut hosts = shared.cfg.hostnames.clone();
    hosts.push(
        host.rsplit_once(':')
            .map_or(host.as_str(), |(h, _)| h)
            .to_ascii_lowercase(),
    );
    let token = crate::auth::find_token(None, req.headers(), true);
    if let Err(e) = crate::auth::authorize(&ns, &hosts, None, token, Need::Manage, unix_now(), 0) {
        match entity {
            Some(name) => {
                crate::auth::authorize(
                    &ns,
                    &hosts,
                    Some((name, hc)),
                    token,
                    Need::Manage,
                    unix_now(),
                    0,
                )?;
            }
            None => return Err(e),
        }
    }
    match (method, parts.as_slice()) {
        (Method::GET, ["hybridconnections"]) => {
            let list: Vec<HcView> = ns.hcs.iter().map(|(k, hc)| view(shared, k, hc)).collect();
            json(StatusCode::OK, &serde_json::json!({ "value": list }))
        }
        (Method::GET, ["hybridconnections", name]) => {
            let key = hyco_proto::address::entity_key(name);
            let hc = ns.hcs.get(&key).ok_or_else(|| {
                RelayError::NotFound(format!("Hybrid connection '{name}' does not exist."))
            })?;
            json(StatusCode::OK, &view(shared, &key, hc))
        }
        (Method::PUT, ["hybridconnections", name]) => {
            hyco_proto::address::validate_entity_name(name).map_err(|e| {
                RelayError::BadRequest(format!("Invalid hybrid connection name '{name}': {e}"))
            })?;
            let body: HcCreate = read_json(req).await?;
            if let Some(m) = &body.user_metadata {
                if m.len() > 1024 {
                    return Err(RelayError::BadRequest(
                        "userMetadata is limited to 1024 characters.".into(),
                    ));
                }
            }
            let now = now_rfc3339();
            let hc = HybridConnection {
                name: (*name).to_owned(),
                requires_client_authorization: body.requires_client_authorization.unwrap_or(true),
                user_metadata: body.user_metadata,
                created_at: now.clone(),
                updated_at: now,
                rules: Vec::new(),
            };
            let store = Arc::clone(shared);
            let created = tokio::task::spawn_blocking(move || store.store.create_hc(hc))
                .await
                .map_err(|e| RelayError::Internal(e.to_string()))?
                .map_err(store_err)?;
            info!(event = "HybridConnectionCreated", hc = %created.name, "admin");
            let key = hyco_proto::address::entity_key(name);
            json(StatusCode::CREATED, &view(shared, &key, &created))
        }
        (Method::DELETE, ["hybridconnections", name]) => {
            let store = Arc::clone(shared);
            let n = (*name).to_owned();
            let deleted = tokio::task::spawn_blocking(move || store.store.delete_hc(&n))
                .await
                .map_err(|e| RelayError::Internal(e.to_string()))?
                .map_err(store_err)?;
            shared.registry.close_all(
                &hyco_proto::address::entity_key(name),
                1001,
                "The hybrid connection was deleted.",
            );
            info!(event = "HybridConnectionDeleted", hc = %deleted.name, "admin");
            let mut resp = Response::new(crate::error::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        (Method::PUT, ["hybridconnections", name, "authorizationrules", rule]) => {
            let body: RuleCreate = read_json(req).await?;
            let rule = make_rule(rule, body)?;
            let store = Arc::clone(shared);
            let n = (*name).to_owned();
            let r = rule.clone();
            tokio::task::spawn_blocking(move || store.store.put_hc_rule(&n, r))
                .await
                .map_err(|e| RelayError::Internal(e.to_string()))?
                .map_err(store_err)?;
            let entity = hc
                .map(|h| h.name.clone())
                .unwrap_or_else(|| (*name).to_owned());
            json(
                StatusCode::CREATED,
                &keys_view(shared, &rule, Some(&entity))?,
            )
        }
        (Method::PUT, ["authorizationrules", rule]) => {
            let body: RuleCreate = read_json(req).await?;
            let rule = make_rule(rule, body)?;
            let store = Arc::clone(shared);
            let r = rule.clone();
            tokio::task::spawn_blocking(move || store.store.put_namespace_rule(r))
                .await
                .map_err(|e| RelayError::Internal(e.to_string()))?
                .map_err(store_err)?;
            json(StatusCode::CREATED, &keys_view(shared, &rule, None)?)
        }
        _ => Err(RelayError::NotFound("No such management operation.".into())),
    }
}

fn make_rule(name: &str, body: RuleCreate) -> Result<Rule, RelayError> {
    if name.is_empty()
        || name.len() > 256
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(RelayError::BadRequest(format!(
            "Invalid rule name '{}': use 1-256 letters, digits, '-', '_' or '.'.",
            name.chars().take(64).collect::<String>()
        )));
    }
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
