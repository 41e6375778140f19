//! Client certificates (mutual TLS, issue 16): a test CA (and an intermediate) made with rcgen, CRLs it
//! issues, sites with `client_auth` (optional, required, `crl_expired = "refuse"`) next to a plain one;
//! what the app receives, what is refused, and CRLs reloaded without a restart, over HTTP/1.1 and HTTP/2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tests::client::collect;
use portcullis_tests::upstream::Upstream;
use portcullis_tests::{Pki, Portcullis, TempDir};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
    KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const WAIT: Duration = Duration::from_secs(10);

/// A CA that issues client certificates and CRLs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn root(cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(cn);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn intermediate(&self, cn: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate for `cn` with `serial`, valid until `until` (y, m, d), and its key.
    fn client(&self, cn: &str, serial: u64, until: (i32, u8, u8)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
            pem: (cert.pem(), key.serialize_pem()),
        }
    }

    /// A CRL revoking `serials`, with `next_update` in year `until`.
    fn crl(&self, serials: &[u64], until: i32) -> rcgen::CertificateRevocationList {
        CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(until, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2020, 6, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
}

#[derive(Clone)]
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    /// The certificate and key as PEM, for curl.
    pem: (String, String),
}

/// The proxy with four sites on one listener: `localhost` (the default, no client_auth), `mtls.test`
/// (optional, `/admin/` requires a certificate, `forward_cert`), `required.test` (mode required) and
/// `strict.test` (its CRL expired, `crl_expired = "refuse"`).
struct Mtls {
    config: PathBuf,
    _dir: TempDir,
    crl_dir: PathBuf,
    pki: Pki,
    root: Ca,
    inter: Ca,
    upstream: Upstream,
    proxy: Portcullis,
}

impl Mtls {
    async fn start() -> Mtls {
        Mtls::start_with("").await
    }

