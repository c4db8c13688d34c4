//! Coalescing a channel's outgoing records on a broker carrier.
//!
//! A broker carrier pays a fixed price per message: in the client that publishes it, in the
//! broker, in the subscriber's client. When a channel's sender seals records faster than its
//! link publishes them, the records that pile up meanwhile leave as one message, a record
//! batch ([`keav_proto::record::batch`]), instead of one message each.
//!
//! Nothing waits for a batch to fill: the sending side seals each record straight into the
//! batch being built and wakes a publishing task; that task takes whatever is there and
//! publishes it. While a publish is under way (or the task has not run yet) new records join
//! the next batch. A sender that sends one record now and then still sends one message per
//! record, a bare record as without coalescing. A batch is at most
//! [`MAX_BATCH_LEN`](keav_proto::record::batch::MAX_BATCH_LEN) bytes; a sender that finds it
//! full waits until the task takes it (back-pressure, as with a client queue that is full).
//!
//! Order is kept: batches leave in the order they were started, records within a batch in
//! the order they were sealed. A publish error is kept and returned by the next `send` (and
//! by `close`); records still unpublished then are lost, as they would be on the carrier.

use std::sync::{Arc, Mutex, MutexGuard};

use keav_proto::record::batch::BatchBuilder;
use keav_proto::record::RecordError;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::broker::BrokerTx;
use crate::Error;

/// What the sending side and the publishing task share.
struct Shared {
    state: Mutex<State>,
    /// The batch went from empty to not empty, or the sender is gone.
    work: Notify,
    /// The task took the batch (there is room again), or failed.
    room: Notify,
}

struct State {
    batch: BatchBuilder,
    /// No more records: the task publishes what is left and ends.
    done: bool,
    /// Why a publish failed (the task has ended).
    failed: Option<(std::io::ErrorKind, String)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned batch is still a consistent batch (every push leaves it whole).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn failure(kind: std::io::ErrorKind, msg: &str) -> Error {
    Error::Io(std::io::Error::new(kind, msg.to_string()))
}

/// The sending side of a coalescing channel (see the module docs). Dropping it lets the
/// publishing task send what is still queued, then end.
pub(crate) struct Coalescer {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Coalescer {
    /// Starts the publishing task for `tx`.
    pub(crate) fn new(tx: BrokerTx) -> Coalescer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                batch: BatchBuilder::new(),
                done: false,
                failed: None,
            }),
            work: Notify::new(),
            room: Notify::new(),
        });
        let task = tokio::spawn(publish_batches(shared.clone(), tx));
        Coalescer {
            shared,
            task: Some(task),
        }
    }

    /// Adds the record that `seal` appends (of at most `record_len` bytes) to the batch
    /// being built; waits while that batch is full. Errors: a failed publish (earlier, of any
    /// record), `seal`'s own error ([`Error::Record`]), or [`Error::Closed`] after
    /// [`Coalescer::finish`].
    pub(crate) async fn push(
        &self,
        record_len: usize,
        seal: impl FnOnce(&mut Vec<u8>) -> Result<(), RecordError>,
    ) -> Result<(), Error> {
        let mut seal = Some(seal);
        loop {
            {
                let mut st = self.shared.lock();
                if let Some((kind, msg)) = &st.failed {
                    return Err(failure(*kind, msg));
                }
                if st.done {
                    return Err(Error::Closed);
                }
                if st.batch.fits(record_len) {
                    let Some(seal) = seal.take() else {
                        return Err(Error::Closed);
                    };
                    let was_empty = st.batch.is_empty();
                    st.batch.push(seal)?;
                    drop(st);
                    if was_empty {
                        self.shared.work.notify_one();
                    }
                    return Ok(());
                }
            }
            // Full: wait for the task to take the batch. Registered before looking again,
            // so a take in between is not missed (and only here: the common case above
            // never touches the waiter list).
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let full = {
                let st = self.shared.lock();
                st.failed.is_none() && !st.done && !st.batch.fits(record_len)
            };
            if full {
                room.await;
            }
        }
    }

    /// Lets the task publish what is queued and waits until it did; no record can be added
    /// afterwards. Returns the publish error if one happened. Idempotent.
    pub(crate) async fn finish(&mut self) -> Result<(), Error> {
        self.shared.lock().done = true;
        self.shared.work.notify_one();
        if let Some(task) = self.task.take() {
            // The task never panics; a cancelled runtime is all that can end it early.
            let _ = task.await;
        }
        let st = self.shared.lock();
        match &st.failed {
            Some((kind, msg)) => Err(failure(*kind, msg)),
            None => Ok(()),
        }
    }
}

impl Drop for Coalescer {
    fn drop(&mut self) {
        self.shared.lock().done = true;
        self.shared.work.notify_one();
    }
}

/// Publishes batches as they come, until the sender is done and nothing is left, or a
/// publish fails.
async fn publish_batches(shared: Arc<Shared>, tx: BrokerTx) {
    loop {
        let (datagram, records) = {
            let mut st = shared.lock();
            if st.batch.is_empty() {
                if st.done {
                    return;
                }
                (None, 0)
            } else {
                let n = st.batch.len();
                (Some(st.batch.take()), n)
            }
        };
        let Some(d) = datagram else {
            shared.work.notified().await;
            continue;
        };
        shared.room.notify_waiters();
        if let Err(e) = tx.send(d).await {
            debug!(error = %e, records, "publishing a record batch failed");
            let (kind, msg) = match &e {
                Error::Io(io) => (io.kind(), io.to_string()),
                other => (std::io::ErrorKind::Other, other.to_string()),
            };
            shared.lock().failed = Some((kind, msg));
            shared.room.notify_waiters();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Publisher;
    use keav_proto::record::RECORD_OVERHEAD;

    fn record(out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.extend_from_slice(&[0x17; RECORD_OVERHEAD]);
        Ok(())
    }

    /// A link whose MQTT client can no longer publish (its event loop is gone).
    fn dead_link() -> BrokerTx {
        let (client, eventloop) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 9), 4);
        drop(eventloop);
        BrokerTx::new(
            Arc::new(Publisher::Mqtt(client)),
            "keav/v1/p/from/me".into(),
        )
    }

    #[tokio::test]
    async fn a_failed_publish_is_returned_by_later_sends_and_by_finish() {
        let mut c = Coalescer::new(dead_link());
        // Queued: the failure comes from the task, later.
        c.push(RECORD_OVERHEAD, record).await.unwrap();
        let mut err = None;
        for _ in 0..500 {
            match c.push(RECORD_OVERHEAD, record).await {
                Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(matches!(err, Some(Error::Io(_))), "{err:?}");
        assert!(matches!(c.finish().await, Err(Error::Io(_))));
        assert!(matches!(
            c.push(RECORD_OVERHEAD, record).await,
            Err(Error::Io(_))
        ));
    }

    #[tokio::test]
    async fn nothing_is_added_after_finish_and_a_failed_seal_adds_nothing() {
        let mut c = Coalescer::new(dead_link());
        let r = c
            .push(RECORD_OVERHEAD, |_| Err(RecordError::Exhausted))
            .await;
        assert!(matches!(r, Err(Error::Record(RecordError::Exhausted))));
        assert!(c.shared.lock().batch.is_empty());
        // Nothing was queued, so nothing failed to publish.
        c.finish().await.unwrap();
        assert!(matches!(
            c.push(RECORD_OVERHEAD, record).await,
            Err(Error::Closed)
        ));
    }
}
