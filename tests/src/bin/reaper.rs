//! `reaper PROGRAM ARGS...`: runs PROGRAM as its child and stays its child subreaper,
//! reaping every process of the tree as it dies (here PID 1 never reaps: an orphan of a
//! fork bomb would stay a zombie for good), and exits once none is left.
//!
//! Prints `root PID` (PROGRAM's pid, the one to register); PROGRAM shares its stdin,
//! stdout and process group.

use std::{io::Write, process::Command};

use nix::sys::wait::wait;

fn main() {
    let mut argv = std::env::args().skip(1);
    let program = argv.next().expect("usage: reaper PROGRAM ARGS...");
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        set,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
    // Reaped with the rest below, by wait().
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&program)
        .args(argv)
        .spawn()
        .unwrap_or_else(|err| panic!("starting {program}: {err}"));
    let mut out = std::io::stdout().lock();
    writeln!(out, "root {}", child.id()).expect("stdout");
    out.flush().expect("stdout");
    drop(out);
    while wait().is_ok() {}
}
