//! The site set served, across config reloads. [`Current::prepare`] builds the `Sites` a config names: a
//! site whose names and certificate source are those of a site served now is kept as it is (its
//! `SiteCert`, so the certificate it serves, the reloader's watch on its files, its OCSP staple and its ACME
//! task go on); every other site is loaded there and then (files checked, self-signed made, ACME
//! bootstrapped), before anything is swapped, and one failure fails the whole set. Once the snapshot holding
//! the new `Sites` is in force, [`SiteSet::commit`] starts the new sites' tasks (OCSP, ACME, the file
//! watch) and ends those of the sites that left. Routes are not here: they are the snapshot's config.

use std::fmt;
use std::sync::Arc;

use portcullis_certs::acme::Challenges;
use portcullis_certs::{Error, SiteCert, Sites};
use portcullis_config::{CertSource, Config};

use crate::acme::Acme;
use crate::cluster::acme::SharedAcme;
use crate::metrics::Metrics;
use crate::ocsp;
use crate::reload::{self, Reloader, Watched};
use crate::shutdown::{self, Retire, Retired, Shutdown};
use crate::signals::Reloads;

/// The sites in force, and what their tasks are started with; owned by the config reload task.
pub struct SiteSet {
    current: Current,
    reloader: Arc<Reloader>,
    acme: Acme,
    /// Where ACME validation answers go (the listeners find them there).
    challenges: Arc<Challenges>,
    /// `[cluster]` with its key: ACME's account, certificates and locks are shared through it.
    cluster: Option<Arc<SharedAcme>>,
    /// Where ACME attempts are counted (`/metrics`).
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    reloads: Reloads,
}

/// What a new set is built against: the sites served now (cheap to clone: `Arc`s).
#[derive(Clone, Default)]
pub struct Current {
    live: Vec<Live>,
    served: Option<(Arc<Sites>, bool)>,
}

/// One site as served: what identifies it across reloads (its names and certificate source), and its
/// certificate.
#[derive(Clone)]
struct Live {
    names: Vec<String>,
    tls: CertSource,
    cert: Arc<SiteCert>,
    /// Dropped with the last set that has the site: its OCSP and ACME tasks end.
    _retire: Arc<Retire>,
}

/// A site set built and its certificates loaded, not served yet. Dropped unused, it leaves no trace.
pub struct Prepared {
    pub sites: Arc<Sites>,
    live: Vec<Live>,
    strict: bool,
    /// Sites kept, by their place in the new set, with their certificate.
    kept: Vec<(usize, Arc<SiteCert>)>,
    added: Vec<Added>,
    /// How many sites served now are not in the new set.
    pub removed: usize,
    /// Exactly the set served now (the same sites in the same order, the same `strict_sni`): `sites` is the
    /// very `Arc` served, so the TLS config around it can stay as it is.
    pub unchanged: bool,
}

/// A site new in the set: what its tasks need.
struct Added {
    site: usize,
    names: Vec<String>,
    acme: bool,
    cert: Arc<SiteCert>,
    retired: Retired,
    watched: Option<Watched>,
}

/// Why a site set could not be loaded: which site (its place, counting the default site as 0, and its
/// first name), and its certificate's error (which names the file).
#[derive(Debug)]
pub struct LoadError {
    pub site: usize,
    pub name: Option<String>,
    pub error: Error,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "site {} ({n}): {}", self.site, self.error),
            None => write!(f, "site {}: {}", self.site, self.error),
        }
    }
}

/// The set of `config` at start: every site loaded.
pub fn load(config: &Config) -> Result<Prepared, LoadError> {
    Current::default().prepare(config)
}

