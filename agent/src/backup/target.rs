//! Where push backups may be written: allowed roots, path resolution that
//! refuses `..` and symlink escapes, and free-space checks.

use std::path::{Component, Path, PathBuf};

use super::BackupError;

/// The directories under which backups and scratch files may be written.
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

    /// Resolves `requested` to a canonical directory under an allowed root,
    /// creating missing directories. Rejects relative paths, `..`
    /// components, and paths that leave the roots through symlinks.
    pub fn resolve_dir(&self, requested: &Path) -> Result<PathBuf, BackupError> {
        let outside = |reason: &str| BackupError::OutsideAllowedRoots {
            path: requested.to_path_buf(),
            roots: self.roots_text(),
            reason: reason.to_string(),
        };
        if !requested.is_absolute() {
            return Err(outside("the path is not absolute"));
        }
        if requested
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(outside("the path contains `..`"));
        }
        let roots: Vec<PathBuf> = self
            .allowed_roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect();
        let inside = |p: &Path| roots.iter().any(|r| p.starts_with(r));
        // Check the deepest existing ancestor before creating anything.
        let mut existing = requested.to_path_buf();
        while !existing.exists() {
            if !existing.pop() {
                return Err(outside("no part of the path exists"));
            }
        }
        let existing = existing
            .canonicalize()
            .map_err(|_| outside("cannot resolve the path"))?;
        if !inside(&existing) {
            return Err(outside("it is not under an allowed root"));
        }
        std::fs::create_dir_all(requested).map_err(|source| BackupError::TargetIo {
            path: requested.to_path_buf(),
            source,
        })?;
        let resolved = requested
            .canonicalize()
            .map_err(|_| outside("cannot resolve the path"))?;
        if !inside(&resolved) || !resolved.is_dir() {
            return Err(outside("it leaves the allowed roots through a symlink"));
        }
        Ok(resolved)
    }

    fn roots_text(&self) -> String {
        if self.allowed_roots.is_empty() {
            return "none configured".into();
        }
        self.allowed_roots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `dir`.
pub fn available_bytes(dir: &Path) -> Result<u64, BackupError> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| BackupError::TargetIo {
        path: dir.to_path_buf(),
        source: std::io::Error::from(e),
    })?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
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
        let ok = policy.resolve_dir(&root.path().join("a/b")).unwrap();
        assert!(ok.is_dir());
        let e = policy
            .resolve_dir(&root.path().join("a/../../x"))
            .unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }));
        let e = policy.resolve_dir(other.path()).unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }));
        std::os::unix::fs::symlink(other.path(), root.path().join("link")).unwrap();
        let e = policy
            .resolve_dir(&root.path().join("link/sub"))
            .unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }), "{e}");
        assert!(!other.path().join("sub").exists());
        let e = policy.resolve_dir(Path::new("relative")).unwrap_err();
        assert!(matches!(e, BackupError::OutsideAllowedRoots { .. }));
    }
}
