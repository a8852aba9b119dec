//! Pinned state is checked before it is trusted. A restarted daemon that finds links
//! pinned would otherwise reopen the maps by name and take them as the programs' own:
//! a map swapped under the links (its children go untracked: a split brain), or maps
//! of another build's layout (garbage, or a panic, and with `Restart=always` a crash
//! loop). So, before anything is read:
//! - the pinned [`LAYOUT_MAP`] must hold this build's [`LAYOUT`];
//! - every pinned map must have the type, key and value sizes, entries and flags this
//!   build's object declares;
//! - every pinned link must lead to a loaded program, the one of that name, and every
//!   pinned map a program uses must be the very map it uses (by kernel map id).
//!
//! Anything else is one log line and a counter: the pins are dropped and the programs
//! loaded afresh. When the layout is ours, the saved analyses and roots are read first,
//! and [`rewatch`] puts every saved root still running (same pid, same start time) and
//! its descendants back in the fresh map, so a surviving analysis stays enforced.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::{links::FdLink, links::PinnedLink, loaded_programs},
};
use watchdog_common::{
    ANALYSES_MAP, ANALYSIS_ID_MAX, AnalysisEntry, LAYOUT, LAYOUT_MAP, ROOTS_MAP, RootEntry,
};

use crate::vocab::process::AnalysisKey;

/// Analysis keys are handed out one by one from 1: one past this is garbage (and would
/// overflow the registry's next key).
const MAX_SANE_KEY: u64 = 1 << 40;

/// The kernel keeps 15 bytes of a map's or program's name.
const KERNEL_NAME_LEN: usize = 15;

/// A map's type and size, as the object declares it or the kernel reports a pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl Shape {
    fn of_pin(info: &MapInfo) -> Self {
        Self {
            // An unknown type reads as u32::MAX: matches nothing we declare.
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }

    /// "a hash of 4-byte keys and 24-byte values, 131072 entries".
    fn describe(&self) -> String {
        let kind = match self.map_type {
            1 => "a hash".to_string(),
            2 => "an array".to_string(),
            6 => "a per-CPU array".to_string(),
            27 => "a ring buffer".to_string(),
            other => format!("a map of type {other}"),
        };
        let flags = if self.flags == 0 {
            String::new()
        } else {
            format!(", flags {:#x}", self.flags)
        };
        format!(
            "{kind} of {}-byte keys and {}-byte values, {} entries{flags}",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// What this build's object says the pinned state must be.
pub struct Expected<'a> {
    /// The maps pinned by name.
    pub maps: &'a [&'a str],
    /// Maps whose size the loader sets (any size pinned is taken as it is).
    pub sized_at_load: &'a [&'a str],
    /// Maps the attached programs must use (a program that uses none of that name is
    /// not ours).
    pub used_by_programs: &'a [&'a str],
    /// Pinned links: (pin path, program name, required). One that is not required (a
    /// task iterator this kernel could not run) is checked when it is there.
    pub links: Vec<(PathBuf, &'a str, bool)>,
    /// The eBPF object this build loads.
    pub object: &'a [u8],
}

/// What was found under the pin directory.
pub enum Verdict {
    /// Nothing pinned: a first start.
    Nothing,
    /// All checks passed: resume.
    Trusted,
    /// Something is wrong: the reason, for the one log line.
    Distrusted(String),
}

/// The previous run's analyses and roots, read from pins about to be dropped.
#[derive(Debug, Default)]
pub struct Salvage {
    pub analyses: Vec<(AnalysisKey, AnalysisEntry)>,
    pub roots: Vec<(u32, RootEntry)>,
}

/// Checks the pinned state under `pin_dir` against this build; decodes nothing but
/// [`LAYOUT_MAP`]'s one u64 (and only once its shape is checked).
pub fn check(pin_dir: &Path, expected: &Expected) -> Verdict {
    let empty = std::fs::read_dir(pin_dir).map_or(true, |mut d| d.next().is_none());
    if empty {
        return Verdict::Nothing;
    }
    match verify(pin_dir, expected) {
        Ok(()) => Verdict::Trusted,
        Err(reason) => Verdict::Distrusted(reason),
    }
}

