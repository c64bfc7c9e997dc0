//! The journal and snapshot against a real directory: what a crash, a compaction, a copy from
//! another node or a stale file leaves for the next start.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use prometheus::Registry;

use super::*;
use crate::answer::Answer;
use crate::table::{DestIp, PodIp, SavedName, TableLimits};

const POD_A: PodIp = PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2)));
const POD_B: PodIp = PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 2, 2)));
const WEB: DestIp = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)));
const DB: DestIp = DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 20)));

fn table() -> NameTable {
    NameTable::new(TableLimits {
        min_ttl: Duration::from_secs(5),
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: 100,
        max_names: 1000,
    })
    .log_touches()
}

fn dns_name(name: &str) -> egressgate_policy::DnsName {
    name.parse().expect(name)
}

fn scope() -> Scope {
    Scope::new("node-1", &["198.18.0.0/15".to_owned()])
}

fn answer(name: &str, address: DestIp, ttl: u32) -> Answer {
    Answer {
        name: dns_name(name),
        addresses: vec![address.0],
        cnames: vec![],
        ttl,
    }
}

/// A table plus its journal in `dir`, as the shim keeps them.
struct Kept {
    table: NameTable,
    journal: Journal,
}

impl Kept {
    fn start(dir: &Path) -> (Kept, RestoreReport) {
        let registry = Registry::new();
        let metrics = PersistMetrics::register(&registry).expect("metrics");
        let table = table();
        let report = restore(dir, &scope(), &table, &metrics);
        let generation = next_generation(dir).expect("generation");
        let journal =
            Journal::create(dir, scope(), generation, metrics, &registry).expect("journal");
        (Kept { table, journal }, report)
    }

    fn record(&self, pod: PodIp, answer: &Answer) {
        let ttl = self.table.record(pod, answer, Instant::now());
        self.journal.record(pod, answer, ttl);
    }

    fn names(&self, pod: PodIp, dst: DestIp) -> Vec<String> {
        let mut names: Vec<String> = self
            .table
            .lookup(pod, dst, Instant::now())
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn records_survive_a_crash_without_any_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    kept.record(POD_A, &answer("api.example.test.", WEB, 300));
    kept.record(POD_B, &answer("db.example.test", DB, 300));
    // A crash: no compaction, no sync, the process is gone.
    drop(kept);
    let (restarted, report) = Kept::start(dir.path());
    assert_eq!(report.applied.names, 2);
    assert_eq!(report.files_read, 1);
    assert_eq!(restarted.names(POD_A, WEB), ["api.example.test"]);
    assert_eq!(restarted.names(POD_B, DB), ["db.example.test"]);
    assert!(
        restarted.names(POD_B, WEB).is_empty(),
        "records stay per pod"
    );
    assert_eq!(report.pods, vec![POD_A, POD_B]);
}

#[test]
fn compaction_keeps_everything_and_drops_old_journals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    kept.record(POD_A, &answer("api.example.test", WEB, 300));
    kept.journal.compact(&kept.table).expect("compact");
    kept.record(POD_A, &answer("other.example.test", WEB, 300));
    assert_eq!(
        journals(dir.path()).expect("list").len(),
        1,
        "older journals deleted"
    );
    drop(kept);
    let (restarted, report) = Kept::start(dir.path());
    assert_eq!(report.files_read, 2, "snapshot and the newer journal");
    assert_eq!(
        restarted.names(POD_A, WEB),
        ["api.example.test", "other.example.test"]
    );
}

#[test]
fn a_crash_between_journal_rotation_and_snapshot_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    kept.record(POD_A, &answer("api.example.test", WEB, 300));
    // What compaction leaves if it dies after starting the next journal: two journals, and a
    // temporary snapshot never renamed.
    let next = Journal::create(
        dir.path(),
        scope(),
        kept.journal_generation() + 1,
        PersistMetrics::register(&Registry::new()).expect("metrics"),
        &Registry::new(),
    )
    .expect("next journal");
    drop(next);
    std::fs::write(dir.path().join("names.snapshot.tmp"), b"half a snapshot").expect("write");
    drop(kept);
    let (restarted, report) = Kept::start(dir.path());
    assert_eq!(restarted.names(POD_A, WEB), ["api.example.test"]);
    assert!(
        report.skipped_files.is_empty(),
        "{:?}",
        report.skipped_files
    );
}

#[test]
fn expiry_is_judged_by_the_wall_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    // Saved as already stale 10 s ago (in grace: 30 s) and 40 s ago (past grace).
    let now = SystemTime::now();
    let stale = |name: &str, ago: u64| SavedName {
        pod: POD_A,
        dst: WEB,
        name: name.to_owned(),
        cnames: vec![],
        fresh_until: now - Duration::from_secs(ago),
    };
    let mut frames = Vec::new();
    for saved in [
        stale("in-grace.example.test", 10),
        stale("gone.example.test", 40),
    ] {
        codec::encode(&codec::Record::Name(saved), &mut frames);
    }
    let applied = apply(&frames, &kept.table, Instant::now(), now);
    assert_eq!((applied.names, applied.expired), (1, 1));
    assert_eq!(kept.names(POD_A, WEB), ["in-grace.example.test"]);
}

