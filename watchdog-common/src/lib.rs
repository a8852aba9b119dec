//! The records that cross the kernel/user boundary, shared by `watchdog-ebpf` (kernel
//! side) and `watchdog-user` (daemon). Everything is `#[repr(C)]` and plain data so both
//! sides agree on the layout byte for byte.
#![no_std]

/// Name of the map of watched processes: tgid → [`WatchEntry`].
pub const WATCHED_MAP: &str = "WATCHED";
/// Name of the ring buffer carrying [`Event`]s to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU counter of events lost because the ring buffer was full.
pub const DROPS_MAP: &str = "DROPS";
/// Name of the per-CPU counter of children that could not be added to [`WATCHED_MAP`]
/// because it was full.
pub const WATCH_FULL_MAP: &str = "WATCH_FULL";
/// Name of the per-CPU counters of the programs' own failures, indexed by
/// [`error_slot`]: a failure is counted, never only dropped.
pub const ERRORS_MAP: &str = "ERRORS";
/// Name of the map of analyses (key → [`AnalysisEntry`]), written by the daemon only:
/// pinned with the others, it lets a restarted daemon know its analyses again.
pub const ANALYSES_MAP: &str = "ANALYSES";
/// Name of the map of registered roots (pid → [`RootEntry`]), daemon-written too.
pub const ROOTS_MAP: &str = "ROOTS";
/// Capacity of [`ANALYSES_MAP`] and [`ROOTS_MAP`].
pub const MAX_ANALYSES: u32 = 1 << 14;
/// Longest analysis id, bytes.
pub const ANALYSIS_ID_MAX: usize = 256;

/// Name of the one-entry switch (`u32`, 1 = on) the daemon writes at each start from
/// `run --kernel-log`: whether the programs put their error reports in [`LOGS_MAP`].
/// A map, not a load-time global, because pinned programs outlive the daemon that
/// loaded them: each restarted daemon decides for itself.
pub const KERNEL_LOG_MAP: &str = "KERNEL_LOG";
/// Name of aya-log-ebpf's ring buffer of log records (aya-log-ebpf 0.2 names it so;
/// 128 KiB). Pinned, so a restarted daemon reads what the resumed programs write.
pub const LOGS_MAP: &str = "AYA_LOGS";

/// Name of the one-entry array (`u64`) holding the [`LAYOUT`] of the build whose daemon
/// loaded the pinned programs, written once they are attached: a daemon resuming pinned
/// state reads it before any other map, and reads nothing of a layout not its own.
pub const LAYOUT_MAP: &str = "LAYOUT";
/// Bump it when a shared record changes without changing any size (fields reordered, a
/// field's meaning or unit changed): sizes alone change [`LAYOUT`] by themselves.
pub const LAYOUT_REVISION: u64 = 1;
/// The layout of the records the pinned maps and the ring hold, as this build has them:
/// [`LAYOUT_REVISION`] mixed with the size and alignment of every shared record (a new
/// shared record belongs in this list).
pub const LAYOUT: u64 = layout_hash(&[
    LAYOUT_REVISION,
    size_of::<WatchEntry>() as u64,
    align_of::<WatchEntry>() as u64,
    size_of::<AnalysisEntry>() as u64,
    align_of::<AnalysisEntry>() as u64,
    size_of::<RootEntry>() as u64,
    align_of::<RootEntry>() as u64,
    size_of::<Event>() as u64,
    align_of::<Event>() as u64,
    size_of::<Config>() as u64,
    align_of::<Config>() as u64,
    size_of::<RssSample>() as u64,
    align_of::<RssSample>() as u64,
    size_of::<WalkTarget>() as u64,
    align_of::<WalkTarget>() as u64,
    size_of::<ProcRecord>() as u64,
    align_of::<ProcRecord>() as u64,
    size_of::<PidNs>() as u64,
    align_of::<PidNs>() as u64,
    size_of::<TreeRss>() as u64,
    align_of::<TreeRss>() as u64,
    size_of::<KillProgress>() as u64,
    align_of::<KillProgress>() as u64,
    size_of::<Members>() as u64,
    align_of::<Members>() as u64,
    size_of::<ForkLimit>() as u64,
    align_of::<ForkLimit>() as u64,
]);

