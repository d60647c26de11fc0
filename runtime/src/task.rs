//! Owned tasks: every long-lived task (a session, an accept loop, a log pump, a timer) belongs to a [`Tasks`] set
//! held by its owner (an actor or the node), instead of being a detached `tokio::spawn`.
//!
//! - a panic in a task is caught, logged with the set's and the task's names, and counted
//!   ([`Tasks::panicked`]); the other tasks and the owner go on;
//! - the set knows how many tasks run ([`Tasks::running`]), and its owner's shutdown waits for them
//!   ([`Tasks::wait`], with a deadline) and then aborts what is left ([`Tasks::abort_all`]);
//! - finished tasks leave nothing behind (no join handle to reap), so a set can own millions of short sessions
//!   over a run.
//!
//! Cloning a [`Tasks`] gives another handle on the same set (an accept loop spawns sessions into its owner's
//! set).

use futures::FutureExt as _;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// A set of owned tasks (see the module docs).
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    owner: &'static str,
    /// Running tasks, by id, with their names.
    running: Mutex<HashMap<u64, (&'static str, AbortHandle)>>,
    next: AtomicU64,
    panicked: AtomicU64,
    spawned: AtomicU64,
    /// Notified each time a task ends.
    ended: Notify,
}

impl Tasks {
    /// An empty set owned by `owner` (named in its log lines).
    pub fn new(owner: &'static str) -> Tasks {
        Tasks {
            inner: Arc::new(Inner {
                owner,
                running: Mutex::new(HashMap::new()),
                next: AtomicU64::new(0),
                panicked: AtomicU64::new(0),
                spawned: AtomicU64::new(0),
                ended: Notify::new(),
            }),
        }
    }

    /// Runs `fut` as a task of this set, named `name` in log lines; the handle aborts it alone. Must be called
    /// inside a tokio runtime.
    pub fn spawn<F>(&self, name: &'static str, fut: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.spawned.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let task = async move {
            // Removes the task from the set however it ends: returned, panicked or aborted.
            let ended = Ended { inner, id };
            if let Err(p) = AssertUnwindSafe(fut).catch_unwind().await {
                let inner = &ended.inner;
                inner.panicked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(owner = inner.owner, task = name, "task panicked: {}", aion_model::panic_message(&*p));
            }
        };
        // Held across the spawn, so the task cannot end (and remove itself) before it is recorded.
        let mut running = lock(&self.inner.running);
        let handle = tokio::spawn(task).abort_handle();
        running.insert(id, (name, handle.clone()));
        handle
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        lock(&self.inner.running).len()
    }

    /// Tasks that panicked, over the set's life.
    pub fn panicked(&self) -> u64 {
        self.inner.panicked.load(Ordering::Relaxed)
    }

    /// Tasks spawned, over the set's life.
    pub fn spawned(&self) -> u64 {
        self.inner.spawned.load(Ordering::Relaxed)
    }

    /// Waits until no task runs, at most `deadline`; returns how many still run.
    pub async fn wait(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so an end between the two is not missed.
            ended.as_mut().enable();
            let n = self.running();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, ended).await.is_err() {
                return self.running();
            }
        }
    }

    /// Aborts every running task (each ends at its next await point); returns how many were running, logging
    /// their names.
    pub fn abort_all(&self) -> usize {
        // Collected first: an aborted task removes itself, taking the lock.
        let running: Vec<(&'static str, AbortHandle)> =
            lock(&self.inner.running).values().map(|(n, h)| (*n, h.clone())).collect();
        for (name, h) in &running {
            tracing::warn!(owner = self.inner.owner, task = name, "task still running at shutdown: aborted");
            h.abort();
        }
        running.len()
    }

    /// Aborts every running task without a log line (an owner dropped on purpose, whose tasks are part of it).
    pub fn abort_quietly(&self) {
        let running: Vec<AbortHandle> = lock(&self.inner.running).values().map(|(_, h)| h.clone()).collect();
        for h in running {
            h.abort();
        }
    }

    /// Waits for the tasks up to `deadline`, then aborts the rest; returns how many were aborted.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        if self.wait(deadline).await == 0 {
            return 0;
        }
        self.abort_all()
    }
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("owner", &self.inner.owner)
            .field("running", &self.running())
            .field("panicked", &self.panicked())
            .finish()
    }
}

struct Ended {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Ended {
    fn drop(&mut self) {
        // Taking the lock waits for `spawn` to have recorded the task.
        lock(&self.inner.running).remove(&self.id);
        self.inner.ended.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn a_panic_is_caught_counted_and_the_others_go_on() {
        let tasks = Tasks::new("test");
        let (tx, rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<u32>();
        tasks.spawn("survivor", async move {
            let _ = rx.await;
            let _ = done_tx.send(7);
        });
        tasks.spawn("bomb", async { panic!("boom") });
        // The bomb ends (by panicking) and is counted; the survivor still runs.
        while tasks.panicked() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(tasks.running(), 1);
        let _ = tx.send(());
        assert_eq!(done_rx.await.ok(), Some(7));
        assert_eq!(tasks.wait(Duration::from_secs(5)).await, 0);
        assert_eq!((tasks.spawned(), tasks.panicked()), (2, 1));
    }

    #[tokio::test]
    async fn wait_returns_when_the_last_task_ends() {
        let tasks = Tasks::new("test");
        let (tx, rx) = oneshot::channel::<()>();
        tasks.spawn("waiter", async move {
            let _ = rx.await;
        });
        let t2 = tasks.clone();
        let waiting = tokio::spawn(async move { t2.wait(Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let _ = tx.send(());
        assert_eq!(waiting.await.ok(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_aborts_what_outlives_the_deadline() {
        let tasks = Tasks::new("test");
        tasks.spawn("forever", std::future::pending());
        assert_eq!(tasks.wait(Duration::from_secs(3)).await, 1);
        assert_eq!(tasks.shutdown(Duration::from_secs(1)).await, 1);
        assert_eq!(tasks.wait(Duration::from_secs(1)).await, 0, "the aborted task is gone");
    }
}
