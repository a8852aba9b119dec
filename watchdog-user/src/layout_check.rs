//! The layout's one rule, checked on the sources: imports between files go down the
//! stages (vocab, core, the edges, app, cli) and never in a cycle. An edge is a path
//! through `crate::` or `super::` in a file's product code (its `#[cfg(test)]` modules
//! and test-only files aside), resolved to the file that defines it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The stages, bottom first: a file may import from its own stage and those below.
const STAGES: [&str; 8] = [
    "vocab", "core", "os", "kernel", "store", "api", "app", "cli",
];

/// Files that exist only for tests.
const TEST_FILES: [&str; 3] = ["core/tests.rs", "api/protocol_fuzz.rs", "layout_check.rs"];

/// A file's module path: `core/rules/zombies.rs` is `core::rules::zombies`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("the source folder reads")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(
                path.strip_prefix(root)
                    .expect("under the root")
                    .to_path_buf(),
            );
        }
    }
}

/// The product code of a file: what comes before its first `#[cfg(test)]` module.
fn product_code(text: &str) -> &str {
    let mut end = text.len();
    for marker in [
        "#[cfg(test)]\nmod ",
        "#[cfg(test)]\npub(crate) mod ",
        "#[cfg(test)]\npub mod ",
    ] {
        if let Some(at) = text.find(marker) {
            end = end.min(at);
        }
    }
    &text[..end]
}

/// Every path a `use` tree spells out, `{a, b::{c, d}}` expanded.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(tree).trim().to_string()];
    };
    let head = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| match (head.is_empty(), p == "self") {
            (true, _) => p,
            (false, true) => head.to_string(),
            (false, false) => format!("{head}::{p}"),
        })
        .collect()
}

/// The paths a file names from the crate, absolute (`super::` resolved against `module`).
fn named_paths(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use crate::") {
        let after = &rest[at + "use crate::".len()..];
        let end = after.find(';').unwrap_or(after.len());
        paths.extend(
            expand(&after[..end])
                .into_iter()
                .map(|p| format!("crate::{p}")),
        );
        rest = &after[end..];
    }
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    for prefix in ["crate::", "super::"] {
        for (at, _) in code.match_indices(prefix) {
            // `pub(in crate::core)` is a visibility, not an import.
            if code[..at].ends_with(|c: char| is_ident(c) || c == ':')
                || code[..at].ends_with("(in ")
            {
                continue;
            }
            let tail: String = code[at..]
                .chars()
                .take_while(|&c| is_ident(c) || c == ':')
                .collect();
            paths.push(tail);
        }
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let segments: Vec<String> = p.split("::").map(str::to_string).collect();
            match segments.first().map(String::as_str) {
                Some("crate") => Some(segments[1..].to_vec()),
                Some("super") => {
                    let ups = segments.iter().take_while(|s| *s == "super").count();
                    let base = module.len().checked_sub(ups)?;
                    Some([&module[..base], &segments[ups..]].concat())
                }
                _ => None,
            }
        })
        .collect()
}

