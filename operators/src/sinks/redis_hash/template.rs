//! Key templates: `athlete:{aggregateId}`, placeholders are envelope paths.

use ecst_schemas::Envelope;
use serde_json::Value;

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `aggregateId`, by far the most used, read without a lookup.
    AggregateId,
    Path(String),
}

impl KeyTemplate {
    /// Parses a template; `{{` and `}}` write literal braces.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut path = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => path.push(c),
                            None => return Err(format!("unclosed `{{` in key template {text:?}")),
                        }
                    }
                    if path.trim().is_empty() {
                        return Err(format!("empty placeholder in key template {text:?}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(match path.trim() {
                        "aggregateId" => Part::AggregateId,
                        path => Part::Path(path.to_string()),
                    });
                }
                '}' => return Err(format!("unmatched `}}` in key template {text:?}")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if parts.iter().all(|p| matches!(p, Part::Literal(_))) {
            return Err(format!(
                "key template {text:?} has no placeholder, so every aggregate would share one key; use e.g. \"athlete:{{aggregateId}}\""
            ));
        }
        Ok(KeyTemplate { parts })
    }

    /// The SCAN `MATCH` pattern of every key the template can render (placeholders as `*`,
    /// glob characters in literals escaped).
    pub fn pattern(&self) -> String {
        let mut pattern = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => {
                    for c in s.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            pattern.push('\\');
                        }
                        pattern.push(c);
                    }
                }
                Part::AggregateId | Part::Path(_) => pattern.push('*'),
            }
        }
        pattern
    }

    /// The envelope paths of the placeholders.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::AggregateId => Some("aggregateId"),
            Part::Path(path) => Some(path.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the key for an event.
    pub fn render(&self, event: &Envelope) -> Result<String, String> {
        let mut key = String::new();
        self.render_into(event, &mut key)?;
        Ok(key)
    }

    /// Appends the key for an event to `out`, which is left as it was when it fails.
    pub fn render_into(&self, event: &Envelope, out: &mut String) -> Result<(), String> {
        let start = out.len();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::AggregateId => out.push_str(&event.aggregate_id),
                Part::Path(path) => match event.lookup(path) {
                    Some(Value::String(s)) => out.push_str(&s),
                    Some(Value::Null) | None => {
                        out.truncate(start);
                        return Err(format!(
                            "key template placeholder `{path}` is missing in the event"
                        ));
                    }
                    Some(other) => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::EnvelopeKeys;
    use serde_json::json;

    #[test]
    fn patterns_match_what_renders() {
        let t = KeyTemplate::parse("ath*:{aggregateId}:x").unwrap();
        assert_eq!(t.pattern(), "ath\\*:*:x");
    }

    #[test]
    fn renders_envelope_and_payload_paths() {
        let t = KeyTemplate::parse("{aggregateType}:{aggregateId}:{payload.region}:{{x}}").unwrap();
        let env = EnvelopeKeys::default()
            .read(&json!({"aggregateType": "athlete", "aggregateId": "a1", "aggregateVersion": 1, "payload": {"region": 7}}))
            .unwrap();
        assert_eq!(t.render(&env).unwrap(), "athlete:a1:7:{x}");
        let env = EnvelopeKeys::default()
            .read(&json!({"aggregateId": "a1", "aggregateVersion": 1}))
            .unwrap();
        assert_eq!(
            t.render(&env).unwrap_err(),
            "key template placeholder `aggregateType` is missing in the event"
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        assert!(
            KeyTemplate::parse("athlete:{aggregateId")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            KeyTemplate::parse("athlete")
                .unwrap_err()
                .contains("no placeholder")
        );
        assert!(
            KeyTemplate::parse("a:{}")
                .unwrap_err()
                .contains("empty placeholder")
        );
        assert!(KeyTemplate::parse("a}").unwrap_err().contains("unmatched"));
    }
}
