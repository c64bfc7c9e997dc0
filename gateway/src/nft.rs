//! The nftables table and policy routing that send pod egress to the gateway through TPROXY.
//!
//! [`render`] produces one `nft -f` script for the `inet` table named in the configuration;
//! [`install`] applies it and the routing it needs; [`uninstall`] removes both ([`remove`] also
//! says what it found: `egressgate cleanup`). The script:
//!
//! - `prerouting` (hook prerouting, priority mangle): packets from excluded pods are left alone;
//!   packets from a pod CIDR or a matching interface go to `intercept`.
//! - `intercept`: a strict reverse-path check drops spoofed sources; datagrams of an allowed
//!   UDP flow (`udp_flows_v4/6`: pod address . destination . port, with the idle timeout) pass
//!   at kernel speed and refresh it; the gateway's own ports on
//!   node addresses are refused; packets of TCP connections the gateway already holds (`socket
//!   transparent 1`) are marked and accepted; DNS (UDP and TCP port 53, to any server) goes to
//!   the DNS shim; then
//!   destinations in `bypassCidrs` and local addresses are left alone; other UDP goes to
//!   `udp_policy`; TCP to `intercept.clientFirstPorts` goes to the client-first listener
//!   (`listen.clientFirstTproxy`, handed over with its first bytes), every other TCP
//!   connection to the TPROXY listener. The TPROXY rules set
//!   the mark, so the `ip rule fwmark <mark> lookup <routeTable>` and the `local` default route
//!   in that table deliver them to the local stack.
//! - `udp_policy`: pods in `udp_unpoliced_v4/6` (no enforce policy selects them, kept current
//!   by the gateway) go to `udp_unpoliced`, which refuses UDP 443 (QUIC) when
//!   `intercept.blockQuic` is on and passes the rest, as before UDP was policed. The rest goes to
//!   the gateway's UDP relay (`udp.listen`), which decides the flow's first datagram.
//! - `udp_output` (hook output): a datagram the relay sends for an allowed flow carries
//!   `udp.flowMark`; this chain adds its flow to `udp_flows`, so the kernel, not the relay,
//!   carries the flow's next datagrams. The relay never writes the set itself: the element is
//!   added by the very datagram that opened the flow, with no `nft` process per flow.
//!
//! The gateway's other upstream traffic is never intercepted: it is generated locally and so
//! passes the `output` hook, never `prerouting`.
//!
//! Fail closed: when `tproxy` finds no listening socket the packet is not dropped but goes on,
//! unmarked, and would be forwarded to its destination. So `intercept` refuses the DNS and TCP
//! it did not hand to a listener: that covers a family (IPv4, IPv6) with no listener configured
//! and a gateway that is not running. For the same reason `run` never removes the rules: while
//! the gateway is down, intercepted connections are refused (TCP reset, ICMP port unreachable)
//! rather than bypassing policy, until `cleanup` ends interception on purpose.
//!
//! UDP fails closed the same way: what no relay took (a family without a relay, the gateway not
//! running) is refused, unless its flow was already allowed or its pod is unpoliced.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};

use ipnet::IpNet;

use crate::config::Config;

/// Applying the rules failed; the messages name the command and quote what it printed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl NftError {
    /// The host has no IPv6: disabled at boot or not built ("Address family not supported"), or
    /// turned off by sysctl `disable_ipv6` ("IPv6 is disabled on nexthop device").
    fn ipv6_unavailable(&self) -> bool {
        matches!(self, Self::Failed { stderr, .. }
            if stderr.contains("Address family not supported") || stderr.contains("IPv6 is disabled"))
    }

    /// `ip route show|flush table N` on a table the kernel never created: nothing there.
    fn route_table_missing(&self) -> bool {
        matches!(self, Self::Failed { stderr, .. } if stderr.contains("FIB table does not exist"))
    }
}

