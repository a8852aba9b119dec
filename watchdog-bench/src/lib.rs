//! What the benchmarks share beyond the test harness: the figures file `cargo xtask
//! bench` turns into the summary table, percentiles, trees of idle processes
//! (forked by the bench binary itself, so a process costs a fork, not an exec) and
//! their clean-up, also on Ctrl-C, and time-bounded calls to the control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, IntoRawFd as _},
        unix::net::UnixStream,
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicI32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    errno::Errno,
    sys::{
        signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, killpg, sigaction},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork},
};
use watchdog_tests::{Daemon, Reply, Request, Response};

/// Records one figure for the summary: `KEY=VALUE` appended to the file named by
/// `WATCHDOG_BENCH_FIGURES` (set by `cargo xtask bench`); nothing when it is unset, so
/// a bench run by hand prints only its Markdown.
pub fn figure(key: &str, value: impl std::fmt::Display) {
    let Some(path) = std::env::var_os("WATCHDOG_BENCH_FIGURES") else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{key}={value}"));
    if let Err(err) = written {
        eprintln!(
            "could not record {key} in {}: {err}",
            Path::new(&path).display()
        );
    }
}

/// The `p`-th percentile (0..=100) of `values`, nearest rank; NaN when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Makes this process the reaper of its orphaned descendants, so a killed tree's
/// processes are reaped here, where the bench can wait for the last one, rather than
/// by whatever PID 1 the machine runs, at its own pace.
fn become_subreaper() -> Result<()> {
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")
}

/// The argument that makes a bench binary a tree of idle processes ([`run_helper`]).
const HELPER_ARG: &str = "pause-tree";

/// A tree of idle processes in its own process group, forked by the bench binary
/// itself (see [`run_helper`]); the whole group is killed and reaped on drop.
///
/// `fanouts` is the shape: `[2000]` is a root with 2,000 children, `[4, 4]` a root with
/// 4 children of 4 children each. With `wait_for_go`, the root forks only after
/// [`Self::go`], so it can be registered first and every fork is a watched one.
pub struct PauseTree {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    reaped: bool,
}

impl PauseTree {
    pub fn spawn(fanouts: &[usize], wait_for_go: bool) -> Result<Self> {
        become_subreaper()?;
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(HELPER_ARG)
            .arg(if wait_for_go { "go" } else { "now" })
            .args(fanouts.iter().map(usize::to_string))
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a pause tree")?;
        cleanup().groups.push(child.id());
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        // A thread reads the root's lines, so every wait on them can have a deadline.
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            reaped: false,
        })
    }

    /// Spawns the tree and waits until all its processes exist.
    pub fn ready(fanouts: &[usize], within: Duration) -> Result<Self> {
        let mut tree = Self::spawn(fanouts, false)?;
        tree.await_ready(within)?;
        Ok(tree)
    }

    /// The root: the process to register.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tells a tree spawned with `wait_for_go` to fork.
    pub fn go(&mut self) -> Result<()> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Waits for the root's report: how many descendants it forked, and how long that
    /// took from "go" (or from its start).
    pub fn await_ready(&mut self, within: Duration) -> Result<(usize, Duration)> {
        let line = self
            .lines
            .recv_timeout(within)
            .map_err(|_| anyhow!("the pause tree was not ready within {within:?}"))?;
        Self::parse_ready(&line)
    }

    /// The root's report if it has come, without waiting.
    pub fn poll_ready(&mut self) -> Result<Option<(usize, Duration)>> {
        match self.lines.try_recv() {
            Ok(line) => Self::parse_ready(&line).map(Some),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => bail!("the pause tree's root ended"),
        }
    }

    fn parse_ready(line: &str) -> Result<(usize, Duration)> {
        let mut words = line.split_whitespace();
        if words.next() != Some("ready") {
            bail!("the pause tree said {line:?}");
        }
        let forked = words.next().context("no count")?.parse()?;
        let nanos: u64 = words.next().context("no time")?.parse()?;
        Ok((forked, Duration::from_nanos(nanos)))
    }

    /// SIGKILLs the whole group and waits until every member is reaped; returns how
    /// many were.
    pub fn kill_and_reap(&mut self) -> Result<usize> {
        if self.reaped {
            return Ok(0);
        }
        let reaped = kill_group_and_reap(self.child.id())?;
        self.reaped = true;
        cleanup().groups.retain(|&g| g != self.child.id());
        Ok(reaped)
    }

    /// Reaps, without waiting and without signalling, the members that have died
    /// (killed by the daemon under test); returns how many it reaped now, and whether
    /// none is left. Then the tree is over: its drop signals no group, whose id may
    /// already be another's.
    pub fn reap_exited(&mut self) -> Result<(usize, bool)> {
        if self.reaped {
            return Ok((0, true));
        }
        let group = Pid::from_raw(-(self.child.id() as i32));
        let mut reaped = 0;
        loop {
            match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return Ok((reaped, false)),
                Ok(_) => reaped += 1,
                Err(Errno::EINTR) => continue,
                // As in `kill_group_and_reap`: no child of the group left, none at all.
                Err(Errno::ECHILD) => {
                    self.reaped = true;
                    cleanup().groups.retain(|&g| g != self.child.id());
                    return Ok((reaped, true));
                }
                Err(err) => return Err(err).context("reaping the pause tree"),
            }
        }
    }
}

