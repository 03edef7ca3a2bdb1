//! Traces, received by real OTLP receivers in the test (gRPC with tonic, HTTP/protobuf with
//! axum): the outbox row's producer span, the relay's publish span and the worker's event span
//! form one trace; stages, sink applies and acks are spans of the batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use redis::Commands;

use crate::common::*;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    link_trace_ids: Vec<String>,
}

type Store = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(n)) => n.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn keep(store: &Store, request: ExportTraceServiceRequest) {
    let mut spans = store.lock().expect("store");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| text(a.value.as_ref()))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(a.value.as_ref())))
                        .collect(),
                    link_trace_ids: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                });
            }
        }
    }
}

struct GrpcReceiver(Store);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts an OTLP receiver (gRPC, or HTTP/protobuf on /v1/traces); returns its port.
fn receiver(grpc: bool) -> (u16, Store) {
    let store: Store = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let served = store.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr").port())
                .expect("port");
            if grpc {
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(GrpcReceiver(served)))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await
                    .expect("gRPC receiver");
            } else {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let served = served.clone();
                        async move {
                            match ExportTraceServiceRequest::decode(body) {
                                Ok(request) => {
                                    keep(&served, request);
                                    (
                                        axum::http::StatusCode::OK,
                                        ExportTraceServiceResponse::default().encode_to_vec(),
                                    )
                                }
                                Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                            }
                        }
                    }),
                );
                axum::serve(listener, app).await.expect("HTTP receiver");
            }
        });
    });
    (rx.recv().expect("receiver port"), store)
}

fn spans(store: &Store) -> Vec<Received> {
    store.lock().expect("store").clone()
}

const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn outbox_relay_and_worker_form_one_trace_over_grpc() {
    let (port, store) = receiver(true);
    let pg = postgres();
    let mut conn = redis();
    let stream = unique("traces");
    let prefix = format!("{stream}:");
    let table = format!("e2e_trace_outbox_{}", std::process::id());
    let mut cmd = ecst();
    cmd.args(["outbox", "install", "--table", &table])
        .env("DATABASE_URL", database_url());
    assert!(
        run_with_deadline(cmd, Duration::from_secs(30))
            .status
            .success()
    );
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload, headers)
             VALUES ($1, 'athlete', 'traced-1', 1, 'athlete.updated',
                     '{{\"displayName\": \"Secret Name\", \"status\": \"active\"}}',
                     jsonb_build_object('traceparent', $2::text))"
        ),
        &[&stream, &format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01")],
    );
    let otel = |cmd: &mut std::process::Command| {
        cmd.env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env_remove("OTEL_SERVICE_NAME");
    };
    let relay_file = pipeline_file(
        "relay",
        &format!(
            "name: trace-relay\npostgres: \"{}\"\noutbox: {{ table: {table} }}\npoll_interval: 200ms\n",
            database_url()
        ),
    );
    let mut cmd = ecst();
    cmd.arg("relay").arg(&relay_file);
    otel(&mut cmd);
    let relay = Worker::spawn(cmd);
    wait_until(Duration::from_secs(20), "the row on the stream", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 1
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");

    let pipeline = pipeline_file("traces", &athletes_pipeline(&stream, &prefix, ""));
    let mut cmd = ecst();
    cmd.arg("run").arg(&pipeline).arg("--drain");
    otel(&mut cmd);
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));

    wait_until(Duration::from_secs(20), "the worker's spans", || {
        spans(&store).iter().any(|s| s.name == "ecst.event")
            && spans(&store).iter().any(|s| s.name == "ecst.ack")
    });
    let all = spans(&store);
    let named = |name: &str| {
        all.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {all:#?}"))
            .clone()
    };
    let publish = named("ecst.relay.publish");
    assert_eq!(publish.service, "trace-relay");
    assert_eq!(publish.trace_id, PRODUCER_TRACE);
    assert_eq!(
        publish.parent_span_id, PRODUCER_SPAN,
        "the relay span is the row's child"
    );
    assert_eq!(publish.attributes["messaging.destination.name"], stream);

    let event = named("ecst.event");
    let entry_id = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query::<redis::streams::StreamRangeReply>(&mut conn)
        .expect("XRANGE")
        .ids[0]
        .id
        .clone();
    assert_eq!(event.service, "athletes");
    assert_eq!(
        event.trace_id, PRODUCER_TRACE,
        "one trace from the outbox to the worker"
    );
    assert_eq!(
        event.parent_span_id, publish.span_id,
        "the worker's span is the relay's child"
    );
    assert_eq!(event.attributes["messaging.destination.name"], stream);
    assert_eq!(event.attributes["messaging.consumer.group.name"], "replica");
    assert_eq!(event.attributes["messaging.message.id"], entry_id);
    assert_eq!(event.attributes["ecst.aggregate_type"], "athlete");

    let batch = named("ecst.batch");
    assert!(
        batch.link_trace_ids.contains(&PRODUCER_TRACE.to_string()),
        "the batch links to the producer's trace"
    );
    for child in ["ecst.stage", "ecst.sink.apply", "ecst.ack"] {
        let span = named(child);
        assert_eq!(
            span.trace_id, batch.trace_id,
            "{child} belongs to the batch's trace"
        );
    }
    let stages: Vec<String> = all
        .iter()
        .filter(|s| s.name == "ecst.stage")
        .map(|s| s.attributes["ecst.stage"].clone())
        .collect();
    for stage in ["decode", "latest", "deletes", "athlete"] {
        assert!(
            stages.contains(&stage.to_string()),
            "no span for stage {stage}: {stages:?}"
        );
    }
    assert_eq!(named("ecst.sink.apply").attributes["ecst.sink"], "cache");
    for span in &all {
        for value in span.attributes.values() {
            assert!(
                !value.contains("Secret Name"),
                "a payload value in {span:?}"
            );
        }
    }
    pg.execute(&format!(
        "DROP TABLE {table}, {table}_dead_letters; DROP FUNCTION {table}_notify()"
    ));
    cleanup(&mut conn, &stream);
}

