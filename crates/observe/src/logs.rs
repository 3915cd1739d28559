//! The log store: every instance's output, line by line, kept by role after its instances are
//! gone (as the talks' Fluentd kept logs off disposable servers).
//!
//! Layout, under the store's directory: `ROLE/SEQ.jsonl` is a role's active segment (one JSON
//! object a line), `ROLE/SEQ.jsonl.gz` its sealed ones (gzip), `SEQ` a 10-digit number that
//! only grows. A segment is sealed past `segment_bytes`; sealed segments go oldest first while
//! the role holds more than `max_bytes` or their newest line is older than `max_age`. One
//! writer appends; readers (`phoenix logs`, even without `phoenix up`) read the files.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One line an instance wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When Phoenix read it, ms since the epoch.
    #[serde(with = "phoenix_image::wire_time")]
    pub at: i64,
    pub stream: Stream,
    pub instance: String,
    pub generation: i64,
    /// The instance's image (its short digest).
    pub image: String,
    pub text: String,
    /// The line went on past the length limit: the rest follows in the next line(s).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub split: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How much a role keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_bytes: u64,
    pub max_age_ms: i64,
    /// An active segment past this is sealed (compressed).
    pub segment_bytes: u64,
}

impl Retention {
    /// Keeps at most `max_bytes` and lines no older than `max_age_ms`; segments are an
    /// eighth of `max_bytes`, at most 8 MiB, so pruning takes small steps.
    pub fn new(max_bytes: u64, max_age_ms: i64) -> Retention {
        Retention {
            max_bytes,
            max_age_ms,
            segment_bytes: (max_bytes / 8).clamp(64 << 10, 8 << 20),
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_bytes: 1 << 30,
            max_age_ms: 7 * 24 * 3600 * 1000,
            segment_bytes: 8 << 20,
        }
    }
}

/// The longest line kept whole; longer ones are split and marked.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits `text` (one line, without its newline) into pieces of at most [`MAX_LINE`] bytes on
/// character boundaries; every piece but the last is marked `split`.
pub fn split_line(text: &str) -> Vec<(String, bool)> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push((rest[..cut].to_string(), true));
        rest = &rest[cut..];
    }
    pieces.push((rest.to_string(), false));
    pieces
}

/// The writer's side of the store.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    /// Every role's retention unless `retentions` has its own.
    retention: Retention,
    retentions: Mutex<BTreeMap<String, Retention>>,
    active: Mutex<BTreeMap<String, Active>>,
    /// Seals (compression and pruning) run here, so a seal never holds up an append.
    sealer: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    sealing: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Work for the sealing thread.
enum Job {
    Seal(Seal),
    /// Answered once every seal asked for before it is done.
    Synced(std::sync::mpsc::Sender<()>),
}

/// A segment to compress, and the pruning after it.
struct Seal {
    role_dir: PathBuf,
    seq: u64,
    /// What the segment holds, when the writer saw every line of it.
    index: Option<Index>,
    retention: Retention,
    now_ms: i64,
}

