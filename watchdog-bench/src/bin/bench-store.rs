//! Benchmark (not a test): kill-record inserts per second into PostgreSQL (a throwaway
//! server with fsync and synchronous commit on, as in production) and SQLite, one
//! transaction per record vs batches. Median of 5 runs of 2,000 records each.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use watchdog_tests::{pg::TestPostgres, watchdog_bin};

const RUNS: usize = 5;
const ROWS: &str = "2000";

fn run(url: &str, batch: usize) -> Result<(f64, f64)> {
    let out = Command::new(watchdog_bin())
        .args([
            "bench-store",
            "--database-url",
            url,
            "--rows",
            ROWS,
            "--batch",
            &batch.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "bench-store failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut figures = text.split_whitespace().map(str::parse::<f64>);
    Ok((
        figures.next().context("single")??,
        figures.next().context("batch")??,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let pg = TestPostgres::start_durable()?;
    let dir = std::env::temp_dir().join(format!("watchdog-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sqlite = format!("sqlite://{}/bench.db", dir.display());
    println!("## Store: kill-record inserts\n");
    println!(
        "Rows per second, median of {RUNS} runs of {ROWS} records, fsync and synchronous commit on.\n"
    );
    println!("| database | batch | one transaction per record | batched | ratio |");
    println!("|---|---|---|---|---|");
    for (name, url) in [("postgres", pg.url()), ("sqlite", sqlite)] {
        for batch in [100, 1000] {
            let (mut single, mut batched) = (Vec::new(), Vec::new());
            for _ in 0..RUNS {
                let (s, b) = run(&url, batch)?;
                single.push(s);
                batched.push(b);
            }
            let (s, b) = (median(single), median(batched));
            println!("| {name} | {batch} | {s:.0} | {b:.0} | {:.1} |", b / s);
        }
    }
    println!(
        "\nWhat limits it: one commit per record pays a WAL flush (PostgreSQL) or a journal \
         sync (SQLite) each time; the daemon writes whatever the spool holds in one \
         transaction, so a tree kill or a replay after an outage gets the batched rate."
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
