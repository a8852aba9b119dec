//! Harness for the end-to-end tests and benchmarks: a real daemon per test (own socket
//! and state directory), the real CLI, and real process trees that are killed when the
//! test ends, pass or fail.

pub mod bench;
pub mod bpf;
pub mod pg;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
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

// The daemon's own wire types: a test reads exactly what the daemon sends.
pub use watchdog_user::api::protocol::{Status, TreeNode};
pub use watchdog_user::store::DbStatus;

/// `node` and all below it, depth first.
pub fn flatten(node: &TreeNode) -> Vec<&TreeNode> {
    let mut out = vec![node];
    for child in &node.children {
        out.extend(flatten(child));
    }
    out
}

pub fn all_nodes(roots: &[TreeNode]) -> Vec<&TreeNode> {
    roots.iter().flat_map(flatten).collect()
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

fn unique_dir(tag: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("watchdog-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Daemon {
    pub fn start() -> Result<Self> {
        Self::start_with(&[], &[])
    }

    /// Starts `watchdog-user run`, behind `wrapper` (e.g. `unshare -m ...`) when given,
    /// with `extra` daemon arguments, and waits until it answers on its socket. Its
    /// state and (unless `extra` names another) its SQLite database are in its own dir.
    pub fn start_with(wrapper: &[&str], extra: &[&str]) -> Result<Self> {
        Self::start_full(wrapper, extra, &[])
    }

    /// Like [`Self::start_with`], with extra environment variables for the daemon.
    pub fn start_full(wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        ensure_bpffs();
        let dir = unique_dir("test")?;
        let socket = dir.join("watchdog.sock");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(dir.file_name().expect("a name"));
        let mut args: Vec<String> = vec!["--state-dir".into(), dir.display().to_string()];
        if !extra.contains(&"--pin-dir") {
            args.extend(["--pin-dir".into(), pin_dir.display().to_string()]);
        }
        if !extra.contains(&"--http") {
            args.extend(["--http".into(), "none".into()]);
        }
        if !extra.contains(&"--database-url") {
            args.extend([
                "--database-url".into(),
                format!("sqlite://{}/watchdog.db", dir.display()),
            ]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let bystander = Command::new("sleep").arg("3600").process_group(0).spawn()?;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(&dir, &socket, wrapper, &args, &env)?;
        let mut daemon = Self {
            child,
            bystander,
            dir,
            socket,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            args,
            env,
            pin_dir,
        };
        daemon.await_serving()?;
        Ok(daemon)
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
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)?;
        self.child.wait()?;
        self.child = Self::spawn(
            &self.dir,
            &self.socket,
            &self.wrapper,
            &self.args,
            &self.env,
        )?;
        self.await_serving()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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

    pub fn tree(&self, analysis: Option<&str>) -> Result<Vec<TreeNode>> {
        let mut args = vec!["dump-tree", "--json"];
        if let Some(id) = analysis {
            args.extend(["--analysis-id", id]);
        }
        Ok(serde_json::from_str(&self.cli_ok(&args)?)?)
    }

    /// Recent violations and kills, newest first, as the JSON `events --json` prints.
    pub fn events(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.cli_ok(&["events", "--json"])?)?)
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
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
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
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
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
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the workload's first process and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        self.stdin.take();
        Ok(self.child.wait()?)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
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

/// Live threads of a process, from /proc.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `events --json` while the database cannot be read: it succeeds, warns in one line
/// that only the spool is shown, and returns the records waiting there, each marked
/// `"spooled": true`.
pub fn spooled_events(daemon: &Daemon) -> Result<Vec<serde_json::Value>> {
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
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    assert!(records.iter().all(|r| r["spooled"] == true), "{records:?}");
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

/// A TCP port free on the loopback now, for a daemon's --http.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain HTTP/1.1 GET: status code and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
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
