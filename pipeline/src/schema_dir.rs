//! Reading a schema directory into a [`SchemaRegistry`], every problem with its file, line and
//! column: JSON syntax errors where serde_json stops, YAML errors where the parser stops, and
//! the registry's problems at the node their JSON pointer names.

use std::path::{Path, PathBuf};

use ecst_schemas::SchemaRegistry;
use ecst_schemas::registry::SchemaFile;
use serde_json::Value;

use crate::config::yaml::{self, Pos};
use crate::config::{ConfigError, ConfigErrors};

/// Reads the schema directory `dir`; `Err` holds every problem found.
pub fn load(dir: &Path) -> Result<SchemaRegistry, ConfigErrors> {
    let (registry, errors) = read(dir);
    if errors.is_empty() {
        Ok(registry)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads the schema directory `dir`: what is valid, and every problem found.
pub fn read(dir: &Path) -> (SchemaRegistry, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    match list(dir, &mut errors) {
        Ok(paths) => {
            for relative in paths {
                let file = dir.join(&relative);
                match std::fs::read_to_string(&file) {
                    Ok(text) => files.push((relative, text)),
                    Err(e) => {
                        errors.push(error_at(file, Pos::default(), format!("cannot read: {e}")))
                    }
                }
            }
        }
        Err(e) => {
            errors.push(error_at(
                dir.to_path_buf(),
                Pos::default(),
                format!("cannot read the schema directory: {e}"),
            ));
            return (SchemaRegistry::default(), errors);
        }
    }
    let (registry, mut found) = parse_files(dir, files);
    errors.append(&mut found);
    sort(&mut errors);
    (registry, errors)
}

/// Builds a registry from `(relative path, text)` pairs of a schema directory (read from disk
/// or from git); errors name `dir.join(relative path)`.
pub fn parse_files(dir: &Path, files: Vec<(String, String)>) -> (SchemaRegistry, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    let mut texts = Vec::new();
    for (relative, text) in files {
        let file = dir.join(&relative);
        let value = match SchemaFile::classify(&relative) {
            Ok(SchemaFile::Other) => continue,
            Ok(SchemaFile::Schema { .. }) => serde_json::from_str::<Value>(&text).map_err(|e| {
                error_at(
                    file,
                    Pos {
                        line: e.line(),
                        col: e.column(),
                    },
                    format!("invalid JSON: {e}"),
                )
            }),
            Ok(SchemaFile::Stream { .. }) => yaml::parse(&text)
                .map(|node| node.to_json())
                .map_err(|e| error_at(file, e.pos, e.message)),
            Err(message) => Err(error_at(file, Pos { line: 1, col: 1 }, message)),
        };
        match value {
            Ok(value) => {
                parsed.push((relative.clone(), value));
                texts.push((relative, text));
            }
            Err(error) => errors.push(error),
        }
    }
    let (registry, problems) = SchemaRegistry::from_files(parsed);
    for problem in problems {
        let pos = texts
            .iter()
            .find(|(relative, _)| *relative == problem.path)
            .map_or(Pos { line: 1, col: 1 }, |(_, text)| {
                locate(text, &problem.pointer)
            });
        let mut error = error_at(dir.join(&problem.path), pos, problem.message);
        if !problem.pointer.is_empty() {
            error.key = format!("/{}", problem.pointer.join("/"));
        }
        errors.push(error);
    }
    sort(&mut errors);
    (registry, errors)
}

/// Orders errors by file, line and column.
fn sort(errors: &mut [ConfigError]) {
    errors.sort_by(|a, b| (&a.file, a.pos.line, a.pos.col).cmp(&(&b.file, b.pos.line, b.pos.col)));
}

/// The relative paths of the files of a schema directory: top-level files, and the files of
/// its subdirectories (anything deeper is reported). Dot files are skipped.
fn list(dir: &Path, errors: &mut Vec<ConfigError>) -> std::io::Result<Vec<String>> {
    let mut paths = Vec::new();
    for top in sorted_entries(dir)? {
        let (name, is_dir) = top;
        if !is_dir {
            paths.push(name);
            continue;
        }
        let sub = dir.join(&name);
        let entries = match sorted_entries(&sub) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(error_at(sub, Pos::default(), format!("cannot read: {e}")));
                continue;
            }
        };
        for (file, is_dir) in entries {
            let relative = format!("{name}/{file}");
            if is_dir {
                errors.push(error_at(
                    dir.join(&relative),
                    Pos::default(),
                    "the schema directory holds <aggregateType>/v<N>.json and streams/<stream>.yaml, nothing deeper",
                ));
            } else {
                paths.push(relative);
            }
        }
    }
    Ok(paths)
}

/// A directory's entries other than dot files, by name, with whether each is a directory.
fn sorted_entries(dir: &Path) -> std::io::Result<Vec<(String, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        entries.push((name, entry.file_type()?.is_dir()));
    }
    entries.sort();
    Ok(entries)
}

/// The position of the node at `pointer` in a JSON or YAML text (JSON is YAML's flow syntax),
/// or the start of the file.
fn locate(text: &str, pointer: &[String]) -> Pos {
    match yaml::parse(text) {
        Ok(root) => root.locate(pointer),
        Err(_) => Pos { line: 1, col: 1 },
    }
}

fn error_at(file: PathBuf, pos: Pos, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file,
        pos,
        key: String::new(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(files: &[(&str, &str)]) -> Vec<String> {
        let files = files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        parse_files(Path::new("schemas"), files)
            .1
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn positions_json_syntax_errors_and_schema_problems() {
        let errors = errors_of(&[
            (
                "athlete/v1.json",
                "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"id\": {\"type\": \"strin\"}\n  }\n}\n",
            ),
            ("team/v1.json", "{\n  \"type\": \"object\",\n}\n"),
        ]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "schemas/athlete/v1.json:4:12: /properties/id/type: not a valid JSON Schema 2020-12: "
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("schemas/team/v1.json:3:1: invalid JSON: trailing comma"),
            "{errors:?}"
        );
    }

    #[test]
    fn positions_stream_file_problems_at_their_key() {
        let errors = errors_of(&[
            (
                "athlete/v1.json",
                r#"{"properties": {"id": {"type": "string"}}}"#,
            ),
            (
                "streams/athletes.v1.yaml",
                "stream: athletes.v1\naggregate_type: athlete\npartition_key: id\ncompatibility: backward\n",
            ),
            ("streams/teams.v1.yaml", "stream: [\n"),
        ]);
        assert_eq!(
            errors[0],
            "schemas/streams/athletes.v1.yaml:4:1: /compatibility: unknown compatibility \"backward\", expected one of BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE, NONE"
        );
        assert!(
            errors[1].starts_with("schemas/streams/teams.v1.yaml:2:1: invalid YAML"),
            "{errors:?}"
        );
    }

    #[test]
    fn reads_the_example_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/schemas");
        let registry = load(&dir).unwrap_or_else(|e| panic!("{e}"));
        let athlete = registry.subject("athlete").unwrap();
        assert_eq!(athlete.latest().version, 3);
        assert!(athlete.latest().declares(&["displayName"]));
        assert!(!athlete.latest().declares(&["name"]));
        let stream = registry.stream("athletes.athlete-updated.v1").unwrap();
        assert_eq!(stream.aggregate_type, "athlete");
        assert_eq!(stream.partition_key, "id");
    }
}
