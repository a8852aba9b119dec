//! Harness for the end-to-end tests (and the benchmarks of watchdog-bench): a real daemon per test (own socket
//! and state directory), the real CLI, and real process trees that are killed when the
//! test ends, pass or fail.

pub mod bpf;
pub mod pg;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};

// All the tests and benches take from the daemon's crate, named once here: its module
// paths may move, and then this block is the one place to follow them. The wire types
// are the daemon's own, so a test reads exactly what the daemon sends.
pub use watchdog_user::{
    api::{
        client,
        control::MAX_CONNECTIONS,
        overview::TREE_ROWS,
        protocol::{self, EventRecord, Reply, Request, Response, Status, TreeNode},
    },
    os::procs::pss_bytes,
    store::DbStatus,
    vocab::{
        limits::{LimitOverrides, Reason},
        record::{KillRecord, Outcome, SignalSent},
    },
};

/// The daemon binary: `WATCHDOG_BIN` (set by `cargo xtask test`), else the debug build.
pub fn watchdog_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WATCHDOG_BIN") {
        return bin.into();
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/watchdog-user");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// How long any awaited condition may take before the test fails. Generous: CI is a
/// loaded 2-core machine; the wait ends as soon as the condition holds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` until it returns Some, failing after `PATIENCE`.
pub fn await_state<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {PATIENCE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every process of a `dump-tree`, as a list of references.
pub fn all_nodes(processes: &[TreeNode]) -> Vec<&TreeNode> {
    processes.iter().collect()
}

/// The processes of a `dump-tree` that no other process in it is the parent of.
pub fn roots_of(processes: &[TreeNode]) -> Vec<&TreeNode> {
    processes.iter().filter(|n| n.depth == 0).collect()
}

/// The processes of a `dump-tree` directly below `pid`.
pub fn children_of(processes: &[TreeNode], pid: u32) -> Vec<&TreeNode> {
    processes.iter().filter(|n| n.ppid == pid).collect()
}

/// A daemon of the test's own, stopped and cleaned up on drop.
///
/// Every daemon comes with a bystander: an unregistered process that no test touches.
/// On drop the bystander, the daemon itself and PID 1 must all still be alive: across
/// the whole suite, the watchdog never signals what it must not.
pub struct Daemon {
    child: Child,
    bystander: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    wrapper: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Where its kernel state is pinned: removed on drop, which detaches its programs.
    pub pin_dir: PathBuf,
}

/// bpffs at /sys/fs/bpf, mounted once before any daemon starts (two daemons mounting it
/// at the same moment would stack two instances and lose each other's pins).
fn ensure_bpffs() {
    static MOUNTED: std::sync::Once = std::sync::Once::new();
    MOUNTED.call_once(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        {
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "mounting bpffs at /sys/fs/bpf failed"
            );
        }
    });
}

