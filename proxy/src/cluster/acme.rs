//! ACME state shared through `[cluster]`'s Redis: the account, each site's certificate and key, one lease
//! lock per site (so that one node orders for the whole cluster), and the challenge answers every node
//! serves. Keys, under the prefix `P` and the CA's folder name `C` (as in `state_dir`):
//!
//! ```text
//! P acme:C:account            sealed account (instant-acme's credentials, as account.json)
//! P acme:C:account-lock       lease held while the account is created
//! P acme:C:cert:NAME          hash: fence (the holder's fencing number), sealed (chain + key)
//! P acme:C:lock:NAME          lease: the holder's random token, SET NX PX, renewed while it orders
//! P acme:C:fence:NAME         INCR'd by each new holder; a write with an older number is refused
//! P acme:C:failed:NAME        the last holder's attempt failed: "node-id error", for the backoff's length
//! P acme:http01:TOKEN         key authorization (what the CA is served anyway), with a TTL
//! P acme:tlsalpn01:NAME       sealed TLS-ALPN-01 certificate and key, with a TTL
//! ```
//!
//! Everything secret is sealed with AES-256-GCM under `[cluster] key_file` (`nonce | ciphertext | tag`, the
//! Redis key name, and for a certificate its fence, as associated data: a blob moved to another key or
//! fence does not open), so a Redis dump is no key leak. Every round trip is `None` while Redis is down; a
//! listener's lookup of another node's challenge answer is bounded by `[cluster] timeout`
//! (`Redis::call`), the ACME task's own round trips, which no request waits on, by
//! `Redis::call_background`.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use portcullis_certs::acme::{Answer, Share, ShareFuture};

use super::Redis;

/// How long a lock outlives its holder's last renewal (it renews every third of it).
pub const LEASE: Duration = Duration::from_secs(60);
/// Tests shorten the lease (milliseconds) to see a dead holder's lock expire quickly.
pub const LEASE_ENV: &str = "PORTCULLIS_TEST_ACME_LEASE_MS";
/// How long a published challenge answer lives (an attempt gives up after ten minutes).
const ANSWER_TTL: Duration = Duration::from_secs(600);
const KEY_LEN: usize = 32;

/// Takes the lock if it is free and returns the new fencing number, else 0.
const TAKE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
";
/// Extends the lease, if this token still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";
/// Deletes the lock, if this token still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";
/// Stores a certificate unless a newer holder took the lock since (its fence is higher).
const STORE: &str = r"
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < latest then
  return 0
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'sealed', ARGV[2])
return 1
";

/// The ACME side of `[cluster]`: the Redis, the sealing key, the lease.
pub struct SharedAcme {
    redis: Arc<Redis>,
    /// This process among the nodes (random): whose failure a `failed:` key records.
    node: String,
    key: LessSafeKey,
    rng: SystemRandom,
    lease: Duration,
    take: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    store: redis::Script,
}

impl std::fmt::Debug for SharedAcme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SharedAcme")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// A certificate as the cluster stores it: the fence of the holder that wrote it, its chain and key (PEM).
pub struct Stored {
    pub fence: u64,
    pub chain_pem: String,
    pub key_pem: String,
}

/// What Redis holds does not open with this node's `key_file` (another key, or not ours).
#[derive(Debug, Clone, Copy)]
pub struct Foreign;

/// A held lock: renewed in the background until released (or dropped, which releases it too).
pub struct Lease {
    shared: Arc<SharedAcme>,
    key: String,
    token: String,
    /// This holder's fencing number: what its certificate is stored with.
    pub fence: u64,
    renewing: tokio::task::JoinHandle<()>,
    released: bool,
}

