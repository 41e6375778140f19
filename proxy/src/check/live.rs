//! `portcullis check --live`: asks the running instance, through the admin listener its config names,
//! how it is doing (`/health`, then `/metrics`) and prints a short summary: upstream servers up or down,
//! each certificate's expiry, reloads, requests served. Exits 1 when the listener cannot be reached or
//! answers badly, or when something is down (a server, an expired certificate, `/health` not ok); 64 when
//! the config names no admin listener it could reach. Blocking std I/O: no runtime.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_certs::inspect::format_time;
use portcullis_config::ServerAddr;

use crate::cli;

/// Connecting, and each read or write, may take this long.
const TIMEOUT: Duration = Duration::from_secs(5);
/// More than this from `/metrics` is not ours.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

pub fn run(path: &Path) -> ExitCode {
    let config = match super::load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(admin) = &config.admin else {
        eprintln!(
            "{}: no [admin] section: the running instance has no admin listener to ask",
            path.display()
        );
        return ExitCode::from(cli::EXIT_CONFIG);
    };
    let target = match Target::of(&admin.listen) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("{}: [admin] listen: {why}", path.display());
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };
    let health = match target.get("/health") {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cannot reach the admin listener at {target}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match target.get("/metrics") {
        Ok((200, body)) => Samples::parse(&body),
        Ok((status, _)) => {
            eprintln!("{target}: /metrics answered {status}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot read /metrics from {target}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    let now = SystemTime::now();
    let uptime = metrics
        .one("portcullis_start_time_seconds")
        .map(|t| {
            now.duration_since(UNIX_EPOCH)
                .map_or(0.0, |n| n.as_secs_f64())
                - t
        })
        .unwrap_or(0.0);
    let state = match health.0 {
        200 => "serving".to_owned(),
        503 => {
            ok = false;
            "DRAINING (shutting down)".to_owned()
        }
        s => {
            ok = false;
            format!("/health answered {s}")
        }
    };
    println!("{target}: {state}, up {}", human(uptime));

    let mut servers = metrics.all("portcullis_upstream_server_up");
    servers.sort_by(|a, b| a.0.cmp(&b.0));
    for (labels, up) in &servers {
        let (group, server) = (label(labels, "upstream"), label(labels, "server"));
        let with = [("upstream", group), ("server", server)];
        let up = *up >= 1.0;
        ok &= up;
        println!(
            "  upstream {group} {server}: {}, {} in flight, {} failures, {} retried elsewhere",
            if up { "up" } else { "DOWN" },
            metrics.sum("portcullis_upstream_server_in_flight", &with),
            metrics.sum("portcullis_upstream_server_failures_total", &with),
            metrics.sum("portcullis_upstream_server_retries_total", &with),
        );
    }
    let mut certs = metrics.all("portcullis_certificate_expiry_timestamp_seconds");
    certs.sort_by(|a, b| a.0.cmp(&b.0));
    for (labels, not_after) in &certs {
        let when = UNIX_EPOCH + Duration::from_secs_f64(not_after.max(0.0));
        let left = when.duration_since(now).ok();
        ok &= left.is_some();
        println!(
            "  certificate {}: expires {} ({})",
            label(labels, "name"),
            format_time(when),
            left.map_or_else(
                || "EXPIRED".to_owned(),
                |d| format!("in {} days", d.as_secs() / 86_400)
            )
        );
    }
    println!(
        "  reloads: {} ok, {} failed",
        metrics.sum("portcullis_config_reloads_total", &[("result", "ok")]),
        metrics.sum("portcullis_config_reloads_total", &[("result", "failed")]),
    );
    let classes = ["2xx", "3xx", "4xx", "5xx"]
        .iter()
        .map(|c| {
            format!(
                "{} {c}",
                metrics.sum("portcullis_requests_total", &[("class", c)])
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "  requests: {} served ({classes}); {} connections open, {} tunnels, {} rate-limited",
        metrics.sum("portcullis_requests_total", &[]),
        metrics.sum("portcullis_connections_open", &[]),
        metrics.sum("portcullis_tunnels_open", &[]),
        metrics.sum("portcullis_rate_limited_total", &[]),
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Where the admin listener is, as a client reaches it.
enum Target {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "http://{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Target {
    fn of(listen: &ServerAddr) -> Result<Target, String> {
        match listen {
            ServerAddr::Unix(p) => Ok(Target::Unix(p.clone())),
            ServerAddr::Tcp(a) if a.port() == 0 => Err(format!(
                "{a}: port 0 is picked at start; name the port to ask it"
            )),
            // A listener on every address is reached on loopback.
            ServerAddr::Tcp(a) if a.ip().is_unspecified() => {
                let ip = match a.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                Ok(Target::Tcp(SocketAddr::new(ip, a.port())))
            }
            ServerAddr::Tcp(a) => Ok(Target::Tcp(*a)),
        }
    }

    /// `GET path` on a new connection: the status and the body.
    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut answer = Vec::new();
        match self {
            Target::Tcp(a) => {
                let mut s = TcpStream::connect_timeout(a, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_write_timeout(Some(TIMEOUT))?;
                s.write_all(request.as_bytes())?;
                s.take(MAX_ANSWER).read_to_end(&mut answer)?;
            }
            Target::Unix(p) => {
                let mut s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_write_timeout(Some(TIMEOUT))?;
                s.write_all(request.as_bytes())?;
                s.take(MAX_ANSWER).read_to_end(&mut answer)?;
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        Ok((status, body.to_owned()))
    }
}

/// `/metrics` as samples: name, labels, value.
struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    fn parse(text: &str) -> Samples {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => (
                    name,
                    rest.trim_end_matches('}')
                        .split("\",")
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                        .collect(),
                ),
            };
            out.push((name.to_owned(), labels, value));
        }
        Samples(out)
    }

    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            // An empty sum of f64 is -0.
            .fold(0.0, |a, b| a + b)
    }

    fn one(&self, name: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
    }

    fn all(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    labels.get(key).map_or("?", String::as_str)
}

/// `3d 4h`, `2h 5m`, `42s`.
fn human(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_by_labels() {
        let m = Samples::parse(
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"y\"} 2\nx_total{a=\"2\",b=\"y\"} 3\nup 1\n",
        );
        assert_eq!(m.sum("x_total", &[]), 5.0);
        assert_eq!(m.sum("x_total", &[("a", "2")]), 3.0);
        assert_eq!(m.sum("x_total", &[("b", "y"), ("a", "1")]), 2.0);
        assert_eq!(m.one("up"), Some(1.0));
        assert_eq!(human(90_000.0), "1d 1h");
    }
}
