//! Kernel pipes for splice(2), borrowed only while bytes are in flight and then kept for reuse.
//!
//! A spliced direction needs a pipe only between reading a chunk and writing it out, so an idle
//! connection holds none: two file descriptors per connection instead of six, no pipe2(2) and
//! close(2) per connection, and the pipes in use stay far below the per-user page budget
//! (`/proc/sys/fs/pipe-user-pages-soft`) past which the kernel hands out one-page pipes.
//!
//! The free pipes are one small process-wide pool, so that the descriptors they hold are bounded
//! and can be handed back at once when the process runs out (`PipePool::release_kept`).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::fcntl::OFlag;

/// Free pipes kept (two descriptors each). Enough for the chunks in flight at once under load;
/// a lock per chunk costs nothing next to the two splice(2) calls it saves a pipe for.
const KEPT: usize = 16;

/// The process's pool.
pub static PIPES: PipePool = PipePool::new(KEPT);

/// A non-blocking pipe: bytes spliced into `write` come out of `read`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

/// Free pipes, at most `kept` of them.
#[derive(Debug)]
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    kept: usize,
}

impl PipePool {
    const fn new(kept: usize) -> Self {
        PipePool {
            free: Mutex::new(Vec::new()),
            kept,
        }
    }

    /// A free pipe, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        if let Some(pipe) = self.free().pop() {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Pipe { read, write })
    }

    /// Runs `open`; if the process is out of descriptors, closes the kept pipes and tries once
    /// more.
    pub fn retry_out_of_descriptors<T>(
        &self,
        mut open: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        match open() {
            Err(e) if out_of_descriptors(&e) => {
                self.release_kept();
                open()
            }
            other => other,
        }
    }

    /// Keeps an empty pipe for reuse. A pipe that may still hold bytes must be dropped
    /// instead, or they would leak into another connection.
    pub fn give_back(&self, pipe: Pipe) {
        let mut free = self.free();
        if free.len() < self.kept {
            free.push(pipe);
        }
    }

    /// Closes every kept pipe: the process ran out of descriptors, and connections need them
    /// more.
    pub fn release_kept(&self) {
        self.free().clear();
    }

    fn free(&self) -> MutexGuard<'_, Vec<Pipe>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// EMFILE (this process) or ENFILE (the whole system).
pub fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn returned_pipes_are_reused_bounded_and_released() {
        let pool = PipePool::new(4);
        let first = pool.take().expect("pipe");
        let fd = first.read.as_raw_fd();
        pool.give_back(first);
        let again = pool.take().expect("pipe");
        assert_eq!(again.read.as_raw_fd(), fd, "the kept pipe is reused");

        let many: Vec<Pipe> = (0..6).map(|_| pool.take().expect("pipe")).collect();
        many.into_iter().for_each(|pipe| pool.give_back(pipe));
        assert_eq!(pool.free().len(), 4);
        pool.release_kept();
        assert!(pool.free().is_empty());
        drop(again);
    }

    #[test]
    fn running_out_of_descriptors_frees_the_kept_pipes_and_retries_once() {
        let pool = PipePool::new(4);
        pool.give_back(pool.take().expect("pipe"));
        let mut attempts = 0;
        let opened = pool.retry_out_of_descriptors(|| {
            attempts += 1;
            if attempts == 1 {
                Err(io::Error::from_raw_os_error(nix::libc::EMFILE))
            } else {
                Ok(attempts)
            }
        });
        assert_eq!(opened.expect("second attempt"), 2);
        assert!(pool.free().is_empty(), "the kept pipe was closed");

        let refused = pool.retry_out_of_descriptors(|| -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::ConnectionRefused))
        });
        assert!(refused.is_err());
    }
}
