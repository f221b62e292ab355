//! `GET /{hc}?api-version=…`: the entity description (protocol.md §2.9), for any of Listen,
//! Send or Manage (the manager holds Listen only).

use http::{header, Request, Response};

use crate::error::{Body, RelayError};
use crate::registry::Registry;
use crate::request::{host_of, Entity};

/// The description as Azure's Atom entry.
pub(crate) fn describe<B>(
    registry: &Registry,
    req: &Request<B>,
    entity: &Entity,
) -> Result<Response<Body>, RelayError> {
    let (Some(key), Some(hc)) = (entity.key(), entity.hc()) else {
        return Err(RelayError::NotFound(format!(
            "Endpoint does not exist. No hybrid connection '{}'.",
            entity.name()
        )));
    };
    let desc = hyco_proto::entity::EntityDescription {
        name: hc.name.clone(),
        created_at: hc.created_at.clone(),
        updated_at: hc.updated_at.clone(),
        requires_client_authorization: hc.requires_client_authorization,
        user_metadata: hc.user_metadata.clone(),
        listener_count: registry.count(key) as u32,
    };
    let id_url = format!("https://{}/{}?api-version=2016-07", host_of(req), hc.name);
    let xml = hyco_proto::entity::render_entity_atom(&id_url, &desc);
    let mut resp = Response::new(crate::error::full(xml));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/atom+xml;type=entry;charset=utf-8"),
    );
    Ok(resp)
}
