//! The watchdog daemon and its CLI, as a library: the binary, the end-to-end tests and
//! the benchmarks all use these same types.
//!
//! The folders are the stages, and imports go one way, down this list (a check in the
//! test suite, `layout_check`, keeps it so):
//! - [`vocab`]: what everything names: process identity, limits, units, records, callers.
//! - [`core`]: the rules, sans I/O: fed events, requests and the clock, it returns
//!   actions.
//! - the edges, beside the core: [`os`] (/proc, pidfds, tasks, systemd), [`kernel`]
//!   (the eBPF programs, their maps and ring), [`store`] (spool and database), [`api`]
//!   (the socket's typed protocol, the control socket, HTTP).
//! - [`app`]: the daemon's wiring: its loop, the effects that carry out the core's
//!   actions, its settings.
//! - [`cli`]: the command line.

pub mod vocab;

pub mod core;

pub mod os;

pub mod kernel;

pub mod store;

pub mod api;

pub mod app;

pub mod cli;

#[cfg(test)]
mod layout_check;
