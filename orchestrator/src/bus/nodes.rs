//! Worker heartbeats in KV `CAIRN_NODES`: the value a worker puts every 2 s under its node's
//! key ([`Heartbeat::key`], [`Heartbeat`]), and [`NodeWatcher`], which follows the bucket for an orchestrator and
//! says which nodes went silent.
//!
//! The watcher only observes: deciding that a silent node is offline (and appending
//! `NodeHeartbeatLost`) is the partition owner's engine's job. Silence is measured with the
//! watcher's own clock from the moment a new heartbeat value arrived, never with the worker's
//! clock, so clock skew between machines does not matter.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use cairn_schemas::NodeId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Error, NODES_BUCKET};
use crate::clock::Clock;

/// Longest accepted heartbeat value.
const MAX_HEARTBEAT_LEN: usize = 4096;
/// Longest accepted worker version text.
const MAX_VERSION_LEN: usize = 64;

/// What a worker says about itself every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node.
    pub node: NodeId,
    /// The worker's clock when it wrote this (informational; silence is measured by the
    /// reader's clock).
    pub at_ms: u64,
    /// The worker's version.
    pub worker_version: String,
    /// Steps running on the node.
    pub running_steps: u32,
}

impl Heartbeat {
    /// The KV key of this node's heartbeat: the name with '.' written as `=2E` (KV keys
    /// cannot hold '%', the subject escape, and a name may hold "..", which a key cannot;
    /// '=' never occurs in a name, so the key is unambiguous).
    pub fn key(node: &NodeId) -> String {
        node.as_str().replace('.', "=2E")
    }

    /// The bytes stored in the bucket (JSON, readable with `nats kv get`).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a heartbeat always serializes")
    }

    /// Decodes and validates the value stored under `key`.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Heartbeat, Error> {
        let bad = |reason: String| Error::BadValue {
            what: "heartbeat",
            reason: format!("key {key:?}: {reason}"),
        };
        if bytes.len() > MAX_HEARTBEAT_LEN {
            return Err(bad(format!(
                "{} bytes (at most {MAX_HEARTBEAT_LEN})",
                bytes.len()
            )));
        }
        let heartbeat: Heartbeat = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if Heartbeat::key(&heartbeat.node) != key {
            return Err(bad(format!(
                "the value names node {} (its key would be {:?})",
                heartbeat.node,
                Heartbeat::key(&heartbeat.node)
            )));
        }
        let version = &heartbeat.worker_version;
        if version.is_empty()
            || version.len() > MAX_VERSION_LEN
            || version.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad(format!(
                "worker version {version:?} is not 1 to {MAX_VERSION_LEN} printable characters"
            )));
        }
        Ok(heartbeat)
    }
}

/// The last heartbeat of a node and when (watcher clock) a new one last arrived.
#[derive(Debug, Clone)]
struct Seen {
    heartbeat: Heartbeat,
    revision: u64,
    seen_ms: u64,
}

/// Follows `CAIRN_NODES` in a background task (stopped when the watcher is dropped).
#[derive(Debug)]
pub struct NodeWatcher {
    seen: Arc<Mutex<BTreeMap<NodeId, Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NodeWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NodeWatcher {
    /// Starts following the bucket (which must exist: see [`super::ensure_nodes_bucket`]).
    /// The current values arrive first; a broken watch is re-established.
    pub async fn start(
        js: jetstream::Context,
        clock: Arc<dyn Clock>,
    ) -> Result<NodeWatcher, Error> {
        let store = js
            .get_key_value(NODES_BUCKET)
            .await
            .map_err(|e| Error::Setup {
                what: "KV bucket",
                name: NODES_BUCKET.into(),
                reason: e.to_string(),
            })?;
        let watch = store
            .watch_with_history(">")
            .await
            .map_err(|e| Error::Setup {
                what: "KV watch of",
                name: NODES_BUCKET.into(),
                reason: e.to_string(),
            })?;
        let seen: Arc<Mutex<BTreeMap<NodeId, Seen>>> = Arc::default();
        let task = tokio::spawn(follow(store, watch, seen.clone(), clock));
        Ok(NodeWatcher { seen, task })
    }

    /// Nodes whose last new heartbeat arrived more than `after_ms` before `now_ms` (watcher
    /// clock), with when it arrived. A node already silent when the watcher started counts
    /// from the start.
    pub fn silent_nodes(&self, now_ms: u64, after_ms: u64) -> Vec<(NodeId, u64)> {
        self.seen
            .lock()
            .expect("node watcher map")
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.seen_ms) > after_ms)
            .map(|(node, s)| (node.clone(), s.seen_ms))
            .collect()
    }

    /// The last valid heartbeat of every node.
    pub fn heartbeats(&self) -> BTreeMap<NodeId, Heartbeat> {
        self.seen
            .lock()
            .expect("node watcher map")
            .iter()
            .map(|(node, s)| (node.clone(), s.heartbeat.clone()))
            .collect()
    }
}

