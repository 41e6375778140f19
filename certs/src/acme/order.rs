//! The order loop: the account (created once with the contact and any external account binding, or
//! restored from its stored credentials), one order for every name of a site, each pending authorization
//! answered with the configured challenge, the order polled until ready, a fresh P-256 key and CSR, and the
//! chain fetched. ARI (RFC 9773): the CA's suggested renewal window for a certificate, and the `replaces`
//! field that ties a renewal to the certificate it replaces.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, ExternalAccountKey,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use portcullis_config::{Acme, AcmeChallenge};
use rustls::pki_types::Der;
use x509_parser::extensions::ParsedExtension;

use super::{Challenges, Error, StoredAccount};

/// Order polling: first look after 10 ms (a validation can finish that fast), then 1.5 times longer each
/// time (about a dozen looks in the first five seconds), for two minutes.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(10))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// A certificate chain (PEM, leaf first) and its new private key (PKCS#8 PEM).
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

/// What the CA says about renewing one certificate (RFC 9773).
#[derive(Debug, Clone)]
pub struct Ari {
    pub start: SystemTime,
    pub end: SystemTime,
    /// When to ask again (the CA's Retry-After).
    pub retry_after: Duration,
    /// The certificate's ARI identifier, for the next order's `replaces`.
    pub id: CertificateIdentifier<'static>,
}

/// Registers a new account (terms of service agreed: configuring ACME is agreeing to them), talking to
/// the CA through `http`.
pub async fn create_account(
    acme: &Acme,
    http: Box<dyn HttpClient>,
) -> Result<(Account, StoredAccount), Error> {
    let contact = acme.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = match &acme.eab {
        Some(e) => Some(ExternalAccountKey::new(
            e.kid.clone(),
            &base64url(&e.hmac_key).ok_or(Error::EabKey)?,
        )),
        None => None,
    };
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = Account::builder_with_http(http)
        .create(&new, acme.directory.clone(), eab.as_ref())
        .await?;
    let stored = StoredAccount {
        id: account.id().to_owned(),
        directory: acme.directory.clone(),
        email: acme.email.clone(),
        credentials,
    };
    Ok((account, stored))
}

/// The stored account, ready to order (fetches the CA's directory).
pub async fn restore_account(
    stored: StoredAccount,
    http: Box<dyn HttpClient>,
) -> Result<Account, Error> {
    Ok(Account::builder_with_http(http)
        .from_credentials(stored.credentials)
        .await?)
}

