//! The daemon's stages and the socket's typed protocol, as a library: the binary, the
//! end-to-end tests and the benchmarks all use these same types.

pub mod access;
pub mod btf;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod effects;
pub mod http;
pub mod ingest;
pub mod kernel;
pub mod kill;
pub mod overview;
pub mod pins;
pub mod policy;
pub mod procs;
pub mod protocol;
#[cfg(test)]
mod protocol_fuzz;
pub mod registry;
pub mod report;
pub mod requests;
pub mod rules;
pub mod spool;
pub mod store;
pub mod supervise;
pub mod tasks;
pub mod tree;
pub mod zombies;
