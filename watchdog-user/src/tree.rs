//! The live parentage tree of watched processes, and the registry of analyses.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use crate::policy::Limits;

/// Daemon-assigned analysis key: what the kernel map stores instead of the id string.
pub type AnalysisKey = u64;

#[derive(Debug, Clone)]
pub struct Node {
    pub pid: u32,
    pub ppid: u32,
    /// CLOCK_BOOTTIME ns: with `pid`, the identity of the process.
    pub start_ns: u64,
    pub comm: String,
    pub analysis: AnalysisKey,
    pub children: BTreeSet<u32>,
    /// Its parent died while it lived on.
    pub orphan: bool,
    /// A per-process memory violation was acted on (once).
    pub memory_violated: bool,
    /// Last RSS known, from the kernel's fast path or the poll.
    pub rss_bytes: u64,
}

impl Node {
    pub fn new(pid: u32, ppid: u32, start_ns: u64, comm: String, analysis: AnalysisKey) -> Self {
        Self {
            pid,
            ppid,
            start_ns,
            comm,
            analysis,
            children: BTreeSet::new(),
            orphan: false,
            memory_violated: false,
            rss_bytes: 0,
        }
    }
}

#[derive(Default)]
pub struct Tree {
    nodes: HashMap<u32, Node>,
    /// Live processes per analysis, kept so "is this analysis over?" is O(1) per exit.
    per_analysis: HashMap<AnalysisKey, usize>,
}

impl Tree {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn get(&self, pid: u32) -> Option<&Node> {
        self.nodes.get(&pid)
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.nodes.contains_key(&pid)
    }

    /// Adds a process (replacing a stale node of a recycled PID) under its parent, and
    /// adopts children that were added before it.
    pub fn insert(&mut self, mut node: Node) {
        if self.nodes.contains_key(&node.pid) {
            self.remove(node.pid);
        }
        node.children = self
            .nodes
            .values()
            .filter(|n| n.ppid == node.pid)
            .map(|n| n.pid)
            .collect();
        self.link(node);
    }

    fn link(&mut self, node: Node) {
        if let Some(parent) = self.nodes.get_mut(&node.ppid) {
            parent.children.insert(node.pid);
        }
        *self.per_analysis.entry(node.analysis).or_default() += 1;
        self.nodes.insert(node.pid, node);
    }

    /// Adds a child reported by a fork event. Its parent is in the tree (or was a root's
    /// unwatched parent), so it has no children yet: no adoption scan on this hot path.
    pub fn insert_forked(&mut self, node: Node) {
        if self.nodes.contains_key(&node.pid) {
            return self.insert(node);
        }
        self.link(node);
    }

    /// Removes one process; its children stay, as roots until something adopts them.
    pub fn remove(&mut self, pid: u32) -> Option<Node> {
        let node = self.nodes.remove(&pid)?;
        if let Some(parent) = self.nodes.get_mut(&node.ppid) {
            parent.children.remove(&pid);
        }
        if let Some(count) = self.per_analysis.get_mut(&node.analysis) {
            *count -= 1;
            if *count == 0 {
                self.per_analysis.remove(&node.analysis);
            }
        }
        Some(node)
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Node> {
        self.nodes.get_mut(&pid)
    }

    /// Moves `pid` under its new parent (after reparenting by the kernel).
    pub fn reparent(&mut self, pid: u32, new_ppid: u32) {
        let Some(old) = self.nodes.get(&pid).map(|n| n.ppid) else {
            return;
        };
        if let Some(parent) = self.nodes.get_mut(&old) {
            parent.children.remove(&pid);
        }
        if let Some(parent) = self.nodes.get_mut(&new_ppid) {
            parent.children.insert(pid);
        }
        self.nodes.get_mut(&pid).expect("checked").ppid = new_ppid;
    }

    /// `pid` and every watched descendant of it, parents before children.
    pub fn subtree(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            if let Some(node) = self.nodes.get(&p) {
                out.push(p);
                stack.extend(node.children.iter().copied());
            }
        }
        out
    }

