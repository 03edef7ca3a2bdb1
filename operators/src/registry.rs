//! The registry of stage types: each named once, with its config type and role. The
//! `stage_types!` table defines [`StageConfig`], [`STAGE_TYPES`] and every lookup by name.

use ecst_schemas::PayloadSelection;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::sinks::postgres::PostgresConfig;
use crate::sinks::redis_hash::RedisHashConfig;
use crate::stage::{
    BuildContext, BuildError, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, PayloadPath,
};
use crate::stages::claim_check::ClaimCheckConfig;
use crate::stages::decode::DecodeConfig;
use crate::stages::delta::DeltaConfig;
use crate::stages::fetch::FetchConfig;
use crate::stages::project::ProjectConfig;
use crate::stages::tombstone::TombstoneConfig;
use crate::stages::upcast::UpcastConfig;
use crate::stages::validate::ValidateConfig;
use crate::stages::version_filter::VersionFilterConfig;

/// Where a stage type sits in the DAG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageRole {
    /// Reads the source's entries; takes no `input`.
    Root,
    /// Records in, records out.
    Transform,
    /// A leaf that writes a replica.
    Sink,
}

impl StageRole {
    /// How `ecst stages` names the role.
    pub fn as_str(self) -> &'static str {
        match self {
            StageRole::Root => "root",
            StageRole::Transform => "transform",
            StageRole::Sink => "sink",
        }
    }
}

/// A stage type as `ecst stages` describes it.
#[derive(Debug, Clone, Copy)]
pub struct StageTypeDoc {
    /// The `type:` name.
    pub name: &'static str,
    /// Where it sits in the DAG.
    pub role: StageRole,
    /// What it does, from its registry line's doc comment.
    pub summary: &'static str,
    /// Its keys besides `type`, `input` and `inputs`.
    pub keys: &'static [KeyDoc],
}

/// The registry of stage types: each named once, with its config type and role. It defines
/// [`StageConfig`], [`STAGE_TYPES`] and every lookup by name.
macro_rules! stage_types {
    ($( $(#[doc = $doc:literal])* $name:literal => $variant:ident($config:ty), $role:ident; )+) => {
        /// Every stage type a pipeline file may name in `type:`.
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum StageConfig {
            $( $(#[doc = $doc])* $variant($config), )+
        }

        /// Names accepted in `type:`, with the role of each.
        pub const STAGE_REGISTRY: &[(&str, StageRole)] = &[$(($name, StageRole::$role)),+];

        /// Every stage type with its role, summary and keys.
        pub const STAGE_CATALOGUE: &[StageTypeDoc] = &[$(StageTypeDoc {
            name: $name,
            role: StageRole::$role,
            summary: concat!($($doc),*),
            keys: <$config as ComponentConfig>::KEYS,
        }),+];

        /// Names accepted in `type:`, for error messages.
        pub const STAGE_TYPES: &[&str] = &[$($name),+];

        impl StageConfig {
            /// Reads a stage's keys (without `type`, `input` and `inputs`) for the named type.
            /// `Ok(None)` means the type is unknown.
            pub fn from_type(
                type_name: &str,
                body: Value,
            ) -> Result<Option<Self>, StageConfigError> {
                Ok(Some(match type_name {
                    $($name => StageConfig::$variant(typed(body)?),)+
                    _ => return Ok(None),
                }))
            }

            /// The `type:` name.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(StageConfig::$variant(_) => $name,)+
                }
            }

            /// The payload members the stage reads (see [`ComponentConfig::payload_reads`]).
            pub fn payload_reads(&self, projected: bool) -> PayloadSelection {
                match self {
                    $(StageConfig::$variant(c) => c.payload_reads(projected),)+
                }
            }

            /// Whether the stage needs the pipeline's schema directory (`schemas:`).
            pub fn needs_schemas(&self) -> bool {
                match self {
                    $(StageConfig::$variant(c) => c.needs_schemas(),)+
                }
            }

            /// The payload paths the stage reads, with the key naming each.
            pub fn payload_paths(&self, projected: bool) -> Vec<PayloadPath> {
                match self {
                    $(StageConfig::$variant(c) => c.payload_paths(projected),)+
                }
            }

            /// Problems found without I/O (expressions that do not compile, bad templates).
            pub fn check(&self) -> Vec<ConfigProblem> {
                match self {
                    $(StageConfig::$variant(c) => c.problems(),)+
                }
            }

            /// Builds the running component.
            pub async fn build(&self, ctx: &BuildContext) -> Result<BuiltStage, BuildError> {
                let built = match self {
                    $(StageConfig::$variant(c) => c.build_component(ctx).await,)+
                };
                built.map_err(|message| BuildError {
                    stage: ctx.stage.clone(),
                    message,
                })
            }
        }
    };
}

stage_types! {
    /// Stream entry body to envelope.
    "decode" => Decode(DecodeConfig), Root;
    /// Drops events not newer than seen; coalesces versions in a batch.
    "version_filter" => VersionFilter(VersionFilterConfig), Transform;
    /// Applies a delete policy to tombstones.
    "tombstone" => Tombstone(TombstoneConfig), Transform;
    /// Checks payloads against the schema of their version.
    "validate" => Validate(ValidateConfig), Transform;
    /// Builds the replica record and filters with CEL.
    "project" => Project(ProjectConfig), Transform;
    /// Carries older payload schema versions up to the latest.
    "upcast" => Upcast(UpcastConfig), Transform;
    /// Resolves claim-checked payloads (payloadRef) from the claim store.
    "claim_check" => ClaimCheck(ClaimCheckConfig), Transform;
    /// Marks events carrying only changed fields as patches on a base version.
    "delta" => Delta(DeltaConfig), Transform;
    /// Fetches the current state of thin events from an endpoint.
    "fetch" => Fetch(FetchConfig), Transform;
    /// Writes Redis hashes behind a version guard.
    "redis_hash" => RedisHash(RedisHashConfig), Sink;
    /// Writes Postgres rows behind a version guard.
    "postgres" => Postgres(PostgresConfig), Sink;
}

fn role_of(type_name: &str) -> Option<StageRole> {
    STAGE_REGISTRY
        .iter()
        .find(|(name, _)| *name == type_name)
        .map(|(_, role)| *role)
}

/// Whether `type:` names a sink.
pub fn is_sink_type(type_name: &str) -> bool {
    role_of(type_name) == Some(StageRole::Sink)
}

/// Whether `type:` names a stage that reads the source.
pub fn is_root_type(type_name: &str) -> bool {
    role_of(type_name) == Some(StageRole::Root)
}

/// A stage's keys do not fit its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageConfigError {
    /// Dotted key path inside the stage (empty for the stage itself).
    pub path: Vec<String>,
    /// What serde said.
    pub message: String,
}

fn typed<T: DeserializeOwned>(body: Value) -> Result<T, StageConfigError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let mut path: Vec<String> = e
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                _ => None,
            })
            .collect();
        let message = e.into_inner().to_string();
        // Point at an unknown key itself, whether or not the path already names it.
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some(end) = rest.find('`')
            && path.last().map(String::as_str) != Some(&rest[..end])
        {
            path.push(rest[..end].to_string());
        }
        StageConfigError { path, message }
    })
}

