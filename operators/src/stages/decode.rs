//! `decode`: a stream entry's body field into the canonical envelope.

use ecst_schemas::wire::{
    BodyLimits, ContentType, FIELD_BODY, FIELD_CONTENT_TYPE, decode_body, decode_members,
};
use ecst_schemas::{EnvelopeKeys, PayloadSelection};
use serde::Deserialize;

use crate::dead_letter::DeadLetterReason;
use crate::record::{Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, Stage};

/// How the body is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// By the entry's `ct` field; JSON when absent.
    #[default]
    Auto,
    /// Always JSON.
    Json,
    /// Always MessagePack.
    Msgpack,
}

/// Configuration of the `decode` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Stream entry field holding the body (default `v`).
    #[serde(default = "default_field")]
    pub field: String,
    /// Body encoding: `auto` (by `ct`), `json` or `msgpack`.
    #[serde(default)]
    pub format: BodyFormat,
    /// Where each envelope member lives in the body (defaults: the canonical camelCase keys).
    #[serde(default)]
    pub envelope: EnvelopeKeys,
    /// Largest accepted body in bytes (default 1 MiB); larger entries are dead-lettered.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Deepest accepted nesting of the body (default 64).
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
}

fn default_field() -> String {
    FIELD_BODY.to_string()
}

fn default_max_body_bytes() -> usize {
    BodyLimits::default().max_bytes
}

fn default_max_depth() -> usize {
    BodyLimits::default().max_depth
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            field: default_field(),
            format: BodyFormat::Auto,
            envelope: EnvelopeKeys::default(),
            max_body_bytes: default_max_body_bytes(),
            max_depth: default_max_depth(),
        }
    }
}

impl DecodeConfig {
    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.field.is_empty() {
            problems.push(ConfigProblem::new("field", "must not be empty"));
        }
        if self.max_body_bytes == 0 {
            problems.push(ConfigProblem::new("max_body_bytes", "must be at least 1"));
        }
        if self.max_depth < 2 {
            problems.push(ConfigProblem::new("max_depth", "must be at least 2"));
        }
        problems
    }

    /// Builds the stage, keeping the whole payload.
    pub fn build(&self) -> Decode {
        self.build_selecting(PayloadSelection::All)
    }

    /// Builds the stage, keeping only the payload members `payload` selects (with the
    /// canonical envelope; a mapped one reads its members from the whole body).
    pub fn build_selecting(&self, payload: PayloadSelection) -> Decode {
        Decode {
            canonical: self.envelope.is_canonical(),
            payload,
            config: self.clone(),
            limits: BodyLimits {
                max_bytes: self.max_body_bytes,
                max_depth: self.max_depth,
            },
        }
    }
}

/// The running `decode` stage.
#[derive(Debug)]
pub struct Decode {
    config: DecodeConfig,
    /// The mapping is the canonical one: bodies decode straight into their members.
    canonical: bool,
    /// The payload members the pipeline reads.
    payload: PayloadSelection,
    limits: BodyLimits,
}

impl Decode {
    /// Decodes one entry, or says why it cannot be.
    pub fn decode_entry(&self, entry: &RawEntry) -> Result<ecst_schemas::Envelope, String> {
        if entry.fields.is_empty() {
            return Err("entry has no fields (deleted or trimmed before it was applied)".into());
        }
        let body = entry
            .field(&self.config.field)
            .ok_or_else(|| format!("missing body field `{}`", self.config.field))?;
        let ct = match self.config.format {
            BodyFormat::Json => ContentType::Json,
            BodyFormat::Msgpack => ContentType::MsgPack,
            BodyFormat::Auto => match entry.field(FIELD_CONTENT_TYPE) {
                None => ContentType::Json,
                Some(raw) => {
                    let name = std::str::from_utf8(raw)
                        .map_err(|_| "content type field `ct` is not UTF-8".to_string())?;
                    ContentType::parse(name).map_err(|e| e.to_string())?
                }
            },
        };
        let keys = &self.config.envelope;
        let members = if self.canonical {
            decode_members(body, ct, self.limits, &self.payload).map_err(|e| e.to_string())?
        } else {
            let value = decode_body(body, ct, self.limits).map_err(|e| e.to_string())?;
            if !value.is_object() {
                return Err(ecst_schemas::EnvelopeError::NotAnObject.to_string());
            }
            keys.members(value)
        };
        keys.assemble(members).map_err(|e| e.to_string())
    }
}

impl Stage for Decode {
    fn process(
        &mut self,
        _input: Vec<Record>,
        entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut records = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match self.decode_entry(entry) {
                Ok(event) => records.push(Record::new(index, event)),
                Err(reason) => out.dead_letter(index, DeadLetterReason::InvalidEvent(reason)),
            }
        }
        records
    }
}

