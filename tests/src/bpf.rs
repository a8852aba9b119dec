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
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

pub const BPF_MAP_TYPE_HASH: u32 = 1;

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

/// A map's type and size, as `struct bpf_map_info` has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The id and shape of the map pinned at `path`.
pub fn map_info(path: &Path) -> Result<(u32, Shape)> {
    let fd = open_pinned(path)?;
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, ...
    let mut info = [0u8; 96];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    attr.call(BPF_OBJ_GET_INFO_BY_FD, "BPF_OBJ_GET_INFO_BY_FD")?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
    let shape = Shape {
        map_type: word(0),
        key_size: word(2),
        value_size: word(3),
        max_entries: word(4),
        flags: word(5),
    };
    Ok((word(1), shape))
}

/// Creates a map of this shape, named `name`.
pub fn create_map(shape: Shape, name: &str) -> Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, shape.map_type)
        .put_u32(4, shape.key_size)
        .put_u32(8, shape.value_size)
        .put_u32(12, shape.max_entries)
        .put_u32(16, shape.flags);
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
pub fn replace_pinned_map(path: &Path, shape: Shape, name: &str) -> Result<()> {
    std::fs::remove_file(path)?;
    let fd = create_map(shape, name)?;
    pin(&fd, path)
}
