use trackcheck_harness::Backing;
use trackcheck_harness::oracle::LostPage;
use trackcheck_harness::track::inject::Fault;

use super::bless::merge;
use super::signature::{Clause, HazardClass, PagePredicate};
use super::*;
use crate::spec::TrialSpec;

fn spec(backing: Backing) -> TrialSpec {
    TrialSpec::example(backing)
}

fn page(page: u64, block_reported: Option<u32>) -> LostPage {
    LostPage {
        slot: 2,
        page,
        gpa: 0x1_0000_0000 + page * 4096,
        vcpu: 0,
        seq: 10 + page,
        round: 2,
        block_reported,
        ring_full: None,
        reported_at: None,
        stalled_writer: None,
    }
}

fn lost(spec: &TrialSpec, pages: Vec<LostPage>) -> TrialResult {
    let mut r = TrialResult::new(spec, 1);
    r.verdict = Verdict::Fail;
    r.fail_kind = Some(FailKind::Lost);
    r.reason = Some(format!("lost {} page(s)", pages.len()));
    r.lost = pages;
    r
}

fn hazard(spec: &TrialSpec, line: &str) -> TrialResult {
    let mut r = TrialResult::new(spec, 1);
    r.verdict = Verdict::Fail;
    r.fail_kind = Some(FailKind::Hazard);
    r.reason = Some(line.into());
    r.hazards = vec![line.into()];
    r
}

fn golden_with(name: String, expected: &str) -> Golden {
    let mut g = Golden::default();
    g.entries.insert(
        name,
        (Expected::parse(expected).expect("token"), String::new()),
    );
    g
}

#[test]
fn tokens_round_trip() {
    for t in [
        "pass",
        "skip",
        "not-exercised",
        "error",
        "fail:hazard(warn@virt/kvm/dirty_ring.c:225)|lost(block-reported+guest-write)",
        "intermittent:hazard(ring-full-stuck,warn@a/b.c:1)|lost(stuck-writer-tail:512)",
        "intermittent:lost(any)",
        "fail:problem(any)|required(any)",
    ] {
        let e = Expected::parse(t).expect(t);
        assert_eq!(e.token(), t);
        assert_eq!(Expected::parse(&e.token()), Ok(e));
    }
    for bad in [
        "fail:melted(any)",
        "fail:lost",
        "fail:lost(shiny)",
        "fail:lost(any)|lost(guest-write)",
        "fail:problem(guest-write)",
        "maybe",
    ] {
        assert!(Expected::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_loss_outside_the_signature_is_a_new_failure() {
    let s = spec(Backing::Thp);
    let golden = golden_with(s.name(), "fail:lost(block-reported+guest-write)");
    // Silent neighbours of reported pages: the recorded failure.
    let mut r = lost(&s, vec![page(1, Some(1)), page(2, Some(3))]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::KnownFailure);
    // One more page whose block nobody reported: a new failure, named.
    let mut r = lost(&s, vec![page(1, Some(1)), page(700, Some(0))]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    let why = r.reason.as_deref().unwrap_or("");
    assert!(
        why.contains("NEW failure")
            && why.contains("1 of 2 lost page(s)")
            && why.contains("page 700"),
        "{why}"
    );
    // Facts the run did not record never satisfy a predicate that needs them.
    let mut r = lost(&s, vec![page(1, None)]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
}

#[test]
fn lost_and_hazard_are_not_interchangeable() {
    let s = spec(Backing::Anon);
    let stuck = "vCPU 0 stuck on KVM_EXIT_DIRTY_RING_FULL for 2s although the host kept collecting and resetting the rings (progress 40)";
    let golden = golden_with(s.name(), "intermittent:lost(any)");
    let mut r = hazard(&s, stuck);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail, "a hazard is no loss");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|w| w.contains("fails as hazard"))
    );
    let golden = golden_with(s.name(), "intermittent:hazard(ring-full-stuck)");
    let mut r = lost(&s, vec![page(1, None)]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail, "a loss is no hazard");
    let mut r = hazard(&s, stuck);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::KnownFailure);
    // A WARN is a hazard of another class than a stuck vCPU.
    let mut r = hazard(
        &s,
        "kernel: WARNING: CPU: 0 PID: 9 at mm/huge_memory.c:3000 f+0x1/0x2",
    );
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    // A loss that comes with a hazard needs both clauses.
    let golden = golden_with(s.name(), "intermittent:lost(any)");
    let mut r = lost(&s, vec![page(1, None)]);
    r.hazards.push(stuck.into());
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    let golden = golden_with(s.name(), "intermittent:hazard(ring-full-stuck)|lost(any)");
    let mut r = lost(&s, vec![page(1, None)]);
    r.hazards.push(stuck.into());
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::KnownFailure);
}

