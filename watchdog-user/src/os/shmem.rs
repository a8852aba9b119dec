//! Memory outside RSS: the tmpfs files a process holds through its descriptors or its
//! mappings (a memfd, a file in /dev/shm or any tmpfs, a SysV segment, a shared
//! anonymous mapping). Their pages count in no RSS until mapped and touched, and a
//! named one outlives every holder. Read at the reconcile poll, off the loop. Only
//! regular files count: a device node in /dev (devtmpfs) is a tmpfs inode too.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

use nix::sys::statfs::{HUGETLBFS_MAGIC, TMPFS_MAGIC};

use crate::core::procs::{Held, ShmFile};

/// Most files kept by identity per process: beyond them, their bytes are counted for
/// the process alone (never shared with another holder), so that a process holding a
/// million memfds costs a bounded sample and escapes nothing.
pub const FILES_PER_PROCESS: usize = 4096;

/// Devices met in one poll and whether each is a tmpfs: one statfs per device.
#[derive(Default)]
pub struct Devices(HashMap<u64, bool>);

impl Devices {
    /// Whether `dev`, the device of the file `path` leads to, is a tmpfs (or hugetlbfs,
    /// where a hugetlb memfd lives). A statfs that fails (the file went) decides
    /// nothing for the device.
    fn is_tmpfs(&mut self, dev: u64, path: &str) -> bool {
        if let Some(&known) = self.0.get(&dev) {
            return known;
        }
        let Ok(fs) = nix::sys::statfs::statfs(path) else {
            return false;
        };
        let tmpfs = matches!(fs.filesystem_type(), TMPFS_MAGIC | HUGETLBFS_MAGIC);
        self.0.insert(dev, tmpfs);
        tmpfs
    }
}

/// What one process' scan found so far.
#[derive(Default)]
struct Found {
    files: HashMap<(u64, u64), (ShmFile, u64)>,
    more_bytes: u64,
}

impl Found {
    fn has(&self, dev: u64, ino: u64) -> bool {
        self.files.contains_key(&(dev, ino))
    }

    /// The file `link` (a /proc magic link) leads to, named `name` by its holder.
    fn add(&mut self, link: &str, name: Option<&str>, meta: &std::fs::Metadata) {
        let bytes = meta.blocks() * 512;
        if self.files.len() >= FILES_PER_PROCESS {
            self.more_bytes += bytes;
            return;
        }
        let (dev, ino) = (meta.dev(), meta.ino());
        let path = name
            .filter(|name| name.starts_with('/'))
            .filter(|name| names_here(name, dev, ino))
            .map(str::to_string);
        tracing::trace!(link, ?path, bytes, "tmpfs file held");
        let file = ShmFile {
            dev,
            ino,
            path,
            uid: meta.uid(),
        };
        self.files.insert((dev, ino), (file, bytes));
    }
}

/// Whether `path`, as the daemon resolves it, is the file (dev, ino): a holder's name
/// may be from another mount namespace, or unlinked ("… (deleted)").
fn names_here(path: &str, dev: u64, ino: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The tmpfs files the process under `pid` holds now, None when it holds none (or is
/// gone). Whose they are is for the caller to check, after the read
/// (`procs::held`).
pub fn held(pid: u32, devices: &mut Devices) -> Option<Held> {
    let mut found = Found::default();
    held_by_descriptors(pid, devices, &mut found);
    held_by_mappings(pid, devices, &mut found);
    if found.files.is_empty() && found.more_bytes == 0 {
        return None;
    }
    let (rss_shmem, uid) = rss_shmem_and_uid(pid)?;
    let mut files: Vec<(ShmFile, u64)> = found.files.into_values().collect();
    if found.more_bytes > 0 {
        files.push((
            ShmFile {
                dev: 0,
                ino: u64::from(pid),
                path: None,
                uid: 0,
            },
            found.more_bytes,
        ));
    }
    Some(Held {
        files,
        rss_shmem,
        uid,
    })
}

fn held_by_descriptors(pid: u32, devices: &mut Devices, found: &mut Found) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for entry in dir.flatten() {
        let link = entry.path();
        let Some(link) = link.to_str() else { continue };
        let Ok(meta) = std::fs::metadata(link) else {
            continue;
        };
        if !meta.is_file()
            || found.has(meta.dev(), meta.ino())
            || !devices.is_tmpfs(meta.dev(), link)
        {
            continue;
        }
        let name = std::fs::read_link(link).ok();
        found.add(link, name.as_ref().and_then(|n| n.to_str()), &meta);
    }
}

fn held_by_mappings(pid: u32, devices: &mut Devices, found: &mut Found) {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return;
    };
    for line in maps.lines() {
        let Some(mapping) = Mapping::parse(line) else {
            continue;
        };
        if found.has(mapping.dev, mapping.ino) || devices.0.get(&mapping.dev) == Some(&false) {
            continue;
        }
        let link = format!("/proc/{pid}/map_files/{}", mapping.range);
        let Ok(meta) = std::fs::metadata(&link) else {
            continue;
        };
        if meta.is_file() && devices.is_tmpfs(meta.dev(), &link) {
            found.add(&link, mapping.name, &meta);
        }
    }
}

