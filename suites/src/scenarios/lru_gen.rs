//! MGLRU's debugfs files read (`/sys/kernel/debug/lru_gen`, `lru_gen_full`; mm/vmscan.c,
//! `lru_gen_seq_show`), one block per memory cgroup:
//!
//! ```text
//! memcg     5 /trackcheck-mglru-1-0        6.12: "%5hu" (the memcg's private id)
//! memcg 4711 /trackcheck-mglru-1-0         7.x: "%llu" (the cgroup's id: its inode number)
//!  node     0
//!           3      1042       2048         12     seq, age (ms), anon pages, file pages
//!           4        10          0          0     the last row's seq is max_seq
//! ```
//!
//! `lru_gen_full` adds, under each generation row, one line per tier and a line of the
//! mm walk's counters: `total young found added` (MM_LEAF_TOTAL, MM_LEAF_YOUNG,
//! MM_NONLEAF_FOUND, MM_NONLEAF_ADDED), each number followed by a mark. Without
//! CONFIG_LRU_GEN_STATS the max_seq row's line is marked `TYFA` and the counters only grow
//! (a delta between two reads counts the walks in between); with it, the other rows' lines are
//! marked `tyfa` and each counts the walk that made that generation. Older kernels print six
//! counters (`LOYNFA`: leaf total, old, young, non-leaf total, found, added); the marks say which
//! is which. Numbers that do not apply carry `x`. Rows are told apart by their first token:
//! a bare number starts a generation row or a tier line (seven tokens), a marked one an mm-walk
//! line.

/// One memory cgroup's state on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Lruvec {
    pub nid: u32,
    /// The youngest generation's sequence number.
    pub max_seq: u64,
    /// Anon and file pages over the generations shown.
    pub anon: u64,
    pub file: u64,
    /// The mm walk's counters, if shown (`lru_gen_full`).
    pub walk: Option<Walk>,
}

/// The mm walk's counters of one lruvec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Walk {
    /// Leaf entries (PTEs, PMDs) walked.
    pub total: u64,
    /// Of those, found young (in the primary MMU or, through the MMU notifier, a secondary
    /// one such as KVM's).
    pub young: u64,
    /// Whether these are running totals (uppercase marks: a delta between reads counts the
    /// walks in between) or sums of per-generation counts (lowercase: reset as generations
    /// are reused).
    pub cumulative: bool,
}

/// One memory cgroup's block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Memcg {
    pub id: u64,
    /// Its cgroup path (`/` for the root, empty where memcg is disabled).
    pub path: String,
    pub nodes: Vec<Lruvec>,
}

impl Memcg {
    /// Anon pages over every node.
    pub(super) fn anon(&self) -> u64 {
        self.nodes.iter().map(|n| n.anon).sum()
    }

    /// The mm walk's counters summed over nodes, if any node shows them.
    pub(super) fn walk(&self) -> Option<Walk> {
        self.nodes
            .iter()
            .filter_map(|n| n.walk)
            .reduce(|a, b| Walk {
                total: a.total + b.total,
                young: a.young + b.young,
                cumulative: a.cumulative && b.cumulative,
            })
    }
}

/// A number with its mark, if any (`123`, `123x`, `45T`).
fn marked(token: &str) -> Option<(u64, Option<char>)> {
    let mark = token.chars().last().filter(char::is_ascii_alphabetic);
    let digits = if mark.is_some() {
        &token[..token.len() - 1]
    } else {
        token
    };
    digits.parse().ok().map(|n| (n, mark))
}

/// Every memcg block of `text`.
pub(super) fn parse(text: &str) -> Vec<Memcg> {
    let mut out: Vec<Memcg> = Vec::new();
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens.as_slice() {
            ["memcg", id, path @ ..] => out.push(Memcg {
                id: id.parse().unwrap_or(0),
                path: path.join(" "),
                nodes: Vec::new(),
            }),
            ["node", nid] => {
                if let Some(m) = out.last_mut() {
                    m.nodes.push(Lruvec {
                        nid: nid.parse().unwrap_or(0),
                        ..Lruvec::default()
                    });
                }
            }
            [first, ..] => {
                let Some(node) = out.last_mut().and_then(|m| m.nodes.last_mut()) else {
                    continue;
                };
                let Some((_, mark)) = marked(first) else {
                    continue;
                };
                if mark.is_some() {
                    walk_line(&tokens, node);
                } else if let [seq, age, anon, file] = tokens.as_slice() {
                    let (Some((seq, None)), Some((_, None)), Some((anon, _)), Some((file, _))) =
                        (marked(seq), marked(age), marked(anon), marked(file))
                    else {
                        continue;
                    };
                    node.max_seq = seq;
                    node.anon += anon;
                    node.file += file;
                }
            }
            [] => {}
        }
    }
    out
}

