//! The access lower bound for idle-page scans: every page the guest accessed after the previous
//! scan ended must be reported accessed by the next scan.
//!
//! What it can see: accesses (reads, and writes at their store) between the end of one scan
//! (after its TLB flush, if the design flushes) and the start of the next are required.
//! Accesses while a scan runs are not required by anyone: a page read and cleared before
//! the access may legitimately miss it when the access went through a cached translation, and
//! the kernel promises nothing for that window. What it cannot see: accuracy (pages reported
//! accessed that were not) is counted, not judged. The harness's own access check
//! (`scenarios::access`) judges guest-visible A/D bits on real KVM; this one judges a scan's
//! report, which no existing oracle type models, so it is its own small type.

/// State of the access oracle (part of the explored state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessOracle {
    /// Pages accessed since the last scan ended, before the current one began.
    required: u64,
    /// A scan is running.
    in_scan: bool,
    /// Pages the running scan reported accessed.
    reported: u64,
    /// Completed scans.
    pub scans: u32,
    /// First miss, readable.
    pub first_miss: Option<String>,
    /// Required pages over all scans.
    pub due: u64,
    /// Required pages reported idle.
    pub missed: u64,
    /// Pages reported accessed without a required access.
    pub extra: u64,
}

impl AccessOracle {
    /// The guest accessed `page`.
    pub fn touch(&mut self, page: usize) {
        if !self.in_scan {
            self.required |= 1 << page;
        }
    }

    /// A scan starts: what was accessed so far is what it must report.
    pub fn scan_begin(&mut self) {
        self.in_scan = true;
        self.reported = 0;
    }

    /// The scan read `page`'s accessed state.
    pub fn scan_page(&mut self, page: usize, accessed: bool) {
        if accessed {
            self.reported |= 1 << page;
        }
    }

    /// The scan ended (after its flush, if any): judge it.
    pub fn scan_end(&mut self) {
        self.scans += 1;
        let missing = self.required & !self.reported;
        self.due += u64::from(self.required.count_ones());
        self.missed += u64::from(missing.count_ones());
        self.extra += u64::from((self.reported & !self.required).count_ones());
        if missing != 0 && self.first_miss.is_none() {
            self.first_miss = Some(format!(
                "page {} accessed after scan {} ended, reported idle by scan {}",
                missing.trailing_zeros(),
                self.scans - 1,
                self.scans
            ));
        }
        self.required = 0;
        self.in_scan = false;
    }

    /// Miss rate in percent over all scans.
    #[must_use]
    pub fn miss_rate(&self) -> f64 {
        if self.due == 0 {
            0.0
        } else {
            100.0 * self.missed as f64 / self.due as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_before_the_scan_reported_idle_is_a_miss_and_one_during_it_is_not() {
        let mut o = AccessOracle::default();
        o.touch(1);
        o.scan_begin();
        o.touch(2);
        o.scan_page(1, false);
        o.scan_page(2, false);
        o.scan_end();
        assert_eq!((o.due, o.missed), (1, 1));
        assert!(o.first_miss.as_deref().unwrap_or("").starts_with("page 1"));
        o.scan_begin();
        o.scan_page(2, true);
        o.scan_end();
        assert_eq!((o.due, o.missed, o.extra), (1, 1, 1));
    }
}