/// A fresh directory under the temp dir, `watchdog-<tag>-<pid>-<n>-<nanos>`: unique among
/// the suite's threads (the counter) and across runs on the host (pid and clock).
pub fn scratch_dir(tag: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "watchdog-{tag}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// How a test's daemon runs: `Daemon::builder()...start()`. The state directory, the
/// pin directory, the HTTP listener and the database get per-daemon defaults unless
/// set here; everything else goes through [`Self::arg`] and [`Self::flag`].
#[derive(Default)]
#[must_use = "a builder starts nothing until start()"]
pub struct DaemonBuilder {
    wrapper: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pin_dir: Option<PathBuf>,
    http: Option<String>,
    database_url: Option<String>,
}

/// The daemon's state directory, inside the test's own (which holds the socket and the
/// log, and files the test makes): the daemon makes it root's alone.
const STATE_DIR: &str = "state";

/// Options the builder sets itself: given twice, the daemon would take the last one, and
/// a test's choice could be silently overridden by a default.
const OWN_OPTIONS: [&str; 4] = ["--state-dir", "--pin-dir", "--http", "--database-url"];

impl DaemonBuilder {
    /// A daemon option and its value, e.g. `.arg("--grace", "1s")`.
    pub fn arg(mut self, name: &str, value: impl AsRef<str>) -> Self {
        Self::not_own(name);
        self.args
            .extend([name.to_string(), value.as_ref().to_string()]);
        self
    }

    /// A daemon option that takes no value, e.g. `.flag("--dry-run")`.
    pub fn flag(mut self, name: &str) -> Self {
        Self::not_own(name);
        self.args.push(name.to_string());
        self
    }

    fn not_own(name: &str) {
        assert!(
            !OWN_OPTIONS.contains(&name),
            "{name} has its own DaemonBuilder method"
        );
    }

    /// Runs the daemon behind `wrapper`, e.g. `unshare -m ...`, which execs the rest of
    /// its command line.
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        self
    }

    /// An environment variable for the daemon (only: the tests' own process keeps its
    /// environment, which every thread of the suite shares).
    pub fn env(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.env.push((key.to_string(), value.as_ref().to_string()));
        self
    }

    /// Where the daemon pins its kernel state (default: under /sys/fs/bpf, named after
    /// its state directory). Removed when the daemon is dropped.
    pub fn pin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pin_dir = Some(dir.into());
        self
    }

    /// `--http 127.0.0.1:PORT` (default: no HTTP listener).
    pub fn http_port(mut self, port: u16) -> Self {
        self.http = Some(format!("127.0.0.1:{port}"));
        self
    }

    /// `--database-url` (default: SQLite in the daemon's state directory).
    pub fn database_url(mut self, url: impl AsRef<str>) -> Self {
        self.database_url = Some(url.as_ref().to_string());
        self
    }

    /// Starts `watchdog-user run` and waits until it answers on its socket.
    pub fn start(self) -> Result<Daemon> {
        ensure_bpffs();
        let dir = scratch_dir("test")?;
        let socket = dir.join("watchdog.sock");
        let pin_dir = self
            .pin_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf").join(dir.file_name().expect("a name")));
        let state_dir = dir.join(STATE_DIR);
        let database_url = self
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}/watchdog.db", state_dir.display()));
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--http".into(),
            self.http.unwrap_or_else(|| "none".into()),
            "--database-url".into(),
            database_url,
        ];
        args.extend(self.args);
        let bystander = Command::new("sleep").arg("3600").process_group(0).spawn()?;
        let child = Daemon::spawn(&dir, &socket, &self.wrapper, &args, &self.env)?;
        let mut daemon = Daemon {
            child,
            bystander,
            dir,
            socket,
            wrapper: self.wrapper,
            args,
            env: self.env,
            pin_dir,
        };
        daemon.await_serving()?;
        Ok(daemon)
    }
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// A daemon with every default: `Daemon::builder().start()`.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    fn spawn(
        dir: &Path,
        socket: &Path,
        wrapper: &[impl AsRef<str>],
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program.as_ref());
                cmd.args(rest.iter().map(AsRef::as_ref)).arg(watchdog_bin());
                cmd
            }
            None => Command::new(watchdog_bin()),
        };
        cmd.arg("--socket").arg(socket).arg("run").args(args);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        cmd.spawn().context("starting the daemon")
    }

    fn await_serving(&mut self) -> Result<()> {
        await_state("the daemon to answer on its socket", || {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the daemon exited ({status}) before serving:\n{}",
                    self.log()
                );
            }
            Ok(self.try_status().ok())
        })
        .map(drop)
    }

    /// Kills the daemon with SIGKILL, as a crash would: its pinned state stays.
    pub fn crash(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts the daemon again (after `crash`) with the same state and `extra` more
    /// arguments.
    pub fn start_again_with(&mut self, extra: &[&str]) -> Result<()> {
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.start_again()
    }

    /// Starts the daemon again (after `crash`) with the same arguments and state.
    pub fn start_again(&mut self) -> Result<()> {
        self.child = Self::spawn(
            &self.dir,
            &self.socket,
            &self.wrapper,
            &self.args,
            &self.env,
        )?;
        self.await_serving()
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same state.
    pub fn restart(&mut self) -> Result<()> {
        signal_unreaped(&mut self.child, Signal::SIGTERM)?;
        self.child.wait()?;
        self.start_again()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the daemon keeps its database, spool and HTTP token.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE_DIR)
    }

    /// The bearer token its HTTP listener asks for.
    pub fn http_token(&self) -> Result<String> {
        let path = self.state_dir().join("http-token");
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(token.trim().to_string())
    }

    /// `GET path` on its HTTP listener at `port`, bearing its token.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        http_get_with_token(port, path, &self.http_token()?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(watchdog_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("the CLI runs")
    }

    /// Runs the CLI and returns its stdout, failing on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "watchdog-user {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn register(&self, pid: u32, analysis: &str) -> Result<()> {
        self.register_with(pid, analysis, &[])
    }

    /// `register` with limits, e.g. `&["--grace", "1s"]`.
    pub fn register_with(&self, pid: u32, analysis: &str, limits: &[&str]) -> Result<()> {
        let pid = pid.to_string();
        let mut args = vec!["register", "--pid", &pid, "--analysis-id", analysis];
        args.extend_from_slice(limits);
        self.cli_ok(&args).map(drop)
    }

    /// `dump-tree --json`'s processes: depth first, roots at depth 0.
    pub fn tree(&self, analysis: Option<&str>) -> Result<Vec<TreeNode>> {
        let mut args = vec!["dump-tree", "--json"];
        if let Some(id) = analysis {
            args.extend(["--analysis-id", id]);
        }
        let mut tree: serde_json::Value = serde_json::from_str(&self.cli_ok(&args)?)?;
        Ok(serde_json::from_value(tree["processes"].take())?)
    }

    /// Recent violations and kills, newest first: `events --json`, read as the daemon's
    /// own records.
    pub fn events(&self) -> Result<Vec<EventRecord>> {
        self.events_with(&[])
    }

    /// `events --json` with `filters` (e.g. `&["--reason", "timeout"]`).
    pub fn events_with(&self, filters: &[&str]) -> Result<Vec<EventRecord>> {
        let mut args = vec!["events", "--json"];
        args.extend_from_slice(filters);
        Ok(serde_json::from_str(&self.cli_ok(&args)?)?)
    }

    /// The records of analysis `id`, newest first.
    pub fn events_of(&self, id: &str) -> Result<Vec<EventRecord>> {
        Ok(self
            .events()?
            .into_iter()
            .filter(|e| e.record.analysis_id == id)
            .collect())
    }

    /// A record for `pid`, once there is one.
    pub fn await_record_for(&self, pid: u32) -> Result<EventRecord> {
        await_state(&format!("a record for {pid}"), || {
            Ok(self.events()?.into_iter().find(|e| e.record.pid == pid))
        })
    }

    /// A record for each of `pids`, once every one has its record (records reach the
    /// database one by one).
    pub fn await_records_for(&self, pids: &[u32]) -> Result<Vec<EventRecord>> {
        await_state("kill records", || {
            let found: Vec<EventRecord> = self
                .events()?
                .into_iter()
                .filter(|e| pids.contains(&e.record.pid))
                .collect();
            Ok((found.len() >= pids.len()).then_some(found))
        })
    }

    /// Starts `argv`, registers it with a 1 s timeout as analysis `id`, and returns its
    /// pid once it has been killed and the kill counted.
    pub fn timeout_kill(&self, argv: &[&str], id: &str) -> Result<u32> {
        let kills = self.status()?.kills_total;
        let mut process = Workload::spawn(argv[0], &argv[1..])?;
        self.register_with(process.pid(), id, &["--timeout", "1s"])?;
        process.wait()?;
        await_state("the kill recorded", || {
            Ok((self.status()?.kills_total > kills).then_some(()))
        })?;
        Ok(process.pid())
    }

    /// The status once exactly `depth` records wait in the spool.
    pub fn await_spool(&self, depth: usize) -> Result<Status> {
        await_state(&format!("{depth} records spooled"), || {
            let status = self.status()?;
            Ok((status.database.spool_depth == depth).then_some(status))
        })
    }

    fn try_status(&self) -> Result<Status> {
        Ok(serde_json::from_str(&self.cli_ok(&["status", "--json"])?)?)
    }

    pub fn status(&self) -> Result<Status> {
        self.try_status()
    }

    /// Sends one raw protocol line and returns the parsed answer.
    pub fn request(&self, line: &str) -> Result<serde_json::Value> {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        (&stream).write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer)?;
        Ok(serde_json::from_str(&answer)?)
    }

    /// Sends a signal to the daemon (e.g. SIGHUP to reload its config).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        signal_unreaped(&mut self.child, signal)
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the daemon exited, once it has (by itself: nothing here stops it).
    pub fn await_exit(&mut self) -> Result<std::process::ExitStatus> {
        await_state("the daemon to exit", || Ok(self.child.try_wait()?))
    }
}

