//! The client connections a server has open, so that a stop reaches each of
//! them without every request registering for it.
//!
//! A connection waited on the drain's tokens ([`crate::server::Stops`])
//! around each request: a `CancellationToken` wait puts a waiter on a
//! shared list under a mutex and takes it off again, ~800 instructions of
//! a proxied HTTP/1.1 request (callgrind). Here a connection joins a set
//! once, when it opens:
//!
//! * the drain's start wakes every member ([`ConnSet::wake_all`]); a member
//!   between requests notices on its own [`Member::drained`], a slot one
//!   atomic store away from registered;
//! * the drain deadline aborts every member's task ([`ConnSet::abort_all`]):
//!   its future is dropped as it would have been by returning, which resets
//!   what it held, and no request waits on the hard stop at all.
//!
//! Both follow the tokens, whoever cancels them ([`ConnSet::follow`]).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The open connections. Locked only when one opens or closes and when a
/// stop comes, never per request.
#[derive(Debug, Default)]
pub struct ConnSet {
    inner: Mutex<Inner>,
}

/// The members by slot; a slot freed is taken again first. Not a
/// `HashMap`: grown to 2,000 members one cost ~0.9 KiB of resident memory
/// per connection (PSS, `benches/compare.sh` memory mode), where this
/// vector costs 16 bytes per slot.
#[derive(Debug, Default)]
struct Inner {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    len: usize,
    /// [`ConnSet::abort_all`] has run: a task whose handle is stored
    /// after it is aborted then.
    aborted: bool,
}

#[derive(Debug)]
struct Entry {
    /// Set once the task is spawned.
    abort: Option<AbortHandle>,
    waker: Arc<AtomicWaker>,
}

/// A connection's place in the set, held by its task: leaving it (the task
/// ends or is dropped) takes the connection out.
#[derive(Debug)]
pub struct Member {
    set: Arc<ConnSet>,
    slot: usize,
    waker: Arc<AtomicWaker>,
}

impl ConnSet {
    /// Spawns `task` on `tracker` as a member of the set.
    pub fn spawn<F>(self: &Arc<Self>, tracker: &TaskTracker, task: impl FnOnce(Member) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let waker = Arc::new(AtomicWaker::new());
        let entry = Entry {
            abort: None,
            waker: waker.clone(),
        };
        let slot = {
            let mut inner = self.lock();
            inner.len += 1;
            match inner.free.pop() {
                Some(slot) => {
                    inner.slots[slot] = Some(entry);
                    slot
                }
                None => {
                    inner.slots.push(Some(entry));
                    inner.slots.len() - 1
                }
            }
        };
        let mine = waker.clone();
        let member = Member {
            set: self.clone(),
            slot,
            waker,
        };
        // Not under the lock: a task dropped at once (a runtime shutting
        // down) leaves the set from inside `spawn`, and its slot may be
        // someone else's by the time the handle is stored: only the entry
        // with this member's own waker takes it.
        let handle = tracker.spawn(task(member));
        let mut inner = self.lock();
        if inner.aborted {
            // The deadline passed while it was being spawned. Aborted with
            // the lock let go: the task leaves the set when dropped.
            drop(inner);
            handle.abort();
            return;
        }
        if let Some(Some(entry)) = inner.slots.get_mut(slot) {
            if Arc::ptr_eq(&entry.waker, &mine) {
                entry.abort = Some(handle.abort_handle());
            }
        }
    }

    /// Wakes every member (the drain has begun).
    pub fn wake_all(&self) {
        for entry in self.lock().slots.iter().flatten() {
            entry.waker.wake();
        }
    }

