//! OCSP stapling (RFC 6960), the parts without I/O: find the leaf's responder (AIA), build the request
//! (SHA-1 CertID, as every responder expects), and check a response before it is stapled: successful, for
//! this certificate, `good`, current, and signed by the issuer or by a responder certificate the issuer
//! signed for OCSP. Fetching and scheduling live in the proxy (`proxy/src/ocsp.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, signature};
use der::asn1::{Null, ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{AuthorityInfoAccessSyntax, ExtendedKeyUsage};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspRequest, OcspResponse, OcspResponseStatus, Request,
    TbsRequest,
};

const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const AIA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.1.1");
const AD_OCSP: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1");
const OCSP_BASIC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
const EXT_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const KP_OCSP_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.9");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// A responder's clock may be a little ahead of ours.
const SKEW: Duration = Duration::from_secs(300);

/// What to ask, and of whom, for one leaf.
#[derive(Debug, Clone)]
pub struct Query {
    pub url: String,
    pub request: Vec<u8>,
    cert_id: CertId,
    issuer: Certificate,
}

/// A response that passed every check, ready to staple.
#[derive(Debug, Clone)]
pub struct Checked {
    pub der: Vec<u8>,
    pub this_update: SystemTime,
    pub next_update: Option<SystemTime>,
}

impl Checked {
    /// Still usable at `now` (a response without nextUpdate is treated as good for a day).
    pub fn valid_at(&self, now: SystemTime) -> bool {
        let until = self
            .next_update
            .unwrap_or(self.this_update + Duration::from_secs(86_400));
        now < until
    }

    /// When to fetch again: half way through its validity, between a minute and a day from now.
    pub fn refresh_at(&self, now: SystemTime) -> SystemTime {
        let until = self
            .next_update
            .unwrap_or(self.this_update + Duration::from_secs(86_400));
        let half =
            self.this_update + until.duration_since(self.this_update).unwrap_or_default() / 2;
        half.clamp(
            now + Duration::from_secs(60),
            now + Duration::from_secs(86_400),
        )
    }
}

/// The OCSP query for a chain (leaf first, issuer second). `Ok(None)`: no responder named, or no issuer in
/// the chain; the certificate is simply served without a staple.
pub fn query(chain: &[CertificateDer<'_>]) -> Result<Option<Query>, String> {
    let (Some(leaf), Some(issuer)) = (chain.first(), chain.get(1)) else {
        return Ok(None);
    };
    let leaf = Certificate::from_der(leaf).map_err(|e| format!("leaf does not parse: {e}"))?;
    let issuer =
        Certificate::from_der(issuer).map_err(|e| format!("issuer does not parse: {e}"))?;
    let Some(url) = responder(&leaf) else {
        return Ok(None);
    };
    let name = issuer
        .tbs_certificate
        .subject
        .to_der()
        .map_err(|e| e.to_string())?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let cert_id = CertId {
        hash_algorithm: AlgorithmIdentifierOwned {
            oid: SHA1,
            parameters: Some(Null.into()),
        },
        issuer_name_hash: OctetString::new(sha1(&name)).map_err(|e| e.to_string())?,
        issuer_key_hash: OctetString::new(sha1(key)).map_err(|e| e.to_string())?,
        serial_number: leaf.tbs_certificate.serial_number.clone(),
    };
    let request = OcspRequest {
        tbs_request: TbsRequest {
            version: x509_ocsp::Version::V1,
            requestor_name: None,
            request_list: vec![Request {
                req_cert: cert_id.clone(),
                single_request_extensions: None,
            }],
            request_extensions: None,
        },
        optional_signature: None,
    }
    .to_der()
    .map_err(|e| e.to_string())?;
    Ok(Some(Query {
        url,
        request,
        cert_id,
        issuer,
    }))
}

/// The OCSP responder URL a chain's leaf names, if any (the sandbox allows its port).
pub fn responder_of(chain: &[CertificateDer<'_>]) -> Option<String> {
    responder(&Certificate::from_der(chain.first()?).ok()?)
}

/// The leaf's OCSP responder URL, from its Authority Information Access extension.
fn responder(leaf: &Certificate) -> Option<String> {
    let ext = leaf
        .tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id == AIA)?;
    let aia = AuthorityInfoAccessSyntax::from_der(ext.extn_value.as_bytes()).ok()?;
    aia.0.iter().find_map(|ad| match &ad.access_location {
        GeneralName::UniformResourceIdentifier(uri) if ad.access_method == AD_OCSP => {
            Some(uri.to_string())
        }
        _ => None,
    })
}

/// Checks `response` for `q` at `now`.
pub fn check(q: &Query, response: &[u8], now: SystemTime) -> Result<Checked, String> {
    let resp =
        OcspResponse::from_der(response).map_err(|e| format!("response does not parse: {e}"))?;
    if resp.response_status != OcspResponseStatus::Successful {
        return Err(format!("responder said {:?}", resp.response_status));
    }
    let bytes = resp.response_bytes.ok_or("no response bytes")?;
    if bytes.response_type != OCSP_BASIC {
        return Err("not a basic OCSP response".into());
    }
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| format!("basic response does not parse: {e}"))?;
    let tbs = basic
        .tbs_response_data
        .to_der()
        .map_err(|e| e.to_string())?;
    let sig = basic.signature.raw_bytes();
    let issuer_key = &q.issuer.tbs_certificate.subject_public_key_info;
    if verify(issuer_key, &basic.signature_algorithm, &tbs, sig).is_err() {
        // A delegated responder: its certificate must be issued by our issuer and marked for OCSP signing.
        let delegated = basic.certs.iter().flatten().find(|c| {
            let tbs_cert = c.tbs_certificate.to_der().unwrap_or_default();
            verify(
                issuer_key,
                &c.signature_algorithm,
                &tbs_cert,
                c.signature.raw_bytes(),
            )
            .is_ok()
                && ocsp_signer(c)
                && verify(
                    &c.tbs_certificate.subject_public_key_info,
                    &basic.signature_algorithm,
                    &tbs,
                    sig,
                )
                .is_ok()
        });
        if delegated.is_none() {
            return Err(
                "the response is not signed by the issuer or an OCSP signer it certified".into(),
            );
        }
    }
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|r| r.cert_id == q.cert_id)
        .ok_or("the response is not about this certificate")?;
    match &single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(_) => return Err("the certificate is REVOKED".into()),
        CertStatus::Unknown(_) => return Err("the responder does not know this certificate".into()),
    }
    let this_update = time(&single.this_update);
    let next_update = single.next_update.as_ref().map(time);
    if this_update > now + SKEW {
        return Err("the response is from the future".into());
    }
    let checked = Checked {
        der: response.to_vec(),
        this_update,
        next_update,
    };
    if !checked.valid_at(now) {
        return Err("the response has expired".into());
    }
    Ok(checked)
}

