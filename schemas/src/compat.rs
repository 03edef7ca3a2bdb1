//! Schema compatibility: which changes between two JSON Schemas a reader survives.
//!
//! [`differences`] compares the schema data was written with (the writer) with the schema it
//! is read with (the reader) and lists every [`Difference`], each of a [`DifferenceKind`] that
//! is compatible or not. A compatibility mode then picks the pairs to compare: BACKWARD reads
//! the previous version's data with the new schema (writer = previous, reader = new), FORWARD
//! the other way round, FULL both, the `_TRANSITIVE` forms against every earlier version, NONE
//! nothing.
//!
//! The rules, the kinds' names and which of them are compatible follow Confluent Schema
//! Registry's JSON Schema provider, so that a team moving between the two sees the same
//! verdicts:
//! - <https://docs.confluent.io/platform/current/schema-registry/fundamentals/schema-evolution.html>
//!   (the modes),
//! - <https://docs.confluent.io/platform/current/schema-registry/fundamentals/serdes-develop/serdes-json.html>
//!   and <https://yokota.blog/2021/03/29/understanding-json-schema-compatibility/> (open,
//!   closed and partially open content models),
//! - <https://github.com/confluentinc/schema-registry/tree/master/json-schema-provider/src/main/java/io/confluent/kafka/schemaregistry/json/diff>
//!   (`SchemaDiff.COMPATIBLE_CHANGES` and the per-type comparisons).
//!
//! The content model decides what adding or removing a property means. An object is *open*
//! when `additionalProperties` is absent or `true` and it has no `patternProperties`: data
//! written with it may already carry any property under any name, so a reader that adds a
//! typed property may meet old data with another type there (PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL,
//! incompatible), while removing one is safe. It is *closed* with `additionalProperties: false`:
//! adding an optional property is safe, removing one is not. It is *partially open* with a
//! schema for additional or pattern properties: a property added or removed must fit it.
//!
//! Where this differs from Confluent: an `enum` next to a `type` is compared as one more
//! constraint of the same schema (Confluent's parser makes it a synthetic `allOf`); `const` is
//! an `enum` of one value; `not`, `if`/`then`/`else` and dependencies are not compared;
//! annotations (`title`, `description`, `default` changes) are never reported.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::registry::Compatibility;

macro_rules! difference_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal, $compatible:literal;)*) => {
        /// A kind of difference between a writer's and a reader's schema, named as Confluent
        /// Schema Registry names it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum DifferenceKind {
            $($(#[doc = $doc])* $variant,)*
        }

        impl DifferenceKind {
            /// Every kind, for tables and documentation.
            pub const ALL: &'static [DifferenceKind] = &[$(DifferenceKind::$variant,)*];

            /// The upper-case name (`TYPE_CHANGED`).
            pub fn name(self) -> &'static str {
                match self {
                    $(DifferenceKind::$variant => $name,)*
                }
            }

            /// Whether a reader still reads every document valid for the writer.
            pub fn is_compatible(self) -> bool {
                match self {
                    $(DifferenceKind::$variant => $compatible,)*
                }
            }
        }
    };
}

