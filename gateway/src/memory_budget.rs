//! Whether the configured caps fit in the memory the gateway may use.
//!
//! The name table and the open connections grow with load, up to `dns.maxNames` and
//! `connections.max`. If both caps together need more than the cgroup's memory limit, the
//! kernel kills the gateway at the peak, long after the rollout looked healthy: `run` and
//! `check` say so at once instead.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::config::Config;

/// One name-table record with a name of up to 38 bytes (the decision benchmark's table of 1M
/// names, `docs/benchmarks.md`).
const NAME_RECORD_BYTES: u64 = 370;

/// One idle spliced connection: up to about 11 KiB of RSS (5 KiB when connections open slowly,
/// 11 KiB after a burst: the allocator keeps what the peeks used) and 9 KiB of kernel socket
/// memory, which is charged to the cgroup too (the `memory` and `soak` benchmarks). A busy one
/// holds socket buffers on top.
const CONNECTION_BYTES: u64 = 20 << 10;

/// An idle gateway: runtime, policies, metrics, buffers.
const BASE_BYTES: u64 = 16 << 20;

/// A cgroup v1 limit at or above this means "no limit" (the kernel reports ~2^63).
const V1_UNLIMITED: u64 = 1 << 62;

/// The memory the gateway needs with both caps reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub names: u64,
    pub connections: u64,
}

impl Budget {
    pub fn of(config: &Config) -> Budget {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Budget {
            names: count(config.dns.max_names).saturating_mul(NAME_RECORD_BYTES),
            connections: count(config.connections.max).saturating_mul(CONNECTION_BYTES),
        }
    }

    fn total(&self) -> u64 {
        BASE_BYTES
            .saturating_add(self.names)
            .saturating_add(self.connections)
    }

    /// A warning when the budget exceeds `limit`, `None` when it fits.
    pub fn exceeds(&self, limit: u64) -> Option<String> {
        (self.total() > limit).then(|| {
            format!(
                "with dns.maxNames and connections.max both reached the gateway needs about {} \
                 ({} for names, {} for connections), more than its memory limit of {}: \
                 lower the caps or raise the limit (chart: resources.limits.memory)",
                Mib(self.total()),
                Mib(self.names),
                Mib(self.connections),
                Mib(limit)
            )
        })
    }
}

struct Mib(u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0.div_ceil(1 << 20))
    }
}

/// The memory limit of this process's cgroup, `None` when there is none or it cannot be read.
pub fn cgroup_limit() -> Option<u64> {
    limit_under(Path::new("/"))
}

/// Reads `proc/self/cgroup` and the limit file under `root`. cgroup v2: `memory.max` of the
/// unified hierarchy's path (`max`: none). v1: the memory controller's `memory.limit_in_bytes`.
/// Inside a container the path may name the cgroup as the host sees it while the container
/// mounts its own cgroup at the top, so the top is read when the path is not there.
fn limit_under(root: &Path) -> Option<u64> {
    let cgroups = fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let mut v2 = None;
    let mut v1 = None;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    let read = |dir: &Path, file: &str| -> Option<String> {
        fs::read_to_string(dir.join(file))
            .ok()
            .map(|text| text.trim().to_owned())
    };
    let first_found = |mount: &Path, path: &str, file: &str| {
        read(&mount.join(path), file).or_else(|| read(mount, file))
    };
    if let Some(path) = v1 {
        let mount = root.join("sys/fs/cgroup/memory");
        let limit: u64 = first_found(&mount, path, "memory.limit_in_bytes")?
            .parse()
            .ok()?;
        return (limit < V1_UNLIMITED).then_some(limit);
    }
    let mount = root.join("sys/fs/cgroup");
    first_found(&mount, v2?, "memory.max")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, file: &str, text: &str) {
        let path = root.join(file);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    #[test]
    fn reads_the_limit_of_cgroup_v2_and_v1() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
        write(
            root,
            "sys/fs/cgroup/kubepods/pod1/ctr/memory.max",
            "536870912\n",
        );
        assert_eq!(limit_under(root), Some(512 << 20));
        write(root, "sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n");
        assert_eq!(limit_under(root), None, "no limit");

        // A container with its own cgroup namespace sees itself at the top.
        write(root, "proc/self/cgroup", "0::/\n");
        write(root, "sys/fs/cgroup/memory.max", "268435456\n");
        assert_eq!(limit_under(root), Some(256 << 20));

        // v1 (hybrid: the unified line is there too, without a memory controller).
        write(
            root,
            "proc/self/cgroup",
            "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n",
        );
        write(
            root,
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "1073741824\n",
        );
        assert_eq!(limit_under(root), Some(1 << 30));
        write(
            root,
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(limit_under(root), None, "v1's no limit");
    }

    #[test]
    fn a_v1_path_that_is_not_mounted_falls_back_to_the_mount_top() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        write(root, "proc/self/cgroup", "4:memory:/docker/abc\n");
        write(
            root,
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "67108864\n",
        );
        assert_eq!(limit_under(root), Some(64 << 20));
    }

    #[test]
    fn nothing_readable_means_no_known_limit() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(limit_under(root.path()), None);
        write(root.path(), "proc/self/cgroup", "garbage\n0::/a\n");
        assert_eq!(limit_under(root.path()), None);
    }

    #[test]
    fn the_budget_adds_names_and_connections_to_the_base() {
        let budget = Budget {
            names: 1_000_000 * NAME_RECORD_BYTES,
            connections: 65_536 * CONNECTION_BYTES,
        };
        assert_eq!(budget.total(), (16 << 20) + 370_000_000 + (1280 << 20));
        assert_eq!(budget.exceeds(2 << 30), None, "the chart's default limit");
        let warning = budget.exceeds(512 << 20).expect("over");
        assert!(
            warning.contains("about 1649 MiB (353 MiB for names, 1280 MiB for connections)"),
            "{warning}"
        );
        assert!(warning.contains("memory limit of 512 MiB"), "{warning}");
    }
}
