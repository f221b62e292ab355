//! Order statistics the WAN bench and its chart share (a leaf: it uses no other module).

/// The `p` quantile (0 to 1) of `sorted` by the nearest rank, or `None` when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// A table cell: a JSON number with two decimals, `-` when it is not a number.
pub fn cell(x: &serde_json::Value) -> String {
    x.as_f64()
        .map(|x| format!("{x:.2}"))
        .unwrap_or_else(|| "-".into())
}
