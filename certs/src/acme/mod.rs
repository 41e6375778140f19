//! ACME (RFC 8555): instant-acme speaks the protocol; what is ours lives here. The account (created once,
//! stored, reused), one order for all names of a site ([`obtain`]), the challenge responses the listeners
//! serve ([`Challenges`]), certificates and keys written atomically under `state_dir` with a lock file so
//! that two instances never order the same names at once ([`Store`]), and when to renew (the CA's ARI
//! window, else two thirds into the lifetime) or retry (exponential backoff with jitter) ([`schedule`]).
//! No sockets of our own: the proxy's `acme` task drives all this, does the self-check and swaps
//! certificates in through [`crate::Sites`].

mod challenge;
mod order;
pub mod schedule;
mod store;

use std::path::PathBuf;

pub use challenge::{
    ACME_TLS_ALPN, Answer, ChallengeCert, Challenges, Pending, Share, ShareFuture,
};
pub use instant_acme::{Account, BodyWrapper, HttpClient};
/// A certificate's ARI identifier (RFC 9773 section 4.1): what a renewal order `replaces`.
pub type CertificateId = instant_acme::CertificateIdentifier<'static>;
pub use order::{Ari, Issued, ari, base64url, create_account, obtain, restore_account};
pub use store::{Lock, Retry, SiteStore, Store, StoredAccount, report};

/// Why an ACME step failed. Each says whose it was: the CA's or the network's (retried with backoff), the
/// operator's (names, state_dir), or ours.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA answered with a problem document, or could not be reached (the network's, or the CA's).
    #[error("{0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA could not validate a name: its DNS, a firewall, or another server answering for it.
    #[error("the CA could not validate {0}")]
    Validation(String),
    /// The order ended in a state we cannot use (the CA's).
    #[error("the order ended {0}")]
    Order(String),
    /// An authorization offers no challenge of the configured type (the CA's, or the operator's choice).
    #[error("the CA offers no {kind} challenge for {name}")]
    NoChallenge { name: String, kind: &'static str },
    /// `state_dir` or a file in it cannot be created, written or read (the operator's: path, owner, mode).
    #[error("{}: {source}", path.display())]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A stored file is not what we wrote (the operator's, or a crash mid-write): it is replaced.
    #[error("{}: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    /// A key, CSR or challenge certificate could not be made (ours).
    #[error("cannot generate {0}")]
    Generate(String),
    /// A certificate (just issued, or stored) fails the checks every swap passes.
    #[error("unusable certificate: {0}")]
    Issued(#[from] crate::Error),
    /// `[acme] eab.hmac_key` does not decode (the operator's).
    #[error("acme.eab.hmac_key is not base64url")]
    EabKey,
}

impl Error {
    /// The CA does not know the account (a test CA restarted, or the account was deactivated).
    pub fn is_unknown_account(&self) -> bool {
        matches!(self, Error::Protocol(instant_acme::Error::Api(p))
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
    }

    fn store(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Store { path, source }
    }
}
