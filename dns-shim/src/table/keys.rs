//! The two addresses a record is filed under, as distinct types: the table's API takes a
//! (pod, destination) pair in many places, and two bare `IpAddr`s there could be swapped
//! silently. Both are plain copies of an address, so the hot path pays nothing for them.
//!
//! ```
//! # use egressgate_dns_shim::{DestIp, NameTable, PodIp};
//! fn live_names(table: &NameTable, pod: PodIp, dst: DestIp) -> usize {
//!     table.lookup(pod, dst, std::time::Instant::now()).len()
//! }
//! ```
//!
//! ```compile_fail
//! # use egressgate_dns_shim::{DestIp, NameTable, PodIp};
//! fn live_names(table: &NameTable, pod: PodIp, dst: DestIp) -> usize {
//!     table.lookup(dst, pod, std::time::Instant::now()).len() // swapped
//! }
//! ```

use std::fmt;
use std::net::IpAddr;

/// A pod's own address: the source of its DNS queries and of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodIp(pub IpAddr);

/// An address a DNS answer gave the pod: where its connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestIp(pub IpAddr);

impl PodIp {
    /// Which of `shards` parts (a power of two) the pod's records, or counts, belong in. Pod
    /// addresses come in runs (a node's pod CIDR hands them out in order), so a Fibonacci
    /// multiply folds every bit of the address into the top bits it keeps, rather than taking
    /// the low bits as they are. Not seeded: a pod does not choose its address, and an uneven
    /// spread would cost only some contention.
    pub fn shard(self, shards: usize) -> usize {
        debug_assert!(shards.is_power_of_two(), "{shards} shards");
        let bits = match self.0 {
            IpAddr::V4(v4) => u64::from(v4.to_bits()),
            IpAddr::V6(v6) => {
                let bits = v6.to_bits();
                // The two halves folded together: truncating is the point.
                (bits as u64) ^ ((bits >> 64) as u64)
            }
        };
        // The top log2(shards) bits: below `shards`, so it fits (one shard: all of them shifted out).
        let top = bits
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .checked_shr(u64::BITS - shards.trailing_zeros())
            .unwrap_or(0);
        usize::try_from(top).unwrap_or_default()
    }
}

impl fmt::Display for PodIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for DestIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_is_within_the_count_even_for_one() {
        let pods = [
            PodIp(IpAddr::from([198, 18, 1, 2])),
            PodIp(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 7])),
            PodIp(IpAddr::from([255, 255, 255, 255])),
        ];
        for pod in pods {
            assert_eq!(pod.shard(1), 0);
            assert!(pod.shard(32) < 32);
            assert!(pod.shard(1 << 20) < 1 << 20);
        }
    }
}
