//! The live page (`GET /` on the daemon's HTTP listener) in a real browser: Debian's
//! chromium, headless, driven over the DevTools protocol, against a real daemon with
//! real processes. What is checked is what a person would see in the page's DOM; each
//! test saves a screenshot under target/test-output/.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use headless_chrome::{Browser, LaunchOptions, Tab, protocol::cdp::Page};
use serde_json::Value;
use watchdog_tests::{Daemon, Reason, Workload, await_state, free_port};

/// Debian's chromium: `cargo xtask test` installs it when missing.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Two `sleep 600` children under a parent whose name is markup: it must show as text.
/// On "stop" the parent kills and reaps its children, so nothing is left to PID 1.
const MARKUP_PARENT: &str = r#"
import ctypes, subprocess, sys
ctypes.CDLL(None).prctl(15, b"<b>bold</b>", 0, 0, 0)
children = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
print("ready", flush=True)
sys.stdin.readline()
for child in children:
    child.kill()
    child.wait()
print("reaped", flush=True)
"#;

/// Waits for "go", starts N `sleep 600` children, says "ready"; on "stop" kills and
/// reaps them all.
const CROWD: &str = r#"
import os, signal, sys
n = int(sys.argv[1])
sys.stdin.readline()
pids = [os.posix_spawn("/bin/sleep", ["sleep", "600"], os.environ) for _ in range(n)]
print("ready", flush=True)
sys.stdin.readline()
for pid in pids:
    os.kill(pid, signal.SIGKILL)
for pid in pids:
    os.waitpid(pid, 0)
print("reaped", flush=True)
"#;

/// A workload whose parent reaps its own children when told "stop" (also when the test
/// fails): they never become PID 1's.
struct Reaping(Workload);

impl Reaping {
    fn python(source: &str, args: &[&str]) -> Result<Self> {
        Ok(Self(Workload::python(source, args)?))
    }
}

impl Drop for Reaping {
    fn drop(&mut self) {
        if self.0.send("stop").is_ok() {
            let _ = self.0.read_line();
        }
    }
}

/// One headless chromium with one tab on the page. Dropping it closes the browser.
struct PageUnderTest {
    _browser: Browser,
    tab: Arc<Tab>,
}

impl PageUnderTest {
    /// The page as its address gives it the daemon's token (`#token=`).
    fn open(daemon: &Daemon, port: u16) -> Result<Self> {
        let options = LaunchOptions::default_builder()
            .path(Some(PathBuf::from(CHROMIUM)))
            // The tests run as root, where chromium's sandbox refuses to start.
            .sandbox(false)
            .headless(true)
            .window_size(Some((1280, 1000)))
            .idle_browser_timeout(Duration::from_secs(120))
            .build()
            .context("chromium launch options")?;
        let browser = Browser::new(options).with_context(|| {
            format!("starting {CHROMIUM} (cargo xtask test installs Debian's chromium)")
        })?;
        let tab = browser.new_tab()?;
        let token = daemon.http_token()?;
        tab.navigate_to(&format!("http://127.0.0.1:{port}/#token={token}"))?
            .wait_until_navigated()?;
        Ok(Self {
            _browser: browser,
            tab,
        })
    }

    /// The JSON value of a JS expression evaluated in the page (the expression is
    /// JSON.stringify'd there: DevTools returns objects by reference otherwise).
    fn eval(&self, expression: &str) -> Result<Value> {
        let wrapped = format!("JSON.stringify((() => {{ return {expression}; }})())");
        let result = self.tab.evaluate(&wrapped, false)?;
        match result.value {
            Some(Value::String(json)) => Ok(serde_json::from_str(&json)?),
            // undefined: JSON.stringify gives no string.
            _ => Ok(Value::Null),
        }
    }

    /// Polls `expression` until it is truthy (not null, false, 0, "" or []), failing
    /// after the harness's patience; returns its value.
    fn await_js(&self, what: &str, expression: &str) -> Result<Value> {
        await_state(what, || {
            let value = self.eval(expression)?;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(_) => true,
                Value::Bool(true) => true,
            };
            Ok(truthy.then_some(value))
        })
    }

    /// Saves a PNG of the whole page under target/test-output; returns its path.
    fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.tab.capture_screenshot(
            Page::CaptureScreenshotFormatOption::Png,
            None,
            None,
            true,
        )?;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-output");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, &png)?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }
}