/// A line of /proc/PID/maps backed by a file: `start-end perms offset maj:min inode
/// name`.
struct Mapping<'a> {
    range: &'a str,
    dev: u64,
    ino: u64,
    name: Option<&'a str>,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let _perms = fields.next()?;
        let _offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let ino: u64 = fields.next()?.parse().ok()?;
        if ino == 0 {
            return None; // Anonymous memory: in the RSS already.
        }
        let dev = nix::sys::stat::makedev(
            u64::from_str_radix(major, 16).ok()?,
            u64::from_str_radix(minor, 16).ok()?,
        );
        let name = fields.next().map(str::trim_start).filter(|n| !n.is_empty());
        Some(Self {
            range,
            dev,
            ino,
            name,
        })
    }
}

/// The process' tmpfs pages mapped and resident (`RssShmem`, bytes) and its
/// effective uid, from /proc/PID/status; None when unreadable.
fn rss_shmem_and_uid(pid: u32) -> Option<(u64, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str, at: usize| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(at)?.parse::<u64>().ok())
    };
    let kib = field("RssShmem:", 0).unwrap_or(0);
    let euid = u32::try_from(field("Uid:", 1)?).ok()?;
    Some((kib * 1024, euid))
}

/// The bytes `file` has allocated, at its path, while that path still names it.
pub fn file_bytes(file: &ShmFile) -> Option<u64> {
    let meta = std::fs::symlink_metadata(file.path.as_deref()?).ok()?;
    (meta.dev() == file.dev && meta.ino() == file.ino).then(|| meta.blocks() * 512)
}