difference_kinds! {
    /// The schema's type changed (string to integer, object to array...).
    TypeChanged = "TYPE_CHANGED", false;
    /// `integer` became `number`.
    TypeExtended = "TYPE_EXTENDED", true;
    /// `number` became `integer`.
    TypeNarrowed = "TYPE_NARROWED", false;
    /// The reader has a schema where the writer had none (e.g. `items`).
    SchemaAdded = "SCHEMA_ADDED", false;
    /// The reader has no schema where the writer had one.
    SchemaRemoved = "SCHEMA_REMOVED", true;
    /// `maxLength` added.
    MaxLengthAdded = "MAX_LENGTH_ADDED", false;
    /// `maxLength` removed.
    MaxLengthRemoved = "MAX_LENGTH_REMOVED", true;
    /// `maxLength` increased.
    MaxLengthIncreased = "MAX_LENGTH_INCREASED", true;
    /// `maxLength` decreased.
    MaxLengthDecreased = "MAX_LENGTH_DECREASED", false;
    /// `minLength` added.
    MinLengthAdded = "MIN_LENGTH_ADDED", false;
    /// `minLength` removed.
    MinLengthRemoved = "MIN_LENGTH_REMOVED", true;
    /// `minLength` increased.
    MinLengthIncreased = "MIN_LENGTH_INCREASED", false;
    /// `minLength` decreased.
    MinLengthDecreased = "MIN_LENGTH_DECREASED", true;
    /// `pattern` added.
    PatternAdded = "PATTERN_ADDED", false;
    /// `pattern` removed.
    PatternRemoved = "PATTERN_REMOVED", true;
    /// `pattern` changed.
    PatternChanged = "PATTERN_CHANGED", false;
    /// `maximum` added.
    MaximumAdded = "MAXIMUM_ADDED", false;
    /// `maximum` removed.
    MaximumRemoved = "MAXIMUM_REMOVED", true;
    /// `maximum` increased.
    MaximumIncreased = "MAXIMUM_INCREASED", true;
    /// `maximum` decreased.
    MaximumDecreased = "MAXIMUM_DECREASED", false;
    /// `minimum` added.
    MinimumAdded = "MINIMUM_ADDED", false;
    /// `minimum` removed.
    MinimumRemoved = "MINIMUM_REMOVED", true;
    /// `minimum` increased.
    MinimumIncreased = "MINIMUM_INCREASED", false;
    /// `minimum` decreased.
    MinimumDecreased = "MINIMUM_DECREASED", true;
    /// `exclusiveMaximum` added.
    ExclusiveMaximumAdded = "EXCLUSIVE_MAXIMUM_ADDED", false;
    /// `exclusiveMaximum` removed.
    ExclusiveMaximumRemoved = "EXCLUSIVE_MAXIMUM_REMOVED", true;
    /// `exclusiveMaximum` increased.
    ExclusiveMaximumIncreased = "EXCLUSIVE_MAXIMUM_INCREASED", true;
    /// `exclusiveMaximum` decreased.
    ExclusiveMaximumDecreased = "EXCLUSIVE_MAXIMUM_DECREASED", false;
    /// `exclusiveMinimum` added.
    ExclusiveMinimumAdded = "EXCLUSIVE_MINIMUM_ADDED", false;
    /// `exclusiveMinimum` removed.
    ExclusiveMinimumRemoved = "EXCLUSIVE_MINIMUM_REMOVED", true;
    /// `exclusiveMinimum` increased.
    ExclusiveMinimumIncreased = "EXCLUSIVE_MINIMUM_INCREASED", false;
    /// `exclusiveMinimum` decreased.
    ExclusiveMinimumDecreased = "EXCLUSIVE_MINIMUM_DECREASED", true;
    /// `multipleOf` added.
    MultipleOfAdded = "MULTIPLE_OF_ADDED", false;
    /// `multipleOf` removed.
    MultipleOfRemoved = "MULTIPLE_OF_REMOVED", true;
    /// `multipleOf` became a multiple of the old one.
    MultipleOfExpanded = "MULTIPLE_OF_EXPANDED", false;
    /// `multipleOf` became a divisor of the old one.
    MultipleOfReduced = "MULTIPLE_OF_REDUCED", true;
    /// `multipleOf` changed otherwise.
    MultipleOfChanged = "MULTIPLE_OF_CHANGED", false;
    /// The reader's `enum` holds every value of the writer's, and more (or has no `enum`).
    EnumArrayExtended = "ENUM_ARRAY_EXTENDED", true;
    /// The reader's `enum` lacks values of the writer's (or the writer had no `enum`).
    EnumArrayNarrowed = "ENUM_ARRAY_NARROWED", false;
    /// Both `enum`s have values the other lacks.
    EnumArrayChanged = "ENUM_ARRAY_CHANGED", false;
    /// A property both declare became required.
    RequiredAttributeAdded = "REQUIRED_ATTRIBUTE_ADDED", false;
    /// A property both declare became required, with a `default`.
    RequiredAttributeWithDefaultAdded = "REQUIRED_ATTRIBUTE_WITH_DEFAULT_ADDED", true;
    /// A property both declare is no longer required.
    RequiredAttributeRemoved = "REQUIRED_ATTRIBUTE_REMOVED", true;
    /// A property added to an object the writer left open.
    PropertyAddedToOpenContentModel = "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", false;
    /// A property with the empty schema added to an open object.
    PropertyWithEmptySchemaAddedToOpenContentModel = "PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL", true;
    /// A required property added to a closed or partially open object.
    RequiredPropertyAddedToUnopenContentModel = "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", false;
    /// A required property with a `default` added to a closed or partially open object.
    RequiredPropertyWithDefaultAddedToUnopenContentModel = "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL", true;
    /// An optional property added to a closed or partially open object.
    OptionalPropertyAddedToUnopenContentModel = "OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", true;
    /// A property removed from an object the reader leaves open.
    PropertyRemovedFromOpenContentModel = "PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL", true;
    /// A property removed from an object the reader closes.
    PropertyRemovedFromClosedContentModel = "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL", false;
    /// A property whose schema was `false` removed from a closed object.
    PropertyWithFalseRemovedFromClosedContentModel = "PROPERTY_WITH_FALSE_REMOVED_FROM_CLOSED_CONTENT_MODEL", true;
    /// A property added that fits the writer's additional or pattern properties.
    PropertyAddedIsCoveredByPartiallyOpenContentModel = "PROPERTY_ADDED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", true;
    /// A property added that does not fit the writer's additional or pattern properties.
    PropertyAddedNotCoveredByPartiallyOpenContentModel = "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", false;
    /// A property removed that fits the reader's additional or pattern properties.
    PropertyRemovedIsCoveredByPartiallyOpenContentModel = "PROPERTY_REMOVED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", true;
    /// A property removed that does not fit the reader's additional or pattern properties.
    PropertyRemovedNotCoveredByPartiallyOpenContentModel = "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", false;
    /// `additionalProperties: false` lifted.
    AdditionalPropertiesAdded = "ADDITIONAL_PROPERTIES_ADDED", true;
    /// `additionalProperties: false` set.
    AdditionalPropertiesRemoved = "ADDITIONAL_PROPERTIES_REMOVED", false;
    /// A schema for additional properties set where any was allowed.
    AdditionalPropertiesNarrowed = "ADDITIONAL_PROPERTIES_NARROWED", false;
    /// The schema for additional properties dropped: any is allowed.
    AdditionalPropertiesExtended = "ADDITIONAL_PROPERTIES_EXTENDED", true;
    /// `maxProperties` added.
    MaxPropertiesAdded = "MAX_PROPERTIES_ADDED", false;
    /// `maxProperties` removed.
    MaxPropertiesRemoved = "MAX_PROPERTIES_REMOVED", true;
    /// `maxProperties` increased.
    MaxPropertiesIncreased = "MAX_PROPERTIES_INCREASED", true;
    /// `maxProperties` decreased.
    MaxPropertiesDecreased = "MAX_PROPERTIES_DECREASED", false;
    /// `minProperties` added.
    MinPropertiesAdded = "MIN_PROPERTIES_ADDED", false;
    /// `minProperties` removed.
    MinPropertiesRemoved = "MIN_PROPERTIES_REMOVED", true;
    /// `minProperties` increased.
    MinPropertiesIncreased = "MIN_PROPERTIES_INCREASED", false;
    /// `minProperties` decreased.
    MinPropertiesDecreased = "MIN_PROPERTIES_DECREASED", true;
    /// `maxItems` added.
    MaxItemsAdded = "MAX_ITEMS_ADDED", false;
    /// `maxItems` removed.
    MaxItemsRemoved = "MAX_ITEMS_REMOVED", true;
    /// `maxItems` increased.
    MaxItemsIncreased = "MAX_ITEMS_INCREASED", true;
    /// `maxItems` decreased.
    MaxItemsDecreased = "MAX_ITEMS_DECREASED", false;
    /// `minItems` added.
    MinItemsAdded = "MIN_ITEMS_ADDED", false;
    /// `minItems` removed.
    MinItemsRemoved = "MIN_ITEMS_REMOVED", true;
    /// `minItems` increased.
    MinItemsIncreased = "MIN_ITEMS_INCREASED", false;
    /// `minItems` decreased.
    MinItemsDecreased = "MIN_ITEMS_DECREASED", true;
    /// `uniqueItems: true` added.
    UniqueItemsAdded = "UNIQUE_ITEMS_ADDED", false;
    /// `uniqueItems: true` removed.
    UniqueItemsRemoved = "UNIQUE_ITEMS_REMOVED", true;
    /// A tuple item (`prefixItems`) added where the writer's array was open.
    ItemAddedToOpenContentModel = "ITEM_ADDED_TO_OPEN_CONTENT_MODEL", false;
    /// A tuple item with the empty schema added where the writer's array was open.
    ItemWithEmptySchemaAddedToOpenContentModel = "ITEM_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL", true;
    /// A tuple item added where the writer's array was closed.
    ItemAddedToClosedContentModel = "ITEM_ADDED_TO_CLOSED_CONTENT_MODEL", true;
    /// A tuple item removed where the reader's array is open.
    ItemRemovedFromOpenContentModel = "ITEM_REMOVED_FROM_OPEN_CONTENT_MODEL", true;
    /// A tuple item removed where the reader's array is closed.
    ItemRemovedFromClosedContentModel = "ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL", false;
    /// A tuple item whose schema was `false` removed where the reader's array is closed.
    ItemWithFalseRemovedFromClosedContentModel = "ITEM_WITH_FALSE_REMOVED_FROM_CLOSED_CONTENT_MODEL", true;
    /// A tuple item added that fits the writer's schema of further items.
    ItemAddedIsCoveredByPartiallyOpenContentModel = "ITEM_ADDED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", true;
    /// A tuple item added that does not fit the writer's schema of further items.
    ItemAddedNotCoveredByPartiallyOpenContentModel = "ITEM_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", false;
    /// A tuple item removed that fits the reader's schema of further items.
    ItemRemovedIsCoveredByPartiallyOpenContentModel = "ITEM_REMOVED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", true;
    /// A tuple item removed that does not fit the reader's schema of further items.
    ItemRemovedNotCoveredByPartiallyOpenContentModel = "ITEM_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL", false;
    /// Items past the tuple allowed again.
    AdditionalItemsAdded = "ADDITIONAL_ITEMS_ADDED", true;
    /// Items past the tuple forbidden.
    AdditionalItemsRemoved = "ADDITIONAL_ITEMS_REMOVED", false;
    /// A schema for items past the tuple set where any was allowed.
    AdditionalItemsNarrowed = "ADDITIONAL_ITEMS_NARROWED", false;
    /// The schema for items past the tuple dropped.
    AdditionalItemsExtended = "ADDITIONAL_ITEMS_EXTENDED", true;
    /// `allOf`/`oneOf`/`anyOf` changed to one that accepts more.
    CombinedTypeExtended = "COMBINED_TYPE_EXTENDED", true;
    /// `allOf`/`oneOf`/`anyOf` changed otherwise.
    CombinedTypeChanged = "COMBINED_TYPE_CHANGED", false;
    /// The subschemas of a combination do not match one to one.
    CombinedTypeSubschemasChanged = "COMBINED_TYPE_SUBSCHEMAS_CHANGED", false;
    /// An `allOf` gained a member.
    ProductTypeExtended = "PRODUCT_TYPE_EXTENDED", false;
    /// An `allOf` lost a member.
    ProductTypeNarrowed = "PRODUCT_TYPE_NARROWED", true;
    /// An `anyOf`/`oneOf` (or a `type` list) gained a member.
    SumTypeExtended = "SUM_TYPE_EXTENDED", true;
    /// An `anyOf`/`oneOf` (or a `type` list) lost a member.
    SumTypeNarrowed = "SUM_TYPE_NARROWED", false;
}

