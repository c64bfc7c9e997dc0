//! The entries of one (pod, destination) route: inline while there are few, with a hash index
//! once there are many, so that finding one name costs the same whether the address carries
//! one name or thousands (a CDN or shared-ingress address does; a pod can also inflate it on
//! purpose).

use std::hash::BuildHasher;

use egressgate_policy::DnsName;
use smallvec::SmallVec;

use super::Entry;

/// Past this many entries a route gets its index; below it a scan is faster than hashing.
const INDEX_FROM: usize = 8;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Names {
    entries: SmallVec<[Entry; 1]>,
    /// Positions in `entries`, by name. Boxed: most routes never need it.
    index: Option<Box<NameIndex>>,
}

#[derive(Debug, Default)]
struct NameIndex {
    hasher: foldhash::fast::RandomState,
    positions: hashbrown::HashTable<u32>,
}

impl Names {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub(super) fn find(&self, name: &DnsName) -> Option<&Entry> {
        self.position(name).and_then(|at| self.entries.get(at))
    }

    pub(super) fn find_mut(&mut self, name: &DnsName) -> Option<&mut Entry> {
        self.position(name).and_then(|at| self.entries.get_mut(at))
    }

    /// Adds an entry whose name is not here yet (the caller looked with [`find`](Self::find)).
    pub(super) fn push(&mut self, entry: Entry) {
        let at = self.entries.len();
        self.entries.push(entry);
        match &mut self.index {
            Some(index) => index.insert(&self.entries, at),
            None if self.entries.len() > INDEX_FROM => self.index = Some(self.build_index()),
            None => {}
        }
    }

    /// Keeps the entries `keep` says yes to; the index follows (rebuilt only if one went).
    pub(super) fn retain(&mut self, keep: impl FnMut(&mut Entry) -> bool) {
        let before = self.entries.len();
        self.entries.retain(keep);
        if self.entries.len() != before {
            self.index = (self.entries.len() > INDEX_FROM).then(|| self.build_index());
        }
    }

    fn position(&self, name: &DnsName) -> Option<usize> {
        match &self.index {
            Some(index) => index.position(&self.entries, name),
            None => self.entries.iter().position(|e| e.name == *name),
        }
    }

    fn build_index(&self) -> Box<NameIndex> {
        let mut index = Box::<NameIndex>::default();
        index.positions.reserve(self.entries.len(), |_| 0);
        for at in 0..self.entries.len() {
            index.insert(&self.entries, at);
        }
        index
    }
}

impl NameIndex {
    fn insert(&mut self, entries: &[Entry], at: usize) {
        let (Some(entry), Ok(position)) = (entries.get(at), u32::try_from(at)) else {
            return;
        };
        let hash = self.hasher.hash_one(entry.name.as_bytes());
        let hasher = &self.hasher;
        self.positions.insert_unique(hash, position, |&p| {
            entries
                .get(p as usize)
                .map_or(0, |e| hasher.hash_one(e.name.as_bytes()))
        });
    }

    fn position(&self, entries: &[Entry], name: &DnsName) -> Option<usize> {
        let hash = self.hasher.hash_one(name.as_bytes());
        self.positions
            .find(hash, |&p| {
                entries.get(p as usize).is_some_and(|e| e.name == *name)
            })
            .map(|&p| p as usize)
    }
}
