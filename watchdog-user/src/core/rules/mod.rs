//! The rule families, one file each. Those with state of their own (memory, orphans,
//! zombies, forks) keep it in a struct beside the shared [`World`](super::world::World)
//! they are handed; the others (timeouts, warnings, access) and the kill machinery
//! every rule ends in (kills) act on the world alone.

pub mod access;
pub mod forks;
pub mod kills;
pub mod memory;
pub mod orphans;
pub mod timeouts;
pub mod warnings;
pub mod zombies;
