//! A long-running process inside a namespace (dnsmasq, nginx, postgres, the gateway).
//!
//! Each daemon gets its own process group, so stopping it reaches the processes it forked
//! (postgres backends, runuser's child) too. Output goes to files in the lab's directory.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::netns::{host, tail};

/// How long a daemon gets to exit after its stop signal before the group is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    stop_signal: &'static str,
    stdout: PathBuf,
    stderr: PathBuf,
    stopped: bool,
}

impl Daemon {
    /// Starts `args` in namespace `ns` (`ip netns exec`), logging to `<log_dir>/<name>.{stdout,stderr}`.
    pub fn spawn(
        ns: &str,
        name: &str,
        args: &[&str],
        log_dir: &Path,
        stop_signal: &'static str,
    ) -> Result<Self> {
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .process_group(0)
            .spawn()
            .map_err(|err| LabError::new(format!("spawn {name} ({}): {err}", args.join(" "))))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stop_signal,
            stdout,
            stderr,
            stopped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Both outputs' last lines, for error messages.
    pub fn output_tail(&self, lines: usize) -> String {
        format!(
            "--- {} stdout ({}) ---\n{}\n--- {} stderr ({}) ---\n{}",
            self.name,
            self.stdout.display(),
            tail(&self.stdout_text(), lines),
            self.name,
            self.stderr.display(),
            tail(&self.stderr_text(), lines)
        )
    }

    /// Sends `signal` (a `kill -s` name) to the process alone.
    pub fn signal(&self, signal: &str) -> Result<()> {
        host(&["kill", "-s", signal, &self.child.id().to_string()])?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the stop signal to the process group, waits up to [`STOP_GRACE`], then SIGKILLs
    /// the group. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let group = format!("-{}", self.child.id());
        if self.exited().is_none() {
            let _ = host(&["kill", "-s", self.stop_signal, "--", &group]);
            let deadline = Instant::now() + STOP_GRACE;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Children that outlived the leader (or a leader that ignored the signal).
        let _ = host(&["kill", "-s", "KILL", "--", &group]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `ready` every 100 ms until it returns `Ok(true)` or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last = err.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(LabError::new(format!(
                "{what}: not ready after {timeout:?} {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
