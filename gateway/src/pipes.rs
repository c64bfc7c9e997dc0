//! Kernel pipes for splice(2), borrowed only while bytes are in flight and then kept for reuse.
//!
//! A spliced direction needs a pipe only between reading a chunk and writing it out, so an idle
//! connection holds none: two file descriptors per connection instead of six, no pipe2(2) and
//! close(2) per connection, and the pipes in use stay far below the per-user page budget
//! (`/proc/sys/fs/pipe-user-pages-soft`) past which the kernel hands out one-page pipes.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;

/// Free pipes a worker thread keeps; more are closed. Enough for the chunks one thread has in
/// flight at once under load, small next to the descriptors of the connections themselves.
const KEPT_PER_THREAD: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking pipe: bytes spliced into `write` come out of `read`.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A free pipe of this thread, or a new one.
    pub fn take() -> io::Result<Pipe> {
        if let Some(pipe) = FREE.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Pipe { read, write })
    }

    /// Returns an empty pipe for reuse. A pipe that may still hold bytes must be dropped
    /// instead, or they would leak into another connection.
    pub fn give_back(self) {
        FREE.with_borrow_mut(|free| {
            if free.len() < KEPT_PER_THREAD {
                free.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_returned_pipe_is_reused_and_the_pool_is_bounded() {
        let first = Pipe::take().expect("pipe");
        let fd = first.read.as_raw_fd();
        first.give_back();
        let again = Pipe::take().expect("pipe");
        assert_eq!(again.read.as_raw_fd(), fd);

        let many: Vec<Pipe> = (0..KEPT_PER_THREAD + 8)
            .map(|_| Pipe::take().expect("pipe"))
            .collect();
        many.into_iter().for_each(Pipe::give_back);
        assert_eq!(FREE.with_borrow(Vec::len), KEPT_PER_THREAD);
        drop(again);
    }
}
