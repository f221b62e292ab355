//! How text log lines write their fields: the one place where outside text (ids, endpoint
//! metadata, header values, reasons, error messages) is made safe for a log.
//!
//! Every field, the message included, is formatted as tracing-subscriber's default would
//! (`name=value`, `%` as Display, `?` as Debug, strings quoted) and then passed through
//! [`hyco_proto::escape::Escaped`], so no value can end a line, start a forged one or carry a
//! terminal escape, whichever call site logged it. JSON logs need no such pass: their encoder
//! already escapes every control character.

use std::fmt::Write as _;

use hyco_proto::escape::Escaped;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{debug_fn, Writer};
use tracing_subscriber::fmt::FormatFields;

/// The text formatter's fields, escaped (see the module documentation).
pub fn fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    debug_fn(
        |w: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
            let mut text = String::new();
            write!(text, "{value:?}")?;
            match field.name() {
                "message" => write!(w, "{}", Escaped(&text)),
                name => write!(w, "{name}={}", Escaped(&text)),
            }
        },
    )
    .delimited(" ")
}
