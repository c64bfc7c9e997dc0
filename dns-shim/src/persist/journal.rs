//! Writing the state: the journal of records as they are made, and the snapshot that
//! compacts it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{IntGauge, PullingGauge, Registry};

use super::codec::{self, FileKind, Header};
use super::{encode_table, journal_path, journals, PersistMetrics, Scope, SNAPSHOT};
use crate::answer::Answer;
use crate::table::{DestIp, NameTable, PodIp};

/// See the module docs.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    scope: Scope,
    active: Mutex<Active>,
    /// Frames appended since [`Journal::start_capture`]: what a hand-over sends after its dump.
    capture: Mutex<Option<Vec<u8>>>,
    /// Handed over: another process owns the state directory now.
    retired: AtomicBool,
    metrics: PersistMetrics,
    bytes: IntGauge,
    started: Arc<Mutex<Instant>>,
}

/// Records encoded for the journal and not yet written: what a batch of answers adds, saved by
/// one [`Journal::save`] before their replies leave.
#[derive(Debug, Default)]
pub struct Unsaved {
    frames: Vec<u8>,
}

impl Unsaved {
    /// Adds the entries `table.record` just made for `pod` from `answer` with `ttl`.
    pub fn add(&mut self, pod: PodIp, answer: &Answer, ttl: Duration) {
        let fresh_until = SystemTime::now() + ttl;
        for &dst in &answer.addresses {
            codec::encode_name(
                &mut self.frames,
                pod,
                DestIp(dst),
                &answer.name,
                &answer.cnames,
                fresh_until,
            );
        }
    }
}

/// The journal being appended to.
#[derive(Debug)]
struct Active {
    generation: u64,
    file: File,
    bytes: u64,
}

impl Journal {
    /// Starts journal `generation` (above every file in `dir`, see
    /// [`RestoreReport::next_generation`](super::RestoreReport)).
    pub fn create(
        dir: &Path,
        scope: Scope,
        generation: u64,
        metrics: PersistMetrics,
        registry: &Registry,
    ) -> io::Result<Self> {
        // Root's alone: whoever can write here can grant names to pods.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let active = Active::create(dir, &scope, generation)?;
        let bytes = IntGauge::new(
            "egressgate_state_journal_bytes",
            "Size of the name journal written since the last snapshot",
        )
        .map_err(io::Error::other)?;
        bytes.set(i64::try_from(active.bytes).unwrap_or(i64::MAX));
        let started = Arc::new(Mutex::new(Instant::now()));
        let age = PullingGauge::new(
            "egressgate_state_journal_age_seconds",
            "Seconds since the last snapshot started the current journal",
            Box::new({
                let started = Arc::clone(&started);
                move || lock(&started).elapsed().as_secs_f64()
            }),
        )
        .map_err(io::Error::other)?;
        registry
            .register(Box::new(bytes.clone()))
            .and_then(|()| registry.register(Box::new(age)))
            .map_err(io::Error::other)?;
        Ok(Journal {
            dir: dir.to_owned(),
            scope,
            active: Mutex::new(active),
            capture: Mutex::new(None),
            retired: AtomicBool::new(false),
            metrics,
            bytes,
            started,
        })
    }

    /// Saves the entries `table.record` just made for `pod` from `answer` with `ttl`. Called
    /// before the reply is sent.
    pub fn record(&self, pod: PodIp, answer: &Answer, ttl: Duration) {
        let mut unsaved = Unsaved::default();
        unsaved.add(pod, answer, ttl);
        self.save(&mut unsaved);
    }

    /// Writes the records gathered in `unsaved` (one write for a batch of answers) and empties
    /// it. Called before any of their replies is sent.
    pub fn save(&self, unsaved: &mut Unsaved) {
        self.append(&unsaved.frames);
        unsaved.frames.clear();
    }

    /// Saves the uses of entries the table logged since the last call.
    pub fn save_touches(&self, table: &NameTable) {
        let touches = table.take_touches();
        if touches.is_empty() {
            return;
        }
        let (now, wall_now) = (Instant::now(), SystemTime::now());
        let mut frames = Vec::with_capacity(48 * touches.len());
        for touch in &touches {
            let at = wall_now
                .checked_sub(now.saturating_duration_since(touch.at))
                .unwrap_or(wall_now);
            codec::encode_touch(&mut frames, touch.pod, touch.dst, &touch.name, at);
        }
        self.append(&frames);
    }

