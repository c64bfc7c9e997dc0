//! `egressgate run`: bind every listener, install the nftables rules, announce readiness, serve
//! until SIGTERM/SIGINT, then stop accepting and give open connections a grace period.
//!
//! Order matters: the listeners exist before the rules send traffic to them, and the
//! `listening` line (and `/readyz`) come only after both.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use egressgate_dns_shim::persist::PersistMetrics;
use egressgate_dns_shim::{DnsShim, ForeignServerPolicy, NameTable, ShimConfig, TableLimits};
use egressgate_log::{rfc3339_now, write_json_line};
use hyper::Method;
use prometheus::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin_socket::{AdminSocket, Router};
use crate::config::{AfterHandover, Config, DaemonSetRef, ForeignServers};
use crate::connection::Proxy;
use crate::handover::{self, HandoverMetrics, Role};
use crate::kubernetes::{self, IdentityWatch};
use crate::limits::{Bounds, Limits};
use crate::metrics::Metrics;
use crate::observe::{self, Bus, BusMetrics};
use crate::state::{self, Inherited, Inventory};
use crate::store::Store;
use crate::udp::{self, UdpRelay};
use crate::watch_metrics::WatchMetrics;
use crate::workers::Workers;
use crate::{admin, explain, listener, memory_budget, nft};

/// A pod's DNS-over-TCP connection is closed after this long without a complete query.
const DNS_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often policy files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(1);
/// How long the exit may wait for the API to say whether the gateway was uninstalled.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often expired name records are dropped (lookups ignore them in between anyway).
const PURGE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a new gateway taking over waits for its identities before it tells the old one to
/// stop anyway: decisions without identities would all be `unknown_source`.
const TAKEOVER_IDENTITY_WAIT: Duration = Duration::from_secs(30);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("policies or identities:\n  {}", .0.join("\n  "))]
    Rules(Vec<String>),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no trusted DNS upstream: set dns.upstreams or give the node a resolv.conf")]
    NoUpstreams,
    #[error("nftables: {0}")]
    Nft(#[from] nft::NftError),
    #[error("identity.kubernetes: no node name: set identity.kubernetes.nodeName or $NODE_NAME")]
    NoNodeName,
    #[error("identity.kubernetes: {0}")]
    Kubernetes(#[from] kubernetes::WatchError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// The `listening` line: every address the gateway serves.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListeningLine {
    time: String,
    event: &'static str,
    tproxy: Vec<SocketAddr>,
    client_first_tproxy: Vec<SocketAddr>,
    dns: Vec<SocketAddr>,
    /// The UDP relay's sockets.
    udp: Vec<SocketAddr>,
    admin: SocketAddr,
    policies: usize,
    pods: usize,
    nftables: bool,
    /// Name records restored from the state directory and a predecessor.
    restored_names: usize,
    /// From the process's start to this line.
    start_ms: f64,
}

/// The `shutdown` line: how many connections were open at SIGTERM and how many the grace period
/// cut.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ShutdownLine {
    time: String,
    event: &'static str,
    open_at_stop: usize,
    cut_after_grace: usize,
    /// Stopped because a successor took over (not by a signal).
    handed_over: bool,
}