impl std::fmt::Display for DifferenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DifferenceKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One difference between a writer's and a reader's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// What changed.
    pub kind: DifferenceKind,
    /// Where, as a JSON pointer into the schema (`/properties/name/maxLength`; `""` is the
    /// root).
    pub pointer: String,
}

impl Difference {
    /// Whether a reader still reads every document valid for the writer despite it.
    pub fn is_compatible(&self) -> bool {
        self.kind.is_compatible()
    }
}

/// Every difference between the `writer` schema (data was written with it) and the `reader`
/// schema (data is read with it), compatible or not, in schema order.
pub fn differences(writer: &Value, reader: &Value) -> Vec<Difference> {
    let mut diff = Diff {
        writer_root: writer,
        reader_root: reader,
        refs: Vec::new(),
    };
    let mut found = Vec::new();
    diff.compare(writer, reader, &mut Pointer::default(), &mut found);
    found
}

/// The differences that stop the `reader` from reading data of the `writer`.
pub fn incompatibilities(writer: &Value, reader: &Value) -> Vec<Difference> {
    let mut found = differences(writer, reader);
    found.retain(|d| !d.is_compatible());
    found
}

/// Which way data flows in one comparison of a compatibility check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The new schema reads data written with the earlier one.
    Backward,
    /// The earlier schema reads data written with the new one.
    Forward,
}

/// An incompatibility of a new schema version with one earlier version under a mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incompatibility {
    /// The earlier version compared with.
    pub against: u32,
    /// Which schema read which version's data.
    pub direction: Direction,
    /// What breaks, and where.
    #[serde(flatten)]
    pub difference: Difference,
}

impl Compatibility {
    /// Whether the new schema must read data of earlier versions.
    pub fn backward(self) -> bool {
        matches!(
            self,
            Compatibility::Backward
                | Compatibility::BackwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether earlier schemas must read data of the new version.
    pub fn forward(self) -> bool {
        matches!(
            self,
            Compatibility::Forward
                | Compatibility::ForwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether the new version is compared with every earlier one, not only the previous.
    pub fn transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }

    /// The mode that asks for everything both ask for (BACKWARD and FORWARD make FULL).
    pub fn strictest(self, other: Compatibility) -> Compatibility {
        let backward = self.backward() || other.backward();
        let forward = self.forward() || other.forward();
        let transitive = self.transitive() || other.transitive();
        match (backward, forward, transitive) {
            (false, false, _) => Compatibility::None,
            (true, false, false) => Compatibility::Backward,
            (true, false, true) => Compatibility::BackwardTransitive,
            (false, true, false) => Compatibility::Forward,
            (false, true, true) => Compatibility::ForwardTransitive,
            (true, true, false) => Compatibility::Full,
            (true, true, true) => Compatibility::FullTransitive,
        }
    }
}

/// Checks a new schema version against the earlier versions of its subject (`earlier`: version
/// number and schema, oldest first) under `mode`; empty when it keeps the mode.
pub fn check(mode: Compatibility, earlier: &[(u32, &Value)], new: &Value) -> Vec<Incompatibility> {
    let against: &[(u32, &Value)] = if mode.transitive() {
        earlier
    } else {
        earlier.last().map_or(&[], std::slice::from_ref)
    };
    let mut found = Vec::new();
    for &(version, old) in against {
        if mode.backward() {
            found.extend(incompatibilities(old, new).into_iter().map(|difference| {
                Incompatibility {
                    against: version,
                    direction: Direction::Backward,
                    difference,
                }
            }));
        }
        if mode.forward() {
            found.extend(incompatibilities(new, old).into_iter().map(|difference| {
                Incompatibility {
                    against: version,
                    direction: Direction::Forward,
                    difference,
                }
            }));
        }
    }
    found
}

/// A JSON pointer being built while walking down both schemas.
#[derive(Default)]
struct Pointer(Vec<String>);

impl Pointer {
    fn push(&mut self, token: &str) {
        self.0.push(token.replace('~', "~0").replace('/', "~1"));
    }

    fn pop(&mut self) {
        self.0.pop();
    }

    fn at(&self, keyword: Option<&str>) -> String {
        let mut pointer: String = self.0.iter().map(|t| format!("/{t}")).collect();
        if let Some(keyword) = keyword {
            pointer.push('/');
            pointer.push_str(keyword);
        }
        pointer
    }
}

/// Keywords that annotate a schema without constraining data.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$anchor",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];

const COMBINATORS: &[&str] = &["allOf", "anyOf", "oneOf"];

/// How a combination's members combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Criterion {
    All,
    Any,
    One,
}

impl Criterion {
    fn of(keyword: &str) -> Criterion {
        match keyword {
            "allOf" => Criterion::All,
            "anyOf" => Criterion::Any,
            _ => Criterion::One,
        }
    }
}

/// A schema node, normalised the way Confluent's parser sees it.
enum Node {
    /// Accepts everything (`true`, `{}`).
    Empty,
    /// Accepts nothing (`false`).
    False,
    /// `allOf`/`anyOf`/`oneOf`, a `type` list (an `anyOf` of one type each) or a combinator
    /// next to other keywords (an `allOf` of both).
    Combined(Criterion, Vec<Value>),
    /// One type's constraints.
    Simple(Map<String, Value>),
}

/// The type a simple node constrains data to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Number,
    Boolean,
    Null,
    Object,
    Array,
    /// An `enum` or `const` without a type.
    Enum,
    /// No constraint on the type.
    Any,
}

fn normalise(schema: &Value) -> Node {
    let map = match schema {
        Value::Bool(false) => return Node::False,
        Value::Object(map) => map,
        // The registry validates schemas first; anything else constrains nothing.
        _ => return Node::Empty,
    };
    let constraints: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !ANNOTATIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if constraints.is_empty() {
        return Node::Empty;
    }
    let combinators: Vec<&String> = constraints
        .keys()
        .filter(|k| COMBINATORS.contains(&k.as_str()))
        .collect();
    if combinators.len() == 1 && constraints.len() == 1 {
        let keyword = combinators[0];
        let members = constraints[keyword].as_array().cloned().unwrap_or_default();
        return Node::Combined(Criterion::of(keyword), members);
    }
    if !combinators.is_empty() {
        let mut rest = constraints.clone();
        let mut members = Vec::new();
        for keyword in COMBINATORS {
            if let Some(value) = rest.remove(*keyword) {
                members.push(Value::Object(Map::from_iter([(
                    keyword.to_string(),
                    value,
                )])));
            }
        }
        members.insert(0, Value::Object(rest));
        return Node::Combined(Criterion::All, members);
    }
    if let Some(Value::Array(types)) = constraints.get("type") {
        let mut types: Vec<Value> = types.clone();
        types.dedup();
        if types.len() == 1 {
            let mut single = constraints.clone();
            single.insert("type".into(), types.remove(0));
            return Node::Simple(single);
        }
        let members = types
            .into_iter()
            .map(|t| {
                let mut single = constraints.clone();
                single.insert("type".into(), t);
                Value::Object(single)
            })
            .collect();
        return Node::Combined(Criterion::Any, members);
    }
    Node::Simple(constraints)
}

fn kind(map: &Map<String, Value>) -> Kind {
    let has = |keys: &[&str]| keys.iter().any(|k| map.contains_key(*k));
    match map.get("type").and_then(Value::as_str) {
        Some("string") => Kind::String,
        Some("number" | "integer") => Kind::Number,
        Some("boolean") => Kind::Boolean,
        Some("null") => Kind::Null,
        Some("object") => Kind::Object,
        Some("array") => Kind::Array,
        _ if has(&[
            "properties",
            "required",
            "additionalProperties",
            "patternProperties",
            "maxProperties",
            "minProperties",
        ]) =>
        {
            Kind::Object
        }
        _ if has(&[
            "items",
            "prefixItems",
            "maxItems",
            "minItems",
            "uniqueItems",
        ]) =>
        {
            Kind::Array
        }
        _ if has(&["maxLength", "minLength", "pattern"]) => Kind::String,
        _ if has(&[
            "maximum",
            "minimum",
            "exclusiveMaximum",
            "exclusiveMinimum",
            "multipleOf",
        ]) =>
        {
            Kind::Number
        }
        _ if has(&["enum", "const"]) => Kind::Enum,
        _ => Kind::Any,
    }
}

struct Diff<'a> {
    writer_root: &'a Value,
    reader_root: &'a Value,
    /// The `$ref` pairs being compared further up: a recursive schema stops here.
    refs: Vec<(String, String)>,
}

