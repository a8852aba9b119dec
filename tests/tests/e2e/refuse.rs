//! Fork bombs refused in the kernel: a fork past an analysis' `--max-processes` fails
//! with EAGAIN (the BPF LSM's task_alloc), however many of its members fork at once;
//! nothing is killed, and each burst of refusals is recorded once, also when it came
//! while no daemon ran. They need the BPF LSM (`lsm=...,bpf` on the kernel's command
//! line, and a kernel that lets it load programs): where the running kernel refuses
//! it, each runs itself in Debian's 6.12 booted so (and in every kernel of the matrix).

use anyhow::Result;
use nix::sys::signal::Signal;
use watchdog_tests::{
    Daemon, EventRecord, Outcome, Reason, Workload, alive_in_group, all_nodes, await_state,
};

const MAX: u64 = 24;
const FORKERS: usize = 3;
const REFUSALS_EACH: usize = 100;

/// Once told: forks FORKERS members which all fork sleeping children as fast as they
/// can, each until REFUSALS_EACH of its forks failed with EAGAIN; then prints the
/// children forked and the forks refused, in all, and sleeps. Any other failure of a
/// fork is printed and ends it.
const STORM: &str = r#"
import os, sys, time
FORKERS, EACH, MAX = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()
r, w = os.pipe()
for _ in range(FORKERS):
    if os.fork() == 0:
        forked = refused = 0
        # Bounded: where nothing refuses, it stops anyway.
        while refused < EACH and forked < 4 * MAX:
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            forked += 1
        os.write(w, f"{forked} {refused}\n".encode())
        time.sleep(600)
        os._exit(0)
lines = b""
while lines.count(b"\n") < FORKERS:
    lines += os.read(r, 4096)
pairs = [tuple(map(int, l.split())) for l in lines.decode().split("\n") if l]
print(sum(p[0] for p in pairs), sum(p[1] for p in pairs), flush=True)
time.sleep(600)
"#;

/// Starts the storm in analysis `id` under `daemon`, with `while_forking` done after
/// the go and undone by `after`; returns the storm and what it said it forked and had
/// refused.
fn storm(
    daemon: &mut Daemon,
    id: &str,
    while_forking: impl FnOnce(&mut Daemon) -> Result<()>,
    after: impl FnOnce(&mut Daemon) -> Result<()>,
) -> Result<(Workload, u64, u64)> {
    let mut storm = Workload::python(
        STORM,
        &[
            &FORKERS.to_string(),
            &REFUSALS_EACH.to_string(),
            &MAX.to_string(),
        ],
    )?;
    daemon.register_with(storm.pid(), id, &["--max-processes", &MAX.to_string()])?;
    while_forking(daemon)?;
    storm.send("go")?;
    let said = storm.read_line();
    after(daemon)?;
    let said = said?;
    let counts: Vec<u64> = said.split(' ').map(str::parse).collect::<Result<_, _>>()?;
    Ok((storm, counts[0], counts[1]))
}

/// The one record of analysis `id` once it is there, checked to be the refusal of
/// `refused` forks.
fn the_refusal(daemon: &Daemon, id: &str, refused: u64) -> Result<EventRecord> {
    let records = await_state("the burst's record", || {
        let records = daemon.events_of(id)?;
        Ok((!records.is_empty()).then_some(records))
    })?;
    let [record] = records.as_slice() else {
        anyhow::bail!("one record for the burst: {records:#?}");
    };
    let r = &record.record;
    assert_eq!(
        (r.reason, r.outcome),
        (Reason::MaxProcesses, Outcome::Refused),
        "{r:#?}"
    );
    assert_eq!(r.limit, Some(MAX));
    assert_eq!(
        r.refused_forks,
        Some(refused),
        "every refused fork, counted: {r:#?}"
    );
    assert!(r.signals.is_empty(), "nothing signalled: {r:#?}");
    Ok(record.clone())
}

/// A daemon whose kernel refuses forks; None when this kernel cannot and the test named
/// `name` (in this module) has passed in a guest kernel that can instead.
fn refusing_daemon(name: &str) -> Result<Option<Daemon>> {
    let daemon = Daemon::start()?;
    let status = daemon.status()?;
    let path = status.kernel_paths.iter().find(|p| p.path == "fork_limit");
    if path.is_some_and(|p| p.how == "refuse") {
        return Ok(Some(daemon));
    }
    if std::env::var_os(crate::kernels::IN_GUEST).is_some() {
        anyhow::bail!("the guest's kernel does not refuse forks: {path:?}");
    }
    eprintln!("this kernel does not refuse forks ({path:?}): running {name} in Debian's 6.12");
    drop(daemon);
    crate::kernels::run_in_kernel("6.12.", &[&format!("refuse::{name}")])?;
    Ok(None)
}

#[test]
fn a_fork_storm_from_several_members_is_refused_at_exactly_max_processes_and_nothing_is_killed()
-> Result<()> {
    let Some(mut daemon) = refusing_daemon(
        "a_fork_storm_from_several_members_is_refused_at_exactly_max_processes_and_nothing_is_killed",
    )?
    else {
        return Ok(());
    };
    let mut calm = Workload::python(
        "import time; print('ready', flush=True); time.sleep(600)",
        &[],
    )?;
    assert_eq!(calm.read_line()?, "ready");
    daemon.register_with(calm.pid(), "calm", &["--max-processes", "1"])?;
    let (storm, forked, refused) = storm(&mut daemon, "storm", |_| Ok(()), |_| Ok(()))?;
    eprintln!("figures: {forked} forked, {refused} refused, limit {MAX}");
    assert_eq!(
        1 + FORKERS as u64 + forked,
        MAX,
        "the forks stop at exactly the limit"
    );
    assert_eq!(refused, (FORKERS * REFUSALS_EACH) as u64);
    assert_eq!(
        alive_in_group(storm.pid()).len() as u64,
        MAX,
        "and all of it lives"
    );
    the_refusal(&daemon, "storm", refused)?;
    let tree = daemon.tree(Some("storm"))?;
    assert_eq!(all_nodes(&tree).len() as u64, MAX);
    assert_eq!(alive_in_group(calm.pid()).len(), 1, "the bystander lives");
    assert!(daemon.events_of("calm")?.is_empty());
    assert_eq!(daemon.status()?.forks_refused, refused);
    Ok(())
}

#[test]
fn forks_refused_while_the_daemon_is_stopped_are_recorded_once_after_sigcont_and_a_restart()
-> Result<()> {
    let Some(mut daemon) = refusing_daemon(
        "forks_refused_while_the_daemon_is_stopped_are_recorded_once_after_sigcont_and_a_restart",
    )?
    else {
        return Ok(());
    };
    let (storm, forked, refused) = storm(
        &mut daemon,
        "stopped",
        |d| d.signal(Signal::SIGSTOP),
        |d| d.signal(Signal::SIGCONT),
    )?;
    assert_eq!(
        1 + FORKERS as u64 + forked,
        MAX,
        "refused by the kernel while no daemon ran"
    );
    assert_eq!(alive_in_group(storm.pid()).len() as u64, MAX);
    the_refusal(&daemon, "stopped", refused)?;
    daemon.restart()?;
    the_refusal(&daemon, "stopped", refused)?;
    Ok(())
}
