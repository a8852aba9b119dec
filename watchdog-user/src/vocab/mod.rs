//! The vocabulary every stage shares, with no behaviour of its own beyond parsing and
//! formatting: it imports nothing else of the crate.

pub mod error;
pub mod kernel;
pub mod limits;
pub mod peer;
pub mod process;
pub mod record;
pub mod units;
