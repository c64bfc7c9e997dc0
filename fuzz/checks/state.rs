//! What must hold for the name table's state files (`egressgate_dns_shim::persist`) whatever
//! bytes a disk, a crash mid-write or another version left in the state directory.
//!
//! Shared, not copied: the cargo-fuzz target `fuzz_targets/state_file.rs` and the stable replay
//! test `dns-shim/tests/fuzz_corpus.rs` both include this file with `#[path]`. A violated
//! property panics.

use std::time::{Duration, Instant, SystemTime};

use egressgate_dns_shim::persist::codec::{self, Frames, Header, Record};
use egressgate_dns_shim::persist::{apply, encode_table};
use egressgate_dns_shim::{NameTable, PodIp, TableLimits};

/// Small limits, so that restoring many records also exercises eviction.
const MAX_NAMES_PER_POD: usize = 32;
const MAX_NAMES: usize = 64;

/// A state file: header (optional), then frames.
pub fn state_file(data: &[u8]) {
    let body = match Header::decode(data) {
        Ok((header, len)) => {
            // A header that decodes re-encodes to the same bytes.
            assert_eq!(header.encode(), data[..len], "header round trip");
            &data[len..]
        }
        Err(_) => data,
    };
    let records: Vec<Record> = Frames::new(body).collect();
    for record in &records {
        // A record that decodes re-encodes to one frame that decodes back to it.
        let mut again = Vec::new();
        codec::encode(record, &mut again);
        let decoded: Vec<Record> = Frames::new(&again).collect();
        assert_eq!(
            decoded.as_slice(),
            std::slice::from_ref(record),
            "record round trip"
        );
    }
    // Any prefix of the body reads a prefix of its records (a torn write loses only its end).
    let cut = body.len() / 2;
    let prefix: Vec<Record> = Frames::new(&body[..cut]).collect();
    assert!(prefix.len() <= records.len(), "a prefix read more records");

    // Restoring stays within the limits and never grants a name to a pod that did not save it.
    let table = NameTable::new(TableLimits {
        min_ttl: Duration::ZERO,
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: MAX_NAMES_PER_POD,
        max_names: MAX_NAMES,
    });
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let applied = apply(body, &table, now, wall_now);
    assert!(table.len() <= MAX_NAMES, "over the table's limit");
    assert!(applied.names + applied.expired <= records.len());
    let pods: Vec<PodIp> = records
        .iter()
        .filter_map(|r| match r {
            Record::Name(n) => Some(n.pod),
            Record::Touch(_) => None,
        })
        .collect();
    for pod in table.pods() {
        assert!(pods.contains(&pod), "{pod} has records it never saved");
    }
    // The table re-encodes to frames that restore the same number of entries.
    let copy = NameTable::new(TableLimits {
        min_ttl: Duration::ZERO,
        idle_grace: Duration::from_secs(30),
        max_names_per_pod: MAX_NAMES_PER_POD,
        max_names: MAX_NAMES,
    });
    apply(&encode_table(&table), &copy, now, wall_now);
    assert_eq!(copy.len(), table.len(), "snapshot of the restored table");
}
