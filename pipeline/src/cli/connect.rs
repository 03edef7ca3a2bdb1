//! `ecst validate --connect`: the pipeline against its real servers. Every Redis is asked,
//! as the configured user, for each command ecst will send on the keys it will touch; every
//! Postgres table is checked for the columns, unique key and privileges the sink needs; the
//! snapshot source is asked for a page. One line per check; exit 1 when any failed.

use std::process::ExitCode;

use ecst_operators::StageConfig;
use ecst_operators::redis_pool::FailureKind;
use ecst_pipeline::config::PipelineConfig;

/// What one check found.
struct Outcome {
    /// `source`, `stage <name>` or `bootstrap`.
    stage: String,
    /// The server, password masked.
    server: String,
    /// What passed, or what is missing.
    result: Result<String, String>,
}

/// Runs every check and prints a line for each; exit 1 when any failed.
pub(crate) async fn connect(config: &PipelineConfig) -> ExitCode {
    let mut outcomes = Vec::new();
    for check in ecst_pipeline::preflight::check_redis_access_all(config).await {
        let result = match check.outcome {
            Ok(()) => Ok(format!("may run {}", check.probe)),
            Err(failure) => Err(match failure.kind {
                FailureKind::NoPerm => format!(
                    "user {} may not run {}: {}",
                    failure.user, check.probe, failure.detail
                ),
                _ => format!("{}: {failure}", check.probe),
            }),
        };
        outcomes.push(Outcome {
            stage: check.stage,
            server: check.server,
            result,
        });
    }
    for stage in &config.stages {
        if let StageConfig::Postgres(sink) = &stage.config {
            let table = format!("table {}.{}", sink.schema, sink.table);
            let result = match sink.inspect().await {
                Ok(problems) if problems.is_empty() => Ok(if sink.create {
                    format!("{table} is ready or can be created")
                } else {
                    format!("{table} has the columns, unique key and privileges the sink needs")
                }),
                Ok(problems) => Err(problems.join("; ")),
                Err(e) => Err(format!("cannot check {table}: {e}")),
            };
            outcomes.push(Outcome {
                stage: format!("stage {}", stage.name),
                server: sink.url.redacted(),
                result,
            });
        }
    }
    if let Some(bootstrap) = &config.bootstrap {
        let server = bootstrap
            .url
            .as_ref()
            .or(bootstrap.postgres.as_ref())
            .map(|url| url.redacted())
            .unwrap_or_default();
        outcomes.push(Outcome {
            stage: "bootstrap".into(),
            server,
            result: ecst_pipeline::bootstrap::probe_snapshot(bootstrap).await,
        });
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    for outcome in &outcomes {
        match &outcome.result {
            Ok(what) => println!("ok: {}: {}: {what}", outcome.stage, outcome.server),
            Err(what) => eprintln!("error: {}: {}: {what}", outcome.stage, outcome.server),
        }
    }
    let passed = outcomes.len() - failed;
    if failed == 0 {
        println!(
            "{}: ok against its servers ({passed} checks)",
            config.file.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{}: {failed} of {} checks failed against its servers",
            config.file.display(),
            outcomes.len()
        );
        ExitCode::from(1)
    }
}
