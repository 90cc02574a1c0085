//! `netsim paper`: published analysis next to netsim's measured numbers, with the deviation.
//!
//! - Wong, Gouda, Lam (1998): single-operation costs on a full d-ary tree of height L:
//!   group-/key-oriented leave d·L − 1, user-oriented leave (d − 1)·L(L + 1)/2, join (into a
//!   vacant slot) L multicast and L unicast keys; netsim's one-way leave (d − 1)·L next to them.
//! - Li, Yang, Gouda, Lam (2001): the expected encryptions of a batch of ℓ uniformly chosen
//!   leaves under the marking algorithm, on a full tree of N = d^h members:
//!   E(ℓ) = Σ_{k=0}^{h−1} d^k · d · (P_k − Q_{k+1}), with P_k = 1 − C(N − d^{h−k}, ℓ)/C(N, ℓ) the
//!   chance that a node at depth k loses a member and Q_j = C(N − d^{h−j}, ℓ − d^{h−j})/C(N, ℓ)
//!   that a given node at depth j loses all of them (it is pruned, nothing is wrapped for it).
//!   From it: the best degree for small batches, and the batch size from which a flat key star
//!   (every remaining member's key wraps the new group key: N − ℓ encryptions) costs less.
//! - Micciancio, Panjwani (2004): the floor of log2 N encryptions per change, amortized.
//! - RFC 9420 §7 (TreeKEM): a remove re-encrypts path secrets along the committer's direct
//!   path: about log2 N HPKE encryptions (one per copath resolution node in a full tree), each a
//!   32-byte KEM output plus a 48-byte ciphertext, so 80·log2 N bytes and log2 N public-key
//!   encapsulations per remove.

use serde::Serialize;

use crate::cost::{self, CostError, Scheme};

/// One row of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// What is compared.
    pub quantity: String,
    /// Members.
    pub members: usize,
    /// Degree (0 where it does not apply).
    pub degree: u8,
    /// The published (analytic) value.
    pub published: f64,
    /// netsim's measured value.
    pub measured: f64,
    /// (measured − published) / published.
    pub deviation: f64,
}

fn row(quantity: &str, members: usize, degree: u8, published: f64, measured: f64) -> Row {
    let deviation = if published == 0.0 {
        0.0
    } else {
        (measured - published) / published
    };
    Row {
        quantity: quantity.to_owned(),
        members,
        degree,
        published,
        measured,
        deviation,
    }
}

/// ln C(n, k), by summing logarithms (exact enough for n ≤ 10^6).
fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    let k = k.min(n - k);
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

/// C(a, b) / C(n, l) computed in logarithms; 0 when b is out of range.
fn ratio(a: u64, b: u64, n: u64, l: u64) -> f64 {
    if b > a {
        return 0.0;
    }
    (ln_choose(a, b) - ln_choose(n, l)).exp()
}

/// The expected encryptions of Li et al. for ℓ leaves on a full tree of degree d, height h.
pub fn expected_batch(degree: u8, height: u32, leaves: u64) -> f64 {
    expected_batch_paper(degree, height, leaves, 0).unwrap_or(f64::NAN)
}