pub async fn run(config: Config) -> Result<(), RunError> {
    if let Some(warning) = memory_budget::cgroup_limit()
        .and_then(|limit| memory_budget::Budget::of(&config).exceeds(limit))
    {
        tracing::warn!("{warning}");
    }
    let registry = Registry::new();
    let metrics = Metrics::register(&registry)?;
    let store = Arc::new(Store::load(&config, metrics.clone()).map_err(RunError::Rules)?);
    // Registered for either identity source: the pod and address gauges follow the store.
    let watch_metrics = WatchMetrics::register(&registry)?;
    let identity_watch = match &config.identity.kubernetes {
        Some(kubernetes) => {
            let node = kubernetes.node_name().ok_or(RunError::NoNodeName)?;
            Some(IdentityWatch::connect(node, watch_metrics.clone()).await?)
        }
        None => None,
    };

    let upstreams = config.dns_upstreams();
    if upstreams.is_empty() {
        return Err(RunError::NoUpstreams);
    }
    let table = Arc::new(
        NameTable::new(TableLimits {
            min_ttl: Duration::from_secs(config.dns.min_ttl_seconds),
            idle_grace: Duration::from_secs(config.dns.idle_grace_seconds),
            max_names_per_pod: config.dns.max_names_per_pod,
            max_names: config.dns.max_names,
        })
        .log_touches(),
    );
    let persist_metrics = PersistMetrics::register(&registry)?;
    let handover_metrics = HandoverMetrics::register(&registry)?;
    let bus = Bus::new(config.observe.clone(), BusMetrics::register(&registry)?);
    bus.tap_log_lines();
    let started = std::time::Instant::now();
    // Before any listener: what this node's pods resolved before a restart or a crash.
    let restored = state::restore(&config, &table, &persist_metrics);
    // A gateway already serving from this state directory hands over its sockets and table.
    let takeover = match handover::connect(&config.state.dir).await {
        Ok(takeover) => takeover,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over from the running gateway; starting beside it");
            None
        }
    };
    let mut inherited = Inherited::default();
    if let Some(takeover) = &takeover {
        let applied = state::apply_handover(&table, &takeover.dump, &persist_metrics);
        tracing::info!(
            names = applied.names,
            sockets = takeover.sockets.len(),
            "took the running gateway's table and sockets"
        );
    }
    let takeover = takeover.map(|mut takeover| {
        inherited = Inherited::new(std::mem::take(&mut takeover.sockets));
        takeover
    });

    let workers = Workers::start(config.listen.worker_count()).map_err(RunError::Workers)?;
    let mut inventory = Inventory::default();
    let mut dns_listeners = Vec::new();
    for &addr in &config.listen.dns {
        let udp = inherited.take_all(Role::DnsUdp, addr);
        let tcp = inherited.take_all(Role::DnsTcp, addr);
        let adopted = udp.into_iter().zip(tcp);
        let bound = per_worker(
            &workers,
            addr,
            adopted,
            |(udp, tcp)| DnsShim::adopt(udp, tcp),
            DnsShim::bind,
            |listeners| Ok(listeners.udp_local_addr()),
        )
        .map_err(|source| RunError::Bind {
            what: "dns",
            addr,
            source,
        })?;
        for (worker, listeners) in bound {
            let (udp, tcp) = listeners.fds();
            inventory.add(Role::DnsUdp, addr, udp);
            inventory.add(Role::DnsTcp, addr, tcp);
            dns_listeners.push((worker, listeners));
        }
    }
    let mut tproxy_listeners = Vec::new();
    let client_first = config.listen.client_first_tproxy();
    let tproxy = (config.listen.tproxy.iter()).map(|&addr| (addr, "tproxy", false));
    let client_first_tproxy = client_first
        .iter()
        .map(|&addr| (addr, "clientFirstTproxy", true));
    for (addr, what, defers) in tproxy.chain(client_first_tproxy) {
        let adopted = inherited.take_all(Role::Tproxy, addr);
        type Adopt = fn(std::os::fd::OwnedFd) -> std::io::Result<TcpListener>;
        type Bind = fn(SocketAddr) -> std::io::Result<TcpListener>;
        let (adopt, bind): (Adopt, Bind) = if defers {
            let bind = listener::bind_transparent_client_first;
            (listener::adopt_client_first, bind)
        } else {
            (listener::adopt, listener::bind_transparent)
        };
        let bound = per_worker(
            &workers,
            addr,
            adopted,
            adopt,
            bind,
            TcpListener::local_addr,
        )
        .map_err(|source| RunError::Bind { what, addr, source })?;
        for (worker, listener) in bound {
            inventory.add(Role::Tproxy, addr, std::os::fd::AsFd::as_fd(&listener));
            tproxy_listeners.push((worker, listener));
        }
    }
    // Sockets of listen addresses this config no longer has close here.
    drop(inherited);
    // Not handed over: with SO_REUSEPORT old and new relays share the port while both run, and
    // both decide a flow the same way.
    let mut udp_sockets = Vec::new();
    for &addr in &config.udp.listen {
        let (mut bound, local_addr) = (Vec::new(), tokio::net::UdpSocket::local_addr);
        bind_rest(&workers, addr, &mut bound, UdpRelay::bind, local_addr).map_err(|source| {
            RunError::Bind {
                what: "udp",
                addr,
                source,
            }
        })?;
        udp_sockets.append(&mut bound);
    }
    let admin_addr = config.listen.admin;
    let admin_listener = listener::bind_shared(admin_addr).map_err(|source| RunError::Bind {
        what: "admin",
        addr: admin_addr,
        source,
    })?;

    if config.nftables.manage {
        nft::install(&config)?;
    }

    if let Some(takeover) = takeover {
        // Identities first: the old gateway keeps deciding until this one can.
        if tokio::time::timeout(TAKEOVER_IDENTITY_WAIT, store.identities_ready())
            .await
            .is_err()
        {
            tracing::warn!(
                "identities not ready after {TAKEOVER_IDENTITY_WAIT:?}; taking over anyway"
            );
        }
        match takeover.finish().await {
            Ok(stopped) => {
                let applied = state::apply_handover(&table, &stopped.records, &persist_metrics);
                handover_metrics.took_over(
                    started.elapsed(),
                    applied.names,
                    stopped.open_connections,
                );
                write_json_line(&state::HandoverLine {
                    time: rfc3339_now(),
                    event: "handover",
                    role: "successor",
                    duration_ms: started.elapsed().as_secs_f64() * 1e3,
                    names: table.len(),
                    records_during_handover: applied.names,
                    predecessor_open_connections: stopped.open_connections as usize,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the running gateway did not stop; serving beside it")
            }
        }
    }
    let journal = state::journal(&config, &registry, &persist_metrics);
    let shim = DnsShim::new(
        ShimConfig {
            upstreams,
            foreign_servers: match config.dns.foreign_servers {
                ForeignServers::Forward => ForeignServerPolicy::Forward,
                ForeignServers::Refuse => ForeignServerPolicy::Refuse,
            },
            upstream_timeout: config.dns.upstream_timeout(),
            tcp_idle_timeout: DNS_TCP_IDLE_TIMEOUT,
        },
        Arc::clone(&table),
        &registry,
    )?;
    let shim = Arc::new(match &journal {
        Some(journal) => shim.with_journal(Arc::clone(journal)),
        None => shim,
    });

    // Two stops: serving pod traffic ends on SIGTERM or when a successor takes over; the rest
    // (admin, reloads, the state) runs until the process exits.
    let (stop_serving, serving_stopped) = watch::channel(false);
    let stop_serving_signal = move || {
        let mut stopped = serving_stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let (stop, stopped) = watch::channel(false);
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            // Either the flag flips or the sender is gone: both mean stop.
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let mut serving = tokio::task::JoinSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (worker, listeners) in dns_listeners {
        let serve = Arc::clone(&shim).serve(listeners, stop_serving_signal());
        serving.spawn_on(serve, workers.handle(worker));
    }
    let limits = Limits::new(Bounds {
        max_connections: config.connections.max,
        max_peeking: config.peek.max_pending,
        max_peeking_per_pod: config.peek.max_pending_per_pod,
    });
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&store),
        Arc::clone(&table),
        metrics.clone(),
        Arc::clone(&limits),
        &config,
    ));
    let udp_relay = Arc::new(UdpRelay::new(
        udp::Decider {
            proxy: Arc::clone(&proxy),
            store: Arc::clone(&store),
            table: Arc::clone(&table),
            metrics: metrics.clone(),
            unknown_sources: config.unknown_sources,
            unknown_source_wait: config.identity.unknown_source_wait(),
        },
        &config.udp,
    ));
    for (worker, listener) in tproxy_listeners {
        let serve = Arc::clone(&proxy).serve(listener, stop_serving_signal());
        serving.spawn_on(serve, workers.handle(worker));
    }
    for (worker, socket) in udp_sockets {
        let serve = Arc::clone(&udp_relay).serve(socket, stop_serving_signal());
        serving.spawn_on(serve, workers.handle(worker));
    }
    if config.nftables.manage {
        tasks.spawn(udp::keep_unpoliced(
            config.clone(),
            Arc::clone(&store),
            Arc::clone(&udp_relay),
            shutdown(),
        ));
    }
    tasks.spawn(admin::serve(
        admin_listener,
        registry.clone(),
        Arc::clone(&ready),
        shutdown(),
    ));
    tasks.spawn({
        let store = Arc::clone(&store);
        let shutdown = shutdown();
        async move { store.watch(RELOAD_POLL, shutdown).await }
    });
    tasks.spawn({
        let shutdown = shutdown();
        let table = Arc::clone(&table);
        async move {
            tokio::select! {
                () = shutdown => {}
                () = purge_expired(&table) => {}
            }
        }
    });
    if let Some(journal) = &journal {
        tasks.spawn(state::keep(
            Arc::clone(journal),
            Arc::clone(&table),
            config.state.snapshot_interval(),
            shutdown(),
        ));
    }
    tasks.spawn(state::forget_gone_pods(
        Arc::clone(&store),
        Arc::clone(&table),
        restored.pods,
        persist_metrics.clone(),
    ));
    if config.nftables.manage && !config.intercept.exclude_pods.is_empty() {
        tasks.spawn(keep_excluded_pods(
            config.clone(),
            Arc::clone(&store),
            shutdown(),
        ));
    }
    if let Some(identity_watch) = identity_watch {
        tasks.spawn(identity_watch.run(Arc::clone(&store), shutdown()));
    }
    tasks.spawn(watch_metrics.follow(Arc::clone(&store), shutdown()));
    let owner_deleted = Arc::new(AtomicBool::new(false));
    if let Some(owner) = config.nftables.owner_daemon_set.clone() {
        tasks.spawn(kubernetes::watch_owner(
            owner,
            Arc::clone(&owner_deleted),
            shutdown(),
        ));
    }
    // Bound once this process decides (a predecessor answered until now): from here on the
    // operator API is this process's.
    match AdminSocket::bind(&config.state.dir) {
        Ok(socket) => {
            let router = admin_router(&store, &table, &config, &bus);
            tasks.spawn(socket.serve(router, shutdown()));
        }
        Err(e) => tracing::warn!(dir = %config.state.dir.display(), error = %e,
            "no admin socket: `egressgate explain` cannot reach this gateway"),
    }
    let offer = match handover::Offer::bind(&config.state.dir) {
        Ok(offer) => Some(offer),
        Err(e) => {
            tracing::warn!(dir = %config.state.dir.display(), error = %e,
                "no hand-over socket: a new gateway will not take over from this one");
            None
        }
    };

    let snapshot = store.current();
    write_json_line(&ListeningLine {
        time: rfc3339_now(),
        event: "listening",
        tproxy: config.listen.tproxy.clone(),
        client_first_tproxy: client_first,
        dns: config.listen.dns.clone(),
        udp: config.udp.listen.clone(),
        admin: admin_addr,
        policies: snapshot.policies.len(),
        pods: snapshot.identities.len(),
        nftables: config.nftables.manage,
        restored_names: table.len(),
        start_ms: started.elapsed().as_secs_f64() * 1e3,
    });
    // Ready once identities are complete too: until the first pod list, every pod would be
    // "unselected".
    tasks.spawn({
        let (store, ready, shutdown) = (Arc::clone(&store), Arc::clone(&ready), shutdown());
        async move {
            tokio::select! {
                () = shutdown => {}
                () = store.identities_ready() => ready.store(true, Ordering::Release),
            }
        }
    });

    // After SIGTERM, with `state.successorWaitSeconds`, serving goes on until a successor takes
    // over (a DaemonSet replaces a deleted pod while the old one terminates) or the wait ends.
    let mut successor_deadline: Option<tokio::time::Instant> = None;
    let handed_over = loop {
        let successor = async {
            match &offer {
                Some(offer) => offer.next().await,
                None => std::future::pending().await,
            }
        };
        let wait_over = async {
            match successor_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait_for_termination() => {
                let wait = config.state.successor_wait();
                if successor_deadline.is_some() || wait.is_zero() || offer.is_none() {
                    break false;
                }
                tracing::info!(?wait, "terminating: serving until a successor takes over");
                ready.store(false, Ordering::Release);
                successor_deadline = Some(tokio::time::Instant::now() + wait);
            }
            () = wait_over => {
                tracing::info!("no successor came; stopping");
                break false;
            }
            successor = successor => {
                let handed = state::hand_over(
                    successor,
                    &inventory,
                    journal.as_deref(),
                    &table,
                    &limits,
                    &stop_serving,
                    &mut serving,
                )
                .await;
                match handed {
                    Ok(()) => break true,
                    // Failed after this gateway stopped serving (the successor died after its
                    // Stop): do not pretend to serve; stop as after a hand-over, unready.
                    Err(e) if *stop_serving.borrow() => {
                        tracing::error!(error = %e,
                            "the successor failed after this gateway stopped serving; stopping");
                        break true;
                    }
                    Err(e) => tracing::warn!(error = %e, "hand-over failed; still serving"),
                }
            }
        }
    };
    ready.store(false, Ordering::Release);
    tracing::info!(handed_over, "stopping");
    // A gateway started from now on restores from the files (the journal holds every record)
    // instead of waiting on a hand-over this one no longer offers.
    if let Some(offer) = offer {
        offer.remove();
    }
    let _ = stop_serving.send(true);
    while serving.join_next().await.is_some() {}
    drop(inventory);
    if !handed_over {
        if let Some(journal) = &journal {
            // The next start restores from one fresh snapshot.
            let (journal, table) = (Arc::clone(journal), Arc::clone(&table));
            let _ = tokio::task::spawn_blocking(move || journal.compact(&table)).await;
        }
    }
    // Listeners are closed; open connections get the grace period to finish.
    let grace = config.connections.shutdown_grace();
    let open = limits.open_connections();
    let drained = tokio::time::timeout(grace, limits.all_closed())
        .await
        .is_ok();
    let cut = if drained {
        0
    } else {
        limits.open_connections()
    };
    if handed_over {
        handover_metrics.drained(open, cut);
    }
    write_json_line(&ShutdownLine {
        time: rfc3339_now(),
        event: "shutdown",
        open_at_stop: open,
        cut_after_grace: cut,
        handed_over,
    });
    if handed_over
        && successor_deadline.is_none()
        && config.state.after_handover == AfterHandover::Wait
    {
        wait_for_termination().await;
    }
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    if let Some(owner) = config.nftables.owner_daemon_set.as_ref() {
        let seen_deleted = owner_deleted.load(Ordering::Acquire);
        remove_rules_if_uninstalled(&config, owner, seen_deleted).await;
    }
    Ok(())
}

