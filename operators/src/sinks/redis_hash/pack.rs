//! The records' part of a batch script call as MessagePack arrays of strings ("packs"), which
//! the script reads with Redis's `cmsgpack.unpack`. Redis parses each argument of a command
//! into an object of its own and frees it after the call; a pack of a few thousand values is
//! one argument, which costs Redis less per value than the values as arguments.
//!
//! Only the formats every `cmsgpack` Redis has shipped reads are written: fix raw, raw 16 and
//! raw 32 strings, and array 32.

use redis::Cmd;

/// Bytes a pack may reach before the next record starts another. A record is never split, so
/// a pack holds at least one whole record.
const PACK_BYTES: usize = 1 << 20;

/// The most bytes of values one record may have: a pack (one argument) of it and of less than
/// `PACK_BYTES` of others stays under the 512 MiB of Redis's default `proto-max-bulk-len`.
const RECORD_BYTES: usize = 510 << 20;

/// A record whose values are more than one script call carries: their size in bytes (at least).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RecordTooLarge(pub usize);

impl std::fmt::Display for RecordTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the record's values take {} bytes, over the {} MiB one batch script argument carries \
             (Redis's proto-max-bulk-len is 512 MiB by default)",
            self.0,
            RECORD_BYTES >> 20
        )
    }
}

/// MessagePack arrays of strings, written value by value: each full pack goes into the
/// command as an argument, and its buffer is used for the next.
pub(super) struct Packs {
    buf: Vec<u8>,
    /// Values in the pack in `buf`.
    count: u32,
    /// Where the record being written starts in `buf`.
    record_start: usize,
    pack_bytes: usize,
    record_bytes: usize,
    too_large: Option<RecordTooLarge>,
}

/// An array 32 header whose count is filled in when the pack is done.
const ARRAY_HEADER: [u8; 5] = [0xdd, 0, 0, 0, 0];

impl Packs {
    /// An empty pack, with room for `bytes` of values.
    pub(super) fn with_capacity(bytes: usize) -> Self {
        Self::with_limits(bytes, PACK_BYTES, RECORD_BYTES)
    }