/// A JS string literal of `text`.
fn js(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The card of analysis `id`, as a JS expression (null when absent).
fn card(id: &str) -> String {
    format!(
        "document.querySelector('article.analysis[data-analysis-id=\"' + CSS.escape({}) + '\"]')",
        js(id)
    )
}

fn shown_ids(page: &PageUnderTest) -> Result<Vec<String>> {
    Ok(serde_json::from_value(page.eval(
        "Array.from(document.querySelectorAll('article.analysis')).map(a => a.dataset.analysisId)",
    )?)?)
}

fn start_daemon(port: u16) -> Result<Daemon> {
    // A poll every second: the sparklines get a sample a second.
    Daemon::builder()
        .http_port(port)
        .arg("--poll-interval", "1s")
        .start()
}

#[test]
fn the_page_shows_analyses_and_kills_and_follows_a_registration_without_reloading() -> Result<()> {
    let port = free_port()?;
    let daemon = start_daemon(port)?;
    let alpha = Workload::spawn("sleep", &["600"])?;
    daemon.register_with(
        alpha.pid(),
        "alpha",
        &["--memory", "256MiB", "--tree-memory", "1GiB"],
    )?;
    let mut beta = Reaping::python(MARKUP_PARENT, &[])?;
    assert_eq!(beta.0.read_line()?, "ready");
    daemon.register(beta.0.pid(), "beta")?;
    let doomed = Workload::spawn("sleep", &["600"])?;
    daemon.register_with(doomed.pid(), "doomed", &["--timeout", "1s"])?;
    await_state("the timeout kill in events", || {
        let events = daemon.events()?;
        Ok(events
            .iter()
            .any(|e| e.record.analysis_id == "doomed" && e.record.reason == Reason::Timeout)
            .then_some(()))
    })?;

    let page = PageUnderTest::open(&daemon, port)?;
    page.await_js(
        "alpha and beta on the page",
        &format!("{} && {}", card("alpha"), card("beta")),
    )?;
    let kill = page.await_js(
        "the kill of doomed in the kills table",
        "Array.from(document.querySelectorAll('#event-rows tr'))
            .filter(r => r.dataset.analysisId === 'doomed')
            .map(r => ({reason: r.querySelector('.reason').textContent,
                        pid: r.children[2].textContent, limit: r.children[5].textContent}))",
    )?;
    assert_eq!(
        kill,
        serde_json::json!([{"reason": "timeout", "pid": doomed.pid().to_string(), "limit": "1s"}])
    );
    // The killed analysis leaves the page once it is forgotten.
    await_state("alpha and beta alone on the page", || {
        let mut ids = shown_ids(&page)?;
        ids.sort();
        Ok((ids == ["alpha", "beta"]).then_some(()))
    })?;

    // beta's tree: its parent and two children, the parent's name shown as text.
    let beta_card = card("beta");
    let tree = page.eval(&format!(
        "({{pids: Array.from({beta_card}.querySelectorAll('.proc')).map(p => Number(p.dataset.pid)),
            comm: {beta_card}.querySelector('.proc .comm').textContent,
            markup: {beta_card}.querySelectorAll('.tree b').length,
            processes: {beta_card}.querySelector('.processes').textContent,
            zombies: {beta_card}.querySelector('.zombies').textContent}})"
    ))?;
    let pids = tree["pids"].as_array().context("pids")?;
    assert_eq!(pids.len(), 3, "{tree}");
    assert_eq!(pids[0], beta.0.pid());
    assert_eq!(tree["comm"], "<b>bold</b>", "{tree}");
    assert_eq!(tree["markup"], 0, "a process name became markup: {tree}");
    assert_eq!(tree["processes"], "3 processes");
    assert_eq!(tree["zombies"], "0 zombies");
    // alpha's limits as bars: the largest process against 256 MiB, the tree against 1 GiB.
    let meters = page.eval(&format!(
        "Array.from({}.querySelectorAll('.meter .label span:last-child')).map(s => s.textContent)",
        card("alpha")
    ))?;
    let meters: Vec<String> = serde_json::from_value(meters)?;
    assert_eq!(meters.len(), 2, "{meters:?}");
    assert!(meters[0].ends_with("/ 256 MiB"), "{meters:?}");
    assert!(meters[1].ends_with("/ 1.0 GiB"), "{meters:?}");
    // The sparkline fills from the polls (one a second).
    page.await_js(
        "alpha's RSS sparkline",
        &format!("{}.querySelector('svg.spark polyline')", card("alpha")),
    )?;

    // A registration shows up by polling, in this very document: a reload would lose
    // the mark set on it.
    page.eval("(window.notReloaded = 'yes')")?;
    let refreshes_before = page.eval("Number(document.body.dataset.refreshes)")?;
    let gamma = Workload::spawn("sleep", &["600"])?;
    daemon.register(gamma.pid(), "gamma")?;
    page.await_js("gamma on the page", &card("gamma"))?;
    assert_eq!(page.eval("window.notReloaded")?, "yes");
    let refreshes_after = page.eval("Number(document.body.dataset.refreshes)")?;
    assert!(
        refreshes_after.as_u64() > refreshes_before.as_u64(),
        "{refreshes_before} -> {refreshes_after}"
    );
    assert_eq!(page.eval("document.getElementById('error').hidden")?, true);

    // Open beta's tree, as a person would, for the screenshot.
    page.eval(&format!(
        "({}.querySelector('details').open = true)",
        card("beta")
    ))?;
    let shot = page.screenshot("page.png")?;
    assert!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "an empty screenshot"
    );
    drop(page);
    drop((alpha, beta, doomed, gamma));
    Ok(())
}

