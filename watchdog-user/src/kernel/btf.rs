//! Reads struct member offsets and tracepoint arities from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the programs take every `task_struct` offset
//! they need as load-time globals. aya-obj parses BTF but keeps struct members private;
//! this is the small part of the format (kernel `Documentation/bpf/btf.rst`) we need.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};
use watchdog_common::Config;

use crate::vocab::kernel::KernelPath;

const MAGIC: u16 = 0xeb9f;
/// RSS movement that makes the kernel report a process' RSS: the precision of tree
/// memory sums between polls (a per-process limit crossing is reported exactly).
const RSS_STEP: u64 = 8 << 20;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const KIND_PTR: u32 = 2;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_ARRAY: u32 = 3;
const KIND_ENUM: u32 = 6;
const KIND_INT: u32 = 1;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// The RSS counters of an address space as this kernel lays them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RssCounters {
    pub kind: CounterKind,
    /// Byte offset of the first counter in `mm_struct`.
    pub start: u32,
    /// Bytes from one counter to the next.
    pub size: u32,
    /// Byte offset of a counter's s64 value in it.
    pub value: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// 6.2 on: `struct percpu_counter`, whose `count` the kernel folds each CPU's part
    /// into every 32 pages or so.
    PerCpu,
    /// Before 6.2: `atomic_long_t`, which each thread's own cache of up to 64 page
    /// faults reaches at the next fold.
    Atomic,
}

/// How memory is followed where the programs can read the counters.
fn memory_paths(counters: RssCounters, has_owner: bool) -> Vec<KernelPath> {
    let memory = match counters.kind {
        CounterKind::PerCpu => "the rss_stat tracepoint reads mm_struct's per-CPU counters",
        CounterKind::Atomic => {
            "the rss_stat tracepoint reads struct mm_rss_stat's atomic counters, which each \
             thread reaches with up to 64 page faults at a time"
        }
    };
    let from_others = if has_owner {
        KernelPath::new(
            "memory_from_others",
            "owner",
            "charged to the address space's owner (mm_struct.owner)",
        )
    } else {
        KernelPath::new(
            "memory_from_others",
            "poll_only",
            "this kernel has no mm_struct.owner (no memory cgroups): seen at the reconcile poll",
        )
    };
    vec![
        KernelPath::new("memory", "kernel_events", memory),
        from_others,
    ]
}

fn whole_bytes(bits: u32, what: &str) -> Result<u32> {
    if !bits.is_multiple_of(8) {
        bail!("{what} is a bitfield; cannot read it");
    }
    Ok(bits / 8)
}

struct Type {
    kind: u32,
    kind_flag: bool,
    /// size for structs, the referenced type id for typedefs and pointers.
    size_or_type: u32,
    /// Struct members (name offset, type id, bit offset) or proto params (name, type, 0).
    members: Vec<(u32, u32, u32)>,
    /// Arrays: the element type id.
    array_elem: u32,
}

pub struct KernelBtf {
    strings: Vec<u8>,
    /// Index i holds type id i + 1.
    types: Vec<Type>,
    /// (name, kind) → type id, for structs and typedefs.
    by_name: HashMap<(String, u32), u32>,
    /// Enumerator name → value, across all enums.
    enumerators: HashMap<String, i64>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data
        .get(at..at + 4)
        .context("BTF is truncated")?
        .try_into()
        .expect("4 bytes");
    Ok(u32::from_ne_bytes(bytes))
}

