//! `ecst schema check OLD NEW`: refuse schema directory changes that would break consumers.
//!
//! OLD and NEW are schema directories, or `git:REF:path` to read one from a commit (CI compares
//! the pull request's tree with `git:origin/<base branch>:schemas`). The rules live in
//! `ecst_schemas::evolution` (what is refused) and `ecst_schemas::compat` (Confluent's JSON
//! Schema compatibility); this module reads both sides and prints the verdict.

use std::path::{Component, Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use ecst_pipeline::config::ConfigError;
use ecst_pipeline::schema_dir;
use ecst_schemas::SchemaRegistry;
use ecst_schemas::evolution::{self, EvolutionReport, Finding};
use serde::Serialize;

/// How long one git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The rule of a proposed file that does not load (bad JSON or YAML, not a valid schema, a
/// stream naming a missing property...).
const INVALID_FILE: &str = "INVALID_FILE";

/// `ecst schema ...`.
#[derive(clap::Subcommand)]
pub(crate) enum SchemaCommand {
    /// Check that NEW only makes allowed changes to OLD: exit 0 compatible, 1 incompatible, 2 error.
    ///
    /// Refused: a new version that breaks its subject's compatibility mode (declared by the
    /// stream files naming it; the strictest when they disagree), a stream file that keeps its
    /// name but changes partition_key, aggregate_type or partitions, a version file edited in
    /// place or removed, a version number that skips, a file that does not load.
    Check(CheckArgs),
}

/// Arguments of `ecst schema check`.
#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// The base: a schema directory, or git:REF:path (e.g. git:origin/main:schemas).
    old: String,
    /// The proposed schema directory, or git:REF:path.
    new: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `ecst schema ...`.
pub(crate) async fn schema(command: SchemaCommand) -> anyhow::Result<ExitCode> {
    match command {
        SchemaCommand::Check(args) => Ok(check(args).await),
    }
}

/// Where a schema directory is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Dir(PathBuf),
    Git { reference: String, path: String },
}

impl Source {
    fn parse(text: &str) -> Result<Source, String> {
        let Some(rest) = text.strip_prefix("git:") else {
            return Ok(Source::Dir(PathBuf::from(text)));
        };
        // A ref cannot hold ':' (git check-ref-format), so the first one ends it.
        match rest.split_once(':') {
            Some((reference, path)) if !reference.is_empty() => Ok(Source::Git {
                reference: reference.to_string(),
                path: if path.is_empty() {
                    ".".into()
                } else {
                    path.to_string()
                },
            }),
            _ => Err(format!(
                "{text}: expected git:REF:path (e.g. git:origin/main:schemas)"
            )),
        }
    }

    /// How files of this source are named in the output.
    fn label(&self) -> String {
        match self {
            Source::Dir(path) => path.display().to_string(),
            Source::Git { reference, path } => format!("git:{reference}:{path}"),
        }
    }
}

/// A schema directory read from a source: the registry and the problems of its files.
struct Loaded {
    label: String,
    registry: SchemaRegistry,
    problems: Vec<ConfigError>,
}

async fn load(source: &Source) -> Result<Loaded, String> {
    let label = source.label();
    let (registry, problems) = match source {
        Source::Dir(path) => {
            if !path.is_dir() {
                return Err(format!("{label}: not a directory"));
            }
            schema_dir::read(path)
        }
        Source::Git { reference, path } => {
            let files = git_files(reference, path).await?;
            schema_dir::parse_files(Path::new(&label), files)
        }
    };
    Ok(Loaded {
        label,
        registry,
        problems,
    })
}

