//! The kernel series of a release string: what golden expectations are kept per.

/// The series (`major.minor`) of a kernel release as `uname -r` prints it: `6.18.44-fc-v1098`
/// -> `6.18`, `6.1.0-37-amd64` -> `6.1`, `7.2.0-rc3+` -> `7.2`, `6.12-custom` -> `6.12`.
/// `None` when the release does not start with two dot-separated numbers.
#[must_use]
pub fn kernel_series(release: &str) -> Option<String> {
    let mut parts = release.trim().splitn(3, '.');
    let major = parts.next()?;
    let rest = parts.next()?;
    let minor_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let minor = &rest[..minor_len];
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (numeric(major) && numeric(minor)).then(|| format!("{major}.{minor}"))
}

#[cfg(test)]
mod tests {
    use super::kernel_series;

    #[test]
    fn series_is_major_dot_minor_of_any_release() {
        for (release, series) in [
            ("6.18.44-fc-v1098", Some("6.18")),
            ("6.12.118+deb12-arm64", Some("6.12")),
            ("7.2.13+deb14-amd64", Some("7.2")),
            ("6.1.0-37-amd64", Some("6.1")),
            ("7.2.0-rc3+", Some("7.2")),
            ("6.12-custom", Some("6.12")),
            ("6.12", Some("6.12")),
            ("7.2-rc1", Some("7.2")),
            (" 6.6.0 \n", Some("6.6")),
            ("", None),
            ("6", None),
            ("6-custom", None),
            ("6.x", None),
            ("v6.18.1", None),
            ("custom", None),
        ] {
            assert_eq!(kernel_series(release).as_deref(), series, "{release:?}");
        }
    }
}
