//! TLS session tickets every node can open: a [`Tickets`] is rustls' `ProducesTickets` over a key ring
//! that [`run`] keeps in step with Redis. Time is cut into epochs of [`EPOCH`]; the key of epoch `n` is
//! whatever 32 random bytes the first node to ask put at `PREFIX tickets:n` (`SET NX`, one script for the
//! epochs `n-1`, `n` and `n+1`, so that clocks a little apart still share keys). A ticket is
//! `epoch (8 bytes, big-endian) | nonce (12) | AES-256-GCM(state)`, the epoch as associated data. While
//! Redis has not given this epoch's key (down, or not yet reached), tickets are sealed with a key of this
//! node's own (an id with the top bit set, never in Redis), which only this node opens: resumption
//! elsewhere falls back to a full handshake, nothing fails. Key material is never logged.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use super::Redis;
use crate::shutdown::Shutdown;

/// How long one key seals new tickets; a ticket opens for up to two epochs after (as rustls' own
/// `Ticketer`, which rotates every 6 hours).
pub const EPOCH: Duration = Duration::from_secs(6 * 3600);
/// How often the ring is compared with Redis.
const REFRESH: Duration = Duration::from_secs(10);
const LOCAL: u64 = 1 << 63;
const KEY_LEN: usize = 32;

/// Sets each epoch's key unless another node did first, and returns the three keys.
const SCRIPT: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  redis.call('SET', k, ARGV[i], 'NX', 'EX', ARGV[4])
  out[i] = redis.call('GET', k)
end
return out
";

/// The node's ticketer: seal with the current key, open with any the ring holds.
pub struct Tickets {
    ring: ArcSwap<Ring>,
    rng: SystemRandom,
}

struct Ring {
    /// The id of the key that seals.
    seal: u64,
    keys: Vec<(u64, Arc<LessSafeKey>)>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ids only: key material is never printed.
        let ring = self.ring.load();
        let ids: Vec<u64> = ring.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("Tickets")
            .field("seal", &ring.seal)
            .field("ids", &ids)
            .finish()
    }
}

impl Tickets {
    /// A ticketer with one local key (until Redis gives the shared ones). `Err` only when the system's
    /// random source fails.
    pub fn new() -> Result<Arc<Tickets>, rustls::Error> {
        let rng = SystemRandom::new();
        let (id, key) = local_key(&rng)?;
        Ok(Arc::new(Tickets {
            ring: ArcSwap::from_pointee(Ring {
                seal: id,
                keys: vec![(id, Arc::new(key))],
            }),
            rng,
        }))
    }

    /// Whether the key that seals now is one every node has.
    pub fn shared(&self) -> bool {
        self.ring.load().seal & LOCAL == 0
    }

    /// Puts the shared keys of `epochs` (oldest first; `None` where Redis gave none) in the ring, sealing
    /// with the one of `now` when there is one, else with a local key (kept from before when there is one).
    fn install(&self, now: u64, shared: Vec<(u64, Arc<LessSafeKey>)>) -> Result<(), rustls::Error> {
        let old = self.ring.load_full();
        let mut keys = shared;
        let seal = if keys.iter().any(|(id, _)| *id == now) {
            now
        } else if old.seal & LOCAL != 0 {
            old.seal
        } else {
            let (id, key) = local_key(&self.rng)?;
            keys.push((id, Arc::new(key)));
            id
        };
        // Keys of the ring still young enough to open a ticket are kept (the local ones: this node's tickets).
        for (id, key) in &old.keys {
            if keys.iter().all(|(k, _)| k != id)
                && (*id & LOCAL != 0 || now.saturating_sub(*id) <= 1)
            {
                keys.push((*id, key.clone()));
            }
        }
        // At most the three shared epochs and two local keys.
        let mut local = 0;
        keys.retain(|(id, _)| {
            if *id & LOCAL == 0 || *id == seal {
                return true;
            }
            local += 1;
            local <= 1
        });
        self.ring.store(Arc::new(Ring { seal, keys }));
        Ok(())
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(EPOCH.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let ring = self.ring.load();
        let (id, key) = ring.keys.iter().find(|(id, _)| *id == ring.seal)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let head = id.to_be_bytes();
        let mut out = Vec::with_capacity(8 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&head);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(head),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (head, rest) = cipher.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let id = u64::from_be_bytes(*head);
        let ring = self.ring.load();
        let (_, key) = ring.keys.iter().find(|(k, _)| *k == id)?;
        let mut body = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(*head),
                &mut body,
            )
            .ok()?;
        let n = plain.len();
        body.truncate(n);
        Some(body)
    }
}

