//! One buffered body: a queue of pieces, each in memory or a range of the body's temporary file, written by
//! one side ([`Writer`]) and read by the other ([`Reader`], a body hyper sends). A request body is written
//! whole before it is read; a response body is read while it is written. Memory pieces are used while the
//! body's own budget and the shared one allow, then the file (created on first need, up to `file_cap` and
//! the shared disk budget); when neither allows, a writer that may wait does (the body then streams at the
//! reader's pace), one that may not is told the spool is full. Everything a spool holds goes back to the
//! budgets when both sides are gone; its file, unlinked from the start, closes with it.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::BoxError;
use super::buffers::Buffers;

/// How much one read from the file hands to hyper.
const READ: u64 = 64 * 1024;

enum Piece {
    Memory(Bytes),
    /// `start..end` of the file.
    File {
        start: u64,
        end: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Done,
    Failed,
}

struct State {
    pieces: VecDeque<Piece>,
    /// Bytes of the memory pieces not read yet (taken from the shared memory budget).
    in_memory: u64,
    file: Option<Arc<File>>,
    /// Bytes written (or being written) to the file (taken from the shared disk budget).
    file_len: u64,
    end: End,
    reader: Option<Waker>,
    writer: Option<Waker>,
    reader_gone: bool,
}

struct Spool {
    state: Mutex<State>,
    buffers: Arc<Buffers>,
    file_cap: u64,
}

impl Spool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent counters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.buffers.give_memory(st.in_memory);
        self.buffers.give_disk(st.file_len);
    }
}

/// Why a piece could not be stored.
#[derive(Debug)]
pub enum PushError {
    /// No memory within the body's budget and no file allowed (disk budget, or the file cap).
    Full,
    /// The reader went away: nobody wants the rest.
    Gone,
    /// The temporary file could not be made or written.
    Io(io::Error),
}

/// A new spool whose file may grow to `file_cap` bytes.
pub fn new(buffers: Arc<Buffers>, file_cap: u64) -> (Writer, Reader) {
    let spool = Arc::new(Spool {
        state: Mutex::new(State {
            pieces: VecDeque::new(),
            in_memory: 0,
            file: None,
            file_len: 0,
            end: End::Open,
            reader: None,
            writer: None,
            reader_gone: false,
        }),
        buffers,
        file_cap,
    });
    (
        Writer {
            spool: spool.clone(),
            finished: false,
        },
        Reader {
            spool,
            read: None,
            left: None,
        },
    )
}

pub struct Writer {
    spool: Arc<Spool>,
    finished: bool,
}

enum Place {
    Stored,
    File { at: u64, file: Option<Arc<File>> },
    Wait,
}

impl Writer {
    /// Stores `data` after what is already there. With `wait`, a spool with no room waits for the reader
    /// to take some; without, it answers [`PushError::Full`].
    pub async fn push(&mut self, data: Bytes, wait: bool) -> Result<(), PushError> {
        let n = data.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let mut data = Some(data);
        loop {
            let place = {
                let mut st = self.spool.lock();
                if st.reader_gone {
                    return Err(PushError::Gone);
                }
                let budget = self.spool.buffers.memory_per_request;
                // One piece larger than the whole budget is still taken when nothing else is in memory.
                let fits_own = st.in_memory == 0 || st.in_memory + n <= budget;
                if fits_own && self.spool.buffers.take_memory(n) {
                    st.store(data.take(), n);
                    Place::Stored
                } else if st.file_len + n <= self.spool.file_cap && self.spool.buffers.take_disk(n)
                {
                    let at = st.file_len;
                    st.file_len += n;
                    Place::File {
                        at,
                        file: st.file.clone(),
                    }
                } else if fits_own {
                    // The shared memory budget is spent and no file may be written: this body's own budget
                    // still bounds it.
                    self.spool.buffers.force_memory(n);
                    st.store(data.take(), n);
                    Place::Stored
                } else if wait {
                    Place::Wait
                } else {
                    return Err(PushError::Full);
                }
            };
            match place {
                Place::Stored => return Ok(()),
                Place::Wait => self.room(n).await,
                Place::File { at, file } => {
                    let Some(bytes) = data.take() else {
                        return Ok(());
                    };
                    return self.write_file(at, file, bytes).await;
                }
            }
        }
    }