    fn with_limits(bytes: usize, pack_bytes: usize, record_bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.min(pack_bytes) + ARRAY_HEADER.len());
        buf.extend(ARRAY_HEADER);
        Packs {
            record_start: buf.len(),
            buf,
            count: 0,
            pack_bytes,
            record_bytes,
            too_large: None,
        }
    }

    /// Called before each record: checks the last one's size, and moves the pack into `cmd`
    /// if it is full.
    pub(super) fn next_record(&mut self, cmd: &mut Cmd) {
        self.check_record();
        if self.buf.len() >= self.pack_bytes {
            self.flush(cmd);
        }
        self.record_start = self.buf.len();
    }

    /// Appends one value.
    pub(super) fn push(&mut self, value: &[u8]) {
        let Ok(len) = u32::try_from(value.len()) else {
            self.too_large.get_or_insert(RecordTooLarge(value.len()));
            return;
        };
        match len {
            0..32 => self.buf.push(0xa0 | len as u8),
            32..65_536 => {
                self.buf.push(0xda);
                self.buf.extend((len as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xdb);
                self.buf.extend(len.to_be_bytes());
            }
        }
        self.buf.extend_from_slice(value);
        self.count += 1;
    }

    /// Appends one value that `write` writes (of a length not known before).
    pub(super) fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let header = self.buf.len();
        self.buf.extend([0xdb, 0, 0, 0, 0]);
        write(&mut self.buf);
        let len = self.buf.len() - header - 5;
        match u32::try_from(len) {
            Ok(len) => {
                self.buf[header + 1..header + 5].copy_from_slice(&len.to_be_bytes());
                self.count += 1;
            }
            Err(_) => {
                self.buf.truncate(header);
                self.too_large.get_or_insert(RecordTooLarge(len));
            }
        }
    }

    /// Moves the last pack into `cmd`; an error if a record was too large for any call.
    pub(super) fn finish(mut self, cmd: &mut Cmd) -> Result<(), RecordTooLarge> {
        self.check_record();
        if let Some(e) = self.too_large {
            return Err(e);
        }
        self.flush(cmd);
        Ok(())
    }

    fn check_record(&mut self) {
        let size = self.buf.len() - self.record_start;
        if size > self.record_bytes {
            self.too_large.get_or_insert(RecordTooLarge(size));
        }
    }

    fn flush(&mut self, cmd: &mut Cmd) {
        self.buf[1..5].copy_from_slice(&self.count.to_be_bytes());
        cmd.arg(self.buf.as_slice());
        self.buf.clear();
        self.buf.extend(ARRAY_HEADER);
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::redis_hash::tests::conn;

    /// What Redis's `cmsgpack` reads from the packs of `cmd`: every pack's strings, in order.
    async fn unpacked(cmd: &Cmd) -> Vec<Vec<u8>> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(
            "local out = {} \
             for i = 1, #ARGV do \
               local pack = cmsgpack.unpack(ARGV[i]) \
               for j = 1, #pack do out[#out + 1] = pack[j] end \
             end \
             return out",
        )
        .arg(0);
        for arg in cmd.args_iter() {
            if let redis::Arg::Simple(arg) = arg {
                eval.arg(arg);
            }
        }
        eval.query_async(&mut conn().await).await.unwrap()
    }

    /// The byte length of each argument of `cmd`.
    fn lengths(cmd: &Cmd) -> Vec<usize> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(arg) => arg.len(),
                _ => 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn redis_reads_every_string_format_back_as_written() {
        // Each length at the edges of fix raw, raw 16 and raw 32, in bytes that are not UTF-8.
        let values: Vec<Vec<u8>> = [0, 1, 31, 32, 255, 256, 65_535, 65_536, 100_000]
            .into_iter()
            .map(|len| (0..len).map(|i| (i * 7 + len) as u8 | 0x80).collect())
            .collect();
        let mut cmd = Cmd::new();
        let mut packs = Packs::with_capacity(0);
        for value in &values {
            packs.next_record(&mut cmd);
            packs.push(value);
        }
        packs.push_with(|buf| buf.extend_from_slice(b"{\"k\":[1,\"x\"]}"));
        packs.push_with(|_| {});
        packs.finish(&mut cmd).unwrap();
        assert_eq!(lengths(&cmd).len(), 1);
        let mut expected = values;
        expected.push(b"{\"k\":[1,\"x\"]}".to_vec());
        expected.push(Vec::new());
        assert_eq!(unpacked(&cmd).await, expected);
    }

    #[tokio::test]
    async fn a_full_pack_is_followed_by_another_between_records() {
        // Records of 600 KiB: the first two fill a pack, the third starts another.
        let record = |n: u8| vec![vec![n; 600 << 10], vec![n; 3]];
        let mut cmd = Cmd::new();
        let mut packs = Packs::with_capacity(0);
        for n in 0..3 {
            packs.next_record(&mut cmd);
            for value in record(n) {
                packs.push(&value);
            }
        }
        packs.finish(&mut cmd).unwrap();
        let lens = lengths(&cmd);
        assert_eq!(lens.len(), 2, "{lens:?}");
        assert!(lens[0] > PACK_BYTES && lens[1] < PACK_BYTES, "{lens:?}");
        let expected: Vec<Vec<u8>> = (0..3).flat_map(record).collect();
        assert_eq!(unpacked(&cmd).await, expected);
    }

    #[test]
    fn a_record_over_the_limit_is_refused_whoever_follows_it() {
        let pack = |sizes: &[usize]| {
            let mut cmd = Cmd::new();
            let mut packs = Packs::with_limits(0, 64, 100);
            for &size in sizes {
                packs.next_record(&mut cmd);
                packs.push(&vec![b'x'; size / 2]);
                packs.push_with(|buf| buf.resize(buf.len() + size - size / 2, b'y'));
            }
            packs.finish(&mut cmd)
        };
        assert_eq!(pack(&[40, 90, 30]), Ok(()));
        // 101 bytes of values and their headers (raw 16: 3 bytes, raw 32: 5).
        assert_eq!(pack(&[40, 101, 30]), Err(RecordTooLarge(109)));
        assert_eq!(pack(&[40, 30, 101]), Err(RecordTooLarge(109)));
    }
}
