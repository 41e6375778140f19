//! Logging: tracing to stderr, text or JSON; access lines to `[log] file` instead when set (`logfile`). The access log is one `access` event per request, written when
//! the response body ends (or is dropped), so it carries the bytes sent and the full duration. What any
//! client can make us log is bounded: libraries' complaints about a peer are debug lines ([`PeerNoise`]),
//! and our own lines about refused input are capped per kind per second ([`Refusals`], [`refused!`]).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use portcullis_config::LogFormat;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{self, Filter, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::body::Body;
use crate::logfile::AccessFile;

/// At most this many lines per second of each kind of refusal (then a count of the rest).
pub const REFUSALS_PER_SECOND: u64 = 10;

/// Installs the global subscriber. `RUST_LOG` overrides `level` when set. With `file`, access lines (target
/// `access`) go there and everything else to standard error; without, everything goes to standard error.
pub fn init(format: LogFormat, level: &str, file: Option<&AccessFile>) {
    let filter =
        || PeerNoise(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)));
    let to_file = file.is_some();
    let mut layers = vec![
        fmt_layer(format, std::io::stderr)
            .with_filter(filter().and(filter_fn(move |m| !to_file || m.target() != "access")))
            .boxed(),
    ];
    if let Some(f) = file {
        layers.push(
            fmt_layer(format, f.clone())
                .with_filter(filter().and(filter_fn(|m| m.target() == "access")))
                .boxed(),
        );
    }
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// The text or JSON formatter, writing to `writer`.
fn fmt_layer<W>(format: LogFormat, writer: W) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    }
}

/// The filter, except that what rustls, h2 and hyper log above debug is judged as a debug line of theirs.
/// What they warn about is a peer's protocol mistake (an IP address as SNI, a bad alert, too many resets):
/// anyone can cause one per connection, so at `info` it would let any client fill the log. `RUST_LOG=rustls=debug`
/// (or `level = "debug"`) shows them again, with the library's own level.
struct PeerNoise(EnvFilter);