#[test]
fn a_pass_that_now_skips_or_idles_fails() {
    let s = spec(Backing::Anon);
    let golden = golden_with(s.name(), "pass");
    for (verdict, prefix) in [
        (Verdict::Skip, NO_LONGER_RUNS),
        (Verdict::NotExercised, NO_LONGER_EXERCISED),
    ] {
        let mut r = TrialResult::new(&s, 1);
        r.verdict = verdict;
        r.reason = Some("no 2 MiB mapping".into());
        golden.apply(&mut r);
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.verdict.is_unexpected());
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|w| w.starts_with(prefix) && w.contains("no 2 MiB")),
            "{:?}",
            r.reason
        );
        // Blessing counts it as what it was.
        assert_eq!(raw_verdict(&r), verdict);
        let text = bless("k", "6.x", &[vec![r]], &Golden::default());
        let token = if verdict == Verdict::Skip {
            " skip "
        } else {
            " not-exercised "
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with(&s.name()) && l.contains(token)),
            "{text}"
        );
    }
    // A skip the golden file records stays a skip.
    let golden = golden_with(s.name(), "skip");
    let mut r = TrialResult::new(&s, 1);
    r.verdict = Verdict::Skip;
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Skip);
}

#[test]
fn blessing_never_forgets_a_failure_and_says_when_it_widens() {
    let sig = |s: &str| Signature::parse(s).expect("signature");
    let (e, ev) = merge(
        Some(&(
            Expected::Intermittent(sig("lost(guest-write)")),
            "3/20 runs failed".into(),
        )),
        Expected::Pass,
        String::new(),
    );
    assert_eq!(e, Expected::Intermittent(sig("lost(guest-write)")));
    assert!(ev.contains("earlier: 3/20"));
    let (e, ev) = merge(
        Some(&(
            Expected::Fail(sig("lost(block-reported+guest-write)")),
            String::new(),
        )),
        Expected::Intermittent(sig("hazard(ring-full-stuck)|lost(guest-write)")),
        "1/2 runs failed".into(),
    );
    assert_eq!(
        e,
        Expected::Intermittent(sig("hazard(ring-full-stuck)|lost(guest-write)"))
    );
    assert!(
        ev.contains("signature widened from lost(block-reported+guest-write)"),
        "{ev}"
    );
    // The same signature again: nothing to say.
    let (_, ev) = merge(
        Some(&(Expected::Fail(sig("lost(guest-write)")), String::new())),
        Expected::Fail(sig("lost(block-reported+guest-write)")),
        "2/2 runs failed".into(),
    );
    assert_eq!(ev, "2/2 runs failed");
    let (e, _) = merge(
        Some(&(Expected::Pass, String::new())),
        Expected::Fail(sig("lost(any)")),
        String::new(),
    );
    assert_eq!(e, Expected::Fail(sig("lost(any)")));
    let (e, ev) = merge(
        Some(&(Expected::Fail(sig("lost(any)")), "1/1 runs failed".into())),
        Expected::NotExercised,
        "1/1 runs not exercised: no 2 MiB mapping".into(),
    );
    assert_eq!(e, Expected::Intermittent(sig("lost(any)")));
    assert!(
        ev.contains("not-exercised") && ev.contains("earlier: 1/1 runs failed"),
        "{ev}"
    );
    let (e, _) = merge(None, Expected::Pass, String::new());
    assert_eq!(e, Expected::Pass);
}

#[test]
fn blessing_derives_the_signature_from_the_failures() {
    let s = spec(Backing::Thp);
    let run1 = vec![lost(&s, vec![page(1, Some(1)), page(2, Some(1))])];
    let run2 = vec![lost(&s, vec![page(5, Some(2))])];
    let text = bless("k", "6.x", &[run1, run2], &Golden::default());
    let path = std::env::temp_dir().join(format!("trackcheck-derive-{}", std::process::id()));
    std::fs::create_dir_all(&path).expect("dir");
    std::fs::write(path.join("k.snap"), &text).expect("write");
    let g = Golden::load(&path, "k").expect("loads what bless writes");
    std::fs::remove_dir_all(&path).expect("cleanup");
    assert_eq!(
        g.expected(&s.name()),
        Some(&Expected::Intermittent(Signature(vec![Clause::Lost(
            [PagePredicate::BlockReported, PagePredicate::GuestWrite].into()
        )]))),
        "{text}"
    );
    assert!(
        text.contains("block-reported: "),
        "the legend is in the header: {text}"
    );
}

