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
//! Lingering: an item submitted with a linger (a settlement, which nobody waits for) first
//! waits that long for a call made anyway to carry it, and only then drives a call itself.
//!
//! Cancellation: if a driver's future is dropped mid-call, the callers in its batch get
//! `StoreError::Unavailable` (outcome unknown), the same as a timeout: a reservation's lease
//! expires by itself and a settlement is retried under its exactly-once marker.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

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
    /// item, in order (missing results count as outcome unknown). With a `linger`, the item
    /// first waits that long for another caller's call to carry it.
    pub async fn submit<F, Fut>(&self, item: I, linger: Duration, call: F) -> Result<O, StoreError>
    where
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Vec<Result<O, StoreError>>>,
    {
        let (tx, mut rx) = oneshot::channel();
        self.lock_queue().push((item, tx));
        if !linger.is_zero() {
            tokio::select! {
                biased;
                done = &mut rx => return outcome(done),
                _ = tokio::time::sleep(linger) => {}
            }
        }
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

    #[tokio::test]
    async fn a_lone_call_goes_at_once_with_its_own_result() {
        let c = Combiner::<u32, u32>::new(8);
        let r = c
            .submit(7, Duration::ZERO, |items| async move {
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
                c.submit(i, Duration::ZERO, |items| {
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
        // Item 1 lingers, so item 2's call carries both: [1, 2], answered for one only.
        let first = {
            let c = c.clone();
            tokio::spawn(async move {
                c.submit(1, Duration::from_millis(300), |_| async { vec![Ok(99)] })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let second = c
            .submit(2, Duration::ZERO, |items| async move {
                assert_eq!(items, vec![1, 2], "one call carries both");
                vec![Ok(10)]
            })
            .await;
        assert_eq!(first.await.ok().and_then(|r| r.ok()), Some(10));
        assert!(
            matches!(second, Err(StoreError::Unavailable(_))),
            "no answer means outcome unknown: {second:?}"
        );
    }

    #[tokio::test]
    async fn a_lingering_item_rides_with_the_next_call_or_goes_alone_after_its_linger() {
        let c = Arc::new(Combiner::<u32, u32>::new(8));
        let calls = Arc::new(std::sync::Mutex::new(Vec::<Vec<u32>>::new()));
        let call = |calls: Arc<std::sync::Mutex<Vec<Vec<u32>>>>| {
            move |items: Vec<u32>| {
                let calls = calls.clone();
                async move {
                    calls.lock().unwrap().push(items.clone());
                    items.iter().map(|i| Ok(i * 10)).collect::<Vec<_>>()
                }
            }
        };
        // A lingering item, then a plain one within the linger: one call carries both.
        let lingering = {
            let (c, f) = (c.clone(), call(calls.clone()));
            tokio::spawn(async move { c.submit(1, Duration::from_millis(300), f).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(c.queued(), 1, "the lingering item waits");
        let plain = c.submit(2, Duration::ZERO, call(calls.clone())).await;
        assert_eq!(plain.ok(), Some(20));
        assert_eq!(lingering.await.ok().and_then(|r| r.ok()), Some(10));
        assert_eq!(*calls.lock().unwrap(), vec![vec![1, 2]]);
        // Alone, it goes by itself once its linger is over.
        let alone = c
            .submit(3, Duration::from_millis(50), call(calls.clone()))
            .await;
        assert_eq!(alone.ok(), Some(30));
        assert_eq!(calls.lock().unwrap().len(), 2);
    }
}
