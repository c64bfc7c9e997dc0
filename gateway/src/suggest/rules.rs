//! What one workload reached, gathered into rules: one per destination, with the ports and
//! protocols seen there; sibling names folded into `*.parent` on request.

use std::collections::{BTreeMap, BTreeSet};

use super::input::{Destination, PgSession, Use};

/// Everything one workload reached.
#[derive(Debug, Default)]
pub(super) struct Reached {
    pub destinations: BTreeMap<Destination, Ports>,
}

/// The ports of one destination, each with what was spoken there.
pub(super) type Ports = BTreeMap<u16, PortUse>;

/// What was spoken on one port of one destination.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PortUse {
    pub tcp: bool,
    pub tls: bool,
    pub http: bool,
    pub postgresql: Option<PgSeen>,
}

/// The PostgreSQL sessions seen on one port.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PgSeen {
    pub databases: BTreeSet<String>,
    pub users: BTreeSet<String>,
    /// A startup the rule must allow whatever its database (physical replication).
    pub any_database: bool,
    /// At least one startup was read, so the rule may list databases and users.
    pub startups: bool,
    /// A session turned encrypted, so its startup was not seen.
    pub encrypted: bool,
}

impl Reached {
    pub fn add(&mut self, destination: Destination, port: u16, used: Use) {
        let seen = self
            .destinations
            .entry(destination)
            .or_default()
            .entry(port)
            .or_default();
        seen.add(used);
    }

    /// Folds `min` or more names that differ only in their first label into `*.parent`,
    /// their ports merged. A parent needs two labels: `*.com` is never suggested.
    pub fn fold_wildcards(&mut self, min: usize) {
        let mut siblings: BTreeMap<String, Vec<Destination>> = BTreeMap::new();
        for destination in self.destinations.keys() {
            if let Destination::Name(name) = destination {
                if name.starts_with("*.") {
                    continue;
                }
                if let Some((_, parent)) = name.split_once('.') {
                    if parent.contains('.') {
                        siblings
                            .entry(parent.to_owned())
                            .or_default()
                            .push(destination.clone());
                    }
                }
            }
        }
        for (parent, names) in siblings {
            if names.len() < min.max(2) {
                continue;
            }
            let mut merged = Ports::new();
            for name in names {
                for (port, used) in self.destinations.remove(&name).unwrap_or_default() {
                    merged.entry(port).or_default().merge(used);
                }
            }
            let wildcard = self
                .destinations
                .entry(Destination::Name(format!("*.{parent}")))
                .or_default();
            for (port, used) in merged {
                wildcard.entry(port).or_default().merge(used);
            }
        }
    }
}

impl PortUse {
    fn add(&mut self, used: Use) {
        match used {
            Use::Tcp => self.tcp = true,
            Use::Tls => self.tls = true,
            Use::Http => self.http = true,
            Use::Postgresql(session) => self.postgresql.get_or_insert_default().add(session),
        }
    }

    fn merge(&mut self, other: PortUse) {
        self.tcp |= other.tcp;
        self.tls |= other.tls;
        self.http |= other.http;
        if let Some(theirs) = other.postgresql {
            let ours = self.postgresql.get_or_insert_default();
            ours.databases.extend(theirs.databases);
            ours.users.extend(theirs.users);
            ours.any_database |= theirs.any_database;
            ours.startups |= theirs.startups;
            ours.encrypted |= theirs.encrypted;
        }
    }
}

impl PgSeen {
    fn add(&mut self, session: PgSession) {
        self.encrypted |= session.encrypted;
        // A CancelRequest or an encrypted session shows no startup.
        let Some(user) = session.user else {
            return;
        };
        self.startups = true;
        self.users.insert(user);
        match session.database {
            Some(database) if !session.physical_replication => {
                self.databases.insert(database);
            }
            _ => self.any_database = true,
        }
    }

    /// The `databases` list of the rule: empty (any) when a startup needs any.
    pub fn databases(&self) -> impl Iterator<Item = &String> {
        self.databases.iter().filter(|_| !self.any_database)
    }

    /// The `users` list: empty (any) when no startup was read.
    pub fn users(&self) -> impl Iterator<Item = &String> {
        self.users.iter()
    }

    /// `allowEncrypted`: needed only when the rule limits databases or users.
    pub fn allow_encrypted(&self) -> bool {
        self.encrypted && self.startups
    }
}
