//! The shipped unit (`deploy/watchdog.service`) and config (`deploy/watchdog.toml`) under
//! a real systemd: a container booted with systemd-nspawn on this machine's own /usr
//! (`--volatile=yes`), with the built binary bound in as /usr/local/bin/watchdog-user.
//! The daemon runs there in the container's PID namespace, as in a pod without
//! hostPID: every pid it is told about, reads in /proc, signals and stores is the
//! container's, while the kernel programs see the host's.
//!
//! One test, in order: ready only after READY=1; `exec --timeout` killed on time and
//! stored; SIGKILL → restart, the pins carry the analysis over and a child forked while
//! the daemon was down is tracked and killed with it; SIGSTOP → `Watchdog timeout` →
//! restart; `systemctl reload` applies a changed config and keeps the running settings
//! on a broken one. The container, its cgroups and nspawn's leftovers go on drop, pass
//! or fail.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use watchdog_tests::{Status, TreeNode, all_nodes, await_state, watchdog_bin};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/watchdog.service");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/watchdog.toml");
/// Where the container sees the unit and config (bound read-only from the host).
const SHIPPED: &str = "/opt/watchdog-shipped";
/// Where the config names the database, inside the container.
const DATABASE: &str = "/var/lib/watchdog/watchdog.db";
/// The unit's WatchdogSec: a frozen daemon is restarted after it.
const WATCHDOG_SEC: Duration = Duration::from_secs(10);
/// The longest a boot or a restart may take here before the test fails.
const BOOT_PATIENCE: Duration = Duration::from_secs(60);
/// A clean halt takes well under a second; past this the container is killed.
const HALT_PATIENCE: Duration = Duration::from_secs(10);

/// A booted container, halted and cleaned up on drop (container, cgroups, nspawn's
/// directories under /run/systemd), whether the test passed or not.
struct Container {
    name: String,
    nspawn: Child,
    /// The container's PID 1 as the host sees it: `nsenter` enters its namespaces.
    leader: u32,
    /// Host directory holding the shipped files and nspawn's console log.
    dir: PathBuf,
    cgroups: Vec<PathBuf>,
}

/// The cgroup directories a container is started from: nspawn makes `payload/` and
/// `supervisor/` under whatever cgroup runs it, so it gets one of its own in every
/// hierarchy systemd uses (hybrid: `unified` and `systemd`; pure v2: the root).
fn cgroup_roots() -> Vec<PathBuf> {
    let hybrid: Vec<PathBuf> = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if hybrid.is_empty() {
        vec![PathBuf::from("/sys/fs/cgroup")]
    } else {
        hybrid
    }
}

