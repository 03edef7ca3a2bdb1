//! Partitioned streams: which partition an event belongs to, and the key each partition has.
//!
//! A logical stream `S` with `N > 1` partitions is `N` stream keys, `S:{S:0}` … `S:{S:N-1}`.
//! The braces are a Redis Cluster hash tag: each partition hashes to its own slot, so the
//! partitions spread over a cluster's masters. With `N = 1` the stream is the single key `S`,
//! exactly as an unpartitioned stream.
//!
//! An event's partition is `fnv1a_32(aggregateId as UTF-8 bytes) mod N`: the 32-bit FNV-1a hash
//! (offset basis 2166136261, prime 16777619), which any language computes in a few lines, so
//! producers that are not ecst route every event where ecst's workers expect it.

use std::fmt;

/// The name of the partition hash, as recorded in a stream's partitioning.
pub const HASH_NAME: &str = "fnv1a_32";

/// The envelope field that is hashed.
pub const PARTITION_KEY: &str = "aggregateId";

/// The 32-bit FNV-1a hash of `bytes`.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// The partition (`0..partitions`) of an event with this aggregate id.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    fnv1a_32(aggregate_id.as_bytes()) % partitions
}

/// The stream key of partition `partition` of `stream` (`stream` itself when unpartitioned).
pub fn partition_stream(stream: &str, partition: u32, partitions: u32) -> String {
    if partitions <= 1 {
        stream.to_string()
    } else {
        format!("{stream}:{{{stream}:{partition}}}")
    }
}

/// Why a stream name cannot be partitioned.
pub fn check_partitioned_name(stream: &str) -> Result<(), String> {
    if stream.contains(['{', '}']) {
        return Err(format!(
            "a partitioned stream's name must not contain `{{` or `}}` (got {stream:?}): ecst adds the hash tag itself"
        ));
    }
    Ok(())
}

/// The key holding a stream's recorded partitioning.
pub fn partitioning_key(stream: &str) -> String {
    format!("ecst:partitioning:{stream}")
}

/// How a logical stream is split: what producers and workers must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioning {
    /// Number of partitions (1 = the single key).
    pub partitions: u32,
    /// The hash ([`HASH_NAME`]).
    pub hash: String,
    /// The hashed envelope field ([`PARTITION_KEY`]).
    pub key: String,
}

impl Partitioning {
    /// ecst's partitioning with `partitions` partitions.
    pub fn new(partitions: u32) -> Self {
        Partitioning {
            partitions: partitions.max(1),
            hash: HASH_NAME.to_string(),
            key: PARTITION_KEY.to_string(),
        }
    }
}

impl fmt::Display for Partitioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} partition{} by {}({})",
            self.partitions,
            if self.partitions == 1 { "" } else { "s" },
            self.hash,
            self.key
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's test vectors: (aggregateId, FNV-1a 32, partitions, partition). The
    /// Python and JavaScript references in the README print the same.
    pub(crate) const VECTORS: [(&str, u32, u32, u32); 6] = [
        ("", 0x811c_9dc5, 8, 5),
        ("a", 0xe40c_292c, 8, 4),
        ("athlete-1", 0x0d22_bb12, 8, 2),
        ("42", 0x87e3_8583, 16, 3),
        ("ünïcode", 0x45f2_402b, 8, 3),
        ("order:2024-0001", 0xda67_41e5, 3, 0),
    ];

    #[test]
    fn fnv1a_matches_the_published_values() {
        // From the FNV reference (draft-eastlake-fnv): "" and "a" and "foobar".
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn the_test_vectors_hold() {
        for (id, hash, partitions, partition) in VECTORS {
            assert_eq!(fnv1a_32(id.as_bytes()), hash, "{id:?}");
            assert_eq!(partition_of(id, partitions), partition, "{id:?}");
        }
    }

    #[test]
    fn one_partition_is_the_stream_itself() {
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_stream("orders", 0, 1), "orders");
        assert_eq!(partition_stream("orders", 3, 8), "orders:{orders:3}");
    }

    #[test]
    fn braces_in_a_partitioned_name_are_refused() {
        assert!(check_partitioned_name("orders").is_ok());
        assert!(check_partitioned_name("or{ders}").is_err());
    }

    #[test]
    fn partitioning_reads_as_a_sentence() {
        assert_eq!(
            Partitioning::new(8).to_string(),
            "8 partitions by fnv1a_32(aggregateId)"
        );
    }
}