/// The complete `nft -f` script: replaces the gateway's table, if any, in one transaction.
pub fn render(config: &Config) -> String {
    let table = &config.nftables.table;
    let mark = format!("{:#010x}", config.nftables.mark);
    let intercept = &config.intercept;
    let mut out = String::new();

    // `nft -f` applies a file as one transaction. Creating the table first makes the delete valid
    // when it does not exist yet, so the load replaces any previous version and never leaves two
    // or none.
    out.push_str("# egressgate: generated from the configuration; applied as one transaction.\n");
    out.push_str(&format!(
        "table inet {table} {{}}\ndelete table inet {table}\n"
    ));
    out.push_str(&format!("table inet {table} {{\n"));

    let (pod_v4, pod_v6) = split_families(&intercept.pod_cidrs);
    let (bypass_v4, bypass_v6) = split_families(&intercept.bypass_cidrs);
    push_set(&mut out, "pod_v4", "ipv4_addr", &pod_v4);
    push_set(&mut out, "pod_v6", "ipv6_addr", &pod_v6);
    push_set(&mut out, "bypass_v4", "ipv4_addr", &bypass_v4);
    push_set(&mut out, "bypass_v6", "ipv6_addr", &bypass_v6);
    // Filled at run time from the identity source (`set_excluded`).
    push_set(&mut out, "exclude_v4", "ipv4_addr", &[]);
    push_set(&mut out, "exclude_v6", "ipv6_addr", &[]);
    // Filled at run time from identities and policies (`set_udp_unpoliced`).
    push_plain_set(&mut out, "udp_unpoliced_v4", "ipv4_addr");
    push_plain_set(&mut out, "udp_unpoliced_v6", "ipv6_addr");
    for family in [Family::V4, Family::V6] {
        push_flow_set(&mut out, family, &config.udp);
    }

    out.push_str("    chain prerouting {\n");
    out.push_str("        type filter hook prerouting priority mangle; policy accept;\n");
    out.push_str("        ip saddr @exclude_v4 return\n");
    out.push_str("        ip6 saddr @exclude_v6 return\n");
    for pattern in &intercept.interfaces {
        out.push_str(&format!(
            "        iifname \"{}\" jump intercept\n",
            pattern.as_str()
        ));
    }
    out.push_str("        ip saddr @pod_v4 jump intercept\n");
    out.push_str("        ip6 saddr @pod_v6 jump intercept\n");
    out.push_str("    }\n\n");

    out.push_str("    chain intercept {\n");
    // Strict reverse-path check: a pod may only use source addresses routed back through the
    // interface it sends from. Without it a pod could forge the trusted resolver's answers to the
    // shim's upstream sockets, or pose as another address.
    out.push_str("        fib saddr . iif oif missing drop\n");
    // Allowed UDP flows first, so their datagrams skip the FIB lookups below: only the relay
    // adds flows, and it never sees DNS, bypassed or local destinations, so none of the rules
    // in between could apply to them.
    out.push_str(
        "        # Allowed UDP flows: the kernel carries them, each datagram refreshing the timeout.\n",
    );
    for family in [Family::V4, Family::V6] {
        let key = family.flow_key();
        let set = family.flow_set();
        out.push_str(&format!(
            "        {key} @{set} update @{set} {{ {key} }} accept\n"
        ));
    }
    // The gateway's own ports on node addresses are not for pods: a connection to the TPROXY
    // listener itself would be relayed to itself, again and again. Before the socket rule, which
    // would match the (transparent) listener. The port first: every packet of every intercepted
    // flow passes here, and only those to these ports need the FIB lookup.
    let own_ports = own_ports(config);
    out.push_str(&format!(
        "        tcp dport {{ {own_ports} }} fib daddr type local reject with tcp reset\n"
    ));
    out.push_str(&format!(
        "        udp dport {{ {own_ports} }} fib daddr type local reject\n"
    ));
    // TCP only: for UDP the lookup would also find the short-lived transparent socket the DNS
    // shim binds to the server's address to send a reply, and a query arriving meanwhile (glibc
    // sends A and AAAA back to back) would be delivered to it instead of the shim.
    out.push_str("        # Packets of connections the gateway already holds: deliver locally.\n");
    out.push_str(&format!(
        "        meta l4proto tcp socket transparent 1 meta mark set {mark} accept\n"
    ));
    for family in [Family::V4, Family::V6] {
        let nfproto = family.nfproto();
        match family.target(&config.listen.dns) {
            Some(to) => {
                for l4 in ["udp", "tcp"] {
                    out.push_str(&format!(
                        "        meta nfproto {nfproto} {l4} dport 53 tproxy {} to {to} meta mark set {mark} accept\n",
                        family.tproxy()
                    ));
                }
            }
            None => out.push_str(&format!(
                "        # No {} DNS listener: its DNS is refused below.\n",
                family.name()
            )),
        }
    }
    // DNS is taken before the bypass: the cluster DNS service lives in a bypassed service range,
    // and a pod's DNS must reach the shim whatever server it addressed.
    out.push_str("        udp dport 53 reject\n");
    out.push_str("        tcp dport 53 reject with tcp reset\n");
    out.push_str("        ip daddr @bypass_v4 return\n");
    out.push_str("        ip6 daddr @bypass_v6 return\n");
    out.push_str("        fib daddr type local return\n");
    out.push_str("        meta l4proto udp goto udp_policy\n");
    let client_first = port_list(&config.intercept.client_first_ports);
    for family in [Family::V4, Family::V6] {
        let nfproto = family.nfproto();
        let target = family.target(&config.listen.client_first_tproxy());
        if let (Some(to), false) = (target, client_first.is_empty()) {
            out.push_str(&format!(
                "        meta nfproto {nfproto} tcp dport {{ {client_first} }} tproxy {} to {to} meta mark set {mark} accept\n",
                family.tproxy()
            ));
        }
        match family.target(&config.listen.tproxy) {
            Some(to) => out.push_str(&format!(
                "        meta nfproto {nfproto} meta l4proto tcp tproxy {} to {to} meta mark set {mark} accept\n",
                family.tproxy()
            )),
            None => out.push_str(&format!(
                "        # No {} TPROXY listener: its TCP is refused below.\n",
                family.name()
            )),
        }
    }
    // `tproxy` finding no listening socket does not drop: the packet goes on unmarked and would
    // be forwarded to its destination, bypassing policy whenever the gateway is down.
    out.push_str(
        "        # Only what no listener took gets here (gateway down, family without a listener):\n",
    );
    out.push_str("        # refuse it rather than let it bypass policy.\n");
    out.push_str("        meta l4proto tcp reject with tcp reset\n");
    out.push_str("    }\n");
    push_udp_chains(&mut out, config);
    out.push_str("}\n");
    out
}

/// `udp_policy`, `udp_unpoliced` and `udp_output` (see the module docs).
fn push_udp_chains(out: &mut String, config: &Config) {
    let mark = format!("{:#010x}", config.nftables.mark);
    let flow_mark = format!("{:#010x}", config.udp.flow_mark);
    out.push_str("\n    chain udp_policy {\n");
    out.push_str("        ip saddr @udp_unpoliced_v4 goto udp_unpoliced\n");
    out.push_str("        ip6 saddr @udp_unpoliced_v6 goto udp_unpoliced\n");
    for family in [Family::V4, Family::V6] {
        let nfproto = family.nfproto();
        match family.target(&config.udp.listen) {
            Some(to) => out.push_str(&format!(
                "        meta nfproto {nfproto} meta l4proto udp tproxy {} to {to} meta mark set {mark} accept\n",
                family.tproxy()
            )),
            None => out.push_str(&format!(
                "        # No {} UDP relay: its undecided UDP is refused below.\n",
                family.name()
            )),
        }
    }
    out.push_str("        # Only what no relay took gets here: refuse it rather than let it bypass policy.\n");
    out.push_str("        reject\n");
    out.push_str("    }\n\n");

    out.push_str("    chain udp_unpoliced {\n");
    if config.intercept.block_quic {
        // QUIC is not inspected: refusing it makes clients fall back to TCP, where policy applies.
        out.push_str("        udp dport 443 reject\n");
    }
    out.push_str("        accept\n");
    out.push_str("    }\n\n");

    out.push_str("    chain udp_output {\n");
    out.push_str("        type filter hook output priority mangle; policy accept;\n");
    for family in [Family::V4, Family::V6] {
        let key = family.flow_key();
        out.push_str(&format!(
            "        meta mark {flow_mark} update @{} {{ {key} }}\n",
            family.flow_set()
        ));
    }
    out.push_str("    }\n");
}

