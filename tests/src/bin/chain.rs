//! `chain N`: a chain of N + 1 processes, each the parent of the next, for the deep-tree
//! tests. This process stays outside it as a child subreaper that reaps every member
//! as it dies (here PID 1 never reaps), and exits once none is left.
//!
//! Prints `root PID` (the chain's first process, the one to register), then `ready PID`
//! once the deepest one runs. Every member waits in `pause()` until it is killed.

use std::io::Write;

use nix::{
    sys::wait::wait,
    unistd::{ForkResult, fork, pause},
};

fn main() {
    let depth: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("usage: chain N");
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        set,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: single-threaded here; the child only forks, writes and pauses.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => grow(depth),
        ForkResult::Parent { child } => {
            say(&format!("root {child}\n"));
            while wait().is_ok() {}
        }
    }
}

/// Forks `left` more levels below this process, then pauses; the deepest says so.
fn grow(left: u32) -> ! {
    for _ in 0..left {
        // SAFETY: as above, every member is single-threaded.
        if let ForkResult::Parent { .. } = unsafe { fork() }.expect("fork") {
            park();
        }
    }
    say(&format!("ready {}\n", std::process::id()));
    park()
}

fn park() -> ! {
    loop {
        pause();
    }
}

/// One write, so lines from different members never interleave.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).expect("stdout");
    out.flush().expect("stdout");
}
