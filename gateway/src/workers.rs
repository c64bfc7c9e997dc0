//! The data path's threads. Each worker is one thread running its own single-threaded runtime,
//! and serves its own socket on every TPROXY, DNS and UDP-relay address (SO_REUSEPORT: the
//! kernel spreads connections and datagrams over the sockets by their addresses). A connection
//! then stays on one thread from accept to close: no hand-off between threads, no work-stealing
//! wake-ups, and its timers and sockets on that thread's own driver. What the workers share is
//! read-mostly (policies and identities behind `ArcSwap`s, the name table's shards).
//!
//! The control plane (admin endpoint, reloads, the Kubernetes watch, the journal's upkeep) runs
//! on the main runtime, so a slow scrape or reload never delays a connection.

use std::io;
use std::num::NonZeroUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// How long a worker's blocking tasks may run on once the worker stops.
const BLOCKING_SHUTDOWN: Duration = Duration::from_millis(100);

/// The furthest ahead a worker's next planned wake-up ever is (see [`plan_a_wake`]): below the
/// default `peek.timeoutMs` (5 s) and idle timeout, the deadlines every connection sets.
const WAKE_HORIZON: Duration = Duration::from_secs(1);

/// The running workers; dropping it stops them, cancelling what still runs on them.
#[derive(Debug)]
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers, named `egressgate-worker-N`.
    pub(crate) fn start(count: NonZeroUsize) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            // No signal or process driver: pod traffic needs neither, and each would be
            // checked on every park.
            let runtime = Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("egressgate-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async {
                        tokio::select! {
                            // Either a stop or the sender dropped: both end the worker.
                            _ = stopped => {}
                            () = plan_a_wake() => {}
                        }
                    });
                    runtime.shutdown_timeout(BLOCKING_SHUTDOWN);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// Worker `index`'s runtime, where its sockets are registered and its tasks run; indexes
    /// wrap around, so sockets can be dealt to workers in turn.
    pub(crate) fn handle(&self, index: usize) -> &Handle {
        &self.workers[index % self.workers.len()].handle
    }
}

/// Keeps a timer at most [`WAKE_HORIZON`] ahead on the worker's driver, waking it once a second.
///
/// tokio wakes its driver (an eventfd write, then one more turn of its loop) whenever a timer is
/// set earlier than the driver's next planned wake-up, even from the driver's own thread; on a
/// worker with no timer pending, that was every new connection's first deadline: a system call
/// per connection. With this one pending, a deadline further ahead than `WAKE_HORIZON` is set
/// without a wake-up.
async fn plan_a_wake() {
    loop {
        tokio::time::sleep(WAKE_HORIZON).await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn two() -> NonZeroUsize {
        NonZeroUsize::new(2).expect("non-zero")
    }

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_named_thread() {
        let workers = Workers::start(two()).expect("start");
        let names: Vec<String> = (0..workers.len())
            .map(|index| {
                let task = workers
                    .handle(index)
                    .spawn(async { std::thread::current().name().map(str::to_owned) });
                wait_for(task).expect("join").expect("named")
            })
            .collect();
        assert_eq!(names, ["egressgate-worker-0", "egressgate-worker-1"]);
    }

    #[test]
    fn dropping_the_workers_cancels_what_still_runs_on_them() {
        let workers = Workers::start(two()).expect("start");
        let cancelled = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = SetOnDrop(Arc::clone(&cancelled));
        let (started, running) = std::sync::mpsc::channel();
        workers.handle(1).spawn(async move {
            let _guard = guard;
            let _ = started.send(());
            std::future::pending::<()>().await;
        });
        running.recv().expect("the task started");
        drop(workers);
        assert!(cancelled.load(Ordering::SeqCst));
    }

    /// A connection's deadlines, set one after another on a worker that parks between them (as
    /// it does between a connection's reads), wake the worker's driver none of the times.
    #[test]
    fn a_connection_deadline_does_not_wake_the_worker_it_is_set_on() {
        let workers = Workers::start(NonZeroUsize::MIN).expect("start");
        let writes = workers.handle(0).spawn(async {
            tokio::task::yield_now().await;
            let before = write_calls();
            for _ in 0..10 {
                let deadline = tokio::time::sleep(Duration::from_secs(5));
                tokio::pin!(deadline);
                assert!(futures::poll!(&mut deadline).is_pending());
                // The driver turns, and plans its next wake-up from the timers pending.
                tokio::task::yield_now().await;
            }
            write_calls() - before
        });
        assert_eq!(wait_for(writes).expect("join"), 0);
    }

    /// This thread's write(2) calls so far; tokio's driver wakes itself with one (its eventfd).
    fn write_calls() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("task I/O accounting");
        io.lines()
            .find_map(|line| line.strip_prefix("syscw:"))
            .and_then(|count| count.trim().parse().ok())
            .expect("syscw")
    }

    /// Waits for a task of another runtime from a plain thread.
    fn wait_for<T>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
        Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(task)
    }
}
