//! The consumer-group reader: own pending entries first, then new ones, plus periodic claims of
//! entries left pending by dead consumers.

use std::collections::HashMap;
use std::time::Duration;

use ecst_operators::RawEntry;
use ecst_operators::redis_pool::{
    ReaderConn, ReaderReply, RedisManager, RedisUrlError, report_failure, resolve_failure,
};
use redis::{RedisError, Value};

use crate::config::SourceConfig;
use crate::redis_reply::{bulk, compare_ids, parse_entries, parse_read, parse_read_resp};

/// Where a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This consumer's own pending entries, re-read after a restart.
    Pending,
    /// New entries (`>`).
    New,
    /// Entries claimed from another consumer that went idle.
    Claimed,
}

/// One read from the stream.
#[derive(Debug, Default)]
pub struct SourceBatch {
    /// Entries to process.
    pub entries: Vec<RawEntry>,
    /// Entries delivered more than `max_deliveries` times, with their count: dead-letter them.
    pub over_delivered: Vec<(RawEntry, u64)>,
    /// Ids that were trimmed from the stream while pending: never applied.
    pub trimmed: Vec<String>,
}

impl SourceBatch {
    /// Whether nothing at all was read.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.over_delivered.is_empty() && self.trimmed.is_empty()
    }
}

/// A reader failure; the connection is dropped and the caller backs off.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A Redis command failed.
    #[error("{op} on stream `{stream}` failed: {source}")]
    Redis {
        /// The command.
        op: &'static str,
        /// The stream.
        stream: String,
        /// What Redis or the client said.
        source: RedisError,
    },
    /// Redis answered in a shape ecst does not understand.
    #[error("{op} on stream `{stream}` returned an unexpected reply: {detail}")]
    Protocol {
        /// The command.
        op: &'static str,
        /// The stream.
        stream: String,
        /// What was wrong.
        detail: String,
    },
}

/// The reader of one stream for one consumer of one group.
pub struct StreamSource {
    config: SourceConfig,
    consumer: String,
    manager: RedisManager,
    conn: Option<ReaderConn>,
    /// Next id to read our own pending entries from; `None` once they are all re-read.
    pending_cursor: Option<String>,
    claim_cursor: String,
    /// Claim everything pending, however recently delivered, until the claim cursor wraps:
    /// this worker just took the partition from another.
    takeover: bool,
    group_vanished: bool,
}

