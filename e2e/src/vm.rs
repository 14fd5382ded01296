//! Guestless QEMU VMs for end-to-end tests: real `qemu-system-x86_64` with
//! qcow2 (or raw) disks, a QMP socket where an agent discovers it, and a second
//! monitor of the test's own for simulated guest writes (HMP `qemu-io`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// A disk of a test VM.
#[derive(Clone, Debug)]
pub struct VmDisk {
    /// Device id (`disk0`), the name users give.
    pub name: String,
    /// Image file.
    pub image: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Size in bytes.
    pub size: u64,
}

/// How QEMU is started beyond disks and monitors: the guestless defaults, or a
/// booted guest (e.g. [`crate::guest`]'s kernel, console and guest agent).
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `accel=` of `-machine q35` (`kvm:tcg`, `tcg`, `kvm`).
    pub accel: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// More arguments, appended as they are.
    pub extra_args: Vec<String>,
    /// Run the disks' I/O in an iothread (`-object iothread`), as production VMs do.
    pub iothread: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            accel: "kvm:tcg".into(),
            memory_mib: 64,
            extra_args: Vec::new(),
            iothread: false,
        }
    }
}

/// A running guestless VM.
pub struct TestVm {
    /// VM name (the QemuInstance name).
    pub name: String,
    /// Namespace its socket path names.
    pub namespace: String,
    /// Disks.
    pub disks: Vec<VmDisk>,
    /// The socket the agent watches.
    pub agent_socket: PathBuf,
    test_socket: PathBuf,
    dir: PathBuf,
    launch: Launch,
    child: Option<Child>,
}

