//! The entity description (protocol.md §6): endpoint metadata in App Service's JSON shape and
//! the Atom document of the data-plane entity GET.

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::address::HostPort;

/// Why metadata or a description could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    /// The entity does not exist (a 404, or an Atom feed instead of an entry).
    #[error("the hybrid connection does not exist")]
    NotFound,
    /// No `endpoint` entry in the metadata.
    #[error("user metadata has no 'endpoint' entry")]
    NoEndpoint,
    /// Not the expected JSON.
    #[error("user metadata is not the App Service JSON shape: {0}")]
    BadMetadata(String),
    /// Not the expected XML.
    #[error("entity description: {0}")]
    BadXml(String),
}

/// `[{"key":"endpoint","value":"host:port"}]`.
pub fn endpoint_metadata(endpoint: &HostPort) -> String {
    serde_json::json!([{"key": "endpoint", "value": endpoint.to_string()}]).to_string()
}

/// Reads the endpoint from App Service metadata.
pub fn parse_endpoint_metadata(user_metadata: &str) -> Result<HostPort, EntityError> {
    let v: serde_json::Value =
        serde_json::from_str(user_metadata).map_err(|e| EntityError::BadMetadata(e.to_string()))?;
    let arr = v
        .as_array()
        .ok_or_else(|| EntityError::BadMetadata("not a JSON array".into()))?;
    let value = arr
        .iter()
        .find(|e| {
            e["key"]
                .as_str()
                .is_some_and(|k| k.eq_ignore_ascii_case("endpoint"))
        })
        .ok_or(EntityError::NoEndpoint)?["value"]
        .as_str()
        .ok_or_else(|| EntityError::BadMetadata("endpoint value is not a string".into()))?;
    value
        .parse()
        .map_err(|e: crate::address::AddressError| EntityError::BadMetadata(e.to_string()))
}

/// What the entity GET describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntityDescription {
    /// Name (Atom title).
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Senders need a token.
    pub requires_client_authorization: bool,
    /// Free text.
    pub user_metadata: Option<String>,
    /// Live listener count.
    pub listener_count: u32,
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// The Atom entry of §6.3.
pub fn render_entity_atom(id_url: &str, d: &EntityDescription) -> String {
    let meta = d
        .user_metadata
        .as_deref()
        .map(|m| format!("<UserMetadata>{}</UserMetadata>", esc(m)))
        .unwrap_or_default();
    format!(
        concat!(
            r#"<entry xmlns="http://www.w3.org/2005/Atom"><id>{id}</id><title type="text">{title}</title><updated>{updated}</updated>"#,
            r#"<content type="application/xml"><HybridConnectionDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">"#,
            "<CreatedAt>{created}</CreatedAt><UpdatedAt>{updated}</UpdatedAt><RequiresClientAuthorization>{rca}</RequiresClientAuthorization>{meta}<ListenerCount>{count}</ListenerCount>",
            "</HybridConnectionDescription></content></entry>"
        ),
        id = esc(id_url),
        title = esc(&d.name),
        updated = esc(&d.updated_at),
        created = esc(&d.created_at),
        rca = d.requires_client_authorization,
        meta = meta,
        count = d.listener_count
    )
}

/// Parses the Atom entry (tolerates unknown elements; an Atom feed means "not found").
pub fn parse_entity_atom(xml: &str) -> Result<EntityDescription, EntityError> {
    if xml.len() > 256 * 1024 {
        return Err(EntityError::BadXml("document too large".into()));
    }
    let mut r = Reader::from_str(xml);
    let mut d = EntityDescription::default();
    let mut current: Option<String> = None;
    let mut saw_root = false;
    let mut saw_description = false;
    loop {
        match r.read_event() {
            Err(e) => return Err(EntityError::BadXml(e.to_string())),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if !saw_root {
                    saw_root = true;
                    if name == "feed" {
                        return Err(EntityError::NotFound);
                    }
                    if name != "entry" {
                        return Err(EntityError::BadXml(format!("unexpected root <{name}>")));
                    }
                }
                if name == "HybridConnectionDescription" {
                    saw_description = true;
                }
                current = Some(name);
            }
            Ok(Event::Empty(e)) => {
                if !saw_root && e.local_name().as_ref() == b"feed" {
                    return Err(EntityError::NotFound);
                }
            }
            Ok(Event::Text(t)) => {
                let text = t
                    .unescape()
                    .map_err(|e| EntityError::BadXml(e.to_string()))?
                    .into_owned();
                match current.as_deref() {
                    Some("title") => d.name = text,
                    Some("CreatedAt") => d.created_at = text,
                    Some("UpdatedAt") => d.updated_at = text,
                    Some("RequiresClientAuthorization") => {
                        d.requires_client_authorization = text.trim() == "true"
                    }
                    Some("UserMetadata") => d.user_metadata = Some(text),
                    Some("ListenerCount") => {
                        d.listener_count = text.trim().parse().map_err(|_| {
                            EntityError::BadXml("ListenerCount is not a number".into())
                        })?
                    }
                    _ => {}
                }
            }
            Ok(Event::End(_)) => current = None,
            Ok(_) => {}
        }
    }
    if !saw_description {
        return Err(EntityError::BadXml("no HybridConnectionDescription".into()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip() {
        let hp: HostPort = "sql01.corp:1433".parse().unwrap();
        let m = endpoint_metadata(&hp);
        assert_eq!(m, r#"[{"key":"endpoint","value":"sql01.corp:1433"}]"#);
        assert_eq!(parse_endpoint_metadata(&m).unwrap(), hp);
        assert_eq!(
            parse_endpoint_metadata(r#"[{"key":"x","value":"y"}]"#),
            Err(EntityError::NoEndpoint)
        );
        assert!(parse_endpoint_metadata("nope").is_err());
        assert!(parse_endpoint_metadata(r#"[{"key":"endpoint","value":"nohost"}]"#).is_err());
    }

    #[test]
    fn atom_round_trip_and_feed() {
        let d = EntityDescription {
            name: "hyco".into(),
            created_at: "2024-12-01T10:00:00Z".into(),
            updated_at: "2024-12-02T10:00:00Z".into(),
            requires_client_authorization: true,
            user_metadata: Some(r#"[{"key":"endpoint","value":"a<b:1"}]"#.into()),
            listener_count: 2,
        };
        let xml = render_entity_atom("https://h/hyco?api-version=2016-07", &d);
        assert!(xml.contains("&lt;"));
        assert_eq!(parse_entity_atom(&xml).unwrap(), d);
        assert_eq!(
            parse_entity_atom(
                r#"<feed xmlns="http://www.w3.org/2005/Atom"><title>x</title></feed>"#
            ),
            Err(EntityError::NotFound)
        );
        assert!(parse_entity_atom("<html/>").is_err());
    }
}
