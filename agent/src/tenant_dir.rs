//! The only way from (allowed root, namespace, user path) to files on the node.
//!
//! A tenant names host paths (`target.directory.path`, `unixSocket.path`); the
//! agent runs as root. [`TenantDir::open`] turns such a path into an open
//! directory handle that is guaranteed to lie inside `<allowed root>/<namespace>/`:
//!
//! - the path must be absolute, free of `..`, and lexically below
//!   `<root>/<namespace>` for one of the configured roots (the root itself is
//!   the administrator's and is opened normally);
//! - every component below the root is opened with `openat(O_NOFOLLOW |
//!   O_DIRECTORY)` relative to its parent's handle, so a symlink anywhere below
//!   the root is refused (never followed, even one pointing inside), and a
//!   directory swapped for a symlink between two steps is refused as well;
//! - missing directories are created with `mkdirat` beneath the handle of
//!   their parent; when a later step fails, the directories this call created
//!   are removed again, so a refusal creates nothing anywhere.
//!
//! Everything after that goes through the handle, never through a path
//! string: files are created `O_CREAT | O_EXCL | O_NOFOLLOW`, read
//! `O_NOFOLLOW`, renamed and removed with `renameat`/`unlinkat`, listed with
//! `getdents` on the handle, free space is `fstatvfs` of it. A program that
//! needs a path (`qemu-img`, QEMU's `blockdev-add`, `nbd-server-start`) is
//! given `/proc/<agent pid>/fd/<n>` of a descriptor the agent holds
//! ([`TenantDir::fd_path`], [`TenantDir::proc_path`]): the kernel resolves that
//! magic link to the already-open inode, so no later rename or symlink swap in
//! the tenant's directory can redirect it.
//!
//! File names inside a directory are single path components ([`check_name`]):
//! no `/`, not `.` or `..`, no NUL, not empty.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags};
use rustix::io::Errno;

/// Failures of [`TenantDir`].
#[derive(Debug, thiserror::Error)]
pub enum TenantDirError {
    /// The path does not resolve inside the namespace's allowed directory.
    #[error("path {path} is refused: {reason}; it must lie inside {allowed}")]
    Outside {
        /// The path as requested.
        path: PathBuf,
        /// The allowed directory (or directories), e.g. `/var/lib/cairn/backups/<ns>/`.
        allowed: String,
        /// Why.
        reason: String,
    },
    /// A file name is not a single path component.
    #[error(
        "file name {name:?} is refused: it must be a single path component (no `/`, `.` or `..`)"
    )]
    BadName {
        /// The name.
        name: String,
    },
    /// An existing entry is in the way (a file created exclusively exists, or
    /// is not what the agent expects there).
    #[error("{path} already exists and is not Cairn's: {what}; remove it or choose another path")]
    InTheWay {
        /// The entry.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The operating system refused an operation.
    #[error("cannot use {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TenantDirError {
    /// True for a refusal of the path itself (as opposed to an I/O failure).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Outside { .. } | Self::BadName { .. } | Self::InTheWay { .. }
        )
    }
}

/// How directories created by [`TenantDir::open`] are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMode {
    /// Permission bits (not subject to the umask).
    pub mode: u32,
    /// Group owner of created directories; `None` keeps the agent's group.
    pub group: Option<u32>,
}

impl DirMode {
    /// `0750`, agent's group: backups and scratch.
    pub const PRIVATE: DirMode = DirMode {
        mode: 0o750,
        group: None,
    };
}

/// Checks that `name` is a single, ordinary path component.
pub fn check_name(name: &str) -> Result<(), TenantDirError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(TenantDirError::BadName {
            name: name.to_string(),
        })
    }
}

/// Checks a Kubernetes namespace name (a DNS label) before it becomes a directory name.
fn check_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
}

