//! Where a record's outcome goes: its own [`crate::Delivery`] (`send`) or its slot in a
//! [`Deliveries`] shared by many records (`send_many`). A reply also holds the record's share
//! of `max_queued_records` (a semaphore permit), given back once the outcome is delivered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::record::{DeliveryReport, ProduceError};

/// One record's outcome.
pub(crate) type Outcome = Result<DeliveryReport, ProduceError>;

/// The reply of one queued record. Dropped without an outcome (the producer's task ended),
/// it reports `Closed`.
pub(crate) struct Reply {
    to: Option<To>,
    /// `None` once handed on by `send_into`.
    room: Option<OwnedSemaphorePermit>,
}

enum To {
    One(oneshot::Sender<Outcome>),
    Many(Arc<Many>, usize),
}

impl Reply {
    pub(crate) fn one(to: oneshot::Sender<Outcome>, room: OwnedSemaphorePermit) -> Self {
        Self {
            to: Some(To::One(to)),
            room: Some(room),
        }
    }

    pub(crate) fn many(many: Arc<Many>, index: usize, room: OwnedSemaphorePermit) -> Self {
        Self {
            to: Some(To::Many(many, index)),
            room: Some(room),
        }
    }

    /// Delivers the outcome; the record's room is given back as the reply is dropped.
    pub(crate) fn send(mut self, outcome: Outcome) {
        self.deliver(outcome);
    }

    /// Delivers the outcome and adds the record's room to `room`, so that a batch gives the
    /// room of all its records back at once (each give-back locks the semaphore's waiters).
    pub(crate) fn send_into(mut self, outcome: Outcome, room: &mut Option<OwnedSemaphorePermit>) {
        self.deliver(outcome);
        if let Some(mine) = self.room.take() {
            match room {
                Some(room) => room.merge(mine),
                None => *room = Some(mine),
            }
        }
    }

    fn deliver(&mut self, outcome: Outcome) {
        match self.to.take() {
            Some(To::One(to)) => {
                // The caller may have stopped waiting: nothing to do then.
                let _ = to.send(outcome);
            }
            Some(To::Many(many, index)) => many.set(index, outcome),
            None => {}
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.to.is_some() {
            self.deliver(Err(ProduceError::Closed));
        }
    }
}

/// The outcomes of one `send_many` call, filled as its records complete.
pub(crate) struct Many {
    outcomes: Mutex<Vec<Option<Outcome>>>,
    remaining: AtomicUsize,
    done: Mutex<Option<oneshot::Sender<Vec<Outcome>>>>,
}

impl Many {
    pub(crate) fn new(records: usize, done: oneshot::Sender<Vec<Outcome>>) -> Arc<Self> {
        let mut outcomes = Vec::with_capacity(records);
        outcomes.resize_with(records, || None);
        Arc::new(Self {
            outcomes: Mutex::new(outcomes),
            remaining: AtomicUsize::new(records),
            done: Mutex::new(Some(done)),
        })
    }

    fn set(&self, index: usize, outcome: Outcome) {
        {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            match outcomes.get_mut(index) {
                Some(slot @ None) => *slot = Some(outcome),
                // Each index is given to one reply, which delivers once.
                _ => return,
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let outcomes =
                std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
            let all = outcomes
                .into_iter()
                .map(|o| o.unwrap_or(Err(ProduceError::Closed)))
                .collect();
            if let Some(done) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = done.send(all);
            }
        }
    }
}

/// Resolves, once every record of a [`crate::Producer::send_many`] call completed, to their
/// outcomes in the order they were given.
#[derive(Debug)]
pub struct Deliveries(pub(crate) oneshot::Receiver<Vec<Outcome>>);

impl Future for Deliveries {
    type Output = Result<Vec<Result<DeliveryReport, ProduceError>>, ProduceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|_| ProduceError::Closed))
    }
}
