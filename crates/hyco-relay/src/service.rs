//! The request pipeline: every HTTP request on the relay's port comes through [`handle`].
//!
//! ```text
//! accept (lib.rs) → parse ([`Ask::parse`]) → authorize once ([`authorize`]) → dispatch
//! ```
//!
//! * `/$hc/{hc}…` with an upgrade: `sb-hc-action` = listen, connect, accept, request
//!   (protocol.md §2): [`crate::listen`], [`crate::connect`], [`crate::accept`],
//!   [`crate::http::rendezvous`].
//! * `/$hyco/v1/…`: the admin API ([`crate::admin`]).
//! * `GET /{hc}?api-version=…`: the entity description ([`crate::entity`], §2.9).
//! * other requests to `/{hc}…`: HTTP mode ([`crate::http`]).
//! * anything else: a neutral 404.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyco_io::ws::handshake::{check_upgrade, is_upgrade};
use hyco_proto::address::{self, Action, HcQuery};
use hyco_proto::rights::Need;
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::auth::{Grant, Want};
use crate::error::{Body, RelayError};
use crate::metrics::Hc;
use crate::request::{
    host_of, is_hc_path, parse_query, path_for_log, rendezvous_address, resolve, Entity,
};
use crate::Shared;

/// Handles one request; never fails (errors become responses).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let mut xml = false;
    let result = if !path.starts_with("/$hyco/") && path.len() > 1 && !shared.memory.allows_new() {
        // Over the memory budget: new work is refused; the admin API and open tunnels go on.
        warn!(peer = %peer, resident = shared.memory.resident(), "memory budget reached; refusing");
        Err(RelayError::Unavailable(
            "ServerBusy: the relay is at its memory budget; retry later.",
        ))
    } else {
        let label = (is_hc_path(&path) && is_upgrade(&req))
            .then(|| metric_label(&shared, &req))
            .flatten();
        let result = pipeline(&shared, peer, req, &mut xml).await;
        if let Some((listen, hc)) = label {
            let status = match &result {
                Ok(resp) => resp.status().as_u16(),
                Err(e) => e.status().as_u16(),
            };
            shared.metrics.record_upgrade(listen, &hc, status);
        }
        result
    };
    Ok(result.unwrap_or_else(|e| {
        if xml {
            // Azure's XML error body: .NET's management client reads its `Detail`.
            debug!(peer = %peer, path = %path_for_log(&path), error = %e, "entity read refused");
            return e.into_xml_response();
        }
        if e.is_peer_fault() {
            debug!(peer = %peer, path = %path_for_log(&path), error = %e, "request refused");
        } else {
            warn!(peer = %peer, error = %e, "request failed");
        }
        e.into_response()
    }))
}

/// Parse, authorize once, dispatch. `xml` is set for an entity read, whose refusals are
/// Azure's XML.
async fn pipeline(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    xml: &mut bool,
) -> Result<Response<Body>, RelayError> {
    let ask = Ask::parse(shared, &req, xml)?;
    let grant = authorize(shared, peer, &req, &ask)?;
    dispatch(shared, peer, req, ask, grant).await
}

/// For listen and connect upgrades: whether it is a listen, and the metric label.
fn metric_label(shared: &Shared, req: &Request<Incoming>) -> Option<(bool, Hc)> {
    let q = HcQuery::parse(req.uri().query().unwrap_or("")).ok()?;
    let listen = match q.action? {
        Action::Listen => true,
        Action::Connect => false,
        _ => return None,
    };
    let ns = shared.store.snapshot();
    let key = address::split_hc_path(req.uri().path())
        .ok()
        .and_then(|segs| resolve(&ns, &segs).map(|(k, _, _)| k));
    Some((listen, Hc::new(key.as_deref())))
}

/// What a request asks for, read from its line and head: nothing checked yet but its form.
enum Ask {
    /// `/$hyco/v1/…`.
    Admin(crate::admin::Call),
    /// `GET /{hc}?api-version=…`.
    Entity { entity: Entity, query: HcQuery },
    /// Any other request to `/{hc}…`.
    Http { entity: Entity, query: HcQuery },
    /// A listen or connect upgrade.
    Socket(Socket),
    /// A listener opening an accept or request rendezvous: its capability authorizes it.
    Rendezvous {
        action: Action,
        segments: Vec<String>,
        query: HcQuery,
        accept_key: String,
    },
}

/// A listen or connect upgrade.
struct Socket {
    action: Action,
    entity: Entity,
    query: HcQuery,
    accept_key: String,
}

