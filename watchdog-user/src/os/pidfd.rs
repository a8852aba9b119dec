//! Pidfds: a handle on one process that stays bound to it even if its pid is reused.
//! Every signal the daemon sends goes through one, opened and then checked against the
//! process' start time.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use nix::sys::signal::Signal;

use crate::{core::procs::ProcInfo, vocab::process::ProcRef};

/// A handle on one process that stays bound to it even if its PID is reused.
pub struct PidFd(OwnedFd);

impl std::os::fd::AsRawFd for PidFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Why no pidfd could be had.
#[derive(Debug)]
pub enum OpenError {
    /// The process is gone, or its pid names another process now.
    Gone,
    /// The process may live, but no descriptor could be opened (e.g. EMFILE): it is
    /// not followed this way, and that must be said.
    Failed(std::io::Error),
}

impl PidFd {
    /// Opens `pid` and checks it is still the process that started at `start_ns`.
    pub fn open_verified(process: ProcRef) -> Result<Self, OpenError> {
        Self::open_checked(process, |_| true)
    }

    /// Opens `process` if it is still the one that started at its start time and
    /// `accept` takes what /proc says of it: one read, after the open (had the PID been
    /// recycled before the open, the start time read then is the new process'; after
    /// the open the fd is bound).
    pub fn open_checked(
        process: ProcRef,
        accept: impl Fn(&ProcInfo) -> bool,
    ) -> Result<Self, OpenError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, process.pid as libc::pid_t, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ESRCH) => OpenError::Gone,
                _ => OpenError::Failed(err),
            });
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let pidfd = Self(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        crate::os::procs::read_same(process)
            .filter(|p| accept(p))
            .map(|_| pidfd)
            .ok_or(OpenError::Gone)
    }

    /// Whether the process has exited (its pidfd polls readable).
    pub fn exited(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready != 0
    }

    /// Puts the process' main thread (and so what it forks from now on) at nice 19: a
    /// process being killed yields the CPU to everything else, the daemon first, so a
    /// fork bomb spinning on every core cannot starve the kill it is under; alone on the
    /// machine it runs as fast as before. Only while this pidfd says it lives: its pid
    /// then names it (nice has no pidfd call; a pid is not reused before its process is
    /// reaped). False when it had exited.
    pub fn yield_cpu(&self, pid: u32) -> bool {
        if self.exited() {
            return false;
        }
        // SAFETY: setpriority takes plain integers.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 19) };
        rc == 0
    }

    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}
