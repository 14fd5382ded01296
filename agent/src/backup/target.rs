//! Where push backups may be written: `<allowed root>/<namespace>/…`, opened
//! through [`TenantDir`] (no `..`, no symlinks, nothing created on refusal),
//! and how much room a backup may need.

use std::path::{Path, PathBuf};

use super::BackupError;
use crate::tenant_dir::{DirMode, TenantDir};

/// The roots under which a namespace's backups may be written: namespace
/// `ns` may use `<root>/<ns>/` and anything below it.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    allowed_roots: Vec<PathBuf>,
}

impl TargetPolicy {
    /// A policy allowing the given roots (each should exist).
    pub fn new(allowed_roots: impl IntoIterator<Item = PathBuf>) -> Self {
        Self {
            allowed_roots: allowed_roots.into_iter().collect(),
        }
    }

    /// The configured roots.
    pub fn allowed_roots(&self) -> &[PathBuf] {
        &self.allowed_roots
    }

    /// Opens `requested` (creating missing directories beneath the
    /// namespace's directory without following symlinks) when it lies inside
    /// `<root>/<namespace>/` of an allowed root; refuses anything else with
    /// [`BackupError::OutsideAllowedRoots`], creating nothing.
    pub fn resolve_dir(&self, namespace: &str, requested: &Path) -> Result<TenantDir, BackupError> {
        Ok(TenantDir::open(
            &self.allowed_roots,
            namespace,
            Some(requested),
            DirMode::PRIVATE,
        )?)
    }
}

/// Worst-case size of a qcow2 file holding `data` bytes of a `virtual_size` disk.
pub fn qcow2_estimate(data: u64, virtual_size: u64) -> u64 {
    // Data plus L2 tables (8 bytes per 64 KiB cluster), refcounts and headers.
    data + virtual_size / 4096 + (1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        let root = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let policy = TargetPolicy::new([root.path().to_path_buf()]);
        let ok = policy
            .resolve_dir("ns", &root.path().join("ns/a/b"))
            .unwrap();
        assert!(ok.path().is_dir());
        for bad in [
            root.path().join("ns/a/../../x"),
            other.path().to_path_buf(),
            root.path().join("other-ns/a"),
            PathBuf::from("relative"),
        ] {
            let e = policy.resolve_dir("ns", &bad).unwrap_err();
            assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }), "{e}");
        }
        std::os::unix::fs::symlink(other.path(), root.path().join("ns/link")).unwrap();
        let e = policy
            .resolve_dir("ns", &root.path().join("ns/link/sub"))
            .unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }), "{e}");
        assert!(!other.path().join("sub").exists());
    }
}