impl PeerNoise {
    fn is_noise(meta: &Metadata<'_>) -> bool {
        *meta.level() < Level::DEBUG
            && ["rustls", "h2", "hyper"].iter().any(|lib| {
                meta.target()
                    .strip_prefix(lib)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
    }
}

impl<S> Filter<S> for PeerNoise
where
    EnvFilter: Filter<S>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &layer::Context<'_, S>) -> bool {
        if !Self::is_noise(meta) {
            return Filter::enabled(&self.0, meta, cx);
        }
        let as_debug = Metadata::new(
            meta.name(),
            meta.target(),
            Level::DEBUG,
            meta.file(),
            meta.line(),
            meta.module_path(),
            tracing::field::FieldSet::new(&[], meta.callsite()),
            tracing::metadata::Kind::EVENT,
        );
        Filter::enabled(&self.0, &as_debug, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        let interest = Filter::callsite_enabled(&self.0, meta);
        // Judged per event (they are rare), so that the verdict is the debug one.
        if Self::is_noise(meta) {
            Interest::sometimes()
        } else {
            interest
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Filter::max_level_hint(&self.0)
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: layer::Context<'_, S>,
    ) {
        Filter::on_new_span(&self.0, attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: layer::Context<'_, S>,
    ) {
        Filter::on_record(&self.0, id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: layer::Context<'_, S>) {
        Filter::on_enter(&self.0, id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: layer::Context<'_, S>) {
        Filter::on_exit(&self.0, id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: layer::Context<'_, S>) {
        Filter::on_close(&self.0, id, cx);
    }
}

/// What a client had refused, one kind per log message: each kind is capped on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `request refused` (a head or an HTTP/2 request over a limit, malformed, too slow).
    Request,
    /// `request body refused` (bad chunked framing, an unreadable rate-limited body).
    Body,
    /// `request body timed out`.
    BodyTimeout,
    /// `connection refused: ...` (caps, PROXY header).
    Connection,
    /// `rate limited`.
    RateLimited,
}

impl Refusal {
    const COUNT: usize = 5;

    fn name(self) -> &'static str {
        match self {
            Refusal::Request => "request refused",
            Refusal::Body => "request body refused",
            Refusal::BodyTimeout => "request body timed out",
            Refusal::Connection => "connection refused",
            Refusal::RateLimited => "rate limited",
        }
    }
}

/// The log's budget for refusals: at most [`REFUSALS_PER_SECOND`] lines of each [`Refusal`] per second.
/// What is held back is counted, and the count is logged (`log lines suppressed`, with `kind` and
/// `suppressed`) just before the next line of that kind that is let through. Atomics only: one relaxed
/// load and one add per refusal, no lock. Lives in `State` (the guard holds it through its settings).
#[derive(Debug)]
pub struct Refusals {
    start: Instant,
    kinds: [Window; Refusal::COUNT],
}

#[derive(Debug, Default)]
struct Window {
    /// The second (since `start`) the counts are for.
    second: AtomicU64,
    lines: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            start: Instant::now(),
            kinds: Default::default(),
        }
    }
}

impl Refusals {
    /// Whether a line of `kind` may be written now; if so, first logs how many were held back before it.
    pub fn allow(&self, kind: Refusal) -> bool {
        self.allow_in(kind, self.start.elapsed().as_secs())
    }

    /// `allow`, `now` seconds after `start`.
    fn allow_in(&self, kind: Refusal, now: u64) -> bool {
        let w = &self.kinds[kind as usize];
        let second = w.second.load(Ordering::Relaxed);
        // One caller opens each new second; a line counted in the old one meanwhile only shifts a count.
        if second != now
            && w.second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            w.lines.store(0, Ordering::Relaxed);
            let held = w.suppressed.swap(0, Ordering::Relaxed);
            if held > 0 {
                let name = kind.name();
                if kind == Refusal::RateLimited {
                    tracing::warn!(kind = name, suppressed = held, "log lines suppressed");
                } else {
                    tracing::info!(target: "access", kind = name, suppressed = held, "log lines suppressed");
                }
            }
        }
        if w.lines.fetch_add(1, Ordering::Relaxed) < REFUSALS_PER_SECOND {
            true
        } else {
            w.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// `refused!(refusals, Kind => info!(...))`: the log line, if [`Refusals::allow`] lets a `Kind` line through.
macro_rules! refused {
    ($refusals:expr, $kind:ident => $level:ident!($($arg:tt)*)) => {
        if $refusals.allow($crate::telemetry::Refusal::$kind) {
            ::tracing::$level!($($arg)*);
        }
    };
}
pub(crate) use refused;

/// What the access log line says about one request.
#[derive(Debug)]
pub struct Access {
    pub start: Instant,
    pub client: IpAddr,
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<Arc<str>>,
    pub bytes: u64,
    /// Its `X-Request-Id` (checked: visible ASCII).
    pub request_id: http::HeaderValue,
    /// The connection's verified client certificate (mutual TLS): its subject goes in the line.
    pub client_cert: Option<Arc<crate::http::client_cert::ClientCert>>,
}

/// A response body that writes the access line when it is done.
#[derive(Debug)]
pub struct Logged {
    inner: Body,
    access: Option<Box<Access>>,
}

impl Logged {
    pub fn new(inner: Body, access: Option<Box<Access>>) -> Logged {
        Logged { inner, access }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(a), Poll::Ready(Some(Ok(frame)))) = (this.access.as_mut(), &poll)
            && let Some(d) = frame.data_ref()
        {
            a.bytes += d.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(a) = self.access.take() {
            tracing::info!(
                target: "access",
                client = %a.client,
                method = %a.method,
                path = %a.path,
                status = a.status.as_u16(),
                bytes = a.bytes,
                duration_ms = a.start.elapsed().as_secs_f64() * 1000.0,
                upstream = a.upstream.as_deref().unwrap_or("-"),
                request_id = a.request_id.to_str().unwrap_or("-"),
                // Absent (not `-`) without one: lines of sites without client_auth are as they were.
                client_cert = a.client_cert.as_deref().map(|c| c.subject_text.as_str()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_capped_per_kind_per_second_and_the_rest_counted() {
        let r = Refusals::default();
        let let_through = |kind, now| (0..25).filter(|_| r.allow_in(kind, now)).count();
        assert_eq!(let_through(Refusal::Request, 0), 10);
        assert_eq!(
            r.kinds[Refusal::Request as usize]
                .suppressed
                .load(Ordering::Relaxed),
            15
        );
        // Another kind has its own budget.
        assert_eq!(let_through(Refusal::Connection, 0), 10);
        // A new second: the count is taken (and logged) by its first line, and 10 more pass.
        assert_eq!(let_through(Refusal::Request, 1), 10);
        assert_eq!(
            r.kinds[Refusal::Request as usize]
                .suppressed
                .load(Ordering::Relaxed),
            15
        );
        assert!(r.allow_in(Refusal::Request, 5));
        assert_eq!(
            r.kinds[Refusal::Request as usize]
                .suppressed
                .load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn only_rustls_h2_and_hyper_above_debug_are_peer_noise() {
        let meta = |target, level| {
            Metadata::new(
                "e",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
                tracing::metadata::Kind::EVENT,
            )
        };
        struct Site;
        impl tracing::callsite::Callsite for Site {
            fn set_interest(&self, _: Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        static CALLSITE: Site = Site;
        assert!(PeerNoise::is_noise(&meta(
            "rustls::msgs::handshake",
            Level::WARN
        )));
        assert!(PeerNoise::is_noise(&meta(
            "h2::proto::streams::recv",
            Level::WARN
        )));
        assert!(PeerNoise::is_noise(&meta("hyper", Level::ERROR)));
        assert!(!PeerNoise::is_noise(&meta("rustls::server", Level::DEBUG)));
        assert!(!PeerNoise::is_noise(&meta(
            "hyper_rustls::connector",
            Level::WARN
        )));
        assert!(!PeerNoise::is_noise(&meta("h2load", Level::WARN)));
        assert!(!PeerNoise::is_noise(&meta(
            "portcullis::reload",
            Level::WARN
        )));
    }
}
