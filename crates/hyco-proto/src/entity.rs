//! The entity description (protocol.md §6): endpoint metadata in App Service's JSON shape and
//! the Atom document of the data-plane entity GET (§2.9, §6.3).
//!
//! The Atom reader is `quick-xml`'s pull parser: no recursion, no DTD or external entities,
//! input capped at 256 KiB. An Atom `<feed>` instead of an `<entry>` is how Azure says "no such
//! entity", so it maps to [`EntityError::NotFound`].

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::address::{AddressError, HostPort};

/// Largest Atom document [`parse_entity_atom`] reads.
pub const MAX_ATOM: usize = 256 * 1024;

/// Why metadata or a description could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityError {
    /// The entity does not exist (a 404, or an Atom feed instead of an entry).
    #[error("the hybrid connection does not exist")]
    NotFound,
    /// User metadata that is not JSON at all.
    #[error("user metadata is not JSON (expected [{{\"key\":\"endpoint\",\"value\":\"host:port\"}}]): {0}")]
    MetadataNotJson(String),
    /// User metadata that is JSON but not an array of `{key, value}` objects.
    #[error("user metadata is not a JSON array of {{\"key\",\"value\"}} objects")]
    MetadataNotArray,
    /// No entry whose key is `endpoint`.
    #[error("user metadata has no 'endpoint' entry")]
    NoEndpoint,
    /// The `endpoint` entry's value is missing or not a string.
    #[error("user metadata 'endpoint' entry has no string value")]
    EndpointNotString,
    /// The `endpoint` value is not `host:port`.
    #[error("user metadata 'endpoint' is not host:port: {0}")]
    BadEndpoint(AddressError),
    /// The Atom document is over 256 KiB.
    #[error("entity description larger than 256 KiB")]
    TooLarge,
    /// Not well-formed XML.
    #[error("entity description is not well-formed XML: {0}")]
    Xml(String),
    /// The root element is neither an Atom `entry` nor a `feed`.
    #[error("entity description has root <{0}>, expected <entry>")]
    UnexpectedRoot(String),
    /// An `entry` without a `HybridConnectionDescription`.
    #[error("entity description has no HybridConnectionDescription")]
    NoDescription,
    /// A member whose text does not parse (`ListenerCount`, `RequiresClientAuthorization`).
    #[error("entity description member {0} is invalid")]
    BadMember(&'static str),
}

/// App Service's metadata for an endpoint: `[{"key":"endpoint","value":"host:port"}]`.
pub fn endpoint_metadata(endpoint: &HostPort) -> String {
    serde_json::json!([{"key": "endpoint", "value": endpoint.to_string()}]).to_string()
}

/// Reads the endpoint from App Service metadata: the first array entry whose `key` is
/// `endpoint` (any case); other entries are ignored, as the Hybrid Connection Manager does.
pub fn parse_endpoint_metadata(user_metadata: &str) -> Result<HostPort, EntityError> {
    let v: serde_json::Value = serde_json::from_str(user_metadata)
        .map_err(|e| EntityError::MetadataNotJson(e.to_string().chars().take(120).collect()))?;
    let arr = v.as_array().ok_or(EntityError::MetadataNotArray)?;
    let entry = arr
        .iter()
        .find(|e| {
            e.get("key")
                .and_then(|k| k.as_str())
                .is_some_and(|k| k.trim().eq_ignore_ascii_case("endpoint"))
        })
        .ok_or(EntityError::NoEndpoint)?;
    let value = entry
        .get("value")
        .and_then(|v| v.as_str())
        .ok_or(EntityError::EndpointNotString)?;
    value.trim().parse().map_err(EntityError::BadEndpoint)
}

/// What the entity GET describes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntityDescription {
    /// Name (Atom title).
    pub name: String,
    /// RFC 3339, given by the caller (this crate has no clock).
    pub created_at: String,
    /// RFC 3339; also the Atom `updated`.
    pub updated_at: String,
    /// Senders need a token (Azure's default when absent: true).
    pub requires_client_authorization: bool,
    /// Free text; App Service puts the endpoint JSON here.
    pub user_metadata: Option<String>,
    /// Live listener count (0–25 on Azure).
    pub listener_count: u32,
}

