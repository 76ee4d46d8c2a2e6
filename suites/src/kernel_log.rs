//! Kernel hazards during a trial: WARN/BUG lines in the kernel log and taint changes.
//!
//! A kernel WARN during a trial is a FAIL with the evidence. Trials running at the same time
//! share the kernel log, so a hazard is reported by every trial that was running when it
//! appeared: attribution errs towards showing it, never towards hiding it. WARN_ON_ONCE fires
//! once per boot, so the taint flags are checked too.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

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

    /// Hazards since `start`: matching kernel log lines and taint changes. A line that names a
    /// harness thread (`PID: n`) counts only if `n` is one of `own` (the trial's threads):
    /// other trials running at the same time have their own. Lines naming no task, or a task
    /// that is not the harness's (a kworker), count for everyone.
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
                        let message = record
                            .split_once(';')
                            .map_or(record.as_ref(), |(_, m)| m)
                            .trim();
                        if counts(message, own) && out.len() < 20 {
                            out.push(format!("kernel: {message}"));
                        }
                    }
                    // EPIPE: records were overwritten while we read; keep going.
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        // With the log readable, a taint change is attributed only with a matching line: the
        // taint is global and a WARN from another trial's thread sets it too. Without the log,
        // the change is all there is to see: it is reported, naming the doubt.
        let readable = self.kmsg.is_some();
        if let (Some(before), Some(after)) = (self.taint, taint())
            && after != before
            && (!out.is_empty() || !readable)
        {
            let warn = if (after & !before) & TAINT_WARN != 0 {
                " (W: a kernel WARN fired)"
            } else {
                ""
            };
            let doubt = if readable {
                ""
            } else {
                "; /dev/kmsg is unreadable, so it may come from another trial running at the \
                 same time (run as root, or with kernel.dmesg_restrict=0, to see the lines)"
            };
            out.push(format!(
                "kernel taint changed from {before} to {after}{warn}{doubt}"
            ));
        }
        out
    }
}

/// Whether `message` is a hazard for the trial whose threads are `own`: a hazard line that
/// names no harness thread of another trial.
fn counts(message: &str, own: &[i32]) -> bool {
    let theirs = task_of(message).is_some_and(|pid| !own.contains(&pid) && is_harness_tid(pid));
    PATTERNS.iter().any(|p| message.contains(p)) && !theirs
}

/// The task a kernel log line names (`PID: 1234`), if any.
fn task_of(message: &str) -> Option<i32> {
    let rest = &message[message.find("PID: ")? + 5..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
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
        // 19479 is no harness thread (a kworker, say): the line counts for every trial.
        assert!(counts(line, &[1, 2]));
        // Once it is another trial's thread, only that trial sees it.
        trackcheck_harness::vcpu::register_tid(19479);
        assert!(!counts(line, &[1, 2]));
        assert!(counts(line, &[19479]));
        assert!(counts("BUG: unable to handle page fault", &[1]));
        assert!(!counts("kvm: something harmless PID: 3", &[3]));
    }
}