/// FNV-1a over the words' bytes: any change of any word changes the result, at compile
/// time. Never 0, which is what an unwritten [`LAYOUT_MAP`] holds.
const fn layout_hash(words: &[u64]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < words.len() {
        let bytes = words[i].to_le_bytes();
        let mut j = 0;
        while j < bytes.len() {
            hash ^= bytes[j] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            j += 1;
        }
        i += 1;
    }
    if hash == 0 { 1 } else { hash }
}

/// Name of the global holding the [`Config`] the daemon fills in at load time.
pub const CONFIG_GLOBAL: &str = "WATCHDOG_CONFIG";

/// Capacity of [`WATCHED_MAP`] in the object file. The daemon sets it at load time to the
/// host's `pid_max` (no more processes can live at once, so the map cannot fill by
/// count); the map allocates per entry (`BPF_F_NO_PREALLOC`), so the capacity costs no
/// memory until used.
pub const MAX_WATCHED: u32 = 1 << 17;

/// The programs whose failures [`ERRORS_MAP`] counts, in slot order (the exec program
/// can fail only where it translates pids into the daemon's pid namespace).
pub const PROGRAM_NAMES: [&str; 7] = [
    "sched_process_fork",
    "sched_process_exit",
    "rss_stat",
    "rss_iter",
    "descendants_iter",
    "sched_process_exec",
    "task_alloc",
];

/// What failed in a program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramError {
    /// A read of kernel memory was refused (bpf_probe_read_kernel).
    Read = 0,
    /// An update of a map failed for another reason than a full map (those are counted
    /// in [`WATCH_FULL_MAP`]).
    MapUpdate = 1,
    /// A signal the program sends itself was refused (bpf_send_signal): the daemon
    /// sends it instead.
    Signal = 2,
}

/// Whether `rss` is a process' first report over its memory `limit` (0: none), after
/// `reported` was the last one the daemon heard. Over, not at: the daemon kills above
/// the limit, so a report of exactly the limit leaves the crossing still to come.
pub const fn goes_over(rss: u64, reported: u64, limit: u64) -> bool {
    limit != 0 && rss > limit && reported <= limit
}

/// Whether `rss` is a process' first report at or above its warning `level` (0: none),
/// after `reported`.
pub const fn reaches(rss: u64, reported: u64, level: u64) -> bool {
    level != 0 && rss >= level && reported < level
}

/// The kinds of [`ProgramError`], in slot order.
pub const PROGRAM_ERRORS: [&str; 3] = ["read", "map_update", "signal"];

/// The slot of [`ERRORS_MAP`] that counts `error` in program number `program` (its
/// index in [`PROGRAM_NAMES`]).
pub const fn error_slot(program: u32, error: ProgramError) -> u32 {
    program * PROGRAM_ERRORS.len() as u32 + error as u32
}

/// Slots in [`ERRORS_MAP`].
pub const ERROR_SLOTS: u32 = (PROGRAM_NAMES.len() * PROGRAM_ERRORS.len()) as u32;

/// [`Event::value`] of a fork whose child could not be put in [`WATCHED_MAP`] (full,
/// or out of memory): the kernel does not follow that child, so the daemon must.
pub const FORK_UNTRACKED: u64 = 1;
/// Flag in a fork's [`Event::value`]: the parent is not watched but a launcher
/// ([`LAUNCHERS_MAP`]): the child is a new root of the launcher's analysis.
pub const FORK_LAUNCHED: u64 = 2;
/// Name of the map of launchers (tgid → the [`WatchEntry`] their new children get, with
/// the launcher's own start time): processes whose children join an analysis while
/// they themselves are never members. Written by the daemon only.
pub const LAUNCHERS_MAP: &str = "LAUNCHERS";
/// Size of the ring buffer in bytes (a power of two, a multiple of the page size).
/// At 72 bytes an event (64 and the ring's 8-byte header) this holds ~29,000 events:
/// over a second of the fastest watched fork storm this machine runs (~11,000 forks/s,
/// each a fork and an exit event) with the daemon not draining at all. The daemon maps
/// the ring twice over (for wrap-around), all of it resident from the start: its RSS
/// carries 2 × this, so the size is a trade of RSS against stall tolerance. Lost events
/// are counted and followed by a resync from the kernel map, which misses nothing.
pub const RING_BYTES: u32 = 2 << 20;

