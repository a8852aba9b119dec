//! `exec`: runs a command watched from its first instruction, waits for all of its
//! analysis to be gone, and says how the watchdog ended it.

use std::{
    ffi::CString,
    path::Path,
    sync::atomic::{AtomicI32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::{
    fcntl::OFlag,
    sys::{
        signal::{SigHandler, Signal, kill, signal},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, execvp, fork, pipe2, read, write},
};

use crate::{
    api::{
        client::call,
        protocol::{Reply, Request},
    },
    core::runs::RunKill,
    vocab::limits::{LimitOverrides, Reason},
};

/// The child being run by `exec`, for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signo: i32) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0
        && let Ok(sig) = Signal::try_from(signo)
    {
        let _ = kill(Pid::from_raw(child), sig);
    }
}

/// Forks; the child waits on a pipe until the daemon has registered it, and only then
/// execs CMD: so CMD's very first fork already happens watched. Returns once CMD and
/// everything of its run are gone and the records stored, with CMD's exit status
/// (128 + the signal when it was killed, as shells do), or 128 + the last signal the
/// watchdog sent CMD when the watchdog killed it; each kill the watchdog made in the
/// run is one line on stderr.
pub fn exec(
    socket: &Path,
    analysis_id: String,
    limits: LimitOverrides,
    command: &[String],
) -> Result<i32> {
    let argv = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("the command contains a NUL byte")?;
    let (child, gate) = fork_held(&argv, &command[0])?;
    let registered = call(
        socket,
        &Request::Register {
            pid: child.as_raw() as u32,
            analysis_id: analysis_id.clone(),
            limits,
            // Forked just now and waiting on our pipe: it has no descendants to find.
            fresh: true,
        },
    );
    let run = match registered {
        Ok(Reply::Registered { run, .. }) => run,
        other => {
            drop(gate);
            let _ = waitpid(child, None);
            return Err(match other {
                Err(err) => err,
                Ok(reply) => anyhow::anyhow!("unexpected reply from the daemon: {reply:?}"),
            });
        }
    };
    forward_signals_to(child)?;
    write(&gate, b"x").context("releasing the command")?;
    drop(gate);
    let status = exit_status_of(child)?;
    match call(socket, &Request::Wait { run }) {
        Ok(Reply::Ended { kills, .. }) => Ok(said_and_status(
            &analysis_id,
            child.as_raw() as u32,
            &kills,
            status,
        )),
        Ok(reply) => bail!("unexpected reply from the daemon: {reply:?}"),
        Err(err) => {
            eprintln!(
                "watchdog-user: warning: the command exited, but how its analysis \
                 {analysis_id:?} ended is unknown: {err:#}"
            );
            Ok(status)
        }
    }
}

/// Forks a child that waits for a byte on the returned gate before it execs `argv`
/// (and exits 125, running nothing, when the gate closes without one).
fn fork_held(argv: &[CString], name: &str) -> Result<(Pid, std::os::fd::OwnedFd)> {
    let (gate_read, gate_write) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: this process is single-threaded (the CLI starts no threads), so the child
    // may run ordinary code until it execs.
    match unsafe { fork() }.context("fork failed")? {
        ForkResult::Child => {
            drop(gate_write);
            let mut go = [0u8; 1];
            if !matches!(read(&gate_read, &mut go), Ok(1)) {
                // Registration failed: the parent closed the gate without a byte.
                unsafe { libc::_exit(125) };
            }
            let err = execvp(&argv[0], argv).unwrap_err();
            eprintln!("watchdog-user: error: cannot run {name:?}: {err}");
            let code = if err == nix::errno::Errno::ENOENT {
                127
            } else {
                126
            };
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => Ok((child, gate_write)),
    }
}

/// SIGTERM and SIGHUP go on to `child`; the terminal's SIGINT and SIGQUIT reach it
/// directly.
fn forward_signals_to(child: Pid) -> Result<()> {
    CHILD.store(child.as_raw(), Ordering::Relaxed);
    // SAFETY: the handler only does an atomic load and kill(2), both async-signal-safe.
    unsafe {
        for sig in [Signal::SIGTERM, Signal::SIGHUP] {
            signal(sig, SigHandler::Handler(forward_signal))?;
        }
        // The terminal sends these to the whole foreground group, CMD included.
        signal(Signal::SIGINT, SigHandler::SigIgn)?;
        signal(Signal::SIGQUIT, SigHandler::SigIgn)?;
        // CMD, forked already, keeps the default action, as a shell gives it; here a
        // CMD that died before it was released makes the write to the gate an error,
        // not a silent death.
        signal(Signal::SIGPIPE, SigHandler::SigIgn)?;
    }
    Ok(())
}

/// `child`'s exit code, or 128 + the signal that killed it, as shells say it.
fn exit_status_of(child: Pid) -> Result<i32> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => bail!("waiting for the command failed: {err}"),
        }
    }
}

/// One line on stderr per kill the watchdog made in the run; the exit status: 128 +
/// the last signal the watchdog sent the command, if it killed it, else `status`.
fn said_and_status(analysis_id: &str, command: u32, kills: &[RunKill], status: i32) -> i32 {
    let mut killed_the_command = None;
    for kill in kills {
        let whom = match kill.roots.iter().find(|r| r.pid == command) {
            Some(root) => {
                killed_the_command = root.signal.parse::<Signal>().ok();
                format!("the command ({})", root.signal)
            }
            None if kill.processes == 1 => "1 process".to_string(),
            None => format!("{} processes", kill.processes),
        };
        eprintln!(
            "watchdog-user: the watchdog killed {whom} of analysis {analysis_id:?}: {}",
            why(kill)
        );
    }
    killed_the_command.map_or(status, |signal| 128 + signal as i32)
}

/// What of a memory kill's figure was in tmpfs files, for people.
fn in_tmpfs(kill: &RunKill) -> String {
    if kill.shmem_bytes == 0 {
        return String::new();
    }
    let size = crate::vocab::units::size_rounded(kill.shmem_bytes, false);
    format!(" ({size} of it in memfd or /dev/shm files)")
}

/// The reason of a kill with its limit, for people.
fn why(kill: &RunKill) -> String {
    let size = |b: u64| crate::vocab::units::size_rounded(b, false);
    let limit = kill.limit.unwrap_or(0);
    match kill.reason {
        Reason::Timeout => format!(
            "timeout, its limit of {} passed",
            humantime::format_duration(Duration::from_millis(limit))
        ),
        Reason::Memory => format!(
            "memory, it reached {}{}, over its limit of {} per process",
            size(kill.measured_bytes),
            in_tmpfs(kill),
            size(limit)
        ),
        Reason::TreeMemory => format!(
            "tree_memory, its processes' PSS summed to {}{}, over its limit of {} in all",
            size(kill.measured_bytes),
            in_tmpfs(kill),
            size(limit)
        ),
        Reason::Orphan => "orphan, left running when its parent died".into(),
        Reason::MaxProcesses => format!("max_processes, more than {limit} processes at once"),
        Reason::Zombies => format!("zombies, more than {limit} unreaped children"),
        Reason::MapFull => "map_full, the kernel's map of watched processes was full".into(),
        Reason::Warning => "warning".into(),
    }
}
