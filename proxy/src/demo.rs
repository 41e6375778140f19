//! `portcullis demo`: the embedded default. A config made from a template (parsed by the same checks as a
//! file), a self-signed certificate, and a small built-in upstream that shows what the app would receive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_config::Config;
use tokio::net::TcpListener;

/// The demo's config: HTTPS on `https`, plain HTTP off, one route to the built-in upstream.
pub fn config(https: SocketAddr, upstream: SocketAddr) -> Result<Config, portcullis_config::Error> {
    let text = format!(
        "[listen]\nhttps = [\"{https}\"]\nhttp = []\n\n[tls]\nself_signed = true\n\n[[route]]\npath = \"/\"\nupstream = \"demo\"\n\n[upstream.demo]\nservers = [\"{upstream}\"]\n"
    );
    Config::parse(Path::new("<demo>"), &text)
}

/// The built-in upstream: answers every request with a page listing the headers it received.
pub async fn upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc =
                service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(page(&req)) });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
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
