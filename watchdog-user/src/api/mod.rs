//! What clients see: the socket's typed protocol, the control socket that serves it,
//! the one dispatch of a request against the core, the replies built from the core's
//! state (`dump-tree`, `status`, the page's overview), and the HTTP listener.

pub mod access;
pub mod client;
pub mod control;
pub mod http;
pub mod overview;
pub mod protocol;
#[cfg(test)]
mod protocol_fuzz;
pub mod report;
pub mod requests;