async fn follow(
    store: jetstream::kv::Store,
    mut watch: jetstream::kv::Watch,
    seen: Arc<Mutex<BTreeMap<NodeId, Seen>>>,
    clock: Arc<dyn Clock>,
) {
    loop {
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(bucket = NODES_BUCKET, error = %e, "heartbeat watch error");
                    break;
                }
            };
            apply_entry(&seen, &entry, clock.now_ms());
        }
        // The watch ended or failed: re-establish it (values already seen keep their time).
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match store.watch_with_history(">").await {
                Ok(new_watch) => {
                    watch = new_watch;
                    break;
                }
                Err(e) => {
                    tracing::warn!(bucket = NODES_BUCKET, error = %e, "cannot watch heartbeats")
                }
            }
        }
    }
}

fn apply_entry(seen: &Mutex<BTreeMap<NodeId, Seen>>, entry: &jetstream::kv::Entry, now_ms: u64) {
    let mut seen = seen.lock().expect("node watcher map");
    match entry.operation {
        Operation::Delete | Operation::Purge => {
            seen.retain(|node, _| Heartbeat::key(node) != entry.key);
        }
        Operation::Put => match Heartbeat::decode(&entry.key, &entry.value) {
            Ok(heartbeat) => {
                let node = heartbeat.node.clone();
                // A re-established watch delivers the last value again: not a new heartbeat.
                if seen
                    .get(&node)
                    .is_some_and(|s| s.revision >= entry.revision)
                {
                    return;
                }
                seen.insert(
                    node,
                    Seen {
                        heartbeat,
                        revision: entry.revision,
                        seen_ms: now_ms,
                    },
                );
            }
            Err(e) => tracing::warn!(bucket = NODES_BUCKET, error = %e, "heartbeat ignored"),
        },
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn heartbeat_values_are_validated() {
        let node = NodeId::new("kvm-01.lab").unwrap();
        let heartbeat = Heartbeat {
            node: node.clone(),
            at_ms: 5,
            worker_version: "0.1.0".into(),
            running_steps: 2,
        };
        let key = Heartbeat::key(&node);
        assert_eq!(key, "kvm-01=2Elab");
        assert_eq!(
            Heartbeat::decode(&key, &heartbeat.encode()).unwrap(),
            heartbeat
        );
        let err = Heartbeat::decode("other", &heartbeat.encode()).unwrap_err();
        assert!(err.to_string().contains("names node kvm-01.lab"), "{err}");
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"node":"bad node","at_ms":1,"worker_version":"1","running_steps":0}"#,
            br#"{"node":"kvm-01.lab","at_ms":1,"worker_version":"","running_steps":0}"#,
            br#"{"node":"kvm-01.lab","at_ms":1,"worker_version":"a b","running_steps":0}"#,
            br#"{"node":"kvm-01.lab","at_ms":-1,"worker_version":"1","running_steps":0}"#,
        ] {
            assert!(Heartbeat::decode(&key, bad).is_err(), "{bad:?}");
        }
        assert!(Heartbeat::decode(&key, &vec![b' '; 5000]).is_err());
    }
}
