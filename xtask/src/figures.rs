//! The targets, against this run's figures. Each bench (a binary of
//! watchdog-bench) appends `KEY=VALUE` lines to the
//! file named by `WATCHDOG_BENCH_FIGURES`; this reads them back and renders the summary
//! table, so the comparison is made by the same run that measured, not by hand.

use std::{collections::HashMap, path::Path};

/// Environment variable naming the figures file the benches append to.
pub const ENV: &str = "WATCHDOG_BENCH_FIGURES";

/// Figures by key; a key recorded twice keeps its last value.
pub struct Figures(HashMap<String, String>);

impl Figures {
    pub fn read(path: &Path) -> Self {
        Self::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }

    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    fn num(&self, key: &str) -> Option<f64> {
        self.0.get(key)?.parse().ok()
    }
}

/// One line of the targets table: what it measures, where it must get to, and how to
/// read the measurement (the text shown, and whether it is met).
struct Row {
    figure: &'static str,
    target: &'static str,
    measure: fn(&Figures) -> Option<(String, bool)>,
}

const ROWS: [Row; 6] = [
    Row {
        figure: "register one process, host with 2,000 extra processes (median, µs)",
        target: "≤ 500",
        measure: |f| at_most(f.num("register_median_us")?, 500.0, 0),
    },
    Row {
        figure: "daemon CPU per kernel event (µs)",
        target: "≤ 3",
        measure: |f| at_most(f.num("cpu_per_event_us")?, 3.0, 1),
    },
    Row {
        figure: "watched / unwatched fork rate, 1 forker",
        target: "≥ 0.95",
        measure: |f| {
            let ratio = f.num("fork_ratio_1")?;
            Some((format!("{ratio:.3}"), ratio >= 0.95))
        },
    },
    Row {
        figure: "reconcile poll over 10,000 processes (ms)",
        target: "≤ 10",
        measure: |f| at_most(f.num("poll_10k_ms")?, 10.0, 1),
    },
    Row {
        figure: "RSS idle / 10,000 watched (MiB)",
        target: "≤ 16 / ≤ 40",
        measure: |f| {
            let (idle, busy) = (f.num("rss_idle_mib")?, f.num("rss_10k_mib")?);
            Some((
                format!("{idle:.1} / {busy:.1}"),
                idle <= 16.0 && busy <= 40.0,
            ))
        },
    },
    Row {
        figure: "100,000 watched processes (pid_max raised in the bench): lost events, escapes",
        target: "0, 0",
        measure: scale,
    },
];

fn at_most(value: f64, target: f64, decimals: usize) -> Option<(String, bool)> {
    Some((format!("{value:.decimals$}"), value <= target))
}

/// Lost events count both ways the kernel can drop a fork: a full ring buffer and a
/// full watch map. A run that never got to 100,000 watched, or whose escapes could not
/// be counted (the daemon showed no tree), does not meet the target.
fn scale(f: &Figures) -> Option<(String, bool)> {
    let lost = f.num("scale_lost_events")? + f.num("scale_watch_map_full").unwrap_or(0.0);
    let escapes = f.num("scale_escapes");
    let reached = f.0.get("scale_reached").is_some_and(|r| r == "true");
    let mut text = match escapes {
        Some(escapes) => format!("{lost}, {escapes}"),
        None => format!("{lost}, unknown"),
    };
    if !reached {
        text.push_str(&format!(
            " (only {} watched)",
            f.num("scale_watched").unwrap_or(0.0)
        ));
    }
    Some((text, reached && lost == 0.0 && escapes == Some(0.0)))
}

/// The "Targets" section, Markdown.
pub fn summary(figures: &Figures) -> String {
    let mut out = String::from(
        "## Targets\n\n\
         | figure | target | measured | met? |\n|---|---|---|---|\n",
    );
    for row in &ROWS {
        let (measured, met) = match (row.measure)(figures) {
            Some((text, true)) => (text, "yes"),
            Some((text, false)) => (text, "no"),
            None => ("not measured".to_string(), "—"),
        };
        out.push_str(&format!(
            "| {} | {} | {measured} | {met} |\n",
            row.figure, row.target
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_their_figures_and_judge_them() {
        let figures = Figures::parse(
            "register_median_us=13500\ncpu_per_event_us=2.5\nfork_ratio_1=0.96\n\
             rss_idle_mib=15.0\nrss_10k_mib=41.0\nscale_lost_events=0\n\
             scale_watch_map_full=0\nscale_escapes=0\nscale_reached=true\n",
        );
        let table = summary(&figures);
        assert!(table.contains("| ≤ 500 | 13500 | no |"), "{table}");
        assert!(table.contains("| ≤ 3 | 2.5 | yes |"), "{table}");
        assert!(table.contains("| 0.960 | yes |"), "{table}");
        assert!(table.contains("| ≤ 10 | not measured | — |"), "{table}");
        assert!(table.contains("| 15.0 / 41.0 | no |"), "{table}");
        assert!(table.contains("| 0, 0 | 0, 0 | yes |"), "{table}");
    }

    #[test]
    fn a_scale_run_that_fell_short_is_not_met() {
        let figures = Figures::parse(
            "scale_lost_events=0\nscale_escapes=0\nscale_reached=false\nscale_watched=51234\n",
        );
        assert!(summary(&figures).contains("| 0, 0 (only 51234 watched) | no |"));
    }

    #[test]
    fn escapes_not_counted_are_not_met() {
        let figures = Figures::parse("scale_lost_events=0\nscale_reached=true\n");
        assert!(summary(&figures).contains("| 0, unknown | no |"));
    }
}
