//! `portcullis demo`: the embedded default. A config made from a template (parsed by the same checks as a
//! file), a self-signed certificate, and a small built-in upstream that shows what the app would receive.
//! Its start-up is here too: the upstream's socket is bound first (the config names it), and a demo started
//! as root serves as `nobody`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_config::Config;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;
use crate::{cli, privdrop};

/// Binds the built-in upstream on loopback and makes the demo's config around it, HTTPS on `https`. Errors
/// are printed (logging is not set up yet); the exit code says whose they were.
pub fn prepare(https: SocketAddr) -> Result<(Config, std::net::TcpListener), ExitCode> {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(|e| {
            eprintln!("portcullis demo: cannot bind the built-in upstream: {e}");
            ExitCode::FAILURE
        })?;
    let upstream_addr = upstream.local_addr().map_err(|e| {
        eprintln!("portcullis demo: {e}");
        ExitCode::FAILURE
    })?;
    let mut c = config(https, upstream_addr).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(cli::EXIT_CONFIG)
    })?;
    println!(
        "Portcullis demo: try\n    curl -k https://{https}/\n(self-signed certificate; Ctrl-C stops it)"
    );
    // The demo never serves as root: started as root, it becomes `nobody` (it has no files).
    if privdrop::started_as_root() && c.process.user.is_none() {
        c.process.user = Some("nobody".into());
    }
    Ok((c, upstream))
}

/// Serves the built-in upstream on the runtime until shutdown begins: then it stops accepting, and each of
/// its connections closes once what is in flight on it is answered.
pub fn start(upstream: std::net::TcpListener, shutdown: &Shutdown) -> io::Result<()> {
    let listener = TcpListener::from_std(upstream)?;
    tokio::spawn(serve(listener, shutdown.clone()));
    Ok(())
}

/// The demo's config: HTTPS on `https`, plain HTTP off, one route to the built-in upstream.
pub fn config(https: SocketAddr, upstream: SocketAddr) -> Result<Config, portcullis_config::Error> {
    let text = format!(
        "[listen]\nhttps = [\"{https}\"]\nhttp = []\n\n[tls]\nself_signed = true\n\n[[route]]\npath = \"/\"\nupstream = \"demo\"\n\n[upstream.demo]\nservers = [\"{upstream}\"]\n"
    );
    Config::parse(Path::new("<demo>"), &text)
}

/// The built-in upstream: answers every request with a page listing the headers it received.
async fn serve(listener: TcpListener, mut shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = shutdown.begun() => return,
        };
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc =
                service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(page(&req)) });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = shutdown.begun() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
}

fn page(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut rows = String::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>\n",
            escape(name.as_str()),
            escape(&value)
        ));
    }
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Portcullis demo</title></head><body>\n<h1>Hello from the built-in upstream</h1>\n<p>Portcullis terminated TLS and forwarded <code>{} {}</code>. The app received these headers:</p>\n<table>\n{rows}</table>\n</body></html>\n",
        escape(req.method().as_str()),
        escape(&req.uri().to_string())
    );
    let mut res = Response::new(Full::new(Bytes::from(html)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
