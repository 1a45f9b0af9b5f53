//! An autoscaling time series, one row a second — offered load per tenant, accepted load,
//! replicas asked for and ready, the legitimate p99 TTFT — as CSV and as a plot (SVG, no
//! dependency). The operator's simulation (`switchyard-operator simulate`) and the load
//! generator's autoscaling scenarios (`switchyard bench --series`) write the same shape,
//! so a model and a measurement read alike.

use std::fmt::Write as _;

/// One second of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub second: u64,
    /// Offered requests per second, per tenant (in the order of the tenant names).
    pub offered: Vec<f64>,
    /// Requests admitted in that second (all tenants).
    pub accepted: f64,
    /// Replicas asked for and ready at the end of the second.
    pub desired: u32,
    pub ready: u32,
    /// p99 TTFT, in seconds, of the legitimate requests that started in that second
    /// (0: none).
    pub legit_p99_ttft: f64,
}

/// The time series as CSV: one column per tenant's offered load, then accepted,
/// desired, ready and the legitimate p99 TTFT.
pub fn csv(tenants: &[&str], rows: &[Row]) -> String {
    let mut out = String::from("second");
    for name in tenants {
        let _ = write!(out, ",offered_{name}");
    }
    out.push_str(",accepted,desired_replicas,ready_replicas,legit_p99_ttft_s\n");
    for r in rows {
        let _ = write!(out, "{}", r.second);
        for o in &r.offered {
            let _ = write!(out, ",{o:.2}");
        }
        let _ = writeln!(
            out,
            ",{:.0},{},{},{:.3}",
            r.accepted, r.desired, r.ready, r.legit_p99_ttft
        );
    }
    out
}

/// A plot of the time series: offered load per tenant and accepted load (requests/s,
/// left axis) above, replicas and the legitimate p99 TTFT below.
pub fn svg(title: &str, tenants: &[&str], rows: &[Row]) -> String {
    const W: f64 = 900.0;
    const PANEL: f64 = 180.0;
    const LEFT: f64 = 60.0;
    const TOP: f64 = 40.0;
    let seconds = rows.len().max(1) as f64;
    let x = |s: f64| LEFT + (W - LEFT - 20.0) * s / seconds;
    let colors = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"20\" font-size=\"14\">{title}</text>\n",
        h = TOP + 3.0 * (PANEL + 20.0) + 30.0
    );
    // One panel: series of (label, color, values), scaled to their max.
    let mut panel = |index: usize, unit: &str, series: Vec<(String, &str, Vec<f64>)>| {
        let top = TOP + index as f64 * (PANEL + 20.0);
        let max = series
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let y = |v: f64| top + PANEL - PANEL * v / max;
        let _ = writeln!(
            out,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#ccc\"/>\n<text x=\"5\" y=\"{}\">{max:.1}</text><text x=\"5\" y=\"{}\">0</text><text x=\"5\" y=\"{}\">{unit}</text>",
            W - LEFT - 20.0,
            top + 10.0,
            top + PANEL,
            top + PANEL / 2.0
        );
        for (i, (label, color, values)) in series.iter().enumerate() {
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(s, v)| format!("{:.1},{:.1}", x(s as f64), y(*v)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{label}</text>",
                points.join(" "),
                LEFT + 10.0 + 150.0 * i as f64,
                top + 14.0
            );
        }
    };
    let mut load: Vec<(String, &str, Vec<f64>)> = tenants
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                format!("offered {name}"),
                colors[i % colors.len()],
                rows.iter().map(|r| r.offered[i]).collect(),
            )
        })
        .collect();
    load.push((
        "accepted".into(),
        "#000",
        rows.iter().map(|r| r.accepted).collect(),
    ));
    panel(0, "req/s", load);
    panel(
        1,
        "replicas",
        vec![
            (
                "desired".into(),
                "#ff7f0e",
                rows.iter().map(|r| f64::from(r.desired)).collect(),
            ),
            (
                "ready".into(),
                "#17becf",
                rows.iter().map(|r| f64::from(r.ready)).collect(),
            ),
        ],
    );
    panel(
        2,
        "s",
        vec![(
            "legit p99 TTFT".into(),
            "#d62728",
            rows.iter().map(|r| r.legit_p99_ttft).collect(),
        )],
    );
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"{}\">seconds (0–{})</text>\n</svg>",
        TOP + 3.0 * (PANEL + 20.0) + 10.0,
        rows.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_second_a_column_per_tenant_and_a_whole_svg() {
        let rows: Vec<Row> = (0..3)
            .map(|s| Row {
                second: s,
                offered: vec![1.0, 50.0],
                accepted: 2.0,
                desired: 1,
                ready: 1,
                legit_p99_ttft: 0.012,
            })
            .collect();
        let csv = csv(&["acme", "mallory"], &rows);
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some(
                "second,offered_acme,offered_mallory,accepted,desired_replicas,ready_replicas,\
                 legit_p99_ttft_s"
            )
        );
        assert_eq!(lines.next(), Some("0,1.00,50.00,2,1,1,0.012"));
        assert_eq!(csv.lines().count(), 4);
        let plot = svg("flood", &["acme", "mallory"], &rows);
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
        assert!(plot.contains("offered mallory"));
    }
}