/// Orders a certificate for all of `names` at once and answers each pending authorization with
/// `challenge` through `challenges` (which serve the responses until this returns).
pub async fn obtain(
    account: &Account,
    names: &[String],
    challenge: AcmeChallenge,
    challenges: &Challenges,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, Error> {
    let ids: Vec<Identifier> = names
        .iter()
        .map(|n| {
            n.parse::<IpAddr>()
                .map_or_else(|_| Identifier::Dns(n.clone()), Identifier::Ip)
        })
        .collect();
    let mut new = NewOrder::new(&ids);
    if let Some(r) = replaces {
        new = new.replaces(r);
    }
    let mut order = account.new_order(&new).await?;
    let (kind, label) = match challenge {
        AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
        AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
    };
    let mut pending = challenges.pending();
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut a = a?;
        let name = a.identifier().to_string();
        match a.status {
            AuthorizationStatus::Pending => {}
            // Validated recently for this account: the CA reuses it.
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(Error::Order(format!(
                    "with the authorization for {name} {other:?}"
                )));
            }
        }
        let mut ch = a
            .challenge(kind.clone())
            .ok_or_else(|| Error::NoChallenge {
                name: name.clone(),
                kind: label,
            })?;
        let key_authorization = ch.key_authorization();
        match challenge {
            AcmeChallenge::Http01 => pending.add_http01(&ch.token, key_authorization.as_str()),
            AcmeChallenge::TlsAlpn01 => {
                if name.parse::<IpAddr>().is_ok() {
                    return Err(Error::NoChallenge {
                        name,
                        kind: "tls-alpn-01 (for an IP address; use http-01)",
                    });
                }
                pending.add_tls_alpn01(&name, key_authorization.digest().as_ref())?;
            }
        }
        // `[cluster]`: every node answers from here on, whichever the CA reaches.
        if !pending.publish().await {
            tracing::warn!(
                name,
                "cannot publish the challenge answer to the cluster: only this node answers it"
            );
        }
        ch.set_ready().await?;
    }
    match order.poll_ready(&POLL).await {
        Ok(OrderStatus::Ready) => {}
        Ok(status) => return Err(explain(&mut order, format!("{status:?}")).await),
        Err(instant_acme::Error::Api(p)) => return Err(explain(&mut order, p.to_string()).await),
        Err(e) => return Err(e.into()),
    }
    drop(pending);
    let gen_err = |e: rcgen::Error| Error::Generate(format!("the key or CSR: {e}"));
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    order.finalize_csr(csr.der()).await?;
    let chain_pem = match order.certificate().await? {
        Some(chain) => chain,
        None => order.poll_certificate(&POLL).await?,
    };
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// The CA's renewal window for the certificate whose leaf is `leaf` (`None`: the CA has no ARI, or the
/// leaf no authority key identifier).
pub async fn ari(account: &Account, leaf: &[u8]) -> Result<Option<Ari>, Error> {
    let Some(id) = cert_id(leaf) else {
        return Ok(None);
    };
    match account.renewal_info(&id).await {
        Ok((info, retry_after)) => Ok(Some(Ari {
            start: at(info.suggested_window.start.unix_timestamp()),
            end: at(info.suggested_window.end.unix_timestamp()),
            retry_after,
            id,
        })),
        Err(instant_acme::Error::Unsupported(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Why an order did not become ready: each failed challenge's problem, as the CA put it.
async fn explain(order: &mut Order, status: String) -> Error {
    let mut why = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut a)) = authorizations.next().await {
        let name = a.identifier().to_string();
        let Ok(state) = a.refresh().await else {
            continue;
        };
        for c in &state.challenges {
            if let Some(e) = &c.error {
                why.push(format!("{name}: {e}"));
            }
        }
    }
    if why.is_empty() {
        Error::Order(status)
    } else {
        Error::Validation(why.join("; "))
    }
}

/// The RFC 9773 identifier: the issuer's key identifier and the serial, as in the leaf.
fn cert_id(leaf: &[u8]) -> Option<CertificateIdentifier<'static>> {
    let (_, x) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let aki = x
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        })?;
    Some(
        CertificateIdentifier::new(
            Der::from_slice(aki),
            Der::from_slice(x.tbs_certificate.raw_serial()),
        )
        .into_owned(),
    )
}

fn at(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// base64url with or without padding (RFC 4648 section 5), as CAs hand out EAB keys; the standard
/// alphabet's `+` and `/` are read too (the cluster's key file may be either).
pub fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_decodes_with_and_without_padding() {
        assert_eq!(base64url("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64url("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64url("_-8").unwrap(), [0xff, 0xef]);
        assert!(base64url("not base64!").is_none());
    }

    #[test]
    fn ari_identifier_is_key_id_dot_serial() {
        use rcgen::{
            BasicConstraints, CertificateParams, IsCa, KeyIdMethod, KeyPair, SerialNumber,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_identifier_method = KeyIdMethod::PreSpecified(vec![0x69, 0x88, 0x5b]);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        leaf.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x87, 0x65, 0x43, 0x21]));
        leaf.use_authority_key_identifier_extension = true;
        let cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        // RFC 9773 section 4.1's example shape: base64url(key id) "." base64url(serial).
        assert_eq!(cert_id(cert.der()).unwrap().to_string(), "aYhb.AIdlQyE");
    }
}
