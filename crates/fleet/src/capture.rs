//! Instances' stdout and stderr, line by line, into the log store
//! (`phoenix_observe::logs`): a reader task per stream stamps each line with its time, stream,
//! role, instance, generation and image; a bounded queue feeds one writer thread. A slow disk
//! never blocks an instance: when the queue is full, lines are dropped and counted per role.
//! The read ends cross `phoenix restart` (a copy of each is kept for the handover).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_observe::logs::{LogLine, LogStore, MAX_LINE, Position, Retention, Stream, split_line};
use tokio::io::AsyncReadExt;

use crate::Clock;

/// Lines waiting for the writer: a burst beyond this is dropped (and counted).
const QUEUE: usize = 65_536;
/// Batches waiting for the writer (each what one read of a pipe gave); lines bound the memory.
const BATCHES: usize = 16_384;

/// Where the log store of state directory `state_dir` is.
pub fn store_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs").join("store")
}

/// Whose output a stream is.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub role: String,
    pub instance: String,
    pub generation: i64,
    pub image: String,
}

pub(crate) struct Capture {
    store_dir: PathBuf,
    store: Arc<LogStore>,
    queue: SyncSender<Item>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
}

/// What the writer is given: a role's lines (what one read of a pipe held), or a request to
/// say when all before it is written.
enum Item {
    Lines(String, Vec<LogLine>),
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Default)]
struct Shared {
    dropped: Mutex<BTreeMap<String, u64>>,
    /// Copies of the read ends by instance and stream, for the handover.
    pipes: Mutex<BTreeMap<(String, &'static str), OwnedFd>>,
    /// Read ends the previous program handed over, until their instance is taken over.
    inherited: Mutex<BTreeMap<(String, &'static str), OwnedFd>>,
    /// Streams still open, by instance; notified as each ends.
    open: Mutex<BTreeMap<String, usize>>,
    ended: tokio::sync::Notify,
    /// Notified after each batch the writer appends (forwarders wake on it).
    written: Arc<tokio::sync::Notify>,
    /// Lines queued for the writer and not yet taken (at most [`QUEUE`]).
    queued: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// Waits (up to `limit`) until every stream of `instance` (of every instance, with `None`)
    /// has ended.
    async fn wait_ended(&self, instance: Option<&str>, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.ended.notified();
                let ended = {
                    let open = lock(&self.open);
                    match instance {
                        Some(instance) => open.get(instance).is_none_or(|n| *n == 0),
                        None => open.values().all(|n| *n == 0),
                    }
                };
                if ended {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

impl Capture {
    /// Starts the writer of the store in `store_dir`.
    pub fn start(store_dir: PathBuf, clock: Arc<dyn Clock>) -> std::io::Result<Capture> {
        let store = Arc::new(LogStore::open(&store_dir, Retention::default())?);
        let (queue, lines) = std::sync::mpsc::sync_channel(BATCHES);
        let shared = Arc::<Shared>::default();
        let (writer_store, writer_clock) = (store.clone(), clock.clone());
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("phoenix-logs".into())
            .spawn(move || write_lines(&writer_store, lines, writer_clock, &writer_shared))?;
        Ok(Capture {
            store_dir,
            store,
            queue,
            clock,
            shared,
        })
    }

    /// Gives each role the retention its fleet file says.
    pub fn set_retentions(&self, roles: &BTreeMap<String, crate::RoleConfig>) {
        for (name, config) in roles {
            let max_age_ms = i64::try_from(config.logs.max_age.as_millis()).unwrap_or(i64::MAX);
            self.store
                .set_retention(name, Retention::new(config.logs.max_size, max_age_ms));
        }
    }

    /// Notified after each batch written to the store.
    pub fn written(&self) -> Arc<tokio::sync::Notify> {
        self.shared.written.clone()
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Pipes for a new instance's stdout and stderr: their read ends are read from now on;
    /// the write ends go to the driver.
    pub fn pipes(&self, source: &Source) -> std::io::Result<phoenix_driver::Output> {
        let (out_read, out_write) = std::io::pipe()?;
        let (err_read, err_write) = std::io::pipe()?;
        self.watch(source, Stream::Stdout, OwnedFd::from(out_read))?;
        self.watch(source, Stream::Stderr, OwnedFd::from(err_read))?;
        Ok(phoenix_driver::Output {
            stdout: Arc::new(OwnedFd::from(out_write)),
            stderr: Arc::new(OwnedFd::from(err_write)),
        })
    }

    /// Reads one stream of `source` until its instance closes it.
    fn watch(&self, source: &Source, stream: Stream, read: OwnedFd) -> std::io::Result<()> {
        let reader = Reader {
            source: source.clone(),
            stream,
            queue: self.queue.clone(),
            clock: self.clock.clone(),
            shared: self.shared.clone(),
        };
        reader.start(read)
    }

    /// Read ends of every running instance's streams, for the next program.
    pub fn handed(&self) -> Vec<(String, &'static str, OwnedFd)> {
        lock(&self.shared.pipes)
            .iter()
            .filter_map(|((instance, stream), fd)| {
                Some((instance.clone(), *stream, fd.try_clone().ok()?))
            })
            .collect()
    }

    /// Keeps the read ends the previous program handed over until their instances are taken
    /// over ([`Capture::resume`]).
    pub fn inherit(&self, outputs: Vec<(String, &'static str, OwnedFd)>) {
        let mut inherited = lock(&self.shared.inherited);
        for (instance, stream, fd) in outputs {
            inherited.insert((instance, stream), fd);
        }
    }

    /// Reads an instance taken over from where the previous program stopped.
    pub fn resume(&self, source: &Source) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let key = (source.instance.clone(), stream_name(stream));
            let Some(fd) = lock(&self.shared.inherited).remove(&key) else {
                continue;
            };
            if let Err(error) = self.watch(source, stream, fd) {
                tracing::warn!(instance = %source.instance, %error, "its output is not captured");
            }
        }
    }

    /// Waits (up to `limit`) until every stream of `instance` has ended: its last lines are
    /// queued then.
    pub async fn wait_ended(&self, instance: &str, limit: Duration) {
        self.shared.wait_ended(Some(instance), limit).await;
        self.flush().await;
    }

    /// Waits (up to `limit`) until every captured stream has ended, then until its lines are
    /// written: at shutdown, the instances' last words are kept.
    pub async fn drain(&self, limit: Duration) {
        self.shared.wait_ended(None, limit).await;
        self.flush().await;
    }

    /// Returns once everything queued so far is written (or after 2 s).
    async fn flush(&self) {
        let (done, written) = std::sync::mpsc::channel();
        let queue = self.queue.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if queue.send(Item::Flush(done)).is_ok() {
                let _ = written.recv_timeout(Duration::from_secs(2));
            }
        })
        .await;
    }

    /// Lines dropped so far because the writer fell behind, by role.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.dropped).clone()
    }
}

/// The output of a one-off process (a verification's instance): read line by line as an
/// instance's is, kept in memory (up to [`QUEUE`] lines, the rest counted), and appended to
/// the store when it ends. No writer thread: the store takes the lines in one batch, under its
/// lock, beside `phoenix up`'s writer.
pub(crate) struct OneOff {
    source: Source,
    store_dir: PathBuf,
    lines: Receiver<Item>,
    shared: Arc<Shared>,
}

impl OneOff {
    /// Pipes for `source`'s stdout and stderr, read from now on.
    pub fn start(
        store_dir: PathBuf,
        source: Source,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<(OneOff, phoenix_driver::Output)> {
        let (queue, lines) = std::sync::mpsc::sync_channel(BATCHES);
        let shared = Arc::<Shared>::default();
        let (out_read, out_write) = std::io::pipe()?;
        let (err_read, err_write) = std::io::pipe()?;
        for (stream, read) in [(Stream::Stdout, out_read), (Stream::Stderr, err_read)] {
            let reader = Reader {
                source: source.clone(),
                stream,
                queue: queue.clone(),
                clock: clock.clone(),
                shared: shared.clone(),
            };
            reader.start(OwnedFd::from(read))?;
        }
        let output = phoenix_driver::Output {
            stdout: Arc::new(OwnedFd::from(out_write)),
            stderr: Arc::new(OwnedFd::from(err_write)),
        };
        let one_off = OneOff {
            source,
            store_dir,
            lines,
            shared,
        };
        Ok((one_off, output))
    }

    /// Waits (up to `limit`) for both streams to end, appends what they said to the store, and
    /// returns it with the store's position after it.
    pub async fn finish(self, limit: Duration, now_ms: i64) -> (Vec<LogLine>, Position) {
        self.shared.wait_ended(None, limit).await;
        let lines: Vec<LogLine> = self
            .lines
            .try_iter()
            .flat_map(|item| match item {
                Item::Lines(_, lines) => lines,
                Item::Flush(_) => Vec::new(),
            })
            .collect();
        let (role, dir, kept) = (
            self.source.role.clone(),
            self.store_dir.clone(),
            lines.clone(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            let store = LogStore::open(&dir, Retention::default())?;
            store.append(&role, &kept, now_ms)?;
            Ok::<_, std::io::Error>(phoenix_observe::logs::end_position(&dir, &role))
        })
        .await;
        let position = match stored {
            Ok(Ok(position)) => position,
            Ok(Err(error)) => {
                tracing::warn!(instance = %self.source.instance, %error, "cannot store its output");
                Position::default()
            }
            Err(_) => Position::default(),
        };
        (lines, position)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

struct Reader {
    source: Source,
    stream: Stream,
    queue: SyncSender<Item>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
}

impl Reader {
    /// Reads `read` in a task of its own, its copy kept for the handover.
    fn start(self, read: OwnedFd) -> std::io::Result<()> {
        let key = (self.source.instance.clone(), stream_name(self.stream));
        let copy = read.try_clone()?;
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
        lock(&self.shared.pipes).insert(key.clone(), copy);
        *lock(&self.shared.open)
            .entry(self.source.instance.clone())
            .or_default() += 1;
        tokio::spawn(self.run(receiver, key));
        Ok(())
    }

    async fn run(
        self,
        mut receiver: tokio::net::unix::pipe::Receiver,
        key: (String, &'static str),
    ) {
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let read = match receiver.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // What one read holds arrived by then: one time for all of it.
            let at = self.clock.now_ms();
            let mut batch = Vec::new();
            pending.extend_from_slice(&chunk[..read]);
            let mut start = 0;
            while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
                self.line(&mut batch, at, &pending[start..start + end], false);
                start += end + 1;
            }
            pending.drain(..start);
            // A line that never ends is kept in pieces, not in memory.
            while pending.len() > MAX_LINE {
                let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                self.line(&mut batch, at, &piece, true);
            }
            self.send(batch);
        }
        if !pending.is_empty() {
            let mut batch = Vec::new();
            self.line(&mut batch, self.clock.now_ms(), &pending, false);
            self.send(batch);
        }
        lock(&self.shared.pipes).remove(&key);
        if let Some(open) = lock(&self.shared.open).get_mut(&self.source.instance) {
            *open = open.saturating_sub(1);
        }
        self.shared.ended.notify_waiters();
    }

    /// Adds the line in `bytes` to `batch` (in pieces if it is longer than [`MAX_LINE`]).
    fn line(&self, batch: &mut Vec<LogLine>, at: i64, bytes: &[u8], continued: bool) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let line = |text: String, split: bool| LogLine {
            at,
            stream: self.stream,
            instance: self.source.instance.clone(),
            generation: self.source.generation,
            image: self.source.image.clone(),
            text,
            split,
        };
        if text.len() <= MAX_LINE {
            batch.push(line(text.to_string(), continued));
            return;
        }
        let pieces = split_line(text);
        let last = pieces.len() - 1;
        for (i, (piece, split)) in pieces.into_iter().enumerate() {
            batch.push(line(piece, split || (continued && i == last)));
        }
    }

    /// Queues `batch` for the writer, or drops and counts it when the queue is full.
    fn send(&self, batch: Vec<LogLine>) {
        use std::sync::atomic::Ordering;
        if batch.is_empty() {
            return;
        }
        let count = batch.len();
        let queued = self.shared.queued.fetch_add(count, Ordering::AcqRel);
        let taken = queued + count <= QUEUE
            && self
                .queue
                .try_send(Item::Lines(self.source.role.clone(), batch))
                .is_ok();
        if !taken {
            self.shared.queued.fetch_sub(count, Ordering::AcqRel);
            *lock(&self.shared.dropped)
                .entry(self.source.role.clone())
                .or_default() += count as u64;
        }
    }
}

/// The writer: takes what is queued, a batch at a time, and appends it by role; a flush is
/// answered once everything before it is written.
fn write_lines(store: &LogStore, queue: Receiver<Item>, clock: Arc<dyn Clock>, shared: &Shared) {
    let mut failing = false;
    while let Ok(first) = queue.recv() {
        let mut batch: BTreeMap<String, Vec<LogLine>> = BTreeMap::new();
        let mut flushes = Vec::new();
        for item in std::iter::once(first).chain(queue.try_iter().take(4096)) {
            match item {
                Item::Lines(role, lines) => {
                    shared
                        .queued
                        .fetch_sub(lines.len(), std::sync::atomic::Ordering::AcqRel);
                    batch.entry(role).or_default().extend(lines);
                }
                Item::Flush(done) => flushes.push(done),
            }
        }
        for (role, lines) in batch {
            match store.append(&role, &lines, clock.now_ms()) {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(%role, %error, "cannot write to the log store");
                }
                Err(_) => {}
            }
        }
        shared.written.notify_waiters();
        for done in flushes {
            let _ = done.send(());
        }
    }
}