/// Applies [`render`]'s script and the policy routing for marked packets; safe to repeat.
///
/// Whether to call it at all is the caller's choice (`nftables.manage`).
pub(crate) fn install(config: &Config) -> Result<(), NftError> {
    install_in(config, None)
}

/// [`install`], with every command run inside network namespace `netns` when given (tests).
fn install_in(config: &Config, netns: Option<&str>) -> Result<(), NftError> {
    let runner = Runner { netns };
    let mark = format!("{:#x}", config.nftables.mark);
    let table = config.nftables.route_table.to_string();

    // Routing first: once the nft table marks packets, they must already be delivered locally.
    route_marked_locally(&runner, Family::V4, &mark, &table)?;
    match route_marked_locally(&runner, Family::V6, &mark, &table) {
        Ok(()) => {}
        Err(err) if err.ipv6_unavailable() => {
            tracing::warn!(error = %err, "IPv6 unavailable; IPv6 traffic is not intercepted");
        }
        Err(err) => return Err(err),
    }
    runner.run(&["nft", "-f", "-"], Some(&render(config)))?;
    Ok(())
}

/// Replaces the addresses of `intercept.excludePods` in the running table, in one transaction.
pub(crate) fn set_excluded(config: &Config, addrs: &[std::net::IpAddr]) -> Result<(), NftError> {
    set_excluded_in(config, addrs, None)
}

fn set_excluded_in(
    config: &Config,
    addrs: &[std::net::IpAddr],
    netns: Option<&str>,
) -> Result<(), NftError> {
    let table = &config.nftables.table;
    let mut script = String::new();
    replace_address_sets(&mut script, table, ["exclude_v4", "exclude_v6"], addrs);
    Runner { netns }.run(&["nft", "-f", "-"], Some(&script))?;
    Ok(())
}

/// Appends to `script` the commands that make the IPv4 and IPv6 address sets `sets` hold exactly
/// `addrs` (each family in its set).
fn replace_address_sets(
    script: &mut String,
    table: &str,
    sets: [&str; 2],
    addrs: &[std::net::IpAddr],
) {
    for (set, v6) in sets.into_iter().zip([false, true]) {
        script.push_str(&format!("flush set inet {table} {set}\n"));
        let family: Vec<String> = addrs
            .iter()
            .filter(|addr| addr.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if !family.is_empty() {
            script.push_str(&format!(
                "add element inet {table} {set} {{ {} }}\n",
                family.join(", ")
            ));
        }
    }
}

/// What [`remove`] found and removed. All zero when there was nothing to remove, which is
/// still a success: `cleanup` after `cleanup`, or on a node where `run` never installed anything.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// The nftables table existed and was deleted.
    pub table: bool,
    /// `ip rule fwmark MARK lookup TABLE` rules deleted, both families.
    pub rules: usize,
    /// Route tables (one per family) that held routes and were flushed.
    pub route_tables: usize,
}

impl Removed {
    pub fn nothing(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nothing() {
            return f.write_str("nothing to remove");
        }
        write!(
            f,
            "removed: table {}, {} ip rule(s), {} route table(s) flushed",
            if self.table { "deleted" } else { "absent" },
            self.rules,
            self.route_tables
        )
    }
}

/// Removes the table and the policy routing `install` added; safe to repeat, and a success when
/// there is nothing to remove. Run it only when egress interception should end: while the rules
/// stay, intercepted connections are refused when no gateway runs.
pub fn uninstall(config: &Config) -> Result<(), NftError> {
    remove(config).map(drop)
}

/// [`uninstall`], saying what it found (`egressgate cleanup` prints it).
pub fn remove(config: &Config) -> Result<Removed, NftError> {
    uninstall_in(config, None)
}

fn uninstall_in(config: &Config, netns: Option<&str>) -> Result<Removed, NftError> {
    let runner = Runner { netns };
    let mut removed = Removed::default();
    let table = &config.nftables.table;
    let listed = runner.run(&["nft", "list", "tables"], None)?;
    removed.table = listed
        .lines()
        .any(|line| line.trim() == format!("table inet {table}"));
    // Creating it first makes the delete valid when it is already gone (or went meanwhile).
    let script = format!("table inet {table} {{}}\ndelete table inet {table}\n");
    runner.run(&["nft", "-f", "-"], Some(&script))?;
    let mark = format!("{:#x}", config.nftables.mark);
    let route_table = config.nftables.route_table.to_string();
    for family in [Family::V4, Family::V6] {
        match remove_routing(&runner, family, &mark, &route_table) {
            Ok((rules, flushed)) => {
                removed.rules += rules;
                removed.route_tables += usize::from(flushed);
            }
            Err(err) if matches!(family, Family::V6) && err.ipv6_unavailable() => {}
            Err(err) => return Err(err),
        }
    }
    Ok(removed)
}