/// SIGKILLs process group `pgid`, a pause tree's, and reaps every member; returns how
/// many. The tree's root is this process's child, and this process is the subreaper
/// ([`PauseTree::spawn`] made it one).
pub fn kill_group_and_reap(pgid: u32) -> Result<usize> {
    let group = Pid::from_raw(-(pgid as i32));
    match killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL) {
        // Already killed (an interrupt's clean-up and the bench can race here): reap.
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => return Err(err).context("killing the pause tree"),
    }
    // Every member is, or becomes when its parent dies, a child of this process before
    // the parent itself can be reaped: so when no child of the group is left to wait
    // for, none is left at all.
    let mut reaped = 0;
    loop {
        match waitpid(group, None) {
            Ok(_) => reaped += 1,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return Ok(reaped),
            Err(err) => return Err(err).context("reaping the pause tree"),
        }
    }
}

impl Drop for PauseTree {
    fn drop(&mut self) {
        if let Err(err) = self.kill_and_reap() {
            eprintln!("cleaning up pause tree {}: {err:#}", self.child.id());
        }
    }
}

/// Call first in a bench's `main`: when the binary was started as a pause tree's root,
/// runs it (it never returns while the tree lives) and returns its result.
pub fn run_helper() -> Option<Result<()>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(HELPER_ARG) {
        return None;
    }
    let wait_for_go = args.get(2).map(String::as_str) == Some("go");
    let fanouts: Result<Vec<usize>, _> = args[3..].iter().map(|a| a.parse()).collect();
    Some(
        fanouts
            .map_err(Into::into)
            .and_then(|f| pause_tree(wait_for_go, &f)),
    )
}

/// The root of a pause tree: forks the tree, prints "ready FORKED NANOS", then waits
/// for its end (the bench kills the group).
fn pause_tree(wait_for_go: bool, fanouts: &[usize]) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    if wait_for_go {
        stdin.read_line(&mut String::new())?;
    }
    let started = Instant::now();
    // Every process that forks writes its count here once done, then closes it; a leaf
    // closes it at once. End of file: the whole tree exists.
    let (read_end, write_end) = nix::unistd::pipe()?;
    let mut forked = grow(fanouts, write_end.as_raw_fd(), read_end.as_raw_fd()) as usize;
    drop(write_end);
    let mut reports = std::fs::File::from(read_end);
    let mut count = [0u8; 4];
    loop {
        match std::io::Read::read_exact(&mut reports, &mut count) {
            Ok(()) => forked += u32::from_ne_bytes(count) as usize,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err.into()),
        }
    }
    println!("ready {forked} {}", started.elapsed().as_nanos());
    std::io::stdout().flush()?;
    stdin.read_line(&mut String::new())?;
    Ok(())
}

/// Forks `fanouts[0]` children, each growing the rest of the shape below itself, and
/// returns how many forks succeeded (a full process table stops a branch early; the
/// count says so instead of a hang).
fn grow(fanouts: &[usize], reports: i32, read_end: i32) -> u32 {
    let Some((&n, below)) = fanouts.split_first() else {
        return 0;
    };
    let mut forked = 0;
    for _ in 0..n {
        // SAFETY: the pause-tree root is single-threaded; children only fork, write,
        // close and pause, all async-signal-safe.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => unsafe {
                libc::close(read_end);
                if !below.is_empty() {
                    let mine = grow(below, reports, read_end).to_ne_bytes();
                    // A 4-byte pipe write is atomic: reports never interleave.
                    libc::write(reports, mine.as_ptr().cast(), mine.len());
                }
                libc::close(reports);
                idle()
            },
            Ok(ForkResult::Parent { .. }) => forked += 1,
            Err(_) => break,
        }
    }
    forked
}

/// What a tree's process does: nothing, until killed. Tiny on purpose: 100,000 of them
/// must fit in memory.
fn idle() -> ! {
    loop {
        // SAFETY: pause only waits for a signal.
        unsafe { libc::pause() };
    }
}

/// One request over the control socket, like `client::call`, but giving
/// up after `timeout`: a bench watching a daemon that stopped answering must still end.
pub fn call_within(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("no answer within {timeout:?}"))?;
    match serde_json::from_str(&answer)? {
        Response::Ok(reply) => Ok(reply),
        Response::Error { error, .. } => Err(anyhow!(error)),
    }
}

/// Resident set size of a process, MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmRSS")
}

/// The peak RSS of a process, MiB (`VmHWM`).
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmHWM")
}

/// A `kB` field of /proc/PID/status, in MiB.
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {field}"))?
        .parse()?;
    Ok(kib / 1024.0)
}

/// CPU time (user + system) a process has used so far, seconds; counted in clock ticks
/// (10 ms), so only large totals are precise.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

