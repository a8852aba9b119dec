//! The rule families, one file each, each owning its state and timers.

pub mod zombies;
