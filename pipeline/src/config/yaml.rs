//! A YAML tree that remembers where every node came from, so that every configuration error
//! can name its file, line, column and key.

use std::collections::HashMap;

use ecst_operators::secret::redact;
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

/// Largest accepted document, in bytes: pipeline files are a few kilobytes.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;
/// Most nodes (scalars, sequences, mappings) a document may write.
pub const MAX_NODES: usize = 250_000;
/// Most nodes anchors and aliases together may copy: an alias to an alias to ... multiplies
/// (the "billion laughs"), and each anchor keeps a copy of its node (nested anchors too), so
/// copies are counted before they are made.
pub const MAX_ALIAS_NODES: usize = 100_000;
/// Deepest accepted nesting of sequences and mappings (the builder recurses per level).
pub const MAX_DEPTH: usize = 128;

/// Parses one YAML document into a positioned tree, refusing documents over
/// [`MAX_DOCUMENT_BYTES`], [`MAX_NODES`], [`MAX_ALIAS_NODES`] or [`MAX_DEPTH`].
pub fn parse(text: &str) -> Result<Node, YamlError> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(YamlError {
            pos: pos_at_byte(text, MAX_DOCUMENT_BYTES),
            message: format!(
                "the document is {} bytes, over the limit of {MAX_DOCUMENT_BYTES} bytes",
                text.len()
            ),
        });
    }
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        copied_nodes: 0,
    };
    builder.document()
}

/// The line and column of a byte offset (rounded down to a character).
fn pos_at_byte(text: &str, offset: usize) -> Pos {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
    }
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// Anchored nodes by anchor id, with their node counts (what an alias to them copies).
    anchors: HashMap<usize, (Node, usize)>,
    /// Nodes the document wrote so far.
    nodes: usize,
    /// Nodes anchors and aliases copied so far.
    copied_nodes: usize,
}