/// An mm-walk line: `T`/`L` is the leaf total, `Y` the young leaves (any case; `x` is n/a).
fn walk_line(tokens: &[&str], node: &mut Lruvec) {
    let mut seen = false;
    let mut w = node.walk.unwrap_or_default();
    for t in tokens {
        let Some((n, Some(mark))) = marked(t) else {
            continue;
        };
        match mark {
            'T' | 'L' | 't' | 'l' => w.total += n,
            'Y' | 'y' => w.young += n,
            _ => continue,
        }
        if !seen {
            w.cumulative = mark.is_ascii_uppercase();
            seen = true;
        }
    }
    if seen {
        node.walk = Some(w);
    }
}

/// The block of the cgroup whose path ends in `/name`.
pub(super) fn find<'a>(memcgs: &'a [Memcg], name: &str) -> Option<&'a Memcg> {
    memcgs
        .iter()
        .find(|m| m.path.rsplit('/').next() == Some(name) && !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{Walk, find, parse};

    /// `lru_gen` on 6.12: ids padded (`%5hu`), rows from min_seq[anon].
    const V6_12: &str = "memcg     1 /
 node     0
          5      46180       1024       2210
          6      30114          0       8123
          7       1200         33        900
          8         15          0         12
memcg     5 /trackcheck-mglru-77-0
 node     0
         11        400       2048          0
         12          3        100          1
";

    /// `lru_gen` on 7.x: the id is the cgroup's inode number, unpadded; two nodes.
    const V7: &str = "memcg 1 /
 node 0
          2      90000        512       4000
          3         10          0          0
memcg 8812 /trackcheck-mglru-77-1
 node 0
          4       1000       2000          0
          5          1         60          0
 node 1
          2        900          7          0
          3          2          0          0
";

    /// `lru_gen_full` (6.12, no CONFIG_LRU_GEN_STATS): tiers, and the mm walk's running
    /// totals on the max_seq row; rows below min_seq marked `x`.
    const FULL: &str = "memcg     5 /trackcheck-mglru-77-0
 node     0
          9        900          0x         0 
                     0          0r          0e          0p          0r          0e          0p
                     1          0r          0e          0p          0r          0e          0p
                     2          0r          0e          0p          0r          0e          0p
                     3          0r          0e          0p          0r          0e          0p
                                0x          0x          0x          0x
         10        500       1900          0 
                     0          0r          0e          0p          0r          0e          0p
                     1          0r          0e          0p          0r          0e          0p
                     2          0r          0e          0p          0r          0e          0p
                     3          0r          0e          0p          0r          0e          0p
                                0x          0x          0x          0x
         11          5        148          0 
                     0          0R         12T          0x          0R          0T          0x
                     1          0R          0T          0x          0R          0T          0x
                     2          0R          0T          0x          0R          0T          0x
                     3          0R          0T          0x          0R          0T          0x
                            61440T       4100Y         30F          2A
";

    #[test]
    fn v6_12_padded_ids_and_max_seq() {
        let m = parse(V6_12);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].id, m[0].path.as_str()), (1, "/"));
        assert_eq!(m[0].nodes[0].max_seq, 8);
        let ours = find(&m, "trackcheck-mglru-77-0").expect("found by name");
        assert_eq!(ours.id, 5);
        assert_eq!(ours.nodes.len(), 1);
        assert_eq!((ours.nodes[0].max_seq, ours.anon()), (12, 2148));
        assert_eq!(ours.walk(), None);
        assert!(find(&m, "trackcheck-mglru-77").is_none());
    }

    #[test]
    fn v7_inode_ids_and_every_node() {
        let m = parse(V7);
        let ours = find(&m, "trackcheck-mglru-77-1").expect("found");
        assert_eq!(ours.id, 8812);
        let nodes: Vec<(u32, u64)> = ours.nodes.iter().map(|n| (n.nid, n.max_seq)).collect();
        assert_eq!(nodes, vec![(0, 5), (1, 3)]);
        assert_eq!(ours.anon(), 2067);
    }

    #[test]
    fn full_gives_the_walks_running_totals() {
        let m = parse(FULL);
        let ours = find(&m, "trackcheck-mglru-77-0").expect("found");
        assert_eq!(ours.nodes[0].max_seq, 11);
        assert_eq!(ours.anon(), 2048);
        assert_eq!(
            ours.walk(),
            Some(Walk {
                total: 61440,
                young: 4100,
                cumulative: true
            })
        );
    }

    #[test]
    fn per_generation_and_older_counters() {
        // CONFIG_LRU_GEN_STATS: lowercase per generation, summed; `x` rows ignored.
        let stats = "memcg 3 /a\n node 0\n 4 10 5 0\n                 10t 4y 0f 0a\n \
                     5 1 6 0\n                 0x 0x 0x 0x\n";
        let m = parse(stats);
        let w = m[0].walk().expect("walk");
        assert_eq!((w.total, w.young, w.cumulative), (10, 4, false));
        // Six counters (LOYNFA) on older kernels.
        let old = "memcg 3 /a\n node 0\n 4 10 5 0\n      100L 60O 40Y 3N 2F 1A\n";
        let w = parse(old)[0].walk().expect("walk");
        assert_eq!((w.total, w.young, w.cumulative), (100, 40, true));
    }
}
