//! What ACME keeps on disk, under `state_dir` (folders 0700, files 0600, every write a temp file renamed
//! into place). One folder per CA, so a staging account or certificate never meets production:
//!
//! ```text
//! state_dir/<ca>/account.json        the account URL and key (instant-acme's credentials)
//! state_dir/<ca>/account.lock        held while an account is created
//! state_dir/<ca>/sites/<first name>/fullchain.pem, privkey.pem, lock, retry.json
//! ```
//!
//! `lock` is an flock(2) held while that site's names are being ordered: a second instance sharing
//! `state_dir` waits, then finds the new certificate instead of ordering again. `retry.json` remembers
//! failures so that a restart does not reset the backoff.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::AccountCredentials;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Error, schedule};
use crate::Loaded;
use crate::inspect::format_time;

/// The account as stored: what `check` shows, and the credentials instant-acme restores it from.
#[derive(Serialize, Deserialize)]
pub struct StoredAccount {
    /// The account URL at the CA.
    pub id: String,
    pub directory: String,
    pub email: Option<String>,
    pub credentials: AccountCredentials,
}

impl std::fmt::Debug for StoredAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredAccount")
            .field("id", &self.id)
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

/// Failures in a row for one site, and when the next attempt may start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Retry {
    pub failures: u32,
    /// Seconds since the epoch.
    pub next_attempt: u64,
    /// The last error, as logged.
    pub error: String,
}

impl Retry {
    pub fn next_attempt(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.next_attempt)
    }
}

/// An exclusive flock(2); released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _held: Flock<File>,
}

/// One CA's folder under `state_dir`.
#[derive(Debug, Clone)]
pub struct Store {
    state_dir: PathBuf,
    dir: PathBuf,
}

impl Store {
    pub fn new(acme: &portcullis_config::Acme) -> Store {
        Store {
            state_dir: acme.state_dir.clone(),
            dir: acme.state_dir.join(slug(&acme.directory)),
        }
    }

    /// This CA's name, as its folder is named (what `[cluster]` keys its shared state under).
    pub fn ca(&self) -> String {
        slug_of(&self.dir)
    }

    /// Creates the folders (0700) and proves they are writable with a file written, renamed and removed.
    /// Run before the first order: a misconfigured `state_dir` must not cost the CA an order.
    pub fn prepare(&self) -> Result<(), Error> {
        private_dir(&self.state_dir)?;
        private_dir(&self.dir)?;
        let probe = self.dir.join(format!(".probe-{}", std::process::id()));
        write_atomic(&probe, b"portcullis")?;
        fs::remove_file(&probe).map_err(Error::store(&probe))
    }