#[test]
fn a_selftest_is_judged_on_the_losses_the_signature_does_not_explain() {
    let base = spec(Backing::Thp);
    let injected = TrialSpec {
        inject: Some(Fault::DropPage),
        ..base
    };
    // Lost: the injected page 0 (its block reported nothing else) and the kernel's page 7.
    let result = || {
        let mut r = lost(&injected, vec![page(0, Some(0)), page(7, Some(4))]);
        r.injected_pages = Some(vec![(2, 0)]);
        r
    };
    // No record of the base trial failing: every lost page is judged.
    let mut r = result();
    Golden::default().apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.lost.len(), 2);
    assert!(!crate::report::caught(&r));
    // The base trial's signature explains page 7: judged on page 0 alone, caught.
    let golden = golden_with(base.name(), "fail:lost(block-reported)");
    assert_eq!(golden.unexplained_losses(&result()), vec![page(0, Some(0))]);
    let mut r = result();
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.lost, vec![page(0, Some(0))]);
    assert!(
        r.evidence
            .iter()
            .any(|e| e.contains("kernel's recorded failure"))
    );
    assert!(crate::report::caught(&r));
    // Only the kernel's page lost: the injected loss was missed, never excused.
    let mut r = result();
    r.lost = vec![page(7, Some(4))];
    golden.apply(&mut r);
    assert!(r.lost.is_empty() && !crate::report::caught(&r));
    assert_eq!(r.verdict, Verdict::Fail);
    // The signature explains the injected page too: cannot tell, skipped with that reason.
    let golden = golden_with(base.name(), "fail:lost(any)");
    let mut r = result();
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Skip);
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|w| w.contains(&base.name()) && w.contains("cannot be told apart"))
    );
    // A missed loss (the trial passed) is never excused.
    let mut r = result();
    r.verdict = Verdict::Pass;
    r.fail_kind = None;
    r.lost.clear();
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Pass);
}

/// A skip-rearm loses a write only where its page is written again: when every lost page is
/// the kernel's recorded failure, the run could not show the fault's own loss — inconclusive,
/// never caught and never a pass.
#[test]
fn a_skip_rearm_whose_losses_are_all_the_kernels_is_inconclusive() {
    let base = spec(Backing::Thp);
    let injected = TrialSpec {
        inject: Some(Fault::SkipRearm),
        ..base
    };
    let golden = golden_with(base.name(), "fail:lost(block-reported)");
    let mut r = lost(&injected, vec![page(7, Some(4))]);
    r.injected_pages = Some(vec![(2, 0), (2, 1)]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::NotExercised, "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|w| w.contains("inconclusive") && w.contains("2 page(s)")),
        "{:?}",
        r.reason
    );
    // One of its pages lost a write outside the signature: judged as usual (caught).
    let mut r = lost(&injected, vec![page(7, Some(4)), page(1, Some(0))]);
    r.injected_pages = Some(vec![(2, 0), (2, 1)]);
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    assert!(crate::report::caught(&r));
}

#[test]
fn the_silent_neighbours_of_a_withheld_page_stay_the_kernels() {
    let base = spec(Backing::Thp);
    let injected = TrialSpec {
        inject: Some(Fault::DropPage),
        ..base
    };
    // The fault withheld page 0, the only page the ring reported of its block: the kernel's
    // silent neighbours 3 and 9 now look like a block with nothing reported.
    let mut r = lost(
        &injected,
        vec![
            page(0, Some(0)),
            page(3, Some(0)),
            page(9, Some(0)),
            page(600, Some(0)),
        ],
    );
    r.injected_pages = Some(vec![(2, 0)]);
    let golden = golden_with(base.name(), "fail:lost(block-reported)");
    golden.apply(&mut r);
    assert_eq!(r.verdict, Verdict::Fail);
    // 3 and 9 share page 0's block: the kernel's. Page 600 (another block) is a new loss the
    // fault did not touch, and the withheld page 0 is outside the signature.
    let named: Vec<u64> = r.lost.iter().map(|l| l.page).collect();
    assert_eq!(named, vec![0, 600]);
    assert!(!crate::report::caught(&r), "page 600 was not the fault's");
}

