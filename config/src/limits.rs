//! `[limits]`, `[timeouts]` and `[buffers]`: what one client, connection or request may cost, in bytes,
//! counts and time, and what buffering may hold. Every value is positive; the defaults are in `defaults.rs`.

use crate::check::Checker;
use crate::defaults;
use crate::file;
use crate::file::S;
use crate::model::{Buffers, Limits, Timeouts};

impl Checker<'_> {
    pub(crate) fn limits(&mut self, l: Option<file::Limits>) -> Limits {
        let l = l.unwrap_or(file::Limits {
            header_bytes: None,
            headers: None,
            uri_bytes: None,
            body: None,
            max_requests_per_connection: None,
            connections: None,
            connections_per_ip: None,
            h2_max_streams: None,
            min_body_rate: None,
            min_body_rate_grace: None,
        });
        let limits = Limits {
            header_bytes: self.size(
                "limits.header_bytes",
                l.header_bytes,
                defaults::HEADER_BYTES,
            ),
            headers: self.count("limits.headers", l.headers, defaults::HEADERS),
            uri_bytes: self.size("limits.uri_bytes", l.uri_bytes, defaults::URI_BYTES),
            body: self.size("limits.body", l.body, defaults::BODY),
            max_requests_per_connection: self.count(
                "limits.max_requests_per_connection",
                l.max_requests_per_connection,
                defaults::MAX_REQUESTS_PER_CONNECTION,
            ),
            connections: self.count("limits.connections", l.connections, defaults::CONNECTIONS),
            connections_per_ip: self.count(
                "limits.connections_per_ip",
                l.connections_per_ip,
                defaults::CONNECTIONS_PER_IP,
            ),
            h2_max_streams: self.count(
                "limits.h2_max_streams",
                l.h2_max_streams,
                defaults::H2_MAX_STREAMS,
            ),
            min_body_rate: self.byte_rate("limits.min_body_rate", l.min_body_rate),
            min_body_rate_grace: self.duration(
                "limits.min_body_rate_grace",
                l.min_body_rate_grace,
                defaults::MIN_BODY_RATE_GRACE,
            ),
        };
        if limits.header_bytes < 1024 {
            self.problem(0..0, "limits.header_bytes", "must be at least 1KiB");
        }
        limits
    }

    /// "1KiB/s" (a size per second) or "off"; the default when absent.
    fn byte_rate(&mut self, key: &str, s: Option<S<String>>) -> Option<u64> {
        let Some(s) = s else {
            return Some(defaults::MIN_BODY_RATE);
        };
        let text = s.get_ref().trim();
        if text == "off" {
            return None;
        }
        let parsed = text
            .strip_suffix("/s")
            .ok_or_else(|| "must be a size per second, like \"1KiB/s\", or \"off\"".to_owned())
            .and_then(|n| crate::size::parse(n.trim()));
        match parsed {
            Ok(0) => {
                self.problem(s.span(), key, "must be more than zero (or \"off\")");
                Some(defaults::MIN_BODY_RATE)
            }
            Ok(n) => Some(n),
            Err(why) => {
                self.problem(s.span(), key, why);
                Some(defaults::MIN_BODY_RATE)
            }
        }
    }

    pub(crate) fn buffers(&mut self, b: Option<file::Buffers>) -> Buffers {
        let b = b.unwrap_or(file::Buffers {
            memory_per_request: None,
            memory: None,
            disk: None,
            max_response: None,
        });
        let buffers = Buffers {
            memory_per_request: self.size(
                "buffers.memory_per_request",
                b.memory_per_request,
                defaults::BUFFER_MEMORY_PER_REQUEST,
            ),
            memory: self.size("buffers.memory", b.memory, defaults::BUFFER_MEMORY),
            disk: self.size("buffers.disk", b.disk, defaults::BUFFER_DISK),
            max_response: self.size(
                "buffers.max_response",
                b.max_response,
                defaults::BUFFER_MAX_RESPONSE,
            ),
        };
        if buffers.memory < buffers.memory_per_request {
            self.problem(
                0..0,
                "buffers.memory",
                "must be at least buffers.memory_per_request",
            );
        }
        buffers
    }

    pub(crate) fn timeouts(&mut self, t: Option<file::Timeouts>) -> Timeouts {
        let t = t.unwrap_or(file::Timeouts {
            upstream_connect: None,
            upstream_response: None,
            client_idle: None,
            tunnel_idle: None,
            client_header: None,
            client_body: None,
            shutdown: None,
        });
        Timeouts {
            upstream_connect: self.duration(
                "timeouts.upstream_connect",
                t.upstream_connect,
                defaults::UPSTREAM_CONNECT,
            ),
            upstream_response: self.duration(
                "timeouts.upstream_response",
                t.upstream_response,
                defaults::UPSTREAM_RESPONSE,
            ),
            client_idle: self.duration(
                "timeouts.client_idle",
                t.client_idle,
                defaults::CLIENT_IDLE,
            ),
            tunnel_idle: self.duration(
                "timeouts.tunnel_idle",
                t.tunnel_idle,
                defaults::TUNNEL_IDLE,
            ),
            client_header: self.duration(
                "timeouts.client_header",
                t.client_header,
                defaults::CLIENT_HEADER,
            ),
            client_body: self.duration(
                "timeouts.client_body",
                t.client_body,
                defaults::CLIENT_BODY,
            ),
            shutdown: self.duration("timeouts.shutdown", t.shutdown, defaults::SHUTDOWN),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::testing::{EXAMPLE, parse, problems};

    #[test]
    fn limits_sizes_and_route_overrides() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.limits.body, 10 * 1024 * 1024);
        assert_eq!(c.sites[0].routes[0].max_body, 10 * 1024 * 1024);
        let text = EXAMPLE.replace(
            "upstream = \"app\"\n",
            "upstream = \"app\"\nmax_body = \"1GiB\"\n",
        );
        let c = parse(&format!(
            "{text}\n[limits]\nbody = 1000\nheader_bytes = \"16KiB\"\n"
        ))
        .unwrap();
        assert_eq!(c.sites[0].routes[0].max_body, 1 << 30);
        assert_eq!(c.limits.body, 1000);
        assert_eq!(c.limits.header_bytes, 16 * 1024);
        let p = problems(&format!(
            "{EXAMPLE}\n[limits]\nbody = \"lots\"\nheaders = 0\n"
        ));
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn bad_durations_and_versions_are_named() {
        let text = format!("{EXAMPLE}\n[timeouts]\nshutdown = \"soon\"\n").replace(
            "key  = \"/etc/portcullis/privkey.pem\"",
            "key = \"k.pem\"\nmin_version = \"1.1\"",
        );
        let p = problems(&text);
        assert!(p.iter().any(|l| l.contains("timeouts.shutdown")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("tls.min_version")), "{p:?}");
    }

    #[test]
    fn min_body_rate_and_buffers() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.limits.min_body_rate, Some(1024));
        assert_eq!(c.limits.min_body_rate_grace, Duration::from_secs(10));
        assert_eq!(c.buffers.memory_per_request, 64 * 1024);
        assert!(c.sites[0].routes[0].buffer_requests && c.sites[0].routes[0].buffer_responses);
        let c = parse(&format!(
            "{EXAMPLE}\n[limits]\nmin_body_rate = \"16KiB/s\"\nmin_body_rate_grace = \"2s\"\n[buffers]\nmemory_per_request = \"1MiB\"\nmemory = \"8MiB\"\ndisk = \"1GiB\"\nmax_response = \"10MiB\"\n"
        ))
        .unwrap();
        assert_eq!(c.limits.min_body_rate, Some(16 * 1024));
        assert_eq!(c.limits.min_body_rate_grace, Duration::from_secs(2));
        assert_eq!(c.buffers.memory_per_request, 1 << 20);
        assert_eq!(c.buffers.max_response, 10 << 20);
        let c = parse(&format!("{EXAMPLE}\n[limits]\nmin_body_rate = \"off\"\n")).unwrap();
        assert_eq!(c.limits.min_body_rate, None);
        for bad in ["1KiB", "0/s", "fast/s"] {
            let p = problems(&format!("{EXAMPLE}\n[limits]\nmin_body_rate = \"{bad}\"\n"));
            assert!(
                p.iter().any(|l| l.contains("limits.min_body_rate")),
                "{bad}: {p:?}"
            );
        }
        let p = problems(&format!(
            "{EXAMPLE}\n[buffers]\nmemory_per_request = \"1MiB\"\nmemory = \"64KiB\"\n"
        ));
        assert!(p.iter().any(|l| l.contains("buffers.memory")), "{p:?}");
    }

    #[test]
    fn tunnel_idle_is_read_and_must_be_positive() {
        let c = parse(&format!("{EXAMPLE}\n[timeouts]\ntunnel_idle = \"90s\"\n")).unwrap();
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(90));
        let p = problems(&format!("{EXAMPLE}\n[timeouts]\ntunnel_idle = \"0s\"\n"));
        assert!(
            p.iter().any(|l| l.contains("timeouts.tunnel_idle")),
            "{p:?}"
        );
    }
}
