//! Signatures of recorded failures: how a golden entry says *which* failure it expects.
//!
//! A signature is one clause per fail kind the entry records; a failure is inside it when its
//! fail kind has a clause and every finding of the failure is explained by the clause of its
//! kind: every lost page satisfies every predicate of the `lost` clause, every hazard is of a
//! class the `hazard` clause lists, problems appear only where a `problem` clause is recorded.
//! Lost and hazard are different kinds: a trial recorded for its hazards that loses a page
//! fails as a new failure, and the other way round.
//!
//! Written in the golden file as `lost(p1+p2)|hazard(c1,c2)`: `+` is "and" (every lost page
//! satisfies p1 and p2), `,` is "or" (every hazard is of class c1 or c2); `any` is the widest
//! clause (any lost page, any hazard). [`LEGEND`] says in words what each name means, and
//! blessing writes it into the file's header.
//!
//! What a signature can see: the facts each lost page carries (its vCPU, write sequence,
//! round, and where the driver records them: `ring_full`, `block_reported`) and the trial's
//! hazard lines. A predicate that needs a fact the run did not record (`None`) does not hold:
//! a failure whose facts are unknown is outside every signature that needs them. What it cannot
//! see: the cause. A different kernel bug producing losses with the same facts is absorbed;
//! the predicates are chosen so that the recorded bugs' facts are narrow (the silent
//! neighbours of a reported page; the last writes of a vCPU the ring overflow stopped).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use trackcheck_harness::oracle::LostPage;

use crate::trial::{FailKind, TrialResult};

/// A predicate on one lost page (with its trial for context).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PagePredicate {
    /// The writing vCPU took a KVM_EXIT_DIRTY_RING_FULL exit in the round the loss belongs to.
    RingFullWriter,
    /// The mechanism reported at least one page of the lost page's 2 MiB-aligned
    /// guest-physical block in that round or the one before: a silent neighbour of a reported page.
    BlockReported,
    /// The lost write is among the last `n` writes of a vCPU that the trial reports stuck on
    /// KVM_EXIT_DIRTY_RING_FULL (its published progress minus the write's seq is below `n`).
    StuckWriterTail(u64),
    /// A late report behind a write fault in flight: a later harvest reported the page, and a
    /// vCPU whose next write went to it made no progress until then (`LostPage::late`); only
    /// the per-harvest check of concurrent runs knows it.
    InFlightFault,
    /// A write of the guest program (not one KVM made itself, not a page-table change).
    GuestWrite,
    /// A write KVM made itself for a vCPU (kvmclock, steal time).
    KvmWrite,
    /// A change to a guest page-table page.
    TableChange,
}

/// A class of hazard line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HazardClass {
    /// A vCPU stuck on KVM_EXIT_DIRTY_RING_FULL although the rings were collected and reset.
    RingFullStuck,
    /// A kernel `WARNING: ... at <file>:<line>`; the location, `..` resolved.
    Warn(String),
    /// A kernel BUG, Oops or general protection fault.
    Oops,
    /// The kernel's taint flags changed.
    Taint,
    /// Anything else (a vCPU shut down, a watchdog, ...).
    Other,
}

/// What one fail kind of a signature accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clause {
    /// Every lost page satisfies every predicate (none: any lost page).
    Lost(BTreeSet<PagePredicate>),
    /// Every hazard is of one of these classes (none: any hazard).
    Hazard(BTreeSet<HazardClass>),
    /// An interface problem: no finer signature yet (kind only).
    Problem,
    /// A required mechanism missing: no finer signature (kind only).
    Required,
}

/// A recorded failure's signature: at most one clause per fail kind, in kind order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signature(pub Vec<Clause>);

