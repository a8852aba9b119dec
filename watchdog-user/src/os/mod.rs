//! The operating system's edge: what /proc says of processes, pidfds to signal them,
//! facts of the host, the daemon's supervised tasks and its word to systemd.

pub mod host;
pub mod pidfd;
pub mod private;
pub mod procs;
pub mod shmem;
pub mod supervise;
pub mod tasks;
