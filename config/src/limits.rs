//! `[limits]` and `[timeouts]`: what one client, connection or request may cost, in bytes, counts and time.
//! Every value is positive; the defaults are in `defaults.rs`.

use crate::check::Checker;
use crate::defaults;
use crate::file;
use crate::model::{Limits, Timeouts};

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
        };
        if limits.header_bytes < 1024 {
            self.problem(0..0, "limits.header_bytes", "must be at least 1KiB");
        }
        limits
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