/// One socket per worker on `addr`, each registered with its worker's runtime and paired with
/// its worker's index: first every socket a predecessor `adopted` (all of them, even past the
/// worker count, so that none closes with connections in its queue), then new ones `bind` makes
/// for the workers still without one ([`bind_rest`]).
fn per_worker<Handed, Listener>(
    workers: &Workers,
    addr: SocketAddr,
    adopted: impl IntoIterator<Item = Handed>,
    adopt: impl Fn(Handed) -> std::io::Result<Listener>,
    bind: impl Fn(SocketAddr) -> std::io::Result<Listener>,
    local_addr: impl Fn(&Listener) -> std::io::Result<SocketAddr>,
) -> std::io::Result<Vec<(usize, Listener)>> {
    let mut listeners = Vec::with_capacity(workers.len());
    for handed in adopted {
        let _runtime = workers.handle(listeners.len()).enter();
        listeners.push((listeners.len(), adopt(handed)?));
    }
    bind_rest(workers, addr, &mut listeners, bind, local_addr)?;
    Ok(listeners)
}

/// Binds a socket on `addr` for each worker after those `listeners` already serve, on its
/// worker's runtime. A port of 0 becomes the first new socket's.
fn bind_rest<Listener>(
    workers: &Workers,
    mut addr: SocketAddr,
    listeners: &mut Vec<(usize, Listener)>,
    bind: impl Fn(SocketAddr) -> std::io::Result<Listener>,
    local_addr: impl Fn(&Listener) -> std::io::Result<SocketAddr>,
) -> std::io::Result<()> {
    while listeners.len() < workers.len() {
        let _runtime = workers.handle(listeners.len()).enter();
        let listener = bind(addr)?;
        if addr.port() == 0 {
            addr.set_port(local_addr(&listener)?.port());
        }
        listeners.push((listeners.len(), listener));
    }
    Ok(())
}

