//! A tiny real Linux guest for tests where the guest matters: Debian's cloud
//! kernel, a busybox initramfs whose `/init` (e2e/tools/guest-init.sh) mounts
//! an ext4 data disk on `/data`, and `qemu-guest-agent` on a second serial port.
//!
//! How the parts talk:
//! - [`GuestImage::ensure`] runs e2e/tools/build-guest.sh, which builds the
//!   kernel + initramfs from Debian bookworm packages into the tools cache
//!   (keyed by package versions and the init script's hash) or reuses it.
//! - [`make_data_disk`] makes the ext4 data disk on the host (`mkfs.ext4 -d`).
//! - [`GuestVm::start`] boots it as a [`TestVm`] (same QMP socket, `-blockdev`
//!   node names and `virtio-blk-pci` device id, so a Cairn agent discovers it
//!   like any test VM), with the console in `<dir>/<name>.console.log` and the
//!   guest agent at `<qmp_root>/<namespace>/<name>.qga.sock`. TCG by default
//!   (KVM hangs this kernel on nested-virtualisation machines, QEMU-NOTES.md);
//!   `CAIRN_GUEST_ACCEL=kvm` overrides.
//! - In [`GuestMode::Workload`] the guest appends fsynced records to
//!   `/data/records.log` ([`record_line`]); [`GuestAgent`] reads the last one
//!   through `guest-exec`, and [`check_records`] checks an image of the disk
//!   on the host without mounting it.

use std::io::{BufRead, BufReader, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::vm::{Launch, TestVm, VmDisk};

/// Console line the guest prints once `/data` is mounted and qemu-ga runs.
pub const READY_MARKER: &str = "CAIRN-GUEST-READY";
/// Console line of [`GuestMode::Check`] when `/data` mounted and `records.log` was read.
pub const DATA_OK_MARKER: &str = "CAIRN-DATA-OK";
/// Console line of [`GuestMode::Check`] when it was not.
pub const DATA_FAIL_MARKER: &str = "CAIRN-DATA-FAIL";
/// Console line when the boot failed before [`READY_MARKER`].
pub const GUEST_FAIL_MARKER: &str = "CAIRN-GUEST-FAIL";
/// Path of the records file inside the data filesystem.
pub const RECORDS_FILE: &str = "/records.log";
/// Environment variable that picks the accelerator (`tcg`, the default, or `kvm`).
pub const ACCEL_ENV: &str = "CAIRN_GUEST_ACCEL";

/// A built guest: kernel and initramfs in the tools cache.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The cache directory, named by the package versions.
    pub dir: PathBuf,
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.img`).
    pub initrd: PathBuf,
    /// The Debian packages it was built from, one per line.
    pub versions: String,
}

static IMAGE: Mutex<Option<GuestImage>> = Mutex::new(None);

impl GuestImage {
    /// Builds the guest into the tools cache, or reuses it (no apt download
    /// then); once per process.
    pub fn ensure() -> Result<Self> {
        let mut cached = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = cached.as_ref() {
            return Ok(image.clone());
        }
        let script = crate::tools::repo_root().join("e2e/tools/build-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("CAIRN_TOOLS_CACHE", crate::tools::cache_dir())
            .stderr(std::io::stderr())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(
            out.status.success(),
            "{} failed with {}",
            script.display(),
            out.status
        );
        let dir = PathBuf::from(
            String::from_utf8(out.stdout)
                .context("build-guest.sh printed a non-UTF-8 path")?
                .trim(),
        );
        let image = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            versions: std::fs::read_to_string(dir.join("versions")).unwrap_or_default(),
            dir,
        };
        ensure!(
            image.kernel.is_file() && image.initrd.is_file(),
            "no kernel or initramfs in {}",
            image.dir.display()
        );
        *cached = Some(image.clone());
        Ok(image)
    }
}

/// Makes an ext4 data disk `name` at `path` of `size` bytes in `format`
/// (`raw` or `qcow2`), with the files of `seed` in it (empty when `None`):
/// `mkfs.ext4 -d` into a raw image, then `qemu-img convert` for qcow2.
pub fn make_data_disk(
    name: &str,
    path: &Path,
    size: u64,
    format: &str,
    seed: Option<&Path>,
) -> Result<VmDisk> {
    ensure!(
        format == "raw" || format == "qcow2",
        "data disk format {format} is neither raw nor qcow2"
    );
    let empty = tempfile::tempdir()?;
    let seed = seed.unwrap_or(empty.path());
    let raw = if format == "raw" {
        path.to_path_buf()
    } else {
        path.with_extension("mkfs.raw")
    };
    let _ = std::fs::remove_file(&raw);
    std::fs::File::create(&raw)?.set_len(size)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "cairn-data", "-d"])
        .arg(seed)
        .arg(&raw))?;
    if format == "qcow2" {
        let converted = run(Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(path));
        let _ = std::fs::remove_file(&raw);
        converted?;
    }
    Ok(VmDisk {
        name: name.into(),
        image: path.to_path_buf(),
        format: format.into(),
        size,
    })
}

/// What `/init` does after mounting `/data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// Mount `/data` read-write and wait.
    Idle,
    /// Append a fsynced record to `/data/records.log`, pause `interval`, repeat.
    Workload {
        /// Pause between records.
        interval: Duration,
    },
    /// Mount `/data` read-only, print [`DATA_OK_MARKER`] when `records.log`
    /// is readable ([`DATA_FAIL_MARKER`] otherwise), then wait.
    Check,
}

