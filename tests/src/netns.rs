//! One network namespace: created with `ip netns add`, deleted on drop (after killing whatever
//! still runs in it), and the only place client commands run.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{LabError, Result};

/// Default bound on one client command (`timeout` inside the namespace).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a finished command printed. `status` is `None` if it was killed by a signal;
/// `timeout` exits 124 when the bound is hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub command: String,
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "exit: {:?}", self.status)?;
        writeln!(f, "stdout: {}", tail(&self.stdout, 20))?;
        write!(f, "stderr: {}", tail(&self.stderr, 20))
    }
}

/// A network namespace owned by the lab.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// `/etc/netns/<name>`, bind-mounted over /etc by `ip netns exec` (resolv.conf).
    etc_dir: Option<PathBuf>,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        host(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
            etc_dir: None,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes `/etc/netns/<name>/resolv.conf`, which `ip netns exec` shows as /etc/resolv.conf.
    pub fn set_resolv_conf(&mut self, text: &str) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        self.etc_dir = Some(dir.clone());
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(())
    }

    /// Runs `ip -n <ns> ARGS` and fails on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        host(&full)
    }

    /// Runs a setup command inside the namespace and fails on a non-zero exit.
    pub fn exec_ok(&self, args: &[&str]) -> Result<Output> {
        let out = self.run_with(args, None, CLIENT_TIMEOUT)?;
        if out.success() {
            Ok(out)
        } else {
            Err(LabError::new(format!("in netns {}: {out}", self.name)))
        }
    }

    /// Runs a client command inside the namespace, bounded by [`CLIENT_TIMEOUT`].
    /// Panics only if the command could not be started at all (the lab is broken).
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None, CLIENT_TIMEOUT)
            .unwrap_or_else(|err| panic!("cannot run {args:?} in {}: {err}", self.name))
    }

    /// Like [`Netns::run`], feeding `stdin` to the command.
    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> Output {
        self.run_with(args, Some(stdin.as_bytes()), CLIENT_TIMEOUT)
            .unwrap_or_else(|err| panic!("cannot run {args:?} in {}: {err}", self.name))
    }

    /// Runs `args` inside the namespace under `timeout -k 2 <limit>`.
    pub fn run_with(&self, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Result<Output> {
        run_in(&self.name, args, stdin, limit)
    }

    /// PIDs of processes still running in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Anything still inside (a daemon whose stop failed) would keep the namespace alive.
        for pid in self.pids() {
            let _ = host(&["kill", "-s", "KILL", &pid.to_string()]);
        }
        if let Err(err) = host(&["ip", "netns", "del", &self.name]) {
            eprintln!("egressgate-lab: {err}");
        }
        if let Some(dir) = self.etc_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// PIDs of processes in namespace `name` (`ip netns pids`).
pub(crate) fn pids_in(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a host-side setup command (ip, kill, chown, openssl) and fails on a non-zero exit.
pub(crate) fn host(args: &[&str]) -> Result<()> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| LabError::new("empty command"))?;
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| LabError::new(format!("{}: {err}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::new(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The last `lines` lines of `text`, for error messages and panic dumps.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} lines ...]\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

/// Runs `args` inside namespace `ns` under `timeout -k 2 <limit>` (for helpers that keep the
/// name, not the [`Netns`]).
pub fn run_in(ns: &str, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Result<Output> {
    let limit = format!("{}", limit.as_secs().max(1));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "timeout", "-k", "2", &limit])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|err| LabError::new(format!("spawn ip netns exec: {err}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs only: the pipe buffer holds them, so this cannot block on our reads.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output()?;
    Ok(Output {
        command: format!("[{}] {}", ns, args.join(" ")),
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
