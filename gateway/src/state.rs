//! What survives a restart, from the gateway's side: restoring the name table from the state
//! directory, keeping the journal (touches, syncs, snapshots), dropping the records of pods that
//! are gone, and the old process's part of a hand-over.
//!
//! The files themselves are `egressgate_dns_shim::persist`; the exchange with a successor is
//! [`crate::handover`].

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use egressgate_dns_shim::persist::{self, Applied, Journal, PersistMetrics, Scope};
use egressgate_dns_shim::{NameTable, PodIp};
use egressgate_log::{rfc3339_now, write_json_line};
use prometheus::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::handover::{HandedSocket, HandoverError, Role, Successor};
use crate::limits::Limits;
use crate::store::Store;

/// Uses of records are saved this often (a crash loses at most this much of them).
const TOUCH_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// The journal reaches the disk this often (for a node that loses power).
const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// The `restore` line, and the pods whose records came back.
#[derive(Debug, Default)]
pub struct Restored {
    pub pods: Vec<PodIp>,
}

/// The `state` line written at start.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RestoreLine<'a> {
    time: String,
    event: &'static str,
    dir: &'a Path,
    files_read: usize,
    names: usize,
    touches: usize,
    expired: usize,
    corrupt_records: usize,
    skipped_files: Vec<String>,
    duration_ms: f64,
}

/// The `handover` line, in both processes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoverLine {
    pub time: String,
    pub event: &'static str,
    /// `successor` (took over) or `predecessor` (handed over).
    pub role: &'static str,
    pub duration_ms: f64,
    /// Entries in the table when the successor started serving, or sent by the predecessor.
    pub names: usize,
    pub records_during_handover: usize,
    pub predecessor_open_connections: usize,
}

/// The records this node's pods made, as the state directory keeps them.
pub fn scope(config: &Config) -> Scope {
    let node = config
        .identity
        .kubernetes
        .as_ref()
        .and_then(|k| k.node_name())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_default();
    let cidrs: Vec<String> = config
        .intercept
        .pod_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    Scope::new(&node, &cidrs)
}

/// Reads the state directory into `table` and logs what it found. Never fails: a missing
/// directory is a first start, a bad file is skipped.
pub fn restore(config: &Config, table: &NameTable, metrics: &PersistMetrics) -> Restored {
    let started = Instant::now();
    let dir = &config.state.dir;
    if !dir.exists() {
        return Restored::default();
    }
    let report = persist::restore(dir, &scope(config), table, metrics);
    for skipped in &report.skipped_files {
        tracing::warn!(file = %skipped.path.display(), reason = skipped.reason,
            detail = %skipped.detail, "state file skipped");
    }
    write_json_line(&RestoreLine {
        time: rfc3339_now(),
        event: "restore",
        dir,
        files_read: report.files_read,
        names: report.applied.names,
        touches: report.applied.touches,
        expired: report.applied.expired,
        corrupt_records: report.applied.corrupt,
        skipped_files: report
            .skipped_files
            .iter()
            .map(|s| format!("{}: {} ({})", s.path.display(), s.reason, s.detail))
            .collect(),
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
    });
    Restored { pods: report.pods }
}

/// Applies records a predecessor sent.
pub fn apply_handover(table: &NameTable, frames: &[u8], metrics: &PersistMetrics) -> Applied {
    let applied = persist::apply(frames, table, Instant::now(), SystemTime::now());
    metrics.restored("handover", applied.names);
    metrics.skipped("corrupt", applied.corrupt);
    applied
}

/// Starts this process's journal, above every generation in the directory. Without a usable
/// directory the table still works, in memory only (warned).
pub fn journal(
    config: &Config,
    registry: &Registry,
    metrics: &PersistMetrics,
) -> Option<Arc<Journal>> {
    let dir = &config.state.dir;
    let created = persist::next_generation(dir).and_then(|generation| {
        Journal::create(dir, scope(config), generation, metrics.clone(), registry)
    });
    match created {
        Ok(journal) => Some(Arc::new(journal)),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e,
                "cannot keep the name table on disk: a restart will forget what pods resolved");
            None
        }
    }
}