/// The accelerator a guest runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's emulator; works everywhere (~20-30 s boots on 2 busy cores).
    Tcg,
    /// KVM; hangs this kernel under nested virtualisation (QEMU-NOTES.md).
    Kvm,
}

impl Accel {
    /// `CAIRN_GUEST_ACCEL` (`tcg` or `kvm`), TCG when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(ACCEL_ENV).as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Ok(Self::Tcg),
            Ok("kvm") => Ok(Self::Kvm),
            Ok(other) => bail!("{ACCEL_ENV}={other}: expected tcg or kvm"),
        }
    }

    /// The `accel=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcg => "tcg",
            Self::Kvm => "kvm",
        }
    }
}

/// How a guest is started.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// What `/init` does.
    pub mode: GuestMode,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The accelerator; `None` = [`Accel::from_env`].
    pub accel: Option<Accel>,
    /// Run the data disk's I/O in an iothread.
    pub iothread: bool,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            mode: GuestMode::Idle,
            memory_mib: 256,
            accel: None,
            iothread: false,
        }
    }
}

/// A running guest: a [`TestVm`] (deref to it for QMP, `quit`, `kill`) that boots Linux.
pub struct GuestVm {
    vm: TestVm,
    /// The accelerator it runs under.
    pub accel: Accel,
    /// The console (ttyS0) log.
    pub console: PathBuf,
    /// The guest agent's socket, `<qmp_root>/<namespace>/<name>.qga.sock`.
    pub qga_socket: PathBuf,
    started: Instant,
}

