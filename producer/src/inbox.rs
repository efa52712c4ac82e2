//! Where `send` and `send_many` leave records for the producer's task (producers without a
//! `transactional.id`).
//!
//! A channel send per record wakes the task once per record; under load that wake-up (a
//! futex and a context switch) cost more than the record's own work. Here the caller appends
//! to a vector under a mutex and wakes the task only when the vector was empty: while the task
//! is busy, records pile up without waking anyone, and the task takes them all at once.
//!
//! Order: the task takes every record waiting here before it handles any command from the
//! command channel (`Flush`, a `SendMany` of a transactional producer, ...), so a `flush`
//! that follows a `send` in a caller's program always finds the record queued.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::record::ProducerRecord;
use crate::reply::Reply;

pub(crate) type Item = (ProducerRecord, Reply);

#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Woken when the first record lands in an empty inbox. `Notify` keeps one permit for a
    /// task not waiting yet, so no wake-up is lost between a `take` and the next wait.
    arrived: Notify,
}

#[derive(Default)]
struct State {
    items: Vec<Item>,
    /// Set once the task stopped taking records: later ones are refused.
    closed: bool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Inbox")
            .field("waiting", &state.items.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl Inbox {
    /// Appends records in order. Returns them when the producer's task has ended.
    pub(crate) fn push(&self, items: impl IntoIterator<Item = Item>) -> Result<(), Vec<Item>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return Err(items.into_iter().collect());
        }
        let was_empty = state.items.is_empty();
        state.items.extend(items);
        let wake = was_empty && !state.items.is_empty();
        drop(state);
        if wake {
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// Moves every waiting record into `into` (which the caller keeps empty between calls, so
    /// the two vectors' allocations are reused back and forth).
    pub(crate) fn take(&self, into: &mut Vec<Item>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut state.items, into);
    }

    /// Resolves once records may be waiting.
    pub(crate) async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// Refuses records from now on and returns those still waiting (their replies then
    /// report `Closed` as they are dropped).
    pub(crate) fn close(&self) -> Vec<Item> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        std::mem::take(&mut state.items)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{Semaphore, oneshot};

    use super::*;
    use crate::record::ProduceError;

    fn item(room: &Arc<Semaphore>) -> (Item, oneshot::Receiver<crate::reply::Outcome>) {
        let permit = Arc::clone(room).try_acquire_owned().expect("room");
        let (to, from) = oneshot::channel();
        (
            (ProducerRecord::new("t", "v"), Reply::one(to, permit)),
            from,
        )
    }

    #[tokio::test]
    async fn records_wait_in_order_until_taken_and_a_closed_inbox_refuses_and_answers() {
        let inbox = Inbox::default();
        let room = Arc::new(Semaphore::new(8));
        let (first, _first_reply) = item(&room);
        let (second, _second_reply) = item(&room);
        assert!(inbox.push([first]).is_ok());
        assert!(inbox.push([second]).is_ok());
        // The first push into an empty inbox left a wake-up for the task.
        tokio::time::timeout(std::time::Duration::from_secs(5), inbox.arrived())
            .await
            .expect("woken");
        let mut taken = Vec::new();
        inbox.take(&mut taken);
        assert_eq!(taken.len(), 2);
        drop(taken);

        let (waiting, waiting_reply) = item(&room);
        assert!(inbox.push([waiting]).is_ok());
        let left = inbox.close();
        assert_eq!(left.len(), 1);
        drop(left);
        assert!(matches!(waiting_reply.await, Ok(Err(ProduceError::Closed))));

        let (late, late_reply) = item(&room);
        let refused = inbox.push([late]).expect_err("closed");
        drop(refused);
        assert!(matches!(late_reply.await, Ok(Err(ProduceError::Closed))));
        // Every record's room came back.
        assert_eq!(room.available_permits(), 8);
    }
}