/// Value of [`WATCHED_MAP`]: which analysis a process belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchEntry {
    /// Daemon-assigned key of the analysis (never 0).
    pub analysis: u64,
    /// Per-process RSS limit in bytes (0: none); children inherit it.
    pub mem_limit: u64,
    /// RSS last reported to userspace, bytes (per process; a child starts at 0).
    pub rss_reported: u64,
    /// RSS at which the analysis' warning is due (`--warn-at` of `mem_limit`), reported
    /// at once like the limit; 0: no warning. Children inherit it.
    pub warn_bytes: u64,
    /// The process' start time (CLOCK_BOOTTIME, ns): with the pid, its identity. A kill
    /// that finds its target in the map checks it, so an entry can never name a
    /// recycled pid's new process.
    pub start_ns: u64,
    /// RSS, bytes, that this process adds to its analysis' sum in [`TREE_RSS_MAP`]: the
    /// RSS at its last change while the analysis had a sum (0 until then; a child
    /// starts at 0).
    pub rss_counted: u64,
}

/// Name of the map of analyses whose kill has reached SIGKILL (key → 0): a member of
/// one that forks is SIGKILLed by the fork program at that fork, so a fork bomb cannot
/// outgrow its kill, whatever its pace. Written by the daemon only, and pinned: it
/// holds while no daemon runs.
pub const DYING_MAP: &str = "DYING";

/// Name of the map of processes a kill has sent SIGTERM: pid → [`KillProgress`].
/// Written by the daemon only, and pinned: a restarted daemon SIGKILLs them when the
/// grace that SIGTERM began ends, never after a grace of its own.
pub const KILLS_MAP: &str = "KILLS";

/// Value of [`KILLS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KillProgress {
    /// The process' start time (CLOCK_BOOTTIME, ns): with the pid, its identity.
    pub start_ns: u64,
    pub analysis: u64,
    /// When its SIGTERM was sent (Unix ms), for its record; 0 in an entry the kernel
    /// wrote, until a daemon takes it up.
    pub sigterm_unix_ms: u64,
    /// When its grace ends (CLOCK_BOOTTIME, ns): a clock no wall-clock step moves; 0 in
    /// an entry the kernel wrote, until a daemon takes it up.
    pub escalate_boot_ns: u64,
    /// When the kernel itself sent the SIGTERM (CLOCK_BOOTTIME, ns), the moment the
    /// process crossed its memory limit ([`STRIKES_MAP`]); 0: a daemon sent it.
    pub struck_boot_ns: u64,
    /// The process' RSS when the kernel sent it (bytes; with `struck_boot_ns`).
    pub struck_rss: u64,
    /// Its name, uid and the start of its command line (`cmdline_len` bytes, NULs
    /// between the arguments) then, with `struck_boot_ns`: a process that handles its
    /// SIGTERM at once is gone before a daemon can read /proc, and its record keeps
    /// these instead.
    pub comm: [u8; 16],
    pub uid: u32,
    pub cmdline_len: u32,
    pub cmdline: [u8; KILL_CMDLINE],
}

/// The most of a command line the kernel keeps in a [`KillProgress`] it writes, bytes.
pub const KILL_CMDLINE: usize = 256;

impl Default for KillProgress {
    fn default() -> Self {
        Self {
            start_ns: 0,
            analysis: 0,
            sigterm_unix_ms: 0,
            escalate_boot_ns: 0,
            struck_boot_ns: 0,
            struck_rss: 0,
            comm: [0; 16],
            uid: 0,
            cmdline_len: 0,
            cmdline: [0; KILL_CMDLINE],
        }
    }
}

