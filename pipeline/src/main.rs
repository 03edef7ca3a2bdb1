//! The `ecst` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ecst_pipeline::config::{self, ConfigErrors};
use ecst_pipeline::error::RunError;
use ecst_pipeline::graph;
use ecst_pipeline::relay::{RelayConfig, RelayStats};
use ecst_pipeline::runner::{self, RunOptions};
use ecst_pipeline::shutdown::Shutdown;
use ecst_pipeline::snapshot::SnapshotConfig;
use ecst_pipeline::stats::Stats;

mod cli;

// glibc malloc was a quarter of the worker's CPU under load (perf); every event allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cli::{bench, bench_relay, bench_stages, publish, status};

#[derive(Parser)]
#[command(
    name = "ecst",
    version,
    about = "Event-carried state transfer: Redis Streams into replicas you can trust"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file and report every problem with file, line, column and key.
    Validate {
        /// Pipeline file.
        pipeline: PathBuf,
    },
    /// Print a pipeline's stage graph.
    Graph {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
    },
    /// Run a worker until SIGINT/SIGTERM.
    Run {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Exit once nothing is left to read and nothing is pending.
        #[arg(long)]
        drain: bool,
        /// Consumer name, overriding the file's (e.g. the pod name).
        #[arg(long, env = "ECST_CONSUMER")]
        consumer: Option<String>,
        /// Serve /metrics, /healthz and /readyz here; `off` to not serve them.
        #[arg(long, env = "ECST_METRICS_ADDR", default_value = "127.0.0.1:9464")]
        metrics_addr: String,
    },
    /// Bootstrap the group from the pipeline's snapshot now, then exit.
    Bootstrap {
        /// Pipeline file (with a `bootstrap:` section).
        pipeline: PathBuf,
        /// Consumer name, overriding the file's.
        #[arg(long, env = "ECST_CONSUMER")]
        consumer: Option<String>,
    },
    /// Compare every replica with the source's snapshot; exit 0 in sync, 1 drift, 2 error.
    Reconcile {
        /// Pipeline file (with a `bootstrap:` section: the source to compare with).
        pipeline: PathBuf,
        /// Correct what differs through the sinks (orphans get a tombstone at their version).
        #[arg(long)]
        repair: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show a pipeline's group, consumers, dead letters and replica freshness at a glance.
    Status(status::StatusArgs),
    /// Publish NDJSON events to a stream in the wire format.
    Publish(publish::PublishArgs),
    /// Publish outbox rows to Redis Streams until SIGINT/SIGTERM.
    Relay {
        /// Relay file.
        relay: PathBuf,
    },
    /// The outbox table: print or install its DDL.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Serve entity snapshots over HTTP for bootstrap.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Measure throughput and latency against the ceiling measured on this machine.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        /// `relay` measures the outbox relay instead of a pipeline.
        #[command(subcommand)]
        target: Option<BenchTarget>,
        #[command(flatten)]
        args: bench::BenchArgs,
    },
}

#[derive(Subcommand)]
enum BenchTarget {
    /// Outbox rows to stream entries per second, and the idle wake-up latency.
    Relay(bench_relay::RelayBenchArgs),
    /// CPU per event of a pipeline's stages (not its sinks), in process, over generated
    /// athlete events of schema versions 1, 2 and 3.
    Stages(bench_stages::StagesBenchArgs),
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Print the outbox DDL (versioned; safe to run twice).
    Ddl {
        #[command(flatten)]
        table: OutboxTableArgs,
    },
    /// Run the outbox DDL against a database.
    Install {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        postgres: String,
        #[command(flatten)]
        table: OutboxTableArgs,
    },
}

#[derive(clap::Args)]
struct OutboxTableArgs {
    /// Schema of the outbox table.
    #[arg(long, default_value = "public")]
    schema: String,
    /// Outbox table.
    #[arg(long, default_value = "ecst_outbox")]
    table: String,
}

impl OutboxTableArgs {
    fn table(&self) -> anyhow::Result<ecst_pipeline::outbox::OutboxTable> {
        Ok(ecst_pipeline::outbox::OutboxTable::new(
            &self.schema,
            &self.table,
        )?)
    }
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Serve `GET /snapshot/{entity}?after=&limit=` until SIGINT/SIGTERM.
    Serve {
        /// Snapshot server file.
        config: PathBuf,
    },
}