    /// As `start`, with `extra` TOML after the sites.
    async fn start_with(extra: &str) -> Mtls {
        let dir = TempDir::new("mtls");
        let pki = Pki::new(dir.path(), &["mtls.test", "required.test", "strict.test"]);
        let root = Ca::root("Staff Root CA");
        let inter = root.intermediate("Staff Issuing CA");
        std::fs::write(dir.path().join("client-ca.pem"), &root.pem).unwrap();
        let crl_dir = dir.path().join("crl");
        std::fs::create_dir(&crl_dir).unwrap();
        // One PEM, one DER: both forms are read.
        std::fs::write(crl_dir.join("root.pem"), root.crl(&[], 2100).pem().unwrap()).unwrap();
        std::fs::write(
            crl_dir.join("inter.der"),
            inter.crl(&[], 2100).der().as_ref(),
        )
        .unwrap();
        let stale = dir.path().join("stale-crl");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("root.pem"), root.crl(&[], 2021).pem().unwrap()).unwrap();
        let upstream = Upstream::tcp().await;
        let (cert, key, ca) = (
            pki.cert.display().to_string(),
            pki.key.display().to_string(),
            dir.path().join("client-ca.pem").display().to_string(),
        );
        let sites = format!(
            r#"
[[site]]
names = ["mtls.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
client_auth = {{ ca = "{ca}", crl = "{crl}", mode = "optional", forward_cert = true }}
  [[site.route]]
  path = "/"
  upstream = "app"
  [[site.route]]
  path = "/admin/"
  upstream = "app"
  require_client_cert = true

[[site]]
names = ["required.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
client_auth = {{ ca = "{ca}", crl = "{crl}", mode = "required" }}
  [[site.route]]
  path = "/"
  upstream = "app"

[[site]]
names = ["strict.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
client_auth = {{ ca = "{ca}", crl = "{stale}", crl_expired = "refuse" }}
  [[site.route]]
  path = "/"
  upstream = "app"

{extra}
"#,
            crl = crl_dir.display(),
            stale = stale.display(),
        );
        let text = format!(
            "names = [\"localhost\"]\n{}",
            portcullis_tests::config(&pki, &upstream.addr_string(), &sites)
        );
        let path = dir.write("portcullis.toml", &text);
        let proxy = Portcullis::run(&path, &[]);
        assert!(proxy.ready, "portcullis did not start:\n{}", proxy.output());
        Mtls {
            config: path,
            _dir: dir,
            crl_dir,
            pki,
            root,
            inter,
            upstream,
            proxy,
        }
    }

    /// A client config trusting the server's CA, sending `leaf` (and `extra` intermediates) if given.
    fn client(
        &self,
        leaf: Option<&Leaf>,
        extra: &[CertificateDer<'static>],
        h2: bool,
    ) -> Arc<rustls::ClientConfig> {
        Arc::new(client_config(&self.pki, leaf, extra, h2))
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.https_addr()
    }
}

/// A client config trusting `pki`'s CA, sending `leaf` (and `extra` intermediates) if given, offering
/// `h2` or `http/1.1`.
fn client_config(
    pki: &Pki,
    leaf: Option<&Leaf>,
    extra: &[CertificateDer<'static>],
    h2: bool,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::pem::PemObject::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(portcullis_tests::client::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match leaf {
        Some(l) => {
            let mut chain = l.chain.clone();
            chain.extend_from_slice(extra);
            b.with_client_auth_cert(chain, PrivateKeyDer::try_from(l.key.clone()).unwrap())
                .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    c
}

/// GET `path` from `host` (SNI and Host) on a new connection made with `config`; `Err` when the
/// handshake or the request failed (TLS 1.3 reports a refused client certificate on the first read).
/// Also whether the handshake resumed a session.
async fn get(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Response<Bytes>, bool), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(config.clone())
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut req = Request::get(path);
    if h2 {
        req = req.uri(format!("https://{host}{path}"));
    } else {
        req = req.header("host", host);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::<Bytes>::default()).unwrap();
    let res = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("h1: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
    };
    Ok((collect(res).await, resumed))
}

/// The status of [`get`], which must succeed.
async fn status(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> http::StatusCode {
    get(addr, config, host, path, headers)
        .await
        .unwrap()
        .0
        .status()
}

/// A connection kept open for several requests to `mtls.test`.
enum Open {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Open {
    async fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Open {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(config.clone())
            .connect(ServerName::try_from("mtls.test").unwrap(), tcp)
            .await
            .unwrap();
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Open::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            Open::H1(send)
        }
    }

    async fn get(&mut self, path: &str) -> u16 {
        let res = match self {
            Open::H1(send) => {
                let req = Request::get(path).header("host", "mtls.test");
                send.send_request(req.body(Full::default()).unwrap()).await
            }
            Open::H2(send) => {
                let req = Request::get(format!("https://mtls.test{path}"));
                send.send_request(req.body(Full::default()).unwrap()).await
            }
        };
        collect(res.unwrap()).await.status().as_u16()
    }
}

fn header<'a>(r: &'a portcullis_tests::upstream::Recorded, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_valid_client_certificate_reaches_the_app_with_its_identity() {
    let t = Mtls::start().await;
    let alice = t.root.client("alice", 1001, (2099, 1, 1));
    for h2 in [false, true] {
        let c = t.client(Some(&alice), &[], h2);
        let (res, _) = get(
            t.addr(),
            &c,
            "mtls.test",
            "/admin/",
            &[("x-client-cert-subject", "CN=mallory")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", t.proxy.output()));
        assert_eq!(res.status(), 200, "h2 {h2}");
        let r = t.upstream.last();
        assert_eq!(header(&r, "x-client-cert-verified"), Some("SUCCESS"));
        assert_eq!(header(&r, "x-client-cert-subject"), Some("CN=alice"));
        assert_eq!(header(&r, "x-client-cert-issuer"), Some("CN=Staff Root CA"));
        assert_eq!(header(&r, "x-client-cert-serial"), Some("03E9"));
        assert_eq!(
            header(&r, "x-client-cert-fingerprint"),
            Some(portcullis_tests::sha256_hex(alice.chain[0].as_ref()).as_str())
        );
        let pem = header(&r, "x-client-cert").unwrap();
        assert!(pem.starts_with("-----BEGIN%20CERTIFICATE-----%0A"), "{pem}");
        assert_eq!(r.headers.get_all("x-client-cert-subject").iter().count(), 1);
    }
    // The access line names the certificate's subject.
    assert!(
        t.proxy
            .wait_for_log(
                |l| l.contains("client_cert=") && l.contains("CN=alice"),
                WAIT
            )
            .is_some(),
        "{}",
        t.proxy.output()
    );
    // Mode required: the same certificate is served there.
    let c = t.client(Some(&alice), &[], false);
    assert_eq!(status(t.addr(), &c, "required.test", "/", &[]).await, 200);
}

#[tokio::test]
async fn no_certificate_is_served_on_an_optional_site_but_not_on_a_required_route() {
    let t = Mtls::start().await;
    let forged = [
        ("x-client-cert-verified", "SUCCESS"),
        ("x-client-cert-subject", "CN=admin"),
        ("x-client-cert-fingerprint", "00"),
        ("x-client-cert", "forged"),
    ];
    for h2 in [false, true] {
        let c = t.client(None, &[], h2);
        let (res, _) = get(t.addr(), &c, "mtls.test", "/", &forged).await.unwrap();
        assert_eq!(res.status(), 200);
        let r = t.upstream.last();
        assert_eq!(header(&r, "x-client-cert-verified"), Some("NONE"));
        for (k, _) in &forged[1..] {
            assert_eq!(header(&r, k), None, "{k} reached the app");
        }
        // The route that requires one: 403, our page, with the security headers.
        let (res, _) = get(t.addr(), &c, "mtls.test", "/admin/x", &forged)
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "h2 {h2}");
        assert!(res.headers().contains_key("strict-transport-security"));
        assert_eq!(
            res.headers().get("x-content-type-options").unwrap(),
            "nosniff"
        );
        // A site without client_auth: the forged fields are removed, none of ours added.
        let n = t.upstream.requests().len();
        let (res, _) = get(t.addr(), &c, "localhost", "/", &forged).await.unwrap();
        assert_eq!(res.status(), 200);
        let all = t.upstream.requests();
        assert_eq!(all.len(), n + 1);
        let r = all.last().unwrap();
        for (k, _) in &forged {
            assert_eq!(header(r, k), None, "{k} reached the app on a plain site");
        }
    }
    // Mode required: no handshake without a certificate.
    let c = t.client(None, &[], false);
    assert!(get(t.addr(), &c, "required.test", "/", &[]).await.is_err());
}

#[tokio::test]
async fn expired_wrong_ca_and_intermediate_issued_certificates() {
    let t = Mtls::start().await;
    let old = t.root.client("old", 1002, (2021, 1, 1));
    let stranger = Ca::root("Another CA").client("eve", 1003, (2099, 1, 1));
    let bob = t.inter.client("bob", 2001, (2099, 1, 1));
    for h2 in [false, true] {
        for (who, leaf) in [("expired", &old), ("wrong CA", &stranger)] {
            let c = t.client(Some(leaf), &[], h2);
            let got = get(t.addr(), &c, "mtls.test", "/", &[]).await;
            assert!(
                got.is_err(),
                "{who} was served: {:?}",
                got.map(|r| r.0.status())
            );
        }
        let c = t.client(Some(&bob), std::slice::from_ref(&t.inter.der), h2);
        let (res, _) = get(t.addr(), &c, "mtls.test", "/admin/", &[])
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let r = t.upstream.last();
        assert_eq!(header(&r, "x-client-cert-subject"), Some("CN=bob"));
        assert_eq!(
            header(&r, "x-client-cert-issuer"),
            Some("CN=Staff Issuing CA")
        );
    }
}

/// A CRL update with no restart: the next handshake of a revoked certificate is refused, also for a client
/// that tries to resume (mTLS sites give no session to resume); a broken file in the folder then keeps
/// the last good set.
#[tokio::test]
async fn a_certificate_revoked_by_a_new_crl_is_refused_at_the_next_handshake_even_resuming() {
    let t = Mtls::start().await;
    let carol = t.root.client("carol", 1004, (2099, 1, 1));
    let dave = t.inter.client("dave", 2002, (2099, 1, 1));
    for h2 in [false, true] {
        let c = t.client(Some(&carol), &[], h2);
        let (res, resumed) = get(t.addr(), &c, "mtls.test", "/admin/", &[])
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(!resumed);
        // The same client config again: it would resume if it had been given a session.
        let (res, resumed) = get(t.addr(), &c, "mtls.test", "/admin/", &[])
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(!resumed, "an mTLS site resumed a session");
    }
    let resuming = t.client(Some(&carol), &[], false);
    get(t.addr(), &resuming, "mtls.test", "/", &[])
        .await
        .unwrap();
    // Connections that stay open across the revocation (HTTP/1.1 keep-alive, HTTP/2).
    let mut open = Vec::new();
    for h2 in [false, true] {
        let mut conn = Open::connect(t.addr(), &t.client(Some(&carol), &[], h2)).await;
        assert_eq!(conn.get("/admin/").await, 200);
        assert_eq!(
            header(&t.upstream.last(), "x-client-cert-verified"),
            Some("SUCCESS")
        );
        open.push(conn);
    }

    // One file at a time, each change one reload (its log line the readiness signal).
    let reloads = |n| {
        t.proxy.wait_for_nth(
            |l| l.contains("client CA and CRLs reloaded") && l.contains("site=1"),
            n,
            WAIT,
        )
    };
    write_atomically(
        &t.crl_dir.join("root.pem"),
        t.root.crl(&[1004], 2100).pem().unwrap().as_bytes(),
    );
    assert!(reloads(1).is_some(), "no reload:\n{}", t.proxy.output());
    write_atomically(
        &t.crl_dir.join("inter.der"),
        t.inter.crl(&[2002], 2100).der().as_ref(),
    );
    assert!(reloads(2).is_some(), "no reload:\n{}", t.proxy.output());
    // Their next request is checked against the new CRLs: FAILED:revoked, and 403 where one is required.
    for conn in &mut open {
        assert_eq!(conn.get("/").await, 200);
        assert_eq!(
            header(&t.upstream.last(), "x-client-cert-verified"),
            Some("FAILED:revoked")
        );
        assert_eq!(
            header(&t.upstream.last(), "x-client-cert-subject"),
            Some("CN=carol")
        );
        assert_eq!(conn.get("/admin/").await, 403);
    }
    let refused = |leaf: &Leaf, extra: Vec<CertificateDer<'static>>, h2| {
        let c = t.client(Some(leaf), &extra, h2);
        let addr = t.addr();
        async move { get(addr, &c, "mtls.test", "/", &[]).await.is_err() }
    };
    for h2 in [false, true] {
        assert!(refused(&carol, vec![], h2).await);
        assert!(refused(&dave, vec![t.inter.der.clone()], h2).await);
    }
    assert!(
        get(t.addr(), &resuming, "mtls.test", "/", &[])
            .await
            .is_err(),
        "a resuming client got in"
    );
    let erin = t.root.client("erin", 1005, (2099, 1, 1));
    let c = t.client(Some(&erin), &[], true);
    assert_eq!(status(t.addr(), &c, "mtls.test", "/admin/", &[]).await, 200);

    // A broken CRL file: refused whole, the last good set (with both revocations) goes on.
    std::fs::write(
        t.crl_dir.join("broken.pem"),
        "-----BEGIN X509 CRL-----\nnot base64 !!\n-----END X509 CRL-----\n",
    )
    .unwrap();
    assert!(
        t.proxy
            .wait_for_log(
                |l| l.contains("client CA/CRL reload refused, keeping the last good set"),
                WAIT
            )
            .is_some(),
        "{}",
        t.proxy.output()
    );
    assert!(refused(&carol, vec![], false).await);
    assert!(refused(&dave, vec![t.inter.der.clone()], true).await);
    assert_eq!(status(t.addr(), &c, "mtls.test", "/", &[]).await, 200);
}

#[tokio::test]
async fn an_expired_crl_is_logged_and_with_refuse_refuses_every_certificate() {
    let t = Mtls::start().await;
    assert!(
        t.proxy.output().contains("CRL has EXPIRED"),
        "{}",
        t.proxy.output()
    );
    let alice = t.root.client("alice", 1001, (2099, 1, 1));
    let c = t.client(Some(&alice), &[], false);
    assert!(get(t.addr(), &c, "strict.test", "/", &[]).await.is_err());
    assert_eq!(status(t.addr(), &c, "mtls.test", "/", &[]).await, 200);
}

#[tokio::test]
async fn a_client_cert_rate_limit_counts_each_certificate_on_its_own() {
    let t = Mtls::start_with(
        "[[rate_limit]]\nname = \"staff\"\npaths = [\"/login\"]\nrate = \"1/minute\"\nburst = 1\nmethods = [\"GET\"]\nkey = \"client_cert\"\n",
    )
    .await;
    let alice = t.client(
        Some(&t.root.client("alice", 1001, (2099, 1, 1))),
        &[],
        false,
    );
    let bob = t.client(Some(&t.root.client("bob", 1007, (2099, 1, 1))), &[], true);
    let login = |c: Arc<rustls::ClientConfig>| {
        let addr = t.addr();
        async move { status(addr, &c, "mtls.test", "/login", &[]).await }
    };
    assert_eq!(login(alice.clone()).await, 200);
    assert_eq!(login(alice.clone()).await, 429);
    // Same address, another certificate: counted on its own.
    assert_eq!(login(bob.clone()).await, 200);
    assert_eq!(login(bob).await, 429);
    // No certificate: counted by address, which no certificate's count touched.
    let none = t.client(None, &[], false);
    assert_eq!(login(none.clone()).await, 200);
    assert_eq!(login(none).await, 429);
}

#[tokio::test]
async fn check_shows_each_sites_client_cas_and_crls() {
    let t = Mtls::start().await;
    let out = std::process::Command::new(portcullis_tests::binary())
        .args(["check", "--config", t.config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("client_auth  mode optional"), "{stdout}");
    assert!(stdout.contains("client_auth  mode required"), "{stdout}");
    assert!(
        stdout.contains("client CA    CN=Staff Root CA (expires "),
        "{stdout}"
    );
    assert!(stdout.contains("CRLs         2 in "), "{stdout}");
    assert!(stdout.contains("next update 2100-01-01"), "{stdout}");
    assert!(
        stdout.contains("EXPIRED (every client certificate refused)"),
        "{stdout}"
    );
}

/// An OpenSSL client (curl, HTTP/1.1 and HTTP/2) with its certificate: served, and the app sees it.
#[tokio::test]
async fn curl_with_a_client_certificate_is_served_over_h1_and_h2() {
    let t = Mtls::start().await;
    let alice = t.root.client("alice", 1001, (2099, 1, 1));
    let dir = t.config.parent().unwrap();
    std::fs::write(dir.join("alice.pem"), &alice.pem.0).unwrap();
    std::fs::write(dir.join("alice.key"), &alice.pem.1).unwrap();
    let port = t.addr().port();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        // The upstream runs on this test's runtime: curl waits on another thread.
        let mut curl = std::process::Command::new("curl");
        curl.args([
            "-sS",
            "--max-time",
            "10",
            flag,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .arg("--cacert")
        .arg(t.pki.ca_path())
        .arg("--cert")
        .arg(dir.join("alice.pem"))
        .arg("--key")
        .arg(dir.join("alice.key"))
        .args(["--resolve", &format!("mtls.test:{port}:127.0.0.1")])
        .arg(format!("https://mtls.test:{port}/admin/"));
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap()
            .expect("curl is needed (Debian package curl)");
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got,
            format!("200 {version}"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            header(&t.upstream.last(), "x-client-cert-subject"),
            Some("CN=alice")
        );
    }
}

/// A certificate that one site's CA verified speaks for that site only: a client without SNI (served as
/// the default site, whose CA accepted it) that names another `client_auth` site in its Host gets no
/// certificate there.
#[tokio::test]
async fn a_certificate_verified_for_one_site_does_not_speak_for_another_without_sni() {
    let dir = TempDir::new("mtls-nosni");
    let pki = Pki::new(dir.path(), &["mtls.test", "other.test"]);
    let staff = Ca::root("Staff Root CA");
    let partners = Ca::root("Partner CA");
    std::fs::write(dir.path().join("staff.pem"), &staff.pem).unwrap();
    std::fs::write(dir.path().join("partners.pem"), &partners.pem).unwrap();
    let upstream = Upstream::tcp().await;
    let (cert, key) = (pki.cert.display(), pki.key.display());
    let text = format!(
        r#"[listen]
https = ["127.0.0.1:0"]
http = []

[[site]]
names = ["mtls.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
client_auth = {{ ca = "staff.pem" }}
  [[site.route]]
  path = "/"
  upstream = "app"
  require_client_cert = true

[[site]]
names = ["other.test"]
tls = {{ cert = "{cert}", key = "{key}" }}
client_auth = {{ ca = "partners.pem" }}
  [[site.route]]
  path = "/"
  upstream = "app"
  require_client_cert = true

[upstream.app]
servers = ["{}"]

[process]
temp_dir = "{}"
"#,
        upstream.addr_string(),
        dir.path().join("buffers").display()
    );
    let path = dir.write("portcullis.toml", &text);
    let proxy = Portcullis::run(&path, &[]);
    assert!(proxy.ready, "{}", proxy.output());
    let alice = staff.client("alice", 1, (2099, 1, 1));
    for h2 in [false, true] {
        let mut c = client_config(&pki, Some(&alice), &[], h2);
        c.enable_sni = false;
        let c = Arc::new(c);
        // The server name only checks the server's certificate here: no SNI is sent.
        let (res, _) = get(proxy.https_addr(), &c, "mtls.test", "/", &[])
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "h2 {h2}");
        assert_eq!(
            header(&upstream.last(), "x-client-cert-subject"),
            Some("CN=alice")
        );
        let (res, _) = get(proxy.https_addr(), &c, "other.test", "/", &[])
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            403,
            "h2 {h2}: a staff certificate spoke for the partner site"
        );
    }
}
