//! hyco's protocol extensions and the `Hyco-Extensions` header that advertises them.
//!
//! A hyco relay with extensions on adds `Hyco-Extensions` to the 101 of its `listen` and
//! `connect` upgrades. The value is a comma-separated list of items, each a token with
//! `;key=value` parameters: `standby;max=32;ttl=60, early-data;max=65536`. Agents use an
//! extension only when the relay advertised it; an absent header (Azure, or a hyco relay with
//! extensions off) means none, and agents behave as plain Hybrid Connections clients.
//!
//! * `standby;max=M;ttl=T`: the listener may park up to `M` upgraded sockets
//!   (`sb-hc-action=standby`) that the relay retires after `T` seconds unused; a sender is
//!   paired with one at once, and the relay tells the listener which connection it is with the
//!   `accept` command on that socket.
//! * `early-data;max=N`: a sender may send up to `N` bytes of WebSocket frames right behind its
//!   upgrade request, before the 101.
//! * `reuse`: a connection whose upgrade request named `reuse` in its own `Hyco-Extensions`
//!   outlives its tunnel. When both peers of the tunnel closed with 1000, the relay serves the
//!   sender's connection as a fresh HTTP/1.1 connection (its next request is a new upgrade,
//!   authorized anew), and parks the listener's standby socket again; both agents know the same
//!   rule, so neither waits for a word from the other.
//!
//! The header comes from the network: [`Extensions::parse`] never panics, ignores unknown
//! items and parameters, bounds how much of the value it reads, and drops an item whose
//! numbers are missing, zero or do not fit a `u32`.

/// The response header name.
pub const HEADER: &str = "Hyco-Extensions";

/// The standby item's token.
pub const STANDBY: &str = "standby";

/// The early-data item's token.
pub const EARLY_DATA: &str = "early-data";

/// The reuse item's token.
pub const REUSE: &str = "reuse";

/// Longest header value read; the rest is ignored (a real one is under 100 bytes).
pub const MAX_VALUE: usize = 1024;

/// Most items looked at.
const MAX_ITEMS: usize = 16;

/// Most parameters looked at per item.
const MAX_PARAMS: usize = 8;

/// The parameters of the standby extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyParams {
    /// Most parked sockets per listener (control channel) the relay keeps.
    pub max: u32,
    /// Seconds the relay keeps an unused parked socket before it closes it (1000).
    pub ttl_secs: u32,
}

/// What a relay advertised. `Default` is "nothing".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Standby rendezvous, when advertised.
    pub standby: Option<StandbyParams>,
    /// Early data: the most bytes of frames a sender may send before the 101.
    pub early_data: Option<u32>,
    /// Connections outlive their tunnels (see the module docs).
    pub reuse: bool,
}

impl Extensions {
    /// Parses a header value. Unknown items and parameters are ignored; a known item without
    /// its numbers (or with a zero, a sign, or more than `u32::MAX`) is ignored; when an item is
    /// repeated, the first usable one counts. Only the first [`MAX_VALUE`] bytes are read.
    pub fn parse(v: &str) -> Extensions {
        let v = truncate(v, MAX_VALUE);
        let mut ext = Extensions::default();
        for item in v.split(',').take(MAX_ITEMS) {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            let mut max = None;
            let mut ttl = None;
            for p in parts.take(MAX_PARAMS) {
                let Some((k, val)) = p.split_once('=') else {
                    continue;
                };
                let k = k.trim();
                let val = number(val.trim());
                if k.eq_ignore_ascii_case("max") {
                    max = max.or(val);
                } else if k.eq_ignore_ascii_case("ttl") {
                    ttl = ttl.or(val);
                }
            }
            if token.eq_ignore_ascii_case(STANDBY) {
                if let (None, Some(max), Some(ttl_secs)) = (ext.standby, max, ttl) {
                    ext.standby = Some(StandbyParams { max, ttl_secs });
                }
            } else if token.eq_ignore_ascii_case(EARLY_DATA) && ext.early_data.is_none() {
                ext.early_data = max;
            } else if token.eq_ignore_ascii_case(REUSE) {
                ext.reuse = true;
            }
        }
        ext
    }

    /// Whether a header value names `token` among its items (parameters aside). A sender's
    /// `Hyco-Extensions: standby` says it may be joined to a parked socket (so a listener's
    /// refusal may reach it as a Close after its 101, not as a status).
    pub fn names(v: &str, token: &str) -> bool {
        truncate(v, MAX_VALUE)
            .split(',')
            .take(MAX_ITEMS)
            .any(|item| {
                item.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case(token)
            })
    }

    /// Whether nothing is advertised.
    pub fn is_empty(&self) -> bool {
        self.standby.is_none() && self.early_data.is_none() && !self.reuse
    }

