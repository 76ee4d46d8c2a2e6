//! The reference model of host/guest interleavings (proptest-state-machine).
//!
//! The model is deliberately tiny: it knows only where the host is in a harvest and whether
//! logging is on, so it generates exactly the interleavings a mechanism's contract allows —
//! guest writes anywhere, including between collect and rearm and between partial rearms;
//! rearm ranges of 64-page chunks; copies only after every collected chunk was rearmed; the
//! log flag turned off and on between harvests. Whether a page was lost is decided by the
//! system under test's ledger and shadow ([`trackcheck_harness::oracle`]), the same oracle the
//! matrix uses, so a generated interleaving is judged exactly like a scripted one.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest_state_machine::ReferenceStateMachine;

/// Where the host is in its harvest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Between harvests.
    Idle,
    /// Collected; these 64-page chunks are not rearmed yet.
    Collected(BTreeSet<u64>),
    /// Every collected chunk is rearmed; the copy comes next.
    Rearmed,
}

/// The model's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelState {
    /// 64-page chunks of the data slot.
    pub chunks: u64,
    /// Data pages.
    pub pages: u64,
    /// vCPUs writing.
    pub vcpus: u8,
    /// The harvest phase.
    pub phase: Phase,
    /// Whether KVM_MEM_LOG_DIRTY_PAGES is on.
    pub logging: bool,
    /// Whether the mechanism rearms by range (KVM_CLEAR_DIRTY_LOG); others rearm as a whole.
    pub partial_rearm: bool,
    /// Whether the mechanism follows the slot's log flag (KVM's own logs).
    pub toggles: bool,
}

/// One step of an interleaving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The guest runs one segment: each (vcpu, page, offset) is a stamped write.
    Write(Vec<(u8, u64, u16)>),
    /// The host collects.
    Collect,
    /// The host rearms the collected pages in chunks `first..first + count`.
    Rearm {
        /// First 64-page chunk.
        first: u64,
        /// Chunks.
        count: u64,
    },
    /// The host copies the collected pages.
    Copy,
    /// The host turns logging off.
    LogOff,
    /// The host turns logging on again (a new migration round: everything is copied anew).
    LogOn,
}

/// The reference state machine.
#[derive(Debug)]
pub struct Model;

thread_local! {
    /// The initial state the next generated sequences start from (set by the property driver).
    pub static INITIAL: std::cell::RefCell<Option<ModelState>> = const { std::cell::RefCell::new(None) };
}

fn writes(state: &ModelState) -> impl Strategy<Value = Transition> + use<> {
    let (vcpus, pages) = (state.vcpus, state.pages);
    prop::collection::vec((0..vcpus, 0..pages, (0u16..512).prop_map(|w| w * 8)), 1..48)
        .prop_map(Transition::Write)
}

impl ReferenceStateMachine for Model {
    type State = ModelState;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<ModelState> {
        let state = INITIAL.with(|s| s.borrow().clone()).unwrap_or(ModelState {
            chunks: 4,
            pages: 256,
            vcpus: 2,
            phase: Phase::Idle,
            logging: true,
            partial_rearm: true,
            toggles: true,
        });
        Just(state).boxed()
    }

    fn transitions(state: &ModelState) -> BoxedStrategy<Transition> {
        let chunks = state.chunks;
        match (&state.phase, state.logging) {
            (_, false) => prop_oneof![3 => writes(state), 1 => Just(Transition::LogOn)].boxed(),
            (Phase::Idle, true) if state.toggles => {
                prop_oneof![4 => writes(state), 3 => Just(Transition::Collect), 1 => Just(Transition::LogOff)].boxed()
            }
            (Phase::Idle, true) => prop_oneof![4 => writes(state), 3 => Just(Transition::Collect)].boxed(),
            (Phase::Collected(_), true) => prop_oneof![
                2 => writes(state),
                3 => (0..chunks).prop_flat_map(move |first| (Just(first), 1..=chunks - first)).prop_map(|(first, count)| Transition::Rearm { first, count }),
            ]
            .boxed(),
            (Phase::Rearmed, true) => prop_oneof![1 => writes(state), 3 => Just(Transition::Copy)].boxed(),
        }
    }

    fn preconditions(state: &ModelState, transition: &Transition) -> bool {
        match transition {
            Transition::Write(w) => w
                .iter()
                .all(|(v, p, _)| *v < state.vcpus && *p < state.pages),
            Transition::Collect => state.phase == Phase::Idle && state.logging,
            Transition::Rearm { first, count } => {
                matches!(state.phase, Phase::Collected(_))
                    && state.logging
                    && *count > 0
                    && first + count <= state.chunks
            }
            Transition::Copy => state.phase == Phase::Rearmed && state.logging,
            Transition::LogOff => state.phase == Phase::Idle && state.logging && state.toggles,
            Transition::LogOn => !state.logging,
        }
    }

    fn apply(mut state: ModelState, transition: &Transition) -> ModelState {
        match transition {
            Transition::Write(_) => {}
            Transition::Collect => state.phase = Phase::Collected((0..state.chunks).collect()),
            Transition::Rearm { first, count } => {
                if let Phase::Collected(mut left) = state.phase {
                    if state.partial_rearm {
                        left.retain(|c| *c < *first || *c >= first + count);
                    } else {
                        left.clear();
                    }
                    state.phase = if left.is_empty() {
                        Phase::Rearmed
                    } else {
                        Phase::Collected(left)
                    };
                }
            }
            Transition::Copy => state.phase = Phase::Idle,
            Transition::LogOff => state.logging = false,
            Transition::LogOn => state.logging = true,
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::test_runner::TestRunner;

    /// Generated sequences respect the contract: copies only after every chunk was rearmed,
    /// collects only between harvests with logging on.
    #[test]
    fn sequences_follow_the_contract() {
        let mut runner = TestRunner::deterministic();
        runner
            .run(
                &Model::sequential_strategy(1..40),
                |(initial, transitions, _)| {
                    let mut state = initial;
                    for t in &transitions {
                        prop_assert!(Model::preconditions(&state, t), "{t:?} in {state:?}");
                        if *t == Transition::Copy {
                            prop_assert_eq!(&state.phase, &Phase::Rearmed);
                        }
                        state = Model::apply(state, t);
                    }
                    Ok(())
                },
            )
            .expect("contract holds");
    }
}
