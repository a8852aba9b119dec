//! What /proc says about processes: the check that a PID still names the same
//! process, and what a kill record tells of it. The rules read /proc only through the
//! [`Procs`] trait, so they can be tested against a fake one.

use watchdog_common::ProcRecord;

use crate::{
    core::procs::{Details, ProcInfo, Procs},
    vocab::process::{ns_per_tick, same_start},
};

/// PF_KTHREAD in `/proc/PID/stat` flags: kernel threads are never watched.
const PF_KTHREAD: u32 = 0x0020_0000;

/// The inode number of this process' PID namespace (`/proc/self/ns/pid`): the pids it
/// sees, in /proc, pidfds and its peers' credentials, are that namespace's.
pub fn own_pid_ns() -> anyhow::Result<u32> {
    use anyhow::Context as _;
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata("/proc/self/ns/pid")
        .context("reading /proc/self/ns/pid to learn the daemon's PID namespace")?
        .ino();
    u32::try_from(inode).context("/proc/self/ns/pid has an inode number wider than 32 bits")
}

fn info_from(stat: procfs::process::Stat) -> ProcInfo {
    ProcInfo {
        pid: stat.pid as u32,
        ppid: stat.ppid as u32,
        start_ns: stat.starttime * ns_per_tick(),
        comm: stat.comm,
        kernel_thread: stat.flags & PF_KTHREAD != 0,
        exited: matches!(stat.state, 'Z' | 'X' | 'x'),
    }
}

/// The process with this pid, if one lives (zombies count as exited).
pub fn read(pid: u32) -> Option<ProcInfo> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some(info_from(stat)).filter(|p| !p.exited)
}

/// `process`, if it still lives under its pid: None when it is gone or the pid was
/// recycled.
pub fn read_same(process: crate::vocab::process::ProcRef) -> Option<ProcInfo> {
    read(process.pid).filter(|p| same_start(p.start_ns, process.start_ns))
}

/// The living descendants of `root`, by scanning all of /proc: the fallback for
/// kernels without task iterators (it costs what the host has, not the analysis).
pub fn descendants_by_scan(root: u32) -> Vec<ProcRecord> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let living = all
        .filter_map(|p| p.ok()?.stat().ok())
        .map(info_from)
        .filter(|p| !p.exited && !p.kernel_thread)
        .map(|p| ProcRecord {
            pid: p.pid,
            ppid: p.ppid,
            start_ns: p.start_ns,
            comm: crate::vocab::process::Comm::new(&p.comm).0,
        })
        .collect();
    descendants_among(root, living)
}

/// Those of `processes` whose parents lead to `root`, at any depth, parents before
/// their children.
pub fn descendants_among(root: u32, processes: Vec<ProcRecord>) -> Vec<ProcRecord> {
    let mut children: std::collections::HashMap<u32, Vec<ProcRecord>> = Default::default();
    for p in processes {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for child in children.remove(&pid).into_iter().flatten() {
            stack.push(child.pid);
            out.push(child);
        }
    }
    out
}

/// Resident set size now, 0 when the process is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .map(|p| resident_bytes(&p))
        .unwrap_or(0)
}

/// Resident set size through an open /proc/PID handle, 0 when it cannot be read.
fn resident_bytes(process: &procfs::process::Process) -> u64 {
    process
        .statm()
        .map(|m| m.resident * procfs::page_size())
        .unwrap_or(0)
}

/// The real /proc.
pub struct SysProcs;

impl Procs for SysProcs {
    fn read(&self, pid: u32) -> Option<ProcInfo> {
        read(pid)
    }

    fn details(&self, process: crate::vocab::process::ProcRef) -> Details {
        details(process).unwrap_or_default()
    }

    fn rss_bytes(&self, pid: u32) -> u64 {
        rss_bytes(pid)
    }

    fn uids(&self, process: crate::vocab::process::ProcRef) -> Option<crate::vocab::process::Uids> {
        uids(process)
    }

    fn pss_bytes(&self, pid: u32) -> Option<u64> {
        pss_bytes(pid)
    }

    fn unreaped(&self, process: crate::vocab::process::ProcRef) -> Option<u32> {
        unreaped(process)
    }

    fn children(&self, pid: u32) -> Option<std::collections::HashSet<u32>> {
        children(pid)
    }

    fn shm_file_bytes(&self, file: &crate::core::procs::ShmFile) -> Option<u64> {
        crate::os::shmem::file_bytes(file)
    }
}