#[test]
fn an_empty_daemon_a_long_id_and_thousands_of_processes_all_render() -> Result<()> {
    const CROWD_SIZE: usize = 2000;
    let port = free_port()?;
    let daemon = start_daemon(port)?;
    let page = PageUnderTest::open(&daemon, port)?;

    // Empty: the page says so, and shows no error.
    let empty = page.await_js(
        "the first refresh",
        "Number(document.body.dataset.refreshes) >= 1 && {
            noAnalyses: !document.getElementById('no-analyses').hidden,
            noEvents: !document.getElementById('no-events').hidden,
            eventsTable: !document.getElementById('events').hidden,
            error: !document.getElementById('error').hidden,
            summary: document.getElementById('summary').textContent,
            cards: document.querySelectorAll('article.analysis').length}",
    )?;
    assert_eq!(
        empty,
        serde_json::json!({"noAnalyses": true, "noEvents": true, "eventsTable": false,
            "error": false, "summary": "0 processes watched in 0 analyses", "cards": 0})
    );

    // The longest id the daemon takes, with markup in it.
    let long_id = format!("<script>alert(1)</script>{}", "x".repeat(256 - 25));
    assert_eq!(long_id.len(), 256);
    let sleeper = Workload::spawn("sleep", &["600"])?;
    daemon.register(sleeper.pid(), &long_id)?;
    let mut crowd = Reaping::python(CROWD, &[&CROWD_SIZE.to_string()])?;
    daemon.register(crowd.0.pid(), "crowd")?;
    crowd.0.send("go")?;
    assert_eq!(crowd.0.read_line()?, "ready");
    await_state("the crowd watched", || {
        Ok((daemon.status()?.monitored_count > CROWD_SIZE + 1).then_some(()))
    })?;

    let long = page.await_js(
        "the long id on the page",
        &format!(
            "{0} && {{id: {0}.querySelector('.id').textContent,
                 scripts: document.querySelectorAll('article script').length,
                 right: {0}.getBoundingClientRect().right, width: window.innerWidth}}",
            card(&long_id)
        ),
    )?;
    assert_eq!(long["id"], long_id.as_str());
    assert_eq!(long["scripts"], 0);
    assert!(
        long["right"].as_f64() <= long["width"].as_f64(),
        "the long id widens the page past the window: {long}"
    );

    // 2,001 processes: the count in full, the tree listed up to its bound and the rest
    // counted, collapsed until opened.
    let crowd_card = card("crowd");
    let shown = page.await_js(
        "the whole crowd counted",
        &format!(
            "{0} && {0}.querySelector('.processes').textContent === '{1} processes' && {{
                rows: {0}.querySelectorAll('.proc').length,
                more: {0}.querySelector('.tree .more').textContent,
                open: {0}.querySelector('details').open}}",
            crowd_card,
            CROWD_SIZE + 1
        ),
    )?;
    let rows = watchdog_tests::TREE_ROWS;
    assert_eq!(
        shown,
        serde_json::json!({"rows": rows, "more": format!("{} more processes not listed", CROWD_SIZE + 1 - rows), "open": false})
    );
    // Still live with them: a new refresh comes within the patience.
    let refreshes = page.eval("Number(document.body.dataset.refreshes)")?;
    let started = Instant::now();
    page.await_js(
        "a refresh with 2,001 processes shown",
        &format!("Number(document.body.dataset.refreshes) > {refreshes}"),
    )?;
    eprintln!(
        "figures: a refresh came {:?} after the last",
        started.elapsed()
    );
    page.eval(&format!(
        "({crowd_card}.querySelector('details').open = true)"
    ))?;
    page.screenshot("page-crowd.png")?;

    // The JSON the page polls answers for the crowd too, bounded.
    let (code, body) = daemon.http_get(port, "/api/analyses")?;
    assert_eq!(code, 200);
    let json: Value = serde_json::from_str(&body)?;
    let crowd_json = json["analyses"]
        .as_array()
        .context("analyses")?
        .iter()
        .find(|a| a["analysis_id"] == "crowd")
        .context("crowd in /api/analyses")?;
    assert_eq!(crowd_json["tree"].as_array().map(Vec::len), Some(rows));
    if body.len() > 1 << 20 {
        bail!("/api/analyses is {} bytes for 2,002 processes", body.len());
    }
    drop(page);
    drop((sleeper, crowd));
    Ok(())
}