/// One SQL query's rows from a SQLite file, as text with `|` between columns.
pub fn sqlite_query(path: &Path, sql: &str) -> Result<String> {
    // Python's sqlite3 module: the sqlite3 CLI is not on every machine.
    let script = "import sqlite3, sys\nfor row in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]):\n    print('|'.join('' if v is None else str(v) for v in row))";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(path)
        .arg(sql)
        .output()?;
    if !out.status.success() {
        bail!(
            "sqlite query {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl Daemon {
    /// What must never be signalled: checked when every test's daemon goes away.
    fn untouchables_alive(&mut self) -> Result<()> {
        if let Some(status) = self.bystander.try_wait()? {
            bail!("an unregistered bystander process was killed ({status})");
        }
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon died ({status}) before the test ended");
        }
        if kill(Pid::from_raw(1), None).is_err() {
            bail!("PID 1 is gone");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let untouched = self.untouchables_alive();
        let _ = self.bystander.kill();
        let _ = self.bystander.wait();
        let _ = signal_unreaped(&mut self.child, Signal::SIGTERM);
        let _ = self.child.wait();
        // Captured by the test harness: shown only when the test fails.
        eprintln!("--- daemon log ---\n{}", self.log());
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Err(err) = untouched
            && !std::thread::panicking()
        {
            panic!("{err}");
        }
    }
}

/// A process tree under test: started in its own process group, killed (the whole
/// group) on drop. Talks over stdin/stdout lines.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Once the first process is reaped its pid, and so the group's id, may name a
    /// newcomer's group: drop then signals no group.
    reaped: bool,
}

impl Workload {
    pub fn spawn(program: &str, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
            reaped: false,
        })
    }

    /// A Python program: the test's process trees are written in the language the
    /// product watches (multiprocessing, os.fork).
    pub fn python(source: &str, args: &[&str]) -> Result<Self> {
        let mut argv = vec!["-u", "-c", source];
        argv.extend(args);
        Self::spawn(python(), &argv)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Next line the workload prints (blocks until it does).
    pub fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the workload closed its stdout");
        }
        Ok(line.trim_end().to_string())
    }

    /// Whether the workload's first process still runs (reaping it if it has ended).
    pub fn alive_now(&mut self) -> bool {
        let running = matches!(self.child.try_wait(), Ok(None));
        self.reaped |= !running;
        running
    }

    /// Sends `signal` to the workload's first process, leaving it unreaped.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        signal_unreaped(&mut self.child, signal)
    }

    /// SIGKILLs the workload's first process and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.reaped = true;
        Ok(())
    }

    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        self.stdin.take();
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }

    /// Like [`Workload::wait`], but fails after `PATIENCE`: for a workload that only
    /// ends if something kills it.
    pub fn await_death(&mut self) -> Result<std::process::ExitStatus> {
        self.stdin.take();
        let status = await_state("the workload to be killed", || Ok(self.child.try_wait()?))?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Signals `child` unless it is already reaped: a reaped child's pid may name a
/// newcomer, while an unreaped one (running or a zombie) still holds its pid.
fn signal_unreaped(child: &mut Child, signal: Signal) -> Result<()> {
    if child.try_wait()?.is_some() {
        bail!("process {} has already ended", child.id());
    }
    kill(Pid::from_raw(child.id() as i32), signal)?;
    Ok(())
}

/// The real interpreter, not a version manager's shim: a pyenv shim is a bash script
/// that forks before it execs Python, and those forks would be counted as the workload's.
pub fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is installed");
        String::from_utf8(out.stdout)
            .expect("a UTF-8 path")
            .trim()
            .to_string()
    })
}