fn esc(s: &str) -> String {
    // Element text only: `<`, `>` and `&` are enough, and the metadata JSON stays readable.
    quick_xml::escape::partial_escape(s).into_owned()
}

/// The Atom entry of §6.3: `id_url` and every text XML-escaped, members in the order the .NET
/// `DataContractSerializer` expects, `UserMetadata` omitted when `None`.
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

/// An error body as Azure's management endpoint sends it, `<Error><Code>{status}</Code>
/// <Detail>{detail}</Detail></Error>`: .NET's management client reads the `Detail` for its
/// exception text. `detail` is XML-escaped.
pub fn render_error_xml(status: u16, detail: &str) -> String {
    format!(
        "<Error><Code>{status}</Code><Detail>{}</Detail></Error>",
        esc(detail)
    )
}

/// Deepest element nesting [`parse_entity_atom`] follows.
const MAX_XML_DEPTH: usize = 32;

/// Parses the Atom entry of §6.3. Unknown elements (anywhere) are skipped; members are read
/// only at their place (`entry/title`, `entry/content/HybridConnectionDescription/*`); missing
/// members keep their defaults (`requires_client_authorization` true). An Atom `<feed>` root
/// means [`EntityError::NotFound`].
pub fn parse_entity_atom(xml: &str) -> Result<EntityDescription, EntityError> {
    if xml.len() > MAX_ATOM {
        return Err(EntityError::TooLarge);
    }
    let mut r = Reader::from_str(xml);
    r.config_mut().expand_empty_elements = true;
    let mut d = EntityDescription {
        requires_client_authorization: true,
        ..EntityDescription::default()
    };
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut saw_description = false;
    let xml_err =
        |e: &dyn std::fmt::Display| EntityError::Xml(e.to_string().chars().take(200).collect());
    loop {
        match r.read_event().map_err(|e| xml_err(&e))? {
            Event::Eof => break,
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_owned();
                if stack.is_empty() && name != "entry" {
                    return Err(if name == "feed" {
                        EntityError::NotFound
                    } else {
                        EntityError::UnexpectedRoot(name.chars().take(64).collect())
                    });
                }
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(EntityError::Xml("nested too deeply".into()));
                }
                stack.push(name);
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::CData(c) => text.push_str(&c.xml10_content()),
            // `&lt;` and `&#60;` come as their own events; no DTD, so no other entity exists.
            Event::GeneralRef(r) => match r.resolve_char_ref().map_err(|e| xml_err(&e))? {
                Some(c) => text.push(c),
                None => text.push_str(
                    quick_xml::escape::resolve_predefined_entity(&r)
                        .ok_or_else(|| xml_err(&format!("unknown entity &{};", &*r)))?,
                ),
            },
            Event::End(_) => {
                let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                match path.as_slice() {
                    ["entry", "title"] => d.name = text.trim().to_owned(),
                    ["entry", "content", "HybridConnectionDescription"] => saw_description = true,
                    ["entry", "content", "HybridConnectionDescription", member] => {
                        let v = text.trim();
                        match *member {
                            "CreatedAt" => d.created_at = v.to_owned(),
                            "UpdatedAt" => d.updated_at = v.to_owned(),
                            "RequiresClientAuthorization" => {
                                d.requires_client_authorization = match v {
                                    "true" | "1" => true,
                                    "false" | "0" => false,
                                    _ => {
                                        return Err(EntityError::BadMember(
                                            "RequiresClientAuthorization",
                                        ))
                                    }
                                }
                            }
                            "UserMetadata" => d.user_metadata = Some(text.clone()),
                            "ListenerCount" => {
                                d.listener_count = v
                                    .parse()
                                    .map_err(|_| EntityError::BadMember("ListenerCount"))?
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
                stack.pop();
                text.clear();
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(EntityError::Xml("document ends inside an element".into()));
    }
    if !saw_description {
        return Err(EntityError::NoDescription);
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
