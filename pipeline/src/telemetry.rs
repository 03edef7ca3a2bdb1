//! Logs and traces. Logs go to stderr, as text or JSON; spans also go to an OTLP collector when
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! over gRPC or HTTP/protobuf as `OTEL_EXPORTER_OTLP_PROTOCOL` says. Without one, no exporter
//! is built and spans cost what a disabled `tracing` span costs.
//!
//! Context crosses the stream in the entry's `traceparent` field (W3C Trace Context).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable (colours only on a terminal).
    Text,
    /// One JSON object per line, with the current span's fields (its `trace_id` included).
    Json,
}

/// Text log lines: time, level, target, message and the event's own fields. The fields of the
/// spans around an event (a batch's, hundreds of characters) are left out unless
/// `ECST_LOG_SPANS=1`: they belong in traces and JSON logs, and buried every WARN line.
struct TextFormat {
    full: tracing_subscriber::fmt::format::Format,
    spans: bool,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for TextFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::FormatFields;
        use tracing_subscriber::fmt::time::FormatTime;
        if self.spans {
            return self.full.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
        let level = *meta.level();
        if writer.has_ansi_escapes() {
            let colour = match level {
                tracing::Level::ERROR => 31,
                tracing::Level::WARN => 33,
                tracing::Level::INFO => 32,
                tracing::Level::DEBUG => 34,
                tracing::Level::TRACE => 35,
            };
            write!(writer, " \x1b[{colour}m{level:>5}\x1b[0m ")?;
        } else {
            write!(writer, " {level:>5} ")?;
        }
        write!(writer, "{}: ", meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The installed logging and tracing; flushes spans on [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

fn endpoint_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

impl Telemetry {
    /// Installs the global subscriber; `service` names this process in traces unless
    /// `OTEL_SERVICE_NAME` does. `ECST_LOG` filters (default `info`).
    pub fn init(format: LogFormat, service: &str) -> Telemetry {
        let filter = tracing_subscriber::EnvFilter::try_from_env("ECST_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let spans = std::env::var("ECST_LOG_SPANS").is_ok_and(|v| v.trim() == "1");
        let text = (format == LogFormat::Text).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .event_format(TextFormat {
                    full: tracing_subscriber::fmt::format(),
                    spans,
                })
        });
        let json = (format == LogFormat::Json).then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr)
        });
        let mut export_error = None;
        let provider = if endpoint_configured() {
            match opentelemetry_otlp::SpanExporter::builder().build() {
                Ok(exporter) => {
                    let mut resource = Resource::builder();
                    if std::env::var("OTEL_SERVICE_NAME").is_err() {
                        resource = resource.with_service_name(service.to_string());
                    }
                    let processor =
                        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                            exporter,
                            opentelemetry_sdk::runtime::Tokio,
                        )
                        .build();
                    Some(
                        SdkTracerProvider::builder()
                            .with_resource(resource.build())
                            .with_span_processor(processor)
                            .build(),
                    )
                }
                Err(e) => {
                    export_error = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        let otel = provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("ecst")));
        EXPORTING.store(provider.is_some(), Ordering::Relaxed);
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .with(otel)
            .try_init();
        if let Some(e) = export_error {
            tracing::error!(error = %e, "Cannot build the OTLP span exporter; traces are not exported.");
        }
        Telemetry { provider }
    }

    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// The remote span a `traceparent` names, if it is valid.
pub fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the producer's span named by `traceparent`; `false` if it is
/// invalid or not sampled (then nothing is changed).
pub fn adopt(span: &tracing::Span, traceparent: &str) -> bool {
    match remote_context(traceparent) {
        Some(cx) if cx.span().span_context().is_sampled() => span.set_parent(cx).is_ok(),
        _ => false,
    }
}

/// Links `span` to the span a `traceparent` names.
pub fn link(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote_context(traceparent) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// The `traceparent` of `span`, to carry its context onward (`None` when not exporting).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id of `span`, for log lines (`None` when not exporting).
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_invalid_ones_do_not() {
        let cx = remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none()
        );
        assert!(remote_context("garbage").is_none());
    }
}
