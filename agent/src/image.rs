//! Offline image work through QEMU's own tools: `qemu-img` (create, info,
//! bitmap, convert), checksums of backup files ([`file_sha256_and_size`]),
//! and `nbdcopy` + `qemu-nbd` (stream a whole image chain to compute its
//! content checksum without a temporary copy; used by tools, not the data path).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::debug;

/// Failures of an image tool.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The tool could not be started (is it installed?).
    #[error("cannot run {tool}; is it installed and on PATH?")]
    Spawn {
        /// Tool name.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("{0}")]
    Failed(Box<ToolFailure>),
    /// Reading the tool's output failed.
    #[error("reading the output of {tool} failed")]
    Io {
        /// Tool name.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img info` printed something unexpected.
    #[error("cannot parse `qemu-img info` output for {path}")]
    Parse {
        /// Image path.
        path: PathBuf,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
}

/// How a tool failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFailure {
    /// Tool name.
    pub tool: String,
    /// Its arguments, space separated.
    pub args: String,
    /// Exit status.
    pub status: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} failed ({}): {}",
            self.tool, self.args, self.status, self.stderr
        )
    }
}

async fn run(tool: &str, args: &[OsString]) -> Result<Vec<u8>, ImageError> {
    let printable = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    debug!(tool, args = %printable, "running image tool");
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ImageError::Spawn {
            tool: tool.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Failed(Box::new(ToolFailure {
            tool: tool.into(),
            args: printable,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })));
    }
    Ok(out.stdout)
}

fn os(args: &[&(dyn AsRef<std::ffi::OsStr> + Sync)]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Creates a qcow2 image of `size` bytes, optionally on top of a qcow2 `backing` file.
pub async fn create_qcow2(
    path: &Path,
    size: u64,
    backing: Option<&Path>,
) -> Result<(), ImageError> {
    let size = size.to_string();
    let mut args = os(&[&"create", &"-q", &"-f", &"qcow2"]);
    if let Some(b) = backing {
        args.extend(os(&[&"-b", &b, &"-F", &"qcow2"]));
    }
    args.extend(os(&[&path, &size]));
    run("qemu-img", &args).await.map(drop)
}

/// Formats `file` (created empty by the caller through a [`crate::tenant_dir::TenantDir`])
/// as a qcow2 image of `size` bytes whose header names `backing` (a file name
/// relative to the image's directory) without opening it (`-u`). `qemu-img`
/// is given `/proc/<agent pid>/fd/<n>` of `file`, so it writes exactly that
/// inode, whatever happened to its path since.
pub async fn create_qcow2_at(
    file: &std::fs::File,
    size: u64,
    backing: Option<&str>,
) -> Result<(), ImageError> {
    let path = crate::tenant_dir::fd_path(file);
    let size = size.to_string();
    let mut args = os(&[&"create", &"-q", &"-f", &"qcow2"]);
    if let Some(b) = backing {
        args.extend(os(&[&"-u", &"-b", &b, &"-F", &"qcow2"]));
    }
    args.extend(os(&[&path, &size]));
    run("qemu-img", &args).await.map(drop)
}

/// A bitmap as `qemu-img info` shows it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageBitmap {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u32,
    /// Flags such as `auto` (enabled) and `in-use` (not closed cleanly).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format.
    pub format: String,
    /// Guest visible size.
    pub virtual_size: u64,
    /// Backing file as written in the header.
    pub backing_filename: Option<String>,
    /// Persistent bitmaps (qcow2 only).
    pub bitmaps: Vec<ImageBitmap>,
}

/// Runs `qemu-img info`; `share` allows reading an image a running QEMU holds.
pub async fn image_info(path: &Path, share: bool) -> Result<ImageInfo, ImageError> {
    #[derive(Deserialize)]
    struct Raw {
        format: String,
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        #[serde(rename = "backing-filename", default)]
        backing_filename: Option<String>,
        #[serde(rename = "format-specific", default)]
        specific: Option<Specific>,
    }
    #[derive(Deserialize)]
    struct Specific {
        #[serde(default)]
        data: SpecificData,
    }
    #[derive(Deserialize, Default)]
    struct SpecificData {
        #[serde(default)]
        bitmaps: Vec<ImageBitmap>,
    }
    let mut args = os(&[&"info", &"--output=json"]);
    if share {
        args.push("-U".into());
    }
    args.push(path.as_os_str().to_os_string());
    let out = run("qemu-img", &args).await?;
    let raw: Raw = serde_json::from_slice(&out).map_err(|source| ImageError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        backing_filename: raw.backing_filename,
        bitmaps: raw.specific.map(|s| s.data.bitmaps).unwrap_or_default(),
    })
}

