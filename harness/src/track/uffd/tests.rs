//! The sync tracker's failure paths, on plain host memory (userfaultfd works without KVM).

use std::sync::mpsc;
use std::time::Duration;

use super::*;

/// A `Shared` whose set of faulted pages is poisoned (a thread panicked holding it).
fn poisoned() -> Arc<Shared> {
    let shared = Arc::new(Shared::default());
    let s = Arc::clone(&shared);
    let _ = std::thread::spawn(move || {
        let _held = s.dirty.lock();
        panic!("poisoning the set of faulted pages on purpose");
    })
    .join();
    assert!(shared.dirty.is_poisoned());
    shared
}

#[test]
fn a_poisoned_page_set_is_an_error_not_nothing_dirty() {
    let shared = poisoned();
    let mut out = PageSet::new();
    let e = shared.take_dirty(&mut out).expect_err("poisoned");
    assert!(e.to_string().contains("panicked"), "{e}");
}

#[test]
fn a_recorded_handler_failure_fails_every_harvest() {
    let shared = Shared::default();
    assert!(shared.check().is_ok());
    shared.fail("poll: Bad file descriptor");
    shared.fail("more detail");
    let e = shared.check().expect_err("failed").to_string();
    assert!(
        e.contains("fault handler thread failed: poll: Bad file descriptor; more detail"),
        "{e}"
    );
}

/// A handler that fails on a fault must not leave the faulting thread blocked: it records
/// what it failed on and unregisters the range, and the writer goes on.
#[test]
fn a_failed_handler_releases_the_blocked_writer_and_says_why() {
    let Ok(fd) = uffd::open() else {
        eprintln!("skip: userfaultfd is not available here");
        return;
    };
    match uffd::api(&fd, uffd::FEATURE_WP) {
        Ok(api) if api.features & uffd::FEATURE_WP != 0 => {}
        _ => {
            eprintln!("skip: userfaultfd lacks write-protect");
            return;
        }
    }
    let len: u64 = 4096;
    // SAFETY: a fresh anonymous private mapping with no address hint; MAP_FAILED is checked
    // right below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    let start = addr as u64;
    // SAFETY: `addr` is the start of the writable 4 KiB mapping made above.
    unsafe { addr.cast::<u64>().write_volatile(1) };
    uffd::register(&fd, start, len, uffd::REGISTER_MODE_WP).expect("UFFDIO_REGISTER");
    uffd::writeprotect(&fd, start, len, true).expect("UFFDIO_WRITEPROTECT");
    let ranges = Arc::new(vec![Range {
        slot: 0,
        start,
        len,
        pages: 1,
        unit: 4096,
    }]);
    let shared = poisoned();
    let fd = Arc::new(fd);
    let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let (thread, _) = spawn_handler(&fd, &ranges, &shared, &stop).expect("handler");
    let (tx, rx) = mpsc::channel();
    let at = start;
    std::thread::spawn(move || {
        // SAFETY: the mapping made above stays mapped until this thread reported back (the
        // test unmaps it only after `recv_timeout` returned Ok).
        unsafe { (at as *mut u64).write_volatile(2) };
        let _ = tx.send(());
    });
    let released = rx.recv_timeout(Duration::from_secs(10)).is_ok();
    let _ = stop.write(1);
    thread
        .join()
        .expect("the handler thread itself does not panic");
    let e = shared
        .check()
        .expect_err("the failure is recorded")
        .to_string();
    assert!(released, "the writer stayed blocked: {e}");
    assert!(
        e.contains("recording the fault at")
            && e.contains("poisoned")
            && e.contains("unregistered"),
        "{e}"
    );
    // SAFETY: the writer finished (it reported back); nothing else uses the mapping.
    unsafe { libc::munmap(addr, 4096) };
}
