//! Memory growth that no process' own report shows: many processes each growing by
//! less than the report step, and memory another process writes into a watched one.
//! Both are killed from the kernel's reports; the poll is set to an hour, so nothing
//! here can be the poll's doing.

use anyhow::Result;
use watchdog_tests::{Daemon, Reason, Workload, all_nodes, await_state, python};

/// A parent forks argv[1] children; on "go" each child grows by argv[2] KiB. A child
/// of this interpreter holds ~5.6 MiB, ~7.3 MiB once grown by 1.5 MiB: never a step
/// (8 MiB) from the 0 it started at, so none of them ever reports its own RSS. Prints
/// the children's pids once they run, and "grown" once all grew.
const GROWERS: &str = r#"
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

#[test]
fn three_hundred_children_growing_by_less_than_a_report_step_pass_the_tree_limit_and_are_killed()
-> Result<()> {
    const LIMIT: u64 = 300 << 20;
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut work = Workload::python(GROWERS, &["300", "1536"])?;
    daemon.register_with(
        work.pid(),
        "growers",
        &["--tree-memory", "300MiB", "--grace", "1s"],
    )?;
    let mut pids: Vec<u32> = work
        .read_line()?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    await_state("every child in the tree", || {
        Ok((all_nodes(&daemon.tree(Some("growers"))?).len() == 301).then_some(()))
    })?;
    // 301 processes sharing most of their pages: ~1.7 GiB of RSS summed, ~64 MiB of
    // PSS; alive.
    assert_eq!(
        daemon.status()?.kills_total,
        0,
        "nothing killed before the growth"
    );
    work.send("go")?;
    pids.push(work.pid());
    // Grown, the PSS sum is ~525 MiB, and no process has reported a change.
    let records = daemon.await_records_for(&pids)?;
    assert!(
        records
            .iter()
            .all(|r| r.record.reason == Reason::TreeMemory),
        "{:?}",
        records.iter().map(|r| r.record.reason).collect::<Vec<_>>()
    );
    let pss = records[0].record.tree_pss_bytes.unwrap_or(0);
    assert!(pss > LIMIT, "killed at a PSS sum over the limit: {pss}");
    Ok(())
}

/// Maps argv[1] MiB it never touches, prints its pid and the mapping's address.
const TARGET: &str = r#"
import ctypes, mmap, os, sys, time
size = int(sys.argv[1]) << 20
area = mmap.mmap(-1, size)
address = ctypes.addressof(ctypes.c_char.from_buffer(area))
print(os.getpid(), address, flush=True)
time.sleep(600)
"#;

/// Writes argv[3] MiB into process argv[1] at address argv[2] with process_vm_writev,
/// 8 MiB a call, until done or the target is gone.
const WRITER: &str = r#"
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

#[test]
fn memory_another_process_writes_into_a_watched_one_counts_against_its_limit() -> Result<()> {
    const LIMIT: u64 = 200 << 20;
    let daemon = Daemon::builder().arg("--poll-interval", "1h").start()?;
    let mut target = Workload::python(TARGET, &["800"])?;
    let line = target.read_line()?;
    let (pid, address) = line.split_once(' ').unwrap_or_default();
    assert_eq!(pid, target.pid().to_string());
    daemon.register_with(target.pid(), "written", &["--memory", "200MiB"])?;
    // The writer is no member of any analysis: only the target's memory grows.
    let out = std::process::Command::new(python())
        .args(["-c", WRITER, pid, address, "800"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = daemon.await_record_for(target.pid())?;
    assert_eq!(record.record.reason, Reason::Memory);
    assert!(
        record.record.rss_bytes > LIMIT,
        "RSS at the kill {} over {LIMIT}",
        record.record.rss_bytes
    );
    await_state("the writer's victim gone", || {
        Ok((!target.alive_now()).then_some(()))
    })?;
    Ok(())
}
