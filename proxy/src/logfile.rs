//! `[log] file`: the access log in a file of its own, reopened on SIGUSR1 (logrotate's `postrotate`). The
//! file is opened at start, before the privilege drop, as nginx's master opens its logs: a log owned by
//! root in a folder the service user cannot write is fine. Lines are written by tracing-appender's worker
//! thread (`non_blocking`, lossless: a request thread waits only when 128,000 lines are queued, as it would
//! on a full buffer), started after the drop so that it is born unprivileged like every other thread. A
//! reopen opens the path again on the blocking pool, as the service user (logrotate's `create` makes the new
//! file for it, or the folder lets it make one); the worker takes the new file at its next line, after
//! writing out the old one: every line is in one file or the other. A reopen that fails keeps the old file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::EitherWriter;

use crate::signals::Reloads;

/// Lines queued for the worker before a writer waits (tracing-appender's default).
const QUEUED_LINES: usize = 128_000;

/// The access log file; clones share it.
#[derive(Clone, Debug)]
pub struct AccessFile {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The file opened at start, until the worker starts with it.
    first: Mutex<Option<File>>,
    /// The file a reopen opened, until the worker's next line takes it.
    next: Mutex<Option<File>>,
    reopened: AtomicBool,
    /// The worker's queue, once it runs.
    sink: OnceLock<NonBlocking>,
}

impl AccessFile {
    /// Opens (or creates, 0640) `path` for appending: now, with the privileges the process starts with.
    pub fn open(path: &Path) -> io::Result<AccessFile> {
        Ok(AccessFile {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                first: Mutex::new(Some(open(path)?)),
                next: Mutex::new(None),
                reopened: AtomicBool::new(false),
                sink: OnceLock::new(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Starts the worker thread; call it after the privilege drop. Lines logged before go to standard
    /// error. The guard writes out what is queued when dropped (at exit).
    pub fn start(&self) -> Option<WorkerGuard> {
        let file = lock(&self.inner.first).take()?;
        let (sink, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(QUEUED_LINES)
            .thread_name("portcullis-access-log")
            .finish(Reopening {
                file: BufWriter::with_capacity(64 * 1024, file),
                inner: self.inner.clone(),
            });
        self.inner.sink.set(sink).ok()?;
        Some(guard)
    }

    /// Opens the path again (blocking: run it on the blocking pool); the worker's next line goes there.
    pub fn reopen(&self) -> io::Result<()> {
        let file = open(&self.inner.path)?;
        *lock(&self.inner.next) = Some(file);
        self.inner.reopened.store(true, Ordering::Release);
        Ok(())
    }
}

/// Reopens `file` at each SIGUSR1, for as long as the process runs.
pub async fn reopen_on(file: AccessFile, mut usr1: Reloads) {
    loop {
        usr1.requested().await;
        usr1.seen();
        let f = file.clone();
        match tokio::task::spawn_blocking(move || f.reopen()).await {
            Ok(Ok(())) => tracing::info!(file = %file.path().display(), "access log reopened"),
            Ok(Err(e)) => tracing::error!(
                file = %file.path().display(),
                error = %e,
                "cannot reopen the access log: lines go on to the file open before (the service user must be \
                 able to open or create the file: logrotate's `create` with its owner, or a folder it may write)"
            ),
            Err(e) => tracing::error!(error = %e, "access log reopen did not finish"),
        }
    }
}

impl<'a> MakeWriter<'a> for AccessFile {
    type Writer = EitherWriter<NonBlocking, io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        match self.inner.sink.get() {
            Some(sink) => EitherWriter::A(sink.clone()),
            None => EitherWriter::B(io::stderr()),
        }
    }
}

/// The worker's writer: the file, swapped for the reopened one at the first line after a reopen.
struct Reopening {
    file: BufWriter<File>,
    inner: Arc<Inner>,
}

impl Write for Reopening {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.inner.reopened.swap(false, Ordering::Acquire)
            && let Some(next) = lock(&self.inner.next).take()
        {
            // Whatever is still buffered belongs to the old file.
            let _ = self.file.flush();
            self.file = BufWriter::with_capacity(64 * 1024, next);
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_after_a_reopen_go_to_the_new_file_and_none_are_lost() {
        let dir = std::env::temp_dir().join(format!("portcullis-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let log = AccessFile::open(&path).unwrap();
        let guard = log.start().unwrap();
        let mut w = log.make_writer();
        for i in 0..100 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen().unwrap();
        for i in 100..200 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(w);
        drop(guard);
        let old = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let all: Vec<&str> = old.lines().chain(new.lines()).collect();
        assert_eq!(all.len(), 200);
        for (i, l) in all.iter().enumerate() {
            assert_eq!(*l, format!("line {i}"));
        }
        assert!(new.lines().count() >= 100, "{new}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
