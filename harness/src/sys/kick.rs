//! The signal that kicks a vCPU thread out of `KVM_RUN`.
//!
//! A vCPU thread blocked in `KVM_RUN` returns with `EINTR` when a signal is delivered to it. The
//! handler does nothing: the interruption is the point. The watchdog sends the signal
//! repeatedly until the thread reports back, which closes the race of a signal that arrives just
//! before the thread re-enters `KVM_RUN`.

use std::sync::OnceLock;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal (`SIGRTMIN`), with its no-op handler installed once per process.
pub fn signal() -> Result<libc::c_int, String> {
    static INSTALLED: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let sig = SIGRTMIN();
            register_signal_handler(sig, on_kick)
                .map(|()| sig)
                .map_err(|e| format!("installing the vCPU kick handler for signal {sig}: {e}"))
        })
        .clone()
}

/// The calling thread's pthread id, for [`kick`].
#[must_use]
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Send the kick signal to `thread`.
///
/// # Safety
/// `thread` must be a thread of this process that has not been joined yet (one that has merely
/// exited is fine: glibc answers ESRCH). The vCPU group ensures it by kicking only inside the
/// scope that joins its threads.
pub unsafe fn kick(thread: libc::pthread_t) -> Result<(), String> {
    let sig = signal()?;
    // SAFETY: `thread` is live or exited-but-unjoined (the caller's contract), and `sig` has a
    // handler installed by `signal()`.
    let ret = unsafe { libc::pthread_kill(thread, sig) };
    if ret == 0 || ret == libc::ESRCH {
        Ok(())
    } else {
        Err(format!(
            "pthread_kill: {}",
            std::io::Error::from_raw_os_error(ret)
        ))
    }
}

/// The calling thread's kernel thread id (what the kernel log prints as `PID:`).
#[must_use]
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}