/// Removes `file`, left in /dev/shm by a killed analysis, only while its path names
/// it: the directory is held open first and the name looked up in it without
/// following links, so a directory swapped for a link in between can lead nowhere
/// else; and only a regular file under /dev/shm, owned by whom it was. Returns the
/// bytes freed.
pub fn remove(file: &ShmFile) -> anyhow::Result<u64> {
    use anyhow::{Context as _, bail};
    use nix::{fcntl::OFlag, sys::stat::Mode};
    let path = file.path.as_deref().context("it has no path")?;
    if !crate::core::shmem::in_shm_dir(path) {
        bail!("{path} is not in {}", crate::core::shmem::SHM_DIR);
    }
    let path = std::path::Path::new(path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{} is no file in a directory", path.display());
    };
    let dir = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", dir.display()))?;
    let found = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .with_context(|| format!("looking at {}", path.display()))?;
    let regular = nix::sys::stat::SFlag::from_bits_truncate(found.st_mode)
        .contains(nix::sys::stat::SFlag::S_IFREG);
    if !regular || found.st_dev != file.dev || found.st_ino != file.ino || found.st_uid != file.uid
    {
        bail!("{} names another file now", path.display());
    }
    nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
        .with_context(|| format!("removing {}", path.display()))?;
    Ok(u64::try_from(found.st_blocks).unwrap_or(0) * 512)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;

    const MIB: u64 = 1 << 20;

    fn me() -> u32 {
        std::process::id()
    }

    pub(crate) fn memfd(bytes: usize) -> std::fs::File {
        let fd =
            nix::sys::memfd::memfd_create(c"watchdog-test", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![7u8; bytes]).expect("write");
        file
    }

    fn held_bytes(held: &Held, pick: impl Fn(&ShmFile) -> bool) -> u64 {
        held.files
            .iter()
            .filter(|(f, _)| pick(f))
            .map(|(_, b)| b)
            .sum()
    }

    #[test]
    fn a_memfd_written_and_not_mapped_is_held_with_its_bytes_and_no_path() {
        let file = memfd(3 * MIB as usize);
        let ino = file.metadata().unwrap().ino();
        let now = held(me(), &mut Devices::default()).expect("the memfd is held");
        let (memfd, bytes) = now.files.iter().find(|(f, _)| f.ino == ino).expect("found");
        assert_eq!(*bytes, 3 * MIB);
        assert_eq!(memfd.path, None, "a memfd has no path to list");
        drop(file);
        let after = held(me(), &mut Devices::default());
        assert!(after.is_none_or(|h| h.files.iter().all(|(f, _)| f.ino != ino)));
    }

    #[test]
    fn a_dev_shm_file_mapped_and_closed_is_held_by_its_mapping_with_its_path() {
        let path = format!("/dev/shm/watchdog-test-{}", std::process::id());
        let mut file = std::fs::File::create_new(&path).expect("create in /dev/shm");
        file.write_all(&vec![1u8; 2 * MIB as usize]).unwrap();
        let map = unsafe { memmap_of(&file) };
        drop(file);
        let held = held(me(), &mut Devices::default()).expect("the mapping is held");
        let bytes = held_bytes(&held, |f| f.path.as_deref() == Some(path.as_str()));
        std::fs::remove_file(&path).unwrap();
        unsafe { nix::sys::mman::munmap(map, 2 * MIB as usize).unwrap() };
        assert_eq!(bytes, 2 * MIB);
    }

    /// Maps `file` shared, untouched: its pages stay out of this process' RSS.
    unsafe fn memmap_of(file: &std::fs::File) -> std::ptr::NonNull<std::ffi::c_void> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        unsafe {
            mmap(
                None,
                std::num::NonZeroUsize::new(2 * MIB as usize).unwrap(),
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .expect("mmap")
    }

    #[test]
    fn a_left_file_is_removed_only_while_its_path_names_it() {
        let path = format!("/dev/shm/watchdog-remove-{}", std::process::id());
        std::fs::write(&path, vec![1u8; MIB as usize]).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let file = ShmFile {
            dev: meta.dev(),
            ino: meta.ino(),
            path: Some(path.clone()),
            uid: meta.uid(),
        };
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"a newcomer under the same name").unwrap();
        let refused = remove(&file).expect_err("another file under its name");
        assert!(
            refused.to_string().contains("names another file now"),
            "{refused:#}"
        );
        assert!(std::path::Path::new(&path).exists());
        let newcomer = std::fs::metadata(&path).unwrap();
        let file = ShmFile {
            ino: newcomer.ino(),
            ..file
        };
        assert_eq!(remove(&file).expect("removed"), 4096);
        assert!(!std::path::Path::new(&path).exists());
    }

    #[test]
    fn a_device_node_in_dev_is_never_a_held_file_nor_removed() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let _memfd = memfd(MIB as usize);
        let now = held(me(), &mut Devices::default()).expect("the memfd is held");
        assert!(
            now.files
                .iter()
                .all(|(f, _)| f.path.as_deref() != Some("/dev/null")),
            "{now:?}"
        );
        let meta = null.metadata().unwrap();
        let mut file = ShmFile {
            dev: meta.dev(),
            ino: meta.ino(),
            path: Some("/dev/null".into()),
            uid: meta.uid(),
        };
        assert!(remove(&file).is_err());
        file.path = Some("/dev/shm/../null".into());
        let refused = remove(&file).expect_err("out of /dev/shm");
        assert!(
            refused.to_string().contains("is not in /dev/shm/"),
            "{refused:#}"
        );
        assert!(std::path::Path::new("/dev/null").exists());
    }

    #[test]
    fn mappings_are_read_with_their_device_inode_and_name() {
        let m = Mapping::parse("7f00-7f10 rw-s 00000000 00:1a 4242   /dev/shm/x y").unwrap();
        assert_eq!(
            (m.range, m.ino, m.name),
            ("7f00-7f10", 4242, Some("/dev/shm/x y"))
        );
        assert_eq!(m.dev, nix::sys::stat::makedev(0, 0x1a));
        assert!(Mapping::parse("7f00-7f10 rw-p 00000000 00:00 0 ").is_none());
        assert!(Mapping::parse("7f00-7f10 rw-p 00000000 00:00 0      [heap]").is_none());
    }
}
