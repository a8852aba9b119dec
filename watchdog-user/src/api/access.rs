//! Who is calling, and who may call at all: the peer credentials of each control
//! connection (SO_PEERCRED and SO_PEERGROUPS, read once when it is accepted) and the
//! socket's group. What each caller may do is decided by the rules core
//! (`Core::check_register`, `Core::unregister`, `Core::is_admin`), without I/O.

use std::{os::fd::AsRawFd as _, path::Path};

use nix::unistd::{Gid, Group, Uid, chown};

use crate::vocab::peer::Peer;

/// Reads the credentials of the process that connected `stream`. A connection whose
/// credentials cannot be read is served as one that has none (reads only).
pub fn peer_of(stream: &tokio::net::UnixStream) -> Peer {
    match stream.peer_cred() {
        Ok(cred) => {
            let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
            let groups = peer_groups(stream.as_raw_fd())
                .or_else(|| pid.and_then(proc_groups))
                .unwrap_or_default();
            Peer {
                pid,
                uid: cred.uid(),
                gid: cred.gid(),
                groups,
            }
        }
        Err(err) => {
            tracing::warn!(
                "cannot read the credentials of a control connection ({err}): it may only read"
            );
            Peer::http()
        }
    }
}

/// The peer's supplementary groups from SO_PEERGROUPS (Linux 4.13+): those it had
/// when it connected, read from the socket, so no pid can be recycled in between.
fn peer_groups(fd: std::os::fd::RawFd) -> Option<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at most that and
        // says how many it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Some(groups);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || count <= groups.len()
        {
            return None;
        }
        groups.resize(count, 0);
    }
}

/// The "Groups:" line of /proc/PID/status: the fallback where SO_PEERGROUPS is missing.
fn proc_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The gid of group `name`, None when there is no such group.
pub fn group_gid(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The name of group `gid`, for messages.
pub fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// Gives the socket to root and group `group` (mode 0660, set at bind), so the group's
/// members may connect; its messages name it `shown_as` (where clients will find it). Where the group does not exist (or cannot be given), the socket
/// stays root's alone: the warning, one line naming the fix, is returned.
pub fn share_socket(socket: &Path, shown_as: &Path, group: &str) -> Result<u32, String> {
    let Some(gid) = group_gid(group) else {
        return Err(format!(
            "the socket group {group:?} does not exist: {} stays root-only (root:root, mode \
             0660), so only root can use the watchdog; create it (`groupadd --system {group}`, \
             then `usermod -aG {group} USER` for each user) and restart, or pass \
             --socket-group with an existing group",
            shown_as.display()
        ));
    };
    match chown(socket, Some(Uid::from_raw(0)), Some(Gid::from_raw(gid))) {
        Ok(()) => Ok(gid),
        Err(err) => Err(format!(
            "cannot give {} to group {group:?} ({err}): it stays root-only; run the daemon \
             as root with CAP_CHOWN",
            shown_as.display()
        )),
    }
}
