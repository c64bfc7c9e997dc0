//! The decision benchmark, in process and with the gateway's own code: the synthetic cluster of
//! [`crate::world`] with `pods` pods and `names_per_pod` names recorded per pod in a
//! [`NameTable`]. Every pod is selected by ten policies (a hundred rules at full size); every
//! name it resolved matches one of their rules.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use egressgate::decision;
use egressgate::identity::Identities;
use egressgate_dns_shim::{Answer, DestIp, NameTable, PodIp, TableLimits};
use egressgate_policy::{parse_policies, DnsName, PolicySet};
use hdrhistogram::Histogram;

use crate::results::Better;
use crate::world::{self, dst_ip, name_for, pod_ip, Shape, TIERS};
use crate::Error;

#[derive(Debug, Clone)]
pub struct Size {
    pub namespaces: usize,
    pub policies: usize,
    pub rules_per_policy: usize,
    pub pods: usize,
    pub names_per_pod: usize,
    /// Decisions timed per round.
    pub decisions: usize,
}

impl Size {
    /// The size: 10k rules, 1k pods, 1M names.
    pub fn full() -> Size {
        Size {
            namespaces: 10,
            policies: 1000,
            rules_per_policy: 10,
            pods: 1000,
            names_per_pod: 1000,
            decisions: 200_000,
        }
    }

    pub fn smoke() -> Size {
        Size {
            namespaces: 2,
            policies: 40,
            rules_per_policy: 5,
            pods: 20,
            names_per_pod: 50,
            decisions: 2_000,
        }
    }

    pub fn rules(&self) -> usize {
        self.shape().total_rules()
    }

    fn shape(&self) -> Shape {
        Shape {
            namespaces: self.namespaces,
            policies: self.policies,
            rules: self.rules_per_policy,
        }
    }
}

/// The policy set as YAML (one document per policy).
pub fn policy_yaml(size: &Size) -> String {
    world::policy_yaml(&size.shape())
}

fn identity_yaml(size: &Size) -> String {
    let mut out = String::from("namespaces:\n");
    for ns in 0..size.namespaces {
        out.push_str(&format!("  - name: ns{ns}\n    labels: {{team: t{ns}}}\n"));
    }
    out.push_str("pods:\n");
    for i in 0..size.pods {
        out.push_str(&format!(
            "  - name: p{i}\n    namespace: ns{}\n    ips: [\"{}\"]\n    labels: {{tier: t{}, app: a{i}}}\n",
            i % size.namespaces,
            pod_ip(i),
            (i / size.namespaces) % TIERS
        ));
    }
    out
}

fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The built world, reused by every round.
#[derive(Debug)]
pub struct Bench {
    policies: PolicySet,
    identities: Identities,
    table: NameTable,
    policy_dir: tempfile::TempDir,
    record_per_s: f64,
    table_bytes_per_name: f64,
    names: usize,
}

pub fn specs() -> Vec<(&'static str, &'static str, &'static str, Better)> {
    vec![
        ("decision_p50", "decision p50", "ns", Better::Lower),
        ("decision_p99", "decision p99", "ns", Better::Lower),
        ("decision_p999", "decision p99.9", "ns", Better::Lower),
        (
            "select_p99",
            "identity + policy selection p99",
            "ns",
            Better::Lower,
        ),
        ("lookup_p99", "name table lookup p99", "ns", Better::Lower),
        (
            "grants_p99",
            "grants + authorization p99",
            "ns",
            Better::Lower,
        ),
        (
            "reload_ms",
            "policy reload (read, parse, compile)",
            "ms",
            Better::Lower,
        ),
        (
            "record_rate",
            "name table record rate (build)",
            "names/s",
            Better::Higher,
        ),
        (
            "table_bytes_per_name",
            "name table RSS per name",
            "bytes",
            Better::Lower,
        ),
    ]
}

impl Bench {
    pub fn build(size: &Size) -> Result<Bench, Error> {
        crate::progress(&format!(
            "decision: building {} rules, {} pods, {} names",
            size.rules(),
            size.pods,
            size.pods * size.names_per_pod
        ));
        let yaml = policy_yaml(size);
        let policy_dir = tempfile::Builder::new()
            .prefix("loadtest-policies-")
            .tempdir()?;
        // Ten files, as a real policy directory would have several.
        let docs: Vec<&str> = yaml.split_inclusive("---\n").collect();
        for (index, chunk) in docs.chunks(docs.len().div_ceil(10).max(1)).enumerate() {
            std::fs::write(
                policy_dir.path().join(format!("p{index}.yaml")),
                chunk.concat(),
            )?;
        }
        let policies = PolicySet::new(
            parse_policies("bench.yaml", &yaml)
                .map_err(|e| Error::msg(format!("policies: {:?}", e.first())))?,
        )
        .map_err(|e| Error::msg(format!("policies: {:?}", e.first())))?;
        let identities = Identities::parse("pods.yaml", &identity_yaml(size))
            .map_err(|e| Error::msg(format!("identities: {e}")))?;
        let names = size.pods * size.names_per_pod;
        let table = NameTable::new(TableLimits {
            min_ttl: Duration::from_secs(3600),
            idle_grace: Duration::from_secs(3600),
            max_names_per_pod: size.names_per_pod * 2,
            max_names: names * 2,
        });
        let rss0 = rss_kib();
        let now = Instant::now();
        let started = Instant::now();
        for i in 0..size.pods {
            for n in 0..size.names_per_pod {
                let answer = Answer {
                    name: dns_name(&name_for(&size.shape(), i, n))?,
                    addresses: vec![dst_ip(n)],
                    cnames: Vec::new(),
                    ttl: 3600,
                };
                table.record(PodIp(pod_ip(i)), &answer, now);
            }
        }
        let record_per_s = names as f64 / started.elapsed().as_secs_f64();
        let table_bytes_per_name = (rss_kib() - rss0) * 1024.0 / names as f64;
        Ok(Bench {
            policies,
            identities,
            table,
            policy_dir,
            record_per_s,
            table_bytes_per_name,
            names,
        })
    }