impl ComponentConfig for DecodeConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::optional(
            "field",
            "string",
            "v",
            "stream entry field holding the body",
        ),
        KeyDoc::optional(
            "format",
            "auto | json | msgpack",
            "auto",
            "body encoding (`auto`: by the entry's `ct` field)",
        ),
        KeyDoc::optional(
            "envelope",
            "map of envelope member to body path",
            "the camelCase keys",
            "where each envelope member lives in a foreign body",
        ),
        KeyDoc::optional(
            "max_body_bytes",
            "integer",
            "1048576",
            "larger bodies are dead-lettered",
        ),
        KeyDoc::optional(
            "max_depth",
            "integer",
            "64",
            "deeper bodies are dead-lettered",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        PayloadSelection::nothing()
    }

    async fn build_component(&self, ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Stage(Box::new(
            self.build_selecting(ctx.payload_reads.clone()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Action;
    use serde_json::json;

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> RawEntry {
        RawEntry {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn decodes_json_and_msgpack_and_dead_letters_the_rest() {
        let body = json!({"aggregateId": "a", "aggregateVersion": 2, "payload": {"n": 1}});
        let json_bytes = serde_json::to_vec(&body).unwrap();
        let mp = rmp_serde::to_vec_named(&body).unwrap();
        let entries = vec![
            entry("1-0", &[("v", &json_bytes)]),
            entry("2-0", &[("v", &mp), ("ct", b"application/msgpack")]),
            entry("3-0", &[("v", b"{not json")]),
            entry("4-0", &[("body", &json_bytes)]),
            entry("5-0", &[]),
            entry(
                "6-0",
                &[("v", br#"{"aggregateId":"a","aggregateVersion":-3}"#)],
            ),
            entry("7-0", &[("v", &json_bytes), ("ct", b"text/csv")]),
        ];
        let mut out = Outcomes::default();
        let records = DecodeConfig::default()
            .build()
            .process(Vec::new(), &entries, &mut out);
        assert_eq!(
            records.iter().map(|r| r.entry).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(records[1].event.payload, Some(json!({"n": 1})));
        let reasons: Vec<(usize, String)> = out
            .dead_letters
            .iter()
            .map(|(i, r)| (*i, r.to_string()))
            .collect();
        assert_eq!(reasons.len(), 5);
        assert!(reasons[0].1.starts_with("invalid JSON body"), "{reasons:?}");
        assert_eq!(reasons[1], (3, "missing body field `v`".to_string()));
        assert!(reasons[2].1.starts_with("entry has no fields"));
        assert!(reasons[3].1.contains("must be a non-negative integer"));
        assert_eq!(
            reasons[4],
            (
                6,
                "unsupported content type \"text/csv\" (expected application/json or application/msgpack, parameters allowed)"
                    .to_string()
            )
        );
        assert!(
            out.dead_letters
                .iter()
                .all(|(_, r)| r.class() == "invalid_event")
        );
    }

    #[test]
    fn payload_shape_content_type_parameters_and_whole_body_depth() {
        let good = br#"{"aggregateId":"a","aggregateVersion":2,"payload":{"n":1}}"#;
        let deep = format!(
            r#"{{"aggregateId":"a","aggregateVersion":3,"payload":{{"n":1}},"unused":{}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        let entries = vec![
            entry(
                "1-0",
                &[("v", good), ("ct", b"application/json; charset=utf-8")],
            ),
            entry("2-0", &[("v", good), ("ct", b"Application/JSON")]),
            entry(
                "3-0",
                &[(
                    "v",
                    br#"{"aggregateId":"a","aggregateVersion":4,"payload":[1]}"#,
                )],
            ),
            entry(
                "4-0",
                &[(
                    "v",
                    br#"{"aggregateId":"a","aggregateVersion":5,"payload":"x"}"#,
                )],
            ),
            entry(
                "5-0",
                &[("v", good), ("ct", b"application/json; charset=utf-16")],
            ),
            entry("6-0", &[("v", deep.as_bytes())]),
        ];
        let mut out = Outcomes::default();
        let records = DecodeConfig::default()
            .build()
            .process(Vec::new(), &entries, &mut out);
        assert_eq!(
            records.iter().map(|r| r.entry).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let reasons: Vec<(usize, String)> = out
            .dead_letters
            .iter()
            .map(|(i, r)| (*i, r.to_string()))
            .collect();
        let reasons: Vec<(usize, &str)> = reasons.iter().map(|(i, r)| (*i, r.as_str())).collect();
        assert_eq!(
            reasons,
            vec![
                (
                    2,
                    "payload (key `payload`) must be an object or null, got an array"
                ),
                (
                    3,
                    "payload (key `payload`) must be an object or null, got a string"
                ),
                (
                    4,
                    "unsupported charset \"utf-16\" for application/json: JSON bodies must be UTF-8"
                ),
                (5, "body nests deeper than 64 levels"),
            ]
        );
    }

    #[test]
    fn body_over_the_limit_is_dead_lettered() {
        let config = DecodeConfig {
            max_body_bytes: 16,
            ..DecodeConfig::default()
        };
        let entries = vec![entry(
            "1-0",
            &[("v", br#"{"aggregateId":"a","aggregateVersion":1}"#)],
        )];
        let mut out = Outcomes::default();
        assert!(
            config
                .build()
                .process(Vec::new(), &entries, &mut out)
                .is_empty()
        );
        assert_eq!(
            out.dead_letters[0].1.to_string(),
            "body is 40 bytes, over the limit of 16 bytes"
        );
    }

    #[test]
    fn tombstones_default_to_delete() {
        let entries = vec![entry(
            "1-0",
            &[(
                "v",
                br#"{"aggregateId":"a","aggregateVersion":1,"payload":null}"#,
            )],
        )];
        let mut out = Outcomes::default();
        let records = DecodeConfig::default()
            .build()
            .process(Vec::new(), &entries, &mut out);
        assert!(matches!(records[0].action, Action::Delete { .. }));
    }
}