impl Drop for LogStore {
    /// Waits for the seals under way.
    fn drop(&mut self) {
        self.sealer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = self
            .sealing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct Active {
    seq: u64,
    file: File,
    bytes: u64,
    /// Kept as lines are appended; `None` once another writer appended too.
    index: Option<Index>,
}

impl LogStore {
    pub fn open(dir: impl Into<PathBuf>, retention: Retention) -> io::Result<LogStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let (sealer, seals) = std::sync::mpsc::channel::<Job>();
        let sealing = std::thread::Builder::new()
            .name("phoenix-seal".into())
            .spawn(move || {
                for job in seals {
                    let job = match job {
                        Job::Seal(job) => job,
                        Job::Synced(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    let sealed = seal(&job.role_dir, job.seq, job.index)
                        .and_then(|()| prune(&job.role_dir, &job.retention, job.now_ms));
                    if let Err(error) = sealed {
                        eprintln!(
                            "phoenix: cannot seal log segment {} of {}: {error}",
                            job.seq,
                            job.role_dir.display()
                        );
                    }
                }
            })?;
        Ok(LogStore {
            dir,
            retention,
            retentions: Mutex::new(BTreeMap::new()),
            active: Mutex::new(BTreeMap::new()),
            sealer: Mutex::new(Some(sealer)),
            sealing: Mutex::new(Some(sealing)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Gives role `role` its own retention (from its next append).
    pub fn set_retention(&self, role: &str, retention: Retention) {
        let mut retentions = self.retentions.lock().unwrap_or_else(|p| p.into_inner());
        retentions.insert(role.to_string(), retention);
    }

    fn seal_later(
        &self,
        role_dir: &Path,
        seq: u64,
        index: Option<Index>,
        retention: Retention,
        now_ms: i64,
    ) {
        let job = Seal {
            role_dir: role_dir.to_path_buf(),
            seq,
            index,
            retention,
            now_ms,
        };
        let sealer = self.sealer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sealer) = sealer.as_ref() {
            let _ = sealer.send(Job::Seal(job));
        }
    }

    /// Returns once the seals asked for so far are done.
    pub fn sync(&self) {
        let (done, synced) = std::sync::mpsc::channel();
        let sent = {
            let sealer = self.sealer.lock().unwrap_or_else(|p| p.into_inner());
            sealer
                .as_ref()
                .is_some_and(|s| s.send(Job::Synced(done)).is_ok())
        };
        if sent {
            let _ = synced.recv();
        }
    }

    fn retention_of(&self, role: &str) -> Retention {
        let retentions = self.retentions.lock().unwrap_or_else(|p| p.into_inner());
        retentions.get(role).copied().unwrap_or(self.retention)
    }

    /// Appends `lines` of `role` (in the order given); seals and prunes as the retention says.
    pub fn append(&self, role: &str, lines: &[LogLine], now_ms: i64) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let role_dir = role_dir(&self.dir, role)?;
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        // Another program may write the same role (`phoenix verify` beside `phoenix up`): one
        // writer at a time, and a segment another one sealed is left for the new active one.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(role_dir.join(".lock"))?;
        lock.lock()?;
        let retention = self.retention_of(role);
        let segment = match active.entry(role.to_string()) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                // Segments a previous writer left unsealed are sealed now.
                for seq in leftovers(&role_dir)? {
                    self.seal_later(&role_dir, seq, None, retention, now_ms);
                }
                entry.insert(open_active(&role_dir)?)
            }
        };
        // Another writer moved on to a newer segment (or sealed this one): follow it.
        let next_exists = role_dir.join(segment_name(segment.seq + 1, false)).exists()
            || role_dir.join(segment_name(segment.seq + 1, true)).exists();
        let meta = segment.file.metadata()?;
        if next_exists || std::os::unix::fs::MetadataExt::nlink(&meta) == 0 {
            *segment = open_active(&role_dir)?;
        } else if meta.len() != segment.bytes {
            segment.bytes = meta.len();
            segment.index = None;
        }
        let mut buf = Vec::with_capacity(lines.len() * 192);
        let mut second = (i64::MIN, String::new());
        for line in lines {
            encode(line, &mut buf, &mut second)?;
            if let Some(index) = &mut segment.index {
                index.add(line);
            }
        }
        segment.file.write_all(&buf)?;
        segment.bytes += buf.len() as u64;
        if segment.bytes >= retention.segment_bytes {
            let full = std::mem::replace(segment, new_active(&role_dir, segment.seq + 1)?);
            self.seal_later(&role_dir, full.seq, full.index, retention, now_ms);
        }
        Ok(())
    }
}

/// Appends `line` as one JSON line, as serde would write it, without formatting the time
/// afresh for every line: `second` keeps the last second's RFC 3339 text.
fn encode(line: &LogLine, buf: &mut Vec<u8>, second: &mut (i64, String)) -> io::Result<()> {
    let whole = line.at.div_euclid(1000);
    if second.0 != whole {
        let text = phoenix_image::rfc3339_ms(whole * 1000);
        *second = (whole, text[..20].to_string());
    }
    let stream = match line.stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    buf.extend_from_slice(b"{\"at\":\"");
    buf.extend_from_slice(second.1.as_bytes());
    buf.extend_from_slice(
        format!(
            "{:03}Z\",\"stream\":\"{stream}\",\"instance\":",
            line.at.rem_euclid(1000)
        )
        .as_bytes(),
    );
    serde_json::to_writer(&mut *buf, &line.instance).map_err(io::Error::other)?;
    buf.extend_from_slice(format!(",\"generation\":{},\"image\":", line.generation).as_bytes());
    serde_json::to_writer(&mut *buf, &line.image).map_err(io::Error::other)?;
    buf.extend_from_slice(b",\"text\":");
    serde_json::to_writer(&mut *buf, &line.text).map_err(io::Error::other)?;
    if line.split {
        buf.extend_from_slice(b",\"split\":true");
    }
    buf.extend_from_slice(b"}\n");
    Ok(())
}

/// `DIR/ROLE`, refusing a role name that is not a plain file name.
fn role_dir(dir: &Path, role: &str) -> io::Result<PathBuf> {
    let plain = !role.is_empty()
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !plain {
        return Err(io::Error::other(format!("bad role name {role:?}")));
    }
    let path = dir.join(role);
    fs::create_dir_all(&path)?;
    Ok(path)
}

fn segment_name(seq: u64, sealed: bool) -> String {
    if sealed {
        format!("{seq:010}.jsonl.gz")
    } else {
        format!("{seq:010}.jsonl")
    }
}

/// The segments of a role directory, oldest first: (seq, sealed, path).
fn segments(role_dir: &Path) -> io::Result<Vec<(u64, bool, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(role_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let (stem, sealed) = match name.strip_suffix(".jsonl.gz") {
            Some(stem) => (stem.to_string(), true),
            None => match name.strip_suffix(".jsonl") {
                Some(stem) => (stem.to_string(), false),
                None => continue,
            },
        };
        if let Ok(seq) = stem.parse::<u64>() {
            found.push((seq, sealed, entry.path()));
        }
    }
    found.sort_by_key(|(seq, sealed, _)| (*seq, *sealed));
    // Plain and sealed both, while a seal finishes: the sealed one is whole.
    found.dedup_by(|later, earlier| {
        later.0 == earlier.0 && {
            std::mem::swap(later, earlier);
            true
        }
    });
    Ok(found)
}

/// Unsealed segments older than the newest one (a writer stopped before sealing them); stale
/// temporary files of an interrupted seal go.
fn leftovers(role_dir: &Path) -> io::Result<Vec<u64>> {
    for entry in fs::read_dir(role_dir)?.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let all = segments(role_dir)?;
    let newest = all.last().map(|(seq, _, _)| *seq);
    Ok(all
        .iter()
        .filter(|(seq, sealed, _)| !sealed && Some(*seq) != newest)
        .map(|(seq, _, _)| *seq)
        .collect())
}

/// The newest unsealed segment to append to (one a previous writer left), or a new one.
fn open_active(role_dir: &Path) -> io::Result<Active> {
    let all = segments(role_dir)?;
    match all.last() {
        Some((seq, false, path)) => {
            let file = OpenOptions::new().append(true).open(path)?;
            let bytes = file.metadata()?.len();
            Ok(Active {
                seq: *seq,
                file,
                bytes,
                index: None,
            })
        }
        Some((seq, true, _)) => new_active(role_dir, seq + 1),
        None => new_active(role_dir, 1),
    }
}

fn new_active(role_dir: &Path, seq: u64) -> io::Result<Active> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(role_dir.join(segment_name(seq, false)))?;
    Ok(Active {
        seq,
        file,
        bytes: 0,
        index: Some(Index::default()),
    })
}

/// What a sealed segment holds, in `SEQ.idx` beside it: readers skip a segment without
/// decompressing it when its times, instances or generations cannot match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Index {
    first_at: i64,
    last_at: i64,
    lines: u64,
    instances: Vec<String>,
    generations: Vec<i64>,
}

impl Index {
    fn of(lines: &[LogLine]) -> Index {
        let mut index = Index::default();
        for line in lines {
            index.add(line);
        }
        index
    }