    /// Writes `bytes` at `at` of the file (made now if this is the first), then queues that range.
    async fn write_file(
        &mut self,
        at: u64,
        file: Option<Arc<File>>,
        bytes: Bytes,
    ) -> Result<(), PushError> {
        let n = bytes.len() as u64;
        let buffers = self.spool.buffers.clone();
        let made = file.is_none();
        let file = blocking(move || {
            let file = match file {
                Some(f) => f,
                None => Arc::new(buffers.file()?),
            };
            file.write_all_at(&bytes, at)?;
            Ok(file)
        })
        .await
        .map_err(PushError::Io)?;
        let mut st = self.spool.lock();
        if made {
            st.file = Some(file);
        }
        match st.pieces.back_mut() {
            Some(Piece::File { end, .. }) if *end == at => *end = at + n,
            _ => st.pieces.push_back(Piece::File {
                start: at,
                end: at + n,
            }),
        }
        wake(&mut st.reader);
        Ok(())
    }

    /// Waits until the reader has taken enough from memory for `n` more bytes (or has gone).
    fn room(&self, n: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut st = self.spool.lock();
            let budget = self.spool.buffers.memory_per_request;
            if st.reader_gone || st.in_memory == 0 || st.in_memory + n <= budget {
                Poll::Ready(())
            } else {
                st.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// The whole body is stored: the reader ends after it.
    pub fn finish(mut self) {
        self.finished = true;
        let mut st = self.spool.lock();
        st.end = End::Done;
        wake(&mut st.reader);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.finished {
            // The body broke (or its writer was dropped): the reader fails after what is stored.
            let mut st = self.spool.lock();
            st.end = End::Failed;
            wake(&mut st.reader);
        }
    }
}

impl State {
    fn store(&mut self, data: Option<Bytes>, n: u64) {
        if let Some(d) = data {
            self.in_memory += n;
            self.pieces.push_back(Piece::Memory(d));
            wake(&mut self.reader);
        }
    }
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

/// Runs blocking file I/O off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
}

/// The body ended before it was complete (the side writing it broke off).
#[derive(Debug, thiserror::Error)]
#[error("buffered body broke off")]
pub struct BrokenOff;

/// The reading side of a spool: a body of [`Bytes`] frames.
pub struct Reader {
    spool: Arc<Spool>,
    read: Option<JoinHandle<io::Result<Bytes>>>,
    /// Bytes still to come, when known.
    left: Option<u64>,
}

impl Reader {
    /// Says how many bytes the body has in all (a request written whole, or a declared length).
    pub fn with_len(mut self, len: Option<u64>) -> Reader {
        self.left = len;
        self
    }

    pub fn left(&self) -> Option<u64> {
        self.left
    }

    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            if let Some(read) = &mut self.read {
                let got = std::task::ready!(Pin::new(read).poll(cx));
                self.read = None;
                return Poll::Ready(Some(match got {
                    Ok(Ok(b)) => Ok(self.count(b)),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e.into()),
                }));
            }
            let mut st = self.spool.lock();
            match st.pieces.pop_front() {
                Some(Piece::Memory(b)) => {
                    let n = b.len() as u64;
                    st.in_memory -= n;
                    self.spool.buffers.give_memory(n);
                    wake(&mut st.writer);
                    drop(st);
                    return Poll::Ready(Some(Ok(self.count(b))));
                }
                Some(Piece::File { start, end }) => {
                    let n = (end - start).min(READ);
                    if start + n < end {
                        st.pieces.push_front(Piece::File {
                            start: start + n,
                            end,
                        });
                    }
                    let Some(file) = st.file.clone() else {
                        return Poll::Ready(Some(Err(Box::new(BrokenOff))));
                    };
                    drop(st);
                    self.read = Some(tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        file.read_exact_at(&mut buf, start)?;
                        Ok(Bytes::from(buf))
                    }));
                }
                None => {
                    return match st.end {
                        End::Done => Poll::Ready(None),
                        End::Failed => Poll::Ready(Some(Err(Box::new(BrokenOff)))),
                        End::Open => {
                            st.reader = Some(cx.waker().clone());
                            Poll::Pending
                        }
                    };
                }
            }
        }
    }

    fn count(&mut self, b: Bytes) -> Bytes {
        if let Some(left) = &mut self.left {
            *left = left.saturating_sub(b.len() as u64);
        }
        b
    }

    pub fn is_end_stream(&self) -> bool {
        self.left == Some(0) && self.read.is_none()
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("left", &self.left).finish()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut st = self.spool.lock();
        st.reader_gone = true;
        wake(&mut st.writer);
    }
}