#[test]
fn blessing_keeps_the_entries_of_trials_it_did_not_run() {
    let s = spec(Backing::Anon);
    let ran = TrialResult::new(&s, 1);
    let mut previous = Golden::default();
    previous.entries.insert(
        "a::zz::old".into(),
        (
            Expected::parse("intermittent:lost(any)").expect("token"),
            "1/20 runs failed".into(),
        ),
    );
    previous
        .entries
        .insert("zzz::kept".into(), (Expected::Skip, "no pool".into()));
    let text = bless("k", "6.x", &[vec![ran]], &previous);
    let body: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(['#', '-', 's', 'e']))
        .collect();
    assert_eq!(body.len(), 3, "{text}");
    assert!(body[0].starts_with("a::zz::old ") && body[0].ends_with("1/20 runs failed"));
    assert!(body[1].starts_with(&s.name()) && body[1].contains(" pass"));
    assert!(body[2].starts_with("zzz::kept ") && body[2].contains(" skip "));
    let column = |l: &str| {
        l.find(|c: char| c.is_whitespace())
            .map(|i| i + l[i..].find(|c: char| !c.is_whitespace()).unwrap_or(0))
    };
    assert!(
        body.iter().all(|l| column(l) == column(body[0])),
        "aligned: {text}"
    );
}

#[test]
fn mixed_runs_bless_as_not_exercised() {
    let s = spec(Backing::Anon);
    let golden = golden_with(s.name(), "pass");
    let mut idle = TrialResult::new(&s, 1);
    idle.verdict = Verdict::NotExercised;
    idle.reason = Some("no 2 MiB mapping".into());
    golden.apply(&mut idle);
    let pass = TrialResult::new(&s, 1);
    let text = bless("k", "6.x", &[vec![pass], vec![idle]], &Golden::default());
    let line = text
        .lines()
        .find(|l| l.starts_with(&s.name()))
        .expect("line");
    assert!(
        line.contains(" not-exercised ") && line.contains("1/2 runs not exercised"),
        "{line}"
    );
}

