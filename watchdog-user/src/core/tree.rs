//! The live parentage tree of watched processes. Every question the per-event path
//! asks is answered from an index: a node by pid, the children of a pid, the members
//! of an analysis and the sum of their RSS. Nothing here scans all nodes except the
//! views (`roots`, `iter`) that a person asks for.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::vocab::process::{AnalysisKey, Comm, ProcRef, same_start};

#[derive(Debug, Clone)]
pub struct Node {
    pub pid: u32,
    pub ppid: u32,
    /// CLOCK_BOOTTIME ns: with `pid`, the identity of the process.
    pub start_ns: u64,
    pub comm: Comm,
    pub analysis: AnalysisKey,
    /// Its parent died while it lived on.
    pub orphan: bool,
    /// A per-process memory violation was acted on (once).
    pub memory_violated: bool,
    /// Last RSS known, from the kernel's fast path or the poll. Changed only through
    /// [`Tree::set_rss`], which keeps the analysis' sum.
    rss_bytes: u64,
}

impl Node {
    pub fn new(pid: u32, ppid: u32, start_ns: u64, comm: Comm, analysis: AnalysisKey) -> Self {
        Self {
            pid,
            ppid,
            start_ns,
            comm,
            analysis,
            orphan: false,
            memory_violated: false,
            rss_bytes: 0,
        }
    }

    pub fn rss_bytes(&self) -> u64 {
        self.rss_bytes
    }

    pub fn proc_ref(&self) -> ProcRef {
        ProcRef {
            pid: self.pid,
            start_ns: self.start_ns,
        }
    }
}

#[derive(Default)]
struct Members {
    pids: HashSet<u32>,
    rss_sum: u64,
}

#[derive(Default)]
pub struct Tree {
    nodes: HashMap<u32, Node>,
    /// ppid → the nodes naming it as their parent, whether or not the parent is in the
    /// tree: a parent inserted after its children (resync, registration) finds them
    /// here instead of scanning every node.
    children: HashMap<u32, BTreeSet<u32>>,
    members: HashMap<AnalysisKey, Members>,
}

impl Tree {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn get(&self, pid: u32) -> Option<&Node> {
        self.nodes.get(&pid)
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.nodes.contains_key(&pid)
    }

    /// Whether `process` is in the tree: the same pid *and* start time.
    pub fn holds(&self, process: ProcRef) -> bool {
        self.nodes
            .get(&process.pid)
            .is_some_and(|n| same_start(n.start_ns, process.start_ns))
    }

    /// Adds a process, replacing a stale node of a recycled PID (returned).
    pub fn insert(&mut self, node: Node) -> Option<Node> {
        let stale = self.remove(node.pid);
        self.children.entry(node.ppid).or_default().insert(node.pid);
        let members = self.members.entry(node.analysis).or_default();
        members.pids.insert(node.pid);
        members.rss_sum += node.rss_bytes;
        self.nodes.insert(node.pid, node);
        stale
    }

    /// Removes one process; its children stay, as roots until something adopts them.
    pub fn remove(&mut self, pid: u32) -> Option<Node> {
        let node = self.nodes.remove(&pid)?;
        self.unlink_child(node.ppid, pid);
        if let Some(members) = self.members.get_mut(&node.analysis) {
            members.pids.remove(&pid);
            members.rss_sum -= node.rss_bytes;
            if members.pids.is_empty() {
                self.members.remove(&node.analysis);
            }
        }
        Some(node)
    }

    fn unlink_child(&mut self, ppid: u32, pid: u32) {
        if let Some(siblings) = self.children.get_mut(&ppid) {
            siblings.remove(&pid);
            if siblings.is_empty() {
                self.children.remove(&ppid);
            }
        }
    }

    /// Records a process' RSS, keeping its analysis' sum; returns its analysis and the
    /// new sum.
    pub fn set_rss(&mut self, pid: u32, rss_bytes: u64) -> Option<(AnalysisKey, u64)> {
        let node = self.nodes.get_mut(&pid)?;
        let old = std::mem::replace(&mut node.rss_bytes, rss_bytes);
        let members = self.members.get_mut(&node.analysis)?;
        members.rss_sum = members.rss_sum - old + rss_bytes;
        Some((node.analysis, members.rss_sum))
    }

    pub fn set_comm(&mut self, pid: u32, comm: Comm) {
        if let Some(node) = self.nodes.get_mut(&pid) {
            node.comm = comm;
        }
    }