    fn add(&mut self, line: &LogLine) {
        if self.lines == 0 {
            self.first_at = line.at;
        }
        self.last_at = self.last_at.max(line.at);
        self.lines += 1;
        if !self.instances.contains(&line.instance) {
            self.instances.push(line.instance.clone());
        }
        if !self.generations.contains(&line.generation) {
            self.generations.push(line.generation);
        }
    }

    /// Whether a line of this segment could match `query`.
    fn may_match(&self, query: &Query) -> bool {
        query.since.is_none_or(|t| self.last_at >= t)
            && query.until.is_none_or(|t| self.first_at <= t)
            && query
                .instance
                .as_ref()
                .is_none_or(|i| self.instances.contains(i))
            && query
                .generation
                .is_none_or(|g| self.generations.contains(&g))
    }
}

fn index_path(role_dir: &Path, seq: u64) -> PathBuf {
    role_dir.join(format!("{seq:010}.idx"))
}

/// The index of sealed segment `seq`, or one made from its lines (an older store).
fn index_of(role_dir: &Path, seq: u64) -> Option<Index> {
    if let Ok(bytes) = fs::read(index_path(role_dir, seq))
        && let Ok(index) = serde_json::from_slice(&bytes)
    {
        return Some(index);
    }
    let lines = read_segment(&role_dir.join(segment_name(seq, true)), true).ok()?;
    Some(Index::of(&lines))
}

/// Compresses segment `seq` (written whole under a temporary name, then renamed) and writes
/// its index (`index`, or one made from its lines).
fn seal(role_dir: &Path, seq: u64, index: Option<Index>) -> io::Result<()> {
    let plain = role_dir.join(segment_name(seq, false));
    let sealed = role_dir.join(segment_name(seq, true));
    let tmp = role_dir.join(format!("{seq:010}.tmp"));
    let index = match index {
        Some(index) => index,
        None => Index::of(&read_segment(&plain, false)?),
    };
    fs::write(
        index_path(role_dir, seq),
        serde_json::to_vec(&index).map_err(io::Error::other)?,
    )?;
    {
        let mut input = File::open(&plain)?;
        let out = File::create(&tmp)?;
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
        io::copy(&mut input, &mut gz)?;
        gz.finish()?.sync_all()?;
    }
    fs::rename(&tmp, &sealed)?;
    fs::remove_file(&plain)
}

/// Removes sealed segments, oldest first, past the role's size or age.
fn prune(role_dir: &Path, retention: &Retention, now_ms: i64) -> io::Result<()> {
    let all = segments(role_dir)?;
    let mut total: u64 = all
        .iter()
        .map(|(_, _, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    for (seq, sealed, path) in &all {
        if !sealed {
            continue;
        }
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let too_old = index_of(role_dir, *seq)
            .is_some_and(|index| now_ms - index.last_at > retention.max_age_ms);
        if total <= retention.max_bytes && !too_old {
            break;
        }
        fs::remove_file(path)?;
        let _ = fs::remove_file(index_path(role_dir, *seq));
        total = total.saturating_sub(size);
    }
    Ok(())
}

/// Every line of a segment; a line that does not parse (a torn write) is skipped.
fn read_segment(path: &Path, sealed: bool) -> io::Result<Vec<LogLine>> {
    let file = File::open(path)?;
    let reader: Box<dyn Read> = if sealed {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut lines = Vec::new();
    for raw in BufReader::new(reader).split(b'\n') {
        if let Ok(line) = serde_json::from_slice::<LogLine>(&raw?) {
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Which lines to read.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub role: String,
    pub instance: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub generation: Option<i64>,
    pub grep: Option<regex::Regex>,
}

impl Query {
    fn matches(&self, line: &LogLine) -> bool {
        self.instance.as_ref().is_none_or(|i| *i == line.instance)
            && self.since.is_none_or(|t| line.at >= t)
            && self.until.is_none_or(|t| line.at <= t)
            && self.generation.is_none_or(|g| g == line.generation)
            && self.grep.as_ref().is_none_or(|re| re.is_match(&line.text))
    }
}

/// Where a reader is in a role's logs: the active segment and the bytes read of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    #[serde(rename = "segment")]
    pub seq: u64,
    pub offset: u64,
}

/// The end of what role `role` has in the store now: a journal entry carries it, so its lines
/// are those before it.
pub fn end_position(dir: &Path, role: &str) -> Position {
    let Ok(all) = segments(&dir.join(role)) else {
        return Position::default();
    };
    match all.last() {
        Some((seq, false, path)) => Position {
            seq: *seq,
            offset: fs::metadata(path).map_or(0, |m| m.len()),
        },
        Some((seq, true, _)) => Position {
            seq: seq + 1,
            offset: 0,
        },
        None => Position::default(),
    }
}

/// Reads the lines `query` asks for, in time order, from the store at `dir`; returns them and
/// the position after the last (to follow from). Segments are read on every core at once.
pub fn read(dir: &Path, query: &Query) -> io::Result<(Vec<LogLine>, Position)> {
    let role_dir = dir.join(&query.role);
    if !role_dir.is_dir() {
        return Ok((Vec::new(), Position::default()));
    }
    let all = segments(&role_dir)?;
    // A sealed segment that cannot match is skipped by its index, undecompressed.
    let wanted: Vec<&(u64, bool, PathBuf)> = all
        .iter()
        .filter(|(seq, sealed, _)| {
            !*sealed || index_of(&role_dir, *seq).is_none_or(|index| index.may_match(query))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(wanted.len().max(1));
    let mut parts: Vec<(usize, io::Result<Part>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((seq, sealed, path)) = wanted.get(i) else {
                            return done;
                        };
                        done.push((i, read_part(&role_dir, *seq, *sealed, path, query)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    parts.sort_by_key(|(i, _)| *i);
    let mut lines = Vec::new();
    let mut consumed = None;
    for (i, part) in parts {
        let (found, bytes) = part?;
        lines.extend(found);
        if !wanted[i].1 {
            consumed = Some((wanted[i].0, bytes));
        }
    }
    let position = match (all.last(), consumed) {
        // The active segment: as far as its whole lines were read.
        (Some((seq, false, _)), Some((read_seq, bytes))) if *seq == read_seq => Position {
            seq: *seq,
            offset: bytes,
        },
        (Some((seq, false, _)), _) => Position {
            seq: *seq,
            offset: 0,
        },
        (Some((seq, true, _)), _) => Position {
            seq: seq + 1,
            offset: 0,
        },
        (None, _) => Position::default(),
    };
    // Lines of several instances arrive interleaved: stable by time.
    lines.sort_by_key(|l| l.at);
    Ok((lines, position))
}

/// What one segment gave a read: its matching lines, and how many bytes of whole lines it held.
type Part = (Vec<LogLine>, u64);

/// The lines of one segment that match `query`, and how many bytes of whole lines it held.
fn read_part(
    role_dir: &Path,
    seq: u64,
    sealed: bool,
    path: &Path,
    query: &Query,
) -> io::Result<Part> {
    let bytes = match segment_bytes(path, sealed) {
        Ok(bytes) => bytes,
        // Sealed (renamed) between the listing and the read: read the sealed one.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !sealed => {
            segment_bytes(&role_dir.join(segment_name(seq, true)), true)?
        }
        // Pruned meanwhile: nothing of it is kept.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Ok((matching(&bytes[..whole], query), whole as u64))
}

fn segment_bytes(path: &Path, sealed: bool) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    if sealed {
        flate2::read::GzDecoder::new(file).read_to_end(&mut bytes)?;
    } else {
        BufReader::new(file).read_to_end(&mut bytes)?;
    }
    Ok(bytes)
}

/// A stored line read in place, for filtering before a line is copied out.
#[derive(Deserialize)]
struct LineView<'a> {
    #[serde(borrow)]
    at: &'a str,
    #[serde(borrow)]
    instance: std::borrow::Cow<'a, str>,
    generation: i64,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

impl Query {
    /// Whether a line matches, judged on its view; the time is parsed only when asked for.
    fn matches_view(&self, view: &LineView<'_>) -> bool {
        if self.instance.as_ref().is_some_and(|i| *i != view.instance)
            || self.generation.is_some_and(|g| g != view.generation)
            || self
                .grep
                .as_ref()
                .is_some_and(|re| !re.is_match(&view.text))
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Some(at) = phoenix_image::parse_rfc3339_ms(view.at) else {
            return false;
        };
        self.since.is_none_or(|t| at >= t) && self.until.is_none_or(|t| at <= t)
    }
}

/// The lines of `bytes` (whole JSON lines) that match `query`; a line that does not parse (a
/// torn write) is skipped.
fn matching(bytes: &[u8], query: &Query) -> Vec<LogLine> {
    let mut lines = Vec::new();
    for raw in bytes.split(|b| *b == b'\n') {
        let Ok(view) = serde_json::from_slice::<LineView<'_>>(raw) else {
            continue;
        };
        if query.matches_view(&view)
            && let Ok(line) = serde_json::from_slice::<LogLine>(raw)
        {
            lines.push(line);
        }
    }
    lines
}

/// The lines written after `from` (for `phoenix logs -f`), and the new position. Follows the
/// writer from one segment to the next.
pub fn read_after(
    dir: &Path,
    query: &Query,
    from: Position,
) -> io::Result<(Vec<LogLine>, Position)> {
    read_from(dir, query, from, usize::MAX)
}

/// At most `limit` lines matching `query` written after `from`, in the order written, and the
/// position just after the last line read (a forwarder resumes there exactly).
pub fn read_from(
    dir: &Path,
    query: &Query,
    from: Position,
    limit: usize,
) -> io::Result<(Vec<LogLine>, Position)> {
    let role_dir = dir.join(&query.role);
    let mut lines = Vec::new();
    let mut position = from;
    if !role_dir.is_dir() {
        return Ok((lines, position));
    }
    let all = segments(&role_dir)?;
    let newest = all.last().map(|(seq, _, _)| *seq);
    for (seq, sealed, path) in all {
        let is_last = Some(seq) == newest;
        if seq < position.seq {
            continue;
        }
        let skip = if seq == position.seq {
            position.offset
        } else {
            0
        };
        let bytes = if sealed {
            let mut all = Vec::new();
            flate2::read::GzDecoder::new(File::open(&path)?).read_to_end(&mut all)?;
            let len = all.len() as u64;
            all.split_off(skip.min(len) as usize)
        } else {
            let mut file = match File::open(&path) {
                Ok(file) => file,
                // Sealed since the listing: the next read finds it sealed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            };
            io::Seek::seek(&mut file, io::SeekFrom::Start(skip))?;
            let mut all = Vec::new();
            file.read_to_end(&mut all)?;
            all
        };
        position = Position { seq, offset: skip };
        let mut rest = &bytes[..];
        // Only whole lines: a line being written is read next time.
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            if lines.len() >= limit {
                return Ok((lines, position));
            }
            if let Ok(line) = serde_json::from_slice::<LogLine>(&rest[..end])
                && query.matches(&line)
            {
                lines.push(line);
            }
            position.offset += end as u64 + 1;
            rest = &rest[end + 1..];
        }
        if sealed || !is_last {
            position = Position {
                seq: seq + 1,
                offset: 0,
            };
        } else {
            // The active segment: everything whole is read.
            break;
        }
    }
    Ok((lines, position))
}

/// The last `count` lines of `instance` (of role `role`), oldest first: what a failure shows.
pub fn tail(dir: &Path, role: &str, instance: &str, count: usize) -> Vec<LogLine> {
    let query = Query {
        role: role.to_string(),
        instance: Some(instance.to_string()),
        ..Query::default()
    };
    let Ok(all) = segments(&dir.join(role)) else {
        return Vec::new();
    };
    // Newest segments first, until enough lines are found.
    let mut found: Vec<LogLine> = Vec::new();
    for (_, sealed, path) in all.iter().rev() {
        let Ok(segment) = read_segment(path, *sealed) else {
            continue;
        };
        let mut mine: Vec<LogLine> = segment.into_iter().filter(|l| query.matches(l)).collect();
        mine.append(&mut found);
        found = mine;
        if found.len() >= count {
            break;
        }
    }
    let skip = found.len().saturating_sub(count);
    found.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at: i64, instance: &str, text: &str) -> LogLine {
        LogLine {
            at,
            stream: Stream::Stdout,
            instance: instance.into(),
            generation: 1,
            image: "abc".into(),
            text: text.into(),
            split: false,
        }
    }

    #[test]
    fn lines_are_kept_by_role_sealed_compressed_read_in_order_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_bytes: 20_000,
            max_age_ms: 1_000_000,
            segment_bytes: 4_000,
        };
        let store = LogStore::open(dir.path(), retention).unwrap();
        for i in 0..400 {
            let instance = if i % 2 == 0 { "web-a" } else { "web-b" };
            store
                .append("web", &[line(i, instance, &format!("line {i}"))], i)
                .unwrap();
        }
        store.sync();
        let files = segments(&dir.path().join("web")).unwrap();
        assert!(files.iter().filter(|(_, sealed, _)| *sealed).count() >= 3);
        assert_eq!(files.iter().filter(|(_, sealed, _)| !sealed).count(), 1);
        // Older sealed segments went to stay within 20,000 bytes.
        let total: u64 = files
            .iter()
            .map(|(_, _, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert!(total <= 20_000 + 4_000, "{total}");
        let query = Query {
            role: "web".into(),
            ..Query::default()
        };
        let (all, position) = read(dir.path(), &query).unwrap();
        assert_eq!(all.last().unwrap().text, "line 399");
        assert!(all.windows(2).all(|w| w[0].at <= w[1].at));
        // Nothing lost between the oldest kept line and the newest.
        let first = all[0].at;
        assert_eq!(all.len() as i64, 400 - first);

        // Following: what comes after the position, across a seal.
        for i in 400..500 {
            store
                .append("web", &[line(i, "web-a", &format!("line {i}"))], i)
                .unwrap();
        }
        // A read racing a seal stops at the segment being sealed (the next read goes on from
        // there); this one waits for the seals, so it gets everything at once.
        store.sync();
        let (after, _) = read_after(dir.path(), &query, position).unwrap();
        let texts: Vec<_> = after.iter().map(|l| l.at).collect();
        assert_eq!(texts, (400..500).collect::<Vec<_>>());

        // Filters and the tail of one instance.
        let grep = Query {
            role: "web".into(),
            instance: Some("web-b".into()),
            grep: Some(regex::Regex::new("line 3[0-9]9$").unwrap()),
            ..Query::default()
        };
        let (found, _) = read(dir.path(), &grep).unwrap();
        let texts: Vec<_> = found.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "line 309", "line 319", "line 329", "line 339", "line 349", "line 359", "line 369",
                "line 379", "line 389", "line 399"
            ]
        );
        let last = tail(dir.path(), "web", "web-b", 3);
        let texts: Vec<_> = last.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["line 395", "line 397", "line 399"]);
    }

    #[test]
    fn reading_in_batches_resumes_exactly_across_seals() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            segment_bytes: 1_500,
            ..Retention::default()
        };
        let store = LogStore::open(dir.path(), retention).unwrap();
        let query = Query {
            role: "web".into(),
            ..Query::default()
        };
        let (mut seen, mut position) = (Vec::new(), Position::default());
        for i in 0..300 {
            store
                .append("web", &[line(i, "web-a", &format!("line {i}"))], i)
                .unwrap();
            if i % 40 == 0 {
                // A reader keeping up in batches of 7, as a forwarder does.
                loop {
                    let (batch, next) = read_from(dir.path(), &query, position, 7).unwrap();
                    assert!(batch.len() <= 7);
                    position = next;
                    if batch.is_empty() {
                        break;
                    }
                    seen.extend(batch.into_iter().map(|l| l.at));
                }
            }
        }
        let (rest, _) = read_from(dir.path(), &query, position, usize::MAX).unwrap();
        seen.extend(rest.into_iter().map(|l| l.at));
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
        assert!(segments(&dir.path().join("web")).unwrap().len() > 5);
    }

    #[test]
    fn two_writers_of_one_role_lose_nothing_across_seals() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            segment_bytes: 3_000,
            ..Retention::default()
        };
        // Two stores on one directory, as `phoenix up` and `phoenix verify` are.
        let a = LogStore::open(dir.path(), retention).unwrap();
        let b = LogStore::open(dir.path(), retention).unwrap();
        for i in 0..400 {
            let store = if i % 3 == 0 { &b } else { &a };
            store
                .append("web", &[line(i, "web-a", &format!("line {i}"))], i)
                .unwrap();
        }
        a.sync();
        b.sync();
        let (all, _) = read(
            dir.path(),
            &Query {
                role: "web".into(),
                ..Query::default()
            },
        )
        .unwrap();
        assert_eq!(
            all.iter().map(|l| l.at).collect::<Vec<_>>(),
            (0..400).collect::<Vec<_>>()
        );
        let files = segments(&dir.path().join("web")).unwrap();
        assert_eq!(files.iter().filter(|(_, sealed, _)| !sealed).count(), 1);
        assert!(files.len() > 5);
    }

