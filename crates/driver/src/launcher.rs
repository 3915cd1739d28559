//! Long-lived children are forked by the process's main thread.
//!
//! Why: `PR_SET_PDEATHSIG` (instances and shims die with Phoenix, even on SIGKILL) fires when
//! the *thread* that forked a child ends, not the process. Tokio's blocking threads end after
//! 10 s idle, and `execve` ends every thread but its caller — so a child forked on a worker
//! thread would be killed by either. The main thread lives as long as the process, and the
//! re-exec of `phoenix restart` runs on it: its children stay its children, running, across
//! the new program.
//!
//! The binary calls [`serve`] from `main`; it runs the program on another thread and carries
//! out [`on_main_thread`] jobs meanwhile. Where nothing serves (unit tests, other binaries),
//! jobs run on the caller's thread.

use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::ThreadId;

type Job = Box<dyn FnOnce() + Send>;

/// The main thread's queue, while [`serve`] runs.
static QUEUE: Mutex<Option<(mpsc::Sender<Job>, ThreadId)>> = Mutex::new(None);

/// Runs `program` on a new thread and serves jobs on this one until it returns.
pub fn serve<T: Send + 'static>(program: impl FnOnce() -> T + Send + 'static) -> T {
    let (jobs, queue) = mpsc::channel::<Job>();
    *QUEUE.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((jobs.clone(), std::thread::current().id()));
    let (done, finished) = mpsc::channel();
    let program = std::thread::Builder::new()
        .name("phoenix".into())
        .spawn(move || {
            let result = program();
            let _ = done.send(result);
            // Wake the queue so `serve` sees the program is done.
            let _ = jobs.send(Box::new(|| {}));
        })
        .expect("cannot start the program's thread");
    let result = loop {
        match queue.recv() {
            Ok(job) => job(),
            Err(_) => break None,
        }
        if let Ok(result) = finished.try_recv() {
            break Some(result);
        }
    };
    *QUEUE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let _ = program.join();
    result.expect("the program's thread ended without a result")
}

/// Runs `job` on the main thread (or here, when nothing serves) and returns its result.
/// Blocks: call it from a blocking context. The caller's tokio runtime, if any, is entered
/// for the job (a `tokio::process::Command` registers its child with it).
pub fn on_main_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = tokio::runtime::Handle::try_current().ok();
    let run = move || {
        let _entered = handle.as_ref().map(|h| h.enter());
        job()
    };
    let sender = {
        let queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        match &*queue {
            Some((sender, main)) if *main != std::thread::current().id() => Some(sender.clone()),
            _ => None,
        }
    };
    let Some(sender) = sender else {
        return run();
    };
    let (reply, answer) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(run());
    });
    // The main thread stopped serving (the program is ending): the job runs here.
    if let Err(mpsc::SendError(job)) = sender.send(job) {
        job();
    }
    answer
        .recv()
        .expect("the main thread dropped a job without running it")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_serving_thread() {
        let main = std::thread::current().id();
        let (ran_on, here) = serve(|| {
            let ran_on = on_main_thread(|| std::thread::current().id());
            (ran_on, std::thread::current().id())
        });
        assert_eq!(ran_on, main);
        assert_ne!(here, main);
        // Without a server, a job runs where it is asked.
        assert_eq!(
            on_main_thread(|| std::thread::current().id()),
            std::thread::current().id()
        );
    }
}