/// Name of the one-entry array (`u32`, [`STRIKE_MEMORY`] bits) the daemon writes at
/// each start and reload: what the programs may signal themselves, the moment they
/// see a violation, before any daemon hears of it. Pinned, so the switch holds while
/// no daemon runs and each restarted daemon sets it for itself.
pub const STRIKES_MAP: &str = "STRIKES";
/// Bit of [`STRIKES_MAP`]: a watched process whose RSS crosses its per-process limit
/// in its own context (its page fault) gets its kill's SIGTERM from the `rss_stat`
/// program, which writes the process' [`KILLS_MAP`] entry first and reports
/// [`EventKind::Struck`].
pub const STRIKE_MEMORY: u32 = 1;
/// Bit of [`STRIKES_MAP`]: a fork (not a new thread) that would take an analysis past
/// its `max_processes` fails with EAGAIN in the `task_alloc` LSM program, which counts
/// it in the analysis' [`MEMBERS_MAP`] entry and reports the first of each burst
/// ([`EventKind::Refused`]).
pub const STRIKE_FORKS: u32 = 2;

/// Name of the map of each analysis' member count and refused forks, as the programs
/// keep them: key → [`Members`]. The daemon creates an entry with the analysis (before
/// its first process enters [`WATCHED_MAP`]) and removes it at its end; the programs
/// only update entries there, by atomic adds.
pub const MEMBERS_MAP: &str = "MEMBERS";

/// Value of [`MEMBERS_MAP`]: the kernel's part of an analysis' member count and its
/// refusals. The whole count is `kernel + `[`ForkLimit::base`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Processes the programs put in [`WATCHED_MAP`] (at their fork, or reserved at
    /// `task_alloc` before it) less those they took out (at their exit); two's
    /// complement, read it as `i64`.
    pub kernel: u64,
    /// Forks refused so far.
    pub refused: u64,
    /// When the last fork was refused, and when the burst it belongs to began
    /// (CLOCK_BOOTTIME, ns): a refusal more than [`REFUSAL_BURST_GAP_NS`] after the last
    /// begins a new burst.
    pub last_refused_ns: u64,
    pub burst_start_ns: u64,
    /// The process whose fork began the burst.
    pub burst_pid: u32,
    pub _pad: u32,
}

/// Refusals this close together are one burst, and one record.
pub const REFUSAL_BURST_GAP_NS: u64 = 1_000_000_000;

/// Name of the map of each analysis' process limit and the daemon's part of its count:
/// key → [`ForkLimit`]. Written by the daemon only, read by `task_alloc`.
pub const FORK_LIMITS_MAP: &str = "FORK_LIMITS";

/// Value of [`FORK_LIMITS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkLimit {
    /// The analysis' `max_processes` (0: none).
    pub max: u64,
    /// Processes the daemon put in [`WATCHED_MAP`] less those it took out; two's
    /// complement.
    pub base: u64,
    /// [`Members::refused`] as far as a daemon has recorded it: a restarted daemon
    /// records each burst once.
    pub recorded: u64,
}

/// Name of the map of forks let through `task_alloc` and counted there, by the new
/// task's address, until the fork tracepoint sees the child (the count is then
/// its) or `task_free` sees the fork fail (the count is taken back).
pub const PENDING_FORKS_MAP: &str = "PENDING_FORKS";
/// Forks in flight at once that `task_alloc` counts ahead; one past it is counted at
/// its fork instead.
pub const MAX_PENDING_FORKS: u32 = 4096;

/// Whether the count a reservation read back (`kernel` after its own add, plus `base`)
/// takes the analysis past `max`: the reservation is then undone and the fork refused.
pub const fn past_limit(kernel: u64, base: u64, max: u64) -> bool {
    max != 0 && (kernel.wrapping_add(base) as i64) > max as i64
}

/// Name of the map of analyses with a tree memory limit: key → [`TreeRss`], the RSS of
/// all their processes summed in the kernel as it changes. The daemon creates an entry
/// with the analysis and removes it at its end; the programs only update entries there.
pub const TREE_RSS_MAP: &str = "TREE_RSS";

/// Value of [`TREE_RSS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeRss {
    /// The sum of the processes' `rss_counted`, bytes; changed by atomic adds of each
    /// change (two's complement: read it as `i64`, clamped at 0).
    pub sum: u64,
    /// The sum last reported to the daemon.
    pub reported: u64,
}