/// Whether `pid` is a living process (a zombie is not).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X")))
}

/// The real uid of process `pid` of the procfs at `proc` (a container's, seen from the
/// host, or the host's own `/proc`), while it lives.
pub fn real_uid_in(proc: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc.join(format!("{pid}/status"))).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// /proc's state letter of `pid` (`Z` for a zombie), None when no such process exists.
pub fn state_of(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent of `pid`, from /proc; None when no such process exists.
pub fn ppid_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The pids whose parent is `pid`, from a scan of /proc.
pub fn children_by_scan(pid: u32) -> Vec<u32> {
    let dir = std::fs::read_dir("/proc").expect("/proc is readable");
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ppid_of(*p) == Some(pid))
        .collect()
}

/// The fields of /proc/PID/stat after the command name: state first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// Living processes in process group `pgid`.
pub fn alive_in_group(pgid: u32) -> Vec<u32> {
    // An unreadable /proc must fail the test, not make "nothing left alive" true.
    let dir = std::fs::read_dir("/proc").expect("/proc is readable");
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_fields(*pid).is_some_and(|f| {
                !matches!(f.first().map(String::as_str), Some("Z" | "X"))
                    && f.get(2) == Some(&pgid.to_string())
            })
        })
        .collect()
}

/// Waits for "go", then grows by 10 MiB of touched memory every 20 ms, to 600 MiB.
pub const GROWER: &str = r#"
import sys, time
sys.stdin.readline()
hold = []
for _ in range(60):
    hold.append(b"x" * (10 << 20))
    time.sleep(0.02)
