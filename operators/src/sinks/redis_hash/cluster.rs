//! `redis_hash` on a Redis Cluster: a script may only touch keys of one slot, so every key one
//! record touches shares its hash's slot, and a batch runs as one script per slot.

use std::collections::HashMap;

use redis::cluster_routing::Slot;

/// The tombstone key of the hash `key`: `<prefix><key>` on one server. On a cluster it must
/// hash to the same slot as `key`: `<prefix>{<key>}` when `key` has no hash tag (the tag is
/// then the whole key), `<prefix><key>` when it has one (the prefix has no braces, so the
/// key's own tag decides). A key with a `}` but no tag fits neither form.
pub fn tombstone_key(prefix: &str, key: &str, cluster: bool) -> Result<String, String> {
    Ok(match Tombstone::of(key, cluster)? {
        Tombstone::Plain => format!("{prefix}{key}"),
        Tombstone::Wrapped => format!("{prefix}{{{key}}}"),
    })
}

/// How the tombstone key of a hash key is formed (see [`tombstone_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tombstone {
    /// `<prefix><key>`.
    Plain,
    /// `<prefix>{<key>}`.
    Wrapped,
}

impl Tombstone {
    /// The form of `key`'s tombstone, or why it has none.
    pub(super) fn of(key: &str, cluster: bool) -> Result<Self, String> {
        if !cluster || hash_tag(key).is_some() {
            Ok(Tombstone::Plain)
        } else if !key.contains('}') {
            Ok(Tombstone::Wrapped)
        } else {
            Err(format!(
                "key `{key}` has a `}}` but no hash tag, so on a Redis Cluster its tombstone cannot share its slot; tag the key template, e.g. `athlete:{{{{{{aggregateId}}}}}}`"
            ))
        }
    }

    /// Appends the tombstone key of `key` to `out`.
    pub(super) fn push_key(self, out: &mut Vec<u8>, prefix: &str, key: &str) {
        out.extend_from_slice(prefix.as_bytes());
        match self {
            Tombstone::Plain => out.extend_from_slice(key.as_bytes()),
            Tombstone::Wrapped => {
                out.push(b'{');
                out.extend_from_slice(key.as_bytes());
                out.push(b'}');
            }
        }
    }
}

/// The part of `key` Redis Cluster hashes, when it is not the whole key: the text between
/// the first `{` and the first `}` after it, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// Why `prefix` cannot prefix tombstones on a cluster, if it cannot.
pub(super) fn prefix_problem(prefix: &str) -> Option<String> {
    prefix.contains(['{', '}']).then(|| {
        format!(
            "`{prefix}` must not contain `{{` or `}}` on a Redis Cluster: a tombstone takes its slot from its hash key"
        )
    })
}

/// The positions of `keys` grouped by slot: each group in batch order (so two versions of one
/// key keep their order), the groups in the order their first key appears.
pub(super) fn by_slot<'k>(keys: impl IntoIterator<Item = &'k str>) -> Vec<Vec<usize>> {
    let mut group_of: HashMap<Slot, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let group = *group_of.entry(Slot::for_key(key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(i);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_shares_the_slot_of_its_hash() {
        let tomb = |key| tombstone_key("ecst:tombstone:", key, true);
        assert_eq!(tomb("athlete:42").unwrap(), "ecst:tombstone:{athlete:42}");
        assert_eq!(tomb("athlete:{42}").unwrap(), "ecst:tombstone:athlete:{42}");
        // A `{` alone is no tag: the whole key is hashed, and wrapped it still is.
        assert_eq!(tomb("a{b").unwrap(), "ecst:tombstone:{a{b}");
        for key in ["athlete:42", "athlete:{42}", "a{b", "x{y}z{w}"] {
            assert_eq!(
                Slot::for_key(key),
                Slot::for_key(tomb(key).unwrap()),
                "{key}"
            );
        }
        // An empty `{}` is no tag either, but wrapped, the tag would end at its `}`.
        for key in ["a}b", "a{}b"] {
            assert!(tomb(key).unwrap_err().contains("athlete:{{{aggregateId}}}"));
        }
        assert_eq!(
            tombstone_key("t:", "a}b", false).unwrap(),
            "t:a}b",
            "one server: unchanged"
        );
        assert_eq!(
            tombstone_key("t:", "athlete:42", false).unwrap(),
            "t:athlete:42"
        );
    }

    #[test]
    fn a_prefix_with_braces_is_refused() {
        assert!(prefix_problem("ecst:tombstone:").is_none());
        assert!(
            prefix_problem("t{x}:")
                .unwrap()
                .contains("must not contain")
        );
    }

    #[test]
    fn groups_keep_batch_order() {
        let keys = ["a{1}", "b", "c{1}", "b", "d{1}"];
        let groups = by_slot(keys);
        assert_eq!(groups[0], [0, 2, 4]);
        assert!(groups.contains(&vec![1, 3]));
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), keys.len());
    }
}