/// What an interrupt must undo, kept up to date as the bench runs.
struct Cleanup {
    /// Daemons by pid, with their pin and state directories: their programs stay
    /// attached to every fork on the machine until the pins are removed.
    daemons: Vec<(u32, PathBuf, PathBuf)>,
    /// Process groups of live pause trees.
    groups: Vec<u32>,
    /// Kernel limits (a /proc/sys path) raised, with their original values.
    sysctls: Vec<(&'static str, u64)>,
}

static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    daemons: Vec::new(),
    groups: Vec::new(),
    sysctls: Vec::new(),
});

fn cleanup() -> MutexGuard<'static, Cleanup> {
    CLEANUP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// On an interrupt, stop `daemon` and remove its pins and state.
pub fn on_interrupt_remove(daemon: &Daemon) {
    cleanup()
        .daemons
        .push((daemon.pid(), daemon.pin_dir.clone(), daemon.dir.clone()));
}

/// `daemon` is being stopped the ordinary way: an interrupt leaves it alone.
pub fn on_interrupt_keep(daemon: &Daemon) {
    cleanup().daemons.retain(|(pid, ..)| *pid != daemon.pid());
}

/// On an interrupt, write `original` back to the /proc/sys file `path`.
pub fn on_interrupt_restore(path: &'static str, original: u64) {
    cleanup().sysctls.push((path, original));
}

/// A kernel limit raised for a run; the original is written back on drop.
pub struct Sysctl {
    pub path: &'static str,
    pub original: u64,
    pub raised: u64,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        restore_sysctl(self.path, self.original);
    }
}

pub fn read_sysctl(path: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text.trim().parse()?)
}

/// Raises each `(path, needed, value)` to `value` where it is below `needed`. Each
/// original is known to the interrupt clean-up, and has its guard, before it is written.
pub fn raise_sysctls(wanted: &[(&'static str, u64, u64)]) -> Result<Vec<Sysctl>> {
    let mut raised = Vec::new();
    for &(path, needed, value) in wanted {
        let original = read_sysctl(path)?;
        if original >= needed {
            continue;
        }
        on_interrupt_restore(path, original);
        raised.push(Sysctl {
            path,
            original,
            raised: value,
        });
        std::fs::write(path, value.to_string()).with_context(|| format!("raising {path}"))?;
    }
    Ok(raised)
}

/// Writes a kernel limit back, loudly when it cannot: a machine left with the bench's
/// settings must not go unnoticed.
pub fn restore_sysctl(path: &str, original: u64) {
    if let Err(err) = std::fs::write(path, original.to_string()) {
        eprintln!("COULD NOT RESTORE {path} to {original}: {err}; write it back by hand");
    }
}

/// Ctrl-C or a TERM mid-run runs no destructor: without this, a bench's idle trees
/// (100,000 processes for bench-scale), its daemon with programs attached, and raised
/// kernel limits would outlive it. The handler only writes the signal's number to a
/// pipe; a thread reading it does the whole clean-up as ordinary code. Not sigwait on
/// blocked signals: a blocked mask is inherited across exec (std does not reset it),
/// and a daemon spawned with SIGTERM blocked never stops. A handler is reset by exec.
pub fn install_interrupt_cleanup() -> Result<()> {
    // Close-on-exec: no spawned program holds the write end.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    SIGNAL_PIPE.store(write_end.into_raw_fd(), Ordering::Relaxed);
    std::thread::spawn(move || {
        let mut number = [0u8; 1];
        let mut pipe = std::fs::File::from(read_end);
        if std::io::Read::read_exact(&mut pipe, &mut number).is_ok()
            && let Ok(signal) = Signal::try_from(i32::from(number[0]))
        {
            clean_up_after(signal);
        }
    });
    let action = SigAction::new(
        SigHandler::Handler(forward_signal),
        // Interrupted system calls of the bench itself resume as if nothing happened.
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2), which is async-signal-safe.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// The write end of the pipe the clean-up thread reads.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn forward_signal(signal: libc::c_int) {
    let number = signal as u8;
    // SAFETY: write(2) of one byte from the stack to a pipe.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const number).cast(),
            1,
        )
    };
}

/// Daemons first (no orphan kills or records for trees being torn down), then the
/// trees, reaped, then the limits; exits as the signal would have.
fn clean_up_after(signal: Signal) -> ! {
    eprintln!("{signal}: stopping the daemons, killing the process trees, restoring limits");
    let cleanup = cleanup();
    for (pid, pin_dir, dir) in &cleanup.daemons {
        let daemon = Pid::from_raw(*pid as i32);
        let _ = kill(daemon, Signal::SIGKILL);
        let _ = waitpid(daemon, None);
        let _ = std::fs::remove_dir_all(pin_dir);
        let _ = std::fs::remove_dir_all(dir);
    }
    for &pgid in &cleanup.groups {
        if let Err(err) = kill_group_and_reap(pgid) {
            eprintln!("killing process group {pgid}: {err:#}");
        }
    }
    for &(path, original) in &cleanup.sysctls {
        restore_sysctl(path, original);
    }
    std::process::exit(128 + signal as i32);
}