#[test]
fn spans_export_over_http_protobuf_too() {
    let (port, store) = receiver(false);
    let mut conn = redis();
    let stream = unique("traces-http");
    let prefix = format!("{stream}:");
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg(event("h1", 1, "x").to_string())
        .arg("traceparent")
        .arg(format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"));
    let _: () = pipe.query(&mut conn).expect("XADD");
    let pipeline = pipeline_file("traces", &athletes_pipeline(&stream, &prefix, ""));
    let mut cmd = ecst();
    cmd.arg("run")
        .arg(&pipeline)
        .arg("--drain")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "replica-http");
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    wait_until(Duration::from_secs(20), "the event span", || {
        spans(&store).iter().any(|s| s.name == "ecst.event")
    });
    let event = spans(&store)
        .into_iter()
        .find(|s| s.name == "ecst.event")
        .expect("event span");
    assert_eq!(event.service, "replica-http", "OTEL_SERVICE_NAME wins");
    assert_eq!(event.trace_id, PRODUCER_TRACE);
    assert_eq!(event.parent_span_id, PRODUCER_SPAN);
    cleanup(&mut conn, &stream);
}

#[test]
fn json_logs_carry_the_batch_trace_id() {
    let (port, store) = receiver(false);
    let mut conn = redis();
    let stream = unique("traces-logs");
    let prefix = format!("{stream}:");
    // Not an envelope: its dead-letter warning is logged inside the batch span.
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg("not json")
        .arg("traceparent")
        .arg(format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"));
    let _: () = pipe.query(&mut conn).expect("XADD");
    let pipeline = pipeline_file("traces", &athletes_pipeline(&stream, &prefix, ""));
    let mut cmd = ecst();
    cmd.args(["--log-format", "json", "run"])
        .arg(&pipeline)
        .arg("--drain")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let line: serde_json::Value = stderr_of(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "Entry dead-lettered.")
        .expect("a JSON dead-letter log line");
    let trace_id = line["span"]["trace_id"]
        .as_str()
        .expect("trace_id in the log line")
        .to_string();
    wait_until(Duration::from_secs(20), "the batch span", || {
        spans(&store).iter().any(|s| s.name == "ecst.batch")
    });
    let batch = spans(&store)
        .into_iter()
        .find(|s| s.name == "ecst.batch")
        .expect("batch span");
    assert_eq!(
        trace_id, batch.trace_id,
        "the log line names the batch's trace"
    );
    cleanup(&mut conn, &stream);
}
