//! The budgets every buffered body shares (memory, disk) and the private folder their temporary files
//! live in: [`Buffers`] lives as long as the process; [`prepare`] makes the folder at start-up.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use portcullis_config::Config;

/// What buffering may hold, and what it holds now: lives as long as the process.
#[derive(Debug)]
pub struct Buffers {
    dir: PathBuf,
    pub(super) memory_per_request: u64,
    memory_total: u64,
    disk_total: u64,
    pub(super) max_response: u64,
    memory_used: AtomicU64,
    disk_used: AtomicU64,
}

impl Buffers {
    pub fn new(config: &Config) -> Buffers {
        let b = &config.buffers;
        Buffers {
            dir: config.process.temp_dir.clone(),
            memory_per_request: b.memory_per_request,
            memory_total: b.memory,
            disk_total: b.disk,
            max_response: b.max_response,
            memory_used: AtomicU64::new(0),
            disk_used: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes of the shared memory budget, if it has them.
    pub(super) fn take_memory(&self, n: u64) -> bool {
        take(&self.memory_used, self.memory_total, n)
    }

    /// Takes `n` bytes of memory whatever the shared budget says: a body within its own budget when no
    /// file may be written either.
    pub(super) fn force_memory(&self, n: u64) {
        self.memory_used.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn give_memory(&self, n: u64) {
        self.memory_used.fetch_sub(n, Ordering::Relaxed);
    }

    pub(super) fn take_disk(&self, n: u64) -> bool {
        take(&self.disk_used, self.disk_total, n)
    }

    pub(super) fn give_disk(&self, n: u64) {
        self.disk_used.fetch_sub(n, Ordering::Relaxed);
    }

    /// (memory, disk) bytes held by buffers now.
    pub fn used(&self) -> (u64, u64) {
        (
            self.memory_used.load(Ordering::Relaxed),
            self.disk_used.load(Ordering::Relaxed),
        )
    }

    /// A new temporary file, already unlinked: nothing is left behind, whatever ends the process.
    pub(super) fn file(&self) -> io::Result<File> {
        let tmpfile = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_TMPFILE.bits())
            .open(&self.dir);
        match tmpfile {
            Ok(f) => Ok(f),
            // A filesystem without O_TMPFILE: a private name, unlinked at once.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR)
                ) =>
            {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                let name = self.dir.join(format!(
                    ".body-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&name)?;
                std::fs::remove_file(&name)?;
                Ok(f)
            }
            Err(e) => Err(e),
        }
    }
}

fn take(used: &AtomicU64, total: u64, n: u64) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
        u.checked_add(n).filter(|&t| t <= total)
    })
    .is_ok()
}

/// Makes `dir` the private temporary folder of `uid`:`gid` (created 0700 if missing). It must be a real
/// folder, not a symlink. As root, an existing folder is handed over to that user whoever owned it (files in
/// it are never opened by name, so nothing left there matters); otherwise it must already be ours: in a
/// shared `/var/tmp`, someone else may have made it first. Checked and changed through one descriptor, so a
/// folder swapped for a symlink meanwhile changes nothing.
pub fn prepare(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let show = dir.display();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {show}: {e}"))?;
    let folder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW).bits())
        .open(dir)
        .map_err(|e| format!("{show} is not a folder (a symlink is not accepted): {e}"))?;
    let meta = folder
        .metadata()
        .map_err(|e| format!("cannot read {show}: {e}"))?;
    let root = nix::unistd::geteuid().is_root();
    if meta.uid() != uid && !root {
        return Err(format!(
            "{show} belongs to uid {}, not to the service user (uid {uid}): remove it or set another \
             [process] temp_dir",
            meta.uid()
        ));
    }
    if root && (meta.uid() != uid || meta.gid() != gid) {
        std::os::unix::fs::fchown(&folder, Some(uid), Some(gid))
            .map_err(|e| format!("cannot hand {show} to uid {uid}: {e}"))?;
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        folder
            .set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {show} private (0700): {e}"))?;
    }
    Ok(())
}
