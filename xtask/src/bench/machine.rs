//! Facts about the machine a benchmark ran on.

use std::path::Path;
use std::process::Command;

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not installed".into())
}

/// The facts, as Markdown list lines.
pub fn facts(work_dir: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let df = Command::new("df")
        .args(["-h", "--output=source,fstype,size,avail"])
        .arg(work_dir)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let dev = df.split_whitespace().next().unwrap_or_default();
    let rotational = Path::new(dev)
        .file_name()
        .and_then(|d| {
            std::fs::read_to_string(format!(
                "/sys/block/{}/queue/rotational",
                d.to_string_lossy()
            ))
            .ok()
        })
        .map(|r| {
            if r.trim() == "0" {
                "SSD/virtual"
            } else {
                "rotational"
            }
        })
        .unwrap_or("unknown");
    let kvm = Path::new("/dev/kvm").exists();
    let libvirt = first_line("libvirtd", &["--version"]);
    format!(
        "- CPU: {cpu}, {cores} cores visible (SHA-NI: {}), KVM: {}\n\
         - Memory: {:.1} GiB\n\
         - Work dir: `{}` on {df} ({rotational})\n\
         - Kernel: {}\n\
         - QEMU: {}\n\
         - qemu-img: {}\n\
         - libnbd (nbdcopy): {}\n\
         - libvirt: {libvirt}\n\
         - virtnbdbackup: {}\n\
         - restic: {}\n",
        if flags.contains("sha_ni") {
            "yes"
        } else {
            "no"
        },
        if kvm { "yes" } else { "no (TCG)" },
        mem_kib as f64 / (1024.0 * 1024.0),
        work_dir.display(),
        first_line("uname", &["-srvm"]),
        first_line("qemu-system-x86_64", &["--version"]),
        first_line("qemu-img", &["--version"]),
        first_line("nbdcopy", &["--version"]),
        first_line("virtnbdbackup", &["--version"]),
        first_line("restic", &["version"]),
    )
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}