impl StreamSource {
    /// A reader; it connects on first use.
    pub fn new(config: &SourceConfig, consumer: String) -> Result<Self, RedisUrlError> {
        Ok(StreamSource {
            manager: RedisManager::new(&config.redis, config.timeout.0)?,
            config: config.clone(),
            consumer,
            conn: None,
            pending_cursor: Some("0".into()),
            claim_cursor: "0-0".into(),
            takeover: false,
            group_vanished: false,
        })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Makes the next claims take every pending entry of the group at once (not only those
    /// idle for `claim_idle`): the partition's previous owner is gone or fenced off.
    pub fn take_over(&mut self) {
        self.takeover = true;
        self.claim_cursor = "0-0".into();
    }

    /// Whether a takeover claim is still under way.
    pub fn taking_over(&self) -> bool {
        self.takeover
    }

    /// Whether this consumer's own pending entries have all been re-read.
    pub fn pending_done(&self) -> bool {
        self.pending_cursor.is_none()
    }

    async fn conn(&mut self) -> Result<&mut ReaderConn, SourceError> {
        // A request abandoned midway (its future dropped) left its reply unread.
        if self.conn.as_ref().is_some_and(ReaderConn::is_broken) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = self
                .manager
                .connect_reader(self.config.read_timeout(), &self.config.stream)
                .await
                .map_err(|source| self.error("CONNECT", source))?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or_else(|| SourceError::Protocol {
            op: "CONNECT",
            stream: String::new(),
            detail: "no connection".into(),
        })
    }

    fn error(&self, op: &'static str, source: RedisError) -> SourceError {
        SourceError::Redis {
            op,
            stream: self.config.stream.clone(),
            source,
        }
    }

    /// Runs a command on the reader connection and reads its reply with `read`, dropping the
    /// connection on any failure but a server error's, so a timed-out reply can never be read
    /// as the answer to a later command.
    async fn request<T>(
        &mut self,
        op: &'static str,
        cmd: &redis::Cmd,
        read: impl FnOnce(ReaderReply<'_>) -> Result<T, String>,
    ) -> Result<T, SourceError> {
        let outcome = match self.conn().await?.request(cmd).await {
            Ok(reply) => Ok(read(reply)),
            Err(source) => Err(source),
        };
        match outcome {
            Ok(read) => {
                resolve_failure("source", &self.config.redis);
                read.map_err(|detail| {
                    self.conn = None;
                    self.protocol(op, detail)
                })
            }
            Err(source) => {
                report_failure("source", &self.config.redis, &source);
                // A cluster node that lost its slots or its quorum: the next connection asks
                // the seeds again where the stream is served.
                if !is_server_error(&source)
                    || matches!(source.code(), Some("CLUSTERDOWN" | "MASTERDOWN"))
                {
                    self.conn = None;
                }
                Err(self.error(op, source))
            }
        }
    }

    /// Runs a command on the reader connection; its reply as the redis crate's value.
    async fn query(&mut self, op: &'static str, cmd: &redis::Cmd) -> Result<Value, SourceError> {
        self.request(op, cmd, |reply| {
            reply.into_value().map_err(|e| e.to_string())
        })
        .await
    }

    /// Runs an `XREADGROUP`; its entries.
    async fn read_entries(&mut self, cmd: &redis::Cmd) -> Result<Vec<RawEntry>, SourceError> {
        self.request("XREADGROUP", cmd, |reply| match reply {
            ReaderReply::Resp(bytes) => parse_read_resp(bytes),
            ReaderReply::Value(value) => parse_read(value),
        })
        .await
    }

    /// Whether the group vanished (NOGROUP) since the last call: the stream or the group was
    /// deleted, and events may have been missed.
    pub fn take_group_vanished(&mut self) -> bool {
        std::mem::take(&mut self.group_vanished)
    }

    /// Creates the group at the configured start if it does not exist; `true` if created.
    pub async fn ensure_group(&mut self) -> Result<bool, SourceError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(self.config.start.as_id())
            .arg("MKSTREAM");
        match self.query("XGROUP CREATE", &cmd).await {
            Ok(_) => Ok(true),
            Err(SourceError::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the next batch: own pending entries until none are left, then new entries,
    /// blocking up to `block`.
    pub async fn next_batch(&mut self) -> Result<(Origin, SourceBatch), SourceError> {
        let result = self.read().await;
        match result {
            Err(SourceError::Redis { ref source, .. }) if source.code() == Some("NOGROUP") => {
                tracing::error!(
                    stream = %self.config.stream,
                    group = %self.config.group,
                    start = self.config.start.as_id(),
                    "Consumer group or stream vanished (NOGROUP); recreating the group at the configured start. Entries written before the stream was recreated are not replayed."
                );
                self.ensure_group().await?;
                self.pending_cursor = Some("0".into());
                self.group_vanished = true;
                Ok((Origin::New, SourceBatch::default()))
            }
            Err(e) => {
                // A read that failed may still have delivered entries to this consumer: read
                // its own pending entries again before new ones (the caller skips those it
                // is already applying).
                self.pending_cursor = Some("0".into());
                Err(e)
            }
            ok => ok,
        }
    }

    async fn read(&mut self) -> Result<(Origin, SourceBatch), SourceError> {
        if let Some(cursor) = self.pending_cursor.clone() {
            let mut cmd = self.xreadgroup_cmd(&cursor, None);
            let entries = self.read_entries(&cmd).await?;
            match entries.last() {
                None => {
                    self.pending_cursor = None;
                    cmd = self.xreadgroup_cmd(">", Some(self.config.block.0));
                    let entries = self.read_entries(&cmd).await?;
                    return Ok((
                        Origin::New,
                        SourceBatch {
                            entries,
                            ..SourceBatch::default()
                        },
                    ));
                }
                Some(last) => {
                    let next = last.id.clone();
                    let batch = self.split_over_delivered(entries).await?;
                    // Moved only once the batch is in hand, so a failure re-reads it.
                    self.pending_cursor = Some(next);
                    return Ok((Origin::Pending, batch));
                }
            }
        }
        let cmd = self.xreadgroup_cmd(">", Some(self.config.block.0));
        let entries = self.read_entries(&cmd).await?;
        Ok((
            Origin::New,
            SourceBatch {
                entries,
                ..SourceBatch::default()
            },
        ))
    }

    fn xreadgroup_cmd(&self, id: &str, block: Option<Duration>) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.config.batch_size);
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        cmd.arg("STREAMS").arg(&self.config.stream).arg(id);
        cmd
    }

    fn protocol(&self, op: &'static str, detail: impl Into<String>) -> SourceError {
        SourceError::Protocol {
            op,
            stream: self.config.stream.clone(),
            detail: detail.into(),
        }
    }

    /// Delivery counts of pending entries of this consumer between `first` and `last`.
    async fn delivery_counts(
        &mut self,
        first: &str,
        last: &str,
        count: usize,
    ) -> Result<HashMap<String, u64>, SourceError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(first)
            .arg(last)
            // The range may also hold this consumer's other pending entries (in flight).
            .arg(count.saturating_add(100_000))
            .arg(&self.consumer);
        let reply = self.query("XPENDING", &cmd).await?;
        let mut counts = HashMap::new();
        if let Value::Array(items) = reply {
            for item in items {
                if let Value::Array(fields) = item
                    && let [id, _consumer, _idle, Value::Int(n)] = fields.as_slice()
                    && let Some(id) = bulk(Some(id))
                {
                    counts.insert(id, u64::try_from(*n).unwrap_or(0));
                }
            }
        }
        Ok(counts)
    }

    async fn split_over_delivered(
        &mut self,
        entries: Vec<RawEntry>,
    ) -> Result<SourceBatch, SourceError> {
        let mut batch = SourceBatch::default();
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(batch);
        };
        let (first, last) = (first.id.clone(), last.id.clone());
        let counts = self.delivery_counts(&first, &last, entries.len()).await?;
        for entry in entries {
            match counts.get(&entry.id) {
                Some(n) if *n > self.config.max_deliveries => {
                    batch.over_delivered.push((entry, *n))
                }
                _ => batch.entries.push(entry),
            }
        }
        Ok(batch)
    }

    /// Claims entries idle longer than `claim_idle` from any consumer (XAUTOCLAIM, looping on
    /// its cursor up to one batch), and reports ids trimmed while pending.
    pub async fn claim(&mut self) -> Result<SourceBatch, SourceError> {
        let mut claimed: Vec<RawEntry> = Vec::new();
        let mut trimmed = Vec::new();
        let idle_ms = if self.takeover {
            0
        } else {
            self.config.claim_idle.as_millis()
        };
        loop {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.consumer)
                .arg(idle_ms)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(self.config.batch_size);
            let reply = self.query("XAUTOCLAIM", &cmd).await?;
            let Value::Array(mut parts) = reply else {
                return Err(self.protocol("XAUTOCLAIM", "reply is not an array"));
            };
            if parts.len() < 2 {
                return Err(self.protocol("XAUTOCLAIM", "reply has fewer than 2 parts"));
            }
            let deleted = if parts.len() >= 3 { parts.pop() } else { None };
            let list = parts.pop().unwrap_or(Value::Nil);
            let next = parts
                .pop()
                .and_then(|v| bulk(Some(&v)))
                .unwrap_or_else(|| "0-0".into());
            claimed.extend(parse_entries(list).map_err(|d| self.protocol("XAUTOCLAIM", d))?);
            if let Some(Value::Array(ids)) = deleted {
                trimmed.extend(ids.iter().filter_map(|id| bulk(Some(id))));
            }
            self.claim_cursor = next;
            if self.claim_cursor == "0-0" {
                self.takeover = false;
                break;
            }
            if claimed.len() >= self.config.batch_size {
                break;
            }
        }
        let mut batch = if claimed.is_empty() {
            SourceBatch::default()
        } else {
            claimed.sort_by(|a, b| compare_ids(&a.id, &b.id));
            self.split_over_delivered(claimed).await?
        };
        batch.trimmed = trimmed;
        Ok(batch)
    }