/// The expected encryptions of Li et al.'s accounting (every renewed key under each child with
/// members, joiners' individual keys included) for ℓ uniformly chosen leaves and `joins` joins on
/// a full tree of degree d and height h, with gkm's placement of joiners: they take departed slots
/// first (a uniformly random J of the ℓ when J ≤ ℓ: the last vacated), and those beyond split
/// leaves, the leaf split and d − 1 joiners under each new node.
///
/// - J ≤ ℓ: Σ_k d^k · d · (P_k − Q'_{k+1}), where Q'_j = Q_j · C(ℓ − m_j, J) / C(ℓ, J): a child
///   subtree of m_j = d^{h−j} slots is pruned when all its members left and none of its slots
///   was refilled. J = 0 is [`expected_batch`]; J = ℓ prunes nothing.
/// - ℓ < J ≤ ℓ·d: every departed slot is refilled (nothing pruned), and the J − ℓ joiners beyond
///   split the leaves just refilled, so their ancestors are renewed already: Σ_k d^{k+1} P_k +
///   (J − ℓ) + ⌈(J − ℓ)/(d − 1)⌉, the last terms the new nodes' keys under their children.
///
/// `None` outside those ranges (joins into a tree no departure made room in).
pub fn expected_batch_paper(degree: u8, height: u32, leaves: u64, joins: u64) -> Option<f64> {
    let d = u64::from(degree);
    let n = d.pow(height);
    if joins > leaves.saturating_mul(d) || (leaves == 0 && joins > 0) || leaves > n {
        return None;
    }
    let refilled = joins.min(leaves);
    let tree: f64 = (0..height)
        .map(|k| {
            let nodes = d.pow(k) as f64;
            let size = d.pow(height - k);
            let child = size / d;
            let touched = 1.0 - ratio(n - size, leaves, n, leaves);
            let emptied = if leaves >= child {
                ratio(n - child, leaves - child, n, leaves)
                    * (ln_choose(leaves - child, refilled) - ln_choose(leaves, refilled)).exp()
            } else {
                0.0
            };
            nodes * d as f64 * (touched - emptied)
        })
        .sum();
    let beyond = joins - refilled;
    Some(tree + beyond as f64 + beyond.div_ceil(d - 1) as f64)
}

/// Every row of the comparison (`trials` batches per batch size).
pub fn table(trials: usize, seed: u64) -> Result<Vec<Row>, CostError> {
    let mut rows = Vec::new();
    // 4096 = 2^12 = 4^6 = 8^4: a full tree for each degree.
    for (d, l) in [(2u8, 12u32), (4, 6), (8, 4)] {
        let n = usize::from(d).pow(l);
        let (df, lf) = (f64::from(d), f64::from(l));
        let leave = cost::single(n, d, true, Scheme::Group, seed)?;
        rows.push(row(
            "WGL leave, group-oriented",
            n,
            d,
            df * lf - 1.0,
            leave.encryptions as f64,
        ));
        let user = cost::single(n, d, true, Scheme::User, seed)?;
        rows.push(row(
            "WGL leave, user-oriented",
            n,
            d,
            (df - 1.0) * lf * (lf + 1.0) / 2.0,
            user.encryptions as f64,
        ));
        let one_way = cost::single(n, d, true, Scheme::OneWay, seed)?;
        rows.push(row(
            "one-way leave (d-1)L",
            n,
            d,
            (df - 1.0) * lf,
            one_way.encryptions as f64,
        ));
        rows.push(row(
            "MP floor log2 n vs one-way leave",
            n,
            d,
            (n as f64).log2(),
            one_way.encryptions as f64,
        ));
        rows.push(row(
            "key star leave n-1 vs group leave",
            n,
            d,
            n as f64 - 1.0,
            leave.encryptions as f64,
        ));
        rows.push(row(
            "TreeKEM remove public-key encryptions log2 n vs group leave (symmetric wraps)",
            n,
            d,
            (n as f64).log2(),
            leave.encryptions as f64,
        ));
        rows.push(row(
            "TreeKEM remove bytes 80 log2 n vs group leave bytes",
            n,
            d,
            80.0 * (n as f64).log2(),
            leave.multicast_bytes as f64,
        ));
        for batch in [4usize, 16, 64, 256] {
            let measured = cost::batch(n, d, batch, 0, trials, Scheme::Group, seed)?;
            rows.push(row(
                &format!("Li et al. batch of {batch} leaves"),
                n,
                d,
                expected_batch(d, l, batch as u64),
                measured.encryptions_mean,
            ));
        }
        rows.extend(join_rows(d, l, trials, seed)?);
    }
    Ok(rows)
}