struct Layout {
    /// file → the files it imports from.
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Layout {
    fn read() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &root, &mut files);
        let modules: BTreeMap<Vec<String>, String> = files
            .iter()
            .map(|f| (module_of(f), f.to_string_lossy().into_owned()))
            .collect();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let name = file.to_string_lossy().into_owned();
            if TEST_FILES.contains(&name.as_str()) || name == "lib.rs" || name == "main.rs" {
                continue;
            }
            let text = std::fs::read_to_string(root.join(file)).expect("a source reads");
            let module = module_of(file);
            let targets = edges.entry(name.clone()).or_default();
            for path in named_paths(product_code(&text), &module) {
                // The longest prefix of the path that is a file's module defines it.
                let target = (1..=path.len()).rev().find_map(|n| modules.get(&path[..n]));
                if let Some(target) =
                    target.filter(|t| **t != name && !TEST_FILES.contains(&t.as_str()))
                {
                    targets.insert(target.clone());
                }
            }
        }
        Self { edges }
    }

    fn stage(file: &str) -> Option<usize> {
        let top = file.split('/').next()?.trim_end_matches(".rs");
        STAGES.iter().position(|s| *s == top)
    }

    /// Imports that go up the stages.
    fn upward(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (from, targets) in &self.edges {
            for to in targets {
                if let (Some(a), Some(b)) = (Self::stage(from), Self::stage(to))
                    && b > a
                {
                    out.push(format!(
                        "{from} -> {to} ({} imports from {})",
                        STAGES[a], STAGES[b]
                    ));
                }
            }
        }
        out
    }

    /// The strongly connected groups of more than one file (Tarjan).
    fn cycles(&self) -> Vec<Vec<String>> {
        struct Walk<'a> {
            edges: &'a BTreeMap<String, BTreeSet<String>>,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on_stack: BTreeSet<&'a str>,
            found: Vec<Vec<String>>,
        }
        impl<'a> Walk<'a> {
            fn visit(&mut self, v: &'a str) {
                let n = self.index.len();
                self.index.insert(v, n);
                self.low.insert(v, n);
                self.stack.push(v);
                self.on_stack.insert(v);
                for w in self.edges.get(v).into_iter().flatten() {
                    let w = w.as_str();
                    if !self.index.contains_key(w) {
                        self.visit(w);
                        let low = self.low[v].min(self.low[w]);
                        self.low.insert(v, low);
                    } else if self.on_stack.contains(w) {
                        let low = self.low[v].min(self.index[w]);
                        self.low.insert(v, low);
                    }
                }
                if self.low[v] == self.index[v] {
                    let mut group = Vec::new();
                    while let Some(w) = self.stack.pop() {
                        self.on_stack.remove(w);
                        group.push(w.to_string());
                        if w == v {
                            break;
                        }
                    }
                    if group.len() > 1 {
                        group.sort();
                        self.found.push(group);
                    }
                }
            }
        }
        let mut walk = Walk {
            edges: &self.edges,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            found: Vec::new(),
        };
        for v in self.edges.keys() {
            if !walk.index.contains_key(v.as_str()) {
                walk.visit(v);
            }
        }
        walk.found
    }
}

#[test]
fn imports_go_down_the_stages_and_never_in_a_cycle() {
    let layout = Layout::read();
    let edges: usize = layout.edges.values().map(BTreeSet::len).sum();
    let cycles = layout.cycles();
    let upward = layout.upward();
    println!(
        "layout: {} files, {edges} import edges, {} cycles, {} upward imports",
        layout.edges.len(),
        cycles.len(),
        upward.len()
    );
    assert!(cycles.is_empty(), "import cycles between files: {cycles:?}");
    assert!(
        upward.is_empty(),
        "imports up the stages:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_check_sees_cycles_and_upward_imports() {
    let mut edges = BTreeMap::new();
    edges.insert(
        "core/a.rs".to_string(),
        BTreeSet::from(["app/b.rs".to_string()]),
    );
    edges.insert(
        "app/b.rs".to_string(),
        BTreeSet::from(["core/a.rs".to_string()]),
    );
    let layout = Layout { edges };
    assert_eq!(
        layout.cycles(),
        vec![vec!["app/b.rs".to_string(), "core/a.rs".to_string()]]
    );
    assert_eq!(layout.upward().len(), 1);
    let module = vec![
        "core".to_string(),
        "rules".to_string(),
        "zombies".to_string(),
    ];
    let found = named_paths(
        "use crate::{vocab::{limits::Limits, process}, core::Core};\nsuper::Thing",
        &module,
    );
    assert!(found.contains(&vec!["vocab".into(), "limits".into(), "Limits".into()]));
    assert!(found.contains(&vec!["vocab".into(), "process".into()]));
    assert!(found.contains(&vec!["core".into(), "rules".into(), "Thing".into()]));
}
