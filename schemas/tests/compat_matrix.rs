//! The compatibility matrix: each kind of change under each mode, with the verdict Confluent
//! Schema Registry documents for JSON Schema (see `ecst_schemas::compat` for the sources).

use ecst_schemas::compat::{self, Direction};
use ecst_schemas::registry::Compatibility;
use serde_json::{Value, json};

/// What one direction of a change gives: compatible, or the first rule broken and where.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Ok,
    Breaks(&'static str, &'static str),
}
use Verdict::{Breaks, Ok};

struct Change {
    name: &'static str,
    old: Value,
    new: Value,
    /// The new schema reading the old one's data.
    backward: Verdict,
    /// The old schema reading the new one's data.
    forward: Verdict,
}

fn object(properties: Value, extra: Value) -> Value {
    let mut schema = json!({"type": "object", "properties": properties});
    for (k, v) in extra.as_object().unwrap() {
        schema[k] = v.clone();
    }
    schema
}

fn changes() -> Vec<Change> {
    let closed = json!({"additionalProperties": false});
    let open = json!({});
    vec![
        Change {
            name: "add an optional property to an open object",
            old: object(json!({"id": {"type": "string"}}), open.clone()),
            new: object(
                json!({"id": {"type": "string"}, "nickname": {"type": "string"}}),
                open.clone(),
            ),
            backward: Breaks(
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                "/properties/nickname",
            ),
            forward: Ok,
        },
        Change {
            name: "add an optional property to a closed object",
            old: object(json!({"id": {"type": "string"}}), closed.clone()),
            new: object(
                json!({"id": {"type": "string"}, "nickname": {"type": "string"}}),
                closed.clone(),
            ),
            backward: Ok,
            forward: Breaks(
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                "/properties/nickname",
            ),
        },
        Change {
            name: "remove a property from an open object",
            old: object(
                json!({"id": {"type": "string"}, "nickname": {"type": "string"}}),
                open.clone(),
            ),
            new: object(json!({"id": {"type": "string"}}), open.clone()),
            backward: Ok,
            forward: Breaks(
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                "/properties/nickname",
            ),
        },
        Change {
            name: "remove an optional property from a closed object",
            old: object(
                json!({"id": {"type": "string"}, "nickname": {"type": "string"}}),
                closed.clone(),
            ),
            new: object(json!({"id": {"type": "string"}}), closed.clone()),
            backward: Breaks(
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                "/properties/nickname",
            ),
            forward: Ok,
        },
        Change {
            name: "add a required property to a closed object",
            old: object(
                json!({"id": {"type": "string"}}),
                json!({"additionalProperties": false, "required": ["id"]}),
            ),
            new: object(
                json!({"id": {"type": "string"}, "country": {"type": "string"}}),
                json!({"additionalProperties": false, "required": ["id", "country"]}),
            ),
            backward: Breaks(
                "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
                "/properties/country",
            ),
            forward: Breaks(
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                "/properties/country",
            ),
        },
        Change {
            name: "add a required property with a default to a closed object",
            old: object(json!({"id": {"type": "string"}}), closed.clone()),
            new: object(
                json!({"id": {"type": "string"}, "country": {"type": "string", "default": "GB"}}),
                json!({"additionalProperties": false, "required": ["country"]}),
            ),
            backward: Ok,
            forward: Breaks(
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                "/properties/country",
            ),
        },
        Change {
            name: "make an existing property required",
            old: object(json!({"name": {"type": "string"}}), open.clone()),
            new: object(
                json!({"name": {"type": "string"}}),
                json!({"required": ["name"]}),
            ),
            backward: Breaks("REQUIRED_ATTRIBUTE_ADDED", "/required/name"),
            forward: Ok,
        },
        Change {
            name: "change a property's type",
            old: object(json!({"age": {"type": "string"}}), open.clone()),
            new: object(json!({"age": {"type": "integer"}}), open.clone()),
            backward: Breaks("TYPE_CHANGED", "/properties/age"),
            forward: Breaks("TYPE_CHANGED", "/properties/age"),
        },
        Change {
            name: "widen integer to number",
            old: object(json!({"score": {"type": "integer"}}), open.clone()),
            new: object(json!({"score": {"type": "number"}}), open.clone()),
            backward: Ok,
            forward: Breaks("TYPE_NARROWED", "/properties/score/type"),
        },
        Change {
            name: "make a property nullable",
            old: object(json!({"email": {"type": "string"}}), open.clone()),
            new: object(json!({"email": {"type": ["string", "null"]}}), open.clone()),
            backward: Ok,
            forward: Breaks("TYPE_CHANGED", "/properties/email"),
        },
        Change {
            name: "narrow an enum",
            old: object(
                json!({"status": {"type": "string", "enum": ["active", "retired", "banned"]}}),
                open.clone(),
            ),
            new: object(
                json!({"status": {"type": "string", "enum": ["active", "retired"]}}),
                open.clone(),
            ),
            backward: Breaks("ENUM_ARRAY_NARROWED", "/properties/status/enum"),
            forward: Ok,
        },
        Change {
            name: "extend an enum",
            old: object(
                json!({"status": {"type": "string", "enum": ["active", "retired"]}}),
                open.clone(),
            ),
            new: object(
                json!({"status": {"type": "string", "enum": ["active", "retired", "banned"]}}),
                open.clone(),
            ),
            backward: Ok,
            forward: Breaks("ENUM_ARRAY_NARROWED", "/properties/status/enum"),
        },
        Change {
            name: "close an open object (additionalProperties: false)",
            old: object(json!({"id": {"type": "string"}}), open.clone()),
            new: object(json!({"id": {"type": "string"}}), closed.clone()),
            backward: Breaks("ADDITIONAL_PROPERTIES_REMOVED", "/additionalProperties"),
            forward: Ok,
        },
        Change {
            name: "open a closed object",
            old: object(json!({"id": {"type": "string"}}), closed.clone()),
            new: object(json!({"id": {"type": "string"}}), open.clone()),
            backward: Ok,
            forward: Breaks("ADDITIONAL_PROPERTIES_REMOVED", "/additionalProperties"),
        },
        Change {
            name: "constrain additional properties",
            old: object(json!({"id": {"type": "string"}}), open.clone()),
            new: object(
                json!({"id": {"type": "string"}}),
                json!({"additionalProperties": {"type": "string"}}),
            ),
            backward: Breaks("ADDITIONAL_PROPERTIES_NARROWED", "/additionalProperties"),
            forward: Ok,
        },
        Change {
            name: "add a property the additional properties cover",
            old: object(
                json!({"id": {"type": "string"}}),
                json!({"additionalProperties": {"type": "string"}}),
            ),
            new: object(
                json!({"id": {"type": "string"}, "city": {"type": "string"}}),
                json!({"additionalProperties": {"type": "string"}}),
            ),
            backward: Ok,
            forward: Ok,
        },
        Change {
            name: "add a property the additional properties do not cover",
            old: object(
                json!({"id": {"type": "string"}}),
                json!({"additionalProperties": {"type": "string"}}),
            ),
            new: object(
                json!({"id": {"type": "string"}, "rank": {"type": "integer"}}),
                json!({"additionalProperties": {"type": "string"}}),
            ),
            backward: Breaks("TYPE_CHANGED", "/properties/rank"),
            forward: Breaks("TYPE_CHANGED", "/properties/rank"),
        },
        Change {
            name: "decrease maxLength",
            old: object(
                json!({"name": {"type": "string", "maxLength": 100}}),
                open.clone(),
            ),
            new: object(
                json!({"name": {"type": "string", "maxLength": 50}}),
                open.clone(),
            ),
            backward: Breaks("MAX_LENGTH_DECREASED", "/properties/name/maxLength"),
            forward: Ok,
        },
        Change {
            name: "add a pattern",
            old: object(json!({"countryCode": {"type": "string"}}), open.clone()),
            new: object(
                json!({"countryCode": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
                open.clone(),
            ),
            backward: Breaks("PATTERN_ADDED", "/properties/countryCode/pattern"),
            forward: Ok,
        },
        Change {
            name: "change a pattern",
            old: object(
                json!({"countryCode": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
                open.clone(),
            ),
            new: object(
                json!({"countryCode": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
                open.clone(),
            ),
            backward: Breaks("PATTERN_CHANGED", "/properties/countryCode/pattern"),
            forward: Breaks("PATTERN_CHANGED", "/properties/countryCode/pattern"),
        },
        Change {
            name: "raise a minimum",
            old: object(
                json!({"age": {"type": "integer", "minimum": 0}}),
                open.clone(),
            ),
            new: object(
                json!({"age": {"type": "integer", "minimum": 18}}),
                open.clone(),
            ),
            backward: Breaks("MINIMUM_INCREASED", "/properties/age/minimum"),
            forward: Ok,
        },
        Change {
            name: "change a nested object's property type",
            old: object(
                json!({"address": {"type": "object", "properties": {"zip": {"type": "string"}}}}),
                open.clone(),
            ),
            new: object(
                json!({"address": {"type": "object", "properties": {"zip": {"type": "integer"}}}}),
                open.clone(),
            ),
            backward: Breaks("TYPE_CHANGED", "/properties/address/properties/zip"),
            forward: Breaks("TYPE_CHANGED", "/properties/address/properties/zip"),
        },
        Change {
            name: "change an array's item type",
            old: object(
                json!({"tags": {"type": "array", "items": {"type": "string"}}}),
                open.clone(),
            ),
            new: object(
                json!({"tags": {"type": "array", "items": {"type": "integer"}}}),
                open.clone(),
            ),
            backward: Breaks("TYPE_CHANGED", "/properties/tags/items"),
            forward: Breaks("TYPE_CHANGED", "/properties/tags/items"),
        },
        Change {
            name: "change only a description",
            old: object(
                json!({"id": {"type": "string", "description": "the id"}}),
                open.clone(),
            ),
            new: object(
                json!({"id": {"type": "string", "description": "the athlete's id"}}),
                open.clone(),
            ),
            backward: Ok,
            forward: Ok,
        },
    ]
}

/// The verdict Confluent's definition gives a mode from the two directions of one change.
fn expected(mode: Compatibility, change: &Change) -> Vec<(Direction, Verdict)> {
    let backward = (Direction::Backward, change.backward);
    let forward = (Direction::Forward, change.forward);
    let checks = match mode {
        Compatibility::Backward | Compatibility::BackwardTransitive => vec![backward],
        Compatibility::Forward | Compatibility::ForwardTransitive => vec![forward],
        Compatibility::Full | Compatibility::FullTransitive => vec![backward, forward],
        _ => vec![],
    };
    checks.into_iter().filter(|(_, v)| *v != Ok).collect()
}

#[test]
fn every_mode_gives_confluents_verdict_for_every_kind_of_change() {
    let mut failures = Vec::new();
    for change in changes() {
        for (mode_name, mode) in Compatibility::ALL {
            let found = compat::check(mode, &[(1, &change.old)], &change.new);
            let want = expected(mode, &change);
            let got_verdicts: Vec<(Direction, Verdict)> = [Direction::Backward, Direction::Forward]
                .into_iter()
                .filter_map(|direction| {
                    found.iter().find(|i| i.direction == direction).map(|i| {
                        let rule: &'static str = i.difference.kind.name();
                        (direction, rule, i.difference.pointer.clone())
                    })
                })
                .map(|(direction, rule, pointer)| {
                    (direction, Breaks(rule, Box::leak(pointer.into_boxed_str())))
                })
                .collect();
            if got_verdicts != want {
                failures.push(format!(
                    "{} under {mode_name}: expected {want:?}, got {got_verdicts:?} (all: {found:?})",
                    change.name
                ));
            }
            assert!(found.iter().all(|i| i.against == 1));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn transitive_modes_compare_with_every_earlier_version_and_the_others_with_the_previous() {
    // v1 -> v2 changed a type while the subject was NONE; v3 only adds an optional property to
    // the closed object, so it reads v2's data but not v1's.
    let v1 = object(
        json!({"zip": {"type": "string"}}),
        json!({"additionalProperties": false}),
    );
    let v2 = object(
        json!({"zip": {"type": "integer"}}),
        json!({"additionalProperties": false}),
    );
    let v3 = object(
        json!({"zip": {"type": "integer"}, "city": {"type": "string"}}),
        json!({"additionalProperties": false}),
    );
    let earlier = [(1, &v1), (2, &v2)];
    assert_eq!(
        compat::check(Compatibility::Backward, &earlier, &v3),
        vec![]
    );
    let found = compat::check(Compatibility::BackwardTransitive, &earlier, &v3);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].against, 1);
    assert_eq!(found[0].direction, Direction::Backward);
    assert_eq!(found[0].difference.kind.name(), "TYPE_CHANGED");
    assert_eq!(found[0].difference.pointer, "/properties/zip");

    // Forward: v3 removes the optional `city` of a closed v2; v1 had no `city` at all.
    let v3_forward = object(
        json!({"zip": {"type": "integer"}}),
        json!({"additionalProperties": false}),
    );
    let earlier = [(1, &v1), (2, &v3)];
    assert_eq!(
        compat::check(Compatibility::Forward, &earlier, &v3_forward),
        vec![],
        "removing an optional property of a closed object is forward compatible"
    );
    let found = compat::check(Compatibility::ForwardTransitive, &earlier, &v3_forward);
    assert_eq!(
        found
            .iter()
            .map(|i| (i.against, i.difference.kind.name()))
            .collect::<Vec<_>>(),
        vec![(1, "TYPE_CHANGED")]
    );
    // FULL_TRANSITIVE: both ways against v1; against v2, v3 dropped `city` of a closed object,
    // which v3 (as a reader) cannot read.
    let found = compat::check(Compatibility::FullTransitive, &earlier, &v3_forward);
    assert_eq!(
        found
            .iter()
            .map(|i| (i.against, i.direction, i.difference.kind.name()))
            .collect::<Vec<_>>(),
        vec![
            (1, Direction::Backward, "TYPE_CHANGED"),
            (1, Direction::Forward, "TYPE_CHANGED"),
            (
                2,
                Direction::Backward,
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"
            ),
        ]
    );
    assert_eq!(
        compat::check(Compatibility::None, &earlier, &v3_forward),
        vec![]
    );
}

#[test]
fn the_strictest_of_two_modes_asks_for_both() {
    use Compatibility::*;
    assert_eq!(Backward.strictest(Forward), Full);
    assert_eq!(Backward.strictest(BackwardTransitive), BackwardTransitive);
    assert_eq!(None.strictest(Forward), Forward);
    assert_eq!(ForwardTransitive.strictest(Backward), FullTransitive);
    assert_eq!(Full.strictest(None), Full);
}
