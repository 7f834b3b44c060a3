//! A queue held in memory: the [`Queue`] interface without a disk, for unit tests of the stages
//! above the store (the scheduler runs over it with a fake courier and paused time).

use super::{Envelope, Incoming, MessageBody, Queue, QueueId, SpaceInfo, SpoolError};
use crate::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Messages in a map; a body is an immutable shared buffer, so a reader keeps it whatever happens
/// to the message meanwhile.
#[derive(Default)]
pub struct MemoryQueue {
    messages: Mutex<BTreeMap<QueueId, Stored>>,
    /// The last issued ID's sequence number.
    last_id: Mutex<u64>,
    /// Named documents with their versions ([`Queue::document`]).
    documents: Mutex<BTreeMap<String, (i64, Vec<u8>)>>,
}

impl MemoryQueue {
    pub fn new() -> Arc<MemoryQueue> {
        Arc::new(MemoryQueue::default())
    }
}

/// A message: its envelope and its body.
type Stored = (Envelope, Arc<Vec<u8>>);

struct MemoryIncoming {
    queue: Arc<MemoryQueue>,
    id: QueueId,
    body: Vec<u8>,
}

impl Incoming for MemoryIncoming {
    fn id(&self) -> &str {
        &self.id
    }

    fn size(&self) -> u64 {
        self.body.len() as u64
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.body.extend_from_slice(data);
        Ok(())
    }

    fn commit(self: Box<Self>, mut envelope: Envelope) -> Result<Envelope, SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.body.len() as u64;
        lock(&self.queue.messages).insert(self.id.clone(), (envelope.clone(), Arc::new(self.body)));
        Ok(envelope)
    }
}

/// A reader over a shared body.
struct SharedBody {
    body: Arc<Vec<u8>>,
    at: usize,
}

impl std::io::Read for SharedBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.body.get(self.at..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl Queue for MemoryQueue {
    fn new_id(&self) -> QueueId {
        let mut last = lock(&self.last_id);
        *last += 1;
        format!("{:016X}", *last)
    }

    fn incoming(self: Arc<Self>, id: &str) -> Result<Box<dyn Incoming>, SpoolError> {
        Ok(Box::new(MemoryIncoming { queue: self, id: id.to_string(), body: Vec::new() }))
    }

    fn get(&self, id: &str) -> Option<Envelope> {
        lock(&self.messages).get(id).map(|(e, _)| e.clone())
    }

    fn visit(&self, f: &mut dyn FnMut(&Envelope)) {
        lock(&self.messages).values().for_each(|(e, _)| f(e));
    }

    fn update(&self, envelopes: &[Envelope]) -> Result<(), SpoolError> {
        let mut messages = lock(&self.messages);
        if let Some(missing) = envelopes.iter().find(|e| !messages.contains_key(&e.id)) {
            return Err(SpoolError::NotFound(missing.id.clone()));
        }
        for envelope in envelopes {
            if let Some(slot) = messages.get_mut(&envelope.id) {
                slot.0 = envelope.clone();
            }
        }
        Ok(())
    }

    fn note(&self, envelopes: Vec<Envelope>) {
        let mut messages = lock(&self.messages);
        for envelope in envelopes {
            if let Some(slot) = messages.get_mut(&envelope.id) {
                slot.0 = envelope;
            }
        }
    }

    fn persist(&self) -> Result<usize, SpoolError> {
        Ok(0)
    }

    fn remove(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        let mut messages = lock(&self.messages);
        for id in ids {
            messages.remove(id);
        }
        Ok(())
    }

    fn open_body(&self, id: &str) -> Result<MessageBody, SpoolError> {
        let messages = lock(&self.messages);
        let (_, body) = messages.get(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let len = body.len() as u64;
        Ok(MessageBody::new(Box::new(SharedBody { body: Arc::clone(body), at: 0 }), len))
    }

    fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError> {
        Ok(lock(&self.documents).get(name).cloned())
    }

    fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError> {
        let mut documents = lock(&self.documents);
        let current = documents.get(name).map(|(version, _)| *version);
        if current != seen {
            return Ok(false);
        }
        documents.insert(name.to_string(), (current.unwrap_or(0) + 1, body));
        Ok(true)
    }

    fn space(&self) -> Result<SpaceInfo, SpoolError> {
        Ok(SpaceInfo {
            free_bytes: u64::MAX / 2,
            total_bytes: u64::MAX / 2,
            free_inodes: u64::MAX / 2,
            total_inodes: u64::MAX / 2,
        })
    }
}