/// Saves uses of records, syncs the journal and compacts it, until `shutdown`.
pub async fn keep(
    journal: Arc<Journal>,
    table: Arc<NameTable>,
    snapshot_interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut touches = tokio::time::interval(TOUCH_SAVE_INTERVAL);
    let mut sync = tokio::time::interval(SYNC_INTERVAL);
    // The first tick is immediate: the first snapshot folds what was restored.
    let mut snapshot = tokio::time::interval(snapshot_interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = touches.tick() => journal.save_touches(&table),
            _ = sync.tick() => {
                let journal = Arc::clone(&journal);
                let _ = tokio::task::spawn_blocking(move || journal.sync()).await;
            }
            _ = snapshot.tick() => {
                let (journal, table) = (Arc::clone(&journal), Arc::clone(&table));
                let _ = tokio::task::spawn_blocking(move || journal.compact(&table)).await;
            }
        }
    }
    journal.save_touches(&table);
}

/// Once identities are known, drops the restored records of pods that no longer exist (their
/// addresses may go to new pods, which must not inherit their names).
pub async fn forget_gone_pods(
    store: Arc<Store>,
    table: Arc<NameTable>,
    restored_pods: Vec<PodIp>,
    metrics: PersistMetrics,
) {
    if restored_pods.is_empty() {
        return;
    }
    store.identities_ready().await;
    let identities = store.current().identities;
    let forgotten: usize = restored_pods
        .iter()
        .filter(|pod| identities.lookup(pod.0).is_none())
        .map(|pod| table.forget_pod(*pod))
        .sum();
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            "dropped restored names of pods that no longer exist"
        );
    }
    metrics.skipped("pod_gone", forgotten);
}

/// Duplicates of the listening sockets, kept to hand them over.
#[derive(Debug, Default)]
pub struct Inventory {
    sockets: Vec<(Role, SocketAddr, OwnedFd)>,
}

impl Inventory {
    pub fn add(&mut self, role: Role, addr: SocketAddr, fd: BorrowedFd<'_>) {
        match fd.try_clone_to_owned() {
            Ok(fd) => self.sockets.push((role, addr, fd)),
            Err(e) => tracing::warn!(%addr, error = %e, "cannot keep a socket to hand over"),
        }
    }

    fn borrowed(&self) -> Vec<(Role, SocketAddr, BorrowedFd<'_>)> {
        self.sockets
            .iter()
            .map(|(role, addr, fd)| (*role, *addr, fd.as_fd()))
            .collect()
    }
}

/// Sockets a predecessor handed over, waiting to be matched to listen addresses.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<HandedSocket>,
}

impl Inherited {
    pub fn new(sockets: Vec<HandedSocket>) -> Self {
        Inherited { sockets }
    }

    /// Every socket the predecessor listened with for `role` on `addr` (one per worker), in the
    /// order it sent them.
    pub fn take_all(&mut self, role: Role, addr: SocketAddr) -> Vec<OwnedFd> {
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|s| s.role == role && s.addr == addr);
        self.sockets = kept;
        taken.into_iter().map(|s: HandedSocket| s.fd).collect()
    }
}

/// The old process's part: sockets, dump, wait for Stop, stop serving (answering the queries
/// already read), then the records made meanwhile. On an error before Stop it keeps serving.
#[allow(clippy::too_many_arguments)] // the run loop's parts, each used once
pub async fn hand_over(
    mut successor: Successor,
    inventory: &Inventory,
    journal: Option<&Journal>,
    table: &NameTable,
    limits: &Limits,
    stop_serving: &watch::Sender<bool>,
    serving: &mut JoinSet<()>,
) -> Result<(), HandoverError> {
    let started = Instant::now();
    tracing::info!("a new gateway is taking over");
    if let Some(journal) = journal {
        // No snapshot from here on: the successor starts the next generation.
        journal.retire(true);
        journal.start_capture();
    }
    let prepared = async {
        successor.send_sockets(&inventory.borrowed()).await?;
        successor.send_dump(&persist::encode_table(table)).await?;
        successor.wait_for_stop().await
    }
    .await;
    if let Err(e) = prepared {
        if let Some(journal) = journal {
            journal.retire(false);
            journal.stop_capture();
        }
        return Err(e);
    }
    let _ = stop_serving.send(true);
    while serving.join_next().await.is_some() {}
    let records = journal.map(Journal::take_capture).unwrap_or_default();
    let applied_count = persist::count_names(&records);
    let open = limits.open_connections();
    successor.stopped(&records, open).await?;
    write_json_line(&HandoverLine {
        time: rfc3339_now(),
        event: "handover",
        role: "predecessor",
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        names: table.len(),
        records_during_handover: applied_count,
        predecessor_open_connections: open,
    });
    Ok(())
}
