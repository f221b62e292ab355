//! HTTP header rules both HTTP-mode hops share (the relay towards listeners, the manager towards
//! endpoints and back): which headers are hop-by-hop.

/// Hop-by-hop headers (RFC 9110 §7.6.1), `proxy-*` ones, and the framing ones each hop sets
/// itself (`content-length`, `transfer-encoding`). `name` is lower case.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "close"
    ) || name.starts_with("proxy-")
}

/// The header names a `Connection` header's values list (lower case): hop-by-hop too.
pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names() {
        for n in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
        ] {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in ["host", "authorization", "set-cookie", "via"] {
            assert!(!is_hop_by_hop(n), "{n}");
        }
        assert_eq!(
            connection_tokens(["close, X-Hop", " ,keep-alive"].into_iter()),
            ["close", "x-hop", "keep-alive"]
        );
    }
}
