//! The restart scenario's own lab: four pods, every one intercepted (`egp*`), the harness's
//! upstream server, and the gateway processes that come and go. The bench environment
//! ([`crate::env::Env`]) intercepts pod b only and owns its one gateway, so this scenario builds
//! its own.

use std::path::PathBuf;
use std::time::Duration;

use egressgate_lab::daemon::Daemon;
use egressgate_lab::{addr, Gateway, GatewayOptions, Lab};

use crate::env::{self, Certs, Placement};
use crate::server::TLS_PORT;
use crate::{progress, Error};

use super::load::now_ms;

/// How long a stopped gateway gets to exit before the scenario gives up on it.
pub const EXIT_WAIT: Duration = Duration::from_secs(45);

/// Which executable a gateway process runs: the build, or a copy of it standing for the other
/// version of a rolling upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Original,
    Copy,
}

impl Binary {
    pub fn name(self) -> &'static str {
        match self {
            Binary::Original => "original",
            Binary::Copy => "copy",
        }
    }

    pub fn other(self) -> Binary {
        match self {
            Binary::Original => Binary::Copy,
            Binary::Copy => Binary::Original,
        }
    }
}

/// One `egressgate run` of the scenario.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub binary: Binary,
    pub gateway: Gateway,
    /// When the harness saw its `listening` line (ms since epoch).
    pub ready_ms: u64,
    /// When the harness saw it exit.
    pub exited_ms: Option<u64>,
}

impl Process {
    /// Polls for its exit; records when it was first seen.
    pub fn poll_exit(&mut self) -> bool {
        if self.exited_ms.is_some() {
            return true;
        }
        if self.gateway.daemon_mut().exited().is_some() {
            self.exited_ms = Some(now_ms());
            return true;
        }
        false
    }
}

/// Field order is drop order: gateways and the server before the lab.
#[derive(Debug)]
pub struct RestartLab {
    pub processes: Vec<Process>,
    server: Daemon,
    pub lab: Lab,
    pub exe: PathBuf,
    pub certs: Certs,
    original: PathBuf,
    copy: PathBuf,
}

/// Every pod may reach `*.example.test` over TLS on the upstream's TLS port, and nothing else:
/// a connection is allowed only if its pod resolved the name it asks for.
fn policy() -> String {
    format!(
        "apiVersion: egressgate.dev/v1alpha1\n\
         kind: EgressPolicy\n\
         metadata: {{name: restart, namespace: shop}}\n\
         spec:\n  podSelector: {{}}\n  egress:\n    \
         - to: [{{dnsName: \"*.example.test\"}}]\n      ports:\n        \
         - {{port: {TLS_PORT}, protocol: tls}}\n"
    )
}

impl RestartLab {
    pub fn start() -> Result<RestartLab, Error> {
        let exe = std::env::current_exe()?;
        let options = GatewayOptions::default().policy("restart.yaml", &policy());
        progress("restart: starting its lab (4 intercepted pods, node, upstream)");
        let (mut lab, server, certs) = env::served_lab(4, options, Placement::detect().load_cpu)?;
        let first = lab
            .take_gateway()
            .ok_or_else(|| Error::msg("the lab started no gateway"))?;
        let original = first.bin().to_path_buf();
        let copy = lab.dir().join("egressgate-copy");
        std::fs::copy(&original, &copy)?;
        let now = now_ms();
        Ok(RestartLab {
            processes: vec![Process {
                name: "egressgate".to_owned(),
                binary: Binary::Original,
                gateway: first,
                ready_ms: now,
                exited_ms: None,
            }],
            server,
            lab,
            exe,
            certs,
            original,
            copy,
        })
    }

    pub fn current(&mut self) -> Result<&mut Process, Error> {
        self.processes
            .last_mut()
            .ok_or_else(|| Error::msg("no gateway process"))
    }

    /// Starts another `egressgate run` with the lab's config and state directory and waits for
    /// its `listening` line: with a gateway running it takes over, otherwise it restarts from
    /// the state.
    pub fn start_process(&mut self, binary: Binary) -> Result<usize, Error> {
        let index = self.processes.len();
        let name = format!("egressgate-{index}");
        let bin = match binary {
            Binary::Original => self.original.clone(),
            Binary::Copy => self.copy.clone(),
        };
        let gateway = Gateway::start_named(
            self.lab.node(),
            bin,
            self.lab.gateway_config_path(),
            &[],
            self.lab.dir(),
            &name,
        )?;
        let ready_ms = now_ms();
        self.processes.push(Process {
            name,
            binary,
            gateway,
            ready_ms,
            exited_ms: None,
        });
        Ok(index)
    }

    /// Polls every process for its exit.
    pub fn poll_exits(&mut self) {
        for process in &mut self.processes {
            process.poll_exit();
        }
    }

    /// The IPv4 address of pod `letter`.
    pub fn pod_ip(&self, letter: &str) -> String {
        self.lab.pod(letter).ipv4.clone()
    }

    pub fn dns_server(&self) -> String {
        format!("{}:53", addr::TRUSTED_DNS)
    }

    /// The upstream server's output, for diagnostics.
    pub fn server_tail(&self) -> String {
        self.server.output_tail(20)
    }
}
