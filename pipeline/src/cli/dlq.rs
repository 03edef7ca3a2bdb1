//! `ecst dlq`: a pipeline's dead letters grouped by reason, shown decoded, replayed to their
//! source stream after a fix, or purged.
//!
//! A dead letter is the entry's own fields followed by `error`, `error_class`,
//! `source_stream`, `source_id`, `group` and `consumer` (see `commit.rs`); an entry with too
//! many fields to copy is dead-lettered by reference (`fields_not_copied`) and cannot be
//! replayed from here.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ecst_operators::redis_pool::{RedisConn, RedisManager};
use ecst_operators::{ConfigDuration, RawEntry, SecretUrl, StageConfig};
use ecst_pipeline::config::{self, PipelineConfig};
use ecst_pipeline::redis_reply::{parse_entries, parse_id};
use ecst_pipeline::tap::glob_matches;
use ecst_schemas::partition::partition_stream;
use ecst_schemas::wire::{BodyLimits, ContentType, FIELD_BODY, FIELD_CONTENT_TYPE, decode_body};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Args)]
pub(crate) struct DlqArgs {
    /// Pipeline file (its source names the dead-letter stream, the stream and the group).
    pipeline: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: DlqAction,
}

#[derive(Subcommand)]
enum DlqAction {
    /// Dead letters grouped by reason, with counts, first/last seen and entry ids.
    List {
        /// Most entry ids shown per reason.
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// One dead letter with its original fields decoded.
    Show {
        /// The dead letter's entry id (as `list` prints it).
        id: String,
    },
    /// Re-publish the original fields to the source stream, then remove the dead letter.
    Replay {
        #[command(flatten)]
        select: Selectors,
        /// Print what would be replayed; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters.
    Purge {
        #[command(flatten)]
        select: Selectors,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters `replay` and `purge` act on: every given selector must match.
#[derive(Args)]
struct Selectors {
    /// A dead letter's entry id (repeatable).
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// A reason: its class (`invalid_event`, ...) or a pattern of its message, `*` matching
    /// any text (`list` prints each group's pattern).
    #[arg(long, value_name = "PATTERN")]
    reason: Option<String>,
    /// Dead-lettered at or after: RFC 3339, or an age like `30m`, `1h`, `7d`.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Dead-lettered at or before: RFC 3339, or an age like `30m`, `1h`, `7d`.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Every dead letter of the pipeline's group.
    #[arg(long, conflicts_with_all = ["ids", "reason", "since", "until"])]
    all: bool,
}

/// Fields a dead letter adds after the entry's own.
const METADATA: [&str; 6] = [
    "error",
    "error_class",
    "source_stream",
    "source_id",
    "group",
    "consumer",
];

/// The field that replaces the entry's own when it had too many to copy.
const NOT_COPIED: &str = "fields_not_copied";

/// Dead letters read per XRANGE.
const PAGE: usize = 1000;

/// One dead letter, split into the entry's fields and what ecst added.
struct DeadLetter {
    id: String,
    original: Vec<(String, Vec<u8>)>,
    meta: BTreeMap<&'static str, String>,
}

impl DeadLetter {
    /// Splits an entry of the dead-letter stream. The metadata are the trailing fields (an
    /// original field may share a name with one of them; only the last of each counts).
    fn parse(entry: RawEntry) -> DeadLetter {
        let mut fields = entry.fields;
        let mut meta = BTreeMap::new();
        while let Some((name, _)) = fields.last() {
            let Some(known) = METADATA.iter().find(|m| **m == name) else {
                break;
            };
            if meta.contains_key(known) {
                break;
            }
            if let Some((_, value)) = fields.pop() {
                meta.insert(*known, String::from_utf8_lossy(&value).into_owned());
            }
        }
        DeadLetter {
            id: entry.id,
            original: fields,
            meta,
        }
    }

    fn meta(&self, name: &str) -> &str {
        self.meta.get(name).map_or("", String::as_str)
    }

    fn class(&self) -> &str {
        match self.meta("error_class") {
            "" => "unknown",
            class => class,
        }
    }

    /// How many fields the entry had, when it was dead-lettered by reference.
    fn not_copied(&self) -> Option<&str> {
        match self.original.as_slice() {
            [(name, count)] if name == NOT_COPIED => std::str::from_utf8(count).ok(),
            _ => None,
        }
    }

    /// When it was dead-lettered: the millisecond part of its id.
    fn at(&self) -> String {
        millis_rfc3339(parse_id(&self.id).0)
    }
}

fn millis_rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// The pattern of a reason's message: quoted values and numbers (outside `backticked`
/// names) become `*`, so that reasons differing only in a value group together and the
/// pattern can be given back to `--reason`.
fn reason_pattern(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    let mut in_name = false;
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                in_name = !in_name;
                out.push(c);
            }
            '"' if !in_name => {
                // To the closing quote, skipping escaped quotes.
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"*\"");
            }
            c if c.is_ascii_digit() && !in_name => {
                while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                    chars.next();
                }
                out.push('*');
            }
            c => out.push(c),
        }
    }
    out
}

