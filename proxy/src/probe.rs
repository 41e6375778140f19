//! Tests only (debug builds): what the confined process can still do. `PORTCULLIS_TEST_SANDBOX_PROBE`
//! lists probes, comma-separated: `read:PATH` (read a file), `exec:PATH` (run a program), `connect:ADDR`
//! (a TCP connection). Once the proxy is ready, each runs on a runtime thread (born inside the sandbox,
//! as every thread that serves) and one line says how it went: `sandbox probe: read /etc/x: ok`, or the
//! error the kernel gave. A release build has none of this.

use std::time::Duration;

/// The environment variable that lists the probes.
pub const PROBES: &str = "PORTCULLIS_TEST_SANDBOX_PROBE";

/// Runs the probes the environment lists, if any, off the async threads.
pub fn start() {
    let Some(list) = std::env::var_os(PROBES) else {
        return;
    };
    let list = list.to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        for probe in list.split(',').filter(|p| !p.is_empty()) {
            let (kind, arg) = probe.split_once(':').unwrap_or((probe, ""));
            let result = match kind {
                "read" => std::fs::read(arg).map(drop),
                "exec" => std::process::Command::new(arg)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(drop),
                "connect" => arg
                    .parse()
                    .map_err(std::io::Error::other)
                    .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)))
                    .map(drop),
                _ => Err(std::io::Error::other("unknown probe")),
            };
            match result {
                Ok(()) => tracing::info!("sandbox probe: {kind} {arg}: ok"),
                Err(e) => tracing::info!("sandbox probe: {kind} {arg}: {e}"),
            }
        }
    });
}