    /// The header value, or `None` when nothing is advertised (then the header is left out).
    pub fn to_header(&self) -> Option<String> {
        let mut items = Vec::new();
        if let Some(s) = self.standby {
            items.push(format!("{STANDBY};max={};ttl={}", s.max, s.ttl_secs));
        }
        if let Some(n) = self.early_data {
            items.push(format!("{EARLY_DATA};max={n}"));
        }
        if self.reuse {
            items.push(REUSE.to_owned());
        }
        (!items.is_empty()).then(|| items.join(", "))
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A positive decimal `u32`: digits only (no sign, no space inside), at most 10 of them, not 0.
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_finds_an_item_by_its_token_only() {
        assert!(Extensions::names("standby", STANDBY));
        assert!(Extensions::names(
            " early-data;max=1 , Standby ;x=y",
            STANDBY
        ));
        assert!(!Extensions::names("standbyx, early-data", STANDBY));
        assert!(!Extensions::names("x;standby", STANDBY));
        assert!(!Extensions::names("", STANDBY));
        let long = format!("{},standby", "a,".repeat(MAX_VALUE));
        assert!(
            !Extensions::names(&long, STANDBY),
            "only the first bytes are read"
        );
    }

    const BOTH: Extensions = Extensions {
        standby: Some(StandbyParams {
            max: 32,
            ttl_secs: 60,
        }),
        early_data: Some(65536),
        reuse: false,
    };

    #[test]
    fn the_documented_value_parses_and_round_trips() {
        let e = Extensions::parse("standby;max=32;ttl=60, early-data;max=65536");
        assert_eq!(e, BOTH);
        assert_eq!(
            e.to_header().as_deref(),
            Some("standby;max=32;ttl=60, early-data;max=65536")
        );
        assert_eq!(Extensions::parse(&e.to_header().unwrap()), e);
        assert_eq!(Extensions::default().to_header(), None);
        assert!(Extensions::parse("").is_empty());
        let only = Extensions {
            standby: None,
            early_data: Some(7),
            reuse: false,
        };
        assert_eq!(only.to_header().as_deref(), Some("early-data;max=7"));
        assert_eq!(Extensions::parse("early-data;max=7"), only);
    }

    #[test]
    fn reuse_is_a_bare_item() {
        let e = Extensions::parse("standby;max=32;ttl=60, early-data;max=65536, reuse");
        assert_eq!(
            e,
            Extensions {
                reuse: true,
                ..BOTH
            }
        );
        assert_eq!(
            e.to_header().as_deref(),
            Some("standby;max=32;ttl=60, early-data;max=65536, reuse")
        );
        assert!(Extensions::parse(" REUSE ;x=1").reuse);
        assert!(!Extensions::parse("reuse").is_empty());
        assert!(Extensions::parse("reused, re-use").is_empty());
        assert!(Extensions::names("standby, reuse", REUSE));
    }

    #[test]
    fn spelling_is_forgiving_where_http_is() {
        assert_eq!(
            Extensions::parse(" STANDBY ; TTL = 60 ; Max=32 ,Early-Data;MAX=65536 "),
            BOTH
        );
        assert_eq!(
            Extensions::parse(",,standby;max=32;ttl=60,,early-data;max=65536,"),
            BOTH
        );
    }

    #[test]
    fn unknown_items_and_params_are_ignored() {
        let e = Extensions::parse(
            "zstd;level=3, standby;max=32;color=blue;ttl=60;flag, future, early-data;max=65536;x=y",
        );
        assert_eq!(e, BOTH);
        assert!(Extensions::parse("standby-ish;max=3;ttl=4, early;max=5").is_empty());
    }

    #[test]
    fn garbage_never_panics_and_gives_nothing() {
        for v in [
            ";;;,,,",
            "=",
            "standby=1",
            "standby;max;ttl",
            "standby;max=;ttl=",
            "early-data;max",
            "early-data;=5",
            "\u{0}\u{7f}\u{ffff}é;max=é",
            "standby;max=32",      // ttl missing
            "standby;ttl=60",      // max missing
            "early-data;max=-1",   // sign
            "early-data;max=+1",   // sign
            "early-data;max=0",    // zero
            "early-data;max=1 2",  // space inside
            "early-data;max=0x10", // hex
            "early-data;max=1e3",
        ] {
            assert!(Extensions::parse(v).is_empty(), "{v:?}");
        }
    }

    #[test]
    fn huge_numbers_are_refused_not_wrapped() {
        assert_eq!(
            Extensions::parse("early-data;max=4294967295").early_data,
            Some(u32::MAX)
        );
        for n in [
            "4294967296",
            "99999999999",
            "18446744073709551616",
            &"9".repeat(5000),
        ] {
            assert!(
                Extensions::parse(&format!("early-data;max={n}")).is_empty(),
                "{n}"
            );
            assert!(
                Extensions::parse(&format!("standby;max={n};ttl=60")).is_empty(),
                "{n}"
            );
        }
        assert_eq!(
            Extensions::parse("early-data;max=0000000001").early_data,
            Some(1)
        );
    }

    #[test]
    fn a_repeated_item_or_param_counts_once_the_first_usable_one() {
        let e = Extensions::parse(
            "early-data;max=10, early-data;max=20, standby;max=x;ttl=1, standby;max=3;max=4;ttl=5, standby;max=9;ttl=9",
        );
        assert_eq!(e.early_data, Some(10));
        assert_eq!(
            e.standby,
            Some(StandbyParams {
                max: 3,
                ttl_secs: 5
            })
        );
    }

    #[test]
    fn the_value_read_is_bounded() {
        // Items past MAX_VALUE bytes or past MAX_ITEMS items are not looked at.
        let long = format!("{}, early-data;max=5", "x".repeat(MAX_VALUE));
        assert!(Extensions::parse(&long).is_empty());
        let many = format!("{}early-data;max=5", "x,".repeat(MAX_ITEMS));
        assert!(Extensions::parse(&many).is_empty());
        let few = format!("{}early-data;max=5", "x,".repeat(MAX_ITEMS - 1));
        assert_eq!(Extensions::parse(&few).early_data, Some(5));
        // A cut inside a multi-byte character does not panic.
        let wide = "é".repeat(MAX_VALUE);
        assert!(Extensions::parse(&wide).is_empty());
        let params = format!("early-data{}max=5", ";a=1".repeat(MAX_PARAMS));
        assert!(Extensions::parse(&params).is_empty());
    }
}