/// A `--since`/`--until` value as Unix milliseconds: RFC 3339, or an age before `now`.
fn parse_time(text: &str, now: OffsetDateTime) -> anyhow::Result<u64> {
    let at = match OffsetDateTime::parse(text, &Rfc3339) {
        Ok(at) => at,
        Err(_) => {
            let age = ConfigDuration::parse(text).map_err(|_| {
                anyhow::anyhow!(
                    "{text:?} is neither an RFC 3339 time (2026-11-25T10:00:00Z) nor an age (30m, 1h, 7d)"
                )
            })?;
            now - age.0
        }
    };
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .with_context(|| format!("{text:?} is before 1970"))
}

/// Connects to the source's Redis; errors name the server with its password masked.
pub(crate) async fn connect(url: &SecretUrl, timeout: Duration) -> anyhow::Result<RedisConn> {
    RedisManager::new(url, timeout)
        .with_context(|| format!("invalid Redis URL {url}"))?
        .connect_once(timeout)
        .await
        .with_context(|| format!("cannot connect to Redis at {url}"))
}

/// The dead-letter stream of a pipeline, read page by page.
struct DeadLetters {
    conn: RedisConn,
    stream: String,
    group: String,
    /// Dead letters of other groups sharing the dead-letter stream, skipped.
    other_groups: u64,
}