impl SharedAcme {
    /// Reads `key_file` (now, with the privileges the process starts with): 32 bytes, base64 or hex.
    pub fn open(redis: Arc<Redis>, key_file: &std::path::Path) -> Result<SharedAcme, String> {
        let text = std::fs::read_to_string(key_file)
            .map_err(|e| format!("cluster.key_file: cannot read {}: {e}", key_file.display()))?;
        let bytes = decode_key(text.trim()).ok_or_else(|| {
            format!(
                "cluster.key_file: {} does not hold 32 bytes in base64 or hex (make one with \
                 `openssl rand -base64 32`)",
                key_file.display()
            )
        })?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| "cluster.key_file: not an AES-256 key".to_owned())?;
        let lease = std::env::var(LEASE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(LEASE, Duration::from_millis);
        let rng = SystemRandom::new();
        let mut id = [0u8; 8];
        rng.fill(&mut id)
            .map_err(|_| "cluster: the system's random source failed".to_owned())?;
        Ok(SharedAcme {
            redis,
            node: hex(&id),
            key: LessSafeKey::new(key),
            rng,
            lease,
            take: redis::Script::new(TAKE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            store: redis::Script::new(STORE),
        })
    }

    /// Redis answers now.
    pub fn is_up(&self) -> bool {
        self.redis.is_up()
    }

    fn key(&self, ca: &str, what: &str) -> String {
        format!("{}acme:{ca}:{what}", self.redis.prefix)
    }

    /// The account, opened (`None`: none stored, or Redis down: see [`SharedAcme::is_up`]; `Some(Err)`:
    /// one is stored that this node's key does not open).
    pub async fn account(&self, ca: &str) -> Option<Result<Vec<u8>, Foreign>> {
        let key = self.key(ca, "account");
        let k = key.clone();
        let sealed: Option<Vec<u8>> = self
            .redis
            .call_background("acme account", move |mut c| async move {
                redis::cmd("GET").arg(k).query_async(&mut c).await
            })
            .await?;
        Some(self.unseal(key.as_bytes(), &sealed?).ok_or(Foreign))
    }

    pub async fn save_account(&self, ca: &str, json: &[u8]) -> bool {
        let key = self.key(ca, "account");
        let Some(sealed) = self.seal(key.as_bytes(), json) else {
            return false;
        };
        self.redis
            .call_background("acme account", move |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(sealed)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .is_some()
    }

    /// The CA no longer knows the account: the next node to need one makes a new one.
    pub async fn forget_account(&self, ca: &str) {
        let key = self.key(ca, "account");
        let _ = self
            .redis
            .call_background("acme account", move |mut c| async move {
                redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
            })
            .await;
    }

    /// The lock for site `name` (or `"account"` for the account's): `Err(())` when Redis cannot be asked,
    /// `Ok(None)` when another node holds it.
    pub async fn try_lock(self: &Arc<Self>, ca: &str, name: &str) -> Result<Option<Lease>, ()> {
        let (lock, fence) = if name == "account" {
            (self.key(ca, "account-lock"), self.key(ca, "account-fence"))
        } else {
            (
                self.key(ca, &format!("lock:{name}")),
                self.key(ca, &format!("fence:{name}")),
            )
        };
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw).map_err(|_| ())?;
        let token = hex(&raw);
        let (k1, k2, t) = (lock.clone(), fence, token.clone());
        let ms = millis(self.lease);
        let script = self.take.clone();
        let got: u64 = self
            .redis
            .call_background("acme lock", move |mut c| async move {
                script
                    .key(k1)
                    .key(k2)
                    .arg(t)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .ok_or(())?;
        if got == 0 {
            return Ok(None);
        }
        let renewing = tokio::spawn(renew(self.clone(), lock.clone(), token.clone()));
        Ok(Some(Lease {
            shared: self.clone(),
            key: lock,
            token,
            fence: got,
            renewing,
            released: false,
        }))
    }

    /// The fence of the certificate stored for `name` (what the nodes poll; `None`: none, or Redis down).
    pub async fn version(&self, ca: &str, name: &str) -> Option<u64> {
        let key = self.key(ca, &format!("cert:{name}"));
        self.redis
            .call_background("acme version", move |mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("fence")
                    .query_async::<Option<u64>>(&mut c)
                    .await
            })
            .await
            .flatten()
    }

    /// The certificate stored for `name`, opened. `None`: none, or Redis down; `Some(Err(fence))`: one is
    /// stored (under `fence`) that this node's key does not open (logged).
    pub async fn cert(&self, ca: &str, name: &str) -> Option<Result<Stored, (Foreign, u64)>> {
        let key = self.key(ca, &format!("cert:{name}"));
        let k = key.clone();
        let (fence, sealed): (Option<u64>, Option<Vec<u8>>) = self
            .redis
            .call_background("acme certificate", move |mut c| async move {
                redis::cmd("HMGET")
                    .arg(k)
                    .arg("fence")
                    .arg("sealed")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let (fence, sealed) = (fence?, sealed?);
        let Some(plain) = self.unseal(cert_aad(&key, fence).as_bytes(), &sealed) else {
            tracing::warn!(
                key,
                "the cluster's certificate does not open with this node's cluster.key_file (another key?)"
            );
            return Some(Err((Foreign, fence)));
        };
        let Some((chain, key_pem)) = split(&plain) else {
            return Some(Err((Foreign, fence)));
        };
        Some(Ok(Stored {
            fence,
            chain_pem: chain,
            key_pem,
        }))
    }

    /// Stores a new certificate for `name` under `lease`'s fence: false when a newer holder took the lock
    /// since (fenced off) or Redis could not be written.
    pub async fn save_cert(
        &self,
        ca: &str,
        name: &str,
        lease: &Lease,
        chain: &str,
        key: &str,
    ) -> bool {
        let hkey = self.key(ca, &format!("cert:{name}"));
        let fkey = self.key(ca, &format!("fence:{name}"));
        let plain = join(chain, key);
        let Some(sealed) = self.seal(cert_aad(&hkey, lease.fence).as_bytes(), &plain) else {
            return false;
        };
        let (script, fence) = (self.store.clone(), lease.fence);
        let stored: Option<u64> = self
            .redis
            .call_background("acme certificate", move |mut c| async move {
                script
                    .key(hkey)
                    .key(fkey)
                    .arg(fence)
                    .arg(sealed)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        stored == Some(1)
    }

    /// Records that this node's attempt for `name` failed (`why`), for `hold` (the first backoff).
    pub async fn mark_failed(&self, ca: &str, name: &str, why: &str, hold: Duration) {
        let key = self.key(ca, &format!("failed:{name}"));
        let value = format!("{} {why}", self.node);
        let _ = self
            .redis
            .call_background("acme failure", move |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(millis(hold))
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    /// Why another node's attempt for `name` failed, while that failure holds (this node's own do not
    /// count: its own backoff already applies).
    pub async fn failed_elsewhere(&self, ca: &str, name: &str) -> Option<String> {
        let key = self.key(ca, &format!("failed:{name}"));
        let value: String = self
            .redis
            .call_background("acme failure", move |mut c| async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
            .await
            .flatten()?;
        let (node, why) = value.split_once(' ')?;
        (node != self.node).then(|| why.to_owned())
    }

    fn seal(&self, aad: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out,
            )
            .ok()?;
        let mut sealed = nonce.to_vec();
        sealed.append(&mut out);
        Some(sealed)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }

    fn answer_key(&self, a: &Answer) -> String {
        match a {
            Answer::Http01 { token, .. } => format!("{}acme:http01:{token}", self.redis.prefix),
            Answer::TlsAlpn01 { name, .. } => format!("{}acme:tlsalpn01:{name}", self.redis.prefix),
        }
    }
}

impl Share for SharedAcme {
    fn publish<'a>(&'a self, answers: &'a [Answer]) -> ShareFuture<'a, bool> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for a in answers {
                let key = self.answer_key(a);
                let value = match a {
                    Answer::Http01 {
                        key_authorization, ..
                    } => key_authorization.as_bytes().to_vec(),
                    Answer::TlsAlpn01 {
                        cert_der, key_der, ..
                    } => {
                        let Some(v) = self.seal(key.as_bytes(), &join_bytes(cert_der, key_der))
                        else {
                            return false;
                        };
                        v
                    }
                };
                pipe.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(millis(ANSWER_TTL))
                    .ignore();
            }
            self.redis
                .call_background("acme challenge", move |mut c| async move {
                    pipe.query_async::<()>(&mut c).await
                })
                .await
                .is_some()
        })
    }

    fn withdraw(&self, answers: Vec<Answer>) {
        let keys: Vec<String> = answers.iter().map(|a| self.answer_key(a)).collect();
        let redis = self.redis.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Left to expire (ANSWER_TTL) when Redis is down now.
            rt.spawn(async move {
                redis
                    .call_background("acme challenge", move |mut c| async move {
                        redis::cmd("DEL").arg(keys).query_async::<()>(&mut c).await
                    })
                    .await
            });
        }
    }

    fn http01<'a>(&'a self, token: &'a str) -> ShareFuture<'a, Option<String>> {
        Box::pin(async move {
            let key = format!("{}acme:http01:{token}", self.redis.prefix);
            self.redis
                .call("acme challenge", move |mut c| async move {
                    redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await
                .flatten()
        })
    }

    fn tls_alpn01<'a>(&'a self, name: &'a str) -> ShareFuture<'a, Option<(Vec<u8>, Vec<u8>)>> {
        Box::pin(async move {
            let key = format!("{}acme:tlsalpn01:{name}", self.redis.prefix);
            let k = key.clone();
            let sealed: Vec<u8> = self
                .redis
                .call("acme challenge", move |mut c| async move {
                    redis::cmd("GET")
                        .arg(k)
                        .query_async::<Option<Vec<u8>>>(&mut c)
                        .await
                })
                .await
                .flatten()?;
            let plain = self.unseal(key.as_bytes(), &sealed)?;
            split_bytes(&plain)
        })
    }
}

impl Lease {
    /// Gives the lock back (only if this holder still has it: compare-and-delete).
    pub async fn release(mut self) {
        self.released = true;
        self.renewing.abort();
        let (script, key, token) = (
            self.shared.release.clone(),
            self.key.clone(),
            self.token.clone(),
        );
        let _ = self
            .shared
            .redis
            .call_background("acme lock", move |mut c| async move {
                script.key(key).arg(token).invoke_async::<u64>(&mut c).await
            })
            .await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
        if self.released {
            return;
        }
        // An attempt dropped (timeout, shutdown, site removed): released in the background, else it expires.
        let (shared, key, token) = (self.shared.clone(), self.key.clone(), self.token.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let script = shared.release.clone();
                shared
                    .redis
                    .call_background("acme lock", move |mut c| async move {
                        script.key(key).arg(token).invoke_async::<u64>(&mut c).await
                    })
                    .await
            });
        }
    }
}

/// Renews the lease every third of it while the holder works; says once if it was lost.
async fn renew(shared: Arc<SharedAcme>, key: String, token: String) {
    let every = shared.lease / 3;
    let mut said = false;
    loop {
        tokio::time::sleep(every).await;
        let (script, k, t, ms) = (
            shared.renew.clone(),
            key.clone(),
            token.clone(),
            millis(shared.lease),
        );
        let renewed: Option<u64> = shared
            .redis
            .call_background("acme lock", move |mut c| async move {
                script.key(k).arg(t).arg(ms).invoke_async(&mut c).await
            })
            .await;
        if renewed == Some(0) && !said {
            said = true;
            tracing::warn!(
                lock = %key,
                "the cluster's ACME lock expired under this node (another may order): what this node \
                 gets is refused unless it still holds the newest fence"
            );
        }
    }
}

fn cert_aad(key: &str, fence: u64) -> String {
    format!("{key}#{fence}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `len(a) (4 bytes, big-endian) | a | b`.
fn join_bytes(a: &[u8], b: &[u8]) -> Vec<u8> {
    let len = u32::try_from(a.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + a.len() + b.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

fn split_bytes(v: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let len = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let a = v.get(4..4 + len)?;
    let b = v.get(4 + len..)?;
    Some((a.to_vec(), b.to_vec()))
}

fn join(chain: &str, key: &str) -> Vec<u8> {
    join_bytes(chain.as_bytes(), key.as_bytes())
}

fn split(v: &[u8]) -> Option<(String, String)> {
    let (a, b) = split_bytes(v)?;
    Some((String::from_utf8(a).ok()?, String::from_utf8(b).ok()?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 32 bytes, as 64 hex digits or base64 (standard or URL-safe, padded or not).
fn decode_key(text: &str) -> Option<Vec<u8>> {
    let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..KEY_LEN)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        portcullis_certs::acme::base64url(text)?
    };
    (bytes.len() == KEY_LEN).then_some(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

    use super::*;

    #[test]
    fn the_key_file_is_32_bytes_of_base64_or_hex() {
        // `openssl rand -hex 32` and `openssl rand -base64 32` of the same bytes.
        let hex_key = "00".repeat(31) + "ff";
        let b64 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP8=";
        assert_eq!(decode_key(&hex_key), decode_key(b64));
        assert_eq!(decode_key(b64).unwrap()[31], 0xff);
        assert!(decode_key("c2hvcnQ=").is_none());
        assert!(decode_key("not a key at all!").is_none());
    }

    #[test]
    fn a_sealed_blob_opens_only_under_its_own_name() {
        let dir = std::env::temp_dir().join(format!("portcullis-key-{}", std::process::id()));
        std::fs::write(&dir, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP8=\n").unwrap();
        let c = portcullis_config::Cluster {
            redis: "redis://127.0.0.1:1".into(),
            password_file: None,
            ca_file: None,
            prefix: "t:".into(),
            timeout: Duration::from_millis(100),
            key_file: Some(dir.clone()),
        };
        let redis = Arc::new(Redis::open(&c).unwrap());
        let s = SharedAcme::open(redis, &dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        let sealed = s.seal(b"t:acme:x:cert:a#1", b"secret key").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            s.unseal(b"t:acme:x:cert:a#1", &sealed).unwrap(),
            b"secret key"
        );
        assert!(s.unseal(b"t:acme:x:cert:a#2", &sealed).is_none());
        assert!(s.unseal(b"t:acme:x:cert:b#1", &sealed).is_none());
        let (a, b) = split(&join("chain", "key")).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("chain", "key"));
    }

    /// A real redis-server (Debian's) on a unix socket in a temp folder, killed by PID on drop.
    struct Server(std::process::Child, std::path::PathBuf);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    /// A holder whose lease ran out (it stopped renewing: paused, or cut off) cannot store over the next
    /// holder's certificate, nor release the next holder's lock.
    #[tokio::test]
    async fn a_stale_holders_late_write_is_refused() {
        let dir = std::env::temp_dir().join(format!("portcullis-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocket",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's package)");
        let _server = Server(child, dir.clone());
        let key_file = dir.join("cluster.key");
        std::fs::write(&key_file, "00".repeat(32)).unwrap();
        let c = portcullis_config::Cluster {
            redis: format!("unix://{}", sock.display()),
            password_file: None,
            ca_file: None,
            prefix: "t:".into(),
            timeout: Duration::from_millis(500),
            key_file: Some(key_file.clone()),
        };
        let redis = Arc::new(Redis::open(&c).unwrap());
        let (_trigger, shutdown) = crate::shutdown::Trigger::new();
        tokio::spawn(super::super::run(redis.clone(), shutdown));
        // Safety net only: it is up within milliseconds of the socket appearing.
        for _ in 0..200 {
            if redis.is_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(redis.is_up());
        let mut shared = SharedAcme::open(redis, &key_file).unwrap();
        shared.lease = Duration::from_millis(300);
        let shared = Arc::new(shared);

        let stale = shared.try_lock("ca", "a.test").await.unwrap().unwrap();
        assert!(shared.try_lock("ca", "a.test").await.unwrap().is_none());
        // It stops renewing; its lease runs out and another node takes the lock.
        stale.renewing.abort();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let next = shared.try_lock("ca", "a.test").await.unwrap().unwrap();
        assert!(next.fence > stale.fence);
        assert!(
            shared
                .save_cert("ca", "a.test", &next, "new chain", "new key")
                .await
        );
        assert!(
            !shared
                .save_cert("ca", "a.test", &stale, "old chain", "old key")
                .await
        );
        let stored = shared.cert("ca", "a.test").await.unwrap().unwrap();
        assert_eq!(
            (stored.fence, stored.chain_pem.as_str()),
            (next.fence, "new chain")
        );
        assert_eq!(shared.version("ca", "a.test").await, Some(next.fence));
        // Its release does not free the lock it no longer holds; the holder's does.
        stale.release().await;
        assert!(shared.try_lock("ca", "a.test").await.unwrap().is_none());
        next.release().await;
        assert!(shared.try_lock("ca", "a.test").await.unwrap().is_some());
    }
}
