//! What calls in flight may hold together: invocations (`max_concurrent_calls`) and bytes
//! (`max_inflight_bytes`): parameters being received and decoded, answers being built and sent.
//!
//! Without it, each call may hold up to `max_request_bytes` for up to `request_timeout_ms`
//! with nothing bounding how many do so at once: a hundred stalled 60 MiB invocations hold
//! 6 GiB. With it, the bytes calls hold are at most `max_inflight_bytes`, so the process stays
//! within `max_total_bytes + max_listing_bytes + max_inflight_bytes` plus a fixed overhead per
//! admitted call, whatever arrives.
//!
//! A call is admitted into a [`Call`] slot, takes bytes as its buffers grow, and gives back
//! everything when the slot is dropped, after its answer was sent. Nothing waits: a call that
//! would pass a bound is answered `other(msg)` naming it, and the caller may retry.
//!
//! One caller (the `source-id` the host puts on each invocation: one component) may hold at
//! most half of each bound, so a component that stalls or floods can never take what another
//! component needs to be served. The totals are atomics with a compare-and-swap; the shares
//! are a map under a std mutex, taken a few times per call (admission, buffer growth, answer
//! blocks), never across an `.await`.
//!
//! Handlers reach their call's slot through a task-local ([`scope`], [`take_for_answer`]), so
//! the storage engine only ever sees a "room for n more bytes?" closure.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Answers take budget in blocks of this many bytes, not per element: one compare-and-swap per
/// 64 KiB, not one per value of a get-many.
const ANSWER_BLOCK: usize = 64 * 1024;

/// The shared budget. Limits change with the config (a lowered one only refuses new takes).
#[derive(Debug)]
pub struct Budget {
    bytes: AtomicUsize,
    calls: AtomicUsize,
    max_bytes: AtomicUsize,
    max_calls: AtomicUsize,
    /// Per caller: (calls, bytes) held. Entries go when they reach zero.
    shares: Mutex<HashMap<Arc<str>, (usize, usize)>>,
}

/// Why a call or its bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Too many invocations at once.
    #[error(
        "{held} calls are in flight ({whose}), at the limit of max_concurrent_calls={limit}{share}: \
         retry later"
    )]
    Calls {
        /// "in all", or "from this component".
        whose: &'static str,
        /// ", which one component may use half of", when the share was hit.
        share: &'static str,
        /// Calls in flight.
        held: usize,
        /// The limit in force.
        limit: usize,
    },
    /// One call needs more than a component may hold.
    #[error(transparent)]
    Alone(TooLargeAlone),
    /// Calls in flight hold too many bytes.
    #[error(
        "calls in flight hold {held} bytes ({whose}); {asked} more would pass \
         max_inflight_bytes={limit}{share}: retry later"
    )]
    Bytes {
        /// "in all", or "from this component".
        whose: &'static str,
        /// ", which one component may use half of", when the share was hit.
        share: &'static str,
        /// Bytes held by calls in flight.
        held: usize,
        /// Bytes this call asked for.
        asked: usize,
        /// The limit in force.
        limit: usize,
    },
}

/// A call that alone needs more than one component's half of `max_inflight_bytes`: retrying
/// cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this call alone needs {needs} bytes in flight, over the half of max_inflight_bytes={limit} \
     one component may use: send less at once, or raise max_inflight_bytes"
)]
pub struct TooLargeAlone {
    /// What the call needs.
    pub needs: usize,
    /// The limit in force.
    pub limit: usize,
}

impl Refusal {
    /// The config key of the bound.
    pub fn limit(&self) -> &'static str {
        match self {
            Refusal::Calls { .. } => crate::config::MAX_CONCURRENT_CALLS,
            Refusal::Bytes { .. } | Refusal::Alone(_) => crate::config::MAX_INFLIGHT_BYTES,
        }
    }
}

impl Budget {
    /// A budget of `max_bytes` and `max_calls`.
    pub fn new(max_bytes: usize, max_calls: usize) -> Arc<Self> {
        Arc::new(Self {
            bytes: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            max_bytes: AtomicUsize::new(max_bytes),
            max_calls: AtomicUsize::new(max_calls),
            shares: Mutex::new(HashMap::new()),
        })
    }