/// Creates a disk image with `qemu-img create`.
pub fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            format,
            path.to_str().context("path")?,
            &size.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl TestVm {
    /// Creates images for `disks` (`(name, format, size)`) in `dir` and starts QEMU with
    /// its QMP socket at `<qmp_root>/<namespace>/<name>.sock`.
    pub fn start(
        qmp_root: &Path,
        namespace: &str,
        name: &str,
        dir: &Path,
        disks: &[(&str, &str, u64)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let disks: Vec<VmDisk> = disks
            .iter()
            .map(|(n, f, s)| VmDisk {
                name: n.to_string(),
                image: dir.join(format!("{name}-{n}.{f}")),
                format: f.to_string(),
                size: *s,
            })
            .collect();
        for d in &disks {
            create_image(&d.image, &d.format, d.size)?;
        }
        Self::start_on(qmp_root, namespace, name, dir, disks)
    }

    /// Starts QEMU on existing images `disks` (e.g. an overlay whose backing
    /// file is an NBD export), with its QMP socket at `<qmp_root>/<namespace>/<name>.sock`.
    pub fn start_on(
        qmp_root: &Path,
        namespace: &str,
        name: &str,
        dir: &Path,
        disks: Vec<VmDisk>,
    ) -> Result<Self> {
        Self::start_with(qmp_root, namespace, name, dir, disks, Launch::default())
    }

    /// Like [`TestVm::start_on`], started as `launch` says.
    pub fn start_with(
        qmp_root: &Path,
        namespace: &str,
        name: &str,
        dir: &Path,
        disks: Vec<VmDisk>,
        launch: Launch,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut vm = Self {
            name: name.into(),
            namespace: namespace.into(),
            agent_socket: qmp_root.join(namespace).join(format!("{name}.sock")),
            test_socket: dir.join(format!("{name}.test.sock")),
            dir: dir.to_path_buf(),
            disks,
            launch,
            child: None,
        };
        vm.launch()?;
        Ok(vm)
    }

    /// Starts QEMU on the existing images (again).
    pub fn launch(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.agent_socket.parent().unwrap())?;
        let _ = std::fs::remove_file(&self.test_socket);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.arg("-machine")
            .arg(format!("q35,accel={}", self.launch.accel))
            .args(["-nodefaults", "-display", "none", "-m"])
            .arg(self.launch.memory_mib.to_string())
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.agent_socket.display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.test_socket.display()
            ));
        if self.launch.iothread {
            cmd.args(["-object", "iothread,id=io0"]);
        }
        let iothread = if self.launch.iothread {
            ",iothread=io0"
        } else {
            ""
        };
        for d in &self.disks {
            cmd.arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name={}-file",
                    d.image.display(),
                    d.name
                ))
                .arg("-blockdev")
                .arg(format!(
                    "driver={},file={n}-file,node-name={n}-fmt",
                    d.format,
                    n = d.name
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-pci,drive={n}-fmt,id={n}{iothread}",
                    n = d.name
                ));
        }
        cmd.args(&self.launch.extra_args);
        let log = std::fs::File::create(self.dir.join(format!("{}.qemu.log", self.name)))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The file appears at bind(); QEMU accepts only after listen().
        while UnixStream::connect(&self.test_socket).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // As a launcher would: no stale monitor socket for discovery.
                let _ = std::fs::remove_file(&self.agent_socket);
                let log = std::fs::read_to_string(self.dir.join(format!("{}.qemu.log", self.name)))
                    .unwrap_or_default();
                bail!("QEMU exited ({status}): {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!(
                    "QEMU did not create its QMP socket; see {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs one QMP command on the test's own monitor.
    pub fn qmp(&self, command: &str, arguments: Value) -> Result<Value> {
        let stream = UnixStream::connect(&self.test_socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line)?; // greeting
        writeln!(writer, "{}", json!({"execute": "qmp_capabilities"}))?;
        let read_reply = |reader: &mut BufReader<UnixStream>| -> Result<Value> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    bail!("QMP connection closed");
                }
                let v: Value = serde_json::from_str(&line)?;
                if v.get("event").is_none() {
                    return Ok(v);
                }
            }
        };
        read_reply(&mut reader)?;
        writeln!(
            writer,
            "{}",
            json!({"execute": command, "arguments": arguments})
        )?;
        let reply = read_reply(&mut reader)?;
        if let Some(e) = reply.get("error") {
            bail!("QMP {command} failed: {e}");
        }
        Ok(reply["return"].clone())
    }

    /// Simulates a guest write of `len` bytes of `pattern` at `offset` on `disk`.
    pub fn write(&self, disk: &str, pattern: u8, offset: u64, len: u64) -> Result<()> {
        self.qemu_io_write(disk, &format!("-P {pattern:#x}"), offset, len)
    }

    /// Simulates a guest write of the first `len` bytes of the file `source`
    /// at `offset` on `disk` (QEMU reads the file).
    pub fn write_file(&self, disk: &str, source: &Path, offset: u64, len: u64) -> Result<()> {
        self.qemu_io_write(disk, &format!("-s {}", source.display()), offset, len)
    }

    fn qemu_io_write(&self, disk: &str, data: &str, offset: u64, len: u64) -> Result<()> {
        let out = self.qmp(
            "human-monitor-command",
            json!({"command-line": format!(
                "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"write {data} {offset} {len}\""
            )}),
        )?;
        let text = out.as_str().unwrap_or_default();
        if text.contains("error") || text.contains("failed") {
            bail!("guest write failed: {text}");
        }
        Ok(())
    }

    /// Names of the bitmaps on `disk`'s format node, as QEMU reports them.
    pub fn bitmaps(&self, disk: &str) -> Result<Vec<String>> {
        let nodes = self.qmp("query-named-block-nodes", json!({"flat": true}))?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["node-name"] == format!("{disk}-fmt"))
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["name"].as_str().map(String::from))
            .collect())
    }

    /// Quits QEMU cleanly (persistent bitmaps are written to the images).
    pub fn quit(&mut self) -> Result<()> {
        let _ = self.qmp("quit", json!({}));
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        let _ = std::fs::remove_file(&self.agent_socket);
        Ok(())
    }

    /// Kills QEMU with SIGKILL (bitmaps added since start are lost, old ones turn inconsistent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.agent_socket);
    }

    /// The directory of its images and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> &VmDisk {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .expect("test disk")
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// sha256 of an image's guest-visible content (any format, any backing chain).
pub fn content_sha256(image: &Path) -> Result<String> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"t=$(mktemp); trap 'rm -f "$t"' EXIT; qemu-img convert -U -O raw "$1" "$t" && sha256sum "$t" | cut -d' ' -f1"#)
        .arg("sha")
        .arg(image)
        .output()?;
    if !out.status.success() {
        bail!(
            "hashing {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
