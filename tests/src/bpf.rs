//! Just enough of the bpf(2) syscall for tests to tamper with a daemon's pinned state
//! (make a map of any shape and pin it, or rewrite a value), without bpftool.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `union bpf_attr`, as bytes: each command fills the fields it reads, the rest is 0.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn call(&mut self, cmd: libc::c_long, what: &str) -> Result<libc::c_long> {
        // SAFETY: bpf(2) reads (and for some commands writes) at most `size` bytes of
        // the attr, which lives for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_uint,
            )
        };
        if rc < 0 {
            bail!("bpf({what}): {}", std::io::Error::last_os_error());
        }
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Creates a map of this shape, named `name`.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, map_type)
        .put_u32(4, key_size)
        .put_u32(8, value_size)
        .put_u32(12, max_entries);
    // map_name: 16 bytes at offset 28 (after map_flags, inner_map_fd, numa_node).
    let bytes = name.as_bytes();
    let len = bytes.len().min(15);
    attr.0[28..28 + len].copy_from_slice(&bytes[..len]);
    Ok(owned(attr.call(BPF_MAP_CREATE, "BPF_MAP_CREATE")?))
}

fn c_path(path: &Path) -> Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

/// Pins `fd` at `path` (on bpffs).
pub fn pin(fd: &OwnedFd, path: &Path) -> Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64)
        .put_u32(8, fd.as_raw_fd() as u32);
    attr.call(BPF_OBJ_PIN, "BPF_OBJ_PIN").map(drop)
}

/// Opens what is pinned at `path`.
pub fn open_pinned(path: &Path) -> Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64);
    Ok(owned(attr.call(BPF_OBJ_GET, "BPF_OBJ_GET")?))
}

/// Sets `key` to `value` in the map `fd`.
pub fn update(fd: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_ptr() as u64);
    attr.call(BPF_MAP_UPDATE_ELEM, "BPF_MAP_UPDATE_ELEM")
        .map(drop)
}

/// Replaces the map pinned at `path` with a new one of this shape and name: the old
/// pin goes, so whatever still uses the old map (attached programs) keeps it.
pub fn replace_pinned_map(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> Result<()> {
    std::fs::remove_file(path)?;
    let fd = create_map(map_type, key_size, value_size, max_entries, name)?;
    pin(&fd, path)
}
