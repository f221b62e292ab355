//! `sb-hc-action=accept`: a listener opens the rendezvous of a sender it was offered, or
//! rejects it (protocol.md §2.4). The capability in the address is its authorization.

use http::{header, Request, Response, StatusCode};
use hyco_io::ws::handshake::switching_protocols;
use hyco_proto::address::HcQuery;
use hyper::body::Incoming;

use crate::error::{Body, RelayError};
use crate::rendezvous::{Outcome, Rendezvous};

/// Completes the waiting sender's rendezvous: an accept answers 101 (the splice starts when
/// both upgrades are done), a reject answers 410 and the sender gets the listener's status.
pub(crate) fn accept(
    rendezvous: &Rendezvous,
    (rv, hc_key): (String, String),
    query: &HcQuery,
    req: &mut Request<Incoming>,
    accept_key: &str,
) -> Result<Response<Body>, RelayError> {
    let (node_status, node_description) = listener_added_reject(req.uri().query().unwrap_or(""));
    let (status, description) = match &query.status_code {
        Some(s) => (Some(s.clone()), query.status_description.clone()),
        None => (
            node_status,
            node_description.or_else(|| query.status_description.clone()),
        ),
    };
    if let Some(status) = status {
        let reason = description.unwrap_or_else(|| "Rejected by the listener".to_owned());
        let status = status.trim().parse::<u16>().unwrap_or(502);
        rendezvous
            .complete(&rv, &hc_key, Outcome::Rejected { status, reason })
            .map_err(|_| RelayError::RendezvousInvalid)?;
        let mut resp = Response::new(crate::error::empty());
        *resp.status_mut() = StatusCode::GONE;
        return Ok(resp);
    }
    let protocol = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    let upgrade = hyper::upgrade::on(req);
    rendezvous
        .complete(
            &rv,
            &hc_key,
            Outcome::Accepted {
                upgrade,
                protocol: protocol.clone(),
            },
        )
        .map_err(|_| RelayError::RendezvousInvalid)?;
    Ok(switching_protocols(accept_key, protocol.as_deref()))
}

/// Node's un-prefixed `statusCode` / `statusDescription` reject (its listener appends them to
/// the accept address), taken only where the listener put them: after the relay's own
/// `sb-hc-*` pairs, which end the address the relay issued. Before those comes the sender's own
/// query, whose `statusCode` is the application's, not a reject. The last of each wins.
fn listener_added_reject(raw_query: &str) -> (Option<String>, Option<String>) {
    let (mut status, mut description) = (None, None);
    let mut past_relay_pairs = false;
    for pair in raw_query.split('&') {
        let Some((k, v)) = form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        let sb_hc = k.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("sb-hc-"));
        if sb_hc && pair.contains('=') {
            past_relay_pairs = true;
        } else if past_relay_pairs && k.eq_ignore_ascii_case("statusCode") {
            status = Some(v.into_owned());
        } else if past_relay_pairs && k.eq_ignore_ascii_case("statusDescription") {
            description = Some(v.into_owned());
        }
    }
    (status, description)
}
