//! KVM binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst 4.134).
//!
//! The fd holds a header, a descriptor per statistic, and the data; the data is re-read with
//! `pread` for every snapshot, the descriptors only once.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

const HEADER_BYTES: usize = 24;
const DESC_FIXED_BYTES: usize = 16;

/// Errors reading binary stats.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl failed (no KVM_CAP_BINARY_STATS_FD, or another errno).
    #[error("KVM_GET_STATS_FD on {what}: {text}")]
    Ioctl {
        /// "VM" or "vCPU n".
        what: String,
        /// errno text.
        text: String,
    },
    /// Reading the fd failed.
    #[error("reading {what} stats: {source}")]
    Read {
        /// "VM" or "vCPU n".
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The header or a descriptor does not make sense.
    #[error("{what} stats: malformed {detail}")]
    Malformed {
        /// "VM" or "vCPU n".
        what: String,
        /// What was wrong.
        detail: String,
    },
}

#[derive(Debug, Clone)]
struct Desc {
    name: String,
    /// Offset of the value(s) in the data block, in bytes.
    offset: u64,
    /// Number of u64 values (1 for scalars).
    size: u16,
}

/// An open stats fd with its descriptors parsed.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    what: String,
    descs: Vec<Desc>,
    data_offset: u64,
    data_bytes: usize,
}

/// Values of every scalar statistic at one moment, by name (histograms are summed).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot(pub BTreeMap<String, u64>);

impl StatsSnapshot {
    /// Value of `name`, if the kernel has that statistic.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// `self - earlier` for every statistic both have (instant values may go down: saturates).
    #[must_use]
    pub fn delta(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .filter_map(|(k, v)| earlier.0.get(k).map(|e| (k.clone(), v.saturating_sub(*e))))
                .collect(),
        )
    }

    /// Add every value of `other` into `self` (to total per-vCPU stats).
    pub fn accumulate(&mut self, other: &Self) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
}

