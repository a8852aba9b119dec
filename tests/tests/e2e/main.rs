//! The end-to-end suite as one test binary: one link of sqlx, axum and aya instead of
//! one per area. Its tests run side by side on threads of this one process, so nothing
//! here may change what the process shares (environment, working directory, umask,
//! signal dispositions) without serializing it; each module is one area of the product.

mod access;
mod bad_input;
mod cli_pipe;
mod dashboard;
mod enforce;
mod exec;
mod fail_closed;
mod faults;
mod kernels;
mod memory_reach;
mod orphans;
mod page;
mod persist;
mod protocol_bounds;
mod recover;
mod refuse;
mod shared_pages;
mod shmem;
mod strike;
mod supervise;
mod systemd;
mod tree;
mod warnings;
mod zombies;