    pub fn account(&self) -> Result<Option<StoredAccount>, Error> {
        let path = self.dir.join("account.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    path,
                    why: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Store { path, source: e }),
        }
    }

    pub fn save_account(&self, account: &StoredAccount) -> Result<(), Error> {
        let path = self.dir.join("account.json");
        let json = serde_json::to_vec_pretty(account).map_err(|e| Error::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    /// Sets the stored account aside (as `account.json.gone`) when the CA no longer knows it.
    pub fn forget_account(&self) -> Result<(), Error> {
        let path = self.dir.join("account.json");
        fs::rename(&path, self.dir.join("account.json.gone")).map_err(Error::store(path))
    }

    /// The lock held while an account is created (`None`: another instance holds it).
    pub fn lock_account(&self) -> Result<Option<Lock>, Error> {
        try_lock(&self.dir.join("account.lock"))
    }

    /// The folder of the site whose names are `names` (named after the first).
    pub fn site(&self, names: &[String]) -> SiteStore {
        let first = names.first().map_or("default", String::as_str);
        SiteStore {
            dir: self.dir.join("sites").join(first.replace(['/', '\0'], "_")),
            names: names.to_vec(),
        }
    }
}

/// One site's certificate, key, lock and retry state.
#[derive(Debug, Clone)]
pub struct SiteStore {
    dir: PathBuf,
    names: Vec<String>,
}

impl SiteStore {
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("fullchain.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("privkey.pem")
    }

    /// The stored certificate, checked as every swap is (key fits, not expired, covers the names).
    /// `Ok(None)`: none stored yet; `Err`: one is stored but unusable (so a new one is needed).
    pub fn load(&self) -> Result<Option<Loaded>, Error> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() && !key.exists() {
            return Ok(None);
        }
        crate::load_checked(&cert, &key, &self.names)
            .map(Some)
            .map_err(Error::Issued)
    }

    /// Checks an issued chain and its key, then writes both (temp files, checked, renamed: key first).
    pub fn save(&self, chain_pem: &str, key_pem: &str) -> Result<Loaded, Error> {
        private_dir(&self.dir)?;
        let (cert, key) = (self.cert_path(), self.key_path());
        let (cert_tmp, key_tmp) = (tmp_path(&cert), tmp_path(&key));
        write_file(&cert_tmp, chain_pem.as_bytes())?;
        write_file(&key_tmp, key_pem.as_bytes())?;
        let loaded = match crate::load_checked(&cert_tmp, &key_tmp, &self.names) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_file(&cert_tmp);
                let _ = fs::remove_file(&key_tmp);
                return Err(Error::Issued(e));
            }
        };
        fs::rename(&key_tmp, &key).map_err(Error::store(&key))?;
        fs::rename(&cert_tmp, &cert).map_err(Error::store(&cert))?;
        sync_dir(&self.dir);
        Ok(loaded)
    }

    /// The lock held while these names are ordered (`None`: another instance is ordering them).
    pub fn lock(&self) -> Result<Option<Lock>, Error> {
        private_dir(&self.dir)?;
        try_lock(&self.dir.join("lock"))
    }

    pub fn retry(&self) -> Option<Retry> {
        let bytes = fs::read(self.dir.join("retry.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_retry(&self, retry: &Retry) -> Result<(), Error> {
        private_dir(&self.dir)?;
        let path = self.dir.join("retry.json");
        let json = serde_json::to_vec(retry).map_err(|e| Error::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    pub fn clear_retry(&self) {
        let _ = fs::remove_file(self.dir.join("retry.json"));
    }
}

/// What `portcullis check` says about one ACME site: the account, the certificate's expiry, the next
/// renewal (ARI, asked at run time, may move it earlier) and any failures being backed off from.
pub fn report(acme: &portcullis_config::Acme, names: &[String]) -> Vec<String> {
    let store = Store::new(acme);
    let mut out = Vec::new();
    out.push(match store.account() {
        Ok(Some(a)) => format!("account {} at {}", a.id, acme.directory),
        Ok(None) => format!(
            "no account yet at {}: created before the first order",
            acme.directory
        ),
        Err(e) => format!("account unreadable ({e}): a new one is created before the next order"),
    });
    let site = store.site(names);
    out.push(match site.load() {
        Ok(Some(l)) => format!(
            "certificate {} expires {}; renewal at {}{}",
            l.info.serial,
            format_time(l.info.not_after),
            format_time(schedule::renewal_time(&l.info, acme.renew_before)),
            " (earlier if the CA's ARI window says so)"
        ),
        Ok(None) => "no certificate yet: ordered at start; until then the site serves a bootstrap certificate".to_owned(),
        Err(e) => format!("stored certificate unusable ({e}): ordered again at start"),
    });
    if let Some(r) = site.retry() {
        out.push(format!(
            "{} failed attempt(s); next attempt at {}; last error: {}",
            r.failures,
            format_time(r.next_attempt()),
            r.error
        ));
    }
    out
}

fn slug_of(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// The CA's folder name: its directory URL with every character but `[A-Za-z0-9.-]` made `_`.
fn slug(directory: &str) -> String {
    let rest = directory.strip_prefix("https://").unwrap_or(directory);
    rest.trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates `dir` (and parents) 0700, and tightens an existing one that others could read.
fn private_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::store(dir))?;
    let meta = fs::metadata(dir).map_err(Error::store(dir))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(Error::store(dir))?;
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a new 0600 file (replacing a leftover one) and flushes it to disk.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::store(path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::store(path))
}

/// `path` replaced atomically: a temp file beside it, then rename(2).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = tmp_path(path);
    write_file(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(Error::store(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes renames in `dir` durable; best effort (some filesystems refuse fsync on a folder).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn try_lock(path: &Path) -> Result<Option<Lock>, Error> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(Error::store(path))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(Lock { _held: l })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::Store {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme(dir: &Path) -> portcullis_config::Acme {
        portcullis_config::Acme {
            email: None,
            directory: "https://127.0.0.1:14000/dir".into(),
            state_dir: dir.join("state"),
            challenge: portcullis_config::AcmeChallenge::Http01,
            ca_root: None,
            eab: None,
            renew_before: None,
            self_check: true,
            validation_port: None,
        }
    }

    #[test]
    fn folders_are_private_writes_are_atomic_and_locks_exclude() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-acme-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::new(&acme(&dir));
        store.prepare().unwrap();
        assert_eq!(store.dir, dir.join("state/127.0.0.1_14000_dir"));
        for d in [dir.join("state"), store.dir.clone()] {
            assert_eq!(
                fs::metadata(&d).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let site = store.site(&["a.test".into()]);
        assert!(site.load().unwrap().is_none());

        // A self-signed pair stands in for an issued one.
        let c = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let loaded = site
            .save(&c.cert.pem(), &c.signing_key.serialize_pem())
            .unwrap();
        assert_eq!(loaded.info.names, ["a.test"]);
        for f in [site.cert_path(), site.key_path()] {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(site.load().unwrap().is_some());
        // Only the final files remain: no temp file is left behind.
        let left: Vec<_> = fs::read_dir(&site.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.iter().all(|n| !n.to_string_lossy().contains(".tmp-")),
            "{left:?}"
        );

        // A chain that does not cover the site's names is refused and nothing is replaced.
        let other = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        assert!(matches!(
            site.save(&other.cert.pem(), &other.signing_key.serialize_pem()),
            Err(Error::Issued(_))
        ));
        assert_eq!(
            site.load().unwrap().unwrap().info.serial,
            loaded.info.serial
        );

        let held = site.lock().unwrap().unwrap();
        assert!(
            site.lock().unwrap().is_none(),
            "a second lock on the same names must wait"
        );
        drop(held);
        assert!(site.lock().unwrap().is_some());

        let r = Retry {
            failures: 2,
            next_attempt: 1_700_000_000,
            error: "x".into(),
        };
        site.save_retry(&r).unwrap();
        assert_eq!(site.retry(), Some(r));
        site.clear_retry();
        assert_eq!(site.retry(), None);
        let lines = report(&acme(&dir), &["a.test".into()]);
        assert!(lines[0].starts_with("no account yet"), "{lines:?}");
        assert!(lines[1].contains("renewal at"), "{lines:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
