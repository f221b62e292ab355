//! An SVG chart of latency distributions, written by hand (no plotting crate): one panel per
//! measurement, one cumulative distribution per configuration (x: milliseconds, y: the share
//! of connections that had their first byte by then).

use std::fmt::Write;

/// One configuration's samples, in milliseconds.
pub struct Series<'a> {
    pub name: &'a str,
    pub samples_ms: &'a [f64],
}

/// A panel: a title and its series.
pub struct Panel<'a> {
    pub title: &'a str,
    pub series: Vec<Series<'a>>,
}

const COLORS: [&str; 6] = [
    "#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e",
];
const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 64.0;
const TOP: f64 = 80.0;
const BOTTOM: f64 = 50.0;
const GAP: f64 = 64.0;

/// Text safe inside an SVG element or attribute.
fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            c if c.is_control() => " ".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// A round step for about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// The chart: panels side by side, a shared legend, `title` and `note` on top, and a dashed
/// vertical `marker` (milliseconds, label) in every panel. The x axis of every panel ends a
/// little past the largest 99th percentile of its series (the slowest 1 % would squash the
/// rest; they are in the table).
pub fn cdf_svg(
    title: &str,
    note: &str,
    marker: Option<(f64, &str)>,
    panels: &[Panel<'_>],
) -> String {
    let n = panels.len().max(1) as f64;
    let width = LEFT + n * PANEL_W + (n - 1.0) * GAP + 20.0;
    let height = TOP + PANEL_H + BOTTOM + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="20" font-size="15">{}</text><text x="{LEFT}" y="38" fill="#555">{}</text>"##,
        esc(title),
        esc(note)
    );
    for (pi, panel) in panels.iter().enumerate() {
        let x0 = LEFT + pi as f64 * (PANEL_W + GAP);
        let y0 = TOP;
        let xmax = panel
            .series
            .iter()
            .filter_map(|se| {
                let mut v: Vec<f64> = se
                    .samples_ms
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .collect();
                v.sort_by(f64::total_cmp);
                crate::stats::percentile(&v, 0.99)
            })
            .fold(0.0, f64::max)
            * 1.1;
        let xmax = if xmax > 0.0 { xmax } else { 1.0 };
        let step = tick_step(xmax);
        let xmax = (xmax / step).ceil() * step;
        let px = |ms: f64| x0 + (ms / xmax).min(1.0) * PANEL_W;
        let py = |q: f64| y0 + (1.0 - q) * PANEL_H;
        let _ = writeln!(
            s,
            r##"<text x="{x0}" y="{}" font-size="13">{}</text><rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
            y0 - 8.0,
            esc(panel.title)
        );
        // Grid and ticks.
        let mut t = 0.0;
        while t <= xmax + step / 2.0 {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                y0 + PANEL_H,
                y0 + PANEL_H + 16.0,
                fmt_tick(t)
            );
            t += step;
        }
        for q in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = py(q);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{q}</text>"##,
                x0 + PANEL_W,
                x0 - 4.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">share of connections</text>"#,
            x0 - 42.0,
            y0 + PANEL_H / 2.0
        );
        // The 99th percentile, dashed.
        let y = py(0.99);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#bbb" stroke-dasharray="4 3"/><text x="{}" y="{:.1}" text-anchor="end" fill="#777">p99</text>"##,
            x0 + PANEL_W,
            x0 + PANEL_W - 4.0,
            y + 14.0
        );
        if let Some((ms, label)) = marker {
            let x = px(ms);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#d62728" stroke-dasharray="2 3"/><text x="{:.1}" y="{}" fill="#d62728" text-anchor="end">{}</text>"##,
                y0 + PANEL_H,
                x - 4.0,
                y0 + PANEL_H - 6.0,
                esc(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">time to first byte, ms</text>"#,
            x0 + PANEL_W / 2.0,
            y0 + PANEL_H + 34.0
        );
        for (si, se) in panel.series.iter().enumerate() {
            let mut v: Vec<f64> = se
                .samples_ms
                .iter()
                .copied()
                .filter(|x| x.is_finite())
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let len = v.len() as f64;
            // A step function: at each sample the share rises by 1/len.
            let mut d = format!("M{:.1},{:.1}", px(v[0]), py(0.0));
            for (i, x) in v.iter().enumerate() {
                let _ = write!(
                    d,
                    " L{:.1},{:.1} L{:.1},{:.1}",
                    px(*x),
                    py(i as f64 / len),
                    px(*x),
                    py((i + 1) as f64 / len)
                );
            }
            let color = COLORS[si % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<path class="cdf" d="{d}" fill="none" stroke="{color}" stroke-width="1.6"><title>{}</title></path>"#,
                esc(se.name)
            );
        }
    }
    // Legend: the series of the first panel (the same names in every panel).
    if let Some(p) = panels.first() {
        let y = TOP + PANEL_H + BOTTOM + 14.0;
        let mut x = LEFT;
        for (si, se) in p.series.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="3"/><text x="{}" y="{y}">{}</text>"#,
                y - 4.0,
                x + 20.0,
                y - 4.0,
                x + 25.0,
                esc(se.name)
            );
            x += 40.0 + 7.0 * se.name.chars().count() as f64;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(t: f64) -> String {
    if t.fract().abs() < 1e-9 {
        format!("{t:.0}")
    } else {
        format!("{t}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_curve_per_series_names_escaped_steps_rising() {
        let a = [3.0, 1.0, 2.0];
        let b = [5.0, f64::NAN, 4.0];
        let svg = cdf_svg(
            "t <x>",
            "n & m",
            Some((2.0, "limit")),
            &[
                Panel {
                    title: "sequential",
                    series: vec![
                        Series {
                            name: "a<b",
                            samples_ms: &a,
                        },
                        Series {
                            name: "c",
                            samples_ms: &b,
                        },
                    ],
                },
                Panel {
                    title: "burst",
                    series: vec![Series {
                        name: "c",
                        samples_ms: &[],
                    }],
                },
            ],
        );
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert_eq!(
            svg.matches("class=\"cdf\"").count(),
            2,
            "empty series drawn no curve"
        );
        assert!(svg.contains("a&lt;b") && svg.contains("t &lt;x&gt;") && svg.contains("n &amp; m"));
        assert!(!svg.contains("a<b") && !svg.contains("NaN"));
        // The first curve's points: y (downwards in SVG) never increases along the path.
        let d = svg
            .split("class=\"cdf\" d=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("path");
        let ys: Vec<f64> = d
            .split(['M', 'L'])
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim()
                    .split(',')
                    .nth(1)
                    .expect("y")
                    .parse()
                    .expect("number")
            })
            .collect();
        assert_eq!(ys.len(), 1 + 2 * a.len());
        assert!(ys.windows(2).all(|w| w[1] <= w[0]), "{ys:?}");
        assert_eq!(ys.last().copied(), Some(TOP), "ends at 100 %");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(9.0), 2.0);
        assert_eq!(tick_step(260.0), 100.0);
    }
}