impl Ask {
    /// Reads the request; refusals here are about its form. `xml` is set as soon as it is
    /// known to be an entity read (from then on, refusals are Azure's XML).
    fn parse(shared: &Shared, req: &Request<Incoming>, xml: &mut bool) -> Result<Ask, RelayError> {
        let path = req.uri().path();
        if path.starts_with("/$hyco/") {
            return crate::admin::Call::parse(req, shared.store.snapshot()).map(Ask::Admin);
        }
        if is_hc_path(path) {
            if !is_upgrade(req) {
                return Err(RelayError::BadRequest(
                    "The $hc endpoint only accepts WebSocket upgrades.".into(),
                ));
            }
            return Ask::upgrade(shared, req);
        }
        if path == "/" || path.is_empty() {
            return Err(RelayError::NotFound("Not found.".into()));
        }
        let segments = address::split_http_path(path)
            .map_err(|e| RelayError::BadRequest(format!("Bad path: {e}")))?;
        let raw_query = req.uri().query().unwrap_or("");
        let entity_get = req.method() == http::Method::GET
            && form_urlencoded::parse(raw_query.as_bytes()).any(|(k, _)| k == "api-version");
        if entity_get {
            *xml = true;
            let query = parse_query(Some(raw_query))?;
            let entity = Entity::exact(shared.store.snapshot(), &segments);
            return Ok(Ask::Entity { entity, query });
        }
        crate::http::check_method(req)?;
        let query = parse_query(req.uri().query())?;
        let entity = Entity::resolve(shared.store.snapshot(), &segments);
        Ok(Ask::Http { entity, query })
    }

    /// A WebSocket upgrade to `/$hc/…`.
    fn upgrade(shared: &Shared, req: &Request<Incoming>) -> Result<Ask, RelayError> {
        let segments = address::split_hc_path(req.uri().path())
            .map_err(|e| RelayError::BadRequest(format!("Bad hybrid connection path: {e}")))?;
        let query = parse_query(req.uri().query())?;
        let action = query
            .action
            .ok_or_else(|| RelayError::BadRequest("sb-hc-action is required.".into()))?;
        let accept_key = check_upgrade(req).map_err(|e| {
            if e.status == StatusCode::UPGRADE_REQUIRED {
                RelayError::UpgradeRequired
            } else {
                RelayError::BadRequest(e.reason.into())
            }
        })?;
        Ok(match action {
            Action::Accept | Action::Request => Ask::Rendezvous {
                action,
                segments: segments.iter().map(|s| (*s).to_owned()).collect(),
                query,
                accept_key,
            },
            Action::Listen | Action::Connect | Action::Standby => Ask::Socket(Socket {
                action,
                entity: Entity::resolve(shared.store.snapshot(), &segments),
                query,
                accept_key,
            }),
        })
    }
}

/// Whether a token must be checked for a sender to `entity`: always, but for a hybrid
/// connection that exists and lets anonymous senders in.
fn sender_needs_token(entity: &Entity) -> bool {
    entity
        .hc()
        .is_none_or(|hc| hc.requires_client_authorization)
}

/// Whether `Authorization` carried the relay's credential (then it is removed before the
/// listener sees the headers). Only when a token was needed and came neither in the query nor
/// in `ServiceBusAuthorization`; otherwise it is the application's, for the listener to
/// evaluate (.NET's AcceptHandler, Node's verifyClient; protocol.md §2.7).
fn authorization_is_relays(needed: bool, query: &HcQuery, headers: &http::HeaderMap) -> bool {
    needed && query.token.is_none() && !headers.contains_key("servicebusauthorization")
}

/// The rights a token must prove for what a request asks.
struct Rights<'a> {
    /// The entity the token's audience must cover.
    entity: &'a Entity,
    /// A token in the query (`sb-hc-token`).
    query_token: Option<&'a str>,
    /// Any of these grants it.
    needs: &'static [Need],
    /// The action a refusal is logged under (`AuthorizationFailed`), if it is logged.
    logged: Option<&'static str>,
}

impl<'a> Rights<'a> {
    /// What `ask` needs (`None`: no token is checked, for anonymous senders and rendezvous
    /// capabilities; the admin API says for itself).
    fn of(ask: &'a Ask) -> Option<Rights<'a>> {
        let (entity, query, needs, logged): (_, &HcQuery, &'static [Need], _) = match ask {
            Ask::Admin(_) | Ask::Rendezvous { .. } => return None,
            // Any of Listen, Send, Manage may read the description (the manager has Listen
            // only).
            Ask::Entity { entity, query } => (entity, query, &[Need::Listen, Need::Send], None),
            Ask::Http { entity, query } => {
                if !sender_needs_token(entity) {
                    return None;
                }
                (entity, query, &[Need::Send], Some("request"))
            }
            Ask::Socket(s) => {
                let needs: &'static [Need] = match s.action {
                    Action::Listen | Action::Standby => &[Need::Listen],
                    _ if !sender_needs_token(&s.entity) => return None,
                    _ => &[Need::Send],
                };
                (&s.entity, &s.query, needs, Some(s.action.as_str()))
            }
        };
        Some(Rights {
            entity,
            query_token: query.token.as_deref(),
            needs,
            logged,
        })
    }
}

