//! Kernel side of watchdog: keeps `WATCHED` (tgid → analysis) complete by itself.
//!
//! A child forked by a watched process is put in the map here, in the fork tracepoint,
//! before the child has run a single instruction and before userspace hears of it, so no
//! descendant can slip through however fast it forks. Userspace learns of every change
//! through the `EVENTS` ring buffer; a full ring increments `DROPS`, and the daemon
//! resyncs from the map, which stays authoritative.
//!
//! tp_btf programs: they need no tracefs, and give us the `task_struct` pointers. The
//! struct offsets come from the running kernel's BTF through `WATCHDOG_CONFIG`.
//!
//! Every pid they report or look up is the daemon's: a daemon in a PID namespace of its
//! own (a container, a pod without hostPID) gets each process' pid in that namespace,
//! read from the task's `struct pid` as the kernel's `pid_nr_ns()` does, and never hears
//! of a process outside it. In the initial namespace the kernel's pids are used as read.
//!
//! A program that fails (a kernel read refused) reports it with one aya-log `error!`
//! record naming the program and the error code, when the daemon reads them
//! (`run --kernel-log`). Only failures report: nothing of it is on the success path.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic types with read-modify-write methods, and
// an add whose result is unused is BPF's oldest atomic (`lock xadd`, every kernel).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        generated::{bpf_probe_read_user, bpf_send_signal, bpf_seq_write},
    },
    macros::{btf_tracepoint, lsm, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, LsmContext},
};
use aya_log_ebpf::error;
use watchdog_common::{
    AnalysisEntry, Config, ERROR_SLOTS, Event, EventKind, FORK_LAUNCHED, FORK_UNTRACKED, ForkLimit,
    KILL_CMDLINE, KillProgress, MAX_ANALYSES, MAX_PENDING_FORKS, MAX_WATCHED, Members, PidNs,
    ProcRecord, ProgramError, REFUSAL_BURST_GAP_NS, RING_BYTES, RootEntry, RssSample, STRIKE_FORKS,
    STRIKE_MEMORY, TreeRss, WalkTarget, WatchEntry, error_slot, goes_over, past_limit, reaches,
};

/// What a hash map update returns when the map is full.
const E2BIG: i64 = 7;
/// What a `NOEXIST` update returns when the key is there.
const EEXIST: i64 = 17;
/// What a refused fork returns: systemd's TasksMax and RLIMIT_NPROC say the same.
const EAGAIN: i32 = 11;
/// `clone()` flag of a new thread, which joins its process and is no new member.
const CLONE_THREAD: u64 = 0x0001_0000;
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;
/// `BPF_NOEXIST`: an update that only creates.
const NOEXIST: u64 = 1;

#[unsafe(no_mangle)]
static WATCHDOG_CONFIG: Config = Config::UNSET;

/// Allocated per entry: the daemon sizes it to `pid_max` at load time, which costs
/// nothing until processes are watched, and then cannot fill by count.
#[map]
static WATCHED: HashMap<u32, WatchEntry> =
    HashMap::with_max_entries(MAX_WATCHED, BPF_F_NO_PREALLOC);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static WATCH_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The programs' own failures, per program and kind (`error_slot`): the daemon exports
/// them, so a failing program is seen even without `--kernel-log`.
#[map]
static ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ERROR_SLOTS, 0);

// Written and read by the daemon only; here so they are created and pinned with the
// rest, and a restarted daemon finds its analyses next to the processes it watches.
#[map]
static ANALYSES: HashMap<u64, AnalysisEntry> = HashMap::with_max_entries(MAX_ANALYSES, 0);

#[map]
static ROOTS: HashMap<u32, RootEntry> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Processes whose new children join an analysis, the processes themselves never being
/// members: tgid → the entry a child gets, holding the launcher's own start time (an
/// entry whose pid names another process now is ignored). Written by the daemon.
#[map]
static LAUNCHERS: HashMap<u32, WatchEntry> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Analyses with a tree memory limit and their RSS summed as it changes: the daemon adds
/// and removes entries, the programs only update them, so a straggler of an analysis
/// that is over never brings its entry back.
#[map]
static TREE_RSS: HashMap<u64, TreeRss> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Analyses being SIGKILLed ([`watchdog_common::DYING_MAP`]): their members die at
/// their next fork.
#[map]
static DYING: HashMap<u64, u64> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Processes a kill has sent SIGTERM ([`watchdog_common::KILLS_MAP`]): kept for a
/// restarted daemon; the memory strike writes its own here, and sends none to a
/// process already in it. Allocated as it fills: most of the time empty.
#[map]
static KILLS: HashMap<u32, KillProgress> =
    HashMap::with_max_entries(MAX_WATCHED, BPF_F_NO_PREALLOC);