impl StageConfig {
    /// Whether this stage is a sink (a DAG leaf that writes a replica).
    pub fn is_sink(&self) -> bool {
        is_sink_type(self.type_name())
    }

    /// Whether this stage replaces the records' fields by its projection.
    pub fn is_projection(&self) -> bool {
        matches!(self, StageConfig::Project(_))
    }

    /// Whether this stage reads the source directly (and so takes no `input`).
    pub fn is_root(&self) -> bool {
        is_root_type(self.type_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_type_reads_builds_its_own_variant_and_knows_its_role() {
        let minimal = |name: &str| match name {
            "project" => serde_json::json!({"fields": {"a": "payload.a"}}),
            "redis_hash" => serde_json::json!({"key": "k:{aggregateId}"}),
            "upcast" => serde_json::json!({"steps": [{"from": 1, "ops": [{"drop": "a"}]}]}),
            "fetch" => serde_json::json!({"url": "http://127.0.0.1:8081/snapshot"}),
            "postgres" => serde_json::json!({
                "url": "postgres://127.0.0.1/db", "table": "t", "key": "id",
                "columns": {"a": "text"}
            }),
            _ => serde_json::json!({}),
        };
        for (name, role) in STAGE_REGISTRY {
            let config = StageConfig::from_type(name, minimal(name))
                .unwrap_or_else(|e| panic!("{name}: {e:?}"))
                .unwrap_or_else(|| panic!("{name} is registered but not read"));
            assert_eq!(config.type_name(), *name);
            assert_eq!(config.is_sink(), *role == StageRole::Sink, "{name}");
            assert_eq!(config.is_root(), *role == StageRole::Root, "{name}");
            assert!(STAGE_TYPES.contains(name));
        }
        assert_eq!(STAGE_TYPES.len(), STAGE_REGISTRY.len());
        assert!(
            StageConfig::from_type("kafka", serde_json::json!({}))
                .unwrap()
                .is_none()
        );
        assert!(!is_sink_type("kafka") && !is_root_type("kafka"));
    }

    /// The fields serde expects, from its answer to an unknown key.
    fn serde_fields(name: &str) -> Vec<String> {
        let error = StageConfig::from_type(name, serde_json::json!({"no_such_key": 1}))
            .expect_err("an unknown key is refused");
        let expected = error
            .message
            .split_once("expected one of ")
            .or_else(|| error.message.split_once("expected "))
            .unwrap_or_else(|| panic!("{name}: {}", error.message))
            .1;
        // serde lists them as "`a`", "`a` or `b`", "one of `a`, `b`, `c`".
        expected
            .split(", ")
            .flat_map(|part| part.split(" or "))
            .map(|f| f.trim_matches('`').to_string())
            .collect()
    }

    #[test]
    fn every_stage_type_documents_exactly_the_keys_its_config_reads() {
        for doc in STAGE_CATALOGUE {
            let mut documented: Vec<String> = doc.keys.iter().map(|k| k.name.into()).collect();
            let mut read = serde_fields(doc.name);
            documented.sort();
            read.sort();
            assert_eq!(
                documented, read,
                "the keys `ecst stages {}` lists",
                doc.name
            );
            assert!(!doc.summary.trim().is_empty(), "{} has a summary", doc.name);
            for key in doc.keys {
                assert!(
                    !key.meaning.is_empty() && !key.value.is_empty(),
                    "{}.{}",
                    doc.name,
                    key.name
                );
            }
        }
        assert_eq!(STAGE_CATALOGUE.len(), STAGE_TYPES.len());
    }
}
