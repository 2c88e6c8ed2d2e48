//! Combining: concurrent calls of one kind leave as one store round trip.
//!
//! Why: with Redis, what a call costs is mostly per call, not per request: a script's setup,
//! the network syscalls on both sides, and the gateway's wake-ups. Under load, requests that
//! arrive while a call is in flight queue here and go together in the next call; alone (one
//! connection, low load) a request goes at once, as before. Nothing waits for a batch to
//! fill, so combining adds no latency of its own.
//!
//! How: every caller queues its item, then waits for either its result or the right to
//! drive (a lock). The driver takes what is queued (up to `max_batch`), makes the call,
//! hands every caller its result, and lets go. No task is spawned: a driver is always a
//! caller with an item of its own queued or in flight.
//!
//! Cancellation: if a driver's future is dropped mid-call, the callers in its batch get
//! `StoreError::Unavailable` (outcome unknown), the same as a timeout: a reservation's lease
//! expires by itself.

use std::future::Future;
use std::sync::Mutex;
use tokio::sync::oneshot;

use super::StoreError;

type Waiting<I, O> = (I, oneshot::Sender<Result<O, StoreError>>);

fn outcome<O>(
    done: Result<Result<O, StoreError>, oneshot::error::RecvError>,
) -> Result<O, StoreError> {
    done.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(
            "a combined store call was abandoned; outcome unknown".into(),
        ))
    })
}

pub struct Combiner<I, O> {
    queue: Mutex<Vec<Waiting<I, O>>>,
    driving: tokio::sync::Mutex<()>,
    max_batch: usize,
}

impl<I, O> Combiner<I, O> {
    pub fn new(max_batch: usize) -> Self {
        Combiner {
            queue: Mutex::new(Vec::new()),
            driving: tokio::sync::Mutex::new(()),
            max_batch: max_batch.max(1),
        }
    }

    /// Submits `item`; `call` makes one store call for a batch and returns one result per
    /// item, in order (missing results count as outcome unknown).
    pub async fn submit<F, Fut>(&self, item: I, call: F) -> Result<O, StoreError>
    where
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Vec<Result<O, StoreError>>>,
    {
        let (tx, mut rx) = oneshot::channel();
        self.lock_queue().push((item, tx));
        loop {
            tokio::select! {
                biased;
                done = &mut rx => return outcome(done),
                _driver = self.driving.lock() => {
                    let batch = self.take_batch();
                    if batch.is_empty() {
                        continue;
                    }
                    let (items, senders): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
                    let results = call(items).await;
                    for (tx, result) in senders.into_iter().zip(results) {
                        let _ = tx.send(result);
                    }
                }
            }
        }
    }

    /// How many items wait for a call (tests).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock_queue().len()
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Waiting<I, O>>> {
        match self.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn take_batch(&self) -> Vec<Waiting<I, O>> {
        let mut queue = self.lock_queue();
        let n = queue.len().min(self.max_batch);
        queue.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_lone_call_goes_at_once_with_its_own_result() {
        let c = Combiner::<u32, u32>::new(8);
        let r = c
            .submit(7, |items| async move {
                items.iter().map(|i| Ok(i * 2)).collect()
            })
            .await;
        assert_eq!(r.ok(), Some(14));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_round_trips_and_each_gets_its_own_result() {
        let c = Arc::new(Combiner::<u32, u32>::new(16));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.submit(i, |items| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        items.iter().map(|i| Ok(i + 1000)).collect()
                    }
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.ok().and_then(|r| r.ok()), Some(i as u32 + 1000));
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(n < 64, "64 concurrent calls made {n} round trips");
        assert!(n >= 4, "batches are capped at 16 items: {n} round trips");
    }

    #[tokio::test]
    async fn a_short_answer_leaves_the_rest_with_an_unknown_outcome() {
        let c = Arc::new(Combiner::<u32, u32>::new(8));
        // While a call is in flight (the lock held here), items 1 and 2 queue; the next
        // call carries both, [1, 2], and is answered for one only.
        let in_flight = c.driving.lock().await;
        let answer_one = |items: Vec<u32>| async move {
            assert_eq!(items, vec![1, 2], "one call carries both");
            vec![Ok(10)]
        };
        let submit = |item| {
            let c = c.clone();
            tokio::spawn(async move { c.submit(item, answer_one).await })
        };
        let first = submit(1);
        while c.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let second = submit(2);
        while c.queued() < 2 {
            tokio::task::yield_now().await;
        }
        drop(in_flight);
        assert_eq!(first.await.ok().and_then(|r| r.ok()), Some(10));
        let second = second.await.expect("task");
        assert!(
            matches!(second, Err(StoreError::Unavailable(_))),
            "no answer means outcome unknown: {second:?}"
        );
    }
}
