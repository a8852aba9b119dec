//! Benchmark (not a test): detection latency, violation → SIGTERM handled by the
//! victim, for orphan, timeout and memory, side by side in one run: watchdog against
//! the psutil poller it replaces (bench/poller.py) at 1 s and at 30 s. Both ends read
//! the kernel's CLOCK_REALTIME: the moment of the violation (the parent's SIGKILL sent,
//! the deadline, the start of the allocation that crossed the limit) and the moment the
//! victim's SIGTERM handler runs. Memory also reports overshoot: RSS at SIGTERM ÷ limit,
//! for a victim growing at about 1 GiB/s. Prints Markdown.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use watchdog_tests::{Daemon, Workload, python};

/// Sequential trials against watchdog; concurrent victims against each poller.
const TRIALS: usize = 30;
const POLLER_VICTIMS: usize = 8;
const MEMORY_LIMIT: u64 = 200 << 20;

/// Victims print `term <handled ns> <violation ns> <rss bytes>` from their SIGTERM
/// handler. A memory victim's violation is the start of the 256 KiB allocation that
/// crossed the limit (so its latency is an upper bound, by up to one allocation, and
/// Python runs its handler only once that allocation is done); it grows 256 KiB per
/// 0.25 ms on average (1 GiB/s) up to 1.5 GiB and holds.
const VICTIM: &str = r#"
import os, signal, sys, time
violation = 0
step = 0  # start of the allocation under way: the crossing's, if SIGTERM lands in it
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * page
def on_term(sig, frame):
    os.write(1, f"term {time.clock_gettime_ns(time.CLOCK_REALTIME)} {violation or step} {rss()}\n".encode())
    os._exit(0)
mode, limit = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
if mode == "orphan":
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, on_term)
        os.write(1, f"ready {os.getpid()}\n".encode())
        time.sleep(600)
    time.sleep(600)
signal.signal(signal.SIGTERM, on_term)
os.write(1, f"ready {os.getpid()}\n".encode())
if mode == "memory":
    hold = []
    began = time.clock_gettime_ns(time.CLOCK_REALTIME)
    for i in range(6144):
        started = step = time.clock_gettime_ns(time.CLOCK_REALTIME)
        hold.append(b"x" * (256 << 10))
        if not violation and rss() > limit:
            violation = started
        # Paced on the whole run, not each step: sleeps this short overrun.
        ahead = began + (i + 1) * 250_000 - time.clock_gettime_ns(time.CLOCK_REALTIME)
        if ahead > 0:
            time.sleep(ahead / 1e9)
time.sleep(600)
"#;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64
}

/// A victim's `term` line: (handled, violation, rss).
fn term(work: &mut Workload) -> Result<(u64, u64, u64)> {
    loop {
        let line = work.read_line()?;
        if let Some(rest) = line.strip_prefix("term ") {
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            return Ok((v[0], v[1], v[2]));
        }
    }
}

fn ready(work: &mut Workload) -> Result<u32> {
    let line = work.read_line()?;
    Ok(line
        .strip_prefix("ready ")
        .context("no ready line")?
        .parse()?)
}

fn victim(mode: &str) -> Result<Workload> {
    Workload::python(VICTIM, &[mode, &MEMORY_LIMIT.to_string()])
}

/// bench/poller.py, driven over its stdin.
struct Poller {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    adopted: Vec<u32>,
}

