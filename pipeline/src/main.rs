//! The `ecst` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
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
use cli::{
    bench, bench_relay, bench_stages, dlq, docs, init, publish, schema, stages, status, tap, test,
};

// `ecst` alone is a usage error: the help on stderr, exit 2 (clap's `arg_required_else_help`
// convention), so that a script's `ecst && …` stops; `ecst --help` is the help asked for:
// stdout, exit 0.
#[derive(Parser)]
#[command(
    name = "ecst",
    version,
    about = "Event-carried state transfer: Redis Streams into replicas you can trust",
    after_help = concat!(
        "Examples:
",
        "  ecst init --from-event sample.json > pipeline.yaml
",
        "  ecst validate --connect pipeline.yaml
",
        "  ecst run pipeline.yaml
",
        "  ecst status pipeline.yaml
",
    ),
    arg_required_else_help = true
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst validate pipeline.yaml\n",
        "  ecst validate --connect pipeline.yaml   # and against its Redis, Postgres, snapshot\n",
    ))]
    Validate {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Also check the pipeline against its servers: Redis credentials and ACL for every
        /// command on the actual keys, Postgres tables, columns and privileges, the snapshot.
        #[arg(long)]
        connect: bool,
    },
    /// Print a pipeline's stage graph.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst graph pipeline.yaml\n",
        "  ecst graph --format dot pipeline.yaml | dot -Tsvg > graph.svg\n",
    ))]
    Graph {
        /// Pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
    },
    /// Run a worker until SIGINT/SIGTERM.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst run pipeline.yaml\n",
        "  ecst run --consumer \"$HOSTNAME\" --metrics-addr 0.0.0.0:9464 pipeline.yaml\n",
        "  ecst run --drain pipeline.yaml   # exit once the stream is applied\n",
    ))]
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst bootstrap examples/athletes-bootstrap.yaml\n",
    ))]
    Bootstrap {
        /// Pipeline file (with a `bootstrap:` section).
        pipeline: PathBuf,
        /// Consumer name, overriding the file's.
        #[arg(long, env = "ECST_CONSUMER")]
        consumer: Option<String>,
    },
    /// Compare every replica with the source's snapshot; exit 0 in sync, 1 drift, 2 error.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst reconcile examples/athletes-bootstrap.yaml\n",
        "  ecst reconcile --repair --json examples/athletes-bootstrap.yaml\n",
    ))]
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst status pipeline.yaml\n",
        "  ecst status --all --watch pipeline.yaml\n",
    ))]
    Status(status::StatusArgs),
    /// Publish NDJSON events to a stream in the wire format.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst publish --stream athletes.athlete-updated.v1 --file examples/athletes.ndjson\n",
        "  producer | ecst publish --stream athletes.athlete-updated.v1 --encoding msgpack\n",
    ))]
    Publish(publish::PublishArgs),
    /// Run pipelines' test cases through their real stages and sinks, each case isolated;
    /// exit 0 all passed, 1 a case failed, 2 an error.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst test examples/athletes.yaml\n",
        "  ecst test --json examples/*.yaml\n",
    ))]
    Test(test::TestArgs),
    /// A pipeline's dead letters: list them by reason, show one, replay them after a fix, purge.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst dlq pipeline.yaml list\n",
        "  ecst dlq pipeline.yaml replay --reason invalid_event --dry-run\n",
    ))]
    Dlq(dlq::DlqArgs),
    /// Show live what a pipeline's running workers decide about each event.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst tap pipeline.yaml\n",
        "  ecst tap pipeline.yaml --stage cache --key 'ath-*' --limit 100 | jq .\n",
    ))]
    Tap(tap::TapArgs),
    /// Publish outbox rows to Redis Streams until SIGINT/SIGTERM.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst relay examples/relay.yaml\n",
    ))]
    Relay {
        /// Relay file.
        relay: PathBuf,
    },
    /// The outbox table: print or install its DDL.
    #[command(subcommand, after_help = concat!(
        "Examples:\n",
        "  ecst outbox ddl --table ecst_outbox > outbox.sql\n",
        "  ecst outbox install --postgres \"$DATABASE_URL\"\n",
    ))]
    Outbox(OutboxCommand),
    /// Serve entity snapshots over HTTP for bootstrap.
    #[command(subcommand, after_help = concat!(
        "Examples:\n",
        "  ecst snapshot serve examples/snapshot.yaml\n",
    ))]
    Snapshot(SnapshotCommand),
    /// Schema directories: check a change for CI.
    #[command(subcommand, after_help = concat!(
        "Examples:\n",
        "  ecst schema check git:origin/main:schemas schemas\n",
        "  ecst schema check --json old-schemas/ schemas/\n",
    ))]
    Schema(schema::SchemaCommand),
    /// Measure throughput and latency against the ceiling measured on this machine.
    #[command(args_conflicts_with_subcommands = true, after_help = concat!(
        "Examples:\n",
        "  ecst bench --sink both --aggregates 10000\n",
        "  ecst bench --pipeline examples/bench.yaml --json\n",
        "  ecst bench relay\n",
    ))]
    Bench {
        /// `relay` measures the outbox relay instead of a pipeline.
        #[command(subcommand)]
        target: Option<BenchTarget>,
        #[command(flatten)]
        args: bench::BenchArgs,
    },
    /// List the stage types with their roles and keys, or describe one.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst stages\n",
        "  ecst stages redis_hash\n",
    ))]
    Stages {
        /// A stage type, e.g. `redis_hash`.
        name: Option<String>,
    },
    /// Print a commented starter pipeline made from a sample event.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst init --from-event sample.json > pipeline.yaml\n",
        "  ecst init --from-event - --stream athletes.athlete-updated.v1 < sample.json\n",
    ))]
    Init(init::InitArgs),
    /// Print a shell completion script.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst completions bash > ~/.local/share/bash-completion/completions/ecst\n",
        "  ecst completions zsh > \"${fpath[1]}/_ecst\"\n",
        "  ecst completions fish > ~/.config/fish/completions/ecst.fish\n",
    ))]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per subcommand.
    #[command(after_help = concat!(
        "Examples:\n",
        "  ecst man | man -l -\n",
        "  ecst man --out /usr/local/share/man/man1\n",
    ))]
    Man {
        /// Write `ecst.1`, `ecst-run.1`, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
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
        Command::Validate {
            pipeline,
            connect: true,
        } if file_kind(&pipeline) != "pipeline" => {
            eprintln!(
                "{}: --connect checks pipeline files; this is a {} file",
                pipeline.display(),
                file_kind(&pipeline)
            );
            Ok(ExitCode::from(2))
        }
        Command::Validate {
            pipeline,
            connect: true,
        } => match load(&pipeline) {
            Ok(config) => {
                println!(
                    "{}: ok ({} stages)",
                    pipeline.display(),
                    config.stages.len()
                );
                Ok(cli::connect::connect(&config).await)
            }
            Err(code) => Ok(code),
        },
        Command::Validate { pipeline, .. } if file_kind(&pipeline) == "relay" => {
            Ok(match load_relay(&pipeline) {
                Ok(_) => {
                    println!("{}: ok (relay)", pipeline.display());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            })
        }
        Command::Validate { pipeline, .. } if file_kind(&pipeline) == "snapshot" => {
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
        Command::Validate { pipeline, .. } => match load(&pipeline) {
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
                    .context("cannot serve /metrics")?;
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
        Command::Test(args) => test::test(args).await,
        Command::Schema(command) => schema::schema(command).await,
        Command::Dlq(args) => dlq::dlq(args).await,
        Command::Tap(args) => tap::tap(args).await,
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
        Command::Stages { name } => Ok(stages::stages(name.as_deref())),
        Command::Init(args) => init::init(args),
        Command::Completions { shell } => Ok(docs::completions(shell, Cli::command())),
        Command::Man { out } => docs::man(Cli::command(), out.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `ecst ...` part of each example line of `command`'s help and its subcommands'.
    fn examples(command: &clap::Command, found: &mut Vec<String>) {
        if let Some(help) = command.get_after_help() {
            for line in help.to_string().lines() {
                let Some(start) = line.find("ecst ") else {
                    continue;
                };
                // Up to a comment, pipe or redirection: those belong to the shell.
                let example = line[start..]
                    .split(['#', '|', '>', '<'])
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                found.push(example);
            }
        }
        for sub in command.get_subcommands() {
            examples(sub, found);
        }
    }

    #[test]
    fn every_example_in_the_help_parses() {
        let mut found = Vec::new();
        examples(&Cli::command(), &mut found);
        assert!(found.len() >= 20, "{found:?}");
        for example in found {
            let words = example.split_whitespace().map(|w| w.trim_matches('"'));
            if let Err(e) = Cli::try_parse_from(words) {
                panic!("`{example}` does not parse: {e}");
            }
        }
    }
}
