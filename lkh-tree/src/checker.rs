//! An independent key-graph checker (petgraph): from the keys an adversary holds and the rekeys
//! it has seen, which keys can it reach by decrypting?
//!
//! The graph has one vertex per key instance (node, version) and an edge from the wrapping key to
//! the wrapped key for every encryption, and from the old to the new key for every hash-forward
//! advance (anyone holding the old key computes the new one), and from child to parent for every
//! one-way link (conservatively, as if the child's key and not only its seed gave the parent's).
//! Reachability is breadth-first search. It does not look at ciphertexts: it checks the *structure* of the rekeys the tree
//! produced, independently of the code that produced them.

use std::collections::HashSet;

use petgraph::graphmap::DiGraphMap;
use petgraph::visit::Bfs;

use crate::ids::{KeyVersion, NodeId};
use crate::rekey::Rekey;

/// One key instance: a node's key at one version.
pub type KeyInstance = (NodeId, KeyVersion);

/// The key graph of every rekey added so far.
#[derive(Debug, Default)]
pub struct KeyGraph {
    graph: DiGraphMap<(u32, u64), ()>,
}

impl KeyGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the encryptions and advances of one rekey.
    pub fn add_rekey(&mut self, rekey: &Rekey) {
        let target_version = rekey.epoch.version().0;
        for e in &rekey.encryptions {
            self.graph.add_edge(
                (e.wrapping.0, e.wrapping_version.0),
                (e.target.0, target_version),
                (),
            );
        }
        for l in &rekey.links {
            self.graph.add_edge(
                (l.child.0, target_version),
                (l.parent.0, target_version),
                (),
            );
        }
        for a in &rekey.advances {
            self.graph
                .add_edge((a.node.0, a.from.0), (a.node.0, target_version), ());
        }
    }

    /// Every key instance reachable from `held` (including `held` itself).
    pub fn reachable(&self, held: impl IntoIterator<Item = KeyInstance>) -> HashSet<KeyInstance> {
        let mut out = HashSet::new();
        for (node, version) in held {
            let start = (node.0, version.0);
            out.insert((node, version));
            if !self.graph.contains_node(start) {
                continue;
            }
            let mut bfs = Bfs::new(&self.graph, start);
            while let Some((n, v)) = bfs.next(&self.graph) {
                out.insert((NodeId(n), KeyVersion(v)));
            }
        }
        out
    }

    /// Edges in the graph (encryptions plus advances).
    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::{GroupId, KeyTree, TreeConfig};

    #[test]
    fn departed_member_reaches_nothing_new() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut tree = KeyTree::new(GroupId(1), TreeConfig::default(), &mut rng).unwrap();
        let mut graph = KeyGraph::new();
        let mut held = Vec::new();
        for _ in 0..20 {
            let rekey = tree.join(&mut rng).unwrap();
            graph.add_rekey(&rekey);
            for j in &rekey.joiners {
                held.push(j.path.clone());
            }
        }
        let victim = held[3].clone();
        let rekey = tree.leave(victim.leaf(), &mut rng).unwrap();
        graph.add_rekey(&rekey);
        let known = graph.reachable(victim.keys().iter().map(|k| (k.node, k.version)));
        let root = (NodeId::ROOT, tree.version(NodeId::ROOT).unwrap());
        assert!(!known.contains(&root));
        // And a member that stayed does reach the new root.
        let stayer = &held[4];
        let known = graph.reachable(stayer.keys().iter().map(|k| (k.node, k.version)));
        assert!(known.contains(&root));
    }
}