/// `/proc/PID/task/*/children`: each thread's children (a child belongs to the thread
/// that forked it). None when unreadable (a kernel without CONFIG_PROC_CHILDREN).
pub fn children(pid: u32) -> Option<std::collections::HashSet<u32>> {
    let mut out = std::collections::HashSet::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let listed = std::fs::read_to_string(task.path().join("children")).ok()?;
        out.extend(
            listed
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    Some(out)
}

/// The parent of `process` while its pid still names it, in any state: for a process
/// whose exit the kernel reported, that means not reaped yet.
pub fn unreaped(process: crate::vocab::process::ProcRef) -> Option<u32> {
    let stat = procfs::process::Process::new(process.pid as i32)
        .ok()?
        .stat()
        .ok()?;
    let info = info_from(stat);
    same_start(info.start_ns, process.start_ns).then_some(info.ppid)
}

/// The uids of `process`, None when it is gone or its pid was recycled. Both reads go
/// through one handle on its /proc directory, which stays bound to the process it was
/// opened on: the uids read are those of the process whose start time was checked.
pub fn uids(process: crate::vocab::process::ProcRef) -> Option<crate::vocab::process::Uids> {
    let handle = procfs::process::Process::new(process.pid as i32).ok()?;
    let info = info_from(handle.stat().ok()?);
    if info.exited || !same_start(info.start_ns, process.start_ns) {
        return None;
    }
    let status = handle.status().ok()?;
    Some(crate::vocab::process::Uids {
        real: status.ruid,
        effective: status.euid,
        saved: status.suid,
    })
}

/// PSS from /proc/PID/smaps_rollup (kernel 4.14+): one file, summed by the kernel over
/// the address space. Costs a walk of the process' page tables: see BENCHMARKS.md.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The tmpfs files `process` holds now ([`crate::os::shmem::held`]), None when it
/// holds none, is gone, or its pid was recycled during the read.
pub fn held(
    process: crate::vocab::process::ProcRef,
    devices: &mut crate::os::shmem::Devices,
) -> Option<crate::core::procs::Held> {
    let held = crate::os::shmem::held(process.pid, devices)?;
    // Read after the scan: a pid recycled during it has another start time now.
    read_same(process)?;
    Some(held)
}

/// At most [`CMDLINE_MAX`](crate::vocab::record::CMDLINE_MAX) + 1 bytes of `path`: a
/// command line of any length costs one bounded read.
fn bounded_read(file: std::fs::File) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    file.take(crate::vocab::record::CMDLINE_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

/// What a record tells of `process` (command line, owner, RSS), or None when its pid
/// names another process now. Everything is read through one handle on /proc/PID,
/// checked to be `process` by its start time: the handle is bound to that process, not
/// to its pid number, so once it exits every read through it fails rather than return
/// what a newcomer under the same pid holds.
pub fn details(process: crate::vocab::process::ProcRef) -> Option<Details> {
    let handle = procfs::process::Process::new(process.pid as i32).ok()?;
    let started = info_from(handle.stat().ok()?).start_ns;
    if !same_start(started, process.start_ns) {
        return None;
    }
    let cmdline = handle
        .open_relative("cmdline")
        .ok()
        .and_then(bounded_read)
        .map(|bytes| crate::vocab::record::bounded_cmdline(&bytes))
        .unwrap_or_default();
    Some(Details {
        cmdline,
        uid: handle.uid().ok()?,
        rss_bytes: resident_bytes(&handle),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, ppid: u32) -> ProcRecord {
        ProcRecord {
            pid,
            ppid,
            ..Default::default()
        }
    }

    #[test]
    fn a_recycled_pid_holds_no_tmpfs_file() {
        let _file = crate::os::shmem::tests::memfd(1 << 20);
        let me = read(std::process::id()).expect("this process").proc_ref();
        let devices = &mut crate::os::shmem::Devices::default();
        assert!(held(me, devices).is_some());
        let later = crate::vocab::process::ProcRef {
            start_ns: me.start_ns + 10_000_000_000,
            ..me
        };
        assert!(held(later, devices).is_none());
    }

    #[test]
    fn details_are_read_only_for_the_process_whose_start_time_is_given() {
        let me = read(std::process::id()).expect("this process");
        let mine = details(me.proc_ref()).expect("described");
        let argv0 = std::env::args().next().unwrap();
        assert!(mine.cmdline.starts_with(&argv0), "{mine:?}");
        assert_eq!(mine.uid, nix::unistd::geteuid().as_raw());
        let later = crate::vocab::process::ProcRef {
            start_ns: me.start_ns + 10_000_000_000,
            ..me.proc_ref()
        };
        assert!(
            details(later).is_none(),
            "another process under the same pid"
        );
    }

    #[test]
    fn descendants_are_found_at_any_depth_and_strangers_left_out() {
        let chain = (2..10_002).map(|pid| record(pid, pid - 1));
        let strangers = [record(20_000, 40_000), record(20_001, 20_000)];
        let branch = record(30_000, 7);
        // The kernel lists tasks in pid order, not parents first: mix them.
        let mut all: Vec<ProcRecord> = chain.chain(strangers).chain([branch]).collect();
        all.reverse();
        let found = descendants_among(1, all);
        assert_eq!(
            found.len(),
            10_000 + 1,
            "the chain and its branch, no stranger"
        );
        let under_7 = descendants_among(7, found.clone());
        assert_eq!(
            under_7.len(),
            10_001 - 7 + 1,
            "pids 8..=10001 and the branch"
        );
        let position = |pid| found.iter().position(|r| r.pid == pid).unwrap();
        assert!(
            position(5_000) < position(5_001),
            "parents before their children"
        );
    }

    #[test]
    fn a_cycle_of_recycled_pids_ends_the_walk() {
        let found = descendants_among(1, vec![record(2, 1), record(3, 2), record(2, 3)]);
        assert_eq!(found.len(), 3, "each record once, then the walk ends");
    }
}