/// The pid of the process whose parent is `parent`, whose pid in its own namespace is
/// 1 and which runs systemd already: the container's init. (Before its exec it is
/// nspawn still setting up the root, and `nsenter` would take the wrong one.)
fn container_init(parent: u32) -> Result<Option<u32>> {
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        if field("PPid:") == [parent.to_string()]
            && field("NSpid:").last() == Some(&"1")
            && field("Name:") == ["systemd"]
        {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

impl Container {
    fn boot() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        // Unique per run: the suite runs in parallel, and other runs may share the host.
        let name = format!("wdtest-{}-{}", std::process::id(), nanos % 1_000_000);
        let dir = std::env::temp_dir().join(&name);
        let shipped = dir.join("shipped");
        fs::create_dir_all(&shipped)?;
        fs::copy(UNIT, shipped.join("watchdog.service"))?;
        fs::copy(CONFIG, shipped.join("watchdog.toml"))?;
        let cgroups: Vec<PathBuf> = cgroup_roots().iter().map(|r| r.join(&name)).collect();
        let mut container = Self {
            name,
            // Replaced below; a placeholder so that drop cleans up from here on.
            nspawn: Command::new("true").spawn()?,
            leader: 0,
            dir,
            cgroups,
        };
        for cgroup in &container.cgroups {
            fs::create_dir(cgroup)
                .with_context(|| format!("creating the cgroup {}", cgroup.display()))?;
        }
        let _ = container.nspawn.wait();
        container.nspawn = container.spawn_nspawn(&shipped)?;
        let nspawn_pid = container.nspawn.id();
        let deadline = Instant::now() + BOOT_PATIENCE;
        container.leader = loop {
            if let Some(pid) = container_init(nspawn_pid)? {
                break pid;
            }
            if let Some(status) = container.nspawn.try_wait()? {
                bail!("systemd-nspawn exited ({status}): {}", container.console());
            }
            ensure!(
                Instant::now() < deadline,
                "the container's init never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // `--wait` blocks until the boot is done, once systemd listens at all (it
        // answers nothing for the first moments after its exec).
        let patience = BOOT_PATIENCE.as_secs().to_string();
        let state = await_until(BOOT_PATIENCE, "the container's systemd to answer", || {
            let out = container.run(&[
                "timeout",
                &patience,
                "systemctl",
                "is-system-running",
                "--wait",
            ])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!state.is_empty() && state != "offline").then_some(state))
        })?;
        ensure!(
            state == "running" || state == "degraded",
            "the container's systemd says {state:?}: {}",
            container.console()
        );
        Ok(container)
    }

    /// systemd-nspawn as the proven recipe has it (`shared/real-systemd.md`), run from
    /// the container's own cgroups.
    fn spawn_nspawn(&self, shipped: &Path) -> Result<Child> {
        let procs: Vec<String> = self
            .cgroups
            .iter()
            .map(|c| c.join("cgroup.procs").display().to_string())
            .collect();
        let console = fs::File::create(self.dir.join("console.log"))?;
        let bin = watchdog_bin();
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(r#"for procs in $CGROUPS; do echo $$ > "$procs" || exit 97; done; exec "$@""#)
            .arg("sh")
            .args([
                "systemd-nspawn",
                "--quiet",
                "--directory=/",
                "--volatile=yes",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--private-network",
                // Nobody mounts bpffs in a container: the test does, on this tmpfs.
                "--tmpfs=/sys/fs/bpf:mode=700",
                "--capability=CAP_BPF,CAP_PERFMON",
                // nspawn's own seccomp filter refuses bpf() otherwise.
                "--system-call-filter=bpf perf_event_open",
                "--tmpfs=/usr/local/bin",
            ])
            .arg(format!("--machine={}", self.name))
            .arg(format!("--bind-ro={}:{SHIPPED}", shipped.display()))
            .arg(format!(
                "--bind-ro={}:/usr/local/bin/watchdog-user",
                bin.display()
            ))
            .args([
                "systemd.firstboot=off",
                "systemd.mask=systemd-networkd-wait-online.service",
            ])
            .env("CGROUPS", procs.join(" "))
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("starting systemd-nspawn (Debian's systemd-container)")?;
        Ok(spawned)
    }

    fn console(&self) -> String {
        let log = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// A command inside the container (all its namespaces, a clean environment).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "env", "-i"])
            .arg("PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a command in the container, stopped on drop (before the container is):
    /// `nsenter` forks into the container's PID namespace and waits for its child; one
    /// left running would hold the container's halt.
    fn spawn(&self, args: &[&str]) -> Result<InContainer> {
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} in the container"))?;
        Ok(InContainer(child))
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("running {args:?} in the container"))
    }

    /// Runs a shell script in the container; its stdout, or the error with its stderr.
    fn sh(&self, script: &str) -> Result<String> {
        let out = self.run(&["sh", "-c", script])?;
        ensure!(
            out.status.success(),
            "{script:?} failed in the container ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `systemctl show -P PROPERTY watchdog`.
    fn property(&self, property: &str) -> Result<String> {
        self.sh(&format!("systemctl show -P {property} watchdog"))
    }

    fn number(&self, property: &str) -> Result<u64> {
        let value = self.property(property)?;
        value
            .parse()
            .with_context(|| format!("{property} is {value:?}"))
    }

    /// Waits for the unit to be active with a main process other than `not_pid`.
    fn await_active(&self, not_pid: u64) -> Result<u64> {
        await_until(BOOT_PATIENCE, "watchdog.service active again", || {
            let pid = self.number("MainPID")?;
            let active = self.property("ActiveState")? == "active";
            Ok((active && pid != 0 && pid != not_pid).then_some(pid))
        })
        .with_context(|| {
            let journal = self.journal().unwrap_or_default();
            let tail: Vec<&str> = journal.lines().rev().take(6).collect();
            format!("the unit's journal ends: {}", tail.join(" / "))
        })
    }

    /// A timestamp property of the unit, to the µs.
    fn timestamp(&self, property: &str) -> Result<std::time::SystemTime> {
        // "Sat 2026-11-21 17:23:09.602500 UTC"
        let text = self.sh(&format!(
            "systemctl show --timestamp=us+utc -P {property} watchdog"
        ))?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let [_, date, time, "UTC"] = words[..] else {
            bail!("{property} is {text:?}");
        };
        Ok(humantime::parse_rfc3339(&format!("{date}T{time}Z"))?)
    }

    fn journal(&self) -> Result<String> {
        self.sh("journalctl -u watchdog --no-pager -o cat")
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["watchdog-user"];
        all.extend(args);
        let out = self.run(&all)?;
        ensure!(
            out.status.success(),
            "watchdog-user {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn tree(&self, analysis: &str) -> Result<Vec<TreeNode>> {
        let text = self.cli(&["dump-tree", "--json", "--analysis-id", analysis])?;
        let mut tree: serde_json::Value = serde_json::from_str(&text)?;
        Ok(serde_json::from_value(tree["processes"].take())?)
    }

    fn status(&self) -> Result<Status> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// A path inside the container, from the host.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.leader,
            inside.trim_start_matches('/')
        ))
    }

    /// The command line of the container's process `pid`, if it lives.
    fn cmdline(&self, pid: u32) -> Option<String> {
        let raw = fs::read(self.path(&format!("proc/{pid}/cmdline"))).ok()?;
        Some(
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_string(),
        )
    }

    /// The real uid of the container's process `pid`, if it lives.
    fn uid(&self, pid: u32) -> Option<u32> {
        watchdog_tests::real_uid_in(&self.path("proc"), pid)
    }

    /// Whether the container's process `pid` lives (a zombie does not).
    fn alive(&self, pid: u32) -> bool {
        fs::read_to_string(self.path(&format!("proc/{pid}/stat")))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    }

    /// `columns` of the analysis' kill records, read inside the container from the
    /// database its config names (SQLite wants its own directory for the journal).
    fn records(&self, analysis: &str, columns: &str) -> Result<String> {
        let sql = format!(
            "SELECT {columns} FROM watchdog_events WHERE analysis_id = '{analysis}' ORDER BY pid"
        );
        let script = "import sqlite3, sys\nfor row in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]):\n    print('|'.join(str(v) for v in row))";
        let out = self.run(&["python3", "-c", script, DATABASE, &sql])?;
        ensure!(
            out.status.success(),
            "reading {DATABASE} in the container: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Halts the container (SIGTERM to nspawn: a clean shutdown), and makes sure it is
    /// gone; then its cgroups and the empty directories nspawn leaves.
    fn tear_down(&mut self) {
        // Only while unreaped: its pid cannot name another process yet.
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + HALT_PATIENCE;
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Not halted in time: nspawn goes, and its container with its cgroups below.
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        for cgroup in self.cgroups.iter().rev() {
            remove_cgroup(cgroup);
        }
        let _ = fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
        for dir in [
            "/run/systemd/nspawn/propagate",
            "/run/systemd/nspawn/unix-export",
            "/run/systemd/nspawn",
            "/run/systemd/nspawn-root",
        ] {
            // Only when empty: another container may be using them.
            let _ = fs::remove_dir(dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A command started in the container by [`Container::spawn`].
struct InContainer(Child);

impl InContainer {
    fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.0.wait()?)
    }
}

impl Drop for InContainer {
    fn drop(&mut self) {
        // Its child in the container is reparented to the container's init, which
        // reaps it.
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// Kills what is left in `cgroup` and below (nothing, after a clean halt) and removes
/// it, deepest first.
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for dir in dirs.iter().rev() {
        // A killed process leaves its cgroup a moment after it dies.
        while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            kill_members(dir);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGKILLs every process left in `cgroup` (cgroup v1 has no `cgroup.kill`).
fn kill_members(cgroup: &Path) {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// [`await_state`] with a patience of its own.
fn await_until<T>(
    patience: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of the analysis' nodes whose command line (in the container) is `cmdline`.
fn pids_running(c: &Container, roots: &[TreeNode], cmdline: &str) -> Vec<u32> {
    all_nodes(roots)
        .iter()
        .map(|n| n.pid)
        .filter(|&pid| c.cmdline(pid).as_deref() == Some(cmdline))
        .collect()
}

#[test]
fn the_shipped_unit_under_a_real_systemd_in_a_pid_namespace() -> Result<()> {
    let started = Instant::now();
    let mark = |what: &str| eprintln!("[systemd test] {:.1?}: {what}", started.elapsed());
    let c = Container::boot()?;
    mark("booted");

    // bpffs as the host's systemd mounts it at boot (nobody does in a container; a
    // mount of the service's own would vanish with its private namespace at restart).
    c.sh(&format!(
        "mount -t bpf -o mode=700 bpf /sys/fs/bpf && mkdir -p /etc/watchdog && \
         cp {SHIPPED}/watchdog.service /etc/systemd/system/ && \
         cp {SHIPPED}/watchdog.toml /etc/watchdog/ && systemctl daemon-reload && \
         systemctl start --no-block watchdog"
    ))?;

    // 1. Active only after READY=1, sent once the programs are attached and the tree
    //    built: the daemon's "ready" line (its own clock, written just before READY=1)
    //    falls between the start of its process and the unit's activation.
    let first = c.await_active(0)?;
    mark("unit active");
    // Its cgroup outranks the analyses' under contention. (OOMScoreAdjust= needs
    // CAP_SYS_RESOURCE, which this machine's bounding set lacks.)
    assert_eq!(c.number("CPUWeight")?, 1000);
    let started_at = c.timestamp("ExecMainStartTimestamp")?;
    let active_at = c.timestamp("ActiveEnterTimestamp")?;
    let ready_line = c
        .journal()?
        .lines()
        .find(|l| l.contains("watchdog ready: programs attached"))
        .context("no 'watchdog ready' line in the journal")?
        .to_string();
    let ready_at = humantime::parse_rfc3339(ready_line.split(' ').next().unwrap_or_default())
        .with_context(|| format!("the ready line's time: {ready_line}"))?;
    assert!(
        started_at < ready_at && ready_at <= active_at,
        "process started {started_at:?}, ready {ready_at:?}, unit active {active_at:?}"
    );
    assert!(
        c.property("StatusText")?.contains("watching"),
        "STATUS= from the daemon: {:?}",
        c.property("StatusText")?
    );
    for pin in ["link_sched_process_fork", "LAYOUT", "PID_NS"] {
        assert!(
            c.path(&format!("sys/fs/bpf/watchdog/{pin}")).exists(),
            "{pin} not pinned"
        );
    }
    // The hardening is in force, not only written: a seccomp filter, no new privileges.
    let status = fs::read_to_string(c.path(&format!("proc/{first}/status")))?;
    for field in ["Seccomp:\t2", "NoNewPrivs:\t1"] {
        assert!(
            status.contains(field),
            "{field} in the daemon's status: {status}"
        );
    }
    let journal = c.journal()?;
    assert!(
        journal.contains("in a PID namespace of its own"),
        "the daemon should know it runs in the container's PID namespace: {journal}"
    );

    // 2. `exec --timeout` inside the container: the analysis (a shell and the two
    //    children it forks, container pids all, one of them another user's) is killed
    //    on time, and stored with what /proc said of each.
    let exec_started = Instant::now();
    let mut analysis = c.spawn(&[
        "watchdog-user",
        "exec",
        "--analysis-id",
        "sd-timeout",
        "--timeout",
        "4s",
        "--",
        "sh",
        "-c",
        "sleep 600 & setpriv --reuid=65534 --regid=65534 --clear-groups sleep 601 & wait",
    ])?;
    let tree = await_state("the shell and its two sleeps in the tree", || {
        let roots = c.tree("sd-timeout")?;
        let found = pids_running(&c, &roots, "sleep 600").len()
            + pids_running(&c, &roots, "sleep 601").len();
        Ok((found == 2).then_some(roots))
    })?;
    let pids: Vec<u32> = all_nodes(&tree).iter().map(|n| n.pid).collect();
    assert_eq!(pids.len(), 3, "{tree:?}");
    let mut want: Vec<String> = pids
        .iter()
        .map(|&pid| {
            let uid = c
                .uid(pid)
                .context("a process of the analysis ended early")?;
            let cmdline = c
                .cmdline(pid)
                .context("a process of the analysis ended early")?;
            Ok(format!("{pid}|timeout|{uid}|{cmdline}"))
        })
        .collect::<Result<_>>()?;
    want.sort();
    assert!(
        want.iter().any(|row| row.ends_with("|65534|sleep 601")),
        "{want:?}"
    );
    analysis.wait()?;
    let took = exec_started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "killed {took:?} after exec, timeout 4s"
    );
    await_state("every process of the analysis gone", || {
        Ok(pids.iter().all(|&pid| !c.alive(pid)).then_some(()))
    })?;
    await_state("the three kill records in the container's SQLite", || {
        Ok(
            (c.records("sd-timeout", "pid, reason, uid, cmdline")? == want.join("\n"))
                .then_some(()),
        )
    })?;
    mark("exec --timeout killed on time and stored");

    // 3. SIGKILL: systemd restarts it, and the pinned programs kept following the
    //    analysis: a child forked while no daemon ran is in the tree and is killed
    //    with its analysis, on its deadline.
    c.sh("mkfifo /run/fork-now")?;
    let mut survivor = c.spawn(&[
        "watchdog-user",
        "exec",
        "--analysis-id",
        "sd-restart",
        "--timeout",
        "12s",
        "--",
        "sh",
        "-c",
        "read go < /run/fork-now; sleep 602 & wait",
    ])?;
    let registered = Instant::now();
    let shell = await_state("sd-restart registered", || {
        Ok(c.tree("sd-restart")?.first().map(|root| root.pid))
    })?;
    let restarts = c.number("NRestarts")?;
    c.sh("systemctl kill --kill-who=main -s SIGKILL watchdog")?;
    await_until(BOOT_PATIENCE, "the daemon's death seen by systemd", || {
        Ok((c.number("MainPID")? != first).then_some(()))
    })?;
    // The child is forked now, between the death and the restart (RestartSec=1s).
    c.sh("echo go > /run/fork-now")?;
    let child = await_state("the child forked while the daemon was down", || {
        Ok(procs_with_cmdline(&c, "sleep 602")?.first().copied())
    })?;
    let second = c.await_active(first)?;
    mark("restarted after SIGKILL");
    assert_eq!(c.number("NRestarts")?, restarts + 1);
    assert!(c.sh("journalctl -u watchdog -o cat --no-pager | grep -c 'status=9/KILL'")? != "0");
    let forked_at = start_boottime_ms(&c, child)?;
    let restarted_at = start_boottime_ms(&c, second as u32)?;
    assert!(
        forked_at <= restarted_at,
        "the child ({forked_at} ms) started before the new daemon ({restarted_at} ms)"
    );
    let roots = c.tree("sd-restart")?;
    let nodes: Vec<(u32, u32)> = all_nodes(&roots).iter().map(|n| (n.pid, n.ppid)).collect();
    assert!(
        nodes.contains(&(child, shell)),
        "the child {child} of {shell} is in the tree after the restart: {nodes:?}"
    );
    // Ended (its shell may see its child die first and exit 0): the records say how.
    survivor.wait()?;
    assert!(
        registered.elapsed() >= Duration::from_secs(12),
        "killed on its deadline"
    );
    let want = {
        let mut rows = [format!("{shell}|timeout"), format!("{child}|timeout")];
        rows.sort();
        rows.join("\n")
    };
    await_state("sd-restart's records, the child's included", || {
        Ok((c.records("sd-restart", "pid, reason")? == want).then_some(()))
    })?;
    mark("the analysis carried over the restart killed, with the child");

    // 4. Frozen main loop: no WATCHDOG=1 for WatchdogSec, systemd says so and restarts.
    let restarts = c.number("NRestarts")?;
    let frozen = Instant::now();
    c.sh("systemctl kill --kill-who=main -s SIGSTOP watchdog")?;
    await_until(
        WATCHDOG_SEC + BOOT_PATIENCE,
        "'Watchdog timeout' in the journal",
        || Ok(c.journal()?.contains("Watchdog timeout").then_some(())),
    )?;
    assert!(frozen.elapsed() >= WATCHDOG_SEC - Duration::from_secs(1));
    let third = c.await_active(second)?;
    mark("restarted after SIGSTOP");
    assert_eq!(c.number("NRestarts")?, restarts + 1);

    // 5. reload: a changed config is applied; a broken one is refused in one line and
    //    the running settings stay.
    let timeout_ms = |c: &Container| -> Result<u64> {
        let status = c.status()?;
        Ok(status
            .settings
            .defaults
            .context("status shows no defaults")?
            .timeout_ms)
    };
    assert_eq!(
        timeout_ms(&c)?,
        30 * 60 * 1000,
        "the shipped default-timeout"
    );
    c.sh("sed -i 's/^default-timeout = .*/default-timeout = \"45m\"/' /etc/watchdog/watchdog.toml && systemctl reload watchdog")?;
    await_state("default-timeout 45m after reload", || {
        Ok((timeout_ms(&c)? == 45 * 60 * 1000).then_some(()))
    })?;
    c.sh("echo 'default-timeout = [' >> /etc/watchdog/watchdog.toml && systemctl reload watchdog")?;
    let refusal = await_state("the broken config's refusal in the journal", || {
        Ok(c.journal()?
            .lines()
            .find(|l| l.contains("keeping the running settings"))
            .map(str::to_string))
    })?;
    assert!(
        refusal.contains("watchdog.toml"),
        "names the file: {refusal}"
    );
    assert_eq!(timeout_ms(&c)?, 45 * 60 * 1000, "the running settings stay");
    assert_eq!(c.number("MainPID")?, third, "a reload is no restart");
    assert_eq!(c.property("ActiveState")?, "active");

    mark("reload checked");
    drop(c);
    mark("container gone");
    Ok(())
}

/// The container's processes running exactly `cmdline`.
fn procs_with_cmdline(c: &Container, cmdline: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir(c.path("proc"))? {
        if let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok())
            && c.cmdline(pid).as_deref() == Some(cmdline)
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// When the container's process `pid` started, ms since boot.
fn start_boottime_ms(c: &Container, pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(c.path(&format!("proc/{pid}/stat")))?;
    let after_comm = stat.rsplit_once(')').context("malformed stat")?.1;
    let ticks: u64 = after_comm
        .split_whitespace()
        .nth(19)
        .context("no starttime")?
        .parse()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(ticks * 1000 / per_second)
}