fn all_compatible(found: &[Difference]) -> bool {
    found.iter().all(Difference::is_compatible)
}

/// The target of a local `$ref` (`#/$defs/x`), or the schema itself.
fn resolve<'v>(root: &'v Value, schema: &'v Value) -> (&'v Value, Option<String>) {
    let mut current = schema;
    let mut seen = None;
    // A chain of references, bounded so that a cycle of pure references ends.
    for _ in 0..16 {
        let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
            break;
        };
        let Some(target) = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
        else {
            break;
        };
        seen = Some(reference.to_string());
        current = target;
    }
    (current, seen)
}

impl Diff<'_> {
    fn compare(
        &mut self,
        writer: &Value,
        reader: &Value,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let (writer, writer_ref) = resolve(self.writer_root, writer);
        let (reader, reader_ref) = resolve(self.reader_root, reader);
        let pair = (writer_ref, reader_ref);
        let recursive = pair.0.is_some() || pair.1.is_some();
        if recursive {
            let key = (
                pair.0.clone().unwrap_or_default(),
                pair.1.clone().unwrap_or_default(),
            );
            if self.refs.contains(&key) {
                return;
            }
            self.refs.push(key);
        }
        self.compare_nodes(normalise(writer), normalise(reader), at, out);
        if recursive {
            self.refs.pop();
        }
    }

    fn compare_nodes(
        &mut self,
        writer: Node,
        reader: Node,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let here = at.at(None);
        let add = |kind: DifferenceKind, out: &mut Vec<Difference>| {
            out.push(Difference {
                kind,
                pointer: here.clone(),
            })
        };
        match (&writer, &reader) {
            (Node::False, _) | (_, Node::Empty) => return,
            (Node::Combined(wc, wm), Node::Combined(rc, rm)) => {
                return self.compare_combined(*wc, wm, *rc, rm, at, out);
            }
            (_, Node::Combined(criterion, members)) => {
                // One schema became a combination: fine when one member reads what it read.
                if members.len() == 1 || *criterion != Criterion::All {
                    let writer_value = node_value(&writer);
                    for member in members {
                        let mut sub = Vec::new();
                        self.compare(&writer_value, member, at, &mut sub);
                        if all_compatible(&sub) {
                            out.append(&mut sub);
                            if members.len() > 1 {
                                add(DifferenceKind::SumTypeExtended, out);
                            }
                            return;
                        }
                    }
                }
                add(DifferenceKind::TypeChanged, out);
                return;
            }
            (Node::Combined(_, members), _) => {
                if let [member] = members.as_slice() {
                    let reader_value = node_value(&reader);
                    let mut sub = Vec::new();
                    self.compare(member, &reader_value, at, &mut sub);
                    if all_compatible(&sub) {
                        out.append(&mut sub);
                        return;
                    }
                }
                add(DifferenceKind::TypeChanged, out);
                return;
            }
            _ => {}
        }
        let (Node::Simple(w), Node::Simple(r)) = (writer, reader) else {
            // The writer accepts anything (or the reader nothing): the reader constrains more.
            add(DifferenceKind::TypeChanged, out);
            return;
        };
        let (writer_kind, reader_kind) = (kind(&w), kind(&r));
        if reader_kind == Kind::Any {
            // Only `enum`/`format`-free keywords of no type: compare what enums there are.
            compare_enum(&w, &r, at, out);
            return;
        }
        if writer_kind != reader_kind && writer_kind != Kind::Enum && reader_kind != Kind::Enum {
            add(DifferenceKind::TypeChanged, out);
            return;
        }
        if writer_kind == Kind::Enum
            && reader_kind != Kind::Enum
            && allowed_values(&r).is_none()
            && !allowed_values(&w)
                .unwrap_or_default()
                .iter()
                .all(|value| reader_accepts_type(&r, reader_kind, value))
        {
            add(DifferenceKind::TypeChanged, out);
            return;
        }
        compare_enum(&w, &r, at, out);
        if writer_kind != reader_kind {
            return;
        }
        match writer_kind {
            Kind::String => compare_string(&w, &r, at, out),
            Kind::Number => compare_number(&w, &r, at, out),
            Kind::Object => self.compare_object(&w, &r, at, out),
            Kind::Array => self.compare_array(&w, &r, at, out),
            Kind::Boolean | Kind::Null | Kind::Enum | Kind::Any => {}
        }
    }

    fn compare_combined(
        &mut self,
        writer_criterion: Criterion,
        writer: &[Value],
        reader_criterion: Criterion,
        reader: &[Value],
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let here = at.at(None);
        let add = |kind: DifferenceKind, out: &mut Vec<Difference>| {
            out.push(Difference {
                kind,
                pointer: here.clone(),
            })
        };
        if writer_criterion != reader_criterion {
            let extended = match reader_criterion {
                Criterion::Any => true,
                Criterion::One => writer.len() == 1,
                Criterion::All => writer.len() == 1 && reader.len() == 1,
            };
            if extended {
                add(DifferenceKind::CombinedTypeExtended, out);
            } else {
                add(DifferenceKind::CombinedTypeChanged, out);
                return;
            }
        }
        let mut writer_members: Vec<&Value> = Vec::new();
        for member in writer {
            if !writer_members.contains(&member) {
                writer_members.push(member);
            }
        }
        let mut reader_members: Vec<&Value> = Vec::new();
        for member in reader {
            if !reader_members.contains(&member) {
                reader_members.push(member);
            }
        }
        let product = reader_criterion == Criterion::All;
        match writer_members.len().cmp(&reader_members.len()) {
            std::cmp::Ordering::Less => add(
                if product {
                    DifferenceKind::ProductTypeExtended
                } else {
                    DifferenceKind::SumTypeExtended
                },
                out,
            ),
            std::cmp::Ordering::Greater => add(
                if product {
                    DifferenceKind::ProductTypeNarrowed
                } else {
                    DifferenceKind::SumTypeNarrowed
                },
                out,
            ),
            std::cmp::Ordering::Equal => {}
        }
        // Which writer member each reader member reads compatibly, then a maximum matching.
        let keyword = match writer_criterion {
            Criterion::All => "allOf",
            Criterion::Any => "anyOf",
            Criterion::One => "oneOf",
        };
        let mut edges: Vec<Vec<(usize, Vec<Difference>)>> = Vec::new();
        for (index, writer_member) in writer_members.iter().enumerate() {
            at.push(keyword);
            at.push(&index.to_string());
            let mut compatible = Vec::new();
            for (reader_index, reader_member) in reader_members.iter().enumerate() {
                let mut sub = Vec::new();
                self.compare(writer_member, reader_member, at, &mut sub);
                if all_compatible(&sub) {
                    compatible.push((reader_index, sub));
                }
            }
            at.pop();
            at.pop();
            edges.push(compatible);
        }
        let matching = maximum_matching(&edges, reader_members.len());
        for (writer_index, reader_index) in matching.iter().enumerate() {
            if let Some(reader_index) = reader_index
                && let Some((_, found)) = edges[writer_index]
                    .iter()
                    .find(|(candidate, _)| candidate == reader_index)
            {
                out.extend(found.iter().cloned());
            }
        }
        let matched = matching.iter().filter(|m| m.is_some()).count();
        if matched < writer_members.len().min(reader_members.len()) {
            add(DifferenceKind::CombinedTypeSubschemasChanged, out);
        }
    }

    fn compare_object(
        &mut self,
        writer: &Map<String, Value>,
        reader: &Map<String, Value>,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let empty = Map::new();
        let writer_properties = writer
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let reader_properties = reader
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let writer_required = required(writer);
        let reader_required = required(reader);
        let has_default = |schema: &Value| {
            let (schema, _) = resolve(self.reader_root, schema);
            schema.get("default").is_some()
        };

        for name in writer_properties.keys() {
            let Some(reader_property) = reader_properties.get(name) else {
                continue;
            };
            let (was, is) = (
                writer_required.contains(name),
                reader_required.contains(name),
            );
            let kind = match (was, is) {
                (true, false) => DifferenceKind::RequiredAttributeRemoved,
                (false, true) if has_default(reader_property) => {
                    DifferenceKind::RequiredAttributeWithDefaultAdded
                }
                (false, true) => DifferenceKind::RequiredAttributeAdded,
                _ => continue,
            };
            out.push(Difference {
                kind,
                pointer: format!("{}/{}", at.at(Some("required")), escape(name)),
            });
        }

        let names: BTreeSet<&String> = writer_properties
            .keys()
            .chain(reader_properties.keys())
            .collect();
        at.push("properties");
        for name in names {
            at.push(name);
            let pointer = at.at(None);
            let add = |kind: DifferenceKind, out: &mut Vec<Difference>| {
                out.push(Difference {
                    kind,
                    pointer: pointer.clone(),
                })
            };
            match (writer_properties.get(name), reader_properties.get(name)) {
                (Some(writer_property), Some(reader_property)) => {
                    self.compare(writer_property, reader_property, at, out);
                }
                (Some(writer_property), None) => match content_model(reader, name) {
                    ContentModel::Open => {
                        add(DifferenceKind::PropertyRemovedFromOpenContentModel, out)
                    }
                    ContentModel::Partial(schema) => {
                        let mut sub = Vec::new();
                        self.compare_with_roots(
                            writer_property,
                            &schema,
                            Side::Reader,
                            at,
                            &mut sub,
                        );
                        let covered = all_compatible(&sub);
                        out.append(&mut sub);
                        add(
                            if covered {
                                DifferenceKind::PropertyRemovedIsCoveredByPartiallyOpenContentModel
                            } else {
                                DifferenceKind::PropertyRemovedNotCoveredByPartiallyOpenContentModel
                            },
                            out,
                        );
                    }
                    ContentModel::Closed => add(
                        if *writer_property == Value::Bool(false) {
                            DifferenceKind::PropertyWithFalseRemovedFromClosedContentModel
                        } else {
                            DifferenceKind::PropertyRemovedFromClosedContentModel
                        },
                        out,
                    ),
                },
                (None, Some(reader_property)) => match content_model(writer, name) {
                    ContentModel::Open => {
                        let empty_schema = matches!(
                            normalise(resolve(self.reader_root, reader_property).0),
                            Node::Empty
                        );
                        add(
                            if empty_schema {
                                DifferenceKind::PropertyWithEmptySchemaAddedToOpenContentModel
                            } else {
                                DifferenceKind::PropertyAddedToOpenContentModel
                            },
                            out,
                        );
                    }
                    unopen => {
                        if let ContentModel::Partial(schema) = unopen {
                            let mut sub = Vec::new();
                            self.compare_with_roots(
                                &schema,
                                reader_property,
                                Side::Writer,
                                at,
                                &mut sub,
                            );
                            let covered = all_compatible(&sub);
                            out.append(&mut sub);
                            add(
                                if covered {
                                    DifferenceKind::PropertyAddedIsCoveredByPartiallyOpenContentModel
                                } else {
                                    DifferenceKind::PropertyAddedNotCoveredByPartiallyOpenContentModel
                                },
                                out,
                            );
                        }
                        add(
                            if !reader_required.contains(name) {
                                DifferenceKind::OptionalPropertyAddedToUnopenContentModel
                            } else if has_default(reader_property) {
                                DifferenceKind::RequiredPropertyWithDefaultAddedToUnopenContentModel
                            } else {
                                DifferenceKind::RequiredPropertyAddedToUnopenContentModel
                            },
                            out,
                        );
                    }
                },
                (None, None) => {}
            }
            at.pop();
        }
        at.pop();

        self.compare_additional(writer, reader, "additionalProperties", at, out);
        let limits = [
            (
                "maxProperties",
                [
                    DifferenceKind::MaxPropertiesAdded,
                    DifferenceKind::MaxPropertiesRemoved,
                    DifferenceKind::MaxPropertiesIncreased,
                    DifferenceKind::MaxPropertiesDecreased,
                ],
            ),
            (
                "minProperties",
                [
                    DifferenceKind::MinPropertiesAdded,
                    DifferenceKind::MinPropertiesRemoved,
                    DifferenceKind::MinPropertiesIncreased,
                    DifferenceKind::MinPropertiesDecreased,
                ],
            ),
        ];
        for (keyword, kinds) in limits {
            compare_limit(writer, reader, keyword, kinds, at, out);
        }
    }

    /// Compares `additionalProperties` (objects) or the items past a tuple (arrays).
    fn compare_additional(
        &mut self,
        writer: &Map<String, Value>,
        reader: &Map<String, Value>,
        keyword: &str,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let kinds = if keyword == "additionalProperties" {
            [
                DifferenceKind::AdditionalPropertiesAdded,
                DifferenceKind::AdditionalPropertiesRemoved,
                DifferenceKind::AdditionalPropertiesNarrowed,
                DifferenceKind::AdditionalPropertiesExtended,
            ]
        } else {
            [
                DifferenceKind::AdditionalItemsAdded,
                DifferenceKind::AdditionalItemsRemoved,
                DifferenceKind::AdditionalItemsNarrowed,
                DifferenceKind::AdditionalItemsExtended,
            ]
        };
        let writer_additional = additional(writer.get(keyword));
        let reader_additional = additional(reader.get(keyword));
        at.push(keyword);
        let pointer = at.at(None);
        let add = |kind: DifferenceKind, out: &mut Vec<Difference>| {
            out.push(Difference {
                kind,
                pointer: pointer.clone(),
            })
        };
        match (writer_additional, reader_additional) {
            (Additional::Forbidden, Additional::Forbidden) | (Additional::Any, Additional::Any) => {
            }
            (Additional::Forbidden, _) => add(kinds[0], out),
            (_, Additional::Forbidden) => add(kinds[1], out),
            (Additional::Any, Additional::Schema(_)) => add(kinds[2], out),
            (Additional::Schema(_), Additional::Any) => add(kinds[3], out),
            (Additional::Schema(w), Additional::Schema(r)) => self.compare(w, r, at, out),
        }
        at.pop();
    }

    fn compare_array(
        &mut self,
        writer: &Map<String, Value>,
        reader: &Map<String, Value>,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let tuple = writer.contains_key("prefixItems") || reader.contains_key("prefixItems");
        if tuple {
            self.compare_tuple(writer, reader, at, out);
            self.compare_additional(writer, reader, "items", at, out);
        } else {
            at.push("items");
            match (writer.get("items"), reader.get("items")) {
                (None, None) => {}
                (Some(_), None) => out.push(Difference {
                    kind: DifferenceKind::SchemaRemoved,
                    pointer: at.at(None),
                }),
                (None, Some(_)) => out.push(Difference {
                    kind: DifferenceKind::SchemaAdded,
                    pointer: at.at(None),
                }),
                (Some(w), Some(r)) => self.compare(w, r, at, out),
            }
            at.pop();
        }
        let limits = [
            (
                "maxItems",
                [
                    DifferenceKind::MaxItemsAdded,
                    DifferenceKind::MaxItemsRemoved,
                    DifferenceKind::MaxItemsIncreased,
                    DifferenceKind::MaxItemsDecreased,
                ],
            ),
            (
                "minItems",
                [
                    DifferenceKind::MinItemsAdded,
                    DifferenceKind::MinItemsRemoved,
                    DifferenceKind::MinItemsIncreased,
                    DifferenceKind::MinItemsDecreased,
                ],
            ),
        ];
        for (keyword, kinds) in limits {
            compare_limit(writer, reader, keyword, kinds, at, out);
        }
        let unique = |map: &Map<String, Value>| map.get("uniqueItems") == Some(&Value::Bool(true));
        match (unique(writer), unique(reader)) {
            (true, false) => out.push(Difference {
                kind: DifferenceKind::UniqueItemsRemoved,
                pointer: at.at(Some("uniqueItems")),
            }),
            (false, true) => out.push(Difference {
                kind: DifferenceKind::UniqueItemsAdded,
                pointer: at.at(Some("uniqueItems")),
            }),
            _ => {}
        }
    }

    fn compare_tuple(
        &mut self,
        writer: &Map<String, Value>,
        reader: &Map<String, Value>,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let items = |map: &Map<String, Value>| {
            map.get("prefixItems")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (writer_items, reader_items) = (items(writer), items(reader));
        at.push("prefixItems");
        for index in 0..writer_items.len().max(reader_items.len()) {
            at.push(&index.to_string());
            let pointer = at.at(None);
            let add = |kind: DifferenceKind, out: &mut Vec<Difference>| {
                out.push(Difference {
                    kind,
                    pointer: pointer.clone(),
                })
            };
            match (writer_items.get(index), reader_items.get(index)) {
                (Some(w), Some(r)) => self.compare(w, r, at, out),
                (Some(w), None) => match additional(reader.get("items")) {
                    Additional::Any => add(DifferenceKind::ItemRemovedFromOpenContentModel, out),
                    Additional::Schema(schema) => {
                        let mut sub = Vec::new();
                        self.compare_with_roots(w, schema, Side::Reader, at, &mut sub);
                        let covered = all_compatible(&sub);
                        out.append(&mut sub);
                        add(
                            if covered {
                                DifferenceKind::ItemRemovedIsCoveredByPartiallyOpenContentModel
                            } else {
                                DifferenceKind::ItemRemovedNotCoveredByPartiallyOpenContentModel
                            },
                            out,
                        );
                    }
                    Additional::Forbidden => add(
                        if *w == Value::Bool(false) {
                            DifferenceKind::ItemWithFalseRemovedFromClosedContentModel
                        } else {
                            DifferenceKind::ItemRemovedFromClosedContentModel
                        },
                        out,
                    ),
                },
                (None, Some(r)) => match additional(writer.get("items")) {
                    Additional::Any => add(
                        if matches!(normalise(resolve(self.reader_root, r).0), Node::Empty) {
                            DifferenceKind::ItemWithEmptySchemaAddedToOpenContentModel
                        } else {
                            DifferenceKind::ItemAddedToOpenContentModel
                        },
                        out,
                    ),
                    Additional::Schema(schema) => {
                        let mut sub = Vec::new();
                        self.compare_with_roots(schema, r, Side::Writer, at, &mut sub);
                        let covered = all_compatible(&sub);
                        out.append(&mut sub);
                        add(
                            if covered {
                                DifferenceKind::ItemAddedIsCoveredByPartiallyOpenContentModel
                            } else {
                                DifferenceKind::ItemAddedNotCoveredByPartiallyOpenContentModel
                            },
                            out,
                        );
                    }
                    Additional::Forbidden => {
                        add(DifferenceKind::ItemAddedToClosedContentModel, out)
                    }
                },
                (None, None) => {}
            }
            at.pop();
        }
        at.pop();
    }

    /// Compares two schemas that both come from one side's document (a property of that side
    /// with that side's additional-properties schema), resolving references in that document.
    fn compare_with_roots(
        &mut self,
        writer: &Value,
        reader: &Value,
        both_from: Side,
        at: &mut Pointer,
        out: &mut Vec<Difference>,
    ) {
        let (writer_root, reader_root) = (self.writer_root, self.reader_root);
        let root = match both_from {
            Side::Writer => writer_root,
            Side::Reader => reader_root,
        };
        let mut inner = Diff {
            writer_root: root,
            reader_root: root,
            refs: std::mem::take(&mut self.refs),
        };
        inner.compare(writer, reader, at, out);
        self.refs = inner.refs;
    }
}