impl GuestVm {
    /// Builds or reuses the guest image and boots it with `data_disk` as
    /// `/dev/vda`; QMP at `<qmp_root>/<namespace>/<name>.sock`, the guest
    /// agent at `<qmp_root>/<namespace>/<name>.qga.sock`, logs in `dir`.
    pub fn start(
        qmp_root: &Path,
        namespace: &str,
        name: &str,
        dir: &Path,
        data_disk: VmDisk,
        options: GuestOptions,
    ) -> Result<Self> {
        let image = GuestImage::ensure()?;
        let accel = match options.accel {
            Some(a) => a,
            None => Accel::from_env()?,
        };
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(qmp_root.join(namespace))?;
        let console = dir.join(format!("{name}.console.log"));
        let qga_socket = qmp_root.join(namespace).join(format!("{name}.qga.sock"));
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&qga_socket);
        let mode = match options.mode {
            GuestMode::Idle => "cairn.mode=idle".to_string(),
            GuestMode::Workload { interval } => format!(
                "cairn.mode=workload cairn.interval={}",
                interval.as_secs_f64()
            ),
            GuestMode::Check => "cairn.mode=check".to_string(),
        };
        let launch = Launch {
            accel: accel.as_str().into(),
            memory_mib: options.memory_mib,
            extra_args: vec![
                "-no-reboot".into(),
                "-kernel".into(),
                path_arg(&image.kernel)?,
                "-initrd".into(),
                path_arg(&image.initrd)?,
                "-append".into(),
                format!("console=ttyS0 panic=-1 {mode}"),
                "-serial".into(),
                format!("file:{}", path_arg(&console)?),
                "-chardev".into(),
                format!(
                    "socket,id=qga,path={},server=on,wait=off",
                    path_arg(&qga_socket)?
                ),
                "-device".into(),
                "isa-serial,chardev=qga".into(),
            ],
            iothread: options.iothread,
        };
        eprintln!(
            "guest {namespace}/{name}: booting with accel={} ({}), {:?}, disk {}",
            accel.as_str(),
            if accel == Accel::Tcg {
                "default; CAIRN_GUEST_ACCEL=kvm to change"
            } else {
                "from CAIRN_GUEST_ACCEL or options"
            },
            options.mode,
            data_disk.image.display()
        );
        let started = Instant::now();
        let vm = TestVm::start_with(qmp_root, namespace, name, dir, vec![data_disk], launch)?;
        Ok(Self {
            vm,
            accel,
            console,
            qga_socket,
            started,
        })
    }

    /// The console output so far.
    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for [`READY_MARKER`] on the console and returns the time since
    /// start; fails early on [`GUEST_FAIL_MARKER`] or a kernel panic.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration> {
        self.wait_console(READY_MARKER, timeout)?;
        let took = self.started.elapsed();
        eprintln!(
            "guest {}/{}: ready after {took:.1?} (accel={})",
            self.vm.namespace,
            self.vm.name,
            self.accel.as_str()
        );
        Ok(took)
    }

    /// Waits until a console line contains `marker` and returns that line;
    /// fails early on [`GUEST_FAIL_MARKER`] or a kernel panic.
    pub fn wait_console(&self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                return Ok(line.trim_end().to_string());
            }
            let tail = || {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            };
            if let Some(line) = text.lines().find(|l| l.contains(GUEST_FAIL_MARKER)) {
                bail!("guest {} failed to boot: {line}\n{}", self.vm.name, tail());
            }
            if text.contains("Kernel panic") {
                bail!("guest {} panicked:\n{}", self.vm.name, tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "guest {} printed no {marker} within {timeout:?} (accel={}); console:\n{}",
                    self.vm.name,
                    self.accel.as_str(),
                    tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A fresh guest-agent session (after the `guest-sync-delimited` handshake).
    pub fn agent(&self) -> Result<GuestAgent> {
        GuestAgent::connect(&self.qga_socket)
    }

    /// The seq of the last complete record in `/data/records.log`, read in
    /// the guest; `None` while there is none.
    pub fn last_record_seq(&self) -> Result<Option<u64>> {
        let out = self
            .agent()?
            .exec("tail", &["-n", "1", "/data/records.log"])?;
        ensure!(
            out.exit_code == 0 || out.stdout.is_empty(),
            "tail in the guest exited {}: {}",
            out.exit_code,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.strip_suffix('\n') else {
            return Ok(None);
        };
        let seq = line.split(' ').next().unwrap_or_default();
        Ok(Some(seq.parse().with_context(|| {
            format!("last record {line:?} has no seq")
        })?))
    }

    /// Polls [`GuestVm::last_record_seq`] until it reaches `seq`.
    pub fn wait_records(&self, seq: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(last) = self.last_record_seq()?
                && last >= seq
            {
                return Ok(last);
            }
            ensure!(
                Instant::now() < deadline,
                "guest {} wrote no record {seq} within {timeout:?}",
                self.vm.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Deref for GuestVm {
    type Target = TestVm;
    fn deref(&self) -> &TestVm {
        &self.vm
    }
}

impl DerefMut for GuestVm {
    fn deref_mut(&mut self) -> &mut TestVm {
        &mut self.vm
    }
}

/// What a `guest-exec` run returned.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    /// Exit code (a signal counts as -1).
    pub exit_code: i64,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// A host-side client of the QEMU guest agent on its chardev socket. QEMU
/// serves one client at a time; drop the session to let another connect.
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl GuestAgent {
    /// Connects and synchronises: 0xFF (which makes the agent drop any
    /// partial input), then `guest-sync-delimited` with a fresh id, skipping
    /// whatever arrives until the reply with that id.
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the guest agent at {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut agent = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            next_id: rand::random::<u32>() as u64,
        };
        let id = agent.next_id;
        agent.writer.write_all(&[0xff])?;
        agent.send("guest-sync-delimited", json!({"id": id}))?;
        loop {
            let reply = agent.read_reply()?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(agent);
            }
        }
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<()> {
        let msg = if arguments.is_null() {
            json!({"execute": command})
        } else {
            json!({"execute": command, "arguments": arguments})
        };
        writeln!(self.writer, "{msg}")?;
        Ok(())
    }

    /// The next JSON line; the 0xFF delimiter and unparsable lines are skipped.
    fn read_reply(&mut self) -> Result<Value> {
        loop {
            let mut line = Vec::new();
            if self.reader.read_until(b'\n', &mut line)? == 0 {
                bail!("guest agent connection closed");
            }
            let start = line.iter().position(|b| *b != 0xff).unwrap_or(line.len());
            if let Ok(v) = serde_json::from_slice::<Value>(&line[start..])
                && v.is_object()
            {
                return Ok(v);
            }
        }
    }

    /// Runs one command (`arguments` null for none) and returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.send(command, arguments)?;
        let reply = self.read_reply()?;
        if let Some(e) = reply.get("error") {
            bail!("guest agent {command} failed: {e}");
        }
        Ok(reply["return"].clone())
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", Value::Null).map(|_| ())
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub fn fsfreeze(&mut self) -> Result<u64> {
        let n = self.execute("guest-fsfreeze-freeze", Value::Null)?;
        n.as_u64()
            .with_context(|| format!("guest-fsfreeze-freeze returned {n}"))
    }

    /// `guest-fsfreeze-status`: `frozen` or `thawed`.
    pub fn fsfreeze_status(&mut self) -> Result<String> {
        let s = self.execute("guest-fsfreeze-status", Value::Null)?;
        Ok(s.as_str().unwrap_or_default().to_string())
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub fn thaw(&mut self) -> Result<u64> {
        let n = self.execute("guest-fsfreeze-thaw", Value::Null)?;
        n.as_u64()
            .with_context(|| format!("guest-fsfreeze-thaw returned {n}"))
    }

    /// Runs `path args…` in the guest (`guest-exec` with captured output,
    /// then `guest-exec-status` until it exits) and returns its output.
    pub fn exec(&mut self, path: &str, args: &[&str]) -> Result<ExecOutput> {
        let started = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
        )?;
        let pid = started["pid"]
            .as_i64()
            .context("guest-exec returned no pid")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.execute("guest-exec-status", json!({"pid": pid}))?;
            if s["exited"].as_bool() == Some(true) {
                let data = |key: &str| -> Result<Vec<u8>> {
                    match s[key].as_str() {
                        Some(b) => Ok(base64::engine::general_purpose::STANDARD.decode(b)?),
                        None => Ok(Vec::new()),
                    }
                };
                return Ok(ExecOutput {
                    exit_code: s["exitcode"].as_i64().unwrap_or(-1),
                    stdout: data("out-data")?,
                    stderr: data("err-data")?,
                });
            }
            ensure!(
                Instant::now() < deadline,
                "{path} {args:?} still runs in the guest after 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The record the guest's workload writes for `seq`, with its newline;
/// mirrors e2e/tools/guest-init.sh.
pub fn record_line(seq: u64) -> String {
    let payload =
        format!("rec-{seq}-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    let sum = Sha256::digest(format!("{seq} {payload}"));
    let sum: String = sum[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{seq} {sum} {payload}\n")
}

/// What [`verify_records`] found in the text of a records file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordsVerdict {
    /// Complete, valid records: seq 0..count, in order.
    pub count: u64,
    /// A final line without its newline that is a prefix of record `count`:
    /// a write the backup caught half-way. Tolerated (only there).
    pub torn_tail: Option<String>,
    /// Everything else that is wrong; empty when consistent.
    pub errors: Vec<String>,
}

impl RecordsVerdict {
    /// Whether the records are a consistent prefix (a torn final line allowed).
    pub fn is_consistent(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks that `text` is records 0, 1, …, n-1 exactly as the guest writes
/// them (so every checksum is valid). Policy: a torn last line is tolerated
/// only when it is the file's final, newline-less partial line and a prefix
/// of the next record; any other difference (bad checksum, gap, repeat,
/// zeros, a complete bad line) is an error.
pub fn verify_records(text: &[u8]) -> RecordsVerdict {
    let mut verdict = RecordsVerdict::default();
    let mut rest = text;
    while !rest.is_empty() {
        let expected = record_line(verdict.count);
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            if expected.as_bytes().starts_with(rest) {
                verdict.torn_tail = Some(String::from_utf8_lossy(rest).into_owned());
            } else {
                verdict.errors.push(format!(
                    "final partial line {:?} is not a prefix of record {}",
                    String::from_utf8_lossy(rest),
                    verdict.count
                ));
            }
            break;
        };
        let line = &rest[..=end];
        if line != expected.as_bytes() {
            verdict.errors.push(format!(
                "line {} is {:?}, expected {:?}",
                verdict.count + 1,
                String::from_utf8_lossy(line),
                expected
            ));
            break;
        }
        verdict.count += 1;
        rest = &rest[end + 1..];
    }
    verdict
}

/// What [`check_records`] found in a data disk image.
#[derive(Clone, Debug)]
pub struct RecordsCheck {
    /// The journal needed replaying (the image is crash-consistent, as a
    /// backup of a running guest is); replayed on a scratch copy.
    pub journal_replayed: bool,
    /// `e2fsck -fn` found nothing to fix (after the replay).
    pub fsck_clean: bool,
    /// Its output.
    pub fsck_output: String,
    /// The records verdict.
    pub records: RecordsVerdict,
}

impl RecordsCheck {
    /// Clean filesystem and consistent records.
    pub fn is_ok(&self) -> bool {
        self.fsck_clean && self.records.is_consistent()
    }
}

/// Reads `/records.log` out of a raw or qcow2 ext4 image without mounting it:
/// converts it to a scratch raw copy (`qemu-img convert -U`, the image is
/// never changed), replays the journal there as a mount would
/// (`e2fsck -E journal_only`), runs `e2fsck -fn`, reads the file with
/// `debugfs -R "cat /records.log"` and verifies it with [`verify_records`].
pub fn check_records(image: &Path) -> Result<RecordsCheck> {
    // In the temporary directory, not next to the image: a backup directory
    // is the agent's to list.
    let scratch = tempfile::Builder::new()
        .prefix("cairn-records-")
        .suffix(".raw")
        .tempfile()?;
    let raw = scratch.path();
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-q", "-O", "raw"])
        .arg(image)
        .arg(raw))?;
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(raw)
        .output()?;
    let replay_text = format!(
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    // 0 = nothing to do, 1 = corrected (the journal was replayed).
    ensure!(
        matches!(replay.status.code(), Some(0 | 1)),
        "replaying the journal of {} failed ({}): {replay_text}",
        image.display(),
        replay.status
    );
    let fsck = Command::new("e2fsck").arg("-fn").arg(raw).output()?;
    let fsck_output = format!(
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = Command::new("debugfs")
        .args(["-R", &format!("cat {RECORDS_FILE}")])
        .arg(raw)
        .output()?;
    ensure!(
        cat.status.success(),
        "debugfs cat {RECORDS_FILE} on {} failed: {}",
        image.display(),
        String::from_utf8_lossy(&cat.stderr)
    );
    let mut records = verify_records(&cat.stdout);
    if cat.stdout.is_empty() && String::from_utf8_lossy(&cat.stderr).contains("not found") {
        records.errors.push(format!("no {RECORDS_FILE}"));
    }
    Ok(RecordsCheck {
        journal_replayed: replay_text.contains("recovering journal"),
        fsck_clean: fsck.status.success(),
        fsck_output,
        records,
    })
}

/// A path as a QEMU option value (no commas: QEMU would split there).
fn path_arg(path: &Path) -> Result<String> {
    let s = path.to_str().context("path is not UTF-8")?;
    ensure!(!s.contains(','), "path {s} contains a comma");
    Ok(s.to_string())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u64) -> Vec<u8> {
        (0..n).flat_map(|s| record_line(s).into_bytes()).collect()
    }

    #[test]
    fn record_line_matches_the_guest_script() {
        // Computed with the guest's pipeline: printf '%s %s' 12 rec-12-… | sha256sum | cut -c1-16.
        assert_eq!(
            record_line(12),
            "12 eed570eb2163a85f rec-12-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
        );
    }

    #[test]
    fn a_clean_prefix_is_consistent() {
        let v = verify_records(&records(50));
        assert_eq!(v.count, 50);
        assert!(v.is_consistent() && v.torn_tail.is_none(), "{v:?}");
        assert_eq!(verify_records(b"").count, 0);
    }

    #[test]
    fn only_a_final_partial_line_is_tolerated() {
        let mut text = records(5);
        text.extend_from_slice(&record_line(5).as_bytes()[..10]);
        let v = verify_records(&text);
        assert_eq!(v.count, 5);
        assert!(v.is_consistent(), "{v:?}");
        assert!(v.torn_tail.is_some());

        let mut text = records(5);
        text.extend_from_slice(b"5 0000");
        assert!(!verify_records(&text).is_consistent());
    }

    #[test]
    fn corruption_gaps_and_zeros_are_errors() {
        let mut bad_sum = records(10);
        let at = record_line(0).len() + record_line(1).len() + 3;
        bad_sum[at] ^= 1;
        assert!(!verify_records(&bad_sum).is_consistent());

        let gap: Vec<u8> = [0, 1, 3]
            .iter()
            .flat_map(|s| record_line(*s).into_bytes())
            .collect();
        let v = verify_records(&gap);
        assert!(!v.is_consistent() && v.count == 2, "{v:?}");

        let mut zeros = records(3);
        zeros.extend_from_slice(&[0; 100]);
        assert!(!verify_records(&zeros).is_consistent());
    }
}