    pub fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} names recorded; every timed decision is an allow (the name matches a rule of one \
             of the ten selecting policies). As in the gateway, a pod's selection is kept from \
             its previous decision, so only each pod's first decision works it out. Every \
             other decision is timed whole with two Instant::now() reads (about 20–30 ns of \
             the figure is the clock), the others phase by phase for the phase rows.",
            self.names
        )]
    }

    /// One decision as the gateway makes it for a TLS connection to `dst`:443 with `sni`;
    /// `mark(1)` after the pod's policy selection, `mark(2)` after the name table lookup.
    fn decide(
        &self,
        src: IpAddr,
        dst: IpAddr,
        sni: &DnsName,
        mut mark: impl FnMut(usize),
    ) -> Result<bool, Error> {
        let Some(pod) = self.identities.lookup(src) else {
            return Err(Error::msg("pod not found"));
        };
        let selection = pod.select(&self.policies);
        mark(1);
        // As the gateway does: the names are copied out for the decision's log line.
        let mut resolved: Vec<DnsName> = Vec::new();
        let (pod_ip, dst_ip) = (PodIp(src), DestIp(dst));
        self.table
            .lookup_each(pod_ip, dst_ip, Instant::now(), |name, _| {
                resolved.push(name.clone())
            });
        mark(2);
        let granted = decision::effective_grants(&selection, selection.grants(dst, 443, &resolved));
        Ok(decision::authorize_tls(&granted, Some(sni), true).is_ok())
    }

    pub fn measure(&self, size: &Size) -> Result<Vec<(String, f64)>, Error> {
        let shape = size.shape();
        let hist = || {
            Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
                .map_err(|e| Error::msg(e.to_string()))
        };
        let (mut total, mut select, mut lookup, mut grants) = (hist()?, hist()?, hist()?, hist()?);
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut allowed = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..size.decisions {
            if Instant::now() > deadline {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng % size.pods as u64) as usize;
            let n = ((rng >> 32) % size.names_per_pod as u64) as usize;
            let (src, dst) = (pod_ip(i), dst_ip(n));
            // The peeker's work (the name from the ClientHello) is not the decision's.
            let sni = dns_name(&name_for(&shape, i, n))?;
            let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            // Every other decision is timed whole, the others phase by phase: the two extra
            // clock reads of a phase-timed one would otherwise count in the total.
            let ok = if total.len() <= select.len() {
                let t0 = Instant::now();
                let ok = self.decide(src, dst, &sni, |_| {})?;
                total.saturating_record(ns(t0.elapsed()));
                ok
            } else {
                let mut marks = [Instant::now(); 3];
                let ok = self.decide(src, dst, &sni, |phase| marks[phase] = Instant::now())?;
                let t3 = Instant::now();
                select.saturating_record(ns(marks[1] - marks[0]));
                lookup.saturating_record(ns(marks[2] - marks[1]));
                grants.saturating_record(ns(t3 - marks[2]));
                ok
            };
            allowed += usize::from(ok);
        }
        let decisions = total.len() + select.len();
        if allowed as u64 != decisions {
            return Err(Error::msg(format!(
                "only {allowed} of {decisions} decisions allowed: the synthetic world is wrong"
            )));
        }
        let started = Instant::now();
        let reloaded = egressgate::store::load_policy_dir(self.policy_dir.path())
            .map_err(|e| Error::msg(format!("reload: {:?}", e.first())))?;
        let reload_ms = started.elapsed().as_secs_f64() * 1000.0;
        if reloaded.len() != size.policies {
            return Err(Error::msg(format!(
                "reload found {} policies, want {}",
                reloaded.len(),
                size.policies
            )));
        }
        drop(reloaded);
        Ok(vec![
            ("decision_p50".into(), total.value_at_quantile(0.5) as f64),
            ("decision_p99".into(), total.value_at_quantile(0.99) as f64),
            (
                "decision_p999".into(),
                total.value_at_quantile(0.999) as f64,
            ),
            ("select_p99".into(), select.value_at_quantile(0.99) as f64),
            ("lookup_p99".into(), lookup.value_at_quantile(0.99) as f64),
            ("grants_p99".into(), grants.value_at_quantile(0.99) as f64),
            ("reload_ms".into(), reload_ms),
            ("record_rate".into(), self.record_per_s),
            ("table_bytes_per_name".into(), self.table_bytes_per_name),
        ])
    }
}

/// A synthetic name, by the one DNS-name rule.
fn dns_name(name: &str) -> Result<DnsName, Error> {
    DnsName::parse(name).map_err(|e| Error::msg(format!("{name}: {e}")))
}