/// The header legend: every name a signature may use, in words.
pub const LEGEND: &[&str] = &[
    "signature: lost(p+q) = every lost page satisfies p and q; hazard(a,b) = every hazard is of class a or b; any = no condition",
    "  ring-full-writer: the writing vCPU took a KVM_EXIT_DIRTY_RING_FULL exit in the round the loss belongs to",
    "  block-reported: the mechanism reported a page of the lost page's 2 MiB guest-physical block in that round or the one before",
    "  in-flight-fault: a later harvest reported the page, and a vCPU whose next write went to it made no progress until then (a write fault in flight; per-harvest check only)",
    "  stuck-writer-tail:N: the lost write is among the last N writes of a vCPU the trial reports stuck on KVM_EXIT_DIRTY_RING_FULL",
    "  guest-write / kvm-write / table-change: the lost write is the guest program's / one KVM made itself / a guest page-table change",
    "  hazards: ring-full-stuck (a vCPU stuck on a full ring), warn@FILE:LINE (a kernel WARN there), oops, taint, other",
    "  problem(any) / required(any): kind only",
];

impl fmt::Display for PagePredicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RingFullWriter => f.write_str("ring-full-writer"),
            Self::BlockReported => f.write_str("block-reported"),
            Self::InFlightFault => f.write_str("in-flight-fault"),
            Self::StuckWriterTail(n) => write!(f, "stuck-writer-tail:{n}"),
            Self::GuestWrite => f.write_str("guest-write"),
            Self::KvmWrite => f.write_str("kvm-write"),
            Self::TableChange => f.write_str("table-change"),
        }
    }
}

impl PagePredicate {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ring-full-writer" => Self::RingFullWriter,
            "block-reported" => Self::BlockReported,
            "in-flight-fault" => Self::InFlightFault,
            "guest-write" => Self::GuestWrite,
            "kvm-write" => Self::KvmWrite,
            "table-change" => Self::TableChange,
            _ => Self::StuckWriterTail(s.strip_prefix("stuck-writer-tail:")?.parse().ok()?),
        })
    }

    /// Whether the predicate holds for `lost` of a trial whose stuck vCPUs are `stuck`.
    #[must_use]
    pub fn holds(&self, lost: &LostPage, stuck: &BTreeMap<usize, u64>) -> bool {
        match self {
            Self::RingFullWriter => lost.ring_full == Some(true),
            Self::BlockReported => lost.block_reported.is_some_and(|n| n >= 1),
            Self::InFlightFault => lost.late(),
            Self::StuckWriterTail(n) => tail_distance(lost, stuck).is_some_and(|d| d < *n),
            Self::GuestWrite => !matches!(lost.seq, LostPage::KVM_WRITE | LostPage::TABLE_CHANGE),
            Self::KvmWrite => lost.seq == LostPage::KVM_WRITE,
            Self::TableChange => lost.seq == LostPage::TABLE_CHANGE,
        }
    }
}

/// How far before its vCPU's stuck progress a guest write lies (`None`: the vCPU is not
/// reported stuck, or the write is no guest write, or it lies after the progress). A vCPU
/// writes its stamp before it publishes the progress, so one stopped between the two has
/// written `progress + 1`: that write counts as the last one (distance 0), none after it.
fn tail_distance(lost: &LostPage, stuck: &BTreeMap<usize, u64>) -> Option<u64> {
    if matches!(lost.seq, LostPage::KVM_WRITE | LostPage::TABLE_CHANGE) {
        return None;
    }
    let progress = *stuck.get(&lost.vcpu)?;
    (lost.seq <= progress.saturating_add(1)).then(|| progress.saturating_sub(lost.seq))
}

impl fmt::Display for HazardClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RingFullStuck => f.write_str("ring-full-stuck"),
            Self::Warn(at) => write!(f, "warn@{at}"),
            Self::Oops => f.write_str("oops"),
            Self::Taint => f.write_str("taint"),
            Self::Other => f.write_str("other"),
        }
    }
}