#[test]
fn load_reads_what_bless_writes() {
    let dir = std::env::temp_dir().join(format!("trackcheck-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let text = "---\nsource: x\nexpression: y\n---\n# comment\na::b      pass\nc::d   fail:hazard(oops)|lost(any)   lost 3 pages\ne::f skip no pool\n";
    std::fs::write(dir.join("k.snap"), text).expect("write");
    let g = Golden::load(&dir, "k").expect("loads");
    assert!(g.found);
    assert_eq!(g.expected("a::b"), Some(&Expected::Pass));
    assert_eq!(
        g.entries.get("c::d").map(|e| e.1.as_str()),
        Some("lost 3 pages")
    );
    assert_eq!(
        g.expected("c::d")
            .and_then(Expected::signature)
            .map(Signature::kinds),
        Some(vec![FailKind::Hazard, FailKind::Lost])
    );
    assert_eq!(g.expected("e::f"), Some(&Expected::Skip));
    // What bless writes from it, load reads back unchanged.
    let again = bless("k", "6.x", &[], &g);
    std::fs::write(dir.join("k.snap"), &again).expect("write");
    let g2 = Golden::load(&dir, "k").expect("reloads");
    assert_eq!(g.entries, g2.entries);
    assert!(Golden::load(&dir, "missing").is_ok_and(|g| !g.found));
    std::fs::write(dir.join("bad.snap"), "---\na\n---\nx::y maybe\n").expect("write");
    assert!(
        Golden::load(&dir, "bad")
            .unwrap_err()
            .contains("unknown verdict")
    );
    std::fs::write(dir.join("old.snap"), "---\na\n---\nx::y fail:lost old\n").expect("write");
    assert!(
        Golden::load(&dir, "old").unwrap_err().contains("lost(any)"),
        "an entry without a signature says how to write one"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn hazard_classes_are_read_from_the_lines() {
    assert_eq!(
        HazardClass::of(
            "kernel: WARNING: CPU: 0 PID: 5316 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:225 kvm_dirty_ring_push+0xe2/0xf0"
        ),
        HazardClass::Warn("virt/kvm/dirty_ring.c:225".into())
    );
    // 7.x kernels: the location first, the task last.
    assert_eq!(
        HazardClass::of(
            "kernel: WARNING: arch/arm64/kvm/debug.c:157 at kvm_vcpu_load_debug+0x190/0x230, CPU#1: trackcheck/2632"
        ),
        HazardClass::Warn("arch/arm64/kvm/debug.c:157".into())
    );
    assert_eq!(
        HazardClass::of("kernel: BUG: unable to handle page fault"),
        HazardClass::Oops
    );
    assert_eq!(
        HazardClass::of("kernel taint changed from 0 to 512 (W: a kernel WARN fired)"),
        HazardClass::Taint
    );
    assert_eq!(HazardClass::of("vCPU 0 shut down"), HazardClass::Other);
}

#[test]
fn the_projects_golden_files_load_and_bless_writes_them_back_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/matrix");
    for key in ["x86_64-pvm-shadow@6.18", "aarch64-arm64-stage2@6.12"] {
        let g = Golden::load(&dir, key).expect("the project's golden file loads");
        assert!(g.found, "{key}");
        assert_eq!(g.missing_note(), None);
        assert!(
            g.entries
                .values()
                .filter_map(|(e, _)| e.signature())
                .all(|s| !s.0.is_empty()),
            "{key}: every recorded failure has a signature"
        );
        let text = std::fs::read_to_string(&g.path).expect("read");
        let again = bless(key, "k", &[], &g);
        let entries = |t: &str| -> Vec<String> {
            t.lines()
                .skip_while(|l| !l.starts_with("# trial"))
                .map(String::from)
                .collect()
        };
        let (was, is) = (entries(&text), entries(&again));
        let first = was.iter().zip(&is).find(|(a, b)| a != b);
        assert!(first.is_none() && was.len() == is.len(), "{key}: {first:?}");
        // The header up to the kernel line (which names the blessing run) is what bless writes.
        let header = |t: &str| -> Vec<String> {
            t.lines()
                .take_while(|l| !l.starts_with("# kernel "))
                .map(String::from)
                .collect()
        };
        assert_eq!(header(&text), header(&again), "{key}: header");
    }
}

#[test]
fn a_missing_golden_file_names_the_file_and_the_series_this_host_has() {
    let dir = std::env::temp_dir().join(format!("trackcheck-series-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let empty = bless("x86_64-pvm-shadow@6.18", "6.18.44", &[], &Golden::default());
    for name in [
        "x86_64-pvm-shadow@6.18.snap",
        "x86_64-pvm-shadow@6.12.snap",
        "x86_64-pvm-shadowy@6.1.snap",
        "aarch64-arm64-stage2@6.19.snap",
    ] {
        std::fs::write(dir.join(name), &empty).expect("write");
    }
    let g = Golden::load(&dir, "x86_64-pvm-shadow@6.19").expect("loads");
    assert!(!g.found);
    assert_eq!(
        g.others,
        ["x86_64-pvm-shadow@6.12", "x86_64-pvm-shadow@6.18"]
    );
    let note = g.missing_note().expect("a note");
    assert!(
        note.starts_with(
            "no golden file for x86_64-pvm-shadow@6.19 (have: @6.12, @6.18); every trial is judged on its own; trackcheck run --bless writes one ("
        ) && note.contains("x86_64-pvm-shadow@6.19.snap"),
        "{note}"
    );
    let found = Golden::load(&dir, "x86_64-pvm-shadow@6.18").expect("loads");
    assert!(found.found && found.missing_note().is_none());
    assert_eq!(found.others, ["x86_64-pvm-shadow@6.12"]);
    let none = Golden::load(&dir, "x86_64-svm-tdpnpt@7.2").expect("loads");
    assert!(
        none.missing_note()
            .is_some_and(|n| n.contains("(have: none for this host profile)")),
        "{:?}",
        none.missing_note()
    );
    // A file from before the series was part of the key is named, with what to do.
    std::fs::write(dir.join("x86_64-svm-tdpnpt.snap"), &empty).expect("write");
    let legacy = Golden::load(&dir, "x86_64-svm-tdpnpt@7.2").expect("loads");
    assert!(
        legacy.missing_note().is_some_and(|n| n.contains(
            "x86_64-svm-tdpnpt.snap, named without a kernel series: rename it to x86_64-svm-tdpnpt@<series>.snap"
        )),
        "{:?}",
        legacy.missing_note()
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_known_failures_token_is_read_back_from_its_evidence() {
    let evidence = vec![
        "mode: native".to_string(),
        format!("{WITHIN_SIGNATURE}fail:lost(block-reported) of golden/matrix/k@6.18.snap"),
    ];
    assert_eq!(recorded_token(&evidence), Some("fail:lost(block-reported)"));
    assert_eq!(recorded_token(&evidence[..1]), None);
}