/// One [`KillProgress`] per CPU, where the memory strike builds the entry it writes.
#[map]
static STRIKE_SCRATCH: PerCpuArray<KillProgress> = PerCpuArray::with_max_entries(1, 0);

/// What the programs may signal themselves ([`watchdog_common::STRIKES_MAP`], key 0):
/// written by each daemon at its start and reload, and pinned, so it holds while no
/// daemon runs.
#[map]
static STRIKES: Array<u32> = Array::with_max_entries(1, 0);

/// Each analysis' member count and refusals ([`watchdog_common::MEMBERS_MAP`]).
#[map]
static MEMBERS: HashMap<u64, Members> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Each analysis' process limit and the daemon's part of its count
/// ([`watchdog_common::FORK_LIMITS_MAP`]).
#[map]
static FORK_LIMITS: HashMap<u64, ForkLimit> = HashMap::with_max_entries(MAX_ANALYSES, 0);

/// Forks counted at `task_alloc` and not yet seen at their end
/// ([`watchdog_common::PENDING_FORKS_MAP`]): new task's address → analysis.
#[map]
static PENDING_FORKS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_PENDING_FORKS, 0);

/// The daemon's [`watchdog_common::LAYOUT`] (key 0), written once the programs are
/// attached: a restarted daemon trusts the pinned maps only if it is its own.
#[map]
static LAYOUT: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static WALK_TARGET: Array<WalkTarget> = Array::with_max_entries(1, 0);

/// The daemon's PID namespace (key 0), written before the programs are attached; read
/// only when `Config::in_pid_ns` is set. Pinned, so a restarted daemon can tell whether
/// the pinned programs report pids of its own namespace.
#[map]
static PID_NS: Array<PidNs> = Array::with_max_entries(1, 0);

/// 1 while a daemon reads the error reports (`run --kernel-log`); written by the daemon
/// at each start and pinned, so resumed programs follow the daemon now running.
#[map]
static KERNEL_LOG: Array<u32> = Array::with_max_entries(1, 0);

/// One field of the config, read through a volatile load: the loader rewrites the global
/// after compilation, so LLVM must not fold the zeros it sees here into the code. One
/// field at a time, where it is used: a copy of the whole struct cost ~30 instructions
/// before the first check, on every RSS change of every process on the host.
macro_rules! config {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(WATCHDOG_CONFIG.$field)) }
    };
}

/// Whether the daemon sees the kernel's own pids (the initial PID namespace): then every
/// pid is used as read, and nothing of the translation below runs.
#[inline(always)]
fn in_initial_ns() -> bool {
    config!(in_pid_ns) == 0
}

/// The number of the `struct pid` at `pid` in the daemon's namespace, as the kernel's
/// `pid_nr_ns()` finds it; 0 (no process' pid, and never a key of `WATCHED`) when the
/// process is not in that namespace (nor in one below it): the daemon never hears of
/// it. A plain 0 rather than an Option: the verifier follows it more easily.
fn nr_in_daemon_ns(pid: *const u8) -> Result<u32, i64> {
    let Some(ns) = PID_NS.get(0) else {
        return Ok(0);
    };
    let (ns_level, ns_inum) = (ns.level, ns.inum);
    if pid.is_null() {
        return Ok(0);
    }
    let level: u32 = read_at(pid, config!(pid_level))?;
    if level < ns_level {
        return Ok(0);
    }
    let upid = upid_at(pid, ns_level);
    let upid_ns: *const u8 = read_at(upid, config!(upid_ns))?;
    if upid_ns.is_null() {
        return Ok(0);
    }
    let inum: u32 = read_at(upid_ns, config!(pidns_inum))?;
    if inum != ns_inum {
        return Ok(0);
    }
    read_at(upid, config!(upid_nr))
}

/// `&pid->numbers[level]`: the process' number and namespace at that depth.
fn upid_at(pid: *const u8, level: u32) -> *const u8 {
    pid.wrapping_add((config!(pid_numbers) + level * config!(upid_size)) as usize)
}

/// The pid the daemon knows a thread group leader by, given the kernel's `pid` of it
/// (0: outside its namespace).
fn leader_pid(leader: *const u8, pid: u32) -> Result<u32, i64> {
    if in_initial_ns() {
        return Ok(pid);
    }
    nr_in_daemon_ns(read_at(leader, config!(task_thread_pid))?)
}

/// The pid the daemon knows the process of `task` (a thread's is its leader's) by
/// (0: outside its namespace).
fn tgid_of(task: *const u8) -> Result<u32, i64> {
    if in_initial_ns() {
        return read_at(task, config!(task_tgid));
    }
    let leader: *const u8 = read_at(task, config!(task_group_leader))?;
    nr_in_daemon_ns(read_at(leader, config!(task_thread_pid))?)
}

