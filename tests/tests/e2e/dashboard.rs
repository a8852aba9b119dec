//! The Grafana dashboard (deploy/grafana/watchdog.json) against a real daemon's
//! /metrics: every query parses as PromQL and names only series the daemon exports, it
//! covers what operators were promised, and its data source is a variable.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, bail};
use promql_parser::{
    parser::{self, Expr},
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;
use watchdog_tests::{Daemon, free_port, http_get};

const DASHBOARD: &str = include_str!("../../../deploy/grafana/watchdog.json");

/// Grafana's own range variables, which Prometheus never sees: a stand-in for parsing.
const GRAFANA_RANGES: [&str; 3] = ["$__rate_interval", "$__interval", "$__range"];

/// Every value of the key `key` anywhere in `json`, with where it was.
fn strings_at(json: &Value, key: &str, path: &str, out: &mut Vec<(String, String)>) {
    match json {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}/{k}");
                if k == key
                    && let Value::String(s) = v
                {
                    out.push((here.clone(), s.clone()));
                }
                strings_at(v, key, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings_at(v, key, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The metric names a PromQL expression selects; an unnamed selector is an error.
fn metric_names(expr: &str) -> Result<BTreeSet<String>> {
    struct Names(BTreeSet<String>, Vec<String>);
    impl ExprVisitor for Names {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(selector) = selector {
                match &selector.name {
                    Some(name) => self.0.insert(name.clone()),
                    None => {
                        self.1.push(format!("{selector:?}"));
                        false
                    }
                };
            }
            Ok(true)
        }
    }
    let promql = GRAFANA_RANGES
        .iter()
        .fold(expr.to_string(), |e, var| e.replace(var, "5m"));
    let parsed = parser::parse(&promql).map_err(|e| anyhow::anyhow!("{expr}: {e}"))?;
    let mut names = Names(BTreeSet::new(), Vec::new());
    let _ = walk_expr(&mut names, &parsed);
    if !names.1.is_empty() {
        bail!("{expr}: selectors without a metric name: {:?}", names.1);
    }
    Ok(names.0)
}

/// The series names a scrape exports: each `# TYPE` family, a histogram as its
/// `_bucket`, `_sum` and `_count` series.
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .flat_map(|(name, kind)| match kind.trim() {
            "histogram" | "summary" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect::<Vec<_>>(),
            _ => vec![name.to_string()],
        })
        .collect()
}

#[test]
fn the_dashboard_queries_only_what_the_daemon_exports() -> Result<()> {
    let port = free_port()?;
    let daemon = Daemon::builder().http_port(port).start()?;
    let (code, metrics) = http_get(port, "/metrics")?;
    assert_eq!(code, 200);
    let exported = exported(&metrics);
    assert!(
        exported.contains("watchdog_event_latency_seconds_bucket"),
        "{exported:?}"
    );

    let dashboard: Value = serde_json::from_str(DASHBOARD).context("watchdog.json")?;
    let mut exprs = Vec::new();
    strings_at(&dashboard, "expr", "", &mut exprs);
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    for (at, expr) in &exprs {
        let names = metric_names(expr).with_context(|| at.clone())?;
        assert!(!names.is_empty(), "{at}: {expr} selects no metric");
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{at}: {expr} names {unknown:?}, which /metrics does not export"
        );
        used.extend(names);
    }
    // The template variable's query (Grafana's label_values, not PromQL) too.
    let mut queries = Vec::new();
    strings_at(&dashboard, "definition", "", &mut queries);
    for (at, query) in &queries {
        let metric = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split([',', ')']).next())
            .with_context(|| format!("{at}: {query} is not label_values(METRIC, LABEL)"))?;
        assert!(exported.contains(metric.trim()), "{at}: {metric}");
    }
    // What the issue promised operators.
    for promised in [
        "watchdog_watched_processes",
        "watchdog_analyses",
        "watchdog_kills_total",
        "watchdog_lost_events_total",
        "watchdog_event_latency_seconds_bucket",
        "watchdog_db_spool_depth",
    ] {
        assert!(
            used.contains(promised),
            "no panel shows {promised}: {used:?}"
        );
    }

    // The data source is chosen on import: a variable, and every panel and query uses it.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .context("templating.list")?;
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "{variables:?}"
    );
    let mut sources = Vec::new();
    strings_at(&dashboard, "uid", "", &mut sources);
    let panel_sources: Vec<_> = sources
        .iter()
        .filter(|(at, _)| at.ends_with("/datasource/uid"))
        .collect();
    assert!(panel_sources.len() > exprs.len(), "{panel_sources:?}");
    for (at, uid) in panel_sources {
        assert_eq!(uid, "${datasource}", "{at}");
    }
    drop(daemon);
    Ok(())
}

#[test]
fn a_query_naming_an_unexported_metric_is_caught() -> Result<()> {
    // The checks above must be able to fail: a misspelt series, a bare histogram name
    // and an unnamed selector are each told apart from the real series.
    let exported = exported(
        "# TYPE watchdog_analyses gauge\nwatchdog_analyses 1\n\
         # TYPE watchdog_event_latency_seconds histogram\n",
    );
    let names = metric_names("sum(rate(watchdog_analysis[$__rate_interval]))")?;
    assert!(!names.is_subset(&exported));
    let bare = metric_names("rate(watchdog_event_latency_seconds[5m])")?;
    assert!(!bare.is_subset(&exported));
    let bucket = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(watchdog_event_latency_seconds_bucket[$__rate_interval])))",
    )?;
    assert!(bucket.is_subset(&exported));
    assert!(metric_names("{__name__=~\"watchdog_.*\"}").is_err());
    assert!(metric_names("sum(watchdog_analyses").is_err());
    Ok(())
}
