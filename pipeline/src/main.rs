//! The `ecst` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ecst_pipeline::config::{self, ConfigErrors};
use ecst_pipeline::graph;
use ecst_pipeline::runner::{self, RunOptions, Shutdown, Stats};

mod cli;

// glibc malloc was a quarter of the worker's CPU under load (perf); every event allocates.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cli::{bench, publish};

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
    },
    /// Publish NDJSON events to a stream in the wire format.
    Publish(publish::PublishArgs),
    /// Measure throughput and latency against the Redis ceiling on this machine.
    Bench(bench::BenchArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ECST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only when a person is reading.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
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
            runner::run(
                &config,
                RunOptions { drain },
                shutdown,
                Arc::new(Stats::default()),
            )
            .await
            .with_context(|| format!("pipeline {}", config.name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => publish::publish(args).await,
        Command::Bench(args) => bench::bench(args).await,
    }
}