/// The service name spans carry: the pipeline's or the relay's name, else `ecst`.
fn service_name(command: &Command) -> String {
    let named = |path: &std::path::Path| {
        std::fs::read_to_string(path).ok().and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("name:")
                    .map(|n| n.trim().trim_matches('"').to_string())
            })
        })
    };
    let name = match command {
        Command::Run { pipeline, .. } | Command::Bootstrap { pipeline, .. } => named(pipeline),
        Command::Relay { relay } => named(relay),
        Command::Snapshot(_) => Some("ecst-snapshot".into()),
        _ => None,
    };
    name.filter(|n| !n.is_empty())
        .unwrap_or_else(|| "ecst".into())
}

fn load_relay(path: &std::path::Path) -> Result<RelayConfig, ExitCode> {
    let mut relay = config::load_document(path, RelayConfig::check).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(1)
    })?;
    // `schemas:` is relative to the relay file; under `validate: true` it must read cleanly.
    if let Some(dir) = relay.schemas.take() {
        let dir: PathBuf = path
            .parent()
            .unwrap_or_else(|| std::path::Path::new(""))
            .join(dir)
            .components()
            .collect();
        if relay.validate
            && let Err(errors) = ecst_pipeline::schema_dir::load(&dir)
        {
            eprintln!("{errors}");
            return Err(ExitCode::from(1));
        }
        relay.schemas = Some(dir);
    }
    Ok(relay)
}

fn load_snapshot(path: &std::path::Path) -> Result<SnapshotConfig, ExitCode> {
    config::load_document(path, SnapshotConfig::check).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(1)
    })
}

/// What a file is, by its top-level keys: `validate` takes any of the three.
fn file_kind(path: &std::path::Path) -> &'static str {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let top_level = |key: &str| {
        text.lines().any(|line| {
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
    };
    if top_level("entities") {
        "snapshot"
    } else if !top_level("stages") && !top_level("source") && top_level("postgres") {
        "relay"
    } else {
        "pipeline"
    }
}

fn load(path: &std::path::Path) -> Result<config::PipelineConfig, ExitCode> {
    config::load(path).map_err(|errors: ConfigErrors| {
        eprintln!("{errors}");
        ExitCode::from(1)
    })
}

async fn shutdown_on_signals(tx: tokio::sync::watch::Sender<bool>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM.");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
        _ = term.recv() => tracing::info!("SIGTERM received."),
    }
    let _ = tx.send(true);
}

fn print_reconcile(report: &ecst_pipeline::reconcile::ReconcileReport, repair: bool) {
    println!("source rows: {}", report.source_rows);
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "sink", "checked", "missing", "stale", "mismatched", "orphans", "repaired"
    );
    for (name, s) in &report.sinks {
        println!(
            "{:<20} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
            name, s.checked, s.missing, s.stale, s.mismatched, s.orphans, s.repaired
        );
        if let Some(error) = &s.error {
            println!("  error: {error}");
        }
        for (kind, keys) in &s.examples {
            println!("  {kind}: {}", keys.join(", "));
        }
    }
    println!(
        "{}",
        match (report.drifted(), repair) {
            (false, _) => "in sync",
            (true, false) => "DRIFT found (run with --repair to correct it)",
            (true, true) => "DRIFT found and repaired",
        }
    );
}

