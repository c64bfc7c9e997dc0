//! Oldest-first order of one shard's entries, for eviction: a slab of nodes, each threaded on
//! two doubly-linked lists, the shard's and its pod's. Adding, renewing (moving to the back)
//! and removing are O(1) and never leave stale records behind, so no operation ever has to scan
//! or compact, whatever the shard's size.

use super::keys::{DestIp, PodIp};

/// Where an entry lives in the table: the pod that resolved it and the address it resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Route {
    pub pod: PodIp,
    pub dst: DestIp,
}

/// A node's index in the slab; the table's entries keep theirs.
pub(super) type NodeId = u32;

const NONE: NodeId = NodeId::MAX;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Order {
    nodes: Vec<Node>,
    /// Slots of removed nodes, reused before the slab grows.
    free: Vec<NodeId>,
    shard: List,
    /// foldhash rather than SipHash: three probes per record (the pod's count, unlink, link),
    /// SipHash was a third of a refresh's instructions. A pod does not choose its address.
    pods: foldhash::HashMap<PodIp, List>,
}

#[derive(Debug)]
struct Node {
    route: Route,
    shard: Links,
    pod: Links,
}

#[derive(Debug, Clone, Copy)]
struct Links {
    prev: NodeId,
    next: NodeId,
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: NodeId,
    tail: NodeId,
    len: usize,
}

/// Which of a node's two lists an operation walks.
#[derive(Debug, Clone, Copy)]
enum Chain {
    Shard,
    Pod,
}

impl Default for List {
    fn default() -> Self {
        List {
            head: NONE,
            tail: NONE,
            len: 0,
        }
    }
}

const UNLINKED: Links = Links {
    prev: NONE,
    next: NONE,
};

// === impl Order ===

impl Order {
    /// Appends a node for `route` as the newest, in the shard and in its pod.
    pub(super) fn push(&mut self, route: Route) -> NodeId {
        let node = Node {
            route,
            shard: UNLINKED,
            pod: UNLINKED,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                // The table's limits keep it far below 2^32 entries (`NameTable::new`).
                let id = NodeId::try_from(self.nodes.len()).unwrap_or(NONE - 1);
                self.nodes.push(node);
                id
            }
        };
        self.link_back(id);
        id
    }

    /// Makes `id` the newest again.
    pub(super) fn renew(&mut self, id: NodeId) {
        self.unlink(id);
        self.link_back(id);
    }

    /// Removes `id`; returns its route.
    pub(super) fn remove(&mut self, id: NodeId) -> Route {
        self.unlink(id);
        self.free.push(id);
        self.nodes[id as usize].route
    }

    /// The oldest node of the shard.
    pub(super) fn oldest(&self) -> Option<NodeId> {
        (self.shard.head != NONE).then_some(self.shard.head)
    }

    /// The oldest node of `pod`.
    pub(super) fn oldest_of(&self, pod: PodIp) -> Option<NodeId> {
        self.pods.get(&pod).map(|list| list.head)
    }

    pub(super) fn route(&self, id: NodeId) -> Route {
        self.nodes[id as usize].route
    }

    /// How many entries `pod` has.
    pub(super) fn len_of(&self, pod: PodIp) -> usize {
        self.pods.get(&pod).map_or(0, |list| list.len)
    }

    /// How many entries the shard has.
    pub(super) fn len(&self) -> usize {
        self.shard.len
    }

    /// `pod`'s nodes, oldest first.
    pub(super) fn nodes_of(&self, pod: PodIp) -> Vec<NodeId> {
        let mut ids = Vec::with_capacity(self.len_of(pod));
        let mut id = self.pods.get(&pod).map_or(NONE, |list| list.head);
        while id != NONE {
            ids.push(id);
            id = self.nodes[id as usize].pod.next;
        }
        ids
    }

    fn link_back(&mut self, id: NodeId) {
        let pod = self.nodes[id as usize].route.pod;
        link(&mut self.nodes, id, Chain::Shard, &mut self.shard);
        link(
            &mut self.nodes,
            id,
            Chain::Pod,
            self.pods.entry(pod).or_default(),
        );
    }

    fn unlink(&mut self, id: NodeId) {
        let pod = self.nodes[id as usize].route.pod;
        detach(&mut self.nodes, id, Chain::Shard, &mut self.shard);
        if let Some(list) = self.pods.get_mut(&pod) {
            detach(&mut self.nodes, id, Chain::Pod, list);
            if list.len == 0 {
                self.pods.remove(&pod);
            }
        }
    }
}

fn links(nodes: &mut [Node], id: NodeId, chain: Chain) -> &mut Links {
    let node = &mut nodes[id as usize];
    match chain {
        Chain::Shard => &mut node.shard,
        Chain::Pod => &mut node.pod,
    }
}

fn link(nodes: &mut [Node], id: NodeId, chain: Chain, list: &mut List) {
    let tail = list.tail;
    *links(nodes, id, chain) = Links {
        prev: tail,
        next: NONE,
    };
    if tail == NONE {
        list.head = id;
    } else {
        links(nodes, tail, chain).next = id;
    }
    list.tail = id;
    list.len += 1;
}

fn detach(nodes: &mut [Node], id: NodeId, chain: Chain, list: &mut List) {
    let Links { prev, next } = *links(nodes, id, chain);
    if prev == NONE {
        list.head = next;
    } else {
        links(nodes, prev, chain).next = next;
    }
    if next == NONE {
        list.tail = prev;
    } else {
        links(nodes, next, chain).prev = prev;
    }
    *links(nodes, id, chain) = UNLINKED;
    list.len -= 1;
}