/// Deletes every `fwmark MARK lookup TABLE` rule of `family` and flushes TABLE if it holds
/// routes; returns how many rules went and whether the table was flushed. A route table the
/// kernel never created ("FIB table does not exist") has nothing to flush.
fn remove_routing(
    runner: &Runner<'_>,
    family: Family,
    mark: &str,
    table: &str,
) -> Result<(usize, bool), NftError> {
    let flag = family.ip_flag();
    let rule = ["fwmark", mark, "lookup", table];
    let shown = runner.run(&[&["ip", flag, "rule", "show"][..], &rule].concat(), None)?;
    let rules = shown.lines().filter(|line| !line.trim().is_empty()).count();
    for _ in 0..rules {
        runner.run(&[&["ip", flag, "rule", "del"][..], &rule].concat(), None)?;
    }
    let routes = match runner.run(&["ip", flag, "route", "show", "table", table], None) {
        Ok(routes) => routes,
        Err(err) if err.route_table_missing() => String::new(),
        Err(err) => return Err(err),
    };
    if routes.trim().is_empty() {
        return Ok((rules, false));
    }
    runner.run(&["ip", flag, "route", "flush", "table", table], None)?;
    Ok((rules, true))
}

/// `ip rule fwmark MARK lookup TABLE` exactly once, and a `local` default route in TABLE.
fn route_marked_locally(
    runner: &Runner<'_>,
    family: Family,
    mark: &str,
    table: &str,
) -> Result<(), NftError> {
    let flag = family.ip_flag();
    runner.run(
        &[
            "ip",
            flag,
            "route",
            "replace",
            "local",
            family.default_route(),
            "dev",
            "lo",
            "table",
            table,
        ],
        None,
    )?;
    // Rules have no `replace`, and `add` happily duplicates them: count, then add or trim to one.
    let rule = ["fwmark", mark, "lookup", table];
    let shown = runner.run(&[&["ip", flag, "rule", "show"][..], &rule].concat(), None)?;
    let count = shown.lines().filter(|line| !line.trim().is_empty()).count();
    if count == 0 {
        runner.run(&[&["ip", flag, "rule", "add"][..], &rule].concat(), None)?;
    }
    for _ in 1..count {
        runner.run(&[&["ip", flag, "rule", "del"][..], &rule].concat(), None)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    fn nfproto(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// The family keyword of nft's `tproxy <family> to`.
    fn tproxy(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }

    /// The `udp_flows` set of this family.
    fn flow_set(self) -> &'static str {
        match self {
            Self::V4 => "udp_flows_v4",
            Self::V6 => "udp_flows_v6",
        }
    }

    /// A datagram's flow: pod address . destination . port.
    fn flow_key(self) -> &'static str {
        match self {
            Self::V4 => "ip saddr . ip daddr . udp dport",
            Self::V6 => "ip6 saddr . ip6 daddr . udp dport",
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Self::V4 => "0.0.0.0/0",
            Self::V6 => "::/0",
        }
    }

    /// The `tproxy ... to` operand for this family's first listener: `:port` for a wildcard
    /// listener (TPROXY then keeps the packet's own destination address), else `addr:port`.
    fn target(self, listeners: &[SocketAddr]) -> Option<String> {
        let addr = listeners
            .iter()
            .find(|addr| addr.is_ipv6() == matches!(self, Self::V6))?;
        Some(if addr.ip().is_unspecified() {
            format!(":{}", addr.port())
        } else {
            addr.to_string()
        })
    }
}

/// Every port the gateway listens on, for the rule that keeps pods off them.
fn own_ports(config: &Config) -> String {
    let ports: Vec<u16> = config
        .listen
        .tproxy
        .iter()
        .chain(&config.listen.client_first_tproxy())
        .chain(&config.listen.dns)
        .chain(&config.udp.listen)
        .chain(std::iter::once(&config.listen.admin))
        .map(SocketAddr::port)
        .collect();
    port_list(&ports)
}

/// `ports` sorted, once each, as the elements of an anonymous nft set.
fn port_list(ports: &[u16]) -> String {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    ports.join(", ")
}

/// Merges overlapping ranges and clears host bits (nft rejects both in an interval set), then
/// splits by family.
fn split_families(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    IpNet::aggregate(&nets.to_vec())
        .into_iter()
        .partition(|net| matches!(net, IpNet::V4(_)))
}

fn push_set(out: &mut String, name: &str, kind: &str, elements: &[IpNet]) {
    out.push_str(&format!(
        "    set {name} {{\n        type {kind}\n        flags interval\n"
    ));
    // nft rejects `elements = { }`; an empty set simply has no elements line.
    if !elements.is_empty() {
        let list: Vec<String> = elements.iter().map(IpNet::to_string).collect();
        out.push_str(&format!("        elements = {{ {} }}\n", list.join(", ")));
    }
    out.push_str("    }\n\n");
}

/// A set of single addresses, filled at run time.
fn push_plain_set(out: &mut String, name: &str, kind: &str) {
    out.push_str(&format!(
        "    set {name} {{\n        type {kind}\n    }}\n\n"
    ));
}

/// `udp_flows_v4/6`: allowed flows, added from the packet path (`udp_output`), forgotten after
/// `udp.flowIdleSeconds` without a datagram, at most `udp.maxFlows` (then new flows stay with
/// the relay).
fn push_flow_set(out: &mut String, family: Family, udp: &crate::config::Udp) {
    let address = match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    };
    out.push_str(&format!(
        "    set {} {{\n        type {address} . {address} . inet_service\n        flags dynamic,timeout\n        timeout {}s\n        size {}\n    }}\n\n",
        family.flow_set(),
        udp.flow_idle_seconds,
        udp.max_flows
    ));
}