impl StatsFd {
    /// Open the stats fd of a VM or vCPU fd. `what` names it in errors ("VM", "vCPU 1").
    pub fn open(fd: &impl AsRawFd, what: &str) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; `fd` is a live
        // KVM VM or vCPU fd borrowed for the duration of the call.
        let ret = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if ret < 0 {
            return Err(StatsError::Ioctl {
                what: what.into(),
                text: super::errno_text(
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                ),
            });
        }
        // SAFETY: `ret` is a new fd the kernel just returned to us (checked non-negative
        // above); nothing else owns it, so the File takes sole ownership.
        let file = unsafe { File::from_raw_fd(ret) };
        Self::parse(file, what)
    }

    fn parse(file: File, what: &str) -> Result<Self, StatsError> {
        let read_err = |source| StatsError::Read {
            what: what.into(),
            source,
        };
        let malformed = |detail: String| StatsError::Malformed {
            what: what.into(),
            detail,
        };
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut header, 0).map_err(read_err)?;
        let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let name_size = word(&header, 4) as usize;
        let num_desc = word(&header, 8) as usize;
        let desc_offset = u64::from(word(&header, 16));
        let data_offset = u64::from(word(&header, 20));
        if name_size == 0 || name_size > 4096 || num_desc > 1 << 16 {
            return Err(malformed(format!(
                "header (name_size {name_size}, num_desc {num_desc})"
            )));
        }
        let desc_bytes = DESC_FIXED_BYTES + name_size;
        let mut raw = vec![0u8; desc_bytes * num_desc];
        file.read_exact_at(&mut raw, desc_offset)
            .map_err(read_err)?;
        let mut descs = Vec::with_capacity(num_desc);
        let mut data_bytes = 0usize;
        for chunk in raw.chunks_exact(desc_bytes) {
            let size = u16::from_le_bytes([chunk[6], chunk[7]]);
            let offset = u64::from(word(chunk, 8));
            let name_raw = &chunk[DESC_FIXED_BYTES..];
            let end = name_raw
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_raw.len());
            let name = String::from_utf8_lossy(&name_raw[..end]).into_owned();
            let end_byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(usize::from(size) * 8))
                .ok_or_else(|| malformed(format!("descriptor {name}")))?;
            data_bytes = data_bytes.max(end_byte);
            descs.push(Desc { name, offset, size });
        }
        Ok(Self {
            file,
            what: what.into(),
            descs,
            data_offset,
            data_bytes,
        })
    }

    /// Names of all statistics this fd offers.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.descs.iter().map(|d| d.name.clone()).collect()
    }

    /// Read the raw data block into the start of `buf` (one pread; for the raw-ioctl floor).
    /// Returns false if `buf` is too small or the read failed.
    pub fn read_raw(&self, buf: &mut [u8]) -> bool {
        buf.get_mut(..self.data_bytes)
            .is_some_and(|b| self.file.read_exact_at(b, self.data_offset).is_ok())
    }

    /// Where statistic `name` is in the data block: (byte offset, number of values), for
    /// [`StatsFd::read_sums`]. None if the kernel has no such statistic.
    #[must_use]
    pub fn locate(&self, name: &str) -> Option<(u64, u16)> {
        self.descs
            .iter()
            .find(|d| d.name == name)
            .map(|d| (d.offset, d.size))
    }

    /// The current value of each located statistic in `at` (histograms summed, as in
    /// [`StatsFd::snapshot`]) into `out`, with one pread of the span they cover when it is
    /// small, without allocating. A statistic that cannot be read is None.
    pub fn read_sums(&self, at: &[Option<(u64, u16)>], out: &mut [Option<u64>]) {
        const SPAN: usize = 1024;
        let located = || at.iter().flatten();
        let lo = located().map(|&(o, _)| o).min().unwrap_or(0);
        let hi = located()
            .map(|&(o, n)| o + 8 * u64::from(n))
            .max()
            .unwrap_or(0);
        let mut buf = [0u8; SPAN];
        let span = usize::try_from(hi - lo).unwrap_or(usize::MAX);
        let read = span <= SPAN
            && self
                .file
                .read_exact_at(&mut buf[..span], self.data_offset + lo)
                .is_ok();
        for (slot, loc) in out.iter_mut().zip(at) {
            *slot = loc.and_then(|(o, n)| {
                let bytes = usize::try_from(8 * u64::from(n)).ok()?;
                let mut one = [0u8; SPAN];
                let raw: &[u8] = if read {
                    let start = usize::try_from(o - lo).ok()?;
                    buf.get(start..start + bytes)?
                } else {
                    let b = one.get_mut(..bytes)?;
                    self.file.read_exact_at(b, self.data_offset + o).ok()?;
                    b
                };
                Some(
                    raw.chunks_exact(8)
                        .map(|c| {
                            let mut w = [0u8; 8];
                            w.copy_from_slice(c);
                            u64::from_le_bytes(w)
                        })
                        .sum(),
                )
            });
        }
    }

    /// Read every statistic now.
    pub fn snapshot(&self) -> Result<StatsSnapshot, StatsError> {
        let mut data = vec![0u8; self.data_bytes];
        self.file
            .read_exact_at(&mut data, self.data_offset)
            .map_err(|source| StatsError::Read {
                what: self.what.clone(),
                source,
            })?;
        let mut out = BTreeMap::new();
        for d in &self.descs {
            let start = usize::try_from(d.offset).unwrap_or(usize::MAX);
            let values = (0..usize::from(d.size)).map(|i| {
                let at = start + i * 8;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&data[at..at + 8]);
                u64::from_le_bytes(bytes)
            });
            // Scalars have one value; histograms are reported as the sum of their buckets.
            out.insert(d.name.clone(), values.sum());
        }
        Ok(StatsSnapshot(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Build a stats blob the way the kernel lays it out and parse it back.
    #[test]
    fn parses_the_documented_layout() {
        let name_size = 48usize;
        let names = ["pages_4k", "pages_2m", "histo"];
        let sizes = [1u16, 1, 3];
        let desc_offset = 24 + 64; // header + id string
        let desc_bytes = 16 + name_size;
        let data_offset = desc_offset + desc_bytes * names.len();
        let mut blob = vec![0u8; data_offset + 5 * 8];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut blob, 4, u32::try_from(name_size).expect("small"));
        put32(&mut blob, 8, 3);
        put32(&mut blob, 12, 24);
        put32(&mut blob, 16, u32::try_from(desc_offset).expect("small"));
        put32(&mut blob, 20, u32::try_from(data_offset).expect("small"));
        let mut value_offset = 0u32;
        for (i, (name, size)) in names.iter().zip(sizes).enumerate() {
            let at = desc_offset + i * desc_bytes;
            let kind = if size > 1 { 3 } else { 1 }; // KVM_STATS_TYPE_LINEAR_HIST / INSTANT
            put32(&mut blob, at, kind);
            blob[at + 6..at + 8].copy_from_slice(&size.to_le_bytes());
            put32(&mut blob, at + 8, value_offset);
            blob[at + 16..at + 16 + name.len()].copy_from_slice(name.as_bytes());
            value_offset += u32::from(size) * 8;
        }
        for (i, v) in [7u64, 2, 1, 2, 3].iter().enumerate() {
            blob[data_offset + i * 8..data_offset + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let mut file = tempfile();
        file.write_all(&blob).expect("write");
        let stats = StatsFd::parse(file, "test").expect("parses");
        assert_eq!(stats.names(), names);
        let snap = stats.snapshot().expect("reads");
        assert_eq!(snap.get("pages_4k"), Some(7));
        assert_eq!(snap.get("pages_2m"), Some(2));
        assert_eq!(snap.get("histo"), Some(6), "histogram buckets are summed");
        let mut later = snap.clone();
        later.0.insert("pages_4k".into(), 10);
        assert_eq!(later.delta(&snap).get("pages_4k"), Some(3));
        // The allocation-free reader agrees with the snapshot.
        let at = [
            stats.locate("histo"),
            stats.locate("pages_4k"),
            stats.locate("missing"),
        ];
        let mut sums = [Some(99); 3];
        stats.read_sums(&at, &mut sums);
        assert_eq!(sums, [Some(6), Some(7), None]);
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("trackcheck-stats-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        std::fs::remove_file(&path).expect("unlink temp file");
        file
    }
}
