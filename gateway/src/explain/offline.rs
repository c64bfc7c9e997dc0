//! `egressgate explain --policies DIR --identities FILE ... --resolved NAME=IP,...`: the trace
//! from files alone (a laptop, a CI job), with the gateway's default settings. `--resolved`
//! stands in for the pod's DNS records: each pair is recorded for every address of the pod.

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use egressgate_dns_shim::{DestIp, NameTable, SavedName, TableLimits};
use egressgate_policy::DnsName;

use super::query::Query;
use super::trace::{self, Explanation, Records, Settings};
use crate::config::{self, UnselectedPods};
use crate::connection::Fallbacks;
use crate::identity::{Identities, Pod};
use crate::store::{load_policy_dir, Snapshot};

/// `NAME=IP[,NAME=IP…]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved(pub Vec<(DnsName, IpAddr)>);

/// A given record outlives any explanation.
const GIVEN_RECORD_LIFE: Duration = Duration::from_secs(24 * 3600);

impl FromStr for Resolved {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pairs = Vec::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, ip) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected NAME=IP"))?;
            let name =
                DnsName::parse(name).map_err(|e| format!("{name:?} is not a DNS name: {e}"))?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{ip:?} is not an IP address"))?;
            pairs.push((name, ip.to_canonical()));
        }
        Ok(Resolved(pairs))
    }
}

impl Settings {
    /// The gateway's defaults (`peek.requireSni: true`, `unselectedPods: allow`,
    /// `unknownSources: deny`).
    pub fn defaults() -> Self {
        Settings {
            require_sni: config::Peek::default().require_sni,
            fallbacks: Fallbacks {
                unselected: UnselectedPods::default(),
                unknown_sources: UnselectedPods::deny(),
            },
        }
    }

    /// The settings of a configuration file.
    pub fn of(config: &config::Config) -> Self {
        Settings {
            require_sni: config.peek.require_sni,
            fallbacks: Fallbacks {
                unselected: config.unselected_pods,
                unknown_sources: config.unknown_sources,
            },
        }
    }
}

/// A name table holding `resolved` for every address of `pod`.
pub fn table_for(pod: &Pod, resolved: &Resolved) -> NameTable {
    let table = NameTable::new(TableLimits {
        min_ttl: Duration::ZERO,
        idle_grace: Duration::ZERO,
        max_names_per_pod: usize::MAX,
        max_names: usize::MAX,
    });
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    for pod_ip in pod.table_ips() {
        for (name, dst) in &resolved.0 {
            table.restore(
                &SavedName {
                    pod: pod_ip,
                    dst: DestIp(*dst),
                    name: name.to_string(),
                    cnames: Vec::new(),
                    fresh_until: wall_now + GIVEN_RECORD_LIFE,
                },
                now,
                wall_now,
            );
        }
    }
    table
}

/// Explains `query` from the files.
pub fn explain(
    policy_dir: &Path,
    identity_file: &Path,
    query: &Query,
    resolved: &Resolved,
) -> Result<Explanation, String> {
    let asked = query.check().map_err(|e| e.to_string())?;
    let policies = load_policy_dir(policy_dir).map_err(|errors| errors.join("\n"))?;
    let identities = Identities::load(identity_file).map_err(|e| e.to_string())?;
    let snapshot = Snapshot {
        policies: Arc::new(policies),
        identities: Arc::new(identities),
    };
    let pod = trace::find_pod(&snapshot, &asked.pod).map_err(|e| e.to_string())?;
    let table = table_for(pod, resolved);
    trace::explain(
        &snapshot,
        &table,
        &asked,
        Settings::defaults(),
        Records::Given,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_pairs_are_names_and_addresses() {
        let parsed: Resolved = "Api.Example.test=198.19.0.10, db.example.test=fd00:99::20"
            .parse()
            .expect("valid");
        assert_eq!(
            parsed.0,
            [
                (
                    "api.example.test".parse().expect("name"),
                    "198.19.0.10".parse().expect("ip")
                ),
                (
                    "db.example.test".parse().expect("name"),
                    "fd00:99::20".parse().expect("ip")
                ),
            ]
        );
        assert!("api.example.test".parse::<Resolved>().is_err());
        assert!("api.example.test=999.1.1.1".parse::<Resolved>().is_err());
        assert!("1.2.3.4=1.2.3.4".parse::<Resolved>().is_err());
    }
}