impl Current {
    /// The set `config` names, against this one: kept sites as they are, the others loaded now (blocking
    /// file reads and, for ACME sites, the store: run it off the async threads).
    pub fn prepare(&self, config: &Config) -> Result<Prepared, LoadError> {
        let mut live = Vec::with_capacity(config.sites.len());
        let mut kept = Vec::new();
        let mut added = Vec::new();
        let mut same_order = config.sites.len() == self.live.len();
        for (i, site) in config.sites.iter().enumerate() {
            // Names are distinct across sites, so at most one served site matches.
            let old = self
                .live
                .iter()
                .position(|l| l.names == site.names && l.tls == site.tls);
            if let Some(j) = old {
                same_order &= i == j;
                let l = self.live[j].clone();
                kept.push((i, l.cert.clone()));
                live.push(l);
                continue;
            }
            same_order = false;
            let fresh = reload::load_site(config, i, site).map_err(|error| LoadError {
                site: i,
                name: site.names.first().cloned(),
                error,
            })?;
            let cert = SiteCert::new(fresh.loaded.key.clone());
            let (retire, retired) = shutdown::retire();
            added.push(Added {
                site: i,
                names: site.names.clone(),
                acme: matches!(site.tls, CertSource::Acme { .. }),
                watched: fresh.watched(i, &site.names, &cert),
                cert: cert.clone(),
                retired,
            });
            live.push(Live {
                names: site.names.clone(),
                tls: site.tls.clone(),
                cert,
                _retire: Arc::new(retire),
            });
        }
        let removed = self.live.len() - kept.len();
        let strict = config.strict_sni;
        let unchanged = same_order && self.served.as_ref().is_some_and(|(_, s)| *s == strict);
        let sites = match &self.served {
            Some((sites, _)) if unchanged => sites.clone(),
            _ => Arc::new(Sites::new(
                live.iter()
                    .map(|l| (l.names.clone(), l.cert.clone()))
                    .collect(),
                0,
                strict,
            )),
        };
        Ok(Prepared {
            sites,
            live,
            strict,
            kept,
            added,
            removed,
            unchanged,
        })
    }
}

impl Prepared {
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    pub fn added(&self) -> usize {
        self.added.len()
    }
}

impl SiteSet {
    /// The set served at start (`prepared`, from `config`, whose `Sites` the first snapshot holds), its
    /// tasks started. ACME's validation answers go to `challenges`, its shared state (with `[cluster]`)
    /// to `cluster`.
    pub fn start(
        config: &Config,
        prepared: Prepared,
        reloader: Arc<Reloader>,
        (challenges, cluster): (Arc<Challenges>, Option<Arc<SharedAcme>>),
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        reloads: Reloads,
    ) -> SiteSet {
        let mut set = SiteSet {
            current: Current::default(),
            reloader,
            acme: Acme::new(config, challenges.clone(), cluster.clone(), metrics.clone()),
            challenges,
            cluster,
            metrics,
            shutdown,
            reloads,
        };
        set.commit(config, prepared);
        set
    }

    /// What the next set is built against.
    pub fn current(&self) -> Current {
        self.current.clone()
    }

    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Makes `prepared` (built from `config`) the set in force, once the snapshot holding its `Sites` is
    /// installed: the reloader follows its file-backed sites (kept ones as they were), each new site gets
    /// its OCSP task and, for ACME, its order task; the sites no longer in it stop being followed, and their
    /// tasks end. Open connections to such a site keep their certificate and finish. ACME starts with the
    /// first `[acme]` there is (the process may have started without an ACME site, hence without one).
    pub fn commit(&mut self, config: &Config, prepared: Prepared) {
        if !self.acme.enabled() {
            self.acme = Acme::new(
                config,
                self.challenges.clone(),
                self.cluster.clone(),
                self.metrics.clone(),
            );
        }
        let Prepared {
            sites,
            live,
            strict,
            kept,
            added,
            ..
        } = prepared;
        let mut watched = Vec::new();
        for a in added {
            let label = label(a.site, &a.names);
            tokio::spawn(ocsp::run(
                a.cert.clone(),
                label.clone(),
                self.shutdown.clone(),
                a.retired.clone(),
            ));
            if a.acme {
                // Only SIGHUPs after this one are the new task's "retry now".
                let mut reloads = self.reloads.clone();
                reloads.seen();
                let started = self.acme.start(
                    label.clone(),
                    a.names,
                    a.cert,
                    a.retired,
                    self.shutdown.clone(),
                    reloads,
                );
                // The checker gives every config with an ACME site its `[acme]`: this is only a guard.
                if !started {
                    tracing::error!(site = %label, "no [acme] settings: this site's certificate is not ordered");
                }
            }
            watched.extend(a.watched);
        }
        self.reloader.follow(&kept, watched);
        // The set replaced here held the only `Retire` of each site that left: its tasks end now.
        self.current = Current {
            live,
            served: Some((sites, strict)),
        };
    }
}

