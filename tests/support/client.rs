//! TLS clients for tests: rustls (aws-lc-rs) trusting the test CA, HTTP/1.1 or HTTP/2 through hyper's
//! low-level client, and raw byte exchanges for what a well-behaved client would never send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(Clone)]
pub struct Client {
    roots: Arc<rustls::RootCertStore>,
}

impl Client {
    pub fn new(ca_pem: &str) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        Client {
            roots: Arc::new(roots),
        }
    }

    /// A client config trusting the test CA, offering `alpn`.
    pub fn config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c
    }

    pub async fn tls_with(
        &self,
        addr: SocketAddr,
        sni: &str,
        config: rustls::ClientConfig,
    ) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    pub async fn tls(&self, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.tls_with(addr, "localhost", self.config(alpn)).await
    }

    /// A TLS connection from the loopback address `from` (any of 127.0.0.0/8 reaches a 127.0.0.1 listener):
    /// a second client address for the per-address caps. `Err` when the server closed it before or during
    /// the handshake.
    pub async fn tls_from(
        &self,
        from: std::net::IpAddr,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = socket.connect(addr).await?;
        TlsConnector::from(Arc::new(self.config(alpn)))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// Whether a new connection from `from` is admitted and served `GET /` (200), retried while the server
    /// notices that other connections closed (it does so asynchronously; bounded at about 2 s).
    pub async fn served_from(&self, from: std::net::IpAddr, addr: SocketAddr) -> bool {
        for _ in 0..100 {
            if let Ok(tls) = self.tls_from(from, addr, &[b"http/1.1"]).await {
                return get_on(tls, "/").await.status() == 200;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// One HTTP/1.1 request on a new connection; `Host: localhost` unless the request sets one.
    pub async fn send(&self, addr: SocketAddr, mut req: Request<Full<Bytes>>) -> Response<Bytes> {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, "localhost".parse().unwrap());
        }
        let tls = self.tls(addr, &[b"http/1.1"]).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        collect(send.send_request(req).await.unwrap()).await
    }

    /// One HTTP/2 request on a new connection.
    pub async fn send_h2(
        &self,
        addr: SocketAddr,
        mut req: Request<Full<Bytes>>,
    ) -> Response<Bytes> {
        let tls = self.tls(addr, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        if req.uri().authority().is_none() {
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            *req.uri_mut() = format!("https://localhost:{}{pq}", addr.port())
                .parse()
                .unwrap();
        }
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        collect(send.send_request(req).await.unwrap()).await
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> Response<Bytes> {
        self.send(addr, Request::get(path).body(Full::default()).unwrap())
            .await
    }

    /// Writes `bytes` over a new TLS connection (ALPN http/1.1) and reads until the server closes or 5 s
    /// of silence.
    pub async fn raw(&self, addr: SocketAddr, bytes: &[u8]) -> String {
        let mut tls = self.tls(addr, &[b"http/1.1"]).await;
        tls.write_all(bytes).await.unwrap();
        tls.flush().await.unwrap();
        read_all(&mut tls).await
    }
}

pub async fn collect(res: Response<hyper::body::Incoming>) -> Response<Bytes> {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, body)
}

/// Reads until EOF, an error, or 5 s without a byte.
pub async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the peer closes the connection (EOF, or an error such as a reset), for at most `limit` (a
/// safety net): what arrived before the close, or `None` if the connection was still open at `limit`.
/// Unlike [`read_all`], a connection that stays open and silent is not mistaken for a closed one.
pub async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Reads until `needle` has been seen (or EOF / 5 s of silence).
pub async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, needle: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(needle) {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response with a Content-Length body (or none): (status, head, body). A safety net
/// of 30 s without a response fails the test.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::io::AsyncReadExt::read(s, &mut byte),
        )
        .await
        .expect("no response within 30 s")
        .unwrap();
        assert!(
            n == 1,
            "connection closed inside a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::io::AsyncReadExt::read_exact(s, &mut body)
        .await
        .unwrap();
    (status, head, body)
}

/// Accepts any server certificate (for tests that check which certificate is presented, not its trust).
#[derive(Debug)]
pub struct AcceptAnyCert;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts any certificate but still checks the handshake signatures.
pub fn insecure_config(alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c
}

/// GET `path` over HTTP/1.1 on an established TLS stream and collect the response.
pub async fn get_on<S>(tls: S, path: &str) -> Response<Bytes>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    collect(send.send_request(req).await.unwrap()).await
}

/// GET / on a new verified TLS connection (SNI and Host `localhost`): the status and the leaf the server
/// presented, or what went wrong.
pub async fn fresh_get(client: &Client, addr: SocketAddr) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(client.config(&[b"http/1.1"])))
        .connect(
            ServerName::try_from("localhost").map_err(|e| e.to_string())?,
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?[0]
        .to_vec();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((status, leaf))
}