print("survived", flush=True)
time.sleep(600)
"#;

/// A parent forks argv[1] children; on "go" each child grows by argv[2] KiB. A child
/// of this interpreter holds ~5.6 MiB, ~7.3 MiB once grown by 1.5 MiB: never a step
/// (8 MiB) from the 0 it started at, so none of them ever reports its own RSS. Prints
/// the children's pids once they run, and "grown" once all grew.
pub const GROWERS: &str = r#"
import os, sys, time
N, GROW = int(sys.argv[1]), int(sys.argv[2]) << 10
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
def wait_for(n):
    got = 0
    while got < n:
        got += len(os.read(ready_r, n - got))
pids = []
for _ in range(N):
    pid = os.fork()
    if pid == 0:
        os.write(ready_w, b".")
        os.read(go_r, 1)
        hold = bytearray(GROW)
        hold[::4096] = b"\x01" * (GROW // 4096)
        os.write(ready_w, b"+")
        time.sleep(600)
        os._exit(0)
    pids.append(pid)
wait_for(N)
print(" ".join(map(str, pids)), flush=True)
sys.stdin.readline()
os.write(go_w, b"g" * N)
wait_for(N)
print("grown", flush=True)
time.sleep(600)
"#;

/// Maps argv[1] MiB it never touches, prints its pid and the mapping's address.
pub const TARGET: &str = r#"
import ctypes, mmap, os, sys, time
size = int(sys.argv[1]) << 20
area = mmap.mmap(-1, size)
address = ctypes.addressof(ctypes.c_char.from_buffer(area))
print(os.getpid(), address, flush=True)
time.sleep(600)
"#;

/// Writes argv[3] MiB into process argv[1] at address argv[2] with process_vm_writev,
/// 8 MiB a call, until done or the target is gone.
pub const WRITER: &str = r#"
import ctypes, os, sys
pid, address, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) << 20
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
chunk = 8 << 20
buf = ctypes.create_string_buffer(b"\x07" * chunk, chunk)
done = 0
while done < size:
    local = IoVec(ctypes.addressof(buf), chunk)
    remote = IoVec(address + done, chunk)
    if libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) < 0:
        print("stopped", os.strerror(ctypes.get_errno()), done >> 20, flush=True)
        sys.exit(0)
    done += chunk
print("wrote", done >> 20, flush=True)
"#;

/// Live threads of a process, from /proc.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `events --json` while the database cannot be read: it succeeds, warns in one line
/// that only the spool is shown, and returns the records waiting there, each marked
/// `"spooled": true`.
pub fn spooled_events(daemon: &Daemon) -> Result<Vec<EventRecord>> {
    let out = daemon.cli(&["events", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("events failed: {stderr}");
    }
    assert!(
        stderr.trim().lines().count() == 1
            && stderr.contains("wait in the spool")
            && stderr.contains("showing only the records in the spool"),
        "{stderr}"
    );
    let records: Vec<EventRecord> = serde_json::from_slice(&out.stdout)?;
    assert!(records.iter().all(|r| r.spooled), "{records:?}");
    Ok(records)
}

/// Stderr of a CLI run, checked to be the one-line error a user should see.
pub fn one_line_error(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got {}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected one line, got: {stderr}"
    );
    stderr
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a daemon's --http, a
/// PostgreSQL server): whoever binds it next may still find it taken.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// When a signal was sent, from its RFC 3339 stamp in a record.
pub fn time_of(at: &str) -> std::time::SystemTime {
    humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at:?} is no RFC 3339 time: {e}"))
}