impl HazardClass {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ring-full-stuck" => Self::RingFullStuck,
            "oops" => Self::Oops,
            "taint" => Self::Taint,
            "other" => Self::Other,
            _ => {
                let at = s.strip_prefix("warn@")?;
                if at.is_empty() || at.contains(['(', ')', ',', '|', '+', ' ']) {
                    return None;
                }
                Self::Warn(at.into())
            }
        })
    }

    /// The class of a hazard line.
    #[must_use]
    pub fn of(line: &str) -> Self {
        if line.contains("stuck on KVM_EXIT_DIRTY_RING_FULL") {
            Self::RingFullStuck
        } else if let Some(at) = warn_location(line) {
            Self::Warn(at)
        } else if ["BUG:", "kernel BUG", "Oops", "general protection fault"]
            .iter()
            .any(|p| line.contains(p))
        {
            Self::Oops
        } else if line.contains("kernel taint changed") {
            Self::Taint
        } else {
            Self::Other
        }
    }
}

/// `virt/kvm/dirty_ring.c:225` from `WARNING: CPU: 0 PID: 1 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:225 f+0x1/0x2`.
///
/// 7.x kernels put the location first: `WARNING: arch/arm64/kvm/debug.c:157 at f+0x190/0x230,
/// CPU#1: trackcheck/2632`.
fn warn_location(line: &str) -> Option<String> {
    let rest = &line[line.find("WARNING:")? + "WARNING:".len()..];
    let first = rest.split_whitespace().next()?;
    let at = if first.contains('/') && first.contains(':') && !first.contains('+') {
        first
    } else {
        rest.split(" at ").nth(1)?.split_whitespace().next()?
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in at.split('/') {
        match p {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            p => parts.push(p),
        }
    }
    let loc = parts.join("/");
    (!loc.is_empty() && !loc.contains(['(', ')', ',', '|', '+'])).then_some(loc)
}

/// vCPUs the trial's hazards report stuck on KVM_EXIT_DIRTY_RING_FULL, with the progress
/// (last completed write) each was stuck at. Understands the concurrent driver's
/// `vCPU 1 stuck ... (progress 454)` and the stepped driver's `vCPUs stuck ... (progress [526, 1800])`.
#[must_use]
pub fn stuck_vcpus(hazards: &[String]) -> BTreeMap<usize, u64> {
    let mut out = BTreeMap::new();
    for h in hazards
        .iter()
        .filter(|h| h.contains("stuck on KVM_EXIT_DIRTY_RING_FULL"))
    {
        let Some(progress) = h.rsplit_once("(progress ").map(|(_, p)| p) else {
            continue;
        };
        let progress = progress.trim_end_matches(')');
        if let Some(list) = progress.strip_prefix('[') {
            let list = list.trim_end_matches(']');
            for (i, p) in list.split(',').enumerate() {
                if let Ok(p) = p.trim().parse() {
                    out.insert(i, p);
                }
            }
        } else if let Some(vcpu) = h
            .strip_prefix("vCPU ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            && let Ok(p) = progress.trim().parse()
        {
            out.insert(vcpu, p);
        }
    }
    out
}

/// The hazard lines of a result (its reason where a hazard failure recorded none).
#[must_use]
pub fn hazards_of(r: &TrialResult) -> Vec<String> {
    if r.hazards.is_empty() && r.fail_kind == Some(FailKind::Hazard) {
        r.reason.iter().cloned().collect()
    } else {
        r.hazards.clone()
    }
}

impl Clause {
    /// The fail kind of this clause.
    #[must_use]
    pub const fn kind(&self) -> FailKind {
        match self {
            Self::Lost(_) => FailKind::Lost,
            Self::Hazard(_) => FailKind::Hazard,
            Self::Problem => FailKind::Problem,
            Self::Required => FailKind::Required,
        }
    }

    /// Whether a lost page of a trial with stuck vCPUs `stuck` is explained by this clause.
    #[must_use]
    pub fn explains_page(&self, lost: &LostPage, stuck: &BTreeMap<usize, u64>) -> bool {
        match self {
            Self::Lost(preds) => preds.iter().all(|p| p.holds(lost, stuck)),
            _ => false,
        }
    }
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(items: &BTreeSet<T>, sep: &str) -> String {
            if items.is_empty() {
                return "any".into();
            }
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(sep)
        }
        match self {
            Self::Lost(p) => write!(f, "lost({})", list(p, "+")),
            Self::Hazard(c) => write!(f, "hazard({})", list(c, ",")),
            Self::Problem => f.write_str("problem(any)"),
            Self::Required => f.write_str("required(any)"),
        }
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clauses: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&clauses.join("|"))
    }
}