/// Which schema document a subschema comes from.
#[derive(Clone, Copy)]
enum Side {
    Writer,
    Reader,
}

/// What an object allows beyond its declared properties, for one property name.
enum ContentModel {
    Open,
    Closed,
    Partial(Value),
}

fn content_model(object: &Map<String, Value>, name: &str) -> ContentModel {
    let patterns = object.get("patternProperties").and_then(Value::as_object);
    if let Some(patterns) = patterns {
        for (pattern, schema) in patterns {
            // A pattern the regex engine refuses matches nothing here (the registry compiled
            // it already, with the validator's own engine).
            if regex::Regex::new(pattern).is_ok_and(|re| re.is_match(name)) {
                return ContentModel::Partial(schema.clone());
            }
        }
    }
    match additional(object.get("additionalProperties")) {
        Additional::Forbidden => ContentModel::Closed,
        Additional::Schema(schema) => ContentModel::Partial(schema.clone()),
        Additional::Any if patterns.is_some_and(|p| !p.is_empty()) => {
            ContentModel::Partial(Value::Bool(true))
        }
        Additional::Any => ContentModel::Open,
    }
}

/// `additionalProperties` (or the items past a tuple).
enum Additional<'v> {
    /// Absent, `true` or `{}`.
    Any,
    /// `false`.
    Forbidden,
    /// A schema.
    Schema(&'v Value),
}

