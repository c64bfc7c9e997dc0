//! Property tests for every peeker: arbitrary and mutated inputs never panic, and an answer
//! given for a prefix is the answer for the whole input.

use std::fmt::Debug;

use proptest::prelude::*;

use super::http::peek_request_head;
use super::postgres::peek_first_message;
use super::tests::{reframe, FIXTURES};
use super::tls::{peek_client_hello, ClientHello};
use super::{sniff, Peek};

/// Asserts the monotonic property for one cut: a decided prefix decides like the whole input.
fn assert_monotonic<T: Debug + PartialEq>(buf: &[u8], cut: usize, peek: impl Fn(&[u8]) -> Peek<T>) {
    let cut = cut.min(buf.len());
    let prefix = peek(&buf[..cut]);
    if prefix != Peek::Incomplete {
        assert_eq!(prefix, peek(buf), "cut at {cut}");
    }
}

fn check_all_peekers(buf: &[u8], cut: usize) {
    assert_monotonic(buf, cut, sniff);
    assert_monotonic(buf, cut, peek_client_hello);
    assert_monotonic(buf, cut, peek_request_head);
    assert_monotonic(buf, cut, peek_first_message);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_monotonic(
        buf in proptest::collection::vec(any::<u8>(), 0..700),
        cut in 0usize..700,
    ) {
        check_all_peekers(&buf, cut);
    }

    #[test]
    fn plausible_starts_never_panic_and_stay_monotonic(
        start in prop::sample::select(vec![
            &[0x16u8, 0x03, 0x01][..], b"GET / HTTP/1.1\r\nHost: ", &[0, 0, 0, 40, 0, 3, 0, 0],
        ]),
        tail in proptest::collection::vec(any::<u8>(), 0..400),
        cut in 0usize..500,
    ) {
        let buf = [start, &tail].concat();
        check_all_peekers(&buf, cut);
    }

    #[test]
    fn mutated_fixtures_never_panic_and_stay_monotonic(
        index in 0..FIXTURES.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 1..6),
    ) {
        let mut buf = FIXTURES[index].1.to_vec();
        for (at, byte) in edits {
            let at = at.index(buf.len());
            buf[at] = byte;
        }
        for cut in cuts {
            check_all_peekers(&buf, cut.index(buf.len() + 1));
        }
    }

    #[test]
    fn any_record_split_gives_the_same_client_hello(
        index in 0..FIXTURES.len(),
        size in 1usize..600,
    ) {
        let (path, bytes) = FIXTURES[index];
        let Peek::Complete(whole) = peek_client_hello(bytes) else {
            return Ok(());
        };
        let framed = reframe(&bytes[..whole.consumed], size, [0x03, 0x03]);
        let Peek::Complete(split) = peek_client_hello(&framed) else {
            panic!("{path}: split into {size}-byte records fails");
        };
        prop_assert_eq!(split.consumed, framed.len());
        prop_assert_eq!(ClientHello { consumed: whole.consumed, ..split }, whole);
    }
}