    /// Aborts every member's task (the drain deadline has passed).
    pub fn abort_all(&self) {
        let mut inner = self.lock();
        inner.aborted = true;
        for entry in inner.slots.iter().flatten() {
            if let Some(abort) = &entry.abort {
                abort.abort();
            }
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the members when `graceful` is cancelled and aborts them when
    /// `hard` is, whoever cancels them.
    pub fn follow(self: &Arc<Self>, graceful: CancellationToken, hard: CancellationToken) {
        let set = self.clone();
        tokio::spawn(async move {
            tokio::join!(
                async {
                    graceful.cancelled().await;
                    set.wake_all();
                },
                async {
                    hard.cancelled().await;
                    set.abort_all();
                },
            );
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The set's state is a map updated in single steps: a panic
        // elsewhere while it was held leaves it whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Member {
    /// Ready once `graceful` is cancelled. Waiting registers only this
    /// member's own waker: no shared list, no lock.
    pub fn drained<'a>(
        &'a self,
        graceful: &'a CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'a {
        std::future::poll_fn(move |cx| {
            // Registered before the check: a drain that begins in between
            // still wakes this task ([`ConnSet::wake_all`] runs after the
            // token is cancelled).
            self.waker.register(cx.waker());
            if graceful.is_cancelled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut inner = self.set.lock();
        inner.slots[self.slot] = None;
        inner.free.push(self.slot);
        inner.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_drain_wakes_members_and_the_deadline_aborts_them() {
        let set = Arc::new(ConnSet::default());
        let tracker = TaskTracker::new();
        let (graceful, hard) = (CancellationToken::new(), CancellationToken::new());
        set.follow(graceful.clone(), hard.clone());
        // One waits for the drain; one never ends by itself.
        let (woke_tx, woke_rx) = tokio::sync::oneshot::channel();
        let g = graceful.clone();
        set.spawn(&tracker, move |member| async move {
            member.drained(&g).await;
            let _ = woke_tx.send(());
        });
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        set.spawn(&tracker, move |member| async move {
            let _held = (dropped_tx, member);
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(set.len(), 2);

        graceful.cancel();
        tokio::time::timeout(Duration::from_secs(1), woke_rx)
            .await
            .expect("woken by the drain")
            .unwrap();
        // The woken one ended and left; the other is still there.
        tokio::time::timeout(Duration::from_secs(1), async {
            while set.len() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("an ended task leaves the set");

        hard.cancel();
        let gone = tokio::time::timeout(Duration::from_secs(1), dropped_rx).await;
        assert!(
            matches!(gone, Ok(Err(_))),
            "the aborted task's future is dropped"
        );
        tracker.close();
        tokio::time::timeout(Duration::from_secs(1), tracker.wait())
            .await
            .expect("every task ended");
        assert!(set.is_empty());
    }

    #[tokio::test]
    async fn slots_of_ended_connections_are_taken_again() {
        let set = Arc::new(ConnSet::default());
        let tracker = TaskTracker::new();
        for _ in 0..5 {
            for _ in 0..10 {
                set.spawn(&tracker, |member| async move {
                    tokio::task::yield_now().await;
                    drop(member);
                });
            }
            tokio::time::timeout(Duration::from_secs(1), async {
                while !set.is_empty() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("every member left");
        }
        assert!(set.lock().slots.len() <= 10, "{}", set.lock().slots.len());
    }

    #[tokio::test]
    async fn a_member_joining_after_the_deadline_is_aborted() {
        let set = Arc::new(ConnSet::default());
        let tracker = TaskTracker::new();
        set.abort_all();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        set.spawn(&tracker, move |member| async move {
            let _held = (tx, member);
            std::future::pending::<()>().await;
        });
        let gone = tokio::time::timeout(Duration::from_secs(1), rx).await;
        assert!(matches!(gone, Ok(Err(_))), "its future is dropped");
        assert!(set.is_empty());
    }

    #[tokio::test]
    async fn a_member_joining_after_the_drain_began_sees_it() {
        let set = Arc::new(ConnSet::default());
        let tracker = TaskTracker::new();
        let graceful = CancellationToken::new();
        graceful.cancel();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let g = graceful.clone();
        set.spawn(&tracker, move |member| async move {
            member.drained(&g).await;
            let _ = tx.send(());
        });
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .expect("ready at once")
            .unwrap();
    }
}