/// An open directory inside `<allowed root>/<namespace>/` (or an
/// administrator-given directory, [`TenantDir::open_trusted`]).
#[derive(Debug)]
pub struct TenantDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn io_err(path: &Path) -> impl Fn(Errno) -> TenantDirError + '_ {
    move |e| TenantDirError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl TenantDir {
    /// Opens (creating what is missing) the directory `requested`, which must
    /// lie inside `<root>/<namespace>/` for one of `roots`. `requested = None`
    /// opens `<first root>/<namespace>` itself.
    pub fn open(
        roots: &[PathBuf],
        namespace: &str,
        requested: Option<&Path>,
        mode: DirMode,
    ) -> Result<TenantDir, TenantDirError> {
        let allowed = roots
            .iter()
            .map(|r| format!("{}/", r.join(namespace).display()))
            .collect::<Vec<_>>()
            .join(" or ");
        let allowed = if allowed.is_empty() {
            "an allowed root (none is configured on this node)".to_string()
        } else {
            allowed
        };
        let shown = requested
            .map(Path::to_path_buf)
            .unwrap_or_else(|| roots.first().map(|r| r.join(namespace)).unwrap_or_default());
        let refuse = |reason: &str| TenantDirError::Outside {
            path: shown.clone(),
            allowed: allowed.clone(),
            reason: reason.to_string(),
        };
        if !check_namespace(namespace) {
            return Err(refuse("the namespace is not a valid name"));
        }
        let (root, rest): (&PathBuf, Vec<String>) = match requested {
            None => (roots.first().ok_or_else(|| refuse("no root"))?, Vec::new()),
            Some(p) => {
                if !p.is_absolute() {
                    return Err(refuse("the path is not absolute"));
                }
                if p.components().any(|c| matches!(c, Component::ParentDir)) {
                    return Err(refuse("the path contains `..`"));
                }
                let Some((root, rest)) = roots.iter().find_map(|r| {
                    let rest = p.strip_prefix(r.join(namespace)).ok()?;
                    Some((r, rest))
                }) else {
                    let other_ns = roots.iter().any(|r| p.starts_with(r));
                    return Err(refuse(if other_ns {
                        "it is not in this namespace's directory"
                    } else {
                        "it is not under an allowed root"
                    }));
                };
                let mut parts = Vec::new();
                for c in rest.components() {
                    match c {
                        Component::Normal(s) => match s.to_str() {
                            Some(s) => parts.push(s.to_string()),
                            None => return Err(refuse("the path is not UTF-8")),
                        },
                        Component::CurDir => {}
                        _ => return Err(refuse("the path has an unexpected component")),
                    }
                }
                (root, parts)
            }
        };
        let root_fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => refuse("the allowed root does not exist on this node"),
            e => io_err(root)(e),
        })?;
        let mut components = vec![namespace.to_string()];
        components.extend(rest);
        let mut cur = root_fd;
        let mut cur_path = root.clone();
        // Directories this call created, (parent handle, name), for rollback.
        let mut created: Vec<(OwnedFd, String)> = Vec::new();
        let rollback = |created: &mut Vec<(OwnedFd, String)>| {
            while let Some((parent, name)) = created.pop() {
                let _ = rustix::fs::unlinkat(&parent, name.as_str(), AtFlags::REMOVEDIR);
            }
        };
        for name in &components {
            let step_path = cur_path.join(name);
            let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
            let opened = match rustix::fs::openat(&cur, name.as_str(), flags, Mode::empty()) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&cur, name.as_str(), Mode::from_raw_mode(0o700)) {
                        Ok(()) => {
                            if let Ok(parent) = cur.try_clone() {
                                created.push((parent, name.clone()));
                            }
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => {
                            rollback(&mut created);
                            return Err(io_err(&step_path)(e));
                        }
                    }
                    let fd = rustix::fs::openat(&cur, name.as_str(), flags, Mode::empty());
                    if let Ok(fd) = &fd {
                        // Mode and group set on the handle: not subject to the umask, no path.
                        let _ = rustix::fs::fchmod(fd, Mode::from_raw_mode(mode.mode));
                        if let Some(g) = mode.group {
                            let _ = rustix::fs::fchown(fd, None, Some(Gid::from_raw(g)));
                        }
                    }
                    fd
                }
                r => r,
            };
            match opened {
                Ok(fd) => {
                    cur = fd;
                    cur_path = step_path;
                }
                Err(e) => {
                    let what = match rustix::fs::statat(
                        &cur,
                        name.as_str(),
                        AtFlags::SYMLINK_NOFOLLOW,
                    ) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                            format!(
                                "{} is a symlink (symlinks below the allowed root are not followed)",
                                step_path.display()
                            )
                        }
                        Ok(_) => format!("{} is not a directory", step_path.display()),
                        Err(_) => format!("{} cannot be opened ({e})", step_path.display()),
                    };
                    rollback(&mut created);
                    return Err(refuse(&what));
                }
            }
        }
        Ok(TenantDir {
            fd: cur,
            path: cur_path,
        })
    }

    /// Opens a directory an administrator named (the restore CLI): symlinks
    /// are followed, nothing is confined. Never use it for tenant input.
    pub fn open_trusted(path: &Path) -> Result<TenantDir, TenantDirError> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err(path))?;
        Ok(TenantDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The directory's path, for messages and status (never reopened by the agent).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside, for messages and status.
    pub fn display_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A second handle on the same directory.
    pub fn try_clone(&self) -> Result<TenantDir, TenantDirError> {
        Ok(TenantDir {
            fd: self.fd.try_clone().map_err(|source| TenantDirError::Io {
                path: self.path.clone(),
                source,
            })?,
            path: self.path.clone(),
        })
    }

    /// `/proc/<agent pid>/fd/<n>` of this directory: a path another process
    /// (QEMU binding a socket, `qemu-img`) can use that resolves to this
    /// directory while the handle lives, whatever happens to its path.
    pub fn proc_path(&self) -> PathBuf {
        fd_path(&self.fd)
    }

    fn io(&self, name: &str) -> impl Fn(Errno) -> TenantDirError + use<> {
        let path = self.path.join(name);
        move |e| TenantDirError::Io {
            path: path.clone(),
            source: e.into(),
        }
    }

    /// Creates `name` (which must not exist; symlinks are not followed) for
    /// reading and writing, with `mode`.
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File, TenantDirError> {
        check_name(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| match e {
            Errno::EXIST => TenantDirError::InTheWay {
                path: self.path.join(name),
                what: "a file of that name exists".into(),
            },
            e => self.io(name)(e),
        })?;
        Ok(File::from(fd))
    }

    /// Opens the regular file `name` for reading, without following symlinks.
    pub fn open_read(&self, name: &str) -> Result<File, TenantDirError> {
        check_name(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(self.io(name))?;
        let st = rustix::fs::fstat(&fd).map_err(self.io(name))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(TenantDirError::InTheWay {
                path: self.path.join(name),
                what: "it is not a regular file".into(),
            });
        }
        Ok(File::from(fd))
    }

    /// Reads the regular file `name` fully.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, TenantDirError> {
        let mut f = self.open_read(name)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|source| TenantDirError::Io {
                path: self.path.join(name),
                source,
            })?;
        Ok(buf)
    }

    /// Writes `name` atomically: `<name>.tmp` created exclusively (a stale one
    /// is removed first), written, synced, renamed over `name`.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), TenantDirError> {
        check_name(name)?;
        let tmp = format!("{name}.tmp");
        let _ = self.remove(&tmp);
        let mut f = self.create_new(&tmp, 0o640)?;
        let io = |source| TenantDirError::Io {
            path: self.path.join(&tmp),
            source,
        };
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name).map_err(self.io(name))?;
        Ok(())
    }

    /// What `name` is, without following a symlink; `None` when absent.
    pub fn kind(&self, name: &str) -> Result<Option<FileType>, TenantDirError> {
        check_name(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    /// `(device, inode, size)` of `name`, without following a symlink.
    pub fn identity(&self, name: &str) -> Result<(u64, u64, u64), TenantDirError> {
        check_name(name)?;
        let st =
            rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(self.io(name))?;
        Ok((st.st_dev, st.st_ino, st.st_size as u64))
    }

    /// True when `name` exists (whatever it is).
    pub fn exists(&self, name: &str) -> bool {
        matches!(self.kind(name), Ok(Some(_)))
    }

    /// Removes the entry `name` (a symlink is removed, not followed).
    pub fn remove(&self, name: &str) -> Result<(), TenantDirError> {
        check_name(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(self.io(name))
    }

    /// Sets mode and group of `name` (a socket QEMU bound here).
    pub fn set_mode(
        &self,
        name: &str,
        mode: u32,
        group: Option<u32>,
    ) -> Result<(), TenantDirError> {
        check_name(name)?;
        if let Some(g) = group {
            rustix::fs::chownat(
                &self.fd,
                name,
                None,
                Some(Gid::from_raw(g)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(self.io(name))?;
        }
        if self.kind(name)? == Some(FileType::Symlink) {
            return Err(TenantDirError::InTheWay {
                path: self.path.join(name),
                what: "it is a symlink".into(),
            });
        }
        rustix::fs::chmodat(&self.fd, name, Mode::from_raw_mode(mode), AtFlags::empty())
            .map_err(self.io(name))
    }

    /// Names of the entries (not `.`/`..`).
    pub fn names(&self) -> Vec<String> {
        let Ok(dir) = Dir::read_from(&self.fd) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect()
    }

    /// Bytes available to unprivileged writers on this directory's filesystem.
    pub fn available_bytes(&self) -> Result<u64, TenantDirError> {
        let st = rustix::fs::fstatvfs(&self.fd).map_err(io_err(&self.path))?;
        Ok(st.f_bavail * st.f_frsize)
    }
}

/// `/proc/<agent pid>/fd/<n>` of a descriptor the agent holds: what a
/// program given this path opens is that inode, not whatever a path string
/// would resolve to by then. Valid while the descriptor stays open.
pub fn fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_fd().as_raw_fd()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = walk(dir);
        v.sort();
        v
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&p));
            }
        }
        out
    }

    #[test]
    fn confines_to_the_namespace_and_creates_nothing_on_refusal() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let roots = vec![root.clone()];
        let ok =
            TenantDir::open(&roots, "ns", Some(&root.join("ns/a/b")), DirMode::PRIVATE).unwrap();
        assert_eq!(ok.path(), root.join("ns/a/b"));
        assert!(root.join("ns/a/b").is_dir());
        let before = (listing(&root), listing(&outside));
        let refused = [
            root.join("other/x"),
            root.join("x"),
            root.clone(),
            root.join("ns/../other"),
            root.join("ns/a/../../other"),
            PathBuf::from("relative/ns"),
            outside.join("ns"),
        ];
        for p in refused {
            let e = TenantDir::open(&roots, "ns", Some(&p), DirMode::PRIVATE).unwrap_err();
            assert!(matches!(e, TenantDirError::Outside { .. }), "{p:?}: {e}");
            assert!(
                e.to_string()
                    .contains(&root.join("ns").display().to_string()),
                "{e}"
            );
        }
        // A symlink below the root, to outside or inside: refused, nothing created.
        std::os::unix::fs::symlink(&outside, root.join("ns/a/out")).unwrap();
        std::os::unix::fs::symlink(root.join("ns/a/b"), root.join("ns/a/in")).unwrap();
        let before = (listing(&root), before.1);
        for p in ["ns/a/out/x/y", "ns/a/in/x", "ns/a/out"] {
            let e =
                TenantDir::open(&roots, "ns", Some(&root.join(p)), DirMode::PRIVATE).unwrap_err();
            assert!(e.to_string().contains("symlink"), "{e}");
        }
        // The namespace directory itself a symlink.
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        let e = TenantDir::open(&roots, "evil", Some(&root.join("evil/x")), DirMode::PRIVATE)
            .unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        let mut after_root = listing(&root);
        after_root.retain(|p| !p.ends_with("/evil"));
        assert_eq!(after_root, before.0);
        assert_eq!(listing(&outside), before.1);
        // Invalid namespace names.
        for ns in ["", "..", "a/b", "UPPER"] {
            assert!(
                TenantDir::open(&roots, ns, None, DirMode::PRIVATE).is_err(),
                "{ns}"
            );
        }
    }

    #[test]
    fn files_go_through_the_handle() {
        let t = tempfile::tempdir().unwrap();
        let roots = vec![t.path().to_path_buf()];
        let d =
            TenantDir::open(&roots, "ns", Some(&t.path().join("ns/d")), DirMode::PRIVATE).unwrap();
        d.write_atomic("m.json", b"{}").unwrap();
        assert_eq!(d.read("m.json").unwrap(), b"{}");
        assert!(!d.exists("m.json.tmp"));
        assert!(matches!(
            d.create_new("m.json", 0o640).unwrap_err(),
            TenantDirError::InTheWay { .. }
        ));
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("ns/d/link")).unwrap();
        assert!(d.open_read("link").is_err());
        assert!(d.create_new("link", 0o640).is_err());
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(matches!(
                d.read(bad).unwrap_err(),
                TenantDirError::BadName { .. }
            ));
        }
        // The handle keeps pointing at the directory it opened after a swap.
        std::fs::rename(t.path().join("ns/d"), t.path().join("ns/moved")).unwrap();
        std::os::unix::fs::symlink("/tmp", t.path().join("ns/d")).unwrap();
        d.create_new("after-swap", 0o640).unwrap();
        assert!(t.path().join("ns/moved/after-swap").exists());
        assert!(!Path::new("/tmp/after-swap").exists());
        assert!(d.available_bytes().unwrap() > 0);
        let mut names = d.names();
        names.sort();
        assert_eq!(names, ["after-swap", "link", "m.json"]);
    }
}
