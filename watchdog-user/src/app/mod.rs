//! The daemon's wiring: its settings, the loop that feeds every input to the core, the
//! effects that carry out the core's actions on the kernel, processes and the store,
//! and the resumption of analyses over freshly loaded programs.

pub mod config;
pub mod daemon;
pub mod effects;
pub mod resume;
