//! Kernel hazards during a trial: WARN/BUG lines in the kernel log and taint changes.
//!
//! A kernel WARN during a trial is a FAIL with the evidence. Trials running at the same time
//! share the kernel log, so a line is charged to a trial only where it can be attributed: it
//! names (`PID: n`) one of the trial's own threads. A hazard line naming no task, or a task
//! that is no harness thread (a kworker), could belong to any trial running then: it is
//! charged to none and collected once per run as *unattributed* ([`take_unattributed`]),
//! which the run's report shows and which fails the run (never hidden, never multiplied
//! over every trial that happened to run). WARN_ON_ONCE fires once per boot, so the taint
//! flags are checked too; a taint change is the trial's only together with an attributed line.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use trackcheck_harness::vcpu::is_harness_tid;

/// Lines that mean the kernel hit a hazard.
const PATTERNS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection fault",
    "kernel BUG",
];

/// `TAINT_WARN` (bit 9): a WARN fired since boot.
const TAINT_WARN: u64 = 1 << 9;

/// Hazard lines no trial could be charged with, by a key that is the same for every watch
/// that read the line (the kernel log record's sequence number), so each is kept once.
static UNATTRIBUTED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// At most this many unattributed lines are kept per run.
const UNATTRIBUTED_MAX: usize = 50;

fn note_unattributed(key: String, line: String) {
    if let Ok(mut lines) = UNATTRIBUTED.lock()
        && (lines.len() < UNATTRIBUTED_MAX || lines.contains_key(&key))
    {
        lines.entry(key).or_insert(line);
    }
}

/// The hazard lines seen since the last call that no trial could be charged with, each once
/// (in kernel log order), and forget them. A run's report calls it once at its end.
#[must_use]
pub fn take_unattributed() -> Vec<String> {
    // A poisoned lock still holds the lines (a panicking trial thread cannot lose them).
    let mut lines = UNATTRIBUTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::take(&mut *lines).into_values().collect()
}

/// For a test binary's end: print the unattributed hazard lines once (they belong to no test)
/// and say whether there were any (the binary then fails).
#[must_use]
pub fn report_unattributed() -> bool {
    let unattributed = take_unattributed();
    if unattributed.is_empty() {
        return false;
    }
    eprintln!("kernel hazards no trial's threads logged (unattributed; they fail the run):");
    for line in &unattributed {
        eprintln!("  {line}");
    }
    true
}

/// Watches the kernel log from `start` to `finish`.
#[derive(Debug)]
pub struct KernelWatch {
    kmsg: Option<File>,
    taint: Option<u64>,
}

fn taint() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl KernelWatch {
    /// Start watching: remember the end of the kernel log and the taint flags.
    #[must_use]
    pub fn start() -> Self {
        let kmsg = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()
            .and_then(|mut f| f.seek(SeekFrom::End(0)).ok().map(|_| f));
        Self {
            kmsg,
            taint: taint(),
        }
    }

    /// Whether the kernel log can be read (root, or kernel.dmesg_restrict=0).
    #[must_use]
    pub fn can_read_log(&self) -> bool {
        self.kmsg.is_some()
    }

    /// Hazards since `start` charged to the trial whose threads are `own`: matching kernel log
    /// lines that name one of `own`, and a taint change that came with such a line. Lines
    /// naming another trial's harness thread are that trial's; lines naming no task or a task
    /// outside the harness, and a taint change without an attributed line, go to
    /// [`take_unattributed`].
    #[must_use]
    pub fn finish(mut self, own: &[i32]) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = self.kmsg.as_mut() {
            let mut buf = vec![0u8; 8192];
            for _ in 0..100_000 {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let record = String::from_utf8_lossy(&buf[..n]);
                        let (prefix, message) = record
                            .split_once(';')
                            .map_or(("", record.as_ref()), |(p, m)| (p, m));
                        let message = message.trim();
                        match attribute(message, own) {
                            Attribution::Own if out.len() < 20 => {
                                out.push(format!("kernel: {message}"));
                            }
                            Attribution::Nobody => note_unattributed(
                                format!("kmsg:{:020}", record_seq(prefix)),
                                format!("kernel: {message}"),
                            ),
                            _ => {}
                        }
                    }
                    // EPIPE: records were overwritten while we read; keep going.
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        // The taint is global: a change is this trial's only with an attributed line; else it
        // is reported once for the run (with the log unreadable, naming that doubt).
        let readable = self.kmsg.is_some();
        if let (Some(before), Some(after)) = (self.taint, taint())
            && after != before
        {
            let warn = if (after & !before) & TAINT_WARN != 0 {
                " (W: a kernel WARN fired)"
            } else {
                ""
            };
            let doubt = if readable {
                ""
            } else {
                "; /dev/kmsg is unreadable, so no trial can be named (run as root, or with \
                 kernel.dmesg_restrict=0, to see the lines)"
            };
            let line = format!("kernel taint changed from {before} to {after}{warn}{doubt}");
            if out.is_empty() {
                note_unattributed(format!("taint:{before:020}->{after:020}"), line);
            } else {
                out.push(line);
            }
        }
        out
    }
}

