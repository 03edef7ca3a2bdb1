//! `ecst init --from-event FILE|-`: a commented starter pipeline from a sample event (the wire
//! envelope as JSON): decode, version_filter, tombstone, a project of the sample's payload
//! members, and a redis_hash sink.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Map, Value};

/// `ecst init` options.
#[derive(clap::Args)]
pub(crate) struct InitArgs {
    /// A sample event as JSON (the wire envelope); `-` reads it from stdin.
    #[arg(long, value_name = "FILE")]
    from_event: String,
    /// The stream the producer publishes to (default `<aggregateType>.events`).
    #[arg(long)]
    stream: Option<String>,
}

/// Prints the starter pipeline, or says why the sample cannot make one (exit 1).
pub(crate) fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let text = if args.from_event == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the sample event from stdin")?;
        text
    } else {
        std::fs::read_to_string(Path::new(&args.from_event))
            .with_context(|| format!("reading {}", args.from_event))?
    };
    match starter_pipeline(&text, args.stream.as_deref()) {
        Ok(yaml) => {
            print!("{yaml}");
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("error: {}: {reason}", args.from_event);
            Ok(ExitCode::from(1))
        }
    }
}

/// The pipeline YAML for the sample event `json`, or why it cannot be made.
fn starter_pipeline(json: &str, stream: Option<&str>) -> Result<String, String> {
    let event: Value = serde_json::from_str(json).map_err(|e| format!("not a JSON event: {e}"))?;
    let Some(event) = event.as_object() else {
        return Err("the sample is not a JSON object (an event envelope)".into());
    };
    let Some(payload) = event.get("payload").and_then(Value::as_object) else {
        return Err(
            "the sample has no `payload` object: give an event in the wire envelope (aggregateType, aggregateId, aggregateVersion, payload)".into(),
        );
    };
    let aggregate = event
        .get("aggregateType")
        .and_then(Value::as_str)
        .map(plain_name)
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "entity".into());
    let stream = stream
        .map(str::to_string)
        .unwrap_or_else(|| format!("{aggregate}.events"));
    let (fields, skipped) = project_fields(payload);
    let mut yaml = format!(
        "# A starter pipeline made by `ecst init` from a sample `{aggregate}` event.
# Check it with `ecst validate FILE`, against the servers with `ecst validate --connect FILE`,
# and run it with `ecst run FILE`. `ecst stages NAME` lists every key of a stage type.
name: {aggregate}-replica
source:
  # The Redis holding the stream; ${{VAR:-default}} reads the environment.
  redis: ${{REDIS_URL:-redis://127.0.0.1:6379}}
  # The stream the producer publishes to, and this replica's own consumer group.
  stream: {stream}
  group: {aggregate}-replica.v1
stages:
  # The stream entry's body (the wire envelope, JSON or MessagePack) to an event.
  decode:
    type: decode
  # Drops events not newer than the version of their aggregate applied last.
  latest:
    type: version_filter
    input: decode
  # A delete removes the replica's entry; its version is remembered for keep_for so that an
  # older update arriving late cannot bring it back.
  deletes:
    type: tombstone
    input: latest
    mode: delete
    keep_for: 7d
  # The replica's fields, one per payload member of the sample: drop those you do not need.
  # `where: <CEL>` would keep only the events for which it is true.
  fields:
    type: project
    input: deletes
    fields:
",
        stream = yaml_string(&stream),
    );
    for (field, member) in &fields {
        yaml.push_str(&format!("      {field}: payload.{member}\n"));
    }
    if !skipped.is_empty() {
        yaml.push_str(&format!(
            "    # Not plain names, so left out: {}\n",
            skipped.join(", ")
        ));
    }
    yaml.push_str(&format!(
        "  # One Redis hash per aggregate, written behind a version guard (`ecst stages postgres`
  # for a Postgres table instead).
  cache:
    type: redis_hash
    input: fields
    key: \"{aggregate}:{{aggregateId}}\"
"
    ));
    if fields.is_empty() {
        return Err("the sample's payload has no member with a plain name to project".into());
    }
    Ok(yaml)
}

/// The replica field (snake_case) and payload member of each plain-named member, and the
/// names left out.
fn project_fields(payload: &Map<String, Value>) -> (Vec<(String, String)>, Vec<String>) {
    let mut fields = Vec::new();
    let mut skipped = Vec::new();
    for member in payload.keys() {
        let plain = member
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && member
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        let field = snake_case(member);
        if plain && !fields.iter().any(|(taken, _)| *taken == field) {
            fields.push((field, member.clone()));
        } else {
            skipped.push(format!("{member:?}"));
        }
    }
    (fields, skipped)
}

/// `displayName` → `display_name`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The aggregate type as it may appear in a name and a key template.
fn plain_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect()
}

/// A YAML scalar for `s`: as it is when plain, else a JSON (and so YAML) string.
fn yaml_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if plain {
        s.to_string()
    } else {
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_members_become_snake_case_fields_and_odd_names_are_listed() {
        let yaml = starter_pipeline(
            r#"{"aggregateType":"athlete","aggregateId":"a1","aggregateVersion":3,
                "payload":{"displayName":"Ann","countryCode":"NO","first name":"x"}}"#,
            None,
        )
        .unwrap();
        assert!(
            yaml.contains("      display_name: payload.displayName\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains("      country_code: payload.countryCode\n"),
            "{yaml}"
        );
        assert!(yaml.contains("left out: \"first name\""), "{yaml}");
        assert!(yaml.contains("stream: athlete.events\n"), "{yaml}");
        assert!(yaml.contains("key: \"athlete:{aggregateId}\""), "{yaml}");
    }

    #[test]
    fn a_sample_without_a_payload_object_says_what_is_expected() {
        let error = starter_pipeline(r#"{"aggregateId":"a1"}"#, None).unwrap_err();
        assert!(error.contains("no `payload` object"), "{error}");
        assert!(
            starter_pipeline("[1]", None)
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            starter_pipeline("{", None)
                .unwrap_err()
                .contains("not a JSON event")
        );
    }

    #[test]
    fn a_stream_name_that_is_not_plain_is_quoted() {
        let yaml = starter_pipeline(
            r#"{"aggregateType":"a","payload":{"x":1}}"#,
            Some("my stream #1"),
        )
        .unwrap();
        assert!(yaml.contains("stream: \"my stream #1\"\n"), "{yaml}");
    }
}
