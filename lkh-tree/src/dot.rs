//! Graphviz DOT output of a key tree, for pictures: internal nodes as ellipses, member leaves as
//! boxes, each labelled with its node id and key version (never key material).

use std::fmt::Write as _;

use crate::ids::NodeId;
use crate::rekey::KeyTree;

/// The tree as a DOT digraph (`dot -Tsvg` draws it).
pub fn tree_dot(tree: &KeyTree) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  node [fontname=\"monospace\"];\n",
        tree.group()
    );
    let mut stack = vec![NodeId::ROOT];
    while let Some(node) = stack.pop() {
        let version = tree.version(node).map_or(0, |v| v.0);
        let shape = if tree.is_member(node) {
            "box"
        } else {
            "ellipse"
        };
        let _ = writeln!(
            out,
            "  {node} [shape={shape}, label=\"{node}\\nv{version}\"];"
        );
        for child in tree.children(node) {
            let _ = writeln!(out, "  {node} -> {child};");
            stack.push(child);
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::{Batch, GroupId, TreeConfig};

    #[test]
    fn dot_lists_every_node_and_edge() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut tree = KeyTree::new(GroupId(1), TreeConfig::default(), &mut rng).unwrap();
        tree.rekey(
            &Batch {
                leaves: vec![],
                joins: 5,
            },
            &mut rng,
        )
        .unwrap();
        let dot = tree_dot(&tree);
        assert_eq!(dot.matches("shape=box").count(), 5);
        assert_eq!(dot.matches(" -> ").count(), tree.nodes().count() - 1);
        assert!(dot.starts_with("digraph"));
    }
}
