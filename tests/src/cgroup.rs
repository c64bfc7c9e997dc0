//! A memory cgroup of its own for a process under test (cgroup v2, or v1's memory controller),
//! removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{LabError, Result};

/// Cgroups made by this process so far: names stay unique when tests run in parallel.
static MADE: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// A new cgroup whose memory limit is `bytes`.
    pub fn with_limit(bytes: u64) -> Result<MemoryCgroup> {
        let name = format!(
            "egressgate-test-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        );
        let (dir, limit_file) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (Path::new("/sys/fs/cgroup").join(name), "memory.max")
        } else {
            (
                Path::new("/sys/fs/cgroup/memory").join(name),
                "memory.limit_in_bytes",
            )
        };
        std::fs::create_dir(&dir)
            .map_err(|e| LabError::new(format!("mkdir {}: {e}", dir.display())))?;
        let cgroup = MemoryCgroup { dir };
        std::fs::write(cgroup.dir.join(limit_file), bytes.to_string())
            .map_err(|e| LabError::new(format!("{limit_file}: {e}")))?;
        Ok(cgroup)
    }

    /// The cgroup's name, as `/proc/PID/cgroup` ends its path.
    pub fn name(&self) -> &str {
        self.dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
    }

    /// Arguments that run the command appended after them inside this cgroup.
    pub fn enter(&self) -> Vec<String> {
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"".to_owned(),
            self.dir.display().to_string(),
        ]
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Whatever ran in it has exited: an empty cgroup can be removed.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("egressgate-lab: cannot remove {}: {e}", self.dir.display());
        }
    }
}