#[test]
fn a_saved_use_extends_the_restored_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let mut frames = Vec::new();
    // Stale for 20 s (valid 10 s more), but used 1 s ago (valid 29 s more).
    codec::encode_name(
        &mut frames,
        POD_A,
        WEB,
        "api.example.test",
        &[] as &[&str],
        wall_now - Duration::from_secs(20),
    );
    codec::encode_touch(
        &mut frames,
        POD_A,
        WEB,
        "api.example.test",
        wall_now - Duration::from_secs(1),
    );
    let applied = apply(&frames, &kept.table, now, wall_now);
    assert_eq!((applied.names, applied.touches), (1, 1));
    let later = now + Duration::from_secs(20);
    assert_eq!(
        kept.table.lookup(POD_A, WEB, later).len(),
        1,
        "the use extended it"
    );
    assert!(kept
        .table
        .lookup(POD_A, WEB, now + Duration::from_secs(30))
        .is_empty());
}

#[test]
fn uses_of_entries_are_journaled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    let resolved = Instant::now();
    kept.table
        .record(POD_A, &answer("api.example.test", WEB, 0), resolved);
    kept.table
        .touch(POD_A, WEB, &dns_name("api.example.test"), resolved);
    kept.table.touch(
        POD_A,
        WEB,
        &dns_name("never-resolved.example.test"),
        resolved,
    );
    kept.journal.save_touches(&kept.table);
    let bytes = std::fs::read(journal_path(dir.path(), kept.journal_generation())).expect("read");
    let (_, len) = Header::decode(&bytes).expect("header");
    let touches: Vec<String> = Frames::new(&bytes[len..])
        .filter_map(|r| match r {
            Record::Touch(t) => Some(t.name),
            Record::Name(_) => None,
        })
        .collect();
    assert_eq!(
        touches,
        ["api.example.test"],
        "only uses of existing entries"
    );
}

#[test]
fn files_of_another_node_or_version_are_skipped_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new();
    let metrics = PersistMetrics::register(&registry).expect("metrics");
    let other = Journal::create(
        dir.path(),
        Scope::new("node-2", &["198.18.0.0/15".to_owned()]),
        1,
        metrics.clone(),
        &Registry::new(),
    )
    .expect("journal");
    other.record(
        POD_A,
        &answer("api.example.test", WEB, 300),
        Duration::from_secs(300),
    );
    drop(other);
    let mut future = Header {
        kind: FileKind::Journal,
        generation: 2,
        scope: scope().as_str().to_owned(),
    }
    .encode();
    future[8] = 9;
    std::fs::write(journal_path(dir.path(), 2), future).expect("write");
    std::fs::write(dir.path().join(SNAPSHOT), b"garbage").expect("write");

    let table = table();
    let report = restore(dir.path(), &scope(), &table, &metrics);
    assert_eq!(table.len(), 0);
    let reasons: Vec<&str> = report.skipped_files.iter().map(|s| s.reason).collect();
    assert_eq!(reasons, ["corrupt", "foreign", "version"]);
    assert_eq!(
        report.next_generation, 3,
        "a new journal never reuses a file's generation"
    );
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    assert!(
        text.contains(r#"egressgate_state_skipped_records_total{reason="foreign"} 1"#),
        "{text}"
    );
}

#[test]
fn a_hand_over_capture_holds_what_was_recorded_after_the_dump() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    kept.record(POD_A, &answer("before.example.test", WEB, 300));
    let dump = encode_table(&kept.table);
    kept.journal.start_capture();
    kept.record(POD_A, &answer("during.example.test", WEB, 300));
    let capture = kept.journal.take_capture();

    let successor = table();
    let now = (Instant::now(), SystemTime::now());
    assert_eq!(apply(&dump, &successor, now.0, now.1).names, 1);
    assert_eq!(apply(&capture, &successor, now.0, now.1).names, 1);
    assert_eq!(count_names(&capture), 1);
    let names: Vec<String> = successor
        .lookup(POD_A, WEB, Instant::now())
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_retired_journal_writes_no_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, _) = Kept::start(dir.path());
    kept.record(POD_A, &answer("api.example.test", WEB, 300));
    kept.journal.retire(true);
    kept.journal.compact(&kept.table).expect("compact");
    assert!(!dir.path().join(SNAPSHOT).exists());
}

impl Kept {
    fn journal_generation(&self) -> u64 {
        self.journal.generation()
    }
}

#[test]
fn the_state_directory_and_files_are_roots_alone() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("state");
    let (kept, _) = Kept::start(&dir);
    kept.record(POD_A, &answer("api.example.test", WEB, 300));
    kept.journal.compact(&kept.table).expect("compact");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(SNAPSHOT)), 0o600);
    assert_eq!(mode(&journal_path(&dir, kept.journal_generation())), 0o600);
}
