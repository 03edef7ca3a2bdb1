//! The records' part of a batch script call as MessagePack arrays of strings ("packs"), which
//! the script reads with Redis's `cmsgpack.unpack`. Redis parses each argument of a command
//! into an object of its own and frees it after the call; a pack of a few thousand values is
//! one argument, which costs Redis less per value than the values as arguments.
//!
//! Only the formats every `cmsgpack` Redis has shipped reads are written: fix raw, raw 16 and
//! raw 32 strings, and array 32.

/// Bytes a pack may reach before the next record starts another: far below the 512 MiB of
/// Redis's default `proto-max-bulk-len`, which bounds one argument. A record is never split,
/// so a pack holds at least one whole record.
const PACK_BYTES: usize = 16 << 20;

/// A value longer than a MessagePack string holds (4 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ValueTooLong(pub usize);

impl std::fmt::Display for ValueTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a value of {} bytes is longer than the batch script takes (4 GiB)",
            self.0
        )
    }
}

/// MessagePack arrays of strings, written value by value into one buffer.
pub(super) struct Packs {
    buf: Vec<u8>,
    /// Where each pack's array header is in `buf`.
    starts: Vec<usize>,
    /// Values in the last pack.
    count: u32,
    too_long: Option<ValueTooLong>,
}

impl Packs {
    /// One empty pack, with room for `bytes` of values.
    pub(super) fn with_capacity(bytes: usize) -> Self {
        let mut packs = Packs {
            buf: Vec::with_capacity(bytes),
            starts: Vec::new(),
            count: 0,
            too_long: None,
        };
        packs.open();
        packs
    }

    /// Called before each record: starts a new pack if this one is full.
    pub(super) fn next_record(&mut self) {
        let start = self.starts.last().copied().unwrap_or_default();
        if self.buf.len() - start >= PACK_BYTES {
            self.close();
            self.open();
        }
    }

    /// Appends one value.
    pub(super) fn push(&mut self, value: &[u8]) {
        let Ok(len) = u32::try_from(value.len()) else {
            self.too_long.get_or_insert(ValueTooLong(value.len()));
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
                self.too_long.get_or_insert(ValueTooLong(len));
            }
        }
    }

    /// Appends the packs to `cmd`, an argument each; an error if a value did not fit in one.
    pub(super) fn append_to(mut self, cmd: &mut redis::Cmd) -> Result<(), ValueTooLong> {
        if let Some(e) = self.too_long {
            return Err(e);
        }
        self.close();
        let ends = self.starts.iter().skip(1).copied().chain([self.buf.len()]);
        for (start, end) in self.starts.iter().copied().zip(ends) {
            cmd.arg(&self.buf[start..end]);
        }
        Ok(())
    }

    fn open(&mut self) {
        self.starts.push(self.buf.len());
        self.buf.extend([0xdd, 0, 0, 0, 0]);
        self.count = 0;
    }

    fn close(&mut self) {
        if let Some(&start) = self.starts.last() {
            self.buf[start + 1..start + 5].copy_from_slice(&self.count.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::redis_hash::tests::conn;

    /// What Redis's `cmsgpack` reads from the packs of `cmd`: every pack's strings, in order.
    async fn unpacked(cmd: &redis::Cmd) -> Vec<Vec<u8>> {
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

    #[tokio::test]
    async fn redis_reads_every_string_format_back_as_written() {
        // Each length at the edges of fix raw, raw 16 and raw 32, in bytes that are not UTF-8.
        let values: Vec<Vec<u8>> = [0, 1, 31, 32, 255, 256, 65_535, 65_536, 100_000]
            .into_iter()
            .map(|len| (0..len).map(|i| (i * 7 + len) as u8 | 0x80).collect())
            .collect();
        let mut packs = Packs::with_capacity(0);
        for value in &values {
            packs.next_record();
            packs.push(value);
        }
        packs.push_with(|buf| buf.extend_from_slice(b"{\"k\":[1,\"x\"]}"));
        packs.push_with(|_| {});
        let mut cmd = redis::Cmd::new();
        packs.append_to(&mut cmd).unwrap();
        assert_eq!(cmd.args_iter().count(), 1);
        let mut expected = values;
        expected.push(b"{\"k\":[1,\"x\"]}".to_vec());
        expected.push(Vec::new());
        assert_eq!(unpacked(&cmd).await, expected);
    }

    #[tokio::test]
    async fn a_full_pack_is_followed_by_another_between_records() {
        // Three records of 9 MiB: the first two fill a pack, the third starts another.
        let record = |n: u8| vec![vec![n; 9 << 20], vec![n; 3]];
        let mut packs = Packs::with_capacity(0);
        for n in 0..3 {
            packs.next_record();
            for value in record(n) {
                packs.push(&value);
            }
        }
        let mut cmd = redis::Cmd::new();
        packs.append_to(&mut cmd).unwrap();
        let lens: Vec<usize> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(arg) => arg.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(lens.len(), 2, "{lens:?}");
        assert!(lens[0] > PACK_BYTES && lens[1] < PACK_BYTES, "{lens:?}");
        let expected: Vec<Vec<u8>> = (0..3).flat_map(record).collect();
        assert_eq!(unpacked(&cmd).await, expected);
    }
}