/// Whose a kernel log line is.
#[derive(Debug, PartialEq, Eq)]
enum Attribution {
    /// No hazard.
    NoHazard,
    /// A hazard naming one of the trial's own threads.
    Own,
    /// A hazard naming another trial's harness thread: that trial's.
    Theirs,
    /// A hazard naming no task, or a task outside the harness: nobody's in particular.
    Nobody,
}

fn attribute(message: &str, own: &[i32]) -> Attribution {
    if !PATTERNS.iter().any(|p| message.contains(p)) {
        return Attribution::NoHazard;
    }
    match task_of(message) {
        Some(pid) if own.contains(&pid) => Attribution::Own,
        Some(pid) if is_harness_tid(pid) => Attribution::Theirs,
        _ => Attribution::Nobody,
    }
}

/// The sequence number of a `/dev/kmsg` record (`prio,seq,time,flags`), 0 if unreadable.
fn record_seq(prefix: &str) -> u64 {
    prefix
        .split(',')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The task a kernel log line names, if any: `PID: 1234` (up to 6.x), or the `comm/1234`
/// after `CPU#n: ` that 7.x kernels' WARN lines end with
/// (`WARNING: arch/arm64/kvm/debug.c:157 at f+0x190/0x230, CPU#1: trackcheck/2632`).
fn task_of(message: &str) -> Option<i32> {
    if let Some(at) = message.find("PID: ") {
        return message[at + 5..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok();
    }
    let rest = &message[message.find("CPU#")?..];
    let (_, task) = rest.split_once(": ")?;
    task.split_whitespace()
        .next()?
        .rsplit_once('/')?
        .1
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_attributed_by_task() {
        let line = "WARNING: CPU: 0 PID: 19479 at arch/x86/kvm/../../../virt/kvm/dirty_ring.c:225 kvm_dirty_ring_push+0xe2/0xf0";
        assert_eq!(task_of(line), Some(19479));
        assert_eq!(task_of("BUG: unable to handle page fault"), None);
        // 19479 is no harness thread (a kworker, say): nobody's, never charged to a trial.
        assert_eq!(attribute(line, &[1, 2]), Attribution::Nobody);
        // Once it is another trial's thread, only that trial sees it.
        trackcheck_harness::vcpu::register_tid(19479);
        assert_eq!(attribute(line, &[1, 2]), Attribution::Theirs);
        assert_eq!(attribute(line, &[19479]), Attribution::Own);
        assert_eq!(
            attribute("BUG: unable to handle page fault", &[1]),
            Attribution::Nobody
        );
        assert_eq!(
            attribute("kvm: something harmless PID: 3", &[3]),
            Attribution::NoHazard
        );
        assert_eq!(record_seq("4,1234,5678,-"), 1234);
        let seven = "WARNING: arch/arm64/kvm/debug.c:157 at kvm_vcpu_load_debug+0x190/0x230, CPU#1: trackcheck/2632";
        assert_eq!(task_of(seven), Some(2632));
        assert_eq!(task_of("CPU#1: no task here"), None);
    }

    #[test]
    fn unattributed_lines_are_reported_once_per_run() {
        // Two trials' watches read the same record (same sequence number); a third line.
        let warn = "kernel: WARNING: CPU: 1 PID: 77 at mm/x.c:1 f+0x1/0x2";
        note_unattributed("kmsg:00000000000000000042".into(), warn.into());
        note_unattributed("kmsg:00000000000000000042".into(), warn.into());
        note_unattributed("kmsg:00000000000000000043".into(), "kernel: BUG: y".into());
        let lines = take_unattributed();
        assert_eq!(lines.iter().filter(|l| *l == warn).count(), 1, "{lines:?}");
        assert!(lines.iter().any(|l| l == "kernel: BUG: y"));
        assert!(
            take_unattributed().iter().all(|l| l != warn),
            "taken once, then forgotten"
        );
    }
}
