//! TLS as a client sees it: TLS 1.2 and 1.3 only, TLS 1.2 limited to ECDHE + AEAD, the key-exchange groups
//! (post-quantum hybrid first), ALPN h2 and http/1.1, session resumption, ECDSA and RSA keys in PKCS#8,
//! SEC1 and PKCS#1 files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;

use portcullis_tests::client::{get_on, insecure_config, provider};
use portcullis_tests::{Pki, Portcullis, Setup, TempDir, config, openssl, s_client};
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Runs `openssl s_client` against `addr` with `args`; true when the handshake completed.
fn openssl_handshake(addr: std::net::SocketAddr, args: &[&str]) -> bool {
    let text = s_client(addr, args);
    // A completed handshake prints the negotiated cipher; a refused one prints "Cipher is (NONE)" or nothing.
    text.contains("Cipher is ") && !text.contains("Cipher is (NONE)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_only() {
    let s = Setup::new("", "").await;
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(root(&s.pki))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = s.client.tls_with(s.https(), "localhost", c).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(want));
        assert_eq!(get_on(tls, "/").await.status(), 200);
    }
    for old in ["-tls1_1", "-tls1"] {
        assert!(
            !openssl_handshake(s.https(), &[old, "-cipher", "DEFAULT:@SECLEVEL=0"]),
            "{old} was accepted"
        );
    }
}

/// `openssl s_server -www` with a certificate and key and every suite enabled (`ALL:@SECLEVEL=0`), on a
/// port of its choosing: the control for a refused suite. A suite it negotiates is one a server with that
/// certificate can choose, so Portcullis refusing it says something about Portcullis. Killed on drop.
struct AnySuiteServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl AnySuiteServer {
    fn start(cert: &std::path::Path, key: &std::path::Path) -> AnySuiteServer {
        use std::io::BufRead;
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-www",
                "-accept",
                "127.0.0.1:0",
                "-cipher",
                "ALL:@SECLEVEL=0",
                "-cert",
            ])
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Readiness: its "ACCEPT 127.0.0.1:PORT" line (bounded: 10 s).
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok);
            let addr = lines.find_map(|l| l.strip_prefix("ACCEPT ").and_then(|a| a.parse().ok()));
            let _ = tx.send(addr);
            for _ in lines {}
        });
        let mut server = AnySuiteServer {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
        };
        server.addr = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .ok()
            .flatten()
            .expect("openssl s_server did not start");
        server
    }
}