/// Keeps the ring in step with Redis every [`REFRESH`] (at once at start, and each second while it has
/// no shared key for now). Ends when shutdown begins.
pub async fn run(tickets: Arc<Tickets>, redis: Arc<Redis>, mut shutdown: Shutdown) {
    let script = redis::Script::new(SCRIPT);
    let mut was_shared = false;
    loop {
        let now = epoch_now();
        let epochs = [now.saturating_sub(1), now, now + 1];
        let keys: Vec<String> = epochs
            .iter()
            .map(|e| format!("{}tickets:{e}", redis.prefix))
            .collect();
        let mut fresh = [[0u8; KEY_LEN]; 3];
        let mut ok = true;
        for f in &mut fresh {
            ok &= tickets.rng.fill(f).is_ok();
        }
        let got = if ok {
            let ttl = EPOCH.as_secs() * 3;
            redis
                .call("ticket keys", |mut c| {
                    let mut inv = script.prepare_invoke();
                    for (k, f) in keys.iter().zip(&fresh) {
                        inv.key(k).arg(&f[..]);
                    }
                    inv.arg(ttl);
                    async move { inv.invoke_async::<Vec<Option<Vec<u8>>>>(&mut c).await }
                })
                .await
        } else {
            None
        };
        let shared: Vec<(u64, Arc<LessSafeKey>)> = got
            .unwrap_or_default()
            .into_iter()
            .zip(epochs)
            .filter_map(|(bytes, e)| {
                let bytes = bytes?;
                let key = UnboundKey::new(&AES_256_GCM, &bytes).ok()?;
                Some((e, Arc::new(LessSafeKey::new(key))))
            })
            .collect();
        if let Err(e) = tickets.install(now, shared) {
            tracing::warn!("cluster: ticket keys not renewed: {e}");
        }
        let shared_now = tickets.shared();
        if shared_now != was_shared {
            if shared_now {
                tracing::info!("cluster: session tickets sealed with the cluster's key");
            } else {
                tracing::warn!(
                    "cluster: session tickets sealed with this node's own key until Redis is back"
                );
            }
            was_shared = shared_now;
        }
        // Without this epoch's shared key, asked again as often as Redis is pinged (no cost while it is
        // down: the call is not made), so that a node shares tickets within a second of Redis answering.
        let next = if shared_now {
            REFRESH
        } else {
            super::PING_EVERY
        };
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = shutdown.begun() => return,
        }
    }
}

fn epoch_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / EPOCH.as_secs())
}

fn local_key(rng: &SystemRandom) -> Result<(u64, LessSafeKey), rustls::Error> {
    let fail = || rustls::Error::General("no random bytes for a ticket key".into());
    let mut id = [0u8; 8];
    let mut bytes = [0u8; KEY_LEN];
    rng.fill(&mut id).map_err(|_| fail())?;
    rng.fill(&mut bytes).map_err(|_| fail())?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| fail())?;
    Ok((u64::from_be_bytes(id) | LOCAL, LessSafeKey::new(key)))
}

#[cfg(test)]
mod tests {
    use rustls::server::ProducesTickets;

    use super::*;

    fn shared(id: u64, byte: u8) -> (u64, Arc<LessSafeKey>) {
        let key = UnboundKey::new(&AES_256_GCM, &[byte; KEY_LEN]).unwrap();
        (id, Arc::new(LessSafeKey::new(key)))
    }

    #[test]
    fn a_ticket_sealed_by_one_node_opens_on_another_with_the_same_epoch_key() {
        let (a, b) = (Tickets::new().unwrap(), Tickets::new().unwrap());
        // Before Redis: each node's own key; the other cannot open it.
        let own = a.encrypt(b"state").unwrap();
        assert!(!a.shared());
        assert!(b.decrypt(&own).is_none());
        a.install(100, vec![shared(99, 1), shared(100, 2), shared(101, 3)])
            .unwrap();
        b.install(100, vec![shared(99, 1), shared(100, 2), shared(101, 3)])
            .unwrap();
        assert!(a.shared() && b.shared());
        let ticket = a.encrypt(b"state").unwrap();
        assert_eq!(b.decrypt(&ticket).unwrap(), b"state");
        // What a sealed with its own key before still opens there.
        assert_eq!(a.decrypt(&own).unwrap(), b"state");
        // Tampered, or cut short: refused, no panic.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(b.decrypt(&bad).is_none());
        assert!(b.decrypt(&ticket[..10]).is_none());
        assert!(b.decrypt(&[]).is_none());
    }

    #[test]
    fn without_this_epochs_key_a_node_seals_with_its_own_and_keeps_older_shared_ones() {
        let a = Tickets::new().unwrap();
        a.install(100, vec![shared(100, 2)]).unwrap();
        let old = a.encrypt(b"s").unwrap();
        // Redis gave nothing for epoch 101: a local key seals; epoch 100's still opens.
        a.install(101, Vec::new()).unwrap();
        assert!(!a.shared());
        assert_eq!(a.decrypt(&old).unwrap(), b"s");
        // Two epochs on, 100's key is gone.
        a.install(102, Vec::new()).unwrap();
        assert!(a.decrypt(&old).is_none());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let a = Tickets::new().unwrap();
        a.install(7, vec![shared(7, 0xAB)]).unwrap();
        let text = format!("{a:?}");
        assert!(text.contains("seal: 7"), "{text}");
        assert!(!text.to_lowercase().contains("abab"), "{text}");
    }
}