/// An analysis as the daemon needs it back after a restart.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AnalysisEntry {
    pub id: [u8; ANALYSIS_ID_MAX],
    pub id_len: u32,
    /// Uid of the caller that created it: only it (or an admin) may add processes to it
    /// or unregister it, also after a restart.
    pub owner_uid: u32,
    pub registered_unix_ms: u64,
    pub deadline_unix_ms: u64,
    /// The analysis' limits, each in the slot the daemon's limit set gives it (0: the
    /// limit's built-in default, or none).
    pub limits: [u64; LIMIT_SLOTS],
}

/// Slots for limits in an [`AnalysisEntry`]: more than there are, so that a new limit
/// takes a free one and the pinned layout stays.
pub const LIMIT_SLOTS: usize = 16;

/// A registered root and the process that launched it: if that one is gone after a
/// restart, the root was orphaned while the daemon was down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RootEntry {
    pub analysis: u64,
    pub start_ns: u64,
    pub parent_start_ns: u64,
    pub parent_pid: u32,
    pub _pad: u32,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A watched process created a new process (not a thread); the child is already in
    /// [`WATCHED_MAP`] when this is sent, unless the event says [`FORK_UNTRACKED`].
    Fork = 1,
    /// The last thread of a watched process exited; it has been removed from the map.
    Exit = 2,
    /// A watched process called execve: `comm` is its new name.
    Exec = 3,
    /// A watched process' RSS crossed its limit, or moved by `Config::rss_step` since
    /// the last report: `value` is its RSS in bytes.
    Rss = 4,
    /// The RSS summed over an analysis' processes ([`TREE_RSS_MAP`]) moved by
    /// `Config::rss_step` since the last report: `value` is the sum in bytes, `pid` the
    /// process whose change moved it.
    TreeRss = 5,
    /// A watched process crossed its per-process memory limit in its own context and
    /// the kernel sent it SIGTERM ([`STRIKE_MEMORY`]; its [`KILLS_MAP`] entry says so):
    /// `value` is its RSS in bytes, `start_ns` its start time.
    Struck = 6,
    /// A fork of a member was refused ([`STRIKE_FORKS`]), the first of a burst: `value`
    /// is the analysis' refusals so far ([`Members::refused`]), `pid` the forking
    /// process.
    Refused = 7,
}

impl EventKind {
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Fork),
            2 => Some(Self::Exit),
            3 => Some(Self::Exec),
            4 => Some(Self::Rss),
            5 => Some(Self::TreeRss),
            6 => Some(Self::Struck),
            7 => Some(Self::Refused),
            _ => None,
        }
    }
}

/// One record of the RSS iterator (`iter/task`): a watched process and its RSS now.
/// The reconcile poll reads all of them in one `read` of the pinned iterator.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RssSample {
    pub pid: u32,
    pub _pad: u32,
    /// CLOCK_BOOTTIME ns: with the pid, the process' identity.
    pub start_ns: u64,
    pub rss_bytes: u64,
}

/// Name of the iterator program (and of its pinned link).
pub const RSS_ITER: &str = "rss_iter";

/// Name of the descendants iterator: every living descendant of the process in
/// [`WALK_TARGET_MAP`], as [`ProcRecord`]s. Registration reads it instead of /proc.
pub const DESCENDANTS_ITER: &str = "descendants_iter";
/// Name of the one-entry array naming the root whose descendants the iterator lists.
pub const WALK_TARGET_MAP: &str = "WALK_TARGET";

/// Key 0 of [`WALK_TARGET_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkTarget {
    pub pid: u32,
    pub _pad: u32,
    /// The root's start time rounded down to what /proc can tell (clock ticks): a
    /// descendant and all its ancestors up to the root started after it.
    pub start_ns: u64,
}

/// One process found by the descendants iterator.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcRecord {
    pub pid: u32,
    pub ppid: u32,
    pub start_ns: u64,
    pub comm: [u8; 16],
}

