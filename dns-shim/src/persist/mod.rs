//! The name table on disk, so a restart forgets nothing a pod resolved.
//!
//! Every answer the shim records is appended to a journal *before* the reply leaves: one
//! `write(2)` into the page cache, which survives a crash of the process (not of the node: the
//! journal is synced every few seconds and at each snapshot). Now and then the table is
//! compacted into a snapshot (written whole, fsynced, renamed over the last one) and older
//! journals are deleted. At start the snapshot and every newer journal are read back into the
//! table, each record judged against the wall clock.
//!
//! Files in the state directory:
//! - `names.snapshot`: header (generation G), then one frame per live entry;
//! - `names.journal.<N>`: header (generation N), then frames as they were made. A restore reads
//!   the snapshot, then the journals with N ≥ G in order, so a crash at any point of a
//!   compaction loses nothing.
//!
//! Layout: `codec` (the bytes), `journal` (writing), this module (scope, metrics, restoring).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use prometheus::{IntCounterVec, Opts, Registry};

use crate::table::{NameTable, PodIp, Restored};
use codec::{FileKind, Frames, Header, Record};

pub mod codec;
mod journal;

pub use journal::{Journal, Unsaved};

const SNAPSHOT: &str = "names.snapshot";
const JOURNAL_PREFIX: &str = "names.journal.";

/// Which node and pod address ranges records belong to: a state directory copied from another
/// node, or kept across a change of pod CIDRs, must not grant this node's pods anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(String);

impl Scope {
    pub fn new(node: &str, pod_cidrs: &[String]) -> Self {
        let mut cidrs = pod_cidrs.to_vec();
        cidrs.sort_unstable();
        Scope(format!("node={node};podCidrs={}", cidrs.join(",")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `egressgate_state_*` counters shared by restoring and the journal.
#[derive(Debug, Clone)]
pub struct PersistMetrics {
    restored: IntCounterVec,
    skipped: IntCounterVec,
    pub(crate) write_errors: prometheus::IntCounter,
}

impl PersistMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let restored = IntCounterVec::new(
            Opts::new(
                "egressgate_state_restored_records_total",
                "Name records put back into the table at start, by source (files: the state directory; handover: a predecessor)",
            ),
            &["source"],
        )?;
        let skipped = IntCounterVec::new(
            Opts::new(
                "egressgate_state_skipped_records_total",
                "Saved name records not restored, by reason (expired, corrupt, version, foreign, unreadable, pod_gone)",
            ),
            &["reason"],
        )?;
        let write_errors = prometheus::IntCounter::new(
            "egressgate_state_write_errors_total",
            "Failed writes of the name journal or snapshot (the table keeps working in memory)",
        )?;
        // Every known series from the start, so a dashboard or alert sees 0 rather than nothing.
        for source in ["files", "handover"] {
            restored.with_label_values(&[source]);
        }
        for reason in [
            "expired",
            "corrupt",
            "version",
            "foreign",
            "unreadable",
            "pod_gone",
        ] {
            skipped.with_label_values(&[reason]);
        }
        registry.register(Box::new(restored.clone()))?;
        registry.register(Box::new(skipped.clone()))?;
        registry.register(Box::new(write_errors.clone()))?;
        Ok(PersistMetrics {
            restored,
            skipped,
            write_errors,
        })
    }

    pub fn restored(&self, source: &str, count: usize) {
        self.restored
            .with_label_values(&[source])
            .inc_by(count as u64);
    }

    pub fn skipped(&self, reason: &str, count: usize) {
        if count > 0 {
            self.skipped
                .with_label_values(&[reason])
                .inc_by(count as u64);
        }
    }
}

/// What reading records back did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub names: usize,
    pub touches: usize,
    pub expired: usize,
    /// Stretches of bytes that were not a valid record (torn or corrupt), skipped.
    pub corrupt: usize,
}

impl Applied {
    fn add(&mut self, other: &Applied) {
        self.names += other.names;
        self.touches += other.touches;
        self.expired += other.expired;
        self.corrupt += other.corrupt;
    }
}

/// A state file that was not read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    /// `version`, `foreign`, `corrupt` or `unreadable` (the metric's reason).
    pub reason: &'static str,
    pub detail: String,
}

/// What [`restore`] found.
#[derive(Debug, Default)]
pub struct RestoreReport {
    pub applied: Applied,
    pub files_read: usize,
    pub skipped_files: Vec<SkippedFile>,
    /// The generation a new journal must take: above every file present.
    pub next_generation: u64,
    /// Pods that got records back (to drop those that no longer exist once identities are known).
    pub pods: Vec<PodIp>,
}