fn verify(pin_dir: &Path, expected: &Expected) -> Result<(), String> {
    let missing: Vec<String> = expected
        .links
        .iter()
        .filter(|(path, _, required)| *required && !path.exists())
        .map(|(path, _, _)| file_name(path))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the pinned links {} are missing (a start that did not finish, or removed by hand)",
            missing.join(", ")
        ));
    }
    check_layout(pin_dir)?;
    let pinned_ids = check_shapes(
        pin_dir,
        expected.object,
        expected.maps,
        expected.sized_at_load,
    )?;
    check_programs(expected, &pinned_ids)
}

/// Checks each pinned map of `names` against the shape `object` declares for it (any
/// size taken for those in `sized_at_load`); their map ids, by name.
fn check_shapes<'n>(
    pin_dir: &Path,
    object: &[u8],
    names: &[&'n str],
    sized_at_load: &[&str],
) -> Result<BTreeMap<&'n str, u32>, String> {
    let shapes = declared_shapes(object)
        .map_err(|e| format!("this build's eBPF object does not parse ({e:#})"))?;
    let mut pinned_ids = BTreeMap::new();
    for &name in names {
        let info = pinned_map(pin_dir, name)?;
        let declared = shapes
            .get(name)
            .ok_or_else(|| format!("map {name} is missing from this build's eBPF object"))?;
        check_shape(name, &info, declared, sized_at_load.contains(&name))?;
        pinned_ids.insert(name, info.id());
    }
    Ok(pinned_ids)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Why the pinned layout is not this build's, if it is not.
fn check_layout(pin_dir: &Path) -> Result<(), String> {
    let path = pin_dir.join(LAYOUT_MAP);
    if !path.exists() {
        return Err(format!(
            "there is no pinned {LAYOUT_MAP} (the pins of a build before layout checks, or of a start that did not finish)"
        ));
    }
    let info = pinned_map(pin_dir, LAYOUT_MAP)?;
    let shape = Shape::of_pin(&info);
    let ours = Shape {
        map_type: aya::maps::MapType::Array as u32,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        flags: 0,
    };
    if shape != ours {
        return Err(format!(
            "pinned {LAYOUT_MAP} (map id {}) is {}, not {}: the pinned maps are another build's",
            info.id(),
            shape.describe(),
            ours.describe()
        ));
    }
    let layout = open_pinned(pin_dir, LAYOUT_MAP)
        .and_then(Array::<_, u64>::try_from)
        .and_then(|array| array.get(&0, 0))
        .map_err(|e| format!("pinned {LAYOUT_MAP} cannot be read ({e})"))?;
    match layout {
        l if l == LAYOUT => Ok(()),
        0 => Err(format!(
            "pinned {LAYOUT_MAP} was never written (its daemon did not finish starting)"
        )),
        other => Err(format!(
            "pinned {LAYOUT_MAP} is {other:#018x}, this build's is {LAYOUT:#018x}: the pinned maps are another build's layout"
        )),
    }
}

/// The map pinned as `name`, opened.
fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map, aya::maps::MapError> {
    MapData::from_pin(pin_dir.join(name)).and_then(Map::from_map_data)
}

fn pinned_map(pin_dir: &Path, name: &str) -> Result<MapInfo, String> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(format!("pinned {name} is missing"));
    }
    MapInfo::from_pin(&path).map_err(|e| format!("pinned {name} is not a map ({e})"))
}

fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(KERNEL_NAME_LEN)]
}

fn check_shape(
    name: &str,
    info: &MapInfo,
    declared: &Shape,
    sized_at_load: bool,
) -> Result<(), String> {
    let pinned = Shape::of_pin(info);
    let mut comparable = pinned;
    if sized_at_load {
        comparable.max_entries = declared.max_entries;
    }
    if comparable != *declared {
        return Err(format!(
            "pinned {name} (map id {}) is {}, this build's is {}",
            info.id(),
            pinned.describe(),
            declared.describe()
        ));
    }
    // A kernel without object names reports none.
    let pinned_name = info.name_as_str().unwrap_or_default();
    if !pinned_name.is_empty() && pinned_name != kernel_name(name) {
        return Err(format!(
            "pinned {name} (map id {}) is a map named {pinned_name:?}",
            info.id()
        ));
    }
    Ok(())
}

