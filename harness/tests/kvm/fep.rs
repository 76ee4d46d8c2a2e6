//! A guest whose stores to tracked memory carry KVM's forced-emulation prefix
//! ([`StoreForm::ForcedEmulation`], forced on a native-mode machine through
//! [`MachineConfig::stores`]), on whatever host this runs on:
//! - where kvm's `force_emulation_prefix` is set, KVM's emulator must make every stamped store
//!   (`insn_emulation` at least one per write) and memory must hold what the program wrote;
//! - where it is not, the run must fail, and the failure must say that the prefix was not
//!   honoured and name the parameter (a guest that #UDs must not read as a mystery).
//!
//! Either way the trial checks something; which branch ran is printed.

use trackcheck_guests::compiled::StoreForm;
use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};
use trackcheck_harness::host::{FORCE_EMULATION_PREFIX, ForceEmulationPrefix};
use trackcheck_harness::{ExecutionMode, Machine, MachineConfig, MachineError};

use super::{Check, check_memory, ensure};

const PAGES: u64 = 128;

pub fn prefixed_stores() -> Check {
    let program = Program::new(
        PAGES,
        vec![Thread::new(vec![
            Op::Write { page: 0, offset: 8 },
            Op::Loop {
                pages: PageSeq::Range {
                    start: 0,
                    count: PAGES,
                },
                access: Access::Write,
                offset: 0,
                repeat: Repeat::Times(2),
            },
            Op::Sync(1),
            Op::Write {
                page: PAGES - 1,
                offset: 16,
            },
        ])],
    );
    let mut m = Machine::new(MachineConfig {
        vcpus: 1,
        data_pages: PAGES,
        mode: ExecutionMode::Native,
        stores: Some(StoreForm::ForcedEmulation),
        ..MachineConfig::default()
    })?;
    ensure(m.store_form() == StoreForm::ForcedEmulation, || {
        "the machine ignored MachineConfig::stores".into()
    })?;
    m.load(&program)?;
    let before = m.vcpu_stats();
    let result = m.run_to_completion();
    let after = m.vcpu_stats();
    let param = ForceEmulationPrefix::probe();
    if param.is_on() {
        result?;
        check_memory(&m, &program)?;
        let writes = m.total_progress();
        let evidence = m.mode_evidence(&before, &after, writes);
        eprintln!("prefix honoured ({param:?}): {}", evidence.summary());
        ensure(writes == 2 * PAGES + 2, || format!("{writes} writes"))?;
        ensure(evidence.insn_emulation.is_some_and(|e| e >= writes), || {
            format!(
                "KVM's emulator did not make every prefixed store: {}",
                evidence.summary()
            )
        })
    } else {
        let Err(MachineError::Run(failures)) = result else {
            return Err(format!(
                "a guest with the forced-emulation prefix ran on a host where \
                 {FORCE_EMULATION_PREFIX} is {param:?}: {result:?}"
            )
            .into());
        };
        let text = failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!("prefix not honoured ({param:?}): {text}");
        ensure(
            text.contains("did not honour the prefix") && text.contains(FORCE_EMULATION_PREFIX),
            || format!("the failure does not say the prefix was not honoured: {text}"),
        )?;
        ensure(m.progress(0) == 0, || {
            format!(
                "{} writes completed although the first store carries the prefix",
                m.progress(0)
            )
        })?;
        let mut page = vec![0u8; 4096];
        for p in 0..PAGES {
            m.data().read(p * 4096, &mut page);
            ensure(page.iter().all(|b| *b == 0), || {
                format!("page {p} was written")
            })?;
        }
        Ok(())
    }
}