impl DeadLetters {
    /// The dead letters of the pipeline's group with ids from `start` to `end` (XRANGE
    /// bounds), in order, handed to `each` a page at a time.
    async fn scan(
        &mut self,
        start: String,
        end: &str,
        mut each: impl FnMut(DeadLetter),
    ) -> anyhow::Result<()> {
        let mut start = start;
        loop {
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(&self.stream)
                .arg(&start)
                .arg(end)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut self.conn)
                .await
                .with_context(|| format!("XRANGE {}", self.stream))?;
            let entries =
                parse_entries(reply).map_err(|e| anyhow::anyhow!("XRANGE {}: {e}", self.stream))?;
            let full = entries.len() == PAGE;
            let Some(last) = entries.last().map(|e| e.id.clone()) else {
                return Ok(());
            };
            for entry in entries {
                let letter = DeadLetter::parse(entry);
                if letter.meta("group") == self.group {
                    each(letter);
                } else {
                    self.other_groups += 1;
                }
            }
            if !full {
                return Ok(());
            }
            start = format!("({last}");
        }
    }

    /// The dead letters `select` names, in id order.
    async fn select(&mut self, select: &Selectors) -> anyhow::Result<Vec<DeadLetter>> {
        let now = OffsetDateTime::now_utc();
        let since = select
            .since
            .as_deref()
            .map(|t| parse_time(t, now).context("--since"))
            .transpose()?;
        let until = select
            .until
            .as_deref()
            .map(|t| parse_time(t, now).context("--until"))
            .transpose()?;
        if !select.all
            && select.ids.is_empty()
            && select.reason.is_none()
            && since.is_none()
            && until.is_none()
        {
            bail!(
                "say which dead letters: --id ID, --reason PATTERN, --since/--until TIME, or --all"
            );
        }
        let matches_reason = |letter: &DeadLetter| match &select.reason {
            None => true,
            Some(pattern) => {
                letter.class() == pattern.as_str() || glob_matches(pattern, letter.meta("error"))
            }
        };
        let in_time = |letter: &DeadLetter| {
            let at = parse_id(&letter.id).0;
            since.is_none_or(|s| at >= s) && until.is_none_or(|u| at <= u)
        };
        let mut selected = Vec::new();
        if select.ids.is_empty() {
            let start = since.map_or_else(|| "-".to_string(), |s| s.to_string());
            let end = until.map_or_else(|| "+".to_string(), |u| u.to_string());
            self.scan(start, &end, |letter| {
                if matches_reason(&letter) {
                    selected.push(letter);
                }
            })
            .await?;
        } else {
            for id in &select.ids {
                let letter = self.one(id).await?;
                // A shared dead-letter stream holds other pipelines' letters: not ours to touch.
                if letter.meta("group") != self.group {
                    bail!(
                        "dead letter {id} in {} belongs to group {:?}, not to this pipeline's group {:?}",
                        self.stream,
                        letter.meta("group"),
                        self.group
                    );
                }
                if matches_reason(&letter) && in_time(&letter) {
                    selected.push(letter);
                }
            }
        }
        Ok(selected)
    }

    /// The dead letter with entry id `id`, of any group.
    async fn one(&mut self, id: &str) -> anyhow::Result<DeadLetter> {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(id)
            .arg(id)
            .query_async(&mut self.conn)
            .await
            .with_context(|| format!("XRANGE {} {id} {id}", self.stream))?;
        let entries =
            parse_entries(reply).map_err(|e| anyhow::anyhow!("XRANGE {}: {e}", self.stream))?;
        match entries.into_iter().next() {
            Some(entry) => Ok(DeadLetter::parse(entry)),
            None => bail!("no dead letter {id} in {}", self.stream),
        }
    }
}

/// Runs `ecst dlq`.
pub(crate) async fn dlq(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let config = match config::load(&args.pipeline) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(1));
        }
    };
    let source = &config.source;
    let mut letters = DeadLetters {
        conn: connect(&source.redis, source.timeout.0).await?,
        stream: source.dead_letter_stream(),
        group: source.group.clone(),
        other_groups: 0,
    };
    match args.action {
        DlqAction::List { limit } => list(&mut letters, limit, args.json).await,
        DlqAction::Show { id } => show(&mut letters, &config, &id, args.json).await,
        DlqAction::Replay { select, dry_run } => {
            let selected = letters.select(&select).await?;
            replay(&mut letters, &config, selected, dry_run, args.json).await
        }
        DlqAction::Purge {
            select,
            dry_run,
            yes,
        } => {
            let selected = letters.select(&select).await?;
            purge(&mut letters, selected, dry_run, yes, args.json).await
        }
    }
}

/// Dead letters of one reason.
struct ReasonGroup {
    count: u64,
    first: String,
    last: String,
    ids: Vec<String>,
}