/// The signals a record says were sent, in order, by name.
pub fn signal_names(record: &KillRecord) -> Vec<&str> {
    record.signals.iter().map(|s| s.signal.as_str()).collect()
}

/// A plain HTTP/1.1 GET: status code and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(port, path, "")
}

/// A GET bearing `token` (`Authorization: Bearer`), as the daemon's token file gives it.
pub fn http_get_with_token(port: u16, path: &str, token: &str) -> Result<(u16, String)> {
    http_request(port, path, &format!("Authorization: Bearer {token}\r\n"))
}

fn http_request(port: u16, path: &str, headers: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok((code, body.to_string()))
}

/// Users and groups made for one test, removed on drop (after the test's processes,
/// which are declared after it and so dropped first), pass or fail.
pub struct Accounts {
    /// What every name it makes starts with.
    pub prefix: String,
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    pub fn new(tag: &str) -> Self {
        Self {
            prefix: format!("wdt-{}-{tag}", std::process::id()),
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// A new group, `<prefix>-<name>`.
    pub fn group(&mut self, name: &str) -> Result<String> {
        let group = format!("{}-{name}", self.prefix);
        run("groupadd", &[&group])?;
        self.groups.push(group.clone());
        Ok(group)
    }

    /// A new user `<prefix><name>` (no home, no login shell) in `groups`; its uid.
    pub fn user(&mut self, name: &str, groups: &[&str]) -> Result<User> {
        let user = format!("{}{name}", self.prefix);
        let mut args = vec!["--no-create-home", "--shell", "/usr/sbin/nologin"];
        let joined = groups.join(",");
        if !groups.is_empty() {
            args.extend(["--groups", &joined]);
        }
        args.push(&user);
        run("useradd", &args)?;
        self.users.push(user.clone());
        let uid = nix::unistd::User::from_name(&user)?
            .context("the user just made")?
            .uid
            .as_raw();
        Ok(User { name: user, uid })
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            // userdel refuses a user whose processes (just SIGKILLed, maybe not yet
            // reaped) still exist: a few tries.
            for _ in 0..40 {
                let done = Command::new("userdel")
                    .arg(user)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for group in &self.groups {
            let _ = Command::new("groupdel").arg(group).output();
        }
    }
}

/// Runs `program`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Unix user made by [`Accounts`].
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
}

impl User {
    /// `setpriv` as this user (real and effective uid and gid, its groups), then `argv`.
    pub fn argv<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec![
            "--reuid",
            self.name.as_str(),
            "--regid",
            self.name.as_str(),
            "--init-groups",
            "--",
        ];
        all.extend(argv);
        all
    }

    /// A process running as this user, in its own process group (killed on drop).
    pub fn spawn(&self, argv: &[&str]) -> Result<Workload> {
        Workload::spawn("setpriv", &self.argv(argv))
    }

    /// The CLI, run as this user against `daemon`'s socket.
    pub fn cli(&self, daemon: &Daemon, args: &[&str]) -> Output {
        let bin = watchdog_bin();
        let socket = daemon.socket.display().to_string();
        let mut argv = vec![bin.to_str().expect("a UTF-8 path"), "--socket", &socket];
        argv.extend(args);
        Command::new("setpriv")
            .args(self.argv(&argv))
            .output()
            .expect("setpriv runs")
    }

    pub fn cli_ok(&self, daemon: &Daemon, args: &[&str]) -> Result<String> {
        let out = self.cli(daemon, args);
        if !out.status.success() {
            bail!(
                "watchdog-user {args:?} as {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Registration as this user must be refused in one line naming `rule`.
    pub fn refused(&self, daemon: &Daemon, args: &[&str], rule: &str) -> String {
        let line = one_line_error(&self.cli(daemon, args));
        assert!(
            line.contains(&format!("refused by rule {rule}")),
            "{args:?} as {}: expected rule {rule}, got: {line}",
            self.name
        );
        eprintln!("{} {args:?}: {line}", self.name);
        line
    }
}
