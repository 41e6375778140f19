//! `handshake`: a load client in which every request pays for a full TLS handshake. Each of C tasks, for D
//! seconds, opens a new TCP connection, does a TLS handshake with session resumption off, sends one
//! `GET PATH` with `Connection: close`, reads to EOF and starts again. wrk and h2load resume sessions when
//! they reconnect, so they cannot measure this (see shared/TESTING.md).
//!
//! It prints one `key=value` line that `benches/run` parses: requests, errors, req/s, p50 and p99 latency.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_bench::{BoxError, parse_count, parse_flag, parse_secs};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str = "usage: handshake --connect ADDR:PORT --ca CA.pem [--name localhost] [--duration SECS] \
                     [--concurrency N] [--path /] [--dangerous-skip-verify-after-first]";

fn main() -> ExitCode {
    portcullis_bench::client_main("handshake", USAGE, Args::parse, run)
}

#[derive(Debug)]
struct Args {
    connect: SocketAddr,
    ca: PathBuf,
    name: String,
    duration: Duration,
    concurrency: usize,
    path: String,
    /// Verify the certificate (chain and handshake signature) on the first connection only. The server's
    /// work is the same either way; the client's halves, so that one load core can keep the proxy busy.
    dangerous_skip_verify_after_first: bool,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut connect = None;
        let mut ca = None;
        let mut name = "localhost".to_owned();
        let mut duration = Duration::from_secs(10);
        let mut concurrency = 20;
        let mut path = "/".to_owned();
        let mut dangerous_skip_verify_after_first = false;
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--connect" => connect = Some(parse_flag(&flag, &value()?)?),
                "--ca" => ca = Some(PathBuf::from(value()?)),
                "--name" => name = value()?,
                "--duration" => duration = parse_secs(&flag, &value()?)?,
                "--concurrency" => concurrency = parse_count(&flag, &value()?)?,
                "--path" => path = value()?,
                "--dangerous-skip-verify-after-first" => dangerous_skip_verify_after_first = true,
                "-h" | "--help" => return Err("help".into()),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(Args {
            connect: connect.ok_or("--connect is required")?,
            ca: ca.ok_or("--ca is required")?,
            name,
            duration,
            concurrency,
            path,
            dangerous_skip_verify_after_first,
        })
    }
}

/// What one task saw.
#[derive(Debug, Default)]
struct Tally {
    /// Microseconds from connect() to EOF, one per successful request.
    latencies_us: Vec<u32>,
    errors: u64,
    /// Sessions the server resumed: must stay 0, or this is not a handshake benchmark.
    resumed: u64,
    first_error: Option<String>,
}

async fn run(args: Args) -> Result<(), BoxError> {
    let verified = portcullis_bench::client_config(&args.ca)?;
    let connector = TlsConnector::from(Arc::new(verified.clone()));
    let name = ServerName::try_from(args.name.clone())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.path, args.name
    );
    let request: Arc<[u8]> = Arc::from(request.into_bytes());

    // One connection first, outside the measurement: it fails loudly if the proxy is not there, and it says
    // what was negotiated so that the report can show both proxies did the same handshake.
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(4096);
    let params = once(&connector, &name, args.connect, &request, &mut buf)
        .await?
        .describe();
    println!("negotiated {params}");
    let connector = if args.dangerous_skip_verify_after_first {
        let mut unverified = verified;
        let provider = unverified.crypto_provider().clone();
        unverified
            .dangerous()
            .set_certificate_verifier(Arc::new(danger::NoVerification(provider)));
        TlsConnector::from(Arc::new(unverified))
    } else {
        connector
    };

    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (connector, name, request) = (connector.clone(), name.clone(), request.clone());
        let addr = args.connect;
        tasks.spawn(async move { worker(connector, name, addr, request, deadline).await });
    }
    while let Some(t) = tasks.join_next().await {
        let t = t?;
        tally.latencies_us.extend(t.latencies_us);
        tally.errors += t.errors;
        tally.resumed += t.resumed;
        if tally.first_error.is_none() {
            tally.first_error = t.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();

    let lat = &mut tally.latencies_us;
    lat.sort_unstable();
    let done = lat.len();
    if let Some(e) = &tally.first_error {
        eprintln!("handshake: {} errors; the first: {e}", tally.errors);
    }
    if tally.resumed > 0 {
        eprintln!(
            "handshake: {} sessions were RESUMED: not a full-handshake measurement",
            tally.resumed
        );
    }
    println!(
        "requests={done} errors={} resumed={} seconds={elapsed:.3} rps={:.1} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        tally.errors,
        tally.resumed,
        done as f64 / elapsed,
        percentile_ms(lat, 50.0),
        percentile_ms(lat, 99.0),
        lat.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
    );
    if done == 0 {
        return Err("no request succeeded".into());
    }
    Ok(())
}

/// Requests until the deadline, each on a new connection.
async fn worker(
    connector: TlsConnector,
    name: ServerName<'static>,
    addr: SocketAddr,
    request: Arc<[u8]>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match once(&connector, &name, addr, &request, &mut buf).await {
            Ok(done) => {
                let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
                tally.latencies_us.push(us);
                if done.resumed {
                    tally.resumed += 1;
                }
            }
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e.to_string());
                }
                // A refused or reset connection fails fast: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

/// What one finished request tells about its connection.
#[derive(Debug)]
struct Done {
    resumed: bool,
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::CipherSuite>,
    group: Option<rustls::NamedGroup>,
}

impl Done {
    fn describe(&self) -> String {
        let show = |x: Option<String>| x.unwrap_or_else(|| "-".to_owned());
        format!(
            "version={} suite={} group={} resumed={}",
            show(self.version.map(|v| format!("{v:?}"))),
            show(self.suite.map(|s| format!("{s:?}"))),
            show(self.group.map(|g| format!("{g:?}"))),
            self.resumed,
        )
    }
}

/// One connection, one request, read to EOF; the response must be a 200.
async fn once(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Done, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    let done = {
        let c = tls.get_ref().1;
        Done {
            resumed: c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            group: c.negotiated_key_exchange_group().map(|g| g.name()),
        }
    };
    tls.write_all(request).await?;
    buf.clear();
    match tls.read_to_end(buf).await {
        Ok(_) => {}
        // A server that closes without close_notify after a complete response still answered.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
        return Err(format!("unexpected response: {head:?}").into());
    }
    Ok(done)
}

/// The p-th percentile (nearest rank) of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

/// The verifier behind `--dangerous-skip-verify-after-first`: accepts any certificate and any handshake
/// signature. Only for load generation against a server whose certificate the first connection verified.
mod danger {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    #[derive(Debug)]
    pub struct NoVerification(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