/// The endpoints of the admin socket (docs/operations.md lists them).
fn admin_router(store: &Arc<Store>, table: &Arc<NameTable>, config: &Config, bus: &Bus) -> Router {
    let settings = explain::trace::Settings::of(config);
    let (store, table, bus) = (Arc::clone(store), Arc::clone(table), bus.clone());
    let observed = Arc::clone(&store);
    Router::new()
        .route(Method::POST, explain::endpoint::PATH, move |request| {
            explain::endpoint::handle(request, Arc::clone(&store), Arc::clone(&table), settings)
        })
        .route(Method::POST, "/v1/observe", move |request| {
            let response = observe::handle(&bus, &observed, &request);
            async move { response }
        })
}

/// At exit: removes the rules only when the owning DaemonSet is gone: seen deleted by the
/// running watch (`seen_deleted`; `helm uninstall` deletes the account's RBAC right after the
/// DaemonSet, so asking only now could be refused), or found gone now. Any doubt (API down, no
/// permission) keeps them: egress then fails closed until `egressgate cleanup`.
async fn remove_rules_if_uninstalled(config: &Config, owner: &DaemonSetRef, seen_deleted: bool) {
    let removed = async {
        if seen_deleted {
            return Ok(Ok(true));
        }
        tokio::time::timeout(OWNER_CHECK_TIMEOUT, kubernetes::daemon_set_removed(owner)).await
    };
    match removed.await {
        Ok(Ok(true)) => {
            let config = config.clone();
            match tokio::task::spawn_blocking(move || nft::uninstall(&config)).await {
                Ok(Ok(())) => tracing::info!(
                    daemon_set = %owner.name,
                    "owner DaemonSet is gone (uninstalled): nftables rules removed"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot remove nftables rules"),
                Err(e) => tracing::error!(error = %e, "nftables removal panicked"),
            }
        }
        Ok(Ok(false)) => {
            tracing::info!(daemon_set = %owner.name, "owner DaemonSet remains: nftables rules kept");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the owner DaemonSet: nftables rules kept")
        }
        Err(_) => {
            tracing::warn!("the API did not answer about the owner DaemonSet: nftables rules kept")
        }
    }
}

/// Keeps the nftables set of `intercept.excludePods` equal to their current addresses.
async fn keep_excluded_pods(config: Config, store: Arc<Store>, shutdown: impl Future<Output = ()>) {
    let mut updates = store.identity_updates();
    let mut installed: Option<Vec<IpAddr>> = None;
    tokio::pin!(shutdown);
    loop {
        let mut addrs: Vec<IpAddr> = store
            .current()
            .identities
            .iter()
            .filter(|(_, pod)| config.intercept.exclude_pods.iter().any(|e| e.matches(pod)))
            .map(|(ip, _)| *ip)
            .collect();
        addrs.sort_unstable();
        if installed.as_ref() != Some(&addrs) {
            // nft runs a process: off the async workers.
            let (config, list) = (config.clone(), addrs.clone());
            match tokio::task::spawn_blocking(move || nft::set_excluded(&config, &list)).await {
                Ok(Ok(())) => installed = Some(addrs),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot update excluded pods"),
                Err(e) => tracing::warn!(error = %e, "excluded pods update panicked"),
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
    }
}

async fn purge_expired(table: &NameTable) {
    let mut ticker = tokio::time::interval(PURGE_INTERVAL);
    loop {
        ticker.tick().await;
        table.purge_expired(std::time::Instant::now());
    }
}

async fn wait_for_termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