    /// Flags `pid` as an orphan; false when it was already flagged (or is not here).
    pub fn mark_orphan(&mut self, pid: u32) -> bool {
        self.nodes
            .get_mut(&pid)
            .is_some_and(|n| !std::mem::replace(&mut n.orphan, true))
    }

    /// Flags a per-process memory violation; false when it was already acted on.
    pub fn mark_memory_violated(&mut self, pid: u32) -> bool {
        self.nodes
            .get_mut(&pid)
            .is_some_and(|n| !std::mem::replace(&mut n.memory_violated, true))
    }

    /// Moves `pid` under its new parent (after reparenting by the kernel).
    pub fn reparent(&mut self, pid: u32, new_ppid: u32) {
        let Some(old) = self.nodes.get(&pid).map(|n| n.ppid) else {
            return;
        };
        self.unlink_child(old, pid);
        self.children.entry(new_ppid).or_default().insert(pid);
        self.nodes.get_mut(&pid).expect("checked").ppid = new_ppid;
    }

    /// The watched children of `pid`, by pid.
    pub fn children_of(&self, pid: u32) -> impl Iterator<Item = u32> + '_ {
        self.children.get(&pid).into_iter().flatten().copied()
    }

    /// `pid` and every watched descendant of it, parents before children.
    pub fn subtree(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            if self.nodes.contains_key(&p) {
                out.push(p);
                stack.extend(self.children_of(p));
            }
        }
        out
    }

    /// The processes of one analysis.
    pub fn members(&self, analysis: AnalysisKey) -> Vec<u32> {
        self.members
            .get(&analysis)
            .map(|m| m.pids.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn member_count(&self, analysis: AnalysisKey) -> usize {
        self.members.get(&analysis).map_or(0, |m| m.pids.len())
    }

    pub fn has_analysis(&self, analysis: AnalysisKey) -> bool {
        self.members.contains_key(&analysis)
    }

    /// The RSS summed over an analysis' processes, as last known.
    pub fn rss_sum(&self, analysis: AnalysisKey) -> u64 {
        self.members.get(&analysis).map_or(0, |m| m.rss_sum)
    }

    /// Nodes whose parent is not in the tree, in pid order (a view: scans).
    pub fn roots(&self) -> Vec<&Node> {
        let mut roots: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| !self.nodes.contains_key(&n.ppid))
            .collect();
        roots.sort_by_key(|n| n.pid);
        roots
    }

    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: u32, ppid: u32) -> Node {
        Node::new(pid, ppid, 0, Comm::new(&format!("p{pid}")), 1)
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
        tree.insert(node(20, 10));
        tree.insert(node(30, 20));
        tree.remove(20);
        let roots: Vec<u32> = tree.roots().iter().map(|n| n.pid).collect();
        assert_eq!(roots, vec![10, 30]);
        assert_eq!(tree.children_of(10).count(), 0);
    }

    #[test]
    fn analysis_members_and_rss_sums_follow_inserts_updates_and_removals() {
        let mut tree = Tree::default();
        tree.insert(node(10, 1));
        tree.insert(node(20, 10));
        let mut other = node(30, 1);
        other.analysis = 2;
        tree.insert(other);
        assert_eq!(tree.set_rss(10, 100), Some((1, 100)));
        assert_eq!(tree.set_rss(20, 50), Some((1, 150)));
        assert_eq!(tree.set_rss(30, 7), Some((2, 7)));
        assert_eq!(tree.set_rss(20, 20), Some((1, 120)));
        assert_eq!(tree.member_count(1), 2);
        tree.remove(10);
        assert_eq!((tree.rss_sum(1), tree.member_count(1)), (20, 1));
        tree.remove(20);
        assert!(!tree.has_analysis(1));
        assert_eq!(tree.rss_sum(2), 7);
    }

    #[test]
    fn a_recycled_pid_replaces_the_stale_node_and_its_sum() {
        let mut tree = Tree::default();
        tree.insert(node(10, 1));
        tree.set_rss(10, 100);
        let stale = tree.insert(Node::new(10, 5, 99, Comm::new("new"), 1));
        assert_eq!(stale.map(|n| n.rss_bytes()), Some(100));
        assert_eq!((tree.rss_sum(1), tree.get(10).unwrap().ppid), (0, 5));
    }

    #[test]
    fn reparenting_moves_a_child_between_parents() {
        let mut tree = Tree::default();
        tree.insert(node(10, 1));
        tree.insert(node(11, 1));
        tree.insert(node(20, 10));
        tree.reparent(20, 11);
        assert_eq!(tree.children_of(10).count(), 0);
        assert_eq!(tree.children_of(11).collect::<Vec<_>>(), vec![20]);
    }
}
