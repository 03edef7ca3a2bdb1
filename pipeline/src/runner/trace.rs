//! Per-event spans that join each producer's trace to the batch that applied its event.

use ecst_operators::{RawEntry, Record};

use crate::config::PipelineConfig;

/// Most producer links one batch span carries.
const MAX_LINKS: usize = 128;

/// One span per entry that carries a sampled `traceparent`, a child of the producer's span
/// (so that Jaeger shows producer, relay and worker as one trace), linked to the batch span
/// that processed it. A batch holds many producers' events, so it can only link to them.
pub(super) fn trace_events(
    config: &PipelineConfig,
    batch: &tracing::Span,
    entries: &[RawEntry],
) -> Vec<(usize, tracing::Span)> {
    use crate::telemetry;
    if !telemetry::exporting() {
        return Vec::new();
    }
    if let Some(id) = telemetry::trace_id_of(batch) {
        batch.record("trace_id", id.as_str());
    }
    let batch_context = telemetry::traceparent_of(batch);
    let mut spans = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(traceparent) = entry
            .field(ecst_schemas::wire::FIELD_TRACEPARENT)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            continue;
        };
        if i < MAX_LINKS {
            telemetry::link(batch, traceparent);
        }
        let span = tracing::info_span!(
            parent: None,
            "ecst.event",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %config.source.stream,
            messaging.consumer.group.name = %config.source.group,
            messaging.message.id = %entry.id,
            ecst.pipeline = %config.name,
            ecst.aggregate_type = tracing::field::Empty,
        );
        if telemetry::adopt(&span, traceparent) {
            if let Some(batch_context) = &batch_context {
                telemetry::link(&span, batch_context);
            }
            spans.push((i, span));
        }
    }
    spans
}

/// Records each traced event's aggregate type, as the pipeline decoded it.
pub(super) fn name_event_spans(spans: &[(usize, tracing::Span)], per_sink: &[Vec<Record>]) {
    for (entry, span) in spans {
        if let Some(kind) = per_sink
            .iter()
            .flatten()
            .find(|r| r.entry == *entry)
            .and_then(|r| r.event.aggregate_type.as_deref())
        {
            span.record("ecst.aggregate_type", kind);
        }
    }
}
