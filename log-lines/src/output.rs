//! Where the JSON lines go: stdout, written by a thread of their own.
//!
//! The tasks that answer queries and decide connections only append their line to a queue (each
//! formats it in its own thread's buffer first, so the queue's lock is held for a copy); the
//! `json-log` thread writes whatever has queued with one `write`, at most 10 ms later.
//! So the data path never waits on stdout (a file, or a pipe to the container runtime that may be
//! slow) until `MAX_QUEUED` bytes are waiting, and then it waits rather than drop a line; under
//! load many lines share one system call.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use crate::LineTap;

/// Queued bytes beyond which producers wait for the writer.
const MAX_QUEUED: usize = 4 << 20;

/// While lines keep coming, the writer looks for them this often instead of being woken for
/// each: a wake-up per line costs the producer a system call and a context switch, which is more
/// than the write it saves. 10 ms rather than 1: at 1,500 connections/s that is ~30 lines per
/// write instead of ~3, and the gateway's CPU per connection dropped by about a tenth.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Empty polls (100 ms) after which the writer sleeps until a producer wakes it: an idle gateway
/// must not keep waking up.
const IDLE_POLLS: u32 = 10;

/// A batch buffer (or a thread's line buffer) larger than this is not kept for the next.
const KEPT_CAPACITY: usize = 64 << 10;