fn additional(value: Option<&Value>) -> Additional<'_> {
    match value {
        None | Some(Value::Bool(true)) => Additional::Any,
        Some(Value::Bool(false)) => Additional::Forbidden,
        Some(Value::Object(map)) if map.is_empty() => Additional::Any,
        Some(schema) => Additional::Schema(schema),
    }
}

fn required(object: &Map<String, Value>) -> BTreeSet<String> {
    object
        .get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A simple node rebuilt as a value, to compare it with the members of a combination.
fn node_value(node: &Node) -> Value {
    match node {
        Node::Empty => Value::Bool(true),
        Node::False => Value::Bool(false),
        Node::Simple(map) => Value::Object(map.clone()),
        Node::Combined(criterion, members) => {
            let keyword = match criterion {
                Criterion::All => "allOf",
                Criterion::Any => "anyOf",
                Criterion::One => "oneOf",
            };
            Value::Object(Map::from_iter([(
                keyword.to_string(),
                Value::Array(members.clone()),
            )]))
        }
    }
}

/// Whether `value` has the type a reader of `kind` (its keywords in `reader`) declares.
fn reader_accepts_type(reader: &Map<String, Value>, kind: Kind, value: &Value) -> bool {
    match (kind, value) {
        (Kind::String, Value::String(_))
        | (Kind::Boolean, Value::Bool(_))
        | (Kind::Null, Value::Null)
        | (Kind::Object, Value::Object(_))
        | (Kind::Array, Value::Array(_)) => true,
        (Kind::Number, Value::Number(n)) => {
            reader.get("type").and_then(Value::as_str) != Some("integer")
                || n.is_i64()
                || n.is_u64()
        }
        _ => false,
    }
}

/// The allowed values: `enum`, or `const` as an enum of one.
fn allowed_values(map: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(values) = map.get("enum").and_then(Value::as_array) {
        return Some(values.clone());
    }
    map.get("const").map(|value| vec![value.clone()])
}

fn compare_enum(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    at: &Pointer,
    out: &mut Vec<Difference>,
) {
    let kind = match (allowed_values(writer), allowed_values(reader)) {
        (None, None) => return,
        (Some(_), None) => DifferenceKind::EnumArrayExtended,
        (None, Some(_)) => DifferenceKind::EnumArrayNarrowed,
        (Some(w), Some(r)) => {
            let reader_has_all = w.iter().all(|v| r.contains(v));
            let writer_has_all = r.iter().all(|v| w.contains(v));
            match (reader_has_all, writer_has_all) {
                (true, true) => return,
                (true, false) => DifferenceKind::EnumArrayExtended,
                (false, true) => DifferenceKind::EnumArrayNarrowed,
                (false, false) => DifferenceKind::EnumArrayChanged,
            }
        }
    };
    out.push(Difference {
        kind,
        pointer: at.at(Some("enum")),
    });
}

/// Compares a numeric bound; `kinds` are its added, removed, increased and decreased kinds.
fn compare_limit(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    keyword: &str,
    kinds: [DifferenceKind; 4],
    at: &Pointer,
    out: &mut Vec<Difference>,
) {
    let number = |map: &Map<String, Value>| map.get(keyword).and_then(Value::as_f64);
    let kind = match (number(writer), number(reader)) {
        (None, None) => return,
        (None, Some(_)) => kinds[0],
        (Some(_), None) => kinds[1],
        (Some(w), Some(r)) if w < r => kinds[2],
        (Some(w), Some(r)) if w > r => kinds[3],
        _ => return,
    };
    out.push(Difference {
        kind,
        pointer: at.at(Some(keyword)),
    });
}

fn compare_string(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    at: &Pointer,
    out: &mut Vec<Difference>,
) {
    use DifferenceKind as K;
    compare_limit(
        writer,
        reader,
        "maxLength",
        [
            K::MaxLengthAdded,
            K::MaxLengthRemoved,
            K::MaxLengthIncreased,
            K::MaxLengthDecreased,
        ],
        at,
        out,
    );
    compare_limit(
        writer,
        reader,
        "minLength",
        [
            K::MinLengthAdded,
            K::MinLengthRemoved,
            K::MinLengthIncreased,
            K::MinLengthDecreased,
        ],
        at,
        out,
    );
    let kind = match (writer.get("pattern"), reader.get("pattern")) {
        (None, Some(_)) => K::PatternAdded,
        (Some(_), None) => K::PatternRemoved,
        (Some(w), Some(r)) if w != r => K::PatternChanged,
        _ => return,
    };
    out.push(Difference {
        kind,
        pointer: at.at(Some("pattern")),
    });
}

fn compare_number(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    at: &Pointer,
    out: &mut Vec<Difference>,
) {
    use DifferenceKind as K;
    let bounds = [
        (
            "maximum",
            [
                K::MaximumAdded,
                K::MaximumRemoved,
                K::MaximumIncreased,
                K::MaximumDecreased,
            ],
        ),
        (
            "minimum",
            [
                K::MinimumAdded,
                K::MinimumRemoved,
                K::MinimumIncreased,
                K::MinimumDecreased,
            ],
        ),
        (
            "exclusiveMaximum",
            [
                K::ExclusiveMaximumAdded,
                K::ExclusiveMaximumRemoved,
                K::ExclusiveMaximumIncreased,
                K::ExclusiveMaximumDecreased,
            ],
        ),
        (
            "exclusiveMinimum",
            [
                K::ExclusiveMinimumAdded,
                K::ExclusiveMinimumRemoved,
                K::ExclusiveMinimumIncreased,
                K::ExclusiveMinimumDecreased,
            ],
        ),
    ];
    for (keyword, kinds) in bounds {
        compare_limit(writer, reader, keyword, kinds, at, out);
    }
    let multiple = |map: &Map<String, Value>| map.get("multipleOf").and_then(Value::as_f64);
    let kind = match (multiple(writer), multiple(reader)) {
        (None, None) => None,
        (None, Some(_)) => Some(K::MultipleOfAdded),
        (Some(_), None) => Some(K::MultipleOfRemoved),
        (Some(w), Some(r)) if w == r => None,
        (Some(w), Some(r)) if is_multiple(r, w) => Some(K::MultipleOfExpanded),
        (Some(w), Some(r)) if is_multiple(w, r) => Some(K::MultipleOfReduced),
        _ => Some(K::MultipleOfChanged),
    };
    if let Some(kind) = kind {
        out.push(Difference {
            kind,
            pointer: at.at(Some("multipleOf")),
        });
    }
    let integer =
        |map: &Map<String, Value>| map.get("type").and_then(Value::as_str) == Some("integer");
    match (integer(writer), integer(reader)) {
        (true, false) => out.push(Difference {
            kind: K::TypeExtended,
            pointer: at.at(Some("type")),
        }),
        (false, true) => out.push(Difference {
            kind: K::TypeNarrowed,
            pointer: at.at(Some("type")),
        }),
        _ => {}
    }
}

/// Whether `a` is a whole multiple of `b`.
fn is_multiple(a: f64, b: f64) -> bool {
    b != 0.0 && (a / b).fract() == 0.0
}

/// A maximum matching of writer members to reader members (Kuhn's augmenting paths; the
/// combinations are a handful of members). `edges[w]` lists the reader members `w` may
/// match; the result gives each writer member its reader member.
fn maximum_matching(edges: &[Vec<(usize, Vec<Difference>)>], readers: usize) -> Vec<Option<usize>> {
    fn augment(
        writer: usize,
        edges: &[Vec<(usize, Vec<Difference>)>],
        seen: &mut [bool],
        reader_of: &mut [Option<usize>],
    ) -> bool {
        for (reader, _) in &edges[writer] {
            if seen[*reader] {
                continue;
            }
            seen[*reader] = true;
            if reader_of[*reader].is_none_or(|other| augment(other, edges, seen, reader_of)) {
                reader_of[*reader] = Some(writer);
                return true;
            }
        }
        false
    }
    let mut reader_of = vec![None; readers];
    for writer in 0..edges.len() {
        let mut seen = vec![false; readers];
        augment(writer, edges, &mut seen, &mut reader_of);
    }
    let mut writer_to = vec![None; edges.len()];
    for (reader, writer) in reader_of.iter().enumerate() {
        if let Some(writer) = writer {
            writer_to[*writer] = Some(reader);
        }
    }
    writer_to
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds(writer: &Value, reader: &Value) -> Vec<(&'static str, String)> {
        differences(writer, reader)
            .into_iter()
            .map(|d| (d.kind.name(), d.pointer))
            .collect()
    }

    #[test]
    fn identical_schemas_have_no_difference() {
        let schema = json!({
            "type": "object",
            "properties": {"id": {"type": "string"}, "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}},
            "required": ["id"],
            "$defs": {"tag": {"type": "string", "maxLength": 10}}
        });
        assert_eq!(kinds(&schema, &schema), vec![]);
    }

    #[test]
    fn references_are_followed_on_each_side_and_recursion_stops() {
        let writer = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }}},
            "$ref": "#/$defs/node"
        });
        let reader = json!({
            "$defs": {"tree": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 5},
                "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}}
            }}},
            "$ref": "#/$defs/tree"
        });
        assert_eq!(
            kinds(&writer, &reader),
            vec![("MAX_LENGTH_ADDED", "/properties/name/maxLength".to_string())]
        );
    }

    #[test]
    fn combinations_match_members_one_to_one() {
        let writer = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        let wider =
            json!({"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "boolean"}]});
        assert_eq!(
            kinds(&writer, &wider),
            vec![("SUM_TYPE_EXTENDED", String::new())]
        );
        let narrower = json!({"oneOf": [{"type": "string"}]});
        let found = incompatibilities(&writer, &narrower);
        assert_eq!(found[0].kind, DifferenceKind::SumTypeNarrowed);
        let other = json!({"oneOf": [{"type": "string"}, {"type": "boolean"}]});
        assert_eq!(
            incompatibilities(&writer, &other)
                .iter()
                .map(|d| d.kind.name())
                .collect::<Vec<_>>(),
            vec!["COMBINED_TYPE_SUBSCHEMAS_CHANGED"]
        );
        let any = json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
        assert_eq!(
            kinds(&writer, &any),
            vec![("COMBINED_TYPE_EXTENDED", String::new())]
        );
        assert_eq!(
            incompatibilities(&any, &writer)[0].kind,
            DifferenceKind::CombinedTypeChanged
        );
    }

    #[test]
    fn tuples_follow_the_content_model_of_further_items() {
        let closed = json!({"type": "array", "prefixItems": [{"type": "string"}], "items": false});
        let closed_longer = json!({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": false});
        assert_eq!(
            kinds(&closed, &closed_longer),
            vec![(
                "ITEM_ADDED_TO_CLOSED_CONTENT_MODEL",
                "/prefixItems/1".to_string()
            )]
        );
        assert_eq!(
            kinds(&closed_longer, &closed),
            vec![(
                "ITEM_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                "/prefixItems/1".to_string()
            )]
        );
        let open = json!({"type": "array", "prefixItems": [{"type": "string"}]});
        let open_longer =
            json!({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]});
        assert_eq!(
            kinds(&open, &open_longer),
            vec![(
                "ITEM_ADDED_TO_OPEN_CONTENT_MODEL",
                "/prefixItems/1".to_string()
            )]
        );
    }

    #[test]
    fn pattern_properties_make_a_partially_open_object() {
        let writer = json!({"type": "object", "properties": {}, "patternProperties": {"^x_": {"type": "string"}}, "additionalProperties": false});
        let reader = json!({"type": "object", "properties": {"x_note": {"type": "string"}}, "patternProperties": {"^x_": {"type": "string"}}, "additionalProperties": false});
        assert_eq!(
            kinds(&writer, &reader),
            vec![
                (
                    "PROPERTY_ADDED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                    "/properties/x_note".to_string()
                ),
                (
                    "OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
                    "/properties/x_note".to_string()
                ),
            ]
        );
    }

    #[test]
    fn an_enum_without_a_type_is_read_by_a_type_that_holds_its_values() {
        let writer = json!({"enum": ["a", "b"]});
        assert_eq!(
            kinds(&writer, &json!({"type": "string"})),
            vec![("ENUM_ARRAY_EXTENDED", "/enum".to_string())]
        );
        assert_eq!(
            kinds(&writer, &json!({"type": "integer"})),
            vec![("TYPE_CHANGED", String::new())]
        );
        assert_eq!(
            kinds(
                &json!({"const": "a"}),
                &json!({"type": "string", "enum": ["a", "b"]})
            ),
            vec![("ENUM_ARRAY_EXTENDED", "/enum".to_string())]
        );
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        let writer = json!({"properties": {"a/b": {"type": "string"}}});
        let reader = json!({"properties": {"a/b": {"type": "integer"}}});
        assert_eq!(
            kinds(&writer, &reader),
            vec![("TYPE_CHANGED", "/properties/a~1b".to_string())]
        );
    }

    #[test]
    fn every_kind_has_a_distinct_upper_case_name() {
        let names: BTreeSet<&str> = DifferenceKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), DifferenceKind::ALL.len());
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        );
    }
}
