//! One buffered body: a queue of pieces, each in memory or a range of the body's temporary file, written by
//! one side ([`Writer`]) and read by the other ([`Reader`], a body hyper sends). A request body is written
//! whole before it is read; a response body is read while it is written. Memory pieces are used while the
//! body's own budget and the shared one allow, then the file (created on first need, up to `file_cap` and
//! the shared disk budget); when neither allows, a writer that may wait does (the body then streams at the
//! reader's pace), one that may not is told the spool is full. Everything a spool holds goes back to the
//! budgets when both sides are gone; its file, unlinked from the start, closes with it. A reader takes each
//! piece off the queue as it reads it (memory goes back to the budgets at once), unless it was asked for a
//! replay ([`Reader::replay`], a request written whole that may be sent again): then it and its replays
//! read the queue with a cursor of their own and leave it whole.

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
            len: None,
            cursor: None,
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
    /// The whole body's length, when known.
    len: Option<u64>,
    /// Where a reader that leaves the pieces in place is; `None`: it takes them off as it reads.
    cursor: Option<Cursor>,
}

/// A position in the queue: piece `piece`, `at` bytes into it (file pieces are read in steps).
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    piece: usize,
    at: u64,
}

impl Reader {
    /// Says how many bytes the body has in all (a request written whole, or a declared length).
    pub fn with_len(mut self, len: Option<u64>) -> Reader {
        self.left = len;
        self.len = len;
        self
    }

    /// Another reader of the same body from its start, for a request sent again: only for a body written
    /// whole, of known length, before this reader has taken anything. From then on this reader leaves the
    /// pieces in place too (their memory stays taken until every reader is gone).
    pub fn replay(&mut self) -> Option<Reader> {
        let st = self.spool.lock();
        if st.end != End::Done || self.read.is_some() || self.len.is_none() {
            return None;
        }
        if self.cursor.is_none() {
            if self.left != self.len {
                // Pieces were taken off already.
                return None;
            }
            self.cursor = Some(Cursor::default());
        }
        drop(st);
        Some(Reader {
            spool: self.spool.clone(),
            read: None,
            left: self.len,
            len: self.len,
            cursor: Some(Cursor::default()),
        })
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
            if self.cursor.is_some() {
                return self.poll_in_place(cx);
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

    /// `poll_data` for a reader that leaves the pieces in place (a replayable request body): the next
    /// piece after its cursor, cloned from memory or read from the file.
    fn poll_in_place(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let Some(mut c) = self.cursor else {
            return Poll::Ready(None);
        };
        let st = self.spool.lock();
        let next = match st.pieces.get(c.piece) {
            Some(Piece::Memory(b)) => {
                c.piece += 1;
                Ok(b.clone())
            }
            Some(&Piece::File { start, end }) => {
                let from = start + c.at;
                let n = end.saturating_sub(from).min(READ);
                if from + n >= end {
                    c = Cursor {
                        piece: c.piece + 1,
                        at: 0,
                    };
                } else {
                    c.at += n;
                }
                Err((from, n, st.file.clone()))
            }
            None => {
                return match st.end {
                    End::Done => Poll::Ready(None),
                    // Only a spool written whole is replayed: nothing else can be missing.
                    End::Failed | End::Open => Poll::Ready(Some(Err(Box::new(BrokenOff)))),
                };
            }
        };
        drop(st);
        self.cursor = Some(c);
        match next {
            Ok(b) => Poll::Ready(Some(Ok(self.count(b)))),
            Err((from, n, file)) => {
                let Some(file) = file else {
                    return Poll::Ready(Some(Err(Box::new(BrokenOff))));
                };
                self.read = Some(tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n as usize];
                    file.read_exact_at(&mut buf, from)?;
                    Ok(Bytes::from(buf))
                }));
                // `poll_data` polls the read it has just started.
                self.poll_data(cx)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Budgets with 8 bytes of memory per body, the file in a fresh folder of the system's temp dir.
    fn buffers(dir: &std::path::Path) -> Arc<Buffers> {
        let text = format!(
            "[tls]\nself_signed = true\n[[route]]\npath = \"/\"\nupstream = \"a\"\n[upstream.a]\nservers = [\"127.0.0.1:1\"]\n[buffers]\nmemory_per_request = 8\nmemory = 1048576\n[process]\ntemp_dir = \"{}\"\n",
            dir.display()
        );
        let config = portcullis_config::Config::parse(std::path::Path::new("t.toml"), &text)
            .expect("a valid test config");
        Arc::new(Buffers::new(&config))
    }

    async fn read_all(r: &mut Reader) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = std::future::poll_fn(|cx| r.poll_data(cx)).await {
            out.extend_from_slice(&b.expect("no read error"));
        }
        out
    }

    #[tokio::test]
    async fn a_request_spool_written_whole_replays_from_memory_and_file() {
        let dir = std::env::temp_dir().join(format!("portcullis-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let buffers = buffers(&dir);
        let (mut w, r) = new(buffers.clone(), 1 << 20);
        // 6 bytes in memory, then 200 000 in the file (several 64 KiB reads), then the file again.
        let mut body = b"memory".to_vec();
        w.push(Bytes::from_static(b"memory"), false).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        w.push(Bytes::from(big.clone()), false).await.unwrap();
        body.extend_from_slice(&big);
        w.push(Bytes::from_static(b"tail"), false).await.unwrap();
        body.extend_from_slice(b"tail");
        w.finish();
        let mut r = r.with_len(Some(body.len() as u64));

        let mut again = r.replay().expect("written whole: replayable");
        let mut third = again.replay().expect("a replay replays too");
        assert_eq!(read_all(&mut r).await, body);
        assert!(r.is_end_stream());
        assert_eq!(
            read_all(&mut again).await,
            body,
            "the pieces are still there"
        );
        drop((r, again));
        assert_eq!(read_all(&mut third).await, body);
        drop(third);
        assert_eq!(
            buffers.used(),
            (0, 0),
            "everything went back to the budgets"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_spool_is_not_replayed_once_read_or_before_it_is_whole() {
        let dir = std::env::temp_dir().join(format!("portcullis-spool2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut w, r) = new(buffers(&dir), 1 << 20);
        let mut r = r.with_len(Some(4));
        w.push(Bytes::from_static(b"abcd"), false).await.unwrap();
        assert!(r.replay().is_none(), "still being written");
        w.finish();
        let first = std::future::poll_fn(|cx| r.poll_data(cx)).await;
        assert_eq!(&first.unwrap().unwrap()[..], b"abcd");
        assert!(r.replay().is_none(), "its pieces were taken off already");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