    /// Entries pending in the whole group (XPENDING summary).
    pub async fn group_pending(&mut self) -> Result<u64, SourceError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.config.stream).arg(&self.config.group);
        match self.query("XPENDING", &cmd).await? {
            Value::Array(items) => match items.first() {
                Some(Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
                _ => Err(self.protocol("XPENDING", "summary without a count")),
            },
            other => Err(self.protocol("XPENDING", format!("{other:?}"))),
        }
    }

    /// Removes this consumer from the group (`XGROUP DELCONSUMER`) if nothing is pending at it,
    /// so that restarts, each under a new name, do not pile up idle consumers. `Ok(false)`
    /// when entries are pending: they stay where another worker can claim them.
    pub async fn leave_group_if_idle(&mut self) -> Result<bool, SourceError> {
        let mut pending = redis::cmd("XPENDING");
        pending
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&self.consumer);
        // Nothing can become pending at this consumer between the two commands: only its own
        // XREADGROUP (stopped) or a claim by this consumer would add entries.
        match self.query("XPENDING", &pending).await? {
            Value::Array(entries) if entries.is_empty() => {}
            Value::Array(_) => return Ok(false),
            other => return Err(self.protocol("XPENDING", format!("{other:?}"))),
        }
        let mut delete = redis::cmd("XGROUP");
        delete
            .arg("DELCONSUMER")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer);
        self.query("XGROUP DELCONSUMER", &delete).await?;
        Ok(true)
    }
}

fn is_server_error(e: &RedisError) -> bool {
    e.code().is_some() && !e.is_io_error() && !e.is_timeout() && !e.is_connection_dropped()
}