impl Drop for AnySuiteServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS 1.2 suites: ECDHE + AEAD only, with an ECDSA and with an RSA certificate. Each refused suite is
/// first negotiated with the same certificate by a server that allows every suite: the suites an RSA
/// certificate needs (static RSA, DHE-RSA) are tried against an RSA one, where they can be chosen at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_offers_only_ecdhe_with_aead() {
    let s = Setup::new("", "").await;
    let dir = TempDir::new("rsa-suites");
    rsa_key(&dir, "rsa.key");
    let rsa_pki = self_signed(&dir, "rsa.key");
    let rsa = Portcullis::run(
        &dir.write("p.toml", &config(&rsa_pki, "127.0.0.1:9", "")),
        &[],
    );
    assert!(rsa.ready, "{}", rsa.output());
    let servers = [
        (
            s.https(),
            &s.pki,
            [
                "ECDHE-ECDSA-AES128-GCM-SHA256",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            ],
            &["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"][..],
        ),
        (
            rsa.https_addr(),
            &rsa_pki,
            ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"],
            &[
                "ECDHE-RSA-AES128-SHA",
                "ECDHE-RSA-AES256-SHA384",
                "AES128-GCM-SHA256",
                "AES128-SHA",
                "DHE-RSA-AES128-GCM-SHA256",
            ][..],
        ),
    ];
    for (addr, pki, good, weak) in servers {
        for suite in good {
            assert!(
                openssl_handshake(addr, &["-tls1_2", "-cipher", suite]),
                "{suite} was refused"
            );
        }
        let control = AnySuiteServer::start(&pki.cert, &pki.key);
        for suite in weak {
            let offer = format!("{suite}:@SECLEVEL=0");
            assert!(
                openssl_handshake(control.addr, &["-tls1_2", "-cipher", &offer]),
                "{suite} cannot be negotiated with this certificate at all: refusing it proves nothing"
            );
            assert!(
                !openssl_handshake(addr, &["-tls1_2", "-cipher", &offer]),
                "{suite} was accepted"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exchange_groups_post_quantum_hybrid_first() {
    let s = Setup::new("", "").await;
    // A default rustls client offers X25519MLKEM768 first; the server takes it.
    let tls = s.client.tls(s.https(), &[b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    for group in [kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1] {
        let mut p = (*provider()).clone();
        p.kx_groups = vec![group];
        let c = rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(root(&s.pki))
            .with_no_client_auth();
        let tls = s.client.tls_with(s.https(), "localhost", c).await;
        assert_eq!(
            tls.get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
            Some(group.name())
        );
    }
    assert!(
        !openssl_handshake(s.https(), &["-tls1_3", "-groups", "ffdhe2048"]),
        "finite-field DH was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_offers_h2_and_http_1_1() {
    let s = Setup::new("", "").await;
    for (offer, want) in [
        (vec![&b"h2"[..], b"http/1.1"], Some(&b"h2"[..])),
        (vec![&b"http/1.1"[..]], Some(&b"http/1.1"[..])),
        (vec![], None),
    ] {
        let tls = s.client.tls(s.https(), &offer).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), want);
        if want != Some(b"h2") {
            assert_eq!(get_on(tls, "/").await.status(), 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_on_tls_1_3_and_1_2() {
    let s = Setup::new("", "").await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let c = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(root(&s.pki))
                .with_no_client_auth(),
        );
        let first = s
            .client
            .tls_with(s.https(), "localhost", (*c).clone())
            .await;
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // TLS 1.3 tickets arrive after the handshake: a request makes sure they were read.
        assert_eq!(get_on(first, "/").await.status(), 200);
        let second = s
            .client
            .tls_with(s.https(), "localhost", (*c).clone())
            .await;
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{version:?}"
        );
    }
}

fn root(pki: &Pki) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(roots)
}

/// A 2048-bit RSA key made by openssl, PKCS#8 PEM, at `dir/name`.
fn rsa_key(dir: &TempDir, name: &str) {
    openssl(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            name,
        ],
    );
}

/// A self-signed certificate for localhost made by openssl with the key file `key` in `dir` (`cert.pem`).
fn self_signed(dir: &TempDir, key: &str) -> Pki {
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-key",
            key,
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
    );
    Pki {
        ca_pem: String::new(),
        cert: dir.path().join("cert.pem"),
        key: dir.path().join(key),
    }
}

/// Serves a certificate made by openssl with the given key file, and checks the client sees exactly it.
async fn serves_key_file(dir: &TempDir, key: &str, header: &str) {
    let text = std::fs::read_to_string(dir.path().join(key)).unwrap();
    assert!(
        text.starts_with(header),
        "{key} is not in the expected format: {}",
        &text[..40.min(text.len())]
    );
    let pki = self_signed(dir, key);
    let p = Portcullis::run(&dir.write("p.toml", &config(&pki, "127.0.0.1:9", "")), &[]);
    assert!(p.ready, "{}", p.output());
    let tcp = tokio::net::TcpStream::connect(p.https_addr())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(insecure_config(&[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let want = CertificateDer::from_pem_file(dir.path().join("cert.pem")).unwrap();
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_in_pkcs1_and_pkcs8() {
    let dir = TempDir::new("rsa");
    rsa_key(&dir, "pkcs8.pem");
    serves_key_file(&dir, "pkcs8.pem", "-----BEGIN PRIVATE KEY-----").await;
    openssl(
        dir.path(),
        &[
            "rsa",
            "-in",
            "pkcs8.pem",
            "-traditional",
            "-out",
            "pkcs1.pem",
        ],
    );
    serves_key_file(&dir, "pkcs1.pem", "-----BEGIN RSA PRIVATE KEY-----").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecdsa_keys_in_sec1_and_pkcs8() {
    let dir = TempDir::new("ec");
    openssl(
        dir.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.pem",
        ],
    );
    serves_key_file(&dir, "sec1.pem", "-----BEGIN EC PRIVATE KEY-----").await;
    openssl(
        dir.path(),
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "sec1.pem", "-out", "p8.pem",
        ],
    );
    serves_key_file(&dir, "p8.pem", "-----BEGIN PRIVATE KEY-----").await;
}

/// Counts the TLS records a server sends, by reading the record headers of the byte stream under the
/// client's TLS (content type 23, application data: in TLS 1.3 every record after the handshake).
struct RecordCounter {
    inner: tokio::net::TcpStream,
    seen: Arc<std::sync::Mutex<Records>>,
}

#[derive(Default)]
struct Records {
    header: Vec<u8>,
    left: usize,
    application_data: usize,
}

impl Records {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                if self.header[0] == 23 {
                    self.application_data += 1;
                }
                self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
            }
        }
    }
}

impl tokio::io::AsyncRead for RecordCounter {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        this.seen.lock().unwrap().feed(&buf.filled()[before..]);
        poll
    }
}

impl tokio::io::AsyncWrite for RecordCounter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A small response goes out as one TLS record (nginx sends one): head and body are not each their own
/// record, which would cost a seal and a syscall each and show on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_response_is_one_tls_record() {
    for buffered in ["true", "false"] {
        one_record_per_small_response(buffered).await;
    }
}

async fn one_record_per_small_response(buffered: &str) {
    use tokio::io::AsyncWriteExt;
    let route = format!("upstream = \"app\"\nbuffer_responses = {buffered}");
    let s = Setup::with("", "", &[("upstream = \"app\"", &route)]).await;
    let seen = Arc::new(std::sync::Mutex::new(Records::default()));
    let tcp = tokio::net::TcpStream::connect(s.https()).await.unwrap();
    let counted = RecordCounter {
        inner: tcp,
        seen: seen.clone(),
    };
    let name = rustls::pki_types::ServerName::try_from("app.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(s.client.config(&[b"http/1.1"])))
        .connect(name, counted)
        .await
        .unwrap();
    let request = b"GET /bytes/100 HTTP/1.1\r\nHost: app.test\r\n\r\n";
    // The first response also brings the TLS 1.3 session tickets; the second is counted alone.
    for round in 0..3 {
        seen.lock().unwrap().application_data = 0;
        tls.write_all(request).await.unwrap();
        tls.flush().await.unwrap();
        let (status, _, body) = portcullis_tests::client::read_response(&mut tls).await;
        assert_eq!((status, body.len()), (200, 100));
        if round > 0 {
            assert_eq!(
                seen.lock().unwrap().application_data,
                1,
                "round {round}, buffer_responses = {buffered}"
            );
        }
    }
}