/// Batches with joins (J < ℓ, J = ℓ, J > ℓ, ℓ = 256): the paper's accounting against its
/// expectation, and gkm's next to it, with what gkm saves in multicast and pays in unicast.
fn join_rows(d: u8, l: u32, trials: usize, seed: u64) -> Result<Vec<Row>, CostError> {
    let n = usize::from(d).pow(l);
    let leaves = 256usize;
    let mut rows = Vec::new();
    for joins in [64usize, 256, 512] {
        let measured = cost::batch(n, d, leaves, joins, trials, Scheme::Group, seed)?;
        let expected = expected_batch_paper(d, l, leaves as u64, joins as u64).unwrap_or(f64::NAN);
        let case = format!("batch of {leaves} leaves, {joins} joins");
        rows.push(row(
            &format!("Li et al. {case}, paper accounting"),
            n,
            d,
            expected,
            measured.paper_encryptions_mean,
        ));
        rows.push(row(
            &format!("{case}: gkm multicast vs paper"),
            n,
            d,
            measured.paper_encryptions_mean,
            measured.gkm_encryptions_mean,
        ));
        rows.push(row(
            &format!("{case}: gkm unicast keys paid vs multicast saved"),
            n,
            d,
            measured.paper_encryptions_mean - measured.gkm_encryptions_mean,
            measured.unicast_keys_mean,
        ));
    }
    Ok(rows)
}

/// The degree with the fewest expected encryptions for a batch of `leaves` (among 2, 4, 8, 16 at
/// N = 4096 = 2^12 = 4^6 = 8^4 = 16^3), and the smallest batch from which a key star costs less
/// than the tree at degree 4.
pub fn summary() -> (Vec<(u64, u8)>, u64) {
    let shapes = [(2u8, 12u32), (4, 6), (8, 4), (16, 3)];
    let best = [1u64, 4, 16, 64, 256]
        .into_iter()
        .map(|leaves| {
            let (degree, _) = shapes
                .iter()
                .map(|&(d, h)| (d, expected_batch(d, h, leaves)))
                .fold(
                    (0, f64::INFINITY),
                    |acc, x| if x.1 < acc.1 { x } else { acc },
                );
            (leaves, degree)
        })
        .collect();
    let n = 4096u64;
    let star_wins = (1..n)
        .find(|&l| (n - l) as f64 <= expected_batch(4, 6, l))
        .unwrap_or(n);
    (best, star_wins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_with_joins_meet_the_paper_expectation_within_two_percent() {
        // N = 4096, d = 4, ℓ = 256: J < ℓ, J = ℓ and J > ℓ.
        for joins in [64usize, 256, 512] {
            let expected = expected_batch_paper(4, 6, 256, joins as u64).unwrap();
            let measured = cost::batch_counted(
                4096,
                4,
                (256, joins),
                12,
                Scheme::Group,
                3,
                cost::Accounting::Paper,
            )
            .unwrap();
            let deviation = (measured.encryptions_mean - expected).abs() / expected;
            assert!(
                deviation < 0.02,
                "J = {joins}: measured {:.1}, expected {expected:.1} ({:.2}%)",
                measured.encryptions_mean,
                deviation * 100.0
            );
            // gkm multicasts less (joiners' keys go by unicast, join-only keys wrap once).
            assert!(measured.gkm_encryptions_mean < measured.paper_encryptions_mean);
        }
        // No joins: the paper's count is the leaves-only expectation.
        let none = expected_batch_paper(4, 6, 256, 0).unwrap();
        assert!((none - expected_batch(4, 6, 256)).abs() < 1e-9);
        // J = ℓ prunes nothing: every touched node's key under all d children.
        assert!(expected_batch_paper(4, 6, 256, 256).unwrap() > none);
        assert_eq!(expected_batch_paper(4, 6, 0, 5), None);
    }

    #[test]
    fn the_batch_expectation_matches_single_operations_and_its_limits() {
        // One leave: exactly d·h − 1.
        assert!((expected_batch(4, 6, 1) - 23.0).abs() < 1e-9);
        assert!((expected_batch(2, 12, 1) - 23.0).abs() < 1e-9);
        // Everyone leaves: nothing is wrapped.
        assert!(expected_batch(4, 3, 64).abs() < 1e-9);
    }

    #[test]
    fn measured_batches_are_within_five_percent_of_the_expectation() {
        for (d, l) in [(2u8, 12u32), (4, 6)] {
            let n = usize::from(d).pow(l);
            for batch in [16usize, 64] {
                let measured = cost::batch(n, d, batch, 0, 20, Scheme::Group, 9).unwrap();
                let expected = expected_batch(d, l, batch as u64);
                let deviation = (measured.encryptions_mean - expected).abs() / expected;
                assert!(
                    deviation < 0.05,
                    "d={d} batch={batch}: {} vs {expected}",
                    measured.encryptions_mean
                );
            }
        }
    }
}