/// Replaces the addresses of pods no enforce policy selects (their UDP is not policed), and
/// with `forget_flows` empties `udp_flows` too (policies changed: flows are decided again);
/// one transaction.
pub(crate) fn set_udp_unpoliced(
    config: &Config,
    addrs: &[std::net::IpAddr],
    forget_flows: bool,
) -> Result<(), NftError> {
    set_udp_unpoliced_in(config, addrs, forget_flows, None)
}

fn set_udp_unpoliced_in(
    config: &Config,
    addrs: &[std::net::IpAddr],
    forget_flows: bool,
    netns: Option<&str>,
) -> Result<(), NftError> {
    let table = &config.nftables.table;
    let mut script = String::new();
    replace_address_sets(
        &mut script,
        table,
        ["udp_unpoliced_v4", "udp_unpoliced_v6"],
        addrs,
    );
    if forget_flows {
        for family in [Family::V4, Family::V6] {
            script.push_str(&format!("flush set inet {table} {}\n", family.flow_set()));
        }
    }
    Runner { netns }.run(&["nft", "-f", "-"], Some(&script))?;
    Ok(())
}

/// Runs commands, optionally inside a network namespace via `ip netns exec`.
#[derive(Debug)]
struct Runner<'a> {
    netns: Option<&'a str>,
}