async fn list(letters: &mut DeadLetters, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let mut groups: BTreeMap<(String, String), ReasonGroup> = BTreeMap::new();
    let mut total = 0u64;
    letters
        .scan("-".into(), "+", |letter| {
            total += 1;
            let key = (
                letter.class().to_string(),
                reason_pattern(letter.meta("error")),
            );
            let group = groups.entry(key).or_insert_with(|| ReasonGroup {
                count: 0,
                first: letter.id.clone(),
                last: letter.id.clone(),
                ids: Vec::new(),
            });
            group.count += 1;
            group.last = letter.id.clone();
            if group.ids.len() < limit {
                group.ids.push(letter.id);
            }
        })
        .await?;
    let mut groups: Vec<((String, String), ReasonGroup)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
    let at = |id: &str| millis_rfc3339(parse_id(id).0);
    if json {
        let groups: Vec<Value> = groups
            .iter()
            .map(|((class, pattern), g)| {
                json!({
                    "class": class, "reason": pattern, "count": g.count,
                    "first_seen": at(&g.first), "last_seen": at(&g.last),
                    "ids": g.ids, "ids_truncated": g.count > g.ids.len() as u64,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "dead_letter_stream": letters.stream, "group": letters.group, "total": total,
                "other_groups": letters.other_groups, "reasons": groups,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {total} dead letters of group {}",
        letters.stream, letters.group
    );
    if letters.other_groups > 0 {
        println!(
            "({} more belong to other groups sharing the stream)",
            letters.other_groups
        );
    }
    for ((class, pattern), g) in &groups {
        println!();
        println!("{:>7}  {class}: {pattern}", g.count);
        println!("         first {}  last {}", at(&g.first), at(&g.last));
        let more = g.count - g.ids.len() as u64;
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        println!("         ids {}{tail}", g.ids.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The body field and how bodies are read, from the pipeline's decode stage.
fn body_field(config: &PipelineConfig) -> (String, BodyLimits) {
    config
        .stages
        .iter()
        .find_map(|s| match &s.config {
            StageConfig::Decode(d) => Some((
                d.field.clone(),
                BodyLimits {
                    max_bytes: d.max_body_bytes,
                    max_depth: d.max_depth,
                },
            )),
            _ => None,
        })
        .unwrap_or_else(|| (FIELD_BODY.to_string(), BodyLimits::default()))
}

/// An original field for a person: the body decoded (JSON or MessagePack), other fields as
/// text (or hex when not UTF-8).
fn decode_field(
    letter: &DeadLetter,
    name: &str,
    value: &[u8],
    body: &(String, BodyLimits),
) -> Value {
    if name == body.0 {
        let ct = letter
            .original
            .iter()
            .find(|(k, _)| k == FIELD_CONTENT_TYPE)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let decoded = match ct.as_deref().map(ContentType::parse) {
            None => decode_body(value, ContentType::Json, body.1).map_err(|e| e.to_string()),
            Some(Ok(ct)) => decode_body(value, ct, body.1).map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.to_string()),
        };
        match decoded {
            Ok(v) => return json!({ "decoded": v }),
            Err(e) => return json!({ "undecodable": e, "raw": text_or_hex(value) }),
        }
    }
    Value::String(text_or_hex(value))
}

fn text_or_hex(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

async fn show(
    letters: &mut DeadLetters,
    config: &PipelineConfig,
    id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let letter = letters.one(id).await?;
    let body = body_field(config);
    let fields: Vec<Value> = letter
        .original
        .iter()
        .map(|(name, value)| json!({ "name": name, "value": decode_field(&letter, name, value, &body) }))
        .collect();
    if json {
        println!(
            "{}",
            json!({
                "id": letter.id, "dead_lettered_at": letter.at(), "class": letter.class(),
                "reason": letter.meta("error"), "source_stream": letter.meta("source_stream"),
                "source_id": letter.meta("source_id"), "group": letter.meta("group"),
                "consumer": letter.meta("consumer"), "fields_not_copied": letter.not_copied(),
                "fields": fields,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("dead letter {} ({})", letter.id, letter.at());
    println!("reason:   {}: {}", letter.class(), letter.meta("error"));
    println!(
        "source:   {} entry {} (group {}, consumer {})",
        letter.meta("source_stream"),
        letter.meta("source_id"),
        letter.meta("group"),
        letter.meta("consumer")
    );
    if let Some(count) = letter.not_copied() {
        println!(
            "fields:   not copied ({count} fields): the entry stays in its stream until trimmed (XRANGE {} {} {})",
            letter.meta("source_stream"),
            letter.meta("source_id"),
            letter.meta("source_id")
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("fields:");
    for field in &fields {
        let name = field["name"].as_str().unwrap_or_default();
        let value = &field["value"];
        match (value.get("decoded"), value.get("undecodable")) {
            (Some(decoded), _) => {
                let pretty = serde_json::to_string_pretty(decoded)?;
                println!("  {name}:");
                for line in pretty.lines() {
                    println!("    {line}");
                }
            }
            (None, Some(error)) => {
                println!(
                    "  {name}: {} (cannot decode: {})",
                    value["raw"].as_str().unwrap_or_default(),
                    error.as_str().unwrap_or_default()
                );
            }
            _ => println!("  {name}: {}", value.as_str().unwrap_or_default()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a dead letter cannot be replayed, if it cannot.
fn not_replayable(letter: &DeadLetter, streams: &[String]) -> Option<String> {
    if let Some(count) = letter.not_copied() {
        return Some(format!(
            "dead-lettered by reference ({count} fields, not copied): read entry {} of {} while it is there",
            letter.meta("source_id"),
            letter.meta("source_stream")
        ));
    }
    if letter.original.is_empty() {
        return Some("no fields to replay (the entry was gone when it was dead-lettered)".into());
    }
    let source = letter.meta("source_stream");
    if !streams.iter().any(|s| s == source) {
        return Some(format!(
            "its source stream `{source}` is not a stream of this pipeline"
        ));
    }
    None
}

async fn replay(
    letters: &mut DeadLetters,
    config: &PipelineConfig,
    selected: Vec<DeadLetter>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let source = &config.source;
    // A dead letter names the stream key it was read from: the stream, or the partition its
    // aggregate hashes to; the partitioning never changes under a stream's name.
    let streams: Vec<String> = (0..source.partitions)
        .map(|p| partition_stream(&source.stream, p, source.partitions))
        .collect();
    let mut replayed = Vec::new();
    let mut skipped = Vec::new();
    for letter in &selected {
        if let Some(why) = not_replayable(letter, &streams) {
            skipped.push(json!({ "id": letter.id, "reason": why }));
            if !json {
                println!("skipped  {}: {why}", letter.id);
            }
            continue;
        }
        let target = letter.meta("source_stream");
        let new_id = if dry_run {
            None
        } else {
            let mut add = redis::cmd("XADD");
            add.arg(target).arg("*");
            for (name, value) in &letter.original {
                add.arg(name).arg(value.as_slice());
            }
            let new_id: String = add.query_async(&mut letters.conn).await.with_context(|| {
                format!(
                    "replaying dead letter {} to {target} (nothing removed)",
                    letter.id
                )
            })?;
            // Only now that the stream holds it again: a failure before leaves the dead
            // letter where it was, a failure here leaves it to replay again (harmlessly).
            let _: i64 = redis::cmd("XDEL")
                .arg(&letters.stream)
                .arg(&letter.id)
                .query_async(&mut letters.conn)
                .await
                .with_context(|| {
                    format!(
                        "dead letter {} was replayed to {target} as {new_id} but not removed from {}",
                        letter.id, letters.stream
                    )
                })?;
            Some(new_id)
        };
        if !json {
            match &new_id {
                Some(new_id) => println!("replayed {} -> {target} {new_id}", letter.id),
                None => println!("would replay {} -> {target}", letter.id),
            }
        }
        replayed.push(json!({ "id": letter.id, "stream": target, "new_id": new_id }));
    }
    if json {
        println!(
            "{}",
            json!({ "dry_run": dry_run, "replayed": replayed, "skipped": skipped })
        );
    } else {
        let verb = if dry_run { "would replay" } else { "replayed" };
        println!(
            "{verb} {}, skipped {} of {} selected",
            replayed.len(),
            skipped.len(),
            selected.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; anything but `y`/`yes` is a no.
fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

async fn purge(
    letters: &mut DeadLetters,
    selected: Vec<DeadLetter>,
    dry_run: bool,
    yes: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let ids: Vec<&str> = selected.iter().map(|l| l.id.as_str()).collect();
    if !dry_run && !yes && !ids.is_empty() {
        if !std::io::stdin().is_terminal() {
            eprintln!(
                "error: purging {} dead letters needs --yes when stdin is not a terminal (or --dry-run to see them)",
                ids.len()
            );
            return Ok(ExitCode::from(2));
        }
        if !confirm(&format!(
            "Delete {} dead letters from {}?",
            ids.len(),
            letters.stream
        ))? {
            eprintln!("nothing deleted");
            return Ok(ExitCode::from(1));
        }
    }
    let mut deleted = 0i64;
    if !dry_run {
        for chunk in ids.chunks(PAGE) {
            let n: i64 = redis::cmd("XDEL")
                .arg(&letters.stream)
                .arg(chunk)
                .query_async(&mut letters.conn)
                .await
                .with_context(|| {
                    format!("XDEL on {} ({deleted} deleted so far)", letters.stream)
                })?;
            deleted += n;
        }
    }
    if json {
        println!(
            "{}",
            json!({ "dry_run": dry_run, "selected": ids, "deleted": deleted })
        );
    } else if dry_run {
        for letter in &selected {
            println!(
                "would delete {}  {}: {}",
                letter.id,
                letter.class(),
                letter.meta("error")
            );
        }
        println!("would delete {} (dry run: nothing deleted)", ids.len());
    } else {
        println!("deleted {deleted} of {} selected", ids.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn a_dead_letter_splits_into_the_entry_and_the_metadata() {
        let letter = DeadLetter::parse(entry(
            "5-0",
            &[
                ("v", "{}"),
                ("error", "an original field of that name"),
                ("error", "body is not an object"),
                ("error_class", "invalid_event"),
                ("source_stream", "s"),
                ("source_id", "4-0"),
                ("group", "g"),
                ("consumer", "c"),
            ],
        ));
        assert_eq!(letter.meta("error"), "body is not an object");
        assert_eq!(letter.meta("source_id"), "4-0");
        let names: Vec<&str> = letter.original.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["v", "error"]);
        assert_eq!(letter.not_copied(), None);

        let by_reference = DeadLetter::parse(entry(
            "6-0",
            &[
                (NOT_COPIED, "4000"),
                ("error", "x"),
                ("error_class", "invalid_event"),
                ("source_stream", "s"),
                ("source_id", "1-0"),
                ("group", "g"),
                ("consumer", "c"),
            ],
        ));
        assert_eq!(by_reference.not_copied(), Some("4000"));
        assert!(not_replayable(&by_reference, &["s".into()]).is_some());
        assert!(not_replayable(&letter, &["s".into()]).is_none());
        assert!(not_replayable(&letter, &["other".into()]).is_some());
    }

    #[test]
    fn reasons_differing_in_values_share_a_pattern_that_matches_them() {
        let a = "sink `table`: column `points2`: cannot write \"twelve\" as bigint";
        let b = "sink `table`: column `points2`: cannot write \"a \\\"quoted\\\" one\" as bigint";
        assert_eq!(reason_pattern(a), reason_pattern(b));
        assert_eq!(
            reason_pattern(a),
            "sink `table`: column `points2`: cannot write \"*\" as bigint"
        );
        let over = "delivered 6 times, over max_deliveries 5";
        assert_eq!(
            reason_pattern(over),
            "delivered * times, over max_deliveries *"
        );
        for message in [a, b, over] {
            assert!(glob_matches(&reason_pattern(message), message), "{message}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_ages() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            parse_time("1h", now).unwrap(),
            (1_800_000_000 - 3600) * 1000
        );
        assert_eq!(
            parse_time("2026-11-25T10:00:00Z", now).unwrap(),
            1_795_600_800_000
        );
        assert!(
            parse_time("yesterday", now)
                .unwrap_err()
                .to_string()
                .contains("neither an RFC 3339 time")
        );
    }
}