impl KernelBtf {
    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| {
            format!(
                "kernel BTF not readable at {}: run on a kernel built with CONFIG_DEBUG_INFO_BTF=y \
                 (or pass --btf with the right file)",
                path.display()
            )
        })?;
        Self::parse(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    fn parse(data: &[u8]) -> Result<Self> {
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != MAGIC {
            bail!("not a BTF file (bad magic)");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();
        let type_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let mut btf = Self {
            strings,
            types: Vec::new(),
            by_name: HashMap::new(),
            enumerators: HashMap::new(),
        };
        let mut at = 0;
        while at < type_data.len() {
            at = btf.parse_type(type_data, at)?;
        }
        Ok(btf)
    }

    /// Parses the type at `at`, returns where the next one starts.
    fn parse_type(&mut self, data: &[u8], at: usize) -> Result<usize> {
        let name_off = u32_at(data, at)?;
        let info = u32_at(data, at + 4)?;
        let size_or_type = u32_at(data, at + 8)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let mut next = at + 12;
        let mut members = Vec::new();
        // Trailing data per kind: (record size, records).
        let trailing = match kind {
            1 | 14 | 17 => 4,     // int, var, decl_tag
            3 => 12,              // array
            4 | 5 => 12 * vlen,   // struct, union
            6 => 8 * vlen,        // enum
            13 => 8 * vlen,       // func_proto
            15 | 19 => 12 * vlen, // datasec, enum64
            _ => 0,
        };
        let mut array_elem = 0;
        if kind == 4 || kind == 5 {
            for i in 0..vlen {
                let m = next + 12 * i;
                members.push((u32_at(data, m)?, u32_at(data, m + 4)?, u32_at(data, m + 8)?));
            }
        } else if kind == KIND_FUNC_PROTO {
            for i in 0..vlen {
                members.push((
                    u32_at(data, next + 8 * i)?,
                    u32_at(data, next + 8 * i + 4)?,
                    0,
                ));
            }
        } else if kind == KIND_ARRAY {
            array_elem = u32_at(data, next)?;
        } else if kind == KIND_ENUM {
            for i in 0..vlen {
                let name = self.string(u32_at(data, next + 8 * i)?);
                let value = u32_at(data, next + 8 * i + 4)? as i32 as i64;
                self.enumerators.entry(name).or_insert(value);
            }
        }
        next += trailing;
        let id = self.types.len() as u32 + 1;
        // Only structs and typedefs are looked up by name: indexing the other ~57,000
        // named types cost ~7 MiB of start-up peak for nothing.
        if kind == KIND_STRUCT || kind == KIND_TYPEDEF {
            let name = self.string(name_off);
            if !name.is_empty() {
                self.by_name.entry((name, kind)).or_insert(id);
            }
        }
        self.types.push(Type {
            kind,
            kind_flag: info >> 31 == 1,
            size_or_type,
            members,
            array_elem,
        });
        Ok(next)
    }

    fn string(&self, off: u32) -> String {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end]).into_owned()
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn struct_type(&self, name: &str) -> Result<&Type> {
        let id = *self
            .by_name
            .get(&(name.to_string(), KIND_STRUCT))
            .with_context(|| format!("struct {name} is not in the kernel BTF"))?;
        Ok(self.ty(id).expect("ids in by_name exist"))
    }

    /// (type id, bit offset) of `member` in `struct name`, looking into anonymous
    /// structs and unions too (mm_struct keeps its fields in one).
    fn member(&self, name: &str, member: &str) -> Result<(u32, u32)> {
        let ty = self.struct_type(name)?;
        self.find_member(ty, member, 0)
            .with_context(|| format!("struct {name} has no member {member} in this kernel"))
    }

    fn find_member(&self, ty: &Type, member: &str, base_bits: u32) -> Option<(u32, u32)> {
        // With kind_flag set the high 8 bits of an offset hold a bitfield size.
        let offset = |bits: u32| {
            base_bits
                + if ty.kind_flag {
                    bits & 0x00ff_ffff
                } else {
                    bits
                }
        };
        if let Some(&(_, type_id, bits)) = ty
            .members
            .iter()
            .find(|(n, _, _)| self.string(*n) == member)
        {
            return Some((type_id, offset(bits)));
        }
        ty.members
            .iter()
            .filter(|(n, _, _)| *n == 0 || self.string(*n).is_empty())
            .find_map(|&(_, type_id, bits)| {
                let inner = self
                    .ty(type_id)
                    .filter(|t| t.kind == KIND_STRUCT || t.kind == 5)?;
                self.find_member(inner, member, offset(bits))
            })
    }

    pub fn struct_size(&self, name: &str) -> Result<u32> {
        Ok(self.struct_type(name)?.size_or_type)
    }

    pub fn enumerator(&self, name: &str) -> Result<u32> {
        let value = *self
            .enumerators
            .get(name)
            .with_context(|| format!("enumerator {name} is not in the kernel BTF"))?;
        u32::try_from(value).with_context(|| format!("{name} = {value} is not a small index"))
    }

    /// Byte offset of `member` in `struct name`.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32> {
        let (_, bits) = self.member(name, member)?;
        whole_bytes(bits, &format!("{name}.{member}"))
    }

    /// Number of arguments a tp_btf program on `tracepoint` receives (the BTF prototype
    /// `btf_trace_<tp>` has a leading `void *` context that programs do not see).
    pub fn tracepoint_arity(&self, tracepoint: &str) -> Result<usize> {
        let name = format!("btf_trace_{tracepoint}");
        let mut id = *self
            .by_name
            .get(&(name.clone(), KIND_TYPEDEF))
            .with_context(|| format!("tracepoint {tracepoint} has no BTF type {name}"))?;
        loop {
            let ty = self
                .ty(id)
                .with_context(|| format!("dangling BTF type id {id}"))?;
            match ty.kind {
                KIND_TYPEDEF | KIND_PTR => id = ty.size_or_type,
                KIND_FUNC_PROTO => return Ok(ty.members.len().saturating_sub(1)),
                kind => bail!("{name} resolves to BTF kind {kind}, not a function prototype"),
            }
        }
    }

    /// Everything the kernel programs need to know about this kernel. `in_pid_ns`: the
    /// daemon runs in a PID namespace other than the initial one, so the programs must
    /// translate pids into it; where this kernel's BTF lacks what that reads, the error
    /// says so and names the way out. With it, how this kernel lets memory and exits
    /// be followed ([`KernelPath`]s).
    pub fn program_config(&self, in_pid_ns: bool) -> Result<(Config, Vec<KernelPath>)> {
        let mut config = self.process_config()?;
        if in_pid_ns {
            self.add_pid_ns_config(&mut config).context(
                "the daemon runs in a PID namespace of its own (a container without hostPID) \
                 and this kernel's BTF lacks what translating pids into it reads; run it in \
                 the host's PID namespace (hostPID)",
            )?;
        }
        let mut paths = match self.rss_counters() {
            Ok(counters) => {
                self.add_rss_config(&mut config, counters)?;
                memory_paths(counters, config.mm_owner != 0)
            }
            Err(why) => {
                let why = format!("{why:#}: limits and warnings act at the reconcile poll");
                vec![
                    KernelPath::new("memory", "poll_only", &why),
                    KernelPath::new("memory_from_others", "poll_only", why),
                ]
            }
        };
        paths.push(if config.exit_has_group_dead != 0 {
            KernelPath::new("exit", "group_dead", "sched_process_exit says when a process' last thread exits")
        } else {
            KernelPath::new(
                "exit",
                "signal_live",
                "sched_process_exit has no group_dead argument: the programs read signal_struct.live",
            )
        });
        Ok((config, paths))
    }

    /// What the programs read to number a process in the daemon's PID namespace, as the
    /// kernel's `pid_nr_ns()` does: `task->thread_pid->numbers[level]`, `.nr` when its
    /// `.ns` is the daemon's (compared by `ns.inum`).
    fn add_pid_ns_config(&self, config: &mut Config) -> Result<()> {
        config.in_pid_ns = 1;
        config.task_thread_pid = self.member_offset("task_struct", "thread_pid")?;
        config.pid_level = self.member_offset("pid", "level")?;
        config.pid_numbers = self.member_offset("pid", "numbers")?;
        config.upid_size = self.struct_size("upid")?;
        config.upid_nr = self.member_offset("upid", "nr")?;
        config.upid_ns = self.member_offset("upid", "ns")?;
        config.pidns_inum =
            self.member_offset("pid_namespace", "ns")? + self.member_offset("ns_common", "inum")?;
        Ok(())
    }

    /// Where an address space's RSS counters are, in either layout the kernel has had
    /// since the rss_stat tracepoint exists (5.5): an array of `struct percpu_counter`
    /// (6.2 on), or `struct mm_rss_stat` wrapping an array of `atomic_long_t` (before).
    /// An error says why neither is found.
    pub fn rss_counters(&self) -> Result<RssCounters> {
        let (type_id, bits) = self.member("mm_struct", "rss_stat")?;
        let rss_stat = whole_bytes(bits, "mm_struct.rss_stat")?;
        let ty = self.resolved(type_id)?;
        let (kind, array, start) = match ty.kind {
            KIND_ARRAY => (CounterKind::PerCpu, ty, rss_stat),
            KIND_STRUCT => {
                let (count_id, count_bits) = self
                    .find_member(ty, "count", 0)
                    .context("mm_struct.rss_stat is a struct without a count array")?;
                let count = self.resolved(count_id)?;
                if count.kind != KIND_ARRAY {
                    bail!("mm_struct.rss_stat.count is not an array");
                }
                let offset = whole_bytes(count_bits, "mm_rss_stat.count")?;
                (CounterKind::Atomic, count, rss_stat + offset)
            }
            kind => {
                bail!("mm_struct.rss_stat is of BTF kind {kind}, neither an array nor a struct")
            }
        };
        let counter = self.resolved(array.array_elem)?;
        let value_name = match kind {
            CounterKind::PerCpu => "count",
            CounterKind::Atomic => "counter",
        };
        let (value_id, value_bits) = (counter.kind == KIND_STRUCT)
            .then(|| self.find_member(counter, value_name, 0))
            .flatten()
            .with_context(|| {
                format!("the counters of mm_struct.rss_stat have no member {value_name}")
            })?;
        let value = self.resolved(value_id)?;
        if value.kind != KIND_INT || value.size_or_type != 8 {
            bail!("mm_struct.rss_stat's {value_name} is not a 64-bit integer");
        }
        Ok(RssCounters {
            kind,
            start,
            size: counter.size_or_type,
            value: whole_bytes(value_bits, value_name)?,
        })
    }

    /// The type `id` names once typedefs and qualifiers are looked through.
    fn resolved(&self, mut id: u32) -> Result<&Type> {
        for _ in 0..32 {
            let ty = self
                .ty(id)
                .with_context(|| format!("dangling BTF type id {id}"))?;
            if !matches!(
                ty.kind,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
            ) {
                return Ok(ty);
            }
            id = ty.size_or_type;
        }
        bail!("BTF type id {id} is a chain of more than 32 typedefs")
    }

    fn add_rss_config(&self, config: &mut Config, counters: RssCounters) -> Result<()> {
        config.rss_enabled = 1;
        config.task_mm = self.member_offset("task_struct", "mm")?;
        config.mm_rss_counters = counters.start;
        config.rss_counter_size = counters.size;
        config.rss_counter_value = counters.value;
        config.mm_filepages = self.enumerator("MM_FILEPAGES")?;
        config.mm_anonpages = self.enumerator("MM_ANONPAGES")?;
        config.mm_shmempages = self.enumerator("MM_SHMEMPAGES")?;
        config.page_size = procfs::page_size();
        config.rss_step = RSS_STEP;
        config.mm_owner = self.member_offset("mm_struct", "owner").unwrap_or(0);
        // Only for a record's command line: without them it is read from /proc only.
        config.mm_arg_start = self.member_offset("mm_struct", "arg_start").unwrap_or(0);
        config.mm_arg_end = self.member_offset("mm_struct", "arg_end").unwrap_or(0);
        Ok(())
    }

    fn process_config(&self) -> Result<Config> {
        Ok(Config {
            task_pid: self.member_offset("task_struct", "pid")?,
            task_tgid: self.member_offset("task_struct", "tgid")?,
            task_real_parent: self.member_offset("task_struct", "real_parent")?,
            task_exit_code: self.member_offset("task_struct", "exit_code")?,
            task_start_boottime: self.member_offset("task_struct", "start_boottime")?,
            task_signal: self.member_offset("task_struct", "signal")?,
            task_group_leader: self.member_offset("task_struct", "group_leader")?,
            signal_live: self.member_offset("signal_struct", "live")?,
            task_children: self.member_offset("task_struct", "children")?,
            task_exit_state: self.member_offset("task_struct", "exit_state")?,
            task_comm: self.member_offset("task_struct", "comm")?,
            exit_has_group_dead: u32::from(self.tracepoint_arity("sched_process_exit")? >= 2),
            ..Config::UNSET
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real kernel BTF: the offsets must agree with what the kernel itself
    /// says through other means (tgid directly follows pid in every kernel since 2.6).
    #[test]
    fn reads_task_struct_offsets_from_the_running_kernel() {
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let (cfg, paths) = btf.program_config(false).unwrap();
        assert_eq!(cfg.task_tgid, cfg.task_pid + 4);
        assert!(cfg.task_pid > 0 && cfg.task_real_parent > cfg.task_tgid);
        assert_eq!(btf.tracepoint_arity("sched_process_fork").unwrap(), 2);
        assert_eq!(cfg.rss_enabled, 1, "6.18 has per-CPU rss counters");
        assert_eq!(
            cfg.rss_counter_size,
            btf.struct_size("percpu_counter").unwrap()
        );
        assert_eq!(path(&paths, "memory").how, "kernel_events");
        assert_eq!((cfg.mm_filepages, cfg.mm_anonpages), (0, 1));
        // Two unsigned longs side by side, inside mm_struct's anonymous struct.
        assert!(cfg.mm_arg_start > 0, "{cfg:?}");
        assert_eq!(cfg.mm_arg_end, cfg.mm_arg_start + 8);
    }

    /// The pid-namespace fields of the running kernel: a `struct upid` is an int and a
    /// pointer, and `numbers` is the last member of `struct pid`.
    #[test]
    fn reads_pid_namespace_offsets_from_the_running_kernel() {
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let (initial, _) = btf.program_config(false).unwrap();
        assert_eq!(initial.in_pid_ns, 0);
        assert_eq!((initial.task_thread_pid, initial.upid_size), (0, 0));
        let (cfg, _) = btf.program_config(true).unwrap();
        assert_eq!(cfg.in_pid_ns, 1);
        assert_eq!((cfg.upid_size, cfg.upid_nr, cfg.upid_ns), (16, 0, 8));
        assert!(cfg.task_thread_pid > cfg.task_tgid);
        // `numbers` ends the struct (a flexible array; one element on older kernels).
        assert!(cfg.pid_numbers + cfg.upid_size >= btf.struct_size("pid").unwrap());
        assert!(cfg.pid_level < cfg.pid_numbers && cfg.pidns_inum > 0);
    }

    /// A struct of [`synthetic_btf`]: its name, size and members (name, byte offset).
    type SyntheticStruct<'a> = (&'a str, u32, &'a [(&'a str, u32)]);

    /// Builds a BTF file type by type: ids are handed out in order from 1.
    struct Synth {
        strings: Vec<u8>,
        types: Vec<u8>,
        last_id: u32,
    }

    const fn info(kind: u32, vlen: usize) -> u32 {
        (kind << 24) | vlen as u32
    }

    impl Synth {
        /// With 1: int, 2: void *, 3: the `sched_process_exit` prototype (`void *`,
        /// task, group_dead), 4: a pointer to it, 5: its typedef.
        fn new() -> Self {
            let mut synth = Self {
                strings: vec![0],
                types: Vec::new(),
                last_id: 0,
            };
            let int = synth.name("int");
            synth.ty(&[int, info(KIND_INT, 0), 4, 32]);
            synth.ty(&[0, info(KIND_PTR, 0), 0]);
            synth.ty(&[0, info(KIND_FUNC_PROTO, 3), 0, 0, 2, 0, 1, 0, 1]);
            synth.ty(&[0, info(KIND_PTR, 0), 3]);
            let exit = synth.name("btf_trace_sched_process_exit");
            synth.ty(&[exit, info(KIND_TYPEDEF, 0), 4]);
            synth
        }

        fn name(&mut self, text: &str) -> u32 {
            let offset = self.strings.len() as u32;
            self.strings.extend(text.as_bytes());
            self.strings.push(0);
            offset
        }

        /// Appends one type (its header and trailing words); returns its id.
        fn ty(&mut self, words: &[u32]) -> u32 {
            words
                .iter()
                .for_each(|w| self.types.extend(w.to_ne_bytes()));
            self.last_id += 1;
            self.last_id
        }

        /// A struct of members (name, type id, byte offset); "" names an anonymous one.
        fn struct_of(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let name = if name.is_empty() { 0 } else { self.name(name) };
            let mut words = vec![name, info(KIND_STRUCT, members.len()), size];
            for (member, type_id, offset) in members {
                let member = if member.is_empty() {
                    0
                } else {
                    self.name(member)
                };
                words.extend([member, *type_id, offset * 8]);
            }
            self.ty(&words)
        }

        /// A struct whose members are all ints.
        fn ints(&mut self, name: &str, size: u32, members: &[(&str, u32)]) -> u32 {
            let members: Vec<(&str, u32, u32)> = members.iter().map(|&(m, o)| (m, 1, o)).collect();
            self.struct_of(name, size, &members)
        }

        fn typedef(&mut self, name: &str, type_id: u32) -> u32 {
            let name = self.name(name);
            self.ty(&[name, info(KIND_TYPEDEF, 0), type_id])
        }

        fn array(&mut self, elem: u32, count: u32) -> u32 {
            self.ty(&[0, info(KIND_ARRAY, 0), 0, elem, 1, count])
        }

        fn enumeration(&mut self, values: &[(&str, u32)]) -> u32 {
            let mut words = vec![0, info(KIND_ENUM, values.len()), 4];
            for (name, value) in values {
                let name = self.name(name);
                words.extend([name, *value]);
            }
            self.ty(&words)
        }

        fn finish(self) -> Vec<u8> {
            let mut btf = Vec::new();
            btf.extend(MAGIC.to_ne_bytes());
            btf.extend([1, 0]);
            for word in [
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                btf.extend(word.to_ne_bytes());
            }
            btf.extend(self.types);
            btf.extend(self.strings);
            btf
        }
    }

    /// A BTF file of the given structs (members: name, byte offset; all plain ints) and
    /// the `sched_process_exit` tracepoint's prototype.
    fn synthetic_btf(structs: &[SyntheticStruct]) -> Vec<u8> {
        let mut synth = Synth::new();
        for (name, size, members) in structs {
            synth.ints(name, *size, members);
        }
        synth.finish()
    }

    /// The layouts of `mm_struct.rss_stat` the kernel has had.
    enum RssLayout {
        /// 6.2 on: `struct percpu_counter rss_stat[NR_MM_COUNTERS]`, inside the
        /// anonymous struct that holds mm_struct's fields.
        PerCpu,
        /// Before: `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }`, with
        /// `atomic_long_t` a typedef of a typedef of an anonymous struct.
        Atomic,
        /// Something else: an int.
        Unknown,
    }

    /// A kernel's BTF with `task_struct.mm`, the MM_* counters and `mm_struct` as
    /// `layout` has it.
    fn btf_with_rss(layout: RssLayout) -> KernelBtf {
        let mut synth = Synth::new();
        let mut task = TASK.to_vec();
        task.push(("mm", 88));
        synth.ints("task_struct", 96, &task);
        synth.ints("signal_struct", 8, &[("live", 4)]);
        synth.enumeration(&[
            ("MM_FILEPAGES", 0),
            ("MM_ANONPAGES", 1),
            ("MM_SWAPENTS", 2),
            ("MM_SHMEMPAGES", 3),
        ]);
        let long_long = synth.name("long long");
        let long_long = synth.ty(&[long_long, info(KIND_INT, 0), 8, (1 << 24) | 64]);
        let s64 = synth.typedef("s64", long_long);
        match layout {
            RssLayout::PerCpu => {
                let counter = synth.struct_of(
                    "percpu_counter",
                    40,
                    &[("lock", 1, 0), ("count", s64, 8), ("counters", 1, 32)],
                );
                let counters = synth.array(counter, 4);
                let fields =
                    synth.struct_of("", 1000, &[("rss_stat", counters, 720), ("owner", 1, 904)]);
                synth.struct_of("mm_struct", 1024, &[("", fields, 0)]);
            }
            RssLayout::Atomic => {
                let atomic = synth.struct_of("", 8, &[("counter", s64, 0)]);
                let atomic64 = synth.typedef("atomic64_t", atomic);
                let atomic_long = synth.typedef("atomic_long_t", atomic64);
                let counters = synth.array(atomic_long, 4);
                let stat = synth.struct_of("mm_rss_stat", 32, &[("count", counters, 0)]);
                synth.struct_of(
                    "mm_struct",
                    1024,
                    &[("rss_stat", stat, 680), ("owner", 1, 900)],
                );
            }
            RssLayout::Unknown => {
                synth.ints("mm_struct", 1024, &[("rss_stat", 680)]);
            }
        }
        KernelBtf::parse(&synth.finish()).unwrap()
    }

    fn path<'a>(paths: &'a [KernelPath], name: &str) -> &'a KernelPath {
        paths.iter().find(|p| p.path == name).unwrap()
    }

    #[test]
    fn per_cpu_counters_are_read_at_their_count() {
        let btf = btf_with_rss(RssLayout::PerCpu);
        let counters = btf.rss_counters().unwrap();
        assert_eq!(
            counters,
            RssCounters {
                kind: CounterKind::PerCpu,
                start: 720,
                size: 40,
                value: 8
            }
        );
        let (cfg, paths) = btf.program_config(false).unwrap();
        assert_eq!(cfg.rss_enabled, 1);
        assert_eq!(
            (
                cfg.mm_rss_counters,
                cfg.rss_counter_size,
                cfg.rss_counter_value
            ),
            (720, 40, 8)
        );
        assert_eq!((cfg.task_mm, cfg.mm_owner, cfg.mm_shmempages), (88, 904, 3));
        assert_eq!(path(&paths, "memory").how, "kernel_events");
        assert!(path(&paths, "memory").detail.contains("per-CPU"));
        assert_eq!(path(&paths, "memory_from_others").how, "owner");
    }

    /// Before 6.2 the same counters sit in `struct mm_rss_stat`, as atomics: the
    /// programs read them there rather than falling back to the poll.
    #[test]
    fn atomic_counters_before_6_2_are_read_through_mm_rss_stat() {
        let btf = btf_with_rss(RssLayout::Atomic);
        let (cfg, paths) = btf.program_config(false).unwrap();
        assert_eq!(cfg.rss_enabled, 1);
        assert_eq!(
            (
                cfg.mm_rss_counters,
                cfg.rss_counter_size,
                cfg.rss_counter_value
            ),
            (680, 8, 0)
        );
        assert_eq!((cfg.mm_owner, cfg.mm_anonpages), (900, 1));
        let memory = path(&paths, "memory");
        assert_eq!(memory.how, "kernel_events");
        assert!(
            memory.detail.contains("mm_rss_stat") && memory.detail.contains("64 page faults"),
            "{memory:?}"
        );
    }

    #[test]
    fn an_unknown_layout_leaves_memory_to_the_poll_and_says_why() {
        let btf = btf_with_rss(RssLayout::Unknown);
        let (cfg, paths) = btf.program_config(false).unwrap();
        assert_eq!(cfg.rss_enabled, 0);
        let memory = path(&paths, "memory");
        assert_eq!(memory.how, "poll_only");
        assert!(
            memory.detail.contains("mm_struct.rss_stat")
                && memory.detail.contains("reconcile poll"),
            "{memory:?}"
        );
        assert_eq!(path(&paths, "memory_from_others").how, "poll_only");
    }

    /// Every Debian kernel before 6.18 lacks `group_dead`: the path is said.
    #[test]
    fn the_exit_path_follows_the_tracepoints_arity() {
        let btf = btf_with_rss(RssLayout::PerCpu);
        let (_, paths) = btf.program_config(false).unwrap();
        assert_eq!(path(&paths, "exit").how, "group_dead");
    }

    const TASK: &[(&str, u32)] = &[
        ("pid", 8),
        ("tgid", 12),
        ("real_parent", 16),
        ("exit_code", 24),
        ("start_boottime", 28),
        ("signal", 36),
        ("group_leader", 44),
        ("children", 52),
        ("exit_state", 60),
        ("comm", 64),
        ("thread_pid", 80),
    ];

    /// Where the pid-namespace fields are missing (a kernel whose BTF lacks them), the
    /// daemon in the initial namespace starts, and in another one the error is one
    /// line naming the field and the way out.
    #[test]
    fn a_kernel_without_the_pid_fields_refuses_only_a_namespaced_daemon() {
        let signal: &[(&str, u32)] = &[("live", 4)];
        let btf = synthetic_btf(&[("task_struct", 96, TASK), ("signal_struct", 8, signal)]);
        let btf = KernelBtf::parse(&btf).unwrap();
        assert_eq!(btf.program_config(false).unwrap().0.task_tgid, 12);
        let err = format!("{:#}", btf.program_config(true).unwrap_err());
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.contains("PID namespace of its own")
                && err.contains("hostPID")
                && err.ends_with("struct pid is not in the kernel BTF"),
            "{err}"
        );
    }

    #[test]
    fn pid_namespace_offsets_are_read_where_the_btf_has_them() {
        let btf = synthetic_btf(&[
            ("task_struct", 96, TASK),
            ("signal_struct", 8, &[("live", 4)]),
            ("pid", 40, &[("level", 4), ("numbers", 24)]),
            ("upid", 16, &[("nr", 0), ("ns", 8)]),
            ("pid_namespace", 200, &[("ns", 120)]),
            ("ns_common", 40, &[("inum", 20)]),
        ]);
        let (cfg, _) = KernelBtf::parse(&btf)
            .unwrap()
            .program_config(true)
            .unwrap();
        assert_eq!(cfg.in_pid_ns, 1);
        assert_eq!(
            (cfg.task_thread_pid, cfg.pid_level, cfg.pid_numbers),
            (80, 4, 24)
        );
        assert_eq!((cfg.upid_size, cfg.upid_nr, cfg.upid_ns), (16, 0, 8));
        assert_eq!(cfg.pidns_inum, 140);
    }

    #[test]
    fn rejects_a_file_that_is_not_btf() {
        assert!(KernelBtf::parse(b"definitely not BTF, just some bytes").is_err());
    }
}