/// `qemu-img bitmap --add` on a stopped VM's image.
pub async fn bitmap_add(image: &Path, name: &str) -> Result<(), ImageError> {
    run(
        "qemu-img",
        &os(&[&"bitmap", &"--add", &"-f", &"qcow2", &image, &name]),
    )
    .await
    .map(drop)
}

/// `qemu-img bitmap --remove` on a stopped VM's image.
pub async fn bitmap_remove(image: &Path, name: &str) -> Result<(), ImageError> {
    run(
        "qemu-img",
        &os(&[&"bitmap", &"--remove", &"-f", &"qcow2", &image, &name]),
    )
    .await
    .map(drop)
}

/// Output format of [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// qcow2.
    Qcow2,
    /// raw.
    Raw,
}

impl OutputFormat {
    /// qemu-img's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Raw => "raw",
        }
    }
}

/// How [`convert`] reads its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceCache {
    /// `-T none`: bypass the page cache (the files were not just read).
    Bypass,
    /// `-T writeback`: read through the page cache (the files were just read
    /// for verification, so their pages are cached).
    PageCache,
}

/// `qemu-img convert` of a qcow2 chain (newest file) into one standalone
/// image. The output bypasses the page cache (`-t none`) where the
/// filesystem allows it, falling back to buffered I/O otherwise; the source
/// is read as `source_cache` says.
pub async fn convert(
    source: &Path,
    output: &Path,
    format: OutputFormat,
    source_cache: SourceCache,
) -> Result<(), ImageError> {
    let base = |direct: bool| {
        let mut a = os(&[&"convert", &"-q", &"-f", &"qcow2", &"-O", &format.as_str()]);
        match (direct, source_cache) {
            (true, SourceCache::Bypass) => a.extend(os(&[&"-t", &"none", &"-T", &"none"])),
            (true, SourceCache::PageCache) => a.extend(os(&[&"-t", &"none", &"-T", &"writeback"])),
            (false, _) => a.extend(os(&[&"-t", &"writeback", &"-T", &"writeback"])),
        }
        a.extend(os(&[&source, &output]));
        a
    };
    match run("qemu-img", &base(true)).await {
        Ok(_) => Ok(()),
        Err(ImageError::Failed(_)) => {
            let _ = tokio::fs::remove_file(output).await;
            run("qemu-img", &base(false)).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

/// SHA-256 (hex) of an image's guest-visible content, reading through its
/// backing chain: `nbdcopy` streams it from a private read-only `qemu-nbd`.
/// Raw files are hashed directly.
pub async fn content_sha256(path: &Path, format: &str) -> Result<String, ImageError> {
    if format == "raw" {
        return file_sha256(path).await;
    }
    let tool = "nbdcopy";
    let mut child = Command::new(tool)
        .arg("--")
        .arg("[")
        .args(["qemu-nbd", "-r", "-f", format])
        .arg(path)
        .arg("]")
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            tool: tool.into(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let hash = hash_reader(&mut stdout, tool).await?;
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| ImageError::Io {
            tool: tool.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Failed(Box::new(ToolFailure {
            tool: tool.into(),
            args: format!("[ qemu-nbd -r -f {format} {} ] -", path.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })));
    }
    Ok(hash)
}

/// SHA-256 (hex) and size of a plain file, read sequentially in large
/// buffered chunks (the pages stay cached for a reader that follows, such as
/// `qemu-img convert -T writeback`). ring uses SHA-NI where the CPU has it.
pub async fn file_sha256_and_size(path: &Path) -> Result<(String, u64), ImageError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path).map_err(|source| ImageError::Io {
            tool: "sha256".into(),
            source,
        })?;
        hash_file_blocking(f)
    })
    .await
    .map_err(|e| ImageError::Io {
        tool: "sha256".into(),
        source: std::io::Error::other(e),
    })?
}

/// SHA-256 (hex) and length of the bytes of an already open file.
pub async fn open_file_sha256_and_size(f: std::fs::File) -> Result<(String, u64), ImageError> {
    tokio::task::spawn_blocking(move || hash_file_blocking(f))
        .await
        .map_err(|e| ImageError::Io {
            tool: "sha256".into(),
            source: std::io::Error::other(e),
        })?
}

/// SHA-256 (hex) of a plain file (see [`file_sha256_and_size`]).
pub async fn file_sha256(path: &Path) -> Result<String, ImageError> {
    file_sha256_and_size(path).await.map(|(h, _)| h)
}

fn hash_file_blocking(mut f: std::fs::File) -> Result<(String, u64), ImageError> {
    use std::io::Read;
    let io = |source| ImageError::Io {
        tool: "sha256".into(),
        source,
    };
    // Sequential hint: larger kernel readahead.
    let _ = nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
    );
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finish()), total))
}

async fn hash_reader<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    tool: &str,
) -> Result<String, ImageError> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).await.map_err(|source| ImageError::Io {
            tool: tool.into(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finish()))
}