impl Signature {
    /// Parse `lost(a+b)|hazard(c)`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut clauses = Vec::new();
        for part in s.split('|') {
            let (kind, inner) = part
                .strip_suffix(')')
                .and_then(|p| p.split_once('('))
                .ok_or_else(|| {
                    format!("`{part}` is no clause: write kind(predicates), e.g. lost(any)")
                })?;
            let names: Vec<&str> = if inner == "any" {
                Vec::new()
            } else {
                inner
                    .split(if kind == "lost" { '+' } else { ',' })
                    .collect()
            };
            let unknown = |n: &str| format!("unknown {kind} predicate `{n}` in `{part}`");
            let clause = match kind {
                "lost" => Clause::Lost(
                    names
                        .iter()
                        .map(|n| PagePredicate::parse(n).ok_or_else(|| unknown(n)))
                        .collect::<Result<_, _>>()?,
                ),
                "hazard" => Clause::Hazard(
                    names
                        .iter()
                        .map(|n| HazardClass::parse(n).ok_or_else(|| unknown(n)))
                        .collect::<Result<_, _>>()?,
                ),
                "problem" | "required" if names.is_empty() => {
                    if kind == "problem" {
                        Clause::Problem
                    } else {
                        Clause::Required
                    }
                }
                "problem" | "required" => return Err(format!("{kind} takes only `any`: `{part}`")),
                _ => return Err(format!("unknown fail kind `{kind}` in `{part}`")),
            };
            if clauses.iter().any(|c: &Clause| c.kind() == clause.kind()) {
                return Err(format!("fail kind `{kind}` appears twice in `{s}`"));
            }
            clauses.push(clause);
        }
        let mut sig = Self(clauses);
        sig.sort();
        Ok(sig)
    }

    fn sort(&mut self) {
        self.0.sort_by_key(|c| c.kind().name());
    }

    /// The fail kinds recorded.
    #[must_use]
    pub fn kinds(&self) -> Vec<FailKind> {
        self.0.iter().map(Clause::kind).collect()
    }

    fn clause(&self, kind: FailKind) -> Option<&Clause> {
        self.0.iter().find(|c| c.kind() == kind)
    }

    /// Split `r`'s lost pages into those the `lost` clause explains and those it does not.
    #[must_use]
    pub fn split_losses(&self, r: &TrialResult) -> (Vec<LostPage>, Vec<LostPage>) {
        let stuck = stuck_vcpus(&hazards_of(r));
        let clause = self.clause(FailKind::Lost);
        r.lost
            .iter()
            .cloned()
            .partition(|l| clause.is_some_and(|c| c.explains_page(l, &stuck)))
    }

    /// Why `r`'s failure is outside this signature, one line per finding no clause explains
    /// (empty: inside, a known failure).
    #[must_use]
    pub fn outside(&self, r: &TrialResult) -> Vec<String> {
        let mut why = Vec::new();
        if let Some(kind) = r.fail_kind
            && self.clause(kind).is_none()
        {
            why.push(format!(
                "it fails as {}, the signature records {}",
                kind.name(),
                self.kinds()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
        let (_, unexplained) = self.split_losses(r);
        if let Some(first) = unexplained.first() {
            why.push(format!(
                "{} of {} lost page(s) outside it (first: {first})",
                unexplained.len(),
                r.lost.len()
            ));
        }
        let hazards = hazards_of(r);
        if !hazards.is_empty() {
            match self.clause(FailKind::Hazard) {
                Some(Clause::Hazard(classes)) => {
                    if let Some(h) = hazards
                        .iter()
                        .find(|h| !classes.is_empty() && !classes.contains(&HazardClass::of(h)))
                    {
                        why.push(format!(
                            "hazard of class {} outside it: {h}",
                            HazardClass::of(h)
                        ));
                    }
                }
                _ => why.push(format!("a hazard, none recorded: {}", hazards[0])),
            }
        }
        if let Some(p) = r.problems.first()
            && self.clause(FailKind::Problem).is_none()
        {
            why.push(format!("a problem, none recorded: {p}"));
        }
        why
    }

    /// The tightest signature of the catalogue that every failure in `fails` satisfies:
    /// a clause for every kind they fail as or show findings of; for lost pages every
    /// predicate that holds for all of them (the stuck-writer tail rounded up to a power of
    /// two, at least 16, so a re-bless does not churn); for hazards the classes seen.
    #[must_use]
    pub fn derive(fails: &[&TrialResult]) -> Self {
        let mut kinds: BTreeSet<&str> = fails
            .iter()
            .filter_map(|r| r.fail_kind)
            .map(FailKind::name)
            .collect();
        let mut pages: Vec<(&LostPage, BTreeMap<usize, u64>)> = Vec::new();
        let mut classes = BTreeSet::new();
        for r in fails {
            let hazards = hazards_of(r);
            let stuck = stuck_vcpus(&hazards);
            pages.extend(r.lost.iter().map(|l| (l, stuck.clone())));
            classes.extend(hazards.iter().map(|h| HazardClass::of(h)));
            if !r.lost.is_empty() {
                kinds.insert("lost");
            }
            if !hazards.is_empty() {
                kinds.insert("hazard");
            }
            if !r.problems.is_empty() {
                kinds.insert("problem");
            }
        }
        let mut clauses = Vec::new();
        for kind in kinds {
            clauses.push(match kind {
                "lost" => {
                    let mut preds: BTreeSet<PagePredicate> = [
                        PagePredicate::RingFullWriter,
                        PagePredicate::BlockReported,
                        PagePredicate::InFlightFault,
                        PagePredicate::GuestWrite,
                        PagePredicate::KvmWrite,
                        PagePredicate::TableChange,
                    ]
                    .into_iter()
                    .filter(|p| !pages.is_empty() && pages.iter().all(|(l, s)| p.holds(l, s)))
                    .collect();
                    let tail: Option<Vec<u64>> =
                        pages.iter().map(|(l, s)| tail_distance(l, s)).collect();
                    if let Some(max) = tail.and_then(|d| d.into_iter().max()) {
                        preds.insert(PagePredicate::StuckWriterTail(
                            (max + 1).next_power_of_two().max(16),
                        ));
                    }
                    Clause::Lost(preds)
                }
                "hazard" => Clause::Hazard(classes.clone()),
                "problem" => Clause::Problem,
                _ => Clause::Required,
            });
        }
        Self(clauses)
    }

    /// The narrowest signature covering both `self` (recorded) and `new` (just derived):
    /// kinds are united, lost predicates intersected (the stuck-writer tail takes the larger
    /// bound), hazard classes united. Blessing uses it, so a recorded failure is never
    /// forgotten; the result is wider than `self` where `new` saw more, and the caller says so.
    #[must_use]
    pub fn widen(&self, new: &Self) -> Self {
        let mut out = self.clone();
        for c in &new.0 {
            let Some(mine) = out.0.iter_mut().find(|m| m.kind() == c.kind()) else {
                out.0.push(c.clone());
                continue;
            };
            match (mine, c) {
                (Clause::Lost(a), Clause::Lost(b)) => {
                    let tail = |s: &BTreeSet<PagePredicate>| {
                        s.iter().find_map(|p| match p {
                            PagePredicate::StuckWriterTail(n) => Some(*n),
                            _ => None,
                        })
                    };
                    let bound = tail(a).zip(tail(b)).map(|(x, y)| x.max(y));
                    a.retain(|p| b.contains(p) && !matches!(p, PagePredicate::StuckWriterTail(_)));
                    a.extend(bound.map(PagePredicate::StuckWriterTail));
                }
                (Clause::Hazard(a), Clause::Hazard(b)) => {
                    if a.is_empty() || b.is_empty() {
                        a.clear();
                    } else {
                        a.extend(b.iter().cloned());
                    }
                }
                _ => {}
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
#[path = "signature_tests.rs"]
mod tests;