/// The one authorization of a request: [`Rights::of`] says what a token must prove, and
/// [`crate::auth::check`] decides.
fn authorize(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request<Incoming>,
    ask: &Ask,
) -> Result<Option<Grant>, RelayError> {
    if let Ask::Admin(call) = ask {
        return call
            .authorize(|ns, wants| check(shared, peer, req, ns, None, wants))
            .map(Some);
    }
    let Some(Rights {
        entity,
        query_token,
        needs,
        logged,
    }) = Rights::of(ask)
    else {
        return Ok(None);
    };
    let audience = entity.audience();
    let wants: Vec<Want<'_>> = needs
        .iter()
        .map(|&need| Want {
            on: Some((audience.as_str(), entity.hc())),
            need,
        })
        .collect();
    let r = check(shared, peer, req, entity.ns(), query_token, &wants);
    if let (Err(e), Some(action)) = (&r, logged) {
        info!(event = "AuthorizationFailed", peer = %peer, hc = %entity.name(), action, reason = %e, "refused");
    }
    r.map(Some)
}

/// [`crate::auth::check`] with the request's throttle key, host names and token.
fn check(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request<Incoming>,
    ns: &crate::store::Namespace,
    query_token: Option<&str>,
    wants: &[Want<'_>],
) -> Result<Grant, RelayError> {
    let hosts = crate::auth::hosts(&shared.cfg.hostnames, &host_of(req));
    let token = crate::auth::find_token(query_token, req.headers());
    crate::auth::check(&shared.auth_throttle, peer.ip(), ns, &hosts, token, wants)
}

/// Hands an authorized request to its handler, with what that handler needs.
async fn dispatch(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    ask: Ask,
    grant: Option<Grant>,
) -> Result<Response<Body>, RelayError> {
    match ask {
        Ask::Admin(call) => crate::admin::handle(shared, req, call).await,
        Ask::Entity { entity, .. } => crate::entity::describe(&shared.registry, &req, &entity),
        Ask::Http { entity, query } => {
            let hc_key = entity.key().ok_or_else(|| entity.missing())?.to_owned();
            let authorization_used =
                authorization_is_relays(sender_needs_token(&entity), &query, req.headers());
            let route = crate::http::Route {
                hc_key,
                hc_name: entity.name(),
                query,
                authorization_used,
            };
            crate::http::handle(shared, peer, req, route).await
        }
        Ask::Rendezvous {
            action,
            segments,
            query,
            accept_key,
        } => {
            let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
            let address = rendezvous_address(&shared.store.snapshot(), &segments, &query)?;
            if action == Action::Accept {
                crate::accept::accept(&shared.rendezvous, address, &query, &mut req, &accept_key)
            } else {
                crate::http::rendezvous(shared, address, &query, &mut req, &accept_key)
            }
        }
        Ask::Socket(s) => socket(shared, peer, req, s, grant).await,
    }
}

/// A listen or connect, authorized: to its handler once the hybrid connection is known to
/// exist (only now: its existence is not revealed before the token is checked).
async fn socket(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    s: Socket,
    grant: Option<Grant>,
) -> Result<Response<Body>, RelayError> {
    let (Some(hc_key), Some(hc)) = (s.entity.key(), s.entity.hc()) else {
        return Err(s.entity.missing());
    };
    let (hc_key, hc_name) = (hc_key.to_owned(), hc.name.clone());
    if matches!(s.action, Action::Listen | Action::Standby) {
        let token = crate::auth::find_token(s.query.token.as_deref(), req.headers())
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_owned();
        // A control channel and a standby socket are authorized alike, by a Listen token.
        let route = crate::listen::Route {
            accept_key: s.accept_key,
            hc_key,
            hc_name,
            host: host_of(&req),
            listener_id: s.query.id.clone(),
            expiry: grant.map_or(u64::MAX, |g| g.expiry),
            token,
        };
        if s.action == Action::Standby {
            return crate::standby::open(shared, peer, req, route);
        }
        return crate::listen::listen(shared, peer, req, route);
    }
    let authorization_used =
        authorization_is_relays(sender_needs_token(&s.entity), &s.query, req.headers());
    let route = crate::connect::Route {
        accept_key: s.accept_key,
        hc_key,
        hc_name,
        suffix: s.entity.rest().to_owned(),
        query: s.query,
        authorization_used,
    };
    crate::connect::connect(shared, peer, req, route).await
}
