//! The admin listener from a test: plain HTTP/1.1 requests to it, and the Prometheus text format it
//! answers `/metrics` with, parsed into samples.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request to the admin listener on a new connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Response<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    super::client::collect(send.send_request(req).await.unwrap()).await
}

/// One sample: its metric name and labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// `/metrics`, parsed: every sample by series. Comment lines (`# HELP`, `# TYPE`, `# EOF`) are skipped.
#[derive(Debug, Default)]
pub struct Metrics(pub BTreeMap<Series, f64>);

impl Metrics {
    pub async fn scrape(addr: SocketAddr) -> Metrics {
        let res = request(addr, "GET", "/metrics").await;
        assert_eq!(res.status(), 200, "{res:?}");
        Metrics::parse(std::str::from_utf8(res.body()).unwrap())
    }

    pub fn parse(text: &str) -> Metrics {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => (name.to_owned(), labels(rest.trim_end_matches('}'))),
            };
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("{line}")),
            };
            out.insert(Series { name, labels }, value);
        }
        Metrics(out)
    }

    /// The sum of every sample of `name` whose labels include all of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(s, _)| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every series of `name`.
    pub fn series(&self, name: &str) -> Vec<(&Series, f64)> {
        self.0
            .iter()
            .filter(|(s, _)| s.name == name)
            .map(|(s, v)| (s, *v))
            .collect()
    }
}

/// `a="x",b="y"` (values without escaped quotes or commas: ours never have them).
fn labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}
