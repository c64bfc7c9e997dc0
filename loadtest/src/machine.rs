//! The machine a run happened on, for the report: CPUs, model, kernel, memory, peer versions.

use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub os: String,
    pub memory_gib: f64,
    pub virtualization: String,
    /// Load averages when the run started (they lag: work that just ended still shows).
    pub loadavg_at_start: String,
    /// Share of all CPUs busy (not idle, not waiting for I/O) over two seconds before the run
    /// started, when the harness itself runs nothing: other work on a shared machine.
    #[serde(default)]
    pub cpu_busy_at_start: Option<f64>,
    /// A DAMON monitor (`kdamond` threads) samples page access bits behind every process's
    /// back: expect noise in memory-bound figures such as the decision benchmark. `None`:
    /// not recorded (older results).
    #[serde(default)]
    pub memory_monitor: Option<String>,
    pub haproxy: String,
    pub nginx: String,
    pub dnsperf: String,
    pub rustc: String,
    pub commit: String,
}

/// The busy share of all CPUs over `window`, from the `cpu` line of /proc/stat.
fn cpu_busy(window: std::time::Duration) -> Option<f64> {
    // (busy, total) jiffies over the first eight fields (guest time is already in user); idle
    // and iowait are not busy.
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        Some((total - idle, total))
    };
    let (busy0, total0) = sample()?;
    std::thread::sleep(window);
    let (busy1, total1) = sample()?;
    let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
    Some(busy1.saturating_sub(busy0) as f64 / total as f64)
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Whether the kernel runs DAMON monitors, and how many.
fn damon_threads() -> Option<String> {
    let count = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("kdamond"))
        })
        .count();
    Some(match count {
        0 => "none".to_owned(),
        n => format!(
            "DAMON ({n} kdamond thread(s)): samples page access bits, adds noise to \
             memory-bound figures"
        ),
    })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let field = |key: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned();
        let virtualization = if field("flags").split_whitespace().any(|f| f == "hypervisor") {
            first_line("systemd-detect-virt", &[])
                .replace("none", "")
                .trim()
                .to_owned()
                + " (virtual machine)"
        } else {
            "bare metal".to_owned()
        };
        let manifest = env!("CARGO_MANIFEST_DIR");
        let commit = first_line("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]);
        let dirty = !first_line("git", &["-C", manifest, "status", "--porcelain"]).is_empty();
        Machine {
            nproc: crate::cpus(),
            cpu_model: field("model name"),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            virtualization,
            cpu_busy_at_start: cpu_busy(std::time::Duration::from_secs(2)),
            loadavg_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            memory_monitor: damon_threads(),
            haproxy: first_line("haproxy", &["-v"]),
            nginx: first_line("nginx", &["-v"]),
            dnsperf: {
                let v = first_line("dpkg-query", &["-W", "-f=${Version}", "dnsperf"]);
                if v.is_empty() {
                    v
                } else {
                    format!("dnsperf {v}")
                }
            },
            rustc: first_line("rustc", &["--version"]),
            commit: if dirty && !commit.is_empty() {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
        }
    }
}