/// Exit status 2 (a configuration the servers refuse: credentials, certificates, ACL), with
/// the reason, for a run that Redis refused at start.
fn configuration_refused(pipeline: &str, result: &Result<(), RunError>) -> Option<ExitCode> {
    match result {
        Err(RunError::Access(e)) => {
            eprintln!("error: pipeline {pipeline}: {e}");
            Some(ExitCode::from(2))
        }
        _ => None,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormat::Text => ecst_pipeline::telemetry::LogFormat::Text,
        LogFormat::Json => ecst_pipeline::telemetry::LogFormat::Json,
    };
    let telemetry = ecst_pipeline::telemetry::Telemetry::init(format, &service_name(&cli.command));
    let code = match execute(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    // The span exporter flushes on the runtime it runs on.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Validate { pipeline } if file_kind(&pipeline) == "relay" => {
            Ok(match load_relay(&pipeline) {
                Ok(_) => {
                    println!("{}: ok (relay)", pipeline.display());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            })
        }
        Command::Validate { pipeline } if file_kind(&pipeline) == "snapshot" => {
            Ok(match load_snapshot(&pipeline) {
                Ok(c) => {
                    println!(
                        "{}: ok (snapshot server, {} entities)",
                        pipeline.display(),
                        c.entities.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            })
        }
        Command::Validate { pipeline } => match load(&pipeline) {
            Ok(config) => {
                println!(
                    "{}: ok ({} stages)",
                    pipeline.display(),
                    config.stages.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Graph { pipeline, format } => match load(&pipeline) {
            Ok(config) => {
                let nodes = config.graph_nodes();
                let text = match format {
                    GraphFormat::Mermaid => graph::mermaid(&config.source.stream, &nodes),
                    GraphFormat::Dot => graph::dot(&config.source.stream, &nodes),
                };
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Run {
            pipeline,
            drain,
            consumer,
            metrics_addr,
        } => {
            let mut config = match load(&pipeline) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if let Some(consumer) = consumer.filter(|c| !c.is_empty()) {
                config.source.consumer = Some(consumer);
            }
            let (tx, shutdown) = Shutdown::new();
            tokio::spawn(shutdown_on_signals(tx));
            let stats = Arc::new(Stats::default());
            if metrics_addr != "off" {
                let addr: std::net::SocketAddr = metrics_addr.parse().with_context(|| {
                    format!("--metrics-addr {metrics_addr:?} is not host:port (or `off`)")
                })?;
                let listener = ecst_pipeline::metrics::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                let served = ecst_pipeline::metrics::serve(
                    listener,
                    config.name.clone(),
                    stats.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = served.await {
                        tracing::error!(error = %e, "The metrics endpoint stopped.");
                    }
                });
            }
            let result = runner::run(
                &config,
                RunOptions {
                    drain,
                    bootstrap_only: false,
                },
                shutdown,
                stats,
            )
            .await;
            if let Some(code) = configuration_refused(&config.name, &result) {
                return Ok(code);
            }
            result.with_context(|| format!("pipeline {}", config.name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bootstrap { pipeline, consumer } => {
            let mut config = match load(&pipeline) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if config.bootstrap.is_none() {
                eprintln!(
                    "{}: no `bootstrap:` section: nothing to bootstrap from",
                    pipeline.display()
                );
                return Ok(ExitCode::from(1));
            }
            if let Some(consumer) = consumer.filter(|c| !c.is_empty()) {
                config.source.consumer = Some(consumer);
            }
            let (tx, shutdown) = Shutdown::new();
            tokio::spawn(shutdown_on_signals(tx));
            let result = runner::run(
                &config,
                RunOptions {
                    drain: false,
                    bootstrap_only: true,
                },
                shutdown,
                Arc::new(Stats::default()),
            )
            .await;
            if let Some(code) = configuration_refused(&config.name, &result) {
                return Ok(code);
            }
            result.with_context(|| format!("bootstrapping pipeline {}", config.name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile {
            pipeline,
            repair,
            json,
        } => {
            let config = match load(&pipeline) {
                Ok(c) => c,
                Err(_) => return Ok(ExitCode::from(2)),
            };
            let report = match ecst_pipeline::reconcile::reconcile(&config, repair).await {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("error: reconciling pipeline {}: {e}", config.name);
                    return Ok(ExitCode::from(2));
                }
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_reconcile(&report, repair);
            }
            Ok(ExitCode::from(u8::from(report.drifted())))
        }
        Command::Status(args) => status::status(args).await,
        Command::Publish(args) => publish::publish(args).await,
        Command::Relay { relay } => {
            let config = match load_relay(&relay) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (tx, shutdown) = Shutdown::new();
            tokio::spawn(shutdown_on_signals(tx));
            ecst_pipeline::relay::run(&config, shutdown, Arc::new(RelayStats::default()))
                .await
                .with_context(|| format!("relay {}", config.name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox(OutboxCommand::Ddl { table }) => {
            print!("{}", table.table()?.ddl());
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox(OutboxCommand::Install { postgres, table }) => {
            let outbox = table.table()?;
            let target = ecst_operators::postgres_tls::parse_postgres_url(&postgres)?;
            let (client, connection) = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                target.config.connect(target.tls),
            )
            .await
            .context("Postgres did not answer within 10s")?
            .context("cannot connect to Postgres")?;
            tokio::spawn(connection);
            // The DDL's "does not exist, skipping" notices are not news.
            client
                .batch_execute(&format!(
                    "SET client_min_messages = warning;\n{}",
                    outbox.ddl()
                ))
                .await
                .context("installing the outbox")?;
            eprintln!("outbox {} installed", outbox.sql_name());
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot(SnapshotCommand::Serve { config }) => {
            let config = match load_snapshot(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (tx, shutdown) = Shutdown::new();
            tokio::spawn(shutdown_on_signals(tx));
            ecst_pipeline::snapshot::serve(&config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            target: Some(BenchTarget::Relay(args)),
            ..
        } => bench_relay::bench_relay(args).await,
        Command::Bench {
            target: Some(BenchTarget::Stages(args)),
            ..
        } => bench_stages::bench_stages(args).await,
        Command::Bench { args, .. } => bench::bench(args).await,
    }
}