/// The pid the daemon knows the current process by (0: outside its namespace, which
/// no map lookup finds).
fn current_tgid() -> Result<u32, i64> {
    if in_initial_ns() {
        return Ok((bpf_get_current_pid_tgid() >> 32) as u32);
    }
    tgid_of(unsafe { bpf_get_current_task() } as *const u8)
}

/// Reads a `T` at byte `offset` of the kernel struct at `base`.
fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
        .map_err(|e| e as i64)
}

/// The programs, by their slot in `watchdog_common::PROGRAM_NAMES`.
#[derive(Clone, Copy)]
enum Program {
    Fork = 0,
    Exit = 1,
    RssStat = 2,
    RssIter = 3,
    DescendantsIter = 4,
    Exec = 5,
    TaskAlloc = 6,
}

impl Program {
    /// Literals, not `PROGRAM_NAMES[self]`: a string read out of an array is a pointer
    /// loaded from memory, which the verifier does not let aya-log copy from.
    #[inline(always)]
    fn name(self) -> &'static str {
        match self {
            Self::Fork => "sched_process_fork",
            Self::Exit => "sched_process_exit",
            Self::RssStat => "rss_stat",
            Self::RssIter => "rss_iter",
            Self::DescendantsIter => "descendants_iter",
            Self::Exec => "sched_process_exec",
            Self::TaskAlloc => "task_alloc",
        }
    }
}

/// Counts a failure of `program` and reports it: one `error!` record with its name and
/// the error code (a negative errno, e.g. -14 EFAULT or -34 ERANGE for a kernel read
/// refused), when a daemon reads them. Called only once the program has failed.
/// aya-log-ebpf's own global level (`AYA_LOG_LEVEL`) is left at its default: it is
/// fixed when the programs are loaded, while [`KERNEL_LOG`] follows each restarted
/// daemon.
#[inline(always)]
fn failed<C>(ctx: &C, program: Program, error: ProgramError, code: i64) {
    bump(&ERRORS, error_slot(program as u32, error));
    if KERNEL_LOG.get(0).is_some_and(|on| *on != 0) {
        error!(ctx, target: "watchdog_ebpf", "{} failed: error {}", program.name(), code);
    }
}

/// The end of a program: a failed kernel read is counted and reported.
#[inline(always)]
fn finish<C>(ctx: &C, program: Program, result: Result<(), i64>) {
    if let Err(code) = result {
        failed(ctx, program, ProgramError::Read, code);
    }
}

fn bump(counter: &PerCpuArray<u64>, slot: u32) {
    if let Some(slot) = counter.get_ptr_mut(slot) {
        unsafe { *slot += 1 };
    }
}

