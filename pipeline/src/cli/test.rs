//! `ecst test FILE...`: runs the test cases of pipelines through their real stages and sinks
//! and reports like a test runner: each case `ok` or `FAILED`, a diff of what each failed case
//! expected against what happened, then `test result: ok. N passed; M failed`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ecst_pipeline::test_case::expect::{self, Mismatch};
use ecst_pipeline::test_case::run::{Isolation, run_case};
use ecst_pipeline::test_case::{self, TestSuite};

#[derive(Args)]
pub(crate) struct TestArgs {
    /// Test files (`*.test.yaml`), or pipelines with `tests:` or a `<name>.test.yaml` beside
    /// them; files with no tests (a relay file) are skipped.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print one JSON object with every case instead of the text report.
    #[arg(long)]
    json: bool,
}

/// One case's result.
#[derive(serde::Serialize)]
struct CaseResult {
    file: String,
    pipeline: String,
    name: String,
    ok: bool,
    mismatches: Vec<Mismatch>,
    #[serde(flatten)]
    isolation: Isolation,
}

/// Exit 0 when every case passed, 1 when one failed, 2 when a file or a store is wrong.
pub(crate) async fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let env = |name: &str| std::env::var(name).ok();
    let mut suites: Vec<TestSuite> = Vec::new();
    let mut seen = HashSet::new();
    for file in &args.files {
        match test_case::load(file, &env) {
            Ok(Some(suite)) => {
                let canonical = suite.file.canonicalize().unwrap_or(suite.file.clone());
                if seen.insert(canonical) {
                    suites.push(suite);
                }
            }
            Ok(None) => {}
            Err(errors) => {
                eprintln!("{errors}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let mut results = Vec::new();
    for suite in &suites {
        if !args.json {
            let n = suite.cases.len();
            println!(
                "\nrunning {n} test{} from {} (pipeline {})",
                if n == 1 { "" } else { "s" },
                suite.file.display(),
                suite.pipeline.name
            );
        }
        for case in &suite.cases {
            let isolation = Isolation::new();
            let run = match run_case(&suite.pipeline, case, &isolation).await {
                Ok(run) => run,
                Err(e) => {
                    let file = suite.file.display();
                    if args.json {
                        let error = format!("{file}: {}: {e}", case.name);
                        println!("{}", serde_json::json!({ "error": error }));
                    } else {
                        println!("test {} ... error", case.name);
                    }
                    eprintln!("error: {file}: {}: {e}", case.name);
                    return Ok(ExitCode::from(2));
                }
            };
            let mismatches = expect::compare(&suite.pipeline, case, &run);
            let ok = mismatches.is_empty();
            if !args.json {
                println!(
                    "test {} ... {}",
                    case.name,
                    if ok { "ok" } else { "FAILED" }
                );
            }
            results.push(CaseResult {
                file: suite.file.display().to_string(),
                pipeline: suite.pipeline.name.clone(),
                name: case.name.clone(),
                ok,
                mismatches,
                isolation,
            });
        }
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    let passed = results.len() - failed;
    if args.json {
        let report = serde_json::json!({ "cases": results, "passed": passed, "failed": failed });
        println!("{report}");
    } else {
        print_failures(&results);
        println!(
            "\ntest result: {}. {passed} passed; {failed} failed",
            if failed == 0 { "ok" } else { "FAILED" }
        );
    }
    Ok(ExitCode::from(u8::from(failed > 0)))
}

/// Each failed case with what it expected (`-`) against what happened (`+`).
fn print_failures(results: &[CaseResult]) {
    let failures: Vec<&CaseResult> = results.iter().filter(|r| !r.ok).collect();
    if failures.is_empty() {
        return;
    }
    println!("\nfailures:");
    for result in failures {
        println!("\n---- {}: {} ----", result.file, result.name);
        for m in &result.mismatches {
            println!(
                "{}\n  - expected: {}\n  + actual:   {}",
                m.at, m.expected, m.actual
            );
        }
    }
}