/// Puts every record of the files in `dir` back into `table`: the snapshot, then the journals
/// it does not cover, in order. Nothing here is fatal: a file that cannot be used is reported
/// and skipped, a corrupt record is skipped.
pub fn restore(
    dir: &Path,
    scope: &Scope,
    table: &NameTable,
    metrics: &PersistMetrics,
) -> RestoreReport {
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let mut report = RestoreReport::default();
    let journals = journals(dir).unwrap_or_default();
    report.next_generation = journals.last().map_or(1, |(generation, _)| generation + 1);

    let mut covered_from = 0;
    let snapshot = dir.join(SNAPSHOT);
    if snapshot.exists() {
        let read = read_file(
            &snapshot,
            FileKind::Snapshot,
            scope,
            table,
            &mut report,
            now,
            wall_now,
        );
        if let Some(generation) = read {
            covered_from = generation;
            report.next_generation = report.next_generation.max(generation + 1);
        }
    }
    for (generation, path) in journals {
        if generation >= covered_from {
            read_file(
                &path,
                FileKind::Journal,
                scope,
                table,
                &mut report,
                now,
                wall_now,
            );
        }
    }
    metrics.restored("files", report.applied.names);
    metrics.skipped("expired", report.applied.expired);
    metrics.skipped("corrupt", report.applied.corrupt);
    for file in &report.skipped_files {
        metrics.skipped(file.reason, 1);
    }
    report.pods = table.pods();
    report
}

/// Reads one file into the table; returns its generation when its header was usable.
fn read_file(
    path: &Path,
    kind: FileKind,
    scope: &Scope,
    table: &NameTable,
    report: &mut RestoreReport,
    now: Instant,
    wall_now: SystemTime,
) -> Option<u64> {
    let skip = |report: &mut RestoreReport, reason, detail: String| {
        report.skipped_files.push(SkippedFile {
            path: path.to_owned(),
            reason,
            detail,
        });
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            skip(report, "unreadable", e.to_string());
            return None;
        }
    };
    let (header, len) = match Header::decode(&bytes) {
        Ok(decoded) => decoded,
        Err(e @ codec::HeaderError::Version(_)) => {
            skip(report, "version", e.to_string());
            return None;
        }
        Err(e) => {
            skip(report, "corrupt", e.to_string());
            return None;
        }
    };
    if header.kind != kind {
        skip(
            report,
            "corrupt",
            format!("a {:?} file named as a {kind:?}", header.kind),
        );
        return None;
    }
    if header.scope != scope.as_str() {
        skip(
            report,
            "foreign",
            format!(
                "written for {:?}, this gateway is {:?}",
                header.scope,
                scope.as_str()
            ),
        );
        return None;
    }
    let applied = apply(bytes.get(len..).unwrap_or_default(), table, now, wall_now);
    report.applied.add(&applied);
    report.files_read += 1;
    Some(header.generation)
}

/// Applies a stream of frames (a file's body, or what a hand-over sent) to `table`.
pub fn apply(bytes: &[u8], table: &NameTable, now: Instant, wall_now: SystemTime) -> Applied {
    let mut applied = Applied::default();
    let mut frames = Frames::new(bytes);
    for record in frames.by_ref() {
        match record {
            Record::Name(name) => match table.restore(&name, now, wall_now) {
                Restored::Kept => applied.names += 1,
                // Counted with the expired: dropped either way.
                Restored::Expired | Restored::NotADnsName => applied.expired += 1,
            },
            Record::Touch(touch) => {
                table.restore_touch(&touch, now, wall_now);
                applied.touches += 1;
            }
        }
    }
    applied.corrupt = frames.corrupt;
    applied
}

/// Every live entry of `table` as frames: a snapshot's body, or a hand-over's dump.
pub fn encode_table(table: &NameTable) -> Vec<u8> {
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let mut out = Vec::with_capacity(table.len() * 48);
    table.export_each(now, wall_now, |entry| {
        codec::encode_name(
            &mut out,
            entry.pod,
            entry.dst,
            entry.name,
            entry.cnames,
            entry.fresh_until,
        );
    });
    out
}

/// The generation a new journal in `dir` takes: above every journal and snapshot there (1 in
/// a directory that does not exist yet).
pub fn next_generation(dir: &Path) -> io::Result<u64> {
    let journals = match journals(dir) {
        Ok(journals) => journals,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(1),
        Err(e) => return Err(e),
    };
    let newest_journal = journals.last().map_or(0, |(generation, _)| *generation);
    let snapshot = fs::read(dir.join(SNAPSHOT))
        .ok()
        .and_then(|bytes| Header::decode(&bytes).ok())
        .map_or(0, |(header, _)| header.generation);
    Ok(newest_journal.max(snapshot) + 1)
}

/// How many name records a stream of frames holds.
pub fn count_names(frames: &[u8]) -> usize {
    Frames::new(frames)
        .filter(|record| matches!(record, Record::Name(_)))
        .count()
}

/// The journals in `dir`, oldest first.
fn journals(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix(JOURNAL_PREFIX))
            .and_then(|g| g.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((generation, entry.path()));
    }
    found.sort_unstable();
    Ok(found)
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{generation}"))
}

#[cfg(test)]
mod tests;