/// Whether an event must reach the daemon now. Forks, execs, exits of childless
/// processes and RSS steps can wait for the daemon's next drain (the map is already
/// right; nothing is decided on them alone), which saves a wake-up per event in a fork
/// storm. Exits with children (possible orphans) and limit crossings wake it at once,
/// and so does every event once the ring holds more than the watermark.
fn wake_flags(urgent: bool) -> u64 {
    if urgent || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config!(wake_watermark) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

struct Record {
    kind: EventKind,
    pid: u32,
    ppid: u32,
    exit_status: i32,
    analysis: u64,
    start_ns: u64,
    value: u64,
    urgent: bool,
}

impl Record {
    /// An event about `pid` of `analysis`, with nothing else to say and no hurry.
    fn new(kind: EventKind, pid: u32, analysis: u64) -> Self {
        Self {
            kind,
            pid,
            ppid: 0,
            exit_status: 0,
            analysis,
            start_ns: 0,
            value: 0,
            urgent: false,
        }
    }
}

/// Sends one event; false when the ring was full (the loss is counted, and the daemon
/// resyncs from the map).
fn emit(record: Record) -> bool {
    let Some(mut slot) = EVENTS.reserve::<Event>(0) else {
        bump(&DROPS, 0);
        return false;
    };
    slot.write(Event {
        kind: record.kind as u32,
        pid: record.pid,
        ppid: record.ppid,
        exit_status: record.exit_status,
        analysis: record.analysis,
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        start_ns: record.start_ns,
        value: record.value,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    slot.submit(wake_flags(record.urgent));
    true
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> u32 {
    finish(&ctx, Program::Fork, try_fork(&ctx));
    0
}

fn try_fork(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let tgid = current_tgid()?;
    let (entry, launched) = match unsafe { WATCHED.get(tgid) } {
        Some(entry) => (*entry, false),
        None => match launcher_entry(tgid)? {
            Some(entry) => (entry, true),
            None => return Ok(()),
        },
    };
    let child: *const u8 = ctx.arg(1);
    let child_pid: u32 = read_at(child, config!(task_pid))?;
    let child_tgid: u32 = read_at(child, config!(task_tgid))?;
    if child_pid != child_tgid {
        // A new thread of a watched process: same process, not a new node.
        return Ok(());
    }
    // A child of a process in the daemon's namespace is in it too.
    let child_tgid = leader_pid(child, child_tgid)?;
    let start_ns: u64 = read_at(child, config!(task_start_boottime))?;
    let child_entry = WatchEntry {
        rss_reported: 0,
        rss_counted: 0,
        start_ns,
        ..entry
    };
    // A child the map cannot take is still reported, at once and flagged: the daemon
    // follows it another way. Never dropped.
    let untracked = match WATCHED.insert(child_tgid, child_entry, 0) {
        Ok(()) => false,
        Err(code) => {
            let code = i64::from(code);
            if code == -E2BIG {
                bump(&WATCH_FULL, 0);
            } else {
                failed(ctx, Program::Fork, ProgramError::MapUpdate, code);
            }
            true
        }
    };
    count_fork(child as u64, entry.analysis, untracked);
    // A member of an analysis being SIGKILLed dies at its fork (the child is in the map
    // and reported, and gets its SIGKILL from the daemon): forks can no longer add to
    // the analysis, so its kill converges. A launcher is no member and is spared.
    if !launched && unsafe { DYING.get(&entry.analysis) }.is_some() {
        unsafe { bpf_send_signal(SIGKILL) };
    }
    // real_parent, not the forking task: CLONE_PARENT makes them differ.
    let real_parent: *const u8 = read_at(child, config!(task_real_parent))?;
    let ppid = tgid_of(real_parent)?;
    let flags =
        (if untracked { FORK_UNTRACKED } else { 0 }) | (if launched { FORK_LAUNCHED } else { 0 });
    emit(Record {
        ppid,
        start_ns,
        value: flags,
        urgent: untracked,
        ..Record::new(EventKind::Fork, child_tgid, entry.analysis)
    });
    Ok(())
}

/// Counts a child of `analysis` in its members, once: a fork `task_alloc` counted
/// ahead is counted already. A child the watched map could not take is not counted:
/// the count is of the map's entries, and the daemon follows that child itself.
fn count_fork(child: u64, analysis: u64, untracked: bool) {
    let counted_ahead = PENDING_FORKS.remove(child).is_ok();
    match (counted_ahead, untracked) {
        (true, true) => drop(add_member(analysis, -1)),
        (false, false) => drop(add_member(analysis, 1)),
        _ => {}
    }
}

/// Adds `delta` to the kernel's part of `analysis`' member count; returns the part
/// after it, as read back (other CPUs' adds may be in it too). Without an entry (an
/// analysis the daemon made no entry for), nothing.
fn add_member(analysis: u64, delta: i64) -> Option<u64> {
    let members = MEMBERS.get_ptr_mut(analysis)?;
    // SAFETY: a valid map value pointer, u64-aligned.
    unsafe {
        let _: u64 = core::intrinsics::atomic_xadd::<
            u64,
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(&raw mut (*members).kernel, delta as u64);
        Some(core::ptr::read_volatile(&raw const (*members).kernel))
    }
}

/// Refuses a fork that would take an analysis past its `max_processes`, where the
/// daemon lets the kernel do so. Every fork that passes is counted here, ahead of
/// its child: a count read back after its own add that is past the limit is undone
/// and refused, so however many CPUs fork at once, the forks that pass never take the
/// count past the limit.
#[lsm(hook = "task_alloc")]
pub fn task_alloc(ctx: LsmContext) -> i32 {
    match try_task_alloc(&ctx) {
        Ok(verdict) => verdict,
        Err(code) => {
            failed(&ctx, Program::TaskAlloc, ProgramError::Read, code);
            0
        }
    }
}

fn try_task_alloc(ctx: &LsmContext) -> Result<i32, i64> {
    // An earlier BPF LSM program's verdict stands.
    let earlier: i32 = ctx.arg(2);
    let flags: u64 = ctx.arg(1);
    if earlier != 0
        || flags & CLONE_THREAD != 0
        || STRIKES.get(0).is_none_or(|bits| bits & STRIKE_FORKS == 0)
    {
        return Ok(earlier);
    }
    let tgid = current_tgid()?;
    let analysis = match unsafe { WATCHED.get(tgid) } {
        Some(entry) => entry.analysis,
        None => match launcher_entry(tgid)? {
            Some(entry) => entry.analysis,
            None => return Ok(0),
        },
    };
    let Some(limit) = (unsafe { FORK_LIMITS.get(&analysis) }).copied() else {
        return Ok(0);
    };
    if limit.max == 0 {
        return Ok(0);
    }
    let Some(kernel) = add_member(analysis, 1) else {
        return Ok(0);
    };
    if past_limit(kernel, limit.base, limit.max) {
        let _ = add_member(analysis, -1);
        note_refusal(tgid, analysis);
        return Ok(-EAGAIN);
    }
    let task: *const u8 = ctx.arg(0);
    if PENDING_FORKS.insert(task as u64, analysis, 0).is_err() {
        // No room to remember it: counted at its fork instead.
        let _ = add_member(analysis, -1);
    }
    Ok(0)
}

/// Counts a refused fork; the first of a burst is reported.
fn note_refusal(tgid: u32, analysis: u64) {
    let Some(members) = MEMBERS.get_ptr_mut(analysis) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: a valid map value pointer; racing refusals on other CPUs at worst both
    // begin the burst, which the daemon records once all the same.
    unsafe {
        let _: u64 = core::intrinsics::atomic_xadd::<
            u64,
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(&raw mut (*members).refused, 1);
        let new_burst = now.saturating_sub((*members).last_refused_ns) > REFUSAL_BURST_GAP_NS;
        (*members).last_refused_ns = now;
        if new_burst {
            (*members).burst_start_ns = now;
            (*members).burst_pid = tgid;
            emit(Record {
                value: core::ptr::read_volatile(&raw const (*members).refused),
                urgent: true,
                ..Record::new(EventKind::Refused, tgid, analysis)
            });
        }
    }
}

/// A fork `task_alloc` counted ahead that failed later on (out of memory, a signal, a
/// cgroup's pids limit): its count is taken back.
#[lsm(hook = "task_free")]
pub fn task_free(ctx: LsmContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    if let Some(analysis) = unsafe { PENDING_FORKS.get(&(task as u64)) }.copied()
        && PENDING_FORKS.remove(task as u64).is_ok()
    {
        let _ = add_member(analysis, -1);
    }
    0
}

/// The entry a child of launcher `tgid` (the current task's process) gets, if it is a
/// launcher: one whose start time is the current process' own.
fn launcher_entry(tgid: u32) -> Result<Option<WatchEntry>, i64> {
    let Some(entry) = (unsafe { LAUNCHERS.get(tgid) }).copied() else {
        return Ok(None);
    };
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader: *const u8 = read_at(task, config!(task_group_leader))?;
    let start_ns: u64 = read_at(leader, config!(task_start_boottime))?;
    let tick = config!(ns_per_tick);
    let same = tick != 0 && start_ns / tick == entry.start_ns / tick;
    Ok(same.then_some(entry))
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> u32 {
    finish(&ctx, Program::Exit, try_exit(&ctx));
    0
}

fn try_exit(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let tgid = current_tgid()?;
    let Some(entry) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let task: *const u8 = ctx.arg(0);
    if !is_group_dead(ctx, task)? {
        // A thread, not the last one: the process lives on.
        return Ok(());
    }
    // Only the caller whose delete succeeds reports: when two threads race to the end
    // (the `signal->live` path), the exit is still reported once.
    if WATCHED.remove(tgid).is_err() {
        return Ok(());
    }
    let _ = add_member(entry.analysis, -1);
    uncount_rss(&entry);
    let exit_status: i32 = read_at(task, config!(task_exit_code))?;
    // The process' start time (its leader's: the last thread out may be another one)
    // lets userspace tell this exit from one of a recycled PID.
    let leader: *const u8 = read_at(task, config!(task_group_leader))?;
    let start_ns: u64 = read_at(leader, config!(task_start_boottime))?;
    emit(Record {
        exit_status,
        start_ns,
        urgent: has_children(task)?,
        ..Record::new(EventKind::Exit, tgid, entry.analysis)
    });
    Ok(())
}

/// Whether `task` still has children. sched_process_exit fires before exit_notify
/// reparents them, and by the last thread's exit its siblings' children have moved to
/// it, so this sees every child of the process.
fn has_children(task: *const u8) -> Result<bool, i64> {
    let head = task.wrapping_add(config!(task_children) as usize);
    let next: *const u8 = read_at(task, config!(task_children))?;
    Ok(next != head)
}

fn is_group_dead(ctx: &BtfTracePointContext, task: *const u8) -> Result<bool, i64> {
    if config!(exit_has_group_dead) != 0 {
        let group_dead: u64 = ctx.arg(1);
        return Ok(group_dead & 0xff != 0);
    }
    // Older kernels: do_exit has already decremented signal->live when it fires.
    let signal: *const u8 = read_at(task, config!(task_signal))?;
    let live: i32 = read_at(signal, config!(signal_live))?;
    Ok(live == 0)
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> u32 {
    finish(&ctx, Program::Exec, try_exec());
    let _ = ctx.as_ptr();
    0
}

fn try_exec() -> Result<(), i64> {
    let tgid = current_tgid()?;
    if let Some(entry) = unsafe { WATCHED.get(tgid) } {
        emit(Record::new(EventKind::Exec, tgid, entry.analysis));
    }
    Ok(())
}

/// The memory fast path: fires on every RSS counter change of any process; for a
/// watched one, reports the crossing of its limit at once, and changes of `rss_step`
/// for the daemon's tree sums.
#[btf_tracepoint(function = "rss_stat")]
pub fn rss_stat(ctx: BtfTracePointContext) -> u32 {
    finish(&ctx, Program::RssStat, try_rss_stat(&ctx));
    0
}

fn rss_counter(mm: *const u8, member: u32) -> Result<u64, i64> {
    let offset =
        config!(mm_rss_counters) + member * config!(rss_counter_size) + config!(rss_counter_value);
    let pages: i64 = read_at(mm, offset)?;
    Ok(if pages > 0 { pages as u64 } else { 0 })
}

/// File + anon + shmem pages of `mm`, in bytes: what /proc/PID/statm calls resident.
fn rss_of(mm: *const u8) -> Result<u64, i64> {
    let pages = rss_counter(mm, config!(mm_filepages))?
        + rss_counter(mm, config!(mm_anonpages))?
        + rss_counter(mm, config!(mm_shmempages))?;
    Ok(pages * config!(page_size))
}

fn try_rss_stat(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if config!(rss_enabled) == 0 {
        return Ok(());
    }
    let mm: *const u8 = ctx.arg(0);
    let Some((tgid, own)) = mm_user(mm)? else {
        return Ok(());
    };
    let Some(entry) = WATCHED.get_ptr_mut(tgid) else {
        return Ok(());
    };
    let rss = rss_of(mm)?;
    // SAFETY: a valid map value pointer; racing updates from other CPUs of the same
    // process at worst repeat or skip one report, never corrupt.
    let entry = unsafe { &mut *entry };
    count_rss(entry, tgid, rss);
    let over_limit = goes_over(rss, entry.rss_reported, entry.mem_limit);
    if over_limit && own && strike(ctx, (mm, entry), tgid, rss) {
        entry.rss_reported = rss;
        emit(Record {
            start_ns: entry.start_ns,
            value: rss,
            urgent: true,
            ..Record::new(EventKind::Struck, tgid, entry.analysis)
        });
        return Ok(());
    }
    let crossed = over_limit || reaches(rss, entry.rss_reported, entry.warn_bytes);
    let moved = rss.abs_diff(entry.rss_reported) >= config!(rss_step);
    // What was reported is what the daemon heard: a report lost to a full ring leaves
    // it unchanged, so the next change reports the crossing again.
    if (crossed || moved)
        && emit(Record {
            value: rss,
            urgent: crossed,
            ..Record::new(EventKind::Rss, tgid, entry.analysis)
        })
    {
        entry.rss_reported = rss;
    }
    Ok(())
}

/// The memory strike: the current process, `tgid`, has just crossed its limit in its
/// own page fault; when the daemon lets the kernel do so, it gets its kill's SIGTERM
/// now, before it runs another instruction, instead of a few ms later from the
/// daemon. Its [`KILLS`] entry is written first and holds the time and the RSS: the
/// record of it never depends on the event reaching a daemon. None is sent to a
/// process a kill has already sent one, nor to a member of an analysis being
/// SIGKILLed; a failed send is undone and leaves the crossing to the daemon.
fn strike(
    ctx: &BtfTracePointContext,
    (mm, entry): (*const u8, &WatchEntry),
    tgid: u32,
    rss: u64,
) -> bool {
    if STRIKES.get(0).is_none_or(|bits| bits & STRIKE_MEMORY == 0)
        || unsafe { DYING.get(&entry.analysis) }.is_some()
    {
        return false;
    }
    // Built in the map, not on the stack: the command line alone is half of it.
    let Some(progress) = STRIKE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a valid map value pointer, this CPU's own.
    let progress = unsafe { &mut *progress };
    progress.start_ns = entry.start_ns;
    progress.analysis = entry.analysis;
    progress.sigterm_unix_ms = 0;
    progress.escalate_boot_ns = 0;
    progress.struck_boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    progress.struck_rss = rss;
    progress.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    progress.uid = bpf_get_current_uid_gid() as u32;
    progress.cmdline_len = read_cmdline(mm, &mut progress.cmdline);
    // NOEXIST: a kill's SIGTERM already went out (its entry is there), or another
    // thread of the process is striking it on another CPU right now.
    if let Err(code) = KILLS.insert(tgid, &*progress, NOEXIST) {
        let code = i64::from(code);
        if code != -EEXIST && code != -E2BIG {
            failed(ctx, Program::RssStat, ProgramError::MapUpdate, code);
        }
        return false;
    }
    let sent = unsafe { bpf_send_signal(SIGTERM) };
    if sent != 0 {
        let _ = KILLS.remove(tgid);
        failed(ctx, Program::RssStat, ProgramError::Signal, sent);
        return false;
    }
    true
}

/// The start of the command line of the current process, whose address space `mm` is,
/// into `buf`: its length (0 where this kernel's offsets are unknown, or the page is
/// not resident: a probe read never faults).
fn read_cmdline(mm: *const u8, buf: &mut [u8; KILL_CMDLINE]) -> u32 {
    let (start_at, end_at) = (config!(mm_arg_start), config!(mm_arg_end));
    if start_at == 0 || end_at == 0 {
        return 0;
    }
    let (Ok(start), Ok(end)) = (read_at::<u64>(mm, start_at), read_at::<u64>(mm, end_at)) else {
        return 0;
    };
    // Masked as well as bounded: the verifier must see the size is at most the buffer.
    let len = (end.saturating_sub(start).min(KILL_CMDLINE as u64 - 1) as u32) & 0xff;
    let read = unsafe {
        bpf_probe_read_user(
            buf.as_mut_ptr().cast(),
            len,
            start as *const core::ffi::c_void,
        )
    };
    if read == 0 { len } else { 0 }
}

/// The process whose address space `mm` is, and whether it is the current one: the
/// current one's own, or (a change made by another task: `process_vm_writev`, ptrace,
/// reclaim) the owner's, where the kernel has `mm->owner`. None for an address space
/// being torn down (its owner gone) or built (a fork's child, whose `mm` is not yet
/// the new one).
fn mm_user(mm: *const u8) -> Result<Option<(u32, bool)>, i64> {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let own_mm: *const u8 = read_at(task, config!(task_mm))?;
    if own_mm == mm {
        return current_tgid().map(|tgid| Some((tgid, true)));
    }
    let owner_offset = config!(mm_owner);
    if owner_offset == 0 {
        return Ok(None);
    }
    let owner: *const u8 = read_at(mm, owner_offset)?;
    if owner.is_null() {
        return Ok(None);
    }
    let owners_mm: *const u8 = read_at(owner, config!(task_mm))?;
    if owners_mm != mm {
        return Ok(None);
    }
    tgid_of(owner).map(|tgid| Some((tgid, false)))
}

/// Moves the analysis' summed RSS by this process' change since it was last counted,
/// and reports the sum once it moved by `rss_step`. Only for analyses with a sum.
fn count_rss(entry: &mut WatchEntry, tgid: u32, rss: u64) {
    let Some(tree) = TREE_RSS.get_ptr_mut(entry.analysis) else {
        return;
    };
    let delta = rss.wrapping_sub(entry.rss_counted);
    entry.rss_counted = rss;
    add_atomically(tree, delta);
    let total = clamped(unsafe { core::ptr::read_volatile(&raw const (*tree).sum) });
    let reported = unsafe { (*tree).reported };
    if total.abs_diff(reported) >= config!(rss_step)
        && emit(Record {
            value: total,
            ..Record::new(EventKind::TreeRss, tgid, entry.analysis)
        })
    {
        unsafe { (*tree).reported = total };
    }
}

/// Takes an exited process' part out of its analysis' summed RSS.
fn uncount_rss(entry: &WatchEntry) {
    if entry.rss_counted == 0 {
        return;
    }
    if let Some(tree) = TREE_RSS.get_ptr_mut(entry.analysis) {
        add_atomically(tree, entry.rss_counted.wrapping_neg());
    }
}

/// Adds `delta` (two's complement) to the sum: atomic, so the changes of processes on
/// other CPUs are never lost.
fn add_atomically(tree: *mut TreeRss, delta: u64) {
    // SAFETY: a valid map value pointer, u64-aligned.
    unsafe {
        let _: u64 = core::intrinsics::atomic_xadd::<
            u64,
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(&raw mut (*tree).sum, delta);
    }
}

/// A sum of signed changes read back: never below 0 (two threads racing on one
/// process' `rss_counted` can leave it off by a page).
fn clamped(sum: u64) -> u64 {
    if (sum as i64) < 0 { 0 } else { sum }
}

/// `struct bpf_iter_meta` and `struct bpf_iter__task`: the iterator's context.
#[repr(C)]
struct IterMeta {
    seq: *mut aya_ebpf::bindings::seq_file,
    session_id: u64,
    seq_num: u64,
}

#[repr(C)]
struct IterTaskCtx {
    meta: *const IterMeta,
    task: *const u8,
}

/// The reconcile poll in one pass: a task iterator that writes one [`RssSample`] per
/// watched process. Reading the pinned iterator runs it, so the daemon gets every
/// watched RSS with one `read` instead of one /proc open+read per process.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn rss_iter(ctx: *mut core::ffi::c_void) -> i32 {
    finish(&ctx, Program::RssIter, try_rss_iter(ctx.cast()));
    0
}

fn try_rss_iter(ctx: *const IterTaskCtx) -> Result<(), i64> {
    // Direct loads, not probe reads: the verifier must see the seq_file pointer as the
    // trusted BTF pointer bpf_seq_write takes.
    let (meta, task) = unsafe { ((*ctx).meta, (*ctx).task) };
    if task.is_null() {
        return Ok(()); // The end of the walk.
    }
    let pid: u32 = read_at(task, config!(task_pid))?;
    let tgid: u32 = read_at(task, config!(task_tgid))?;
    if pid != tgid {
        return Ok(());
    }
    let pid = leader_pid(task, pid)?;
    if unsafe { WATCHED.get(pid) }.is_none() {
        return Ok(());
    }
    let mm: *const u8 = read_at(task, config!(task_mm))?;
    if mm.is_null() {
        return Ok(()); // Exiting: its address space is gone.
    }
    let sample = RssSample {
        pid,
        _pad: 0,
        start_ns: read_at(task, config!(task_start_boottime))?,
        rss_bytes: rss_of(mm)?,
    };
    seq_write(meta, &sample);
    Ok(())
}

/// Writes one record to the iterator's output. The seq_file pointer is a direct load
/// from the context's meta, which the verifier knows as the BTF pointer the helper
/// takes (a probe read would make it a plain number and be refused).
#[inline(always)]
fn seq_write<T>(meta: *const IterMeta, record: &T) {
    unsafe {
        bpf_seq_write(
            (*meta).seq,
            (record as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
}

/// Registration's walk of the descendants of one root (`WALK_TARGET`), in the kernel:
/// this kernel may lack /proc/PID/task/*/children, and scanning all of /proc costs
/// what the host has, not what the analysis has. Every living process that started
/// no earlier than the root is listed with its parent (a descendant and its ancestors
/// up to the root are all younger than it); the daemon keeps those whose parents lead
/// to the root, at any depth, which a bounded climb here could not.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn descendants_iter(ctx: *mut core::ffi::c_void) -> i32 {
    finish(
        &ctx,
        Program::DescendantsIter,
        try_descendants_iter(ctx.cast()),
    );
    0
}

fn try_descendants_iter(ctx: *const IterTaskCtx) -> Result<(), i64> {
    let (meta, task) = unsafe { ((*ctx).meta, (*ctx).task) };
    if task.is_null() {
        return Ok(());
    }
    let Some(target) = WALK_TARGET.get(0).copied() else {
        return Ok(());
    };
    let start_ns: u64 = read_at(task, config!(task_start_boottime))?;
    if start_ns < target.start_ns {
        return Ok(());
    }
    let pid: u32 = read_at(task, config!(task_pid))?;
    let tgid: u32 = read_at(task, config!(task_tgid))?;
    let exit_state: u32 = read_at(task, config!(task_exit_state))?;
    if pid != tgid || exit_state != 0 {
        return Ok(()); // A thread or a zombie: nothing to watch.
    }
    let pid = leader_pid(task, pid)?;
    if pid == 0 || pid == target.pid {
        return Ok(()); // Outside the daemon's pid namespace, or the root itself.
    }
    let parent: *const u8 = read_at(task, config!(task_real_parent))?;
    let record = ProcRecord {
        pid,
        ppid: tgid_of(parent)?,
        start_ns,
        comm: read_at(task, config!(task_comm))?,
    };
    seq_write(meta, &record);
    Ok(())
}

/// Tells the daemon its own PID namespace as the kernel sees it: the reader's (the task
/// running this iterator is the daemon reading it). One [`PidNs`], written once at the
/// end of the walk; nothing when a read is refused, and the daemon then says why it
/// cannot run in that namespace.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn pidns_iter(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx: *const IterTaskCtx = ctx.cast();
    let (meta, task) = unsafe { ((*ctx).meta, (*ctx).task) };
    if task.is_null()
        && let Ok(ns) = reader_pid_ns()
    {
        seq_write(meta, &ns);
    }
    0
}

/// The current task's active PID namespace: `pid->numbers[pid->level].ns`.
fn reader_pid_ns() -> Result<PidNs, i64> {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let pid: *const u8 = read_at(task, config!(task_thread_pid))?;
    let level: u32 = read_at(pid, config!(pid_level))?;
    let upid = upid_at(pid, level);
    let ns: *const u8 = read_at(upid, config!(upid_ns))?;
    Ok(PidNs {
        level,
        inum: read_at(ns, config!(pidns_inum))?,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