/// The same certificate, with `response` to staple.
pub fn staple(key: &CertifiedKey, response: Vec<u8>) -> Arc<CertifiedKey> {
    let mut k = key.clone();
    k.ocsp = Some(response);
    Arc::new(k)
}

fn ocsp_signer(c: &Certificate) -> bool {
    c.tbs_certificate.extensions.iter().flatten().any(|e| {
        e.extn_id == EXT_KEY_USAGE
            && ExtendedKeyUsage::from_der(e.extn_value.as_bytes())
                .is_ok_and(|eku| eku.0.contains(&KP_OCSP_SIGNING))
    })
}

fn verify(
    key: &SubjectPublicKeyInfoOwned,
    alg: &AlgorithmIdentifierOwned,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), ()> {
    let curve = key
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    let algorithm: &dyn signature::VerificationAlgorithm =
        match (alg.oid.to_string().as_str(), curve) {
            ("1.2.840.10045.4.3.2", Some(c)) if c == P256 => &signature::ECDSA_P256_SHA256_ASN1,
            ("1.2.840.10045.4.3.2", Some(c)) if c == P384 => &signature::ECDSA_P384_SHA256_ASN1,
            ("1.2.840.10045.4.3.3", Some(c)) if c == P256 => &signature::ECDSA_P256_SHA384_ASN1,
            ("1.2.840.10045.4.3.3", Some(c)) if c == P384 => &signature::ECDSA_P384_SHA384_ASN1,
            ("1.2.840.113549.1.1.11", _) => &signature::RSA_PKCS1_2048_8192_SHA256,
            ("1.2.840.113549.1.1.12", _) => &signature::RSA_PKCS1_2048_8192_SHA384,
            ("1.2.840.113549.1.1.13", _) => &signature::RSA_PKCS1_2048_8192_SHA512,
            ("1.3.101.112", _) => &signature::ED25519,
            _ => return Err(()),
        };
    signature::UnparsedPublicKey::new(algorithm, key.subject_public_key.raw_bytes())
        .verify(msg, sig)
        .map_err(|_| ())
}

fn sha1(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, data)
        .as_ref()
        .to_vec()
}

fn time(t: &x509_ocsp::OcspGeneralizedTime) -> SystemTime {
    UNIX_EPOCH + t.0.to_unix_duration()
}