thread_local! {
    /// Each thread's buffer for the line it is writing. Taken, not borrowed, while in use:
    /// a line written while formatting another (none is) would get a fresh one.
    static LINE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

type StdoutSink = fn() -> io::StdoutLock<'static>;

static STDOUT: OnceLock<Output<StdoutSink>> = OnceLock::new();

/// Queues the line `write` appends (one JSON object, no newline yet; `false` if it failed) for
/// stdout, and gives its bytes to `tap`.
pub(super) fn push(write: impl FnOnce(&mut Vec<u8>) -> bool, tap: Option<&dyn LineTap>) {
    let output = STDOUT.get_or_init(|| Output::start(|| io::stdout().lock()));
    output.push(write, tap);
}

/// Waits until every line queued so far is written. Call before the process exits.
pub fn flush() {
    if let Some(output) = STDOUT.get() {
        output.flush();
    }
}

/// A queue of lines and the thread that writes them to a sink.
#[derive(Debug)]
struct Output<S> {
    shared: Arc<Shared<S>>,
    /// `false` if the thread could not be started: lines are then written by their producer.
    threaded: bool,
}

/// `sink` gives the writer for each batch (stdout's lock, in the process).
#[derive(Debug)]
struct Shared<S> {
    sink: Mutex<S>,
    queue: Mutex<Queue>,
    /// Lines were queued for an idle writer.
    queued: Condvar,
    /// The writer took a batch (there is room again) or finished writing one.
    progressed: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    lines: Vec<u8>,
    /// The writer sleeps on `queued` until notified (it polls otherwise).
    writer_idle: bool,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// Threads sleeping on `progressed`.
    waiters: usize,
}

impl<S, W> Output<S>
where
    S: FnMut() -> W + Send + 'static,
    W: Write,
{
    /// Starts the writer thread; `sink` gives it the writer for each batch.
    fn start(sink: S) -> Self {
        let shared = Arc::new(Shared::new(sink));
        let writer = Arc::clone(&shared);
        let threaded = std::thread::Builder::new()
            .name("json-log".to_owned())
            .spawn(move || writer.write_batches())
            .is_ok();
        Output { shared, threaded }
    }

    fn push(&self, write: impl FnOnce(&mut Vec<u8>) -> bool, tap: Option<&dyn LineTap>) {
        // Formatted into this thread's buffer first: the queue's lock, which every worker
        // takes for every line, is then held only to copy the bytes.
        let mut text = LINE.take();
        text.clear();
        if write(&mut text) {
            text.push(b'\n');
            self.queue(&text);
            if let Some(tap) = tap {
                tap.publish(text.clone());
            }
        }
        if text.capacity() <= KEPT_CAPACITY {
            LINE.set(text);
        }
    }

    fn queue(&self, line: &[u8]) {
        let shared = &*self.shared;
        if !self.threaded {
            shared.write(line);
            return;
        }
        let mut queue = shared.lock();
        while queue.lines.len() >= MAX_QUEUED {
            queue = shared.wait_for_progress(queue);
        }
        queue.lines.extend_from_slice(line);
        if queue.writer_idle {
            queue.writer_idle = false;
            shared.queued.notify_one();
        }
    }

    fn flush(&self) {
        let shared = &*self.shared;
        let mut queue = shared.lock();
        while self.threaded && (!queue.lines.is_empty() || queue.writing) {
            queue = shared.wait_for_progress(queue);
        }
    }
}

impl<S, W> Shared<S>
where
    S: FnMut() -> W,
    W: Write,
{
    fn new(sink: S) -> Self {
        Shared {
            sink: Mutex::new(sink),
            queue: Mutex::default(),
            queued: Condvar::new(),
            progressed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_for_progress<'a>(&self, mut queue: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        queue.waiters += 1;
        let mut queue = self
            .progressed
            .wait(queue)
            .unwrap_or_else(PoisonError::into_inner);
        queue.waiters -= 1;
        queue
    }

    /// One batch to the sink. Only the writer thread writes, or (without it) each producer
    /// in turn.
    fn write(&self, batch: &[u8]) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = sink();
        if let Err(e) = out.write_all(batch).and_then(|()| out.flush()) {
            tracing::debug!(error = %e, "cannot write JSON log lines");
        }
    }

    fn write_batches(&self) {
        let mut batch = Vec::new();
        let mut queue = self.lock();
        loop {
            let mut empty_polls = 0;
            while queue.lines.is_empty() {
                if empty_polls < IDLE_POLLS {
                    empty_polls += 1;
                    queue = self
                        .queued
                        .wait_timeout(queue, POLL_INTERVAL)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                } else {
                    queue.writer_idle = true;
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            queue.writer_idle = false;
            std::mem::swap(&mut queue.lines, &mut batch);
            queue.writing = true;
            self.notify_waiters(&queue);
            drop(queue);

            self.write(&batch);
            batch.clear();
            batch.shrink_to(KEPT_CAPACITY);

            queue = self.lock();
            queue.writing = false;
            self.notify_waiters(&queue);
        }
    }

    fn notify_waiters(&self, queue: &Queue) {
        if queue.waiters > 0 {
            self.progressed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps what was written, and counts the writes.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut kept = self.0.lock().expect("lock");
            kept.0.extend_from_slice(buf);
            kept.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_and_in_order_per_thread() {
        let kept = Kept::default();
        let sink = kept.clone();
        let output = Output::start(move || sink.clone());
        assert!(output.threaded);
        // Past MAX_QUEUED in total, so producers also wait for room.
        let (threads, lines) = (4, 20_000);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let output = &output;
                scope.spawn(move || {
                    for i in 0..lines {
                        output.push(
                            crate::serialized(
                                &serde_json::json!({"t": t, "i": i, "pad": "x".repeat(64)}),
                            ),
                            None,
                        );
                    }
                });
            }
        });
        output.flush();
        let (text, writes) = {
            let kept = kept.0.lock().expect("lock");
            (String::from_utf8(kept.0.clone()).expect("utf-8"), kept.1)
        };
        let mut next = vec![0u64; threads];
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).expect("whole JSON line");
            let t = usize::try_from(value["t"].as_u64().expect("t")).expect("small");
            assert_eq!(
                value["i"].as_u64(),
                Some(next[t]),
                "thread {t} out of order"
            );
            next[t] += 1;
        }
        assert_eq!(next, vec![lines as u64; threads], "every line written");
        assert!(writes < threads * lines, "lines share writes: {writes}");
    }

    #[test]
    fn without_the_writer_thread_each_line_is_written_by_its_producer() {
        let kept = Kept::default();
        let sink = kept.clone();
        // What `start` falls back to when the thread cannot be spawned.
        let output = Output {
            shared: Arc::new(Shared::new(move || sink.clone())),
            threaded: false,
        };
        output.push(crate::serialized(&serde_json::json!({"event": "a"})), None);
        output.push(crate::serialized(&serde_json::json!({"event": "b"})), None);
        let kept = kept.0.lock().expect("lock");
        assert_eq!(
            String::from_utf8_lossy(&kept.0),
            "{\"event\":\"a\"}\n{\"event\":\"b\"}\n"
        );
        assert_eq!(kept.1, 2, "one write per line, at once");
        drop(kept);
        output.flush();
    }

    /// A tap that keeps what it is given.
    #[derive(Debug, Default)]
    struct Tapped(Mutex<Vec<Vec<u8>>>);

    impl LineTap for Tapped {
        fn wanted(&self) -> bool {
            true
        }

        fn publish(&self, line: Vec<u8>) {
            self.0.lock().expect("lock").push(line);
        }
    }

    #[test]
    fn a_tap_gets_the_bytes_written_to_stdout() {
        let kept = Kept::default();
        let sink = kept.clone();
        let output = Output::start(move || sink.clone());
        let tap = Tapped::default();
        output.push(
            crate::serialized(&serde_json::json!({"event": "decision", "n": 1})),
            Some(&tap),
        );
        output.push(
            crate::serialized(&serde_json::json!({"event": "close"})),
            None,
        );
        output.flush();
        let written = kept.0.lock().expect("lock").0.clone();
        let tapped = tap.0.lock().expect("lock").clone();
        assert_eq!(tapped, vec![b"{\"event\":\"decision\",\"n\":1}\n".to_vec()]);
        assert!(written.starts_with(&tapped[0]), "the same bytes");

        // Without the writer thread, too.
        let fallback = Output {
            shared: Arc::new(Shared::new(Kept::default)),
            threaded: false,
        };
        fallback.push(
            crate::serialized(&serde_json::json!({"event": "dns"})),
            Some(&tap),
        );
        assert_eq!(tap.0.lock().expect("lock").len(), 2);
    }

    #[test]
    fn flush_returns_at_once_when_nothing_is_queued() {
        let output = Output::start(Kept::default);
        output.flush();
        output.push(crate::serialized(&serde_json::json!({"event": "x"})), None);
        output.flush();
    }
}
