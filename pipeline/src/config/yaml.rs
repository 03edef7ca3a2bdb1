//! A YAML tree that remembers where every node came from, so that every configuration error
//! can name its file, line, column and key.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle};
use serde_json::{Map, Number, Value};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

/// One YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// What it holds.
    pub kind: NodeKind,
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `plain` scalars are typed (null, bool, numbers), quoted ones are strings.
    Scalar {
        /// Text after `${VAR}` interpolation.
        text: String,
        /// Written without quotes.
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping; keys keep their own positions.
    Map(Vec<(Key, Node)>),
}

/// A mapping key with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Key text.
    pub name: String,
    /// Where the key starts.
    pub pos: Pos,
}

/// A YAML syntax or structure error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

/// Parses one YAML document into a positioned tree.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
    };
    builder.document()
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
}

fn pos_of(span: &saphyr_parser::Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Pos), YamlError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => Ok((event, pos_of(&span))),
            Some(Err(e)) => Err(YamlError {
                pos: Pos {
                    line: e.marker().line(),
                    col: e.marker().col() + 1,
                },
                message: format!("invalid YAML: {}", e.info()),
            }),
            None => Err(YamlError {
                pos: Pos::default(),
                message: "unexpected end of YAML".into(),
            }),
        }
    }

    fn document(&mut self) -> Result<Node, YamlError> {
        let mut root = None;
        loop {
            let (event, pos) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart(_) => {
                    if root.is_some() {
                        return Err(YamlError {
                            pos,
                            message: "a pipeline file holds one YAML document, found a second"
                                .into(),
                        });
                    }
                    let (event, pos) = self.next()?;
                    root = Some(self.node(event, pos)?);
                }
                Event::StreamEnd => {
                    return root.ok_or(YamlError {
                        pos,
                        message: "the file is empty".into(),
                    });
                }
                _ => {
                    return Err(YamlError {
                        pos,
                        message: "unexpected YAML structure".into(),
                    });
                }
            }
        }
    }

    fn node(&mut self, event: Event<'a>, pos: Pos) -> Result<Node, YamlError> {
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let node = Node {
                    pos,
                    kind: NodeKind::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, item_pos) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, item_pos)?);
                }
                let node = Node {
                    pos,
                    kind: NodeKind::Seq(items),
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Key, Node)> = Vec::new();
                loop {
                    let (event, key_pos) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key_node = self.node(event, key_pos)?;
                    let name = match key_node.kind {
                        NodeKind::Scalar { text, .. } => text,
                        _ => {
                            return Err(YamlError {
                                pos: key_pos,
                                message: "mapping keys must be plain strings".into(),
                            });
                        }
                    };
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == name) {
                        return Err(YamlError {
                            pos: key_pos,
                            message: format!(
                                "duplicate key `{name}` (first defined at line {})",
                                first.pos.line
                            ),
                        });
                    }
                    let (event, value_pos) = self.next()?;
                    let value = self.node(event, value_pos)?;
                    entries.push((Key { name, pos: key_pos }, value));
                }
                let node = Node {
                    pos,
                    kind: NodeKind::Map(entries),
                };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::Alias(id) => self.anchors.get(&id).cloned().ok_or(YamlError {
                pos,
                message: "alias to an unknown anchor".into(),
            }),
            _ => Err(YamlError {
                pos,
                message: "unexpected YAML structure".into(),
            }),
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every scalar value (never in keys, never in the
/// raw text, so a variable holding YAML cannot add keys). `$$` writes a literal `$`.
/// Returns the positions and messages of unset variables without defaults.
pub fn interpolate(node: &mut Node, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<YamlError> {
    let mut errors = Vec::new();
    match &mut node.kind {
        NodeKind::Scalar { text, .. } => match expand(text, lookup) {
            Ok(expanded) => *text = expanded,
            Err(message) => errors.push(YamlError {
                pos: node.pos,
                message,
            }),
        },
        NodeKind::Seq(items) => {
            for item in items {
                errors.extend(interpolate(item, lookup));
            }
        }
        NodeKind::Map(entries) => {
            for (_, value) in entries {
                errors.extend(interpolate(value, lookup));
            }
        }
    }
    errors
}

fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(body) = rest.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {text:?}"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!("invalid variable name {name:?} in {text:?}"));
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set and has no default (write ${{{name}:-default}})"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl Node {
    /// The node as JSON, typing plain scalars the YAML 1.2 core-schema way.
    pub fn to_json(&self) -> Value {
        match &self.kind {
            NodeKind::Scalar { text, plain: false } => Value::String(text.clone()),
            NodeKind::Scalar { text, plain: true } => plain_scalar(text),
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }

    /// The entries of a mapping node.
    pub fn entries(&self) -> Option<&[(Key, Node)]> {
        match &self.kind {
            NodeKind::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value and key position under `key` in a mapping node.
    pub fn get(&self, key: &str) -> Option<(&Key, &Node)> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(k, v)| (k, v))
    }

    /// The scalar text, if this is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Position of the key (or item) at a dotted path below this node; the deepest existing
    /// node when the path runs out.
    pub fn locate(&self, path: &[String]) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for part in path {
            match &node.kind {
                NodeKind::Map(entries) => match entries.iter().find(|(k, _)| &k.name == part) {
                    Some((k, v)) => {
                        pos = k.pos;
                        node = v;
                    }
                    None => return pos,
                },
                NodeKind::Seq(items) => match part.parse::<usize>().ok().and_then(|i| items.get(i))
                {
                    Some(item) => {
                        pos = item.pos;
                        node = item;
                    }
                    None => return pos,
                },
                NodeKind::Scalar { .. } => return pos,
            }
        }
        pos
    }
}

fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
        if let Ok(n) = text.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = text.trim_start_matches('+').parse::<u64>() {
            return Value::Number(n.into());
        }
    }
    let looks_float = digits
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'));
    if looks_float
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn positions_and_types() {
        let tree = parse("a: 1\nb:\n  c: \"2\"\n  d: [true, ~, x, 1.5]\n").unwrap();
        assert_eq!(
            tree.to_json(),
            json!({"a": 1, "b": {"c": "2", "d": [true, null, "x", 1.5]}})
        );
        assert_eq!(
            tree.locate(&["b".into(), "c".into()]),
            Pos { line: 3, col: 3 }
        );
        assert_eq!(
            tree.locate(&["b".into(), "d".into(), "2".into()]),
            Pos { line: 4, col: 16 }
        );
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_have_positions() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos.line, 3);
        assert!(err.message.starts_with("duplicate key `a`"));
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("invalid YAML"), "{err:?}");
    }

    #[test]
    fn interpolation_is_per_scalar_and_cannot_inject_keys() {
        let mut tree =
            parse("url: ${URL}\nport: ${PORT:-6379}\nliteral: $$HOME\nmissing: ${NOPE}\n").unwrap();
        let env = |name: &str| match name {
            "URL" => Some("redis://x\nevil: true".to_string()),
            _ => None,
        };
        let errors = interpolate(&mut tree, &env);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].pos.line, 4);
        assert!(errors[0].message.contains("NOPE is not set"));
        let json = tree.to_json();
        assert_eq!(json["url"], json!("redis://x\nevil: true"));
        assert_eq!(json["port"], json!(6379));
        assert_eq!(json["literal"], json!("$HOME"));
        assert!(json.get("evil").is_none());
    }

    #[test]
    fn anchors_and_aliases_resolve() {
        let tree = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(tree.to_json()["other"], json!({"x": 1}));
    }
}