/// Name of the one-entry array holding the daemon's [`PidNs`], written before the
/// programs are attached and pinned with them: the programs of a daemon in a PID
/// namespace other than the initial one read its level from here, and a restarted
/// daemon resumes pinned programs only when they report pids of its own namespace.
pub const PID_NS_MAP: &str = "PID_NS";

/// Name of the task iterator that tells the daemon its own PID namespace as the kernel
/// sees it: the level, which userspace inside a namespace cannot learn.
pub const PIDNS_ITER: &str = "pidns_iter";

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO`), the same on every
/// kernel: a daemon whose `/proc/self/ns/pid` has it sees the kernel's own pids.
pub const INITIAL_PID_NS_INUM: u32 = 0xEFFF_FFFC;

/// A PID namespace: its depth below the initial one (0 for the initial one) and its
/// inode number (`/proc/PID/ns/pid`). Key 0 of [`PID_NS_MAP`], and the one record
/// of [`PIDNS_ITER`] (the namespace of the task reading it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidNs {
    pub level: u32,
    pub inum: u32,
}

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// tgid of the process the event is about (the child for a fork).
    pub pid: u32,
    /// tgid of its parent (fork only; 0 otherwise).
    pub ppid: u32,
    /// Exit: the wait status (`exit_code` of the task: code << 8 | signal).
    pub exit_status: i32,
    pub analysis: u64,
    /// CLOCK_BOOTTIME of the event, ns.
    pub ts_ns: u64,
    /// Fork, exit and struck: the process' start time (CLOCK_BOOTTIME, ns): with the pid, the
    /// identity of the process that survives PID reuse.
    pub start_ns: u64,
    /// Rss and Struck: bytes. Fork: [`FORK_UNTRACKED`] when the child is not in the map, with
    /// [`FORK_LAUNCHED`] when its parent is a launcher.
    pub value: u64,
    pub comm: [u8; 16],
}

/// Where the fields the programs read live in this kernel's structs. The daemon reads
/// these from the running kernel's BTF at load time: nothing is baked in at build time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_exit_code: u32,
    pub task_start_boottime: u32,
    pub task_signal: u32,
    pub task_group_leader: u32,
    pub signal_live: u32,
    /// 1 when this kernel's `sched_process_exit` passes `group_dead` as its second
    /// argument; otherwise the programs read `task->signal->live` instead.
    pub exit_has_group_dead: u32,
    /// Memory fast path (kmem:rss_stat); `rss_enabled` is 0 where this kernel's
    /// `mm_struct.rss_stat` has a layout the programs cannot read.
    pub rss_enabled: u32,
    pub task_mm: u32,
    /// The counters of an address space: `mm_rss_counters` is where the first one
    /// starts in `mm_struct`, each `rss_counter_size` bytes long with its s64 value
    /// `rss_counter_value` bytes in (a `percpu_counter`'s `count` from 6.2, an
    /// `atomic_long_t` of `struct mm_rss_stat` before).
    pub mm_rss_counters: u32,
    pub rss_counter_size: u32,
    pub rss_counter_value: u32,
    /// Indices of MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES: together, the RSS.
    pub mm_filepages: u32,
    pub mm_anonpages: u32,
    pub mm_shmempages: u32,
    pub page_size: u64,
    /// Report an RSS change once it moves by this many bytes (tree sums use these).
    pub rss_step: u64,
    /// `task_struct.children`: an exiting process with children wakes the daemon at
    /// once (they may be orphans), one without does not.
    pub task_children: u32,
    /// `task_struct.exit_state`: non-zero once a process is a zombie.
    pub task_exit_state: u32,
    /// `task_struct.comm`, for the descendants iterator's records.
    pub task_comm: u32,
    /// `mm_struct.owner` (kernels with memory cgroups), or 0: an RSS change made by
    /// another task (`process_vm_writev`, ptrace, reclaim) is charged to the owner of
    /// the address space it changed. Without it such changes wait for the poll.
    pub mm_owner: u32,
    /// Unread bytes in the ring past which every event wakes the daemon: events that
    /// can wait are batched, but never so many that the ring could fill.
    pub wake_watermark: u64,
    /// 1 when the daemon runs in a PID namespace other than the initial one: the
    /// programs then report each process by its pid in that namespace ([`PID_NS_MAP`]
    /// names it) and skip processes outside it. 0: the kernel's own pids, as read.
    pub in_pid_ns: u32,
    /// `task_struct.thread_pid`, `pid.level`, `pid.numbers`, `sizeof(struct upid)`,
    /// `upid.nr`, `upid.ns` and `pid_namespace.ns.inum`: what the kernel's
    /// `pid_nr_ns()` reads. Only read with `in_pid_ns`.
    pub task_thread_pid: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_nr: u32,
    pub upid_ns: u32,
    pub pidns_inum: u32,
    /// The length of /proc's clock tick, ns: the start times the daemon writes are
    /// whole ticks, so a launcher's is compared with the kernel's at that precision.
    pub ns_per_tick: u64,
    /// `mm_struct.arg_start` and `arg_end` (0: not found): where a process' command
    /// line lies in its memory, kept by the memory strike for the record.
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
}

impl Config {
    /// What the object file holds until the daemon overrides it at load time.
    pub const UNSET: Self = Self {
        task_pid: 0,
        task_tgid: 0,
        task_real_parent: 0,
        task_exit_code: 0,
        task_start_boottime: 0,
        task_signal: 0,
        task_group_leader: 0,
        signal_live: 0,
        exit_has_group_dead: 0,
        rss_enabled: 0,
        task_mm: 0,
        mm_rss_counters: 0,
        rss_counter_size: 0,
        rss_counter_value: 0,
        mm_filepages: 0,
        mm_anonpages: 0,
        mm_shmempages: 0,
        page_size: 0,
        rss_step: 0,
        task_children: 0,
        task_exit_state: 0,
        task_comm: 0,
        mm_owner: 0,
        wake_watermark: 0,
        in_pid_ns: 0,
        task_thread_pid: 0,
        pid_level: 0,
        pid_numbers: 0,
        upid_size: 0,
        upid_nr: 0,
        upid_ns: 0,
        pidns_inum: 0,
        ns_per_tick: 0,
        mm_arg_start: 0,
        mm_arg_end: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data with no padding-sensitive invariants and no pointers.
    unsafe impl aya::Pod for super::WatchEntry {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::AnalysisEntry {}
    unsafe impl aya::Pod for super::RootEntry {}
    unsafe impl aya::Pod for super::RssSample {}
    unsafe impl aya::Pod for super::WalkTarget {}
    unsafe impl aya::Pod for super::ProcRecord {}
    unsafe impl aya::Pod for super::PidNs {}
    unsafe impl aya::Pod for super::TreeRss {}
    unsafe impl aya::Pod for super::KillProgress {}
    unsafe impl aya::Pod for super::Members {}
    unsafe impl aya::Pod for super::ForkLimit {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_of_exactly_the_limit_leaves_the_crossing_to_the_next_one_over_it() {
        assert!(!goes_over(100, 90, 100));
        assert!(goes_over(101, 100, 100), "after a report at the limit");
        assert!(goes_over(101, 90, 100));
        assert!(!goes_over(102, 101, 100), "reported over it already");
        assert!(!goes_over(1 << 40, 0, 0), "no limit");
    }

    #[test]
    fn a_fork_is_past_the_limit_when_its_reservation_makes_one_more_than_max() {
        assert!(!past_limit(10, 0, 10));
        assert!(past_limit(11, 0, 10));
        assert!(!past_limit(7, 3, 10), "the daemon's part counts too");
        assert!(past_limit(8, 3, 10));
        assert!(
            !past_limit(12u64.wrapping_neg().wrapping_add(20), 2, 10),
            "a negative kernel part: its exits of processes the daemon put in"
        );
        assert!(!past_limit(1 << 20, 0, 0), "no limit");
    }

    #[test]
    fn a_warning_comes_at_its_level_once() {
        assert!(reaches(100, 90, 100));
        assert!(!reaches(101, 100, 100));
        assert!(!reaches(99, 0, 100));
        assert!(!reaches(1 << 40, 0, 0), "no level");
    }
}
