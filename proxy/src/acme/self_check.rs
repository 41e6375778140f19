//! The self-check before an order: every name must resolve, and every address it resolves to that accepts a
//! connection on the validation port must be this instance answering a probe challenge (HTTP-01 token or
//! TLS-ALPN-01 certificate, put in the challenge store a moment before): the CA would reach the same place,
//! so a misconfiguration (DNS, firewall, another server) costs the CA nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use portcullis_certs::acme::{self, ACME_TLS_ALPN, Challenges};
use portcullis_config::{Acme, AcmeChallenge};
use tokio::net::TcpStream;

use super::failure::Failure;
use super::http01::PATH_PREFIX;
use crate::shutdown::Shutdown;

/// One self-check connection (resolve, connect, answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every name must resolve, and every address it resolves to that accepts a connection on the validation
/// port must be this instance answering a probe challenge: the CA would reach the same place.
pub(super) async fn run(
    settings: &Acme,
    challenges: &Challenges,
    names: &[String],
    shutdown: &Shutdown,
) -> Result<(), Failure> {
    let port = settings
        .validation_port
        .unwrap_or(match settings.challenge {
            AcmeChallenge::Http01 => 80,
            AcmeChallenge::TlsAlpn01 => 443,
        });
    let results = futures_util::future::join_all(
        names
            .iter()
            .map(|n| check_name(settings.challenge, challenges, n, port, shutdown)),
    )
    .await;
    let problems: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::SelfCheck(problems.join("; ")))
    }
}

async fn check_name(
    challenge: AcmeChallenge,
    challenges: &Challenges,
    name: &str,
    port: u16,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let mut addrs: Vec<SocketAddr> = match name.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host((name, port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(format!("{name} does not resolve: {e}")),
                Err(_) => return Err(format!("{name} does not resolve: timed out")),
            }
        }
    };
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{name} does not resolve to any address"));
    }
    let mut answered = false;
    let mut unreachable = Vec::new();
    for addr in addrs {
        let probe = match challenge {
            AcmeChallenge::Http01 => probe_http01(challenges, name, addr, shutdown).await,
            AcmeChallenge::TlsAlpn01 => probe_tls_alpn01(challenges, name, addr).await,
        };
        match probe {
            Ok(true) => answered = true,
            Ok(false) => {
                return Err(format!(
                    "{name} at {addr} is answered by another server, not this one"
                ));
            }
            Err(e) => unreachable.push(format!("{addr}: {e}")),
        }
    }
    if answered {
        if !unreachable.is_empty() {
            tracing::warn!(
                name,
                "self-check: some addresses do not answer ({}); the CA may try them",
                unreachable.join(", ")
            );
        }
        Ok(())
    } else {
        Err(format!(
            "{name}: no address answers on port {port} ({})",
            unreachable.join(", ")
        ))
    }
}

/// GETs a fresh probe token from `addr` as the CA would; true when this instance answered it.
async fn probe_http01(
    challenges: &Challenges,
    name: &str,
    addr: SocketAddr,
    shutdown: &Shutdown,
) -> Result<bool, String> {
    let token = random_hex();
    let answer = random_hex();
    let mut pending = challenges.answer_http01(&token, &answer);
    // `[cluster]`: the name may lead to another node, which answers from the shared store.
    pending.publish().await;
    let host = match name.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => name.to_owned(),
    };
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        // The connection's task ends with the exchange (dropping `send` closes it), or when shutdown begins.
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = shutdown.begun() => {}
            }
        });
        let req = Request::get(format!("{PATH_PREFIX}{token}"))
            .header(header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body = Limited::new(res.into_body(), 4096)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(status == StatusCode::OK && body == answer.as_bytes())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// An `acme-tls/1` handshake with a fresh probe certificate installed; true when this instance showed it.
async fn probe_tls_alpn01(
    challenges: &Challenges,
    name: &str,
    addr: SocketAddr,
) -> Result<bool, String> {
    let mut pending = challenges.pending();
    let mut digest = [0u8; 32];
    let _ = portcullis_certs::provider().secure_random.fill(&mut digest);
    let ours = pending
        .add_tls_alpn01(name, &digest)
        .map_err(|e| e.to_string())?;
    pending.publish().await;
    let verifier = Arc::new(CompareOnly {
        provider: portcullis_certs::provider(),
        expected: ours.clone(),
        shown: std::sync::Mutex::new(None),
    });
    // TLS 1.3 only: its signature can be checked against the raw key of the certificate we installed.
    let mut config = rustls::ClientConfig::builder_with_provider(portcullis_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    let handshake = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()));
    let shown = verifier
        .shown
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match (handshake, shown) {
        (Ok(_), Some(leaf)) => Ok(leaf == ours.der),
        (Err(_), Some(leaf)) if leaf != ours.der => Ok(false),
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err("no certificate shown".to_owned()),
    }
}

/// Not verification: the self-check trusts nothing it is shown, it only records the certificate and
/// compares it with the one it installed a moment before. The handshake signature is still checked, with
/// that certificate's key.
#[derive(Debug)]
struct CompareOnly {
    provider: Arc<rustls::crypto::CryptoProvider>,
    expected: acme::ChallengeCert,
    shown: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for CompareOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.shown.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        if end_entity.as_ref() == self.expected.der.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the probe certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "the self-check speaks TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // Only reached once `verify_server_cert` has accepted the certificate we installed.
        let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(self.expected.spki.as_slice());
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &spki,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    // A failing system RNG leaves zeros: a guessable probe token, which only a self-check ever uses.
    let _ = portcullis_certs::provider().secure_random.fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
