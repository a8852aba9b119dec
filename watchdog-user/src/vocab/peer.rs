//! Who is asking: the credentials of a caller, as the kernel gave them when it
//! connected. What each caller may do is decided by the rules core, without I/O.

/// The credentials of the process at the other end of a control connection, as the
/// kernel gave them when it connected (they cannot be forged by what it sends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its pid at connect time, when the kernel knows it.
    pub pid: Option<u32>,
    /// Its effective uid at connect time: the owner of what it asks for.
    pub uid: u32,
    /// Its effective gid and its supplementary groups.
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The uid no process has (the kernel's `(uid_t)-1`): callers that are not a process.
pub const NO_UID: u32 = u32::MAX;

impl Peer {
    /// Root, for the rules' tests and for the daemon's own calls.
    pub fn root() -> Self {
        Self {
            pid: None,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// A plain user, for the rules' tests.
    pub fn user(uid: u32, groups: &[u32]) -> Self {
        Self {
            pid: None,
            uid,
            gid: uid,
            groups: groups.to_vec(),
        }
    }

    /// The HTTP listener's requests: no process, no uid; it may read, nothing more.
    pub fn http() -> Self {
        Self {
            pid: None,
            uid: NO_UID,
            gid: NO_UID,
            groups: Vec::new(),
        }
    }

    /// Whether it is in group `gid` (as its effective or a supplementary group).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}
