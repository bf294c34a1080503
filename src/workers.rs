//! Work done off the cores: argon2 for AUTH, and policy checks that defer (DNS, callouts,
//! signatures). A [`Workers`] pool is a few named threads behind one bounded queue; a core
//! hands a job over without blocking and awaits its answer on a oneshot channel. A full queue
//! answers at once (`None`: the caller replies "try again later"), so a flood waits here,
//! never in front of a core's spool or socket I/O.

use std::io;

type Job = Box<dyn FnOnce() + Send>;

/// A named pool of threads with a bounded queue.
#[derive(Debug)]
pub struct Workers {
    name: &'static str,
    queue: crossbeam_channel::Sender<Job>,
}

impl Workers {
    /// `threads` threads named `ringmx-{name}-{i}`; at most `capacity` jobs wait beyond the
    /// ones running. The threads end when the pool is dropped.
    pub fn new(name: &'static str, threads: usize, capacity: usize) -> io::Result<Workers> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(capacity);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("ringmx-{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(Workers { name, queue: tx })
    }

    /// Queue `f`; its result arrives on the receiver. `None` when the queue is full.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<tokio::sync::oneshot::Receiver<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.queue.try_send(job) {
            Ok(()) => Some(rx),
            Err(_) => {
                tracing::debug!(pool = self.name, "work queue full");
                None
            }
        }
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_and_refuses_beyond_its_queue() {
        let w = Workers::new("test", 1, 1).unwrap();
        let (hold_tx, hold_rx) = crossbeam_channel::bounded::<()>(0);
        // The one thread is busy until released; one job may wait; the next is refused.
        let running = w.submit(move || hold_rx.recv().is_ok()).unwrap();
        let mut waiting = None;
        for _ in 0..1000 {
            // The first job leaves the queue once the thread takes it.
            if w.queued() == 0 {
                waiting = w.submit(|| 7);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let waiting = waiting.expect("the thread took the first job");
        assert!(w.submit(|| 8).is_none(), "queue full");
        hold_tx.send(()).unwrap();
        assert!(running.blocking_recv().unwrap());
        assert_eq!(waiting.blocking_recv().unwrap(), 7);
    }
}