/// How the log of a site's tasks names it: its first name, or its place for a default site without names
/// (a place can change with a reload; a name cannot).
fn label(site: usize, names: &[String]) -> String {
    names.first().cloned().unwrap_or_else(|| format!("#{site}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

    use std::path::Path;

    use super::*;

    /// A config of self-signed sites: the default one (no names) and a `[[site]]` per entry of `names`.
    fn config(names: &[&str], strict: bool) -> Config {
        let mut text = format!(
            "strict_sni = {strict}\n[listen]\nhttps = [\"127.0.0.1:8443\"]\n[tls]\nself_signed = true\n\
             [[route]]\npath = \"/\"\nupstream = \"app\"\n[upstream.app]\nservers = [\"127.0.0.1:5001\"]\n"
        );
        for n in names {
            text.push_str(&format!(
                "[[site]]\nnames = [\"{n}\"]\ntls = {{ self_signed = true }}\n  [[site.route]]\n  path = \"/\"\n  upstream = \"app\"\n"
            ));
        }
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), &text).unwrap()
    }

    /// What the next set is built against once `p` is in force (what `commit` keeps, without its tasks).
    fn served(p: &Prepared) -> Current {
        Current {
            live: p.live.clone(),
            served: Some((p.sites.clone(), p.strict)),
        }
    }

    #[test]
    fn unchanged_sites_keep_their_certificate_and_new_ones_are_loaded() {
        let first = load(&config(&["a.test", "b.test"], false)).unwrap();
        assert_eq!((first.kept(), first.added(), first.removed), (0, 3, 0));
        let now = served(&first);

        // The same sites: the very same set.
        let same = now.prepare(&config(&["a.test", "b.test"], false)).unwrap();
        assert!(same.unchanged && Arc::ptr_eq(&same.sites, &first.sites));

        // a.test goes, c.test comes, b.test moves up: b keeps its certificate (the same `SiteCert`, so
        // what a reload or renewal swaps into one set the other sees too).
        let next = now.prepare(&config(&["b.test", "c.test"], false)).unwrap();
        assert!(!next.unchanged);
        assert_eq!((next.kept(), next.added(), next.removed), (2, 1, 1));
        assert!(Arc::ptr_eq(
            next.sites.cert(1).unwrap(),
            first.sites.cert(2).unwrap()
        ));
        assert_eq!(next.sites.site_for("b.test"), Some(1));
        assert_eq!(next.sites.site_for("a.test"), None);
        assert_eq!(next.sites.site_for("c.test"), Some(2));
        let renewed = portcullis_certs::self_signed(&["b.test".into()]).unwrap();
        first.sites.swap(2, renewed.clone());
        assert!(Arc::ptr_eq(&next.sites.current(1).unwrap(), &renewed));

        // The same sites under another SNI rule: a new set around the same certificates.
        let strict = now.prepare(&config(&["a.test", "b.test"], true)).unwrap();
        assert!(!strict.unchanged && !Arc::ptr_eq(&strict.sites, &first.sites));
        assert_eq!((strict.kept(), strict.added()), (3, 0));
        assert_eq!(strict.sites.site_for_sni(Some("other.test")), None);
    }

    #[tokio::test]
    async fn a_site_that_leaves_the_set_ends_its_tasks() {
        let first = load(&config(&["a.test"], false)).unwrap();
        let mut retired = first.added[1].retired.clone();
        let mut now = served(&first);
        drop(first);
        let kept = now.prepare(&config(&["a.test"], false)).unwrap();
        now = served(&kept);
        drop(kept);
        assert!(
            futures_util::FutureExt::now_or_never(retired.wait()).is_none(),
            "a kept site's tasks go on"
        );
        let without = now.prepare(&config(&[], false)).unwrap();
        now = served(&without);
        drop(without);
        retired.wait().await;
        assert_eq!(now.live.len(), 1);
    }
}