    fn shares(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, (usize, usize)>> {
        self.shares
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Applies new limits.
    pub fn set_limits(&self, max_bytes: usize, max_calls: usize) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        self.max_calls.store(max_calls, Ordering::Relaxed);
    }

    /// Bytes and calls held now.
    pub fn held(&self) -> (usize, usize) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.calls.load(Ordering::Relaxed),
        )
    }

    /// Admits one more call from `caller` (its `source-id`; "" when it sent none), or says
    /// why not.
    pub fn admit(self: &Arc<Self>, caller: &str) -> Result<Call, Refusal> {
        let limit = self.max_calls.load(Ordering::Relaxed);
        let caller: Arc<str> = Arc::from(caller);
        {
            let mut shares = self.shares();
            let share = shares.entry(Arc::clone(&caller)).or_default();
            if share.0 + 1 > half(limit) {
                let held = share.0;
                release_share(&mut shares, &caller, 0, 0);
                return Err(Refusal::Calls {
                    whose: "from this component",
                    share: SHARE,
                    held,
                    limit,
                });
            }
            if let Err(held) = try_add(&self.calls, 1, limit) {
                release_share(&mut shares, &caller, 0, 0);
                return Err(Refusal::Calls {
                    whose: "in all",
                    share: "",
                    held,
                    limit,
                });
            }
            share_of(&mut shares, &caller).0 += 1;
        }
        Ok(Call {
            budget: Arc::clone(self),
            caller,
            held: 0,
            answer_room: 0,
        })
    }
}

const SHARE: &str = ", half of which one component may use";

/// Half a bound, at least 1: what one caller may hold.
fn half(limit: usize) -> usize {
    (limit / 2).max(1)
}

fn share_of<'a>(
    shares: &'a mut HashMap<Arc<str>, (usize, usize)>,
    caller: &Arc<str>,
) -> &'a mut (usize, usize) {
    shares.entry(Arc::clone(caller)).or_default()
}

/// Gives back `calls` and `bytes` of `caller`'s share; forgets a caller that holds nothing.
fn release_share(
    shares: &mut HashMap<Arc<str>, (usize, usize)>,
    caller: &Arc<str>,
    calls: usize,
    bytes: usize,
) {
    if let Some(share) = shares.get_mut(caller) {
        share.0 -= calls;
        share.1 -= bytes;
        if *share == (0, 0) {
            shares.remove(caller);
        }
    }
}

/// One admitted call: its slot and the bytes it holds, all given back on drop.
#[derive(Debug)]
pub struct Call {
    budget: Arc<Budget>,
    caller: Arc<str>,
    held: usize,
    /// Bytes taken for the answer but not used yet.
    answer_room: usize,
}

impl Call {
    /// Takes `n` more bytes.
    pub fn take(&mut self, n: usize) -> Result<(), Refusal> {
        let limit = self.budget.max_bytes.load(Ordering::Relaxed);
        let needs = self.held.saturating_add(n);
        if needs > half(limit) {
            return Err(Refusal::Alone(TooLargeAlone { needs, limit }));
        }
        let mut shares = self.budget.shares();
        let share = share_of(&mut shares, &self.caller);
        if share.1.saturating_add(n) > half(limit) {
            return Err(Refusal::Bytes {
                whose: "from this component",
                share: SHARE,
                held: share.1,
                asked: n,
                limit,
            });
        }
        try_add(&self.budget.bytes, n, limit).map_err(|held| Refusal::Bytes {
            whose: "in all",
            share: "",
            held,
            asked: n,
            limit,
        })?;
        share.1 += n;
        self.held += n;
        Ok(())
    }

    /// Gives back all but `n` of the bytes this call holds (it keeps its slot).
    fn keep_only(&mut self, n: usize) {
        let release = self.held.saturating_sub(n);
        if release > 0 {
            let mut shares = self.budget.shares();
            release_share(&mut shares, &self.caller, 0, release);
            self.budget.bytes.fetch_sub(release, Ordering::Relaxed);
            self.held -= release;
        }
        self.answer_room = 0;
    }

    /// Takes `n` bytes for the answer, in blocks of [`ANSWER_BLOCK`] (or exactly what is left
    /// when a block does not fit).
    fn take_for_answer(&mut self, n: usize) -> Result<(), Refusal> {
        if n > self.answer_room {
            let need = n - self.answer_room;
            let block = need.max(ANSWER_BLOCK);
            if self.take(block).is_ok() {
                self.answer_room += block;
            } else {
                self.take(need)?;
                self.answer_room += need;
            }
        }
        self.answer_room -= n;
        Ok(())
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let mut shares = self.budget.shares();
        release_share(&mut shares, &self.caller, 1, self.held);
        self.budget.bytes.fetch_sub(self.held, Ordering::Relaxed);
        self.budget.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Adds `n` to `counter` unless that passes `limit`; on refusal answers the counter's value.
fn try_add(counter: &AtomicUsize, n: usize, limit: usize) -> Result<(), usize> {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            held.checked_add(n).filter(|&after| after <= limit)
        })
        .map(drop)
}