impl Runner<'_> {
    /// Runs `argv` with `stdin` as its input and returns its stdout; a non-zero exit is an error.
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let mut full: Vec<&str> = Vec::new();
        if let Some(netns) = self.netns {
            full.extend(["ip", "netns", "exec", netns]);
        }
        full.extend_from_slice(argv);
        let command = full.join(" ");
        let spawn_error = |source| NftError::Spawn {
            command: command.clone(),
            source,
        };
        let Some((program, args)) = full.split_first() else {
            return Ok(String::new());
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads the whole script before printing anything, so this cannot deadlock; the
            // pipe closes when dropped, ending nft's input.
            pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(NftError::Failed {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("policyDir: /p\nidentity: {{staticFile: /i}}\n{extra}");
        Config::parse("c.yaml", &text).expect("valid config")
    }

    const FULL: &str = "intercept:\n  podCidrs: [198.18.1.0/24, \"fd00:1::/64\"]\n  interfaces: [\"egp*\", veth0]\n  bypassCidrs: [10.96.0.0/12, \"fd00:96::/108\"]\n";

    #[test]
    fn script_replaces_the_table_in_one_load() {
        let script = render(&config(FULL));
        let body = script
            .lines()
            .filter(|line| !line.starts_with('#'))
            .collect::<Vec<_>>();
        assert_eq!(
            body.get(..3).expect("three lines"),
            [
                "table inet egressgate {}",
                "delete table inet egressgate",
                "table inet egressgate {"
            ]
        );
        assert_eq!(script.matches("delete table").count(), 1);
    }

    #[test]
    fn sets_hold_the_configured_ranges_by_family() {
        let script = render(&config(FULL));
        for (name, kind, elements) in [
            ("pod_v4", "ipv4_addr", "198.18.1.0/24"),
            ("pod_v6", "ipv6_addr", "fd00:1::/64"),
            ("bypass_v4", "ipv4_addr", "10.96.0.0/12"),
            ("bypass_v6", "ipv6_addr", "fd00:96::/108"),
        ] {
            let set = format!(
                "    set {name} {{\n        type {kind}\n        flags interval\n        elements = {{ {elements} }}\n    }}\n"
            );
            assert!(script.contains(&set), "{set}\nnot in\n{script}");
        }
    }

    #[test]
    fn empty_sets_are_still_defined_without_elements() {
        let script = render(&config("intercept: {interfaces: [\"egp*\"]}\n"));
        for name in ["pod_v4", "pod_v6", "bypass_v4", "bypass_v6"] {
            assert!(script.contains(&format!("    set {name} {{\n")), "{script}");
        }
        assert!(!script.contains("elements"), "{script}");
        // The rules referring to them are uniform whatever is configured.
        assert!(script.contains("        ip saddr @pod_v4 jump intercept\n"));
        assert!(script.contains("        ip6 daddr @bypass_v6 return\n"));
    }

    #[test]
    fn overlapping_ranges_and_host_bits_are_merged() {
        let script = render(&config(
            "intercept: {podCidrs: [10.1.0.0/16, 10.0.0.0/8, 10.2.3.4/24, 192.168.7.9/24]}\n",
        ));
        assert!(
            script.contains("elements = { 10.0.0.0/8, 192.168.7.0/24 }"),
            "{script}"
        );
    }

    /// The non-comment rule lines of `chain`, in order.
    fn chain_rules<'a>(script: &'a str, chain: &str) -> Vec<&'a str> {
        script
            .lines()
            .skip_while(|line| !line.contains(&format!("chain {chain} {{")))
            .skip(1)
            .take_while(|line| line.trim() != "}")
            .map(str::trim)
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .collect()
    }

    #[test]
    fn prerouting_skips_excluded_pods_and_jumps_for_pods() {
        let script = render(&config(FULL));
        let expected = [
            "type filter hook prerouting priority mangle; policy accept;",
            "ip saddr @exclude_v4 return",
            "ip6 saddr @exclude_v6 return",
            "iifname \"egp*\" jump intercept",
            "iifname \"veth0\" jump intercept",
            "ip saddr @pod_v4 jump intercept",
            "ip6 saddr @pod_v6 jump intercept",
        ];
        assert_eq!(chain_rules(&script, "prerouting"), expected);
    }

    #[test]
    fn intercept_takes_dns_before_the_bypass_and_refuses_what_no_listener_took() {
        let script = render(&config(FULL));
        let rules = chain_rules(&script, "intercept");
        let position = |needle: &str| {
            rules
                .iter()
                .position(|rule| rule.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {rules:#?}"))
        };
        assert!(position("udp dport 53 tproxy") < position("udp dport 53 reject"));
        assert!(position("udp dport 53 reject") < position("@bypass_v4 return"));
        assert!(position("tcp dport 53 tproxy ip6") < position("@bypass_v6 return"));
        assert!(position("fib daddr type local return") < position("l4proto tcp tproxy"));
        assert_eq!(
            rules.last(),
            Some(&"meta l4proto tcp reject with tcp reset")
        );
        assert!(position("fib daddr type local return") < position("goto udp_policy"));
        assert!(position("fib daddr type local return") < position("tcp dport { 80, 443"));
        assert!(
            !rules.iter().any(|rule| rule.contains("udp dport 443")),
            "{rules:#?}"
        );
        assert_eq!(script.matches("reject").count(), 7, "{script}");
        assert_eq!(rules.first(), Some(&"fib saddr . iif oif missing drop"));
        assert_eq!(
            rules[1..3],
            [
                "ip saddr . ip daddr . udp dport @udp_flows_v4 update @udp_flows_v4 { ip saddr . ip daddr . udp dport } accept",
                "ip6 saddr . ip6 daddr . udp dport @udp_flows_v6 update @udp_flows_v6 { ip6 saddr . ip6 daddr . udp dport } accept",
            ]
        );
        assert!(position("reject with tcp reset") < position("socket transparent 1"));
        assert!(position("socket transparent 1") < position("udp dport 53 tproxy"));
        assert!(
            position("tcp dport { 15001, 15002, 15053, 15054, 15090 } fib daddr type local reject")
                < position("fib daddr type local return")
        );
        assert!(position("tcp dport 53 tproxy ip6") < position("tcp dport 53 reject"));
        assert!(position("tcp dport 53 reject") < position("@bypass_v4 return"));
        let open = render(&config(&format!("{FULL}  blockQuic: false\n")));
        assert!(!open.contains("udp dport 443"), "{open}");
    }

    #[test]
    fn udp_of_enforced_pods_passes_only_as_an_allowed_flow_or_through_the_relay() {
        let script = render(&config(FULL));
        assert_eq!(
            chain_rules(&script, "udp_policy"),
            [
                "ip saddr @udp_unpoliced_v4 goto udp_unpoliced",
                "ip6 saddr @udp_unpoliced_v6 goto udp_unpoliced",
                "meta nfproto ipv4 meta l4proto udp tproxy ip to :15054 meta mark set 0x00006567 accept",
                "meta nfproto ipv6 meta l4proto udp tproxy ip6 to :15054 meta mark set 0x00006567 accept",
                "reject",
            ]
        );
        // Pods under no enforce policy: as before UDP was policed.
        assert_eq!(
            chain_rules(&script, "udp_unpoliced"),
            ["udp dport 443 reject", "accept"]
        );
        assert_eq!(
            chain_rules(&script, "udp_output"),
            [
                "type filter hook output priority mangle; policy accept;",
                "meta mark 0x00006568 update @udp_flows_v4 { ip saddr . ip daddr . udp dport }",
                "meta mark 0x00006568 update @udp_flows_v6 { ip6 saddr . ip6 daddr . udp dport }",
            ]
        );
        assert!(
            script.contains("    set udp_flows_v6 {\n        type ipv6_addr . ipv6_addr . inet_service\n        flags dynamic,timeout\n        timeout 60s\n        size 65536\n    }\n"),
            "{script}"
        );
        assert!(script.contains(
            "tcp dport { 15001, 15002, 15053, 15054, 15090 } fib daddr type local reject"
        ));
        let open = render(&config(&format!("{FULL}  blockQuic: false\n")));
        assert_eq!(chain_rules(&open, "udp_unpoliced"), ["accept"]);
        let v4 = render(&config(
            "udp: {listen: [\"0.0.0.0:7054\"], flowIdleSeconds: 5, flowMark: 0x99}\nintercept: {interfaces: [\"egp*\"]}\n",
        ));
        assert!(v4.contains("# No IPv6 UDP relay"), "{v4}");
        assert!(v4.contains("tproxy ip to :7054 "), "{v4}");
        assert!(v4.contains("timeout 5s"), "{v4}");
        assert!(v4.contains("meta mark 0x00000099 update"), "{v4}");
    }

    #[test]
    fn intercept_sends_dns_and_tcp_to_the_default_listeners() {
        let script = render(&config(FULL));
        for rule in [
            "meta nfproto ipv4 udp dport 53 tproxy ip to :15053 meta mark set 0x00006567 accept",
            "meta nfproto ipv4 tcp dport 53 tproxy ip to :15053 meta mark set 0x00006567 accept",
            "meta nfproto ipv6 udp dport 53 tproxy ip6 to :15053 meta mark set 0x00006567 accept",
            "meta nfproto ipv6 tcp dport 53 tproxy ip6 to :15053 meta mark set 0x00006567 accept",
            "meta nfproto ipv4 meta l4proto tcp tproxy ip to :15001 meta mark set 0x00006567 accept",
            "meta nfproto ipv6 meta l4proto tcp tproxy ip6 to :15001 meta mark set 0x00006567 accept",
        ] {
            assert!(script.contains(&format!("        {rule}\n")), "{rule}\n{script}");
        }
    }

    #[test]
    fn client_first_ports_go_to_their_own_listener_before_the_rest() {
        let script = render(&config(FULL));
        let position = |rule: &str| {
            let line = format!("        {rule}\n");
            script
                .find(&line)
                .unwrap_or_else(|| panic!("{rule}\n{script}"))
        };
        for (family, tproxy) in [("ipv4", "ip"), ("ipv6", "ip6")] {
            let client_first = position(&format!(
                "meta nfproto {family} tcp dport {{ 80, 443, 5432, 8080, 8443 }} tproxy {tproxy} to :15002 meta mark set 0x00006567 accept"
            ));
            let rest = position(&format!(
                "meta nfproto {family} meta l4proto tcp tproxy {tproxy} to :15001 meta mark set 0x00006567 accept"
            ));
            assert!(client_first < rest, "{script}");
        }

        let none = render(&config(
            "intercept: {interfaces: [\"egp*\"], clientFirstPorts: []}\n",
        ));
        assert!(!none.contains("to :15002"), "{none}");
        let no_listener = render(&config(
            "listen: {clientFirstTproxy: []}\nintercept: {interfaces: [\"egp*\"]}\n",
        ));
        assert!(!no_listener.contains("to :15002"), "{no_listener}");
        assert!(no_listener.contains("tcp dport { 15001, 15053, 15054, 15090 } fib daddr"));
    }

    #[test]
    fn specific_addresses_ports_table_and_mark_are_used() {
        let script = render(&config(
            "listen:\n  tproxy: [\"127.0.0.1:7001\", \"0.0.0.0:7002\", \"[::1]:7003\"]\n  dns: [\"[::]:7053\", \"127.0.0.53:7054\"]\nintercept: {interfaces: [\"egp*\"]}\nnftables: {table: gw2, mark: 0x10}\n",
        ));
        assert!(script.contains("table inet gw2 {\n"), "{script}");
        assert!(script.contains("tproxy ip to 127.0.0.1:7001 meta mark set 0x00000010 accept"));
        assert!(script.contains("tproxy ip6 to [::1]:7003 meta mark set 0x00000010 accept"));
        assert!(script.contains("udp dport 53 tproxy ip to 127.0.0.53:7054 "));
        assert!(script.contains("tcp dport 53 tproxy ip6 to :7053 "));
        assert!(
            !script.contains(":7002"),
            "only the first listener of a family"
        );
    }

    #[test]
    fn a_family_without_listeners_is_refused() {
        let script = render(&config(
            "listen:\n  tproxy: [\"0.0.0.0:15001\"]\n  dns: [\"[::]:15053\"]\nintercept: {interfaces: [\"egp*\"]}\n",
        ));
        // No TPROXY rule for a family without a listener: the closing rules refuse it.
        assert!(script.contains("# No IPv4 DNS listener"), "{script}");
        assert!(script.contains("# No IPv6 TPROXY listener"), "{script}");
        assert!(script.contains("        meta l4proto tcp reject with tcp reset\n    }\n"));
        assert!(script.contains("tproxy ip to :15001 "));
        assert!(script.contains("udp dport 53 tproxy ip6 to :15053 "));
        assert!(!script.contains("tproxy ip6 to :15001"), "{script}");
        assert!(!script.contains("tproxy ip to :15053"), "{script}");
    }

    /// A network namespace of its own, deleted on drop (also when the test panics).
    struct Netns(String);

    impl Netns {
        fn create() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            assert!(
                is_root(),
                "the nftables tests create network namespaces: run them as root"
            );
            let name = format!(
                "egt-nft-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            Runner { netns: None }
                .run(&["ip", "netns", "add", &name], None)
                .expect("ip netns add");
            let netns = Self(name);
            netns.run(&["ip", "link", "set", "lo", "up"]);
            netns
        }

        fn run(&self, argv: &[&str]) -> String {
            Runner {
                netns: Some(&self.0),
            }
            .run(argv, None)
            .unwrap_or_else(|err| panic!("{err}"))
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn is_root() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        // `Uid:` real, effective, saved, filesystem.
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    }

    fn count_lines(text: &str, needle: &str) -> usize {
        text.lines().filter(|line| line.contains(needle)).count()
    }

    #[test]
    fn install_twice_leaves_one_table_one_rule_and_the_local_route() {
        let netns = Netns::create();
        let config = config(FULL);
        install_in(&config, Some(&netns.0)).expect("first install");
        install_in(&config, Some(&netns.0)).expect("second install");

        let tables = netns.run(&["nft", "list", "tables"]);
        assert_eq!(count_lines(&tables, "table inet egressgate"), 1, "{tables}");
        let listed = netns.run(&["nft", "list", "table", "inet", "egressgate"]);
        for rule in [
            "socket transparent 1 meta mark set 0x00006567 accept",
            "iifname \"egp*\" jump intercept",
            "udp dport 53 tproxy ip to :15053 meta mark set 0x00006567 accept",
            "udp dport 53 tproxy ip6 to :15053 meta mark set 0x00006567 accept",
            "meta l4proto tcp tproxy ip to :15001 meta mark set 0x00006567 accept",
            "meta l4proto tcp tproxy ip6 to :15001 meta mark set 0x00006567 accept",
            "elements = { 198.18.1.0/24 }",
        ] {
            assert_eq!(count_lines(&listed, rule), 1, "{rule}\n{listed}");
        }

        for flag in ["-4", "-6"] {
            let rules = netns.run(&["ip", flag, "rule", "show"]);
            assert_eq!(
                count_lines(&rules, "fwmark 0x6567 lookup 25447"),
                1,
                "{rules}"
            );
            let routes = netns.run(&[
                "ip", flag, "route", "show", "table", "25447", "type", "local",
            ]);
            assert!(routes.starts_with("local default dev lo"), "{routes}");
        }
    }

    #[test]
    fn unpoliced_pods_are_replaced_and_flows_forgotten_in_the_running_table() {
        let netns = Netns::create();
        let config = config(FULL);
        install_in(&config, Some(&netns.0)).expect("install");
        let table = |args: &[&str]| netns.run(&[&["nft"][..], args].concat());
        table(&[
            "add",
            "element",
            "inet",
            "egressgate",
            "udp_flows_v4",
            "{ 198.18.1.2 . 198.18.2.10 . 51820 }",
        ]);
        let pods: Vec<std::net::IpAddr> = ["198.18.1.2", "fd00:1::2"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        set_udp_unpoliced_in(&config, &pods, false, Some(&netns.0)).expect("set");
        let listed = table(&["list", "table", "inet", "egressgate"]);
        assert!(listed.contains("elements = { 198.18.1.2 }"), "{listed}");
        assert!(listed.contains("elements = { fd00:1::2 }"), "{listed}");
        assert!(
            listed.contains("198.18.1.2 . 198.18.2.10 . 51820"),
            "{listed}"
        );
        set_udp_unpoliced_in(&config, &[], true, Some(&netns.0)).expect("forget");
        let listed = table(&["list", "table", "inet", "egressgate"]);
        assert!(!listed.contains("198.18.1.2"), "{listed}");
        assert!(!listed.contains("fd00:1::2"), "{listed}");
    }

    #[test]
    fn excluded_pods_are_replaced_in_the_running_table() {
        let netns = Netns::create();
        let config = config(FULL);
        install_in(&config, Some(&netns.0)).expect("install");
        let first: Vec<std::net::IpAddr> = ["10.244.1.5", "fd00:10::5"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        set_excluded_in(&config, &first, Some(&netns.0)).expect("set");
        let listed = netns.run(&["nft", "list", "table", "inet", "egressgate"]);
        assert!(listed.contains("elements = { 10.244.1.5 }"), "{listed}");
        assert!(listed.contains("elements = { fd00:10::5 }"), "{listed}");
        set_excluded_in(
            &config,
            &["10.244.1.9".parse().expect("ip")],
            Some(&netns.0),
        )
        .expect("replace");
        let listed = netns.run(&["nft", "list", "table", "inet", "egressgate"]);
        assert!(listed.contains("elements = { 10.244.1.9 }"), "{listed}");
        assert!(
            !listed.contains("10.244.1.5") && !listed.contains("fd00:10::5"),
            "{listed}"
        );
    }

    #[test]
    fn uninstall_removes_everything_install_added_and_repeats_safely() {
        let netns = Netns::create();
        let config = config(FULL);
        install_in(&config, Some(&netns.0)).expect("install");
        let removed = uninstall_in(&config, Some(&netns.0)).expect("uninstall");
        assert_eq!(
            removed,
            Removed {
                table: true,
                rules: 2,
                route_tables: 2
            }
        );
        let again = uninstall_in(&config, Some(&netns.0)).expect("uninstall again");
        assert!(again.nothing(), "{again:?}");
        let tables = netns.run(&["nft", "list", "tables"]);
        assert_eq!(count_lines(&tables, "egressgate"), 0, "{tables}");
        for flag in ["-4", "-6"] {
            let rules = netns.run(&["ip", flag, "rule", "show"]);
            assert_eq!(count_lines(&rules, "0x6567"), 0, "{rules}");
            let routes = netns.run(&["ip", flag, "route", "show", "table", "25447"]);
            assert!(routes.trim().is_empty(), "{routes}");
        }
    }

    #[test]
    fn uninstall_where_nothing_was_installed_succeeds_and_removes_nothing() {
        // A fresh namespace: no table, no rule, and route table 25447 was never created (`ip
        // route show|flush table` then fail with "FIB table does not exist").
        let netns = Netns::create();
        let removed = uninstall_in(&config(FULL), Some(&netns.0)).expect("nothing to remove");
        assert!(removed.nothing(), "{removed:?}");
        assert_eq!(removed.to_string(), "nothing to remove");
    }

    #[test]
    fn reinstall_replaces_the_table_and_trims_duplicate_rules() {
        let netns = Netns::create();
        install_in(&config(FULL), Some(&netns.0)).expect("install");
        // Someone (an older version, an operator) added the rule again.
        netns.run(&["ip", "rule", "add", "fwmark", "0x6567", "lookup", "25447"]);

        let v4_only = config(
            "listen:\n  tproxy: [\"0.0.0.0:15001\"]\n  dns: [\"0.0.0.0:15053\"]\nudp: {listen: [\"0.0.0.0:15054\"]}\nintercept: {interfaces: [\"egp*\"]}\n",
        );
        install_in(&v4_only, Some(&netns.0)).expect("reinstall");

        let listed = netns.run(&["nft", "list", "table", "inet", "egressgate"]);
        assert!(!listed.contains("tproxy ip6"), "{listed}");
        assert!(!listed.contains("198.18.1.0/24"), "{listed}");
        assert!(
            listed.contains("meta l4proto tcp reject with tcp reset"),
            "{listed}"
        );
        assert!(listed.contains("udp dport 53 reject"), "{listed}");
        let rules = netns.run(&["ip", "rule", "show"]);
        assert_eq!(
            count_lines(&rules, "fwmark 0x6567 lookup 25447"),
            1,
            "{rules}"
        );
    }

    #[test]
    fn without_ipv6_only_ipv4_is_routed() {
        let netns = Netns::create();
        netns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        netns.run(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
        install_in(&config(FULL), Some(&netns.0)).expect("install without IPv6");

        let rules = netns.run(&["ip", "rule", "show"]);
        assert_eq!(
            count_lines(&rules, "fwmark 0x6567 lookup 25447"),
            1,
            "{rules}"
        );
        let tables = netns.run(&["nft", "list", "tables"]);
        assert_eq!(count_lines(&tables, "table inet egressgate"), 1, "{tables}");
    }

    #[test]
    fn a_failing_command_is_reported_with_its_stderr() {
        let netns = Netns::create();
        let mut config = config(FULL);
        config.nftables.table = "bad name".to_owned();
        let err = install_in(&config, Some(&netns.0)).expect_err("invalid table name");
        let shown = err.to_string();
        assert!(shown.contains("nft -f -"), "{shown}");
        assert!(shown.contains("syntax error"), "{shown}");
    }
}
