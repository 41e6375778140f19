//! `idle`: what an idle TLS connection costs a proxy. It opens N TCP+TLS connections (full handshakes,
//! resumption off, ALPN `http/1.1`), `--concurrency` at a time; on each it sends one keep-alive
//! `GET PATH` and reads the whole response (Content-Length or chunked), then leaves the connection open and
//! silent. Once all N have answered it prints one `key=value` line that `benches/run` waits for and parses
//! (`open=N errors=E seconds=S`); `benches/run` then reads the proxy's RSS. It keeps the connections until
//! SIGTERM or `--hold` seconds have passed, then closes them and exits 0.

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portcullis_bench::{BoxError, parse_count, parse_flag, parse_secs};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const USAGE: &str = "usage: idle --connect ADDR:PORT --ca CA.pem --connections N [--name localhost] \
                     [--concurrency C] [--path /] [--hold SECS] [--timeout SECS]";

/// The most response bytes read on one connection: the bench's small response is a few hundred.
const MAX_RESPONSE: usize = 64 * 1024;

fn main() -> ExitCode {
    portcullis_bench::client_main("idle", USAGE, Args::parse, run)
}

#[derive(Debug)]
struct Args {
    connect: SocketAddr,
    ca: PathBuf,
    name: String,
    connections: usize,
    concurrency: usize,
    path: String,
    /// How long the connections are held after all have answered, at most (SIGTERM ends it sooner).
    hold: Duration,
    /// Bound on opening all of them.
    timeout: Duration,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut connect = None;
        let mut ca = None;
        let mut name = "localhost".to_owned();
        let mut connections = None;
        let mut concurrency = 50;
        let mut path = "/".to_owned();
        let mut hold = Duration::from_secs(60);
        let mut timeout = Duration::from_secs(60);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--connect" => connect = Some(parse_flag(&flag, &value()?)?),
                "--ca" => ca = Some(PathBuf::from(value()?)),
                "--name" => name = value()?,
                "--connections" => connections = Some(parse_count(&flag, &value()?)?),
                "--concurrency" => concurrency = parse_count(&flag, &value()?)?,
                "--path" => path = value()?,
                "--hold" => hold = parse_secs(&flag, &value()?)?,
                "--timeout" => timeout = parse_secs(&flag, &value()?)?,
                "-h" | "--help" => return Err("help".into()),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(Args {
            connect: connect.ok_or("--connect is required")?,
            ca: ca.ok_or("--ca is required")?,
            name,
            connections: connections.ok_or("--connections is required")?,
            concurrency,
            path,
            hold,
            timeout,
        })
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    // Installed first, so that a SIGTERM while connecting is not the default (exit without a word).
    let mut term = signal(SignalKind::terminate())?;
    // The shared client (full handshakes, X25519), speaking HTTP/1.1 by ALPN as the request does.
    let mut config = portcullis_bench::client_config(&args.ca)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(args.name.clone())?;
    let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", args.path, args.name);
    let request: Arc<[u8]> = Arc::from(request.into_bytes());

    // Workers take connection numbers from a shared counter until N are handed out; each keeps its
    // connections (and returns them) so that nothing is closed before the measurement.
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.min(args.connections) {
        let (connector, name, request, next) = (
            connector.clone(),
            name.clone(),
            request.clone(),
            next.clone(),
        );
        let (addr, n) = (args.connect, args.connections);
        tasks.spawn(async move {
            let mut open = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut buf = Vec::with_capacity(4096);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match once(&connector, &name, addr, &request, &mut buf).await {
                    Ok(tls) => open.push(tls),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (open, errors, first_error)
        });
    }
    let mut open = Vec::with_capacity(args.connections);
    let mut errors = 0;
    let mut first_error = None;
    let joined = tokio::time::timeout(args.timeout, async {
        while let Some(t) = tasks.join_next().await {
            let (o, e, f) = t?;
            open.extend(o);
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
        Ok::<_, BoxError>(())
    })
    .await;
    match joined {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!("not all connections opened within {:?}", args.timeout).into());
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = &first_error {
        eprintln!("idle: {errors} errors; the first: {e}");
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "open={} errors={errors} seconds={elapsed:.3}",
            open.len()
        )?;
        out.flush()?;
    }
    if open.is_empty() {
        return Err("no connection answered".into());
    }
    tokio::select! {
        _ = term.recv() => {}
        () = tokio::time::sleep(args.hold) => {}
    }
    drop(open);
    Ok(())
}

/// One connection, one keep-alive request, its whole 200 response read; the connection is handed back open.
async fn once(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<TlsStream<TcpStream>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    tls.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err("the server closed the connection before the response ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_complete(buf)? {
            break;
        }
        if buf.len() > MAX_RESPONSE {
            return Err(format!("response over {MAX_RESPONSE} bytes").into());
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
        return Err(format!("unexpected response: {head:?}").into());
    }
    Ok(tls)
}

/// Whether `buf` holds a whole response: the head, then Content-Length bytes, or a chunked body up to its
/// last chunk (the bench's responses have no trailers).
fn response_complete(buf: &[u8]) -> Result<bool, BoxError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(false);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let body = buf.len() - (end + 4);
    for line in head.split("\r\n").skip(1) {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if field.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            return Ok(body >= len);
        }
        if field.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
        {
            return Ok(buf.ends_with(b"\r\n0\r\n\r\n") || buf[end + 4..].starts_with(b"0\r\n\r\n"));
        }
    }
    Err("response without Content-Length or chunked body: no way to tell where it ends on a kept-alive connection".into())
}