tokio::task_local! {
    static CURRENT: RefCell<Call>;
}

/// Runs `f` (a call's handler and the sending of its answer) with `call` as the current call,
/// so that [`take_for_answer`] charges it.
/// (Not an `async fn`: that would hold `f` twice, before and inside the scope, in every call's
/// future.)
pub fn scope<F: std::future::Future>(
    call: Call,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    CURRENT.scope(RefCell::new(call), f)
}

/// Gives back all but `n` bytes of what the current call holds: once its answer is out, a call
/// waiting for its caller's confirmation holds only the answer it may have to send again.
pub fn keep_only(n: usize) {
    let _ = CURRENT.try_with(|call| call.borrow_mut().keep_only(n));
}

/// Takes `n` bytes of the current call's budget for its answer. Outside a call (the engine
/// driven directly, in tests and tools) there is nothing to charge.
pub fn take_for_answer(n: usize) -> Result<(), Refusal> {
    CURRENT
        .try_with(|call| call.borrow_mut().take_for_answer(n))
        .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_bytes_are_bounded_and_given_back() {
        let budget = Budget::new(100, 4);
        let mut a = budget.admit("a").unwrap();
        let mut b = budget.admit("b").unwrap();
        let c = budget.admit("c").unwrap();
        let _d = budget.admit("d").unwrap();
        assert!(matches!(
            budget.admit("e").unwrap_err(),
            Refusal::Calls {
                held: 4,
                limit: 4,
                whose: "in all",
                ..
            }
        ));
        a.take(50).unwrap();
        b.take(40).unwrap();
        let mut c = c;
        let err = c.take(11).unwrap_err();
        assert!(
            matches!(
                err,
                Refusal::Bytes {
                    held: 90,
                    asked: 11,
                    limit: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("max_inflight_bytes=100"), "{err}");
        c.take(10).unwrap();
        assert_eq!(budget.held(), (100, 4));
        drop(a);
        assert_eq!(budget.held(), (50, 3));
        drop((b, c));
        assert_eq!(budget.held().0, 0);
        assert!(budget.shares().len() == 1, "only d holds a share");
    }

    #[test]
    fn one_caller_holds_at_most_half_and_never_what_another_needs() {
        let budget = Budget::new(100, 4);
        let mut hog = budget.admit("hog").unwrap();
        // One call past the half can never be served: it is told so.
        let err = hog.take(51).unwrap_err();
        assert!(matches!(err, Refusal::Alone(_)), "{err}");
        assert!(
            err.to_string().contains("raise max_inflight_bytes"),
            "{err}"
        );
        hog.take(30).unwrap();
        let mut second = budget.admit("hog").unwrap();
        second.take(20).unwrap();
        let err = second.take(1).unwrap_err();
        assert!(err.to_string().contains("from this component"), "{err}");
        let err = budget.admit("hog").unwrap_err();
        assert!(
            matches!(
                err,
                Refusal::Calls {
                    whose: "from this component",
                    ..
                }
            ),
            "{err}"
        );
        // Another component still gets its half.
        let mut other = budget.admit("other").unwrap();
        other.take(50).unwrap();
        let _again = budget.admit("other").unwrap();
    }

    #[test]
    fn answers_take_blocks_and_fall_back_to_what_is_left() {
        let budget = Budget::new(2 * (ANSWER_BLOCK + 10), 4);
        let mut call = budget.admit("c").unwrap();
        call.take_for_answer(5).unwrap();
        assert_eq!(
            budget.held().0,
            ANSWER_BLOCK,
            "one block for many small values"
        );
        call.take_for_answer(ANSWER_BLOCK - 5).unwrap();
        assert_eq!(budget.held().0, ANSWER_BLOCK);
        call.take_for_answer(10).unwrap();
        assert_eq!(budget.held().0, ANSWER_BLOCK + 10, "exactly what was left");
        assert!(call.take_for_answer(1).is_err());
        drop(call);
        assert_eq!(budget.held(), (0, 0));
    }

    #[tokio::test]
    async fn handlers_charge_the_call_they_run_in() {
        let budget = Budget::new(1 << 20, 4);
        assert_eq!(
            take_for_answer(usize::MAX),
            Ok(()),
            "no call: nothing to charge"
        );
        let call = budget.admit("c").unwrap();
        scope(call, async {
            take_for_answer(10).unwrap();
            assert_eq!(budget.held().0, ANSWER_BLOCK);
            assert!(take_for_answer(2 << 20).is_err());
        })
        .await;
        assert_eq!(budget.held(), (0, 0));
    }
}
