use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

fn name_record() -> Record {
    Record::Name(SavedName {
        pod: PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2))),
        dst: DestIp(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10))),
        name: "api.example.test".to_owned(),
        cnames: vec!["lb.cdn.example.test".to_owned()],
        fresh_until: UNIX_EPOCH + Duration::from_millis(1_800_000_123_456),
    })
}

fn touch_record() -> Record {
    Record::Touch(SavedTouch {
        pod: PodIp(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2))),
        dst: DestIp(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10))),
        name: "api.example.test".to_owned(),
        at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_000),
    })
}

fn encoded(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        encode(record, &mut out);
    }
    out
}

#[test]
fn records_round_trip() {
    let records = [name_record(), touch_record()];
    let bytes = encoded(&records);
    let mut frames = Frames::new(&bytes);
    assert_eq!(frames.by_ref().collect::<Vec<_>>(), records);
    assert_eq!(frames.corrupt, 0);
}

#[test]
fn a_flipped_byte_costs_one_record_not_the_rest() {
    let records = [name_record(), touch_record(), name_record()];
    let mut bytes = encoded(&records);
    let first_len = encoded(&records[..1]).len();
    bytes[first_len + 12] ^= 0x40; // inside the second frame's payload
    let mut frames = Frames::new(&bytes);
    let read: Vec<Record> = frames.by_ref().collect();
    assert_eq!(read, vec![name_record(), name_record()]);
    assert_eq!(frames.corrupt, 1);
}

#[test]
fn a_torn_last_record_is_counted_and_the_rest_kept() {
    let bytes = encoded(&[name_record(), touch_record()]);
    let torn = &bytes[..bytes.len() - 3];
    let mut frames = Frames::new(torn);
    assert_eq!(frames.by_ref().collect::<Vec<_>>(), vec![name_record()]);
    assert_eq!(frames.corrupt, 1);
}

#[test]
fn a_name_too_long_for_a_frame_is_not_written() {
    let mut record = name_record();
    if let Record::Name(name) = &mut record {
        name.name = "a".repeat(300);
    }
    let mut out = Vec::new();
    encode(&record, &mut out);
    assert!(out.is_empty());
}

#[test]
fn headers_name_their_version_kind_and_scope() {
    let header = Header {
        kind: FileKind::Journal,
        generation: 7,
        scope: "node=n1;podCidrs=198.18.0.0/16".to_owned(),
    };
    let mut bytes = header.encode();
    let len = bytes.len();
    bytes.extend_from_slice(&encoded(&[name_record()]));
    assert_eq!(Header::decode(&bytes), Ok((header, len)));

    let mut future = bytes.clone();
    future[8] = 2; // version 2
    assert_eq!(Header::decode(&future), Err(HeaderError::Version(2)));
    let mut corrupt = bytes.clone();
    corrupt[12] ^= 1; // inside the generation
    assert_eq!(Header::decode(&corrupt), Err(HeaderError::Corrupt));
    assert_eq!(Header::decode(b"hello"), Err(HeaderError::NotStateFile));
    assert_eq!(Header::decode(&bytes[..10]), Err(HeaderError::Corrupt));
}

proptest! {
    /// Whatever the bytes, reading them never panics and only yields whole records.
    #[test]
    fn any_bytes_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Header::decode(&bytes);
        for record in Frames::new(&bytes) {
            let mut again = Vec::new();
            encode(&record, &mut again);
            prop_assert!(!again.is_empty());
        }
    }

    /// Any truncation of a valid stream yields a prefix of its records.
    #[test]
    fn truncation_yields_a_prefix(cut in 0usize..200) {
        let records = [name_record(), touch_record(), name_record()];
        let bytes = encoded(&records);
        let cut = cut.min(bytes.len());
        let read: Vec<Record> = Frames::new(&bytes[..cut]).collect();
        prop_assert_eq!(&read[..], &records[..read.len()]);
    }
}
