//! Parallel, reproducible gzip: the stream is cut into fixed-size chunks, each compressed on a
//! worker thread into its own gzip member (no name, time 0), and the members are written in
//! order. A multi-member gzip file is one valid gzip stream (RFC 1952, section 2.2) that Go's,
//! zlib's and flate2's multi-member readers decode. Chunk boundaries depend only on the
//! bytes, never on the thread count, so the output is the same on every machine.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;

use flate2::{Compression, GzBuilder};

/// Bytes per gzip member: large enough that the ratio matches one stream within a fraction of
/// a percent, small enough to keep two cores busy on a few megabytes.
pub(crate) const CHUNK: usize = 1 << 20;

/// The compression level of `gzip` without options.
const LEVEL: u32 = 6;

type Job = (u64, Vec<u8>);
type Done = (u64, io::Result<Vec<u8>>);

pub(crate) struct ParallelGzip<W: Write> {
    out: W,
    buffer: Vec<u8>,
    jobs: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_job: u64,
    next_write: u64,
    ready: BTreeMap<u64, Vec<u8>>,
}

impl<W: Write> ParallelGzip<W> {
    pub(crate) fn new(out: W) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads);
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        let (report, done) = mpsc::channel::<Done>();
        let workers = (0..threads)
            .map(|_| {
                let (queue, report) = (queue.clone(), report.clone());
                std::thread::spawn(move || {
                    loop {
                        let job = queue.lock().expect("queue lock").recv();
                        let Ok((index, chunk)) = job else { return };
                        if report.send((index, compress(&chunk))).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ParallelGzip {
            out,
            buffer: Vec::with_capacity(CHUNK),
            jobs: Some(jobs),
            done,
            workers,
            next_job: 0,
            next_write: 0,
            ready: BTreeMap::new(),
        }
    }

    /// Compresses what is left, writes every member in order and returns the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.buffer.is_empty() || self.next_job == 0 {
            self.dispatch()?;
        }
        self.jobs = None;
        while self.next_write < self.next_job {
            self.receive_one()?;
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        Ok(self.out)
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        // Bounded memory: at most a few chunks in flight beyond the workers' queue.
        while self.next_job - self.next_write > 2 * self.workers.len() as u64 {
            self.receive_one()?;
        }
        let jobs = self.jobs.as_ref().expect("not finished");
        jobs.send((self.next_job, chunk))
            .map_err(|_| io::Error::other("gzip worker stopped"))?;
        self.next_job += 1;
        while let Ok((index, member)) = self.done.try_recv() {
            self.ready.insert(index, member?);
        }
        self.write_ready()
    }

    fn receive_one(&mut self) -> io::Result<()> {
        let (index, member) = self
            .done
            .recv()
            .map_err(|_| io::Error::other("gzip worker stopped"))?;
        self.ready.insert(index, member?);
        self.write_ready()
    }

    fn write_ready(&mut self) -> io::Result<()> {
        while let Some(member) = self.ready.remove(&self.next_write) {
            self.out.write_all(&member)?;
            self.next_write += 1;
        }
        Ok(())
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            let room = CHUNK - self.buffer.len();
            let take = room.min(buf.len());
            self.buffer.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.buffer.len() == CHUNK {
                self.dispatch()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn compress(chunk: &[u8]) -> io::Result<Vec<u8>> {
    let mut gzip = GzBuilder::new()
        .operating_system(3)
        .write(Vec::with_capacity(chunk.len() / 2), Compression::new(LEVEL));
    gzip.write_all(chunk)?;
    gzip.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn members_decode_to_the_input_and_the_output_is_deterministic() {
        let input: Vec<u8> = (0..(3 * CHUNK + 12345))
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect();
        let encode = |data: &[u8]| {
            let mut gzip = ParallelGzip::new(Vec::new());
            // Uneven writes, as tar produces them.
            for piece in data.chunks(777) {
                gzip.write_all(piece).unwrap();
            }
            gzip.finish().unwrap()
        };
        let once = encode(&input);
        assert_eq!(once, encode(&input));
        let mut decoded = Vec::new();
        flate2::read::MultiGzDecoder::new(&once[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, input);
        // Empty input is still one valid (empty) member.
        let empty = encode(&[]);
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&empty[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }
}
