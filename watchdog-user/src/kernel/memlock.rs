//! What the kernel charges the maps to. From 5.11 it is the daemon's memory cgroup;
//! before, it is RLIMIT_MEMLOCK, 64 KiB by default, and the watched map alone (sized to
//! `pid_max`) is charged as if full: the limit is raised where the daemon may, and a
//! load it still refuses says how much the maps need and how to grant it.

use anyhow::anyhow;
use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

use crate::vocab::{kernel::KernelPath, units::size_rounded};

/// The first kernel that charges BPF memory to the memory cgroup instead.
const MEMCG_CHARGED_FROM: (u8, u8) = (5, 11);
/// What the kernel counts per hash map element beside its key and value
/// (`struct htab_elem`, rounded up).
const HASH_ELEM_OVERHEAD: u64 = 48;
/// A hash bucket: a list head and its lock.
const HASH_BUCKET: u64 = 16;
/// BPF map types, as the kernel numbers them.
const MAP_HASH: u32 = 1;
const MAP_PERCPU_HASH: u32 = 5;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_RINGBUF: u32 = 27;

/// One map as the kernel sizes its charge.
#[derive(Clone, Copy, Debug)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// RLIMIT_MEMLOCK below what the maps are charged: the numbers a refusal names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub limit: u64,
    pub need: u64,
}

/// The bytes kernels before 5.11 charge for `maps` (their `map_charge` sums, page
/// rounded): an estimate within a few per cent, for the refusal's message.
pub fn charge(maps: &[MapShape], cpus: u64, page: u64) -> u64 {
    let round8 = |n: u32| u64::from(n).div_ceil(8) * 8;
    maps.iter()
        .map(|m| {
            let entries = u64::from(m.max_entries);
            let bytes = match m.map_type {
                MAP_HASH | MAP_PERCPU_HASH => {
                    let value = if m.map_type == MAP_PERCPU_HASH {
                        8 + round8(m.value_size) * cpus
                    } else {
                        round8(m.value_size)
                    };
                    let elem = HASH_ELEM_OVERHEAD + round8(m.key_size) + value;
                    entries.next_power_of_two() * HASH_BUCKET + elem * (entries + cpus)
                }
                MAP_PERCPU_ARRAY => round8(m.value_size) * entries * cpus,
                MAP_RINGBUF => entries + 2 * page,
                _ => round8(m.value_size) * entries,
            };
            bytes.div_ceil(page) * page
        })
        .sum()
}

/// Whether this kernel charges BPF maps to RLIMIT_MEMLOCK.
pub fn memlock_charged(release: (u8, u8)) -> bool {
    release < MEMCG_CHARGED_FROM
}

/// Raises RLIMIT_MEMLOCK where this kernel charges the maps to it, as far as the
/// daemon may: to unlimited with CAP_SYS_RESOURCE, else to the hard limit. Returns how
/// the maps are paid for, and the shortfall a refusal of the load is due to.
pub fn prepare(release: (u8, u8), need: u64) -> (KernelPath, Option<Shortfall>) {
    if !memlock_charged(release) {
        return (
            KernelPath::new(
                "bpf_memory",
                "memcg",
                "the kernel charges the maps to the daemon's memory cgroup",
            ),
            None,
        );
    }
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return (
            KernelPath::new(
                "bpf_memory",
                "memlock",
                format!(
                    "charged to RLIMIT_MEMLOCK (kernels before 5.11), raised to unlimited; the maps take about {}",
                    size_rounded(need, true)
                ),
            ),
            None,
        );
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap_or((0, 0));
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let shortfall = (limit != RLIM_INFINITY && limit < need).then_some(Shortfall { limit, need });
    let path = KernelPath::new(
        "bpf_memory",
        "memlock",
        format!(
            "charged to RLIMIT_MEMLOCK (kernels before 5.11), {} without CAP_SYS_RESOURCE; the maps take about {}",
            limit_text(limit),
            size_rounded(need, true)
        ),
    );
    (path, shortfall)
}

fn limit_text(limit: u64) -> String {
    if limit == RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        size_rounded(limit, false)
    }
}

/// The refusal of a load that RLIMIT_MEMLOCK is too low for: the amounts and the fix.
pub fn refusal(shortfall: Shortfall, pid_max: u32) -> anyhow::Error {
    anyhow!(
        "the kernel refused to load the watchdog's eBPF maps: this kernel (before 5.11) charges \
         them to RLIMIT_MEMLOCK, which is {} here, and they need about {} (the watched map \
         holds pid_max = {pid_max} processes); run the daemon as root or with CAP_SYS_RESOURCE, \
         or raise the limit (LimitMEMLOCK=infinity in the unit, which the shipped unit sets; \
         `ulimit -l unlimited` in a shell)",
        limit_text(shortfall.limit),
        size_rounded(shortfall.need, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn only_kernels_before_5_11_charge_memlock() {
        assert!(memlock_charged((5, 10)));
        assert!(memlock_charged((4, 19)));
        assert!(!memlock_charged((5, 11)));
        assert!(!memlock_charged((6, 1)));
    }

    /// A watched map sized to systemd's pid_max is charged about half a gigabyte: what
    /// made a 64 MiB limit too small.
    #[test]
    fn a_hash_map_is_charged_for_every_entry_it_may_hold() {
        let watched = |max_entries| MapShape {
            map_type: MAP_HASH,
            key_size: 4,
            value_size: 48,
            max_entries,
        };
        let small = charge(&[watched(32_768)], 2, PAGE);
        let large = charge(&[watched(4_194_304)], 2, PAGE);
        assert_eq!(small % PAGE, 0);
        assert!((3_500_000..4_500_000).contains(&small), "{small}");
        assert!(
            large > 64 << 20 && (127..=128).contains(&(large / small)),
            "{large}"
        );
    }

    #[test]
    fn per_cpu_arrays_and_rings_are_charged_as_they_are_allocated() {
        let per_cpu = MapShape {
            map_type: MAP_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1024,
        };
        assert_eq!(charge(&[per_cpu], 4, PAGE), 32_768);
        let ring = MapShape {
            map_type: MAP_RINGBUF,
            key_size: 0,
            value_size: 0,
            max_entries: 1 << 20,
        };
        assert_eq!(charge(&[ring], 4, PAGE), (1 << 20) + 2 * PAGE);
    }

    #[test]
    fn the_refusal_names_the_limit_the_need_and_every_fix() {
        let text = refusal(
            Shortfall {
                limit: 64 << 10,
                need: 500 << 20,
            },
            4_194_304,
        )
        .to_string();
        assert!(!text.contains('\n'), "{text}");
        for part in [
            "RLIMIT_MEMLOCK",
            "64 KiB",
            "500 MiB",
            "4194304",
            "CAP_SYS_RESOURCE",
            "LimitMEMLOCK=infinity",
        ] {
            assert!(text.contains(part), "{part} missing: {text}");
        }
    }
}