    pub fn pids_of(&self, analysis: AnalysisKey) -> Vec<u32> {
        self.nodes
            .values()
            .filter(|n| n.analysis == analysis)
            .map(|n| n.pid)
            .collect()
    }

    pub fn has_analysis(&self, analysis: AnalysisKey) -> bool {
        self.per_analysis.contains_key(&analysis)
    }

    /// Nodes whose parent is not in the tree, in pid order.
    pub fn roots(&self) -> Vec<&Node> {
        let mut roots: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| !self.nodes.contains_key(&n.ppid))
            .collect();
        roots.sort_by_key(|n| n.pid);
        roots
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.keys().copied().collect()
    }
}

/// One analysis: its id, its limits and its clock.
pub struct Analysis {
    pub id: String,
    pub limits: Limits,
    pub deadline: Instant,
    /// The same deadline on the wall clock, for people and for latency measurements.
    pub deadline_wall: std::time::SystemTime,
    pub registered_wall: std::time::SystemTime,
    /// A whole-analysis kill (timeout, tree memory) was started: do not start another.
    pub violated: bool,
}

/// Analyses by id and by the small key the kernel map holds.
#[derive(Default)]
pub struct Analyses {
    by_key: HashMap<AnalysisKey, Analysis>,
    by_id: HashMap<String, AnalysisKey>,
    last_key: AnalysisKey,
}

impl Analyses {
    /// The key of analysis `id`, created with `limits` (its clock starting now) when new.
    pub fn key_for(&mut self, id: &str, limits: &Limits) -> AnalysisKey {
        if let Some(&key) = self.by_id.get(id) {
            return key;
        }
        self.last_key += 1;
        let analysis = Analysis {
            id: id.to_string(),
            limits: limits.clone(),
            deadline: Instant::now() + limits.timeout(),
            deadline_wall: std::time::SystemTime::now() + limits.timeout(),
            registered_wall: std::time::SystemTime::now(),
            violated: false,
        };
        self.by_key.insert(self.last_key, analysis);
        self.by_id.insert(id.to_string(), self.last_key);
        self.last_key
    }

    /// Puts back an analysis a previous daemon saved (after a restart).
    pub fn restore(&mut self, key: AnalysisKey, analysis: Analysis) {
        self.by_id.insert(analysis.id.clone(), key);
        self.by_key.insert(key, analysis);
        self.last_key = self.last_key.max(key);
    }

    pub fn key(&self, id: &str) -> Option<AnalysisKey> {
        self.by_id.get(id).copied()
    }

    pub fn id(&self, key: AnalysisKey) -> Option<&str> {
        self.by_key.get(&key).map(|a| a.id.as_str())
    }

    pub fn get(&self, key: AnalysisKey) -> Option<&Analysis> {
        self.by_key.get(&key)
    }

    pub fn get_mut(&mut self, key: AnalysisKey) -> Option<&mut Analysis> {
        self.by_key.get_mut(&key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (AnalysisKey, &Analysis)> {
        self.by_key.iter().map(|(k, a)| (*k, a))
    }

    pub fn forget(&mut self, key: AnalysisKey) {
        if let Some(analysis) = self.by_key.remove(&key) {
            self.by_id.remove(&analysis.id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: u32, ppid: u32) -> Node {
        Node::new(pid, ppid, 0, format!("p{pid}"), 1)
    }

    #[test]
    fn a_parent_inserted_after_its_child_adopts_it() {
        let mut tree = Tree::default();
        tree.insert(node(20, 10));
        tree.insert(node(10, 1));
        assert_eq!(
            tree.roots().iter().map(|n| n.pid).collect::<Vec<_>>(),
            vec![10]
        );
        assert_eq!(tree.subtree(10), vec![10, 20]);
    }

    #[test]
    fn removing_a_parent_leaves_its_children_as_roots() {
        let mut tree = Tree::default();
        tree.insert(node(10, 1));
        tree.insert_forked(node(20, 10));
        tree.insert_forked(node(30, 20));
        tree.remove(20);
        let roots: Vec<u32> = tree.roots().iter().map(|n| n.pid).collect();
        assert_eq!(roots, vec![10, 30]);
        assert!(tree.get(10).unwrap().children.is_empty());
    }
}