    fn append(&self, frames: &[u8]) {
        if frames.is_empty() {
            return;
        }
        if let Some(capture) = lock(&self.capture).as_mut() {
            capture.extend_from_slice(frames);
        }
        let mut active = lock(&self.active);
        match active.file.write_all(frames) {
            Ok(()) => {
                active.bytes += frames.len() as u64;
                self.bytes
                    .set(i64::try_from(active.bytes).unwrap_or(i64::MAX));
            }
            Err(e) => self.write_failed("journal", &e),
        }
    }

    /// Flushes the journal to the disk (for a node that loses power; a crash of the process
    /// loses nothing written).
    pub fn sync(&self) {
        let file = match lock(&self.active).file.try_clone() {
            Ok(file) => file,
            Err(e) => return self.write_failed("journal", &e),
        };
        if let Err(e) = file.sync_data() {
            self.write_failed("journal", &e);
        }
    }

    /// Compacts: starts the next journal, writes the table as the snapshot of that generation
    /// (temporary file, fsync, rename, fsync of the directory), then deletes older journals.
    /// A crash anywhere in between leaves a set of files that restores everything.
    pub fn compact(&self, table: &NameTable) -> io::Result<()> {
        if self.retired.load(Ordering::Acquire) {
            return Ok(());
        }
        let generation = {
            let mut active = lock(&self.active);
            let next = Active::create(&self.dir, &self.scope, active.generation + 1)?;
            let previous = std::mem::replace(&mut *active, next);
            // The records of the previous journal reach the snapshot through the table.
            drop(previous);
            self.bytes
                .set(i64::try_from(active.bytes).unwrap_or(i64::MAX));
            active.generation
        };
        *lock(&self.started) = Instant::now();
        let mut bytes = Header {
            kind: FileKind::Snapshot,
            generation,
            scope: self.scope.as_str().to_owned(),
        }
        .encode();
        bytes.extend_from_slice(&encode_table(table));
        let written = write_atomically(&self.dir, SNAPSHOT, &bytes);
        if let Err(e) = &written {
            self.write_failed("snapshot", e);
            return written;
        }
        for (old, path) in journals(&self.dir)? {
            if old < generation {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old journal");
                }
            }
        }
        Ok(())
    }

    /// From now on, keeps a copy of every frame appended (see [`Journal::take_capture`]).
    pub fn start_capture(&self) {
        *lock(&self.capture) = Some(Vec::new());
    }

    /// The frames appended since [`Journal::start_capture`] or the last call.
    pub fn take_capture(&self) -> Vec<u8> {
        lock(&self.capture)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The generation of the journal being appended to.
    pub fn generation(&self) -> u64 {
        lock(&self.active).generation
    }

    /// Stops capturing (a hand-over that did not complete).
    pub fn stop_capture(&self) {
        *lock(&self.capture) = None;
    }

    /// While another process takes the state over (`true`): no snapshots from this one, so
    /// generations never collide. Its journal stays valid to read, and the successor's first
    /// snapshot deletes it. `false` when the hand-over failed.
    pub fn retire(&self, retired: bool) {
        self.retired.store(retired, Ordering::Release);
    }

    fn write_failed(&self, what: &str, error: &io::Error) {
        self.metrics.write_errors.inc();
        tracing::warn!(%what, dir = %self.dir.display(), %error,
            "cannot write the name state; the table keeps working in memory");
    }
}

impl Active {
    fn create(dir: &Path, scope: &Scope, generation: u64) -> io::Result<Self> {
        let path = journal_path(dir, generation);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        let header = Header {
            kind: FileKind::Journal,
            generation,
            scope: scope.as_str().to_owned(),
        }
        .encode();
        file.write_all(&header)?;
        Ok(Active {
            generation,
            file,
            bytes: header.len() as u64,
        })
    }
}

/// `dir/name` replaced by `bytes` as a whole: a reader sees the old file or the new one.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