impl Poller {
    fn start(interval_s: u32) -> Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/poller.py");
        let mut child = Command::new(python())
            .args([script, &interval_s.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
            adopted: Vec::new(),
        })
    }

    fn line(&mut self, prefix: &str) -> Result<String> {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("the poller exited (is psutil installed? pip install psutil)");
            }
            if let Some(pid) = line.trim().strip_prefix("adopted ") {
                self.adopted.push(pid.parse()?);
            }
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return Ok(rest.to_string());
            }
        }
    }

    /// Watches `pid`; returns the registration time (ns).
    fn watch(&mut self, pid: u32, timeout_s: u64, memory: u64) -> Result<u64> {
        writeln!(self.stdin, "watch {pid} {timeout_s} {memory}")?;
        let rest = self.line("registered ")?;
        Ok(rest.split_whitespace().nth(1).context("no time")?.parse()?)
    }

    fn await_adopted(&mut self, pid: u32) -> Result<()> {
        while !self.adopted.contains(&pid) {
            self.line("adopted ")?;
        }
        Ok(())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Sample {
    latency_ns: u64,
    overshoot: Option<f64>,
}

fn ours(daemon: &Daemon, mode: &str, trial: usize) -> Result<Sample> {
    let mut work = victim(mode)?;
    let id = format!("{mode}-{trial}");
    let pid = work.pid().to_string();
    let limits: &[&str] = match mode {
        "timeout" => &["--timeout", "300ms"],
        "memory" => &["--memory", "200MiB"],
        _ => &[],
    };
    let mut args = vec!["register", "--pid", &pid, "--analysis-id", &id];
    args.extend(limits);
    daemon.cli_ok(&args)?;
    work.send("go")?;
    ready(&mut work)?;
    let violated = match mode {
        "orphan" => {
            let at = now_ns();
            kill(Pid::from_raw(work.pid() as i32), Signal::SIGKILL)?;
            at
        }
        "timeout" => {
            let answer =
                daemon.request(&format!(r#"{{"op":"dump_tree","analysis_id":"{id}"}}"#))?;
            answer["ok"]["analyses"][0]["deadline_unix_ms"]
                .as_u64()
                .context("no deadline")?
                * 1_000_000
        }
        _ => 0,
    };
    let (handled, violation, rss) = term(&mut work)?;
    Ok(sample(
        mode,
        handled,
        if mode == "memory" {
            violation
        } else {
            violated
        },
        rss,
    ))
}

fn sample(mode: &str, handled: u64, violated: u64, rss: u64) -> Sample {
    Sample {
        latency_ns: handled.saturating_sub(violated),
        overshoot: (mode == "memory").then(|| rss as f64 / MEMORY_LIMIT as f64),
    }
}

/// All victims at once: a poll serves them all, so a 30 s poller is measured in minutes.
fn polled(interval_s: u32, mode: &str) -> Result<Vec<Sample>> {
    let mut poller = Poller::start(interval_s)?;
    let mut victims = Vec::new();
    let start = std::time::Instant::now();
    for i in 0..POLLER_VICTIMS {
        let mut work = victim(mode)?;
        if mode != "orphan" {
            // Violations spread over one interval, as they fall in real use.
            let at = start
                + std::time::Duration::from_secs(interval_s.into()) * i as u32
                    / POLLER_VICTIMS as u32;
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
        }
        let (timeout_s, memory) = match mode {
            "timeout" => (2, 0),
            "memory" => (0, MEMORY_LIMIT),
            _ => (0, 0),
        };
        let registered = poller.watch(work.pid(), timeout_s, memory)?;
        work.send("go")?;
        let ready_pid = ready(&mut work)?;
        victims.push((work, registered + timeout_s * 1_000_000_000, ready_pid));
    }
    let mut killed_at = vec![0; victims.len()];
    if mode == "orphan" {
        for (_, _, child) in &victims {
            poller.await_adopted(*child)?;
        }
        // Spread the kills over one interval: a violation can fall anywhere between
        // two polls, and killing all right after the adopting poll would always wait
        // a full interval.
        let start = std::time::Instant::now();
        let count = victims.len() as u32;
        // (`start` shadows the registration start: the kills are spread from here.)
        for (i, (work, _, _)) in victims.iter().enumerate() {
            let at = start + std::time::Duration::from_secs(interval_s.into()) * i as u32 / count;
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
            killed_at[i] = now_ns();
            kill(Pid::from_raw(work.pid() as i32), Signal::SIGKILL)?;
        }
    }
    let mut samples = Vec::new();
    for (i, (work, deadline, _)) in victims.iter_mut().enumerate() {
        let (handled, violation, rss) = term(work)?;
        let violated = match mode {
            "orphan" => killed_at[i],
            "timeout" => *deadline,
            _ => violation,
        };
        samples.push(sample(mode, handled, violated, rss));
    }
    Ok(samples)
}

fn row(scenario: &str, watcher: &str, samples: &[Sample]) -> String {
    let mut ms: Vec<f64> = samples.iter().map(|s| s.latency_ns as f64 / 1e6).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let overshoot = {
        let mut o: Vec<f64> = samples.iter().filter_map(|s| s.overshoot).collect();
        o.sort_by(f64::total_cmp);
        if o.is_empty() {
            "".to_string()
        } else {
            format!("{:.2} / {:.2}", o[o.len() / 2], o[o.len() - 1])
        }
    };
    format!(
        "| {scenario} | {watcher} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {overshoot} |",
        at(0.5),
        at(0.99),
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    )
}

fn main() -> Result<()> {
    let daemon = Daemon::builder()
        .arg("--grace", "10s")
        .arg("--poll-interval", "30s")
        .start()?;
    println!("## 1-3. Detection latency: violation → SIGTERM handled by the victim\n");
    println!(
        "Milliseconds. Overshoot: RSS at SIGTERM ÷ the 200 MiB limit, median / max, for a victim growing at ~1 GiB/s (capped at 1.5 GiB).\n"
    );
    println!("| scenario | watcher | median | p99 | min | max | runs | memory overshoot |");
    println!("|---|---|---|---|---|---|---|---|");
    // The same daemon but for the memory kill's SIGTERM, which it sends itself.
    let daemon_signals = Daemon::builder()
        .arg("--grace", "10s")
        .arg("--poll-interval", "30s")
        .arg("--kernel-signals", "false")
        .start()?;
    for mode in ["orphan", "timeout", "memory"] {
        let samples = (0..TRIALS)
            .map(|t| ours(&daemon, mode, t))
            .collect::<Result<Vec<_>>>()?;
        if mode == "memory" {
            println!("{}", row(mode, "watchdog (the kernel's SIGTERM)", &samples));
            let samples = (0..TRIALS)
                .map(|t| ours(&daemon_signals, mode, t))
                .collect::<Result<Vec<_>>>()?;
            println!("{}", row(mode, "watchdog (the daemon's SIGTERM)", &samples));
        } else {
            println!("{}", row(mode, "watchdog (events)", &samples));
        }
        for interval in [1, 30] {
            println!(
                "{}",
                row(
                    mode,
                    &format!("psutil poller, {interval} s"),
                    &polled(interval, mode)?
                )
            );
        }
        std::io::stdout().flush()?;
    }
    println!(
        "\nWhat limits it. watchdog: the kernel's SIGTERM is sent in the page fault that \
         crossed the limit, so the figure is Python finishing the allocation under way and \
         running its handler; with --kernel-signals false (and for orphans) the daemon acts \
         on the kernel event, which adds the ring buffer wake-up, one loop turn and a pidfd \
         signal; the timeout adds the timer (tokio, 1 ms granularity; the deadline is read \
         in whole ms). The poller: the poll interval (uniform wait, \
         median ≈ interval/2) and, for orphans, a first poll to discover the children at all; \
         a victim growing at 1 GiB/s is as far over its limit as one interval lets it grow \
         (here, the 1.5 GiB cap)."
    );
    Ok(())
}