    #[test]
    fn sealed_segments_have_an_index_that_spares_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            segment_bytes: 2_000,
            ..Retention::default()
        };
        let store = LogStore::open(dir.path(), retention).unwrap();
        for i in 0..100 {
            let mut l = line(i * 1000, "web-a", &format!("line {i}"));
            l.generation = 1 + i / 50;
            store.append("web", &[l], i * 1000).unwrap();
        }
        let role_dir = dir.path().join("web");
        store.sync();
        let sealed: Vec<u64> = segments(&role_dir)
            .unwrap()
            .into_iter()
            .filter(|(_, sealed, _)| *sealed)
            .map(|(seq, _, _)| seq)
            .collect();
        assert!(sealed.len() >= 2);
        let first = index_of(&role_dir, sealed[0]).unwrap();
        assert_eq!(
            (first.first_at, first.instances.clone()),
            (0, vec!["web-a".to_string()])
        );
        assert!(first.lines > 0 && first.last_at > 0);
        // A sealed segment whose index says no is not read: corrupt one, the answer stands.
        fs::write(role_dir.join(segment_name(sealed[0], true)), b"not gzip").unwrap();
        let query = Query {
            role: "web".into(),
            generation: Some(2),
            ..Query::default()
        };
        let (found, _) = read(dir.path(), &query).unwrap();
        assert_eq!(found.len(), 50);
        assert!(found.iter().all(|l| l.generation == 2));
    }

    #[test]
    fn sealed_segments_past_their_age_go() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_bytes: u64::MAX,
            max_age_ms: 1_000,
            segment_bytes: 200,
        };
        let store = LogStore::open(dir.path(), retention).unwrap();
        for i in 0..20 {
            store
                .append("web", &[line(i, "web-a", "old line")], i)
                .unwrap();
        }
        store
            .append("web", &[line(50_000, "web-a", &"new ".repeat(60))], 50_000)
            .unwrap();
        store.sync();
        let (all, _) = read(
            dir.path(),
            &Query {
                role: "web".into(),
                ..Query::default()
            },
        )
        .unwrap();
        assert!(all.iter().all(|l| l.at >= 50_000), "{all:?}");
    }

    #[test]
    fn lines_are_encoded_as_serde_writes_them() {
        let mut second = (i64::MIN, String::new());
        for (at, text, split) in [
            (1_796_000_000_123, "plain", false),
            (1_796_000_000_999, "quote \" and \\ and \u{1} and é", true),
            (1_796_000_001_000, "", false),
            (5, "early", false),
        ] {
            let mut l = line(at, "web-\"x", text);
            l.split = split;
            let mut buf = Vec::new();
            encode(&l, &mut buf, &mut second).unwrap();
            let mut expected = serde_json::to_vec(&l).unwrap();
            expected.push(b'\n');
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }

    #[test]
    fn long_lines_are_split_on_character_boundaries_and_marked() {
        let text = "é".repeat(MAX_LINE); // 2 bytes a character
        let pieces = split_line(&text);
        assert_eq!(pieces.len(), 2);
        assert!(pieces[0].1 && !pieces[1].1);
        assert!(pieces.iter().all(|(p, _)| p.len() <= MAX_LINE));
        let joined: String = pieces.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(joined, text);
        assert_eq!(split_line("short"), vec![("short".to_string(), false)]);
    }

    #[test]
    fn a_role_name_that_is_not_a_plain_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Retention::default()).unwrap();
        for bad in ["../x", "a/b", "", "."] {
            assert!(store.append(bad, &[line(1, "x", "y")], 1).is_err(), "{bad}");
        }
    }
}