/// Runs git in the current directory's repository; its stdout, or why it failed.
async fn git(args: &[&str]) -> Result<Vec<u8>, String> {
    let command = format!("git {}", args.join(" "));
    let output = tokio::process::Command::new("git")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(GIT_TIMEOUT, output).await {
        Err(_) => Err(format!(
            "{command}: no answer within {}s",
            GIT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{command}: cannot run git: {e}")),
        Ok(Ok(output)) if !output.status.success() => Err(format!(
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Ok(Ok(output)) => Ok(output.stdout),
    }
}

/// The `(path relative to the schema directory, text)` of every file under `path` at
/// `reference`, read with `git ls-tree` and `git show`.
async fn git_files(reference: &str, path: &str) -> Result<Vec<(String, String)>, String> {
    // A tree will do too: a pre-commit hook checks the index as `git write-tree` gives it.
    let tree = format!("{reference}^{{tree}}");
    git(&["rev-parse", "--verify", "--quiet", &tree])
        .await
        .map_err(|_| {
            format!(
                "git:{reference}:{path}: {reference} is not a commit or tree in this repository"
            )
        })?;
    // Paths in `REF:file` are from the top of the repository; `path` is from here.
    let prefix = String::from_utf8_lossy(&git(&["rev-parse", "--show-prefix"]).await?)
        .trim()
        .to_string();
    let dir = normalise(&format!("{prefix}{path}"))
        .ok_or_else(|| format!("git:{reference}:{path}: the path leaves the repository"))?;
    let listing = git(&[
        "ls-tree",
        "-r",
        "-z",
        "--name-only",
        "--full-name",
        reference,
        "--",
        path,
    ])
    .await?;
    let mut files = Vec::new();
    for name in listing.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let relative = if dir.is_empty() {
            name.clone()
        } else {
            match name.strip_prefix(&format!("{dir}/")) {
                Some(relative) => relative.to_string(),
                None => continue,
            }
        };
        let content = git(&["show", &format!("{reference}:{name}")]).await?;
        let text = String::from_utf8(content)
            .map_err(|_| format!("git:{reference}:{name}: not UTF-8 text"))?;
        files.push((relative, text));
    }
    Ok(files)
}

/// `a/./b/../c/` as `a/c`; `None` when it climbs above the start.
fn normalise(path: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// One refused change as printed: the file named from where it was read.
#[derive(Debug, Serialize)]
struct Printed {
    file: String,
    subject: String,
    pointer: String,
    rule: String,
    message: String,
}

/// The `--json` report.
#[derive(Debug, Serialize)]
struct Report {
    compatible: bool,
    old: String,
    new: String,
    findings: Vec<Printed>,
    notes: Vec<String>,
    versions_checked: usize,
    streams_checked: usize,
}

fn printed(finding: Finding, old: &str, new: &str) -> Printed {
    let side = if finding.in_base { old } else { new };
    Printed {
        file: format!("{side}/{}", finding.file),
        subject: finding.subject,
        pointer: finding.pointer,
        rule: finding.rule,
        message: finding.message,
    }
}

/// A proposed file that does not load, as a finding.
fn invalid(problem: &ConfigError) -> Printed {
    let file = problem.file.display().to_string();
    let subject = problem
        .file
        .parent()
        .and_then(Path::file_name)
        .map(|dir| dir.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subject = if subject == ecst_schemas::registry::STREAMS_DIR {
        problem
            .file
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        subject
    };
    Printed {
        file,
        subject,
        pointer: problem.key.clone(),
        rule: INVALID_FILE.into(),
        message: format!(
            "line {}, column {}: {}",
            problem.pos.line, problem.pos.col, problem.message
        ),
    }
}

async fn check(args: CheckArgs) -> ExitCode {
    let sources = Source::parse(&args.old).and_then(|old| Ok((old, Source::parse(&args.new)?)));
    let loaded = match sources {
        Ok((old, new)) => match (load(&old).await, load(&new).await) {
            (Ok(old), Ok(new)) => Ok((old, new)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (old, new) = match loaded {
        Ok(both) => both,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let EvolutionReport {
        findings,
        mut notes,
        versions_checked,
        streams_checked,
    } = evolution::compare(&old.registry, &new.registry);
    for problem in &old.problems {
        notes.push(format!(
            "the base has a problem, left out of the comparison: {problem}"
        ));
    }
    if old.registry.subjects().next().is_none() && old.registry.streams().next().is_none() {
        notes.push(format!("{} holds no schema: everything is new", old.label));
    }
    let mut printed_findings: Vec<Printed> = new
        .problems
        .iter()
        .filter(|problem| !is_version_gap(problem, &new))
        .map(invalid)
        .collect();
    printed_findings.extend(
        findings
            .into_iter()
            .map(|finding| printed(finding, &old.label, &new.label)),
    );
    let report = Report {
        compatible: printed_findings.is_empty(),
        old: old.label,
        new: new.label,
        findings: printed_findings,
        notes,
        versions_checked,
        streams_checked,
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot encode the report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print_human(&report);
    }
    ExitCode::from(u8::from(!report.compatible))
}

/// Whether a load problem is the loader's "versions must be consecutive", which the check
/// reports itself as VERSION_SKIPPED: the only problem that names a schema file the registry
/// still holds.
fn is_version_gap(problem: &ConfigError, loaded: &Loaded) -> bool {
    problem.key.is_empty()
        && loaded.registry.subjects().any(|subject| {
            subject
                .versions()
                .any(|v| Path::new(&loaded.label).join(&v.path) == problem.file)
        })
}

fn print_human(report: &Report) {
    for finding in &report.findings {
        let pointer = if finding.pointer.is_empty() {
            "(whole file)"
        } else {
            &finding.pointer
        };
        println!(
            "{}: {}: {}: {}: {}",
            finding.file, finding.subject, pointer, finding.rule, finding.message
        );
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    let checked = format!(
        "{} new version{} and {} stream{} checked",
        report.versions_checked,
        if report.versions_checked == 1 {
            ""
        } else {
            "s"
        },
        report.streams_checked,
        if report.streams_checked == 1 { "" } else { "s" },
    );
    if report.compatible {
        println!("compatible: {checked}");
    } else {
        let n = report.findings.len();
        println!(
            "INCOMPATIBLE: {n} refused change{} ({checked})",
            if n == 1 { "" } else { "s" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_directories_or_git_refs() {
        assert_eq!(Source::parse("schemas"), Ok(Source::Dir("schemas".into())));
        assert_eq!(
            Source::parse("git:origin/main:deploy/schemas"),
            Ok(Source::Git {
                reference: "origin/main".into(),
                path: "deploy/schemas".into()
            })
        );
        assert_eq!(
            Source::parse("git:HEAD~1:"),
            Ok(Source::Git {
                reference: "HEAD~1".into(),
                path: ".".into()
            })
        );
        assert!(Source::parse("git:schemas").is_err());
        assert!(Source::parse("git::schemas").is_err());
    }

    #[test]
    fn paths_are_normalised_from_the_top_of_the_repository() {
        assert_eq!(normalise("sub/./schemas/").as_deref(), Some("sub/schemas"));
        assert_eq!(normalise("sub/../schemas").as_deref(), Some("schemas"));
        assert_eq!(normalise(".").as_deref(), Some(""));
        assert_eq!(normalise("../x"), None);
    }
}