/// Every map of this build's object, as declared.
fn declared_shapes(object: &[u8]) -> Result<HashMap<String, Shape>> {
    let object = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    Ok(object
        .maps
        .iter()
        .map(|(name, map)| {
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The pinned links lead to loaded programs of the right names, and the maps they use
/// are the pinned ones.
fn check_programs(expected: &Expected, pinned_ids: &BTreeMap<&str, u32>) -> Result<(), String> {
    // Program id -> the name it must have.
    let mut wanted: HashMap<u32, (&str, String)> = HashMap::new();
    for (path, program, _) in &expected.links {
        if !path.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(path)
            .map_err(|e| format!("pinned {} cannot be opened ({e})", file_name(path)))?;
        let info = FdLink::from(link)
            .info()
            .map_err(|e| format!("pinned {} is not a link ({e})", file_name(path)))?;
        wanted.insert(info.program_id(), (program, file_name(path)));
    }
    // Map name -> (program, map id) for every map an attached program uses.
    let mut users: BTreeMap<String, Vec<(&str, u32)>> = BTreeMap::new();
    let mut found = HashSet::new();
    for info in loaded_programs().filter_map(Result::ok) {
        let Some(&(program, _)) = wanted.get(&info.id()) else {
            continue;
        };
        found.insert(info.id());
        let name = String::from_utf8_lossy(info.name());
        if !name.is_empty() && name != kernel_name(program) {
            return Err(format!(
                "the program attached by the pinned link of {program} (program id {}) is named {name:?}",
                info.id()
            ));
        }
        let map_ids = info
            .map_ids()
            .map_err(|e| {
                format!("the maps of the attached {program} program cannot be listed ({e})")
            })?
            .unwrap_or_default();
        for id in map_ids {
            let Ok(map) = MapInfo::from_id(id) else {
                continue;
            };
            let map_name = map.name_as_str().unwrap_or_default().to_string();
            users.entry(map_name).or_default().push((program, id));
        }
    }
    if let Some((id, (program, link))) = wanted.iter().find(|(id, _)| !found.contains(*id)) {
        return Err(format!(
            "the {program} program of the pinned {link} (program id {id}) is not loaded"
        ));
    }
    for (&name, &pinned_id) in pinned_ids {
        let used: &[(&str, u32)] = users.get(kernel_name(name)).map_or(&[], Vec::as_slice);
        let other: BTreeSet<u32> = used
            .iter()
            .map(|&(_, id)| id)
            .filter(|&id| id != pinned_id)
            .collect();
        if let Some(&(program, _)) = used.iter().find(|(_, id)| *id != pinned_id) {
            let ids: Vec<String> = other.iter().map(u32::to_string).collect();
            return Err(format!(
                "pinned {name} (map id {pinned_id}) is not the map the attached {program} program uses (id{} {})",
                if ids.len() > 1 { "s" } else { "" },
                ids.join(", ")
            ));
        }
        if used.is_empty() && expected.used_by_programs.contains(&name) {
            return Err(format!(
                "no attached program uses the pinned {name} (map id {pinned_id})"
            ));
        }
    }
    Ok(())
}

/// Reads the saved analyses and roots from pins about to be dropped, when their layout
/// is this build's; otherwise says why nothing can be read.
pub fn salvage(pin_dir: &Path, expected: &Expected) -> Result<Salvage, String> {
    check_layout(pin_dir)?;
    check_shapes(pin_dir, expected.object, &[ANALYSES_MAP, ROOTS_MAP], &[])?;
    let open = |name: &str| {
        open_pinned(pin_dir, name).map_err(|e| format!("pinned {name} cannot be read ({e})"))
    };
    let analyses = aya::maps::HashMap::<_, u64, AnalysisEntry>::try_from(open(ANALYSES_MAP)?)
        .map_err(|e| format!("pinned {ANALYSES_MAP} cannot be read ({e})"))?;
    let roots = aya::maps::HashMap::<_, u32, RootEntry>::try_from(open(ROOTS_MAP)?)
        .map_err(|e| format!("pinned {ROOTS_MAP} cannot be read ({e})"))?;
    let analyses: Vec<(u64, AnalysisEntry)> = sane_analyses(analyses.iter().filter_map(Result::ok));
    let roots = sane_roots(roots.iter().filter_map(Result::ok), &analyses);
    Ok(Salvage { analyses, roots })
}

/// The saved analyses that can be taken back: a key a daemon could have given, an id
/// of a length it could have saved. Anything else is dropped, with a warning.
pub fn sane_analyses(
    entries: impl Iterator<Item = (AnalysisKey, AnalysisEntry)>,
) -> Vec<(AnalysisKey, AnalysisEntry)> {
    let (sane, insane): (Vec<_>, Vec<_>) = entries.partition(|(key, entry)| {
        (1..=MAX_SANE_KEY).contains(key) && (1..=ANALYSIS_ID_MAX).contains(&(entry.id_len as usize))
    });
    if !insane.is_empty() {
        tracing::warn!(
            dropped = insane.len(),
            "saved analyses with an impossible key or id length were dropped"
        );
    }
    sane
}

/// The saved roots of known analyses, with a pid a daemon could have watched.
pub fn sane_roots(
    entries: impl Iterator<Item = (u32, RootEntry)>,
    analyses: &[(AnalysisKey, AnalysisEntry)],
) -> Vec<(u32, RootEntry)> {
    let keys: HashSet<AnalysisKey> = analyses.iter().map(|(key, _)| *key).collect();
    entries
        .filter(|(pid, root)| *pid > 1 && keys.contains(&root.analysis))
        .collect()
}

/// Says in one line why pinned state is dropped and what is kept of it.
pub fn dropping_line(pin_dir: &Path, reason: &str, salvage: &Result<Salvage, String>) -> String {
    let kept = match salvage {
        Ok(s) => format!(
            "{} saved analyses and {} roots were read first: the roots still running are watched again",
            s.analyses.len(),
            s.roots.len()
        ),
        Err(why) if why == reason => "nothing of it can be read: starting empty".to_string(),
        Err(why) => format!("nothing of it can be read ({why}): starting empty"),
    };
    format!(
        "pinned state in {} is not trusted: {reason}: dropping the pinned state and starting afresh; {kept}",
        pin_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> AnalysisEntry {
        let mut bytes = [0u8; ANALYSIS_ID_MAX];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        AnalysisEntry {
            id: bytes,
            id_len: id.len() as u32,
            owner_uid: 0,
            registered_unix_ms: 0,
            deadline_unix_ms: 0,
            limits: [0; watchdog_common::LIMIT_SLOTS],
        }
    }

    #[test]
    fn saved_entries_no_daemon_could_have_written_are_dropped() {
        let mut long = entry("x");
        long.id_len = ANALYSIS_ID_MAX as u32 + 1;
        let analyses = sane_analyses(
            [
                (1, entry("a")),
                (0, entry("zero key")),
                (u64::MAX, entry("would overflow the next key")),
                (2, entry("")),
                (3, long),
            ]
            .into_iter(),
        );
        let keys: Vec<u64> = analyses.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [1]);
        let root = |analysis| RootEntry {
            analysis,
            ..Default::default()
        };
        let roots = sane_roots(
            [(100, root(1)), (1, root(1)), (101, root(7))].into_iter(),
            &analyses,
        );
        let pids: Vec<u32> = roots.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            pids,
            [100],
            "init, and roots of unknown analyses, are dropped"
        );
    }

    #[test]
    fn the_drop_is_one_line_that_says_what_is_kept() {
        let dir = Path::new("/sys/fs/bpf/w");
        let kept = Ok(Salvage {
            analyses: vec![(1, entry("a"))],
            roots: vec![],
        });
        let line = dropping_line(dir, "pinned WATCHED (map id 9) is not ours", &kept);
        assert!(!line.contains('\n'));
        assert!(
            line.contains("1 saved analyses and 0 roots were read first"),
            "{line}"
        );
        let reason = "pinned LAYOUT is 0x1".to_string();
        let line = dropping_line(dir, &reason, &Err(reason.clone()));
        assert!(
            line.ends_with("nothing of it can be read: starting empty"),
            "{line}"
        );
    }

    #[test]
    fn this_build_has_a_layout_and_it_is_never_the_unwritten_zero() {
        assert_ne!(LAYOUT, 0);
    }
}
