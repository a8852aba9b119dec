//! Why a request was not carried out, as a stable kind that clients branch on, beside
//! the one-line message people read. The kind is chosen where the error is made; the
//! message never has to be parsed.

use serde::{Deserialize, Serialize};

/// The kinds an error response carries (`"kind"` beside `"error"` on the wire).
///
/// For client writers: a request the daemon does not carry out is answered with one
/// line, `{"error": "<message>", "kind": "<kind>"}`, the kind one of the snake_case
/// names below. Branch on the kind, never on the message: the message is for people
/// and may be reworded. Treat a kind you do not know as `internal`, a failure that is
/// not the request's; `no_daemon` is for clients to say themselves, when they cannot
/// connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong: malformed, too long, a bad value, an empty or
    /// over-long id, a limit that can never be reached. Fix the request.
    BadRequest,
    /// What the request names does not exist: a pid that is not watched, an analysis
    /// that is not watched, a process that does not exist or exited meanwhile.
    NotFound,
    /// A rule says no: another user's process or analysis, something only root and the
    /// admin group may do, a process the watchdog never touches (init, itself, a kernel
    /// thread), a process already watched by another analysis.
    Refused,
    /// The daemon cannot do it now: it is shutting down, the kernel map or the database
    /// is unavailable. Nothing is wrong with the request; it may be tried again.
    Unavailable,
    /// No daemon could be reached at the socket (said by clients, never by the daemon).
    NoDaemon,
    /// A fault inside the daemon that no request can cause.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::Refused => "refused",
            Self::Unavailable => "unavailable",
            Self::NoDaemon => "no_daemon",
            Self::Internal => "internal",
        }
    }
}

/// An error of a known kind. Carried inside `anyhow::Error` through the core and the
/// edges; the response takes its kind from the first one in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Refused, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The kind of `err`: that of the first typed [`Error`] in its chain (context added
/// around it keeps its kind), else `fallback`.
pub fn kind_of(err: &anyhow::Error, fallback: ErrorKind) -> ErrorKind {
    err.chain()
        .find_map(|e| e.downcast_ref::<Error>())
        .map_or(fallback, |e| e.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_survives_context_and_untyped_errors_take_the_fallback() {
        let typed =
            anyhow::Error::new(Error::not_found("pid 7 is not watched")).context("unregistering");
        assert_eq!(kind_of(&typed, ErrorKind::Internal), ErrorKind::NotFound);
        assert_eq!(format!("{typed:#}"), "unregistering: pid 7 is not watched");
        let untyped = anyhow::anyhow!("the map is full");
        assert_eq!(
            kind_of(&untyped, ErrorKind::Unavailable),
            ErrorKind::Unavailable
        );
        assert_eq!(
            serde_json::to_string(&ErrorKind::BadRequest).unwrap(),
            "\"bad_request\""
        );
    }
}