fn pos_of(span: &saphyr_parser::Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

/// Adds `size` copied nodes to `copied` and refuses past [`MAX_ALIAS_NODES`]; called before
/// the copy is made, so a bomb fails before it allocates.
fn charge_copy(copied: &mut usize, size: usize, pos: Pos) -> Result<(), YamlError> {
    *copied = copied.saturating_add(size);
    if *copied > MAX_ALIAS_NODES {
        return Err(YamlError {
            pos,
            message: format!(
                "anchors and aliases copy more than {MAX_ALIAS_NODES} nodes (an alias bomb?)"
            ),
        });
    }
    Ok(())
}

/// Nodes in a tree, counting the root.
fn count_nodes(node: &Node) -> usize {
    match &node.kind {
        NodeKind::Scalar { .. } => 1,
        NodeKind::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        NodeKind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(_, value)| 1 + count_nodes(value))
                .sum::<usize>()
        }
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
                    root = Some(self.node(event, pos, 1)?);
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

    /// Counts one node written in the document.
    fn count(&mut self, pos: Pos) -> Result<(), YamlError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(YamlError {
                pos,
                message: format!("the document has more than {MAX_NODES} nodes"),
            });
        }
        Ok(())
    }

    /// Builds the node that starts with `event`, `depth` levels down (the root is 1).
    fn node(&mut self, event: Event<'a>, pos: Pos, depth: usize) -> Result<Node, YamlError> {
        if matches!(event, Event::SequenceStart(..) | Event::MappingStart(..)) && depth > MAX_DEPTH
        {
            return Err(YamlError {
                pos,
                message: format!("the document nests deeper than {MAX_DEPTH} levels"),
            });
        }
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                self.count(pos)?;
                let node = Node {
                    pos,
                    kind: NodeKind::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                };
                self.remember(anchor, &node, pos)?;
                Ok(node)
            }
            Event::SequenceStart(anchor, _) => {
                self.count(pos)?;
                let mut items = Vec::new();
                loop {
                    let (event, item_pos) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, item_pos, depth + 1)?);
                }
                let node = Node {
                    pos,
                    kind: NodeKind::Seq(items),
                };
                self.remember(anchor, &node, pos)?;
                Ok(node)
            }
            Event::MappingStart(anchor, _) => {
                self.count(pos)?;
                let mut entries: Vec<(Key, Node)> = Vec::new();
                // Duplicate keys are found by hash, not by scanning the keys so far: a mapping
                // of n keys costs O(n), not O(n^2).
                let mut seen: HashMap<String, Pos> = HashMap::new();
                loop {
                    let (event, key_pos) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key_node = self.node(event, key_pos, depth + 1)?;
                    let name = match key_node.kind {
                        NodeKind::Scalar { text, .. } => text,
                        _ => {
                            return Err(YamlError {
                                pos: key_pos,
                                message: "mapping keys must be plain strings".into(),
                            });
                        }
                    };
                    if let Some(first) = seen.insert(name.clone(), key_pos) {
                        return Err(YamlError {
                            pos: key_pos,
                            message: format!(
                                "duplicate key `{name}` (first defined at line {})",
                                first.line
                            ),
                        });
                    }
                    let (event, value_pos) = self.next()?;
                    let value = self.node(event, value_pos, depth + 1)?;
                    entries.push((Key { name, pos: key_pos }, value));
                }
                let node = Node {
                    pos,
                    kind: NodeKind::Map(entries),
                };
                self.remember(anchor, &node, pos)?;
                Ok(node)
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(YamlError {
                        pos,
                        message: "alias to an unknown anchor".into(),
                    });
                };
                charge_copy(&mut self.copied_nodes, *size, pos)?;
                Ok(node.clone())
            }
            _ => Err(YamlError {
                pos,
                message: "unexpected YAML structure".into(),
            }),
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node, pos: Pos) -> Result<(), YamlError> {
        if anchor != 0 {
            let size = count_nodes(node);
            charge_copy(&mut self.copied_nodes, size, pos)?;
            self.anchors.insert(anchor, (node.clone(), size));
        }
        Ok(())
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every scalar value (never in keys, never in the
/// raw text, so a variable holding YAML cannot add keys). `$$` writes a literal `$`.
/// Returns the dotted key, position and message of each unset variable without a default;
/// the key is tracked on the way down, so finding it costs nothing per error.
pub fn interpolate(
    node: &mut Node,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, YamlError)> {
    let mut errors = Vec::new();
    interpolate_at(node, lookup, &mut Vec::new(), &mut errors);
    errors
}

fn interpolate_at(
    node: &mut Node,
    lookup: &dyn Fn(&str) -> Option<String>,
    trail: &mut Vec<String>,
    errors: &mut Vec<(String, YamlError)>,
) {
    match &mut node.kind {
        NodeKind::Scalar { text, .. } => match expand(text, lookup) {
            Ok(expanded) => *text = expanded,
            Err(message) => errors.push((
                trail.join("."),
                YamlError {
                    pos: node.pos,
                    message,
                },
            )),
        },
        NodeKind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                trail.push(i.to_string());
                interpolate_at(item, lookup, trail, errors);
                trail.pop();
            }
        }
        NodeKind::Map(entries) => {
            for (key, value) in entries {
                trail.push(key.name.clone());
                interpolate_at(value, lookup, trail, errors);
                trail.pop();
            }
        }
    }
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
                .ok_or_else(|| format!("unclosed `${{` in {:?}", redact(text)))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(format!(
                    "invalid variable name {name:?} in {:?}",
                    redact(text)
                ));
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
pub(crate) mod tests {
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
        assert_eq!(errors[0].0, "missing");
        assert_eq!(errors[0].1.pos.line, 4);
        assert!(errors[0].1.message.contains("NOPE is not set"));
        let json = tree.to_json();
        assert_eq!(json["url"], json!("redis://x\nevil: true"));
        assert_eq!(json["port"], json!(6379));
        assert_eq!(json["literal"], json!("$HOME"));
        assert!(json.get("evil").is_none());
    }

    #[test]
    fn interpolation_errors_mask_passwords() {
        let mut tree = parse("url: \"host=db password=Zz9secretQ port=${PORT\"\n").unwrap();
        let errors = interpolate(&mut tree, &|_| None);
        assert_eq!(
            errors[0].1.message,
            "unclosed `${` in \"host=db password=*** port=${PORT\""
        );
    }

    #[test]
    fn anchors_and_aliases_resolve() {
        let tree = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(tree.to_json()["other"], json!({"x": 1}));
    }

    /// The classic "billion laughs": nine levels of ten aliases each, 10^9 leaves.
    pub(crate) fn alias_bomb() -> String {
        let mut text = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        for pair in names.windows(2) {
            let (prev, name) = (pair[0], pair[1]);
            let refs = vec![format!("*{prev}"); 9].join(",");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        let bomb = alias_bomb();
        assert!(bomb.len() < 700, "{}", bomb.len());
        let err = parse(&bomb).unwrap_err();
        assert_eq!(
            err.message,
            format!("anchors and aliases copy more than {MAX_ALIAS_NODES} nodes (an alias bomb?)")
        );
        // Level `e` (line 5) is the first whose copies pass the budget.
        assert_eq!(err.pos.line, 5, "{err:?}");
    }

    #[test]
    fn documents_over_the_size_node_and_depth_limits_are_refused() {
        let big = format!("a: \"{}\"\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let err = parse(&big).unwrap_err();
        assert!(
            err.message
                .ends_with(&format!("over the limit of {MAX_DOCUMENT_BYTES} bytes")),
            "{err:?}"
        );
        assert_eq!(err.pos.line, 1);

        let many = format!("[{}]", vec!["1"; MAX_NODES].join(","));
        let err = parse(&many).unwrap_err();
        assert_eq!(
            err.message,
            format!("the document has more than {MAX_NODES} nodes")
        );

        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = parse(&deep).unwrap_err();
        assert_eq!(
            err.message,
            format!("the document nests deeper than {MAX_DEPTH} levels")
        );
        assert_eq!(
            err.pos,
            Pos {
                line: 1,
                col: MAX_DEPTH + 1
            }
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn nested_anchors_are_counted_too() {
        // Each of 100 nested anchors keeps its own copy of 2,000 leaves: 200,000 copied nodes
        // from a 10 kB document that uses no alias at all.
        let depth = 100;
        let mut text = String::new();
        for i in 0..depth {
            text.push_str(&format!("&a{i} ["));
        }
        text.push_str(&vec!["1"; 2000].join(","));
        text.push_str(&"]".repeat(depth));
        let err = parse(&text).unwrap_err();
        assert!(
            err.message
                .starts_with("anchors and aliases copy more than"),
            "{err:?}"
        );
    }

    #[test]
    fn aliases_within_the_budget_still_resolve() {
        let mut text = String::from("base: &b {x: 1, y: [1, 2, 3]}\n");
        for i in 0..1000 {
            text.push_str(&format!("k{i}: *b\n"));
        }
        let tree = parse(&text).unwrap();
        assert_eq!(tree.to_json()["k999"], json!({"x": 1, "y": [1, 2, 3]}));
    }
}
