//! Partition leases: how orchestrator instances share the partitions of one cluster.
//!
//! KV bucket `CAIRN_LEASES`, whose `max_age` is the lease TTL (default 6 s), holds:
//! - `instance.<id>`: one key per live instance, put every TTL/3 (membership);
//! - `partition.<p>`: the owner of partition p, a [`LeaseValue`] `{instance, epoch}`.
//!
//! An instance aims at its fair share, ceil(P / live instances). It takes a free partition
//! with a KV `create` (which fails when someone holds it); the revision of that create is the
//! owner **epoch**, written into the value at once so workers can fence steps with it. It
//! renews each lease every TTL/3 with an `update` at the last revision it wrote; a renewal
//! that fails on the revision means someone else took the partition. A lease that is not
//! renewed for TTL disappears (the bucket's `max_age`) and any instance can take it.
//!
//! Fencing on this side: an instance stops acting on a partition (revokes it in its
//! [`Ownership`]) as soon as a renewal fails on the revision, and also when it has not
//! renewed successfully for half the TTL (it cannot tell whether the lease still stands), so
//! it stops writing before anyone else can win the lease. Epochs grow with every new owner
//! (KV revisions are the bucket stream's sequence numbers), and every step carries its
//! epoch, so a worker refuses steps of a deposed owner.
//!
//! Must not: decide anything about jobs; it only says which partitions this instance owns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::engine::ownership::Ownership;

pub use super::LEASES_BUCKET as LEASE_BUCKET;
pub use super::lease_key as partition_key;
pub use super::lease_value::LeaseValue;

fn instance_key(instance: &str) -> String {
    format!(
        "instance.{}",
        cairn_schemas::subjects::subject_token(instance)
    )
}

/// Errors of the lease manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lease bucket could not be created or opened.
    #[error("lease bucket {LEASE_BUCKET}: {0}")]
    Bucket(String),
    /// The instance id cannot be a key.
    #[error("instance id {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    BadInstance(String),
}

/// Settings of the lease manager.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// This instance's id (unique in the cluster).
    pub instance: String,
    /// Lease TTL: a dead instance's partitions are free this long after its last renewal.
    pub ttl: Duration,
    /// Replicas of the bucket (1, or 3 in a cluster).
    pub replicas: usize,
}

/// A change of ownership, for the process to start or stop per-partition work (report
/// consumers, command subscriptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// This instance now owns the partition with this epoch.
    Granted { partition: u16, epoch: u64 },
    /// This instance no longer owns the partition.
    Revoked { partition: u16 },
}

/// Opens (creating if needed) the lease bucket.
pub async fn lease_bucket(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, Error> {
    let config = kv::Config {
        bucket: LEASE_BUCKET.into(),
        description: "cairn partition leases and orchestrator membership".into(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create) => js
            .get_key_value(LEASE_BUCKET)
            .await
            .map_err(|e| Error::Bucket(format!("{create}; opening it: {e}"))),
    }
}

struct Held {
    epoch: u64,
    revision: u64,
    renewed: Instant,
}

/// The lease manager of one instance.
pub struct LeaseManager {
    store: kv::Store,
    config: LeaseConfig,
    ownership: Arc<Ownership>,
    held: BTreeMap<u16, Held>,
    changes: mpsc::UnboundedSender<LeaseChange>,
    member_renewed: Option<Instant>,
}

fn now_ms() -> u64 {
    crate::clock::wall_ms()
}

fn valid_instance(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl LeaseManager {
    /// A manager for `config.instance`; ownership changes go to `ownership` and `changes`.
    pub fn new(
        store: kv::Store,
        config: LeaseConfig,
        ownership: Arc<Ownership>,
        changes: mpsc::UnboundedSender<LeaseChange>,
    ) -> Result<LeaseManager, Error> {
        if !valid_instance(&config.instance) {
            return Err(Error::BadInstance(config.instance));
        }
        Ok(LeaseManager {
            store,
            config,
            ownership,
            held: BTreeMap::new(),
            changes,
            member_renewed: None,
        })
    }

    /// Runs rounds every TTL/3 until `stop` turns true; then releases every lease.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let period = self.config.ttl / 3;
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.round().await,
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
        }
        self.release_all().await;
    }

    /// One round: membership, renewals, then giving up or taking partitions towards the
    /// fair share.
    pub async fn round(&mut self) {
        self.renew_leases().await;
        self.renew_membership().await;
        let instances = self.live_instances().await;
        let n = self.ownership.partitions().get() as usize;
        let target = n.div_ceil(instances.max(1));
        if self.held.len() > target {
            let extra: Vec<u16> = self
                .held
                .keys()
                .rev()
                .take(self.held.len() - target)
                .copied()
                .collect();
            for partition in extra {
                self.release(partition).await;
            }
        } else if self.held.len() < target {
            self.acquire(target - self.held.len()).await;
        }
    }

    async fn renew_membership(&mut self) {
        let key = instance_key(&self.config.instance);
        match self.store.put(&key, now_ms().to_string().into()).await {
            Ok(_) => self.member_renewed = Some(Instant::now()),
            Err(e) => tracing::warn!(error = %e, "could not renew this orchestrator's membership"),
        }
    }

    /// Live instances (at least this one).
    async fn live_instances(&self) -> usize {
        let mut live = BTreeSet::new();
        live.insert(instance_key(&self.config.instance));
        match self.store.keys().await {
            Ok(mut keys) => {
                while let Some(key) = keys.next().await {
                    match key {
                        Ok(key) if key.starts_with("instance.") => {
                            live.insert(key);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "listing lease keys failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "listing lease keys failed"),
        }
        live.len()
    }

    /// Renews every held lease at once (one round trip, not one per partition, so a round
    /// stays well inside the TTL on a slow or loaded cluster).
    async fn renew_leases(&mut self) {
        let half_ttl = self.config.ttl / 2;
        let renewals = self.held.iter().map(|(&partition, held)| {
            let value = LeaseValue {
                instance: self.config.instance.clone(),
                epoch: held.epoch,
            };
            let store = self.store.clone();
            let revision = held.revision;
            async move {
                let result = store
                    .update(partition_key(partition), value.encode().into(), revision)
                    .await;
                (partition, result)
            }
        });
        let results = futures::future::join_all(renewals).await;
        for (partition, result) in results {
            match result {
                Ok(revision) => {
                    if let Some(held) = self.held.get_mut(&partition) {
                        held.revision = revision;
                        held.renewed = Instant::now();
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition, error = %e, "lease lost to another orchestrator");
                    self.drop_lease(partition);
                }
                Err(e) => {
                    let since = self
                        .held
                        .get(&partition)
                        .map_or(Duration::MAX, |h| h.renewed.elapsed());
                    tracing::warn!(partition, error = %e, ?since, "could not renew a lease");
                    if since >= half_ttl {
                        tracing::warn!(partition, "lease not renewed for half its TTL; giving up");
                        self.drop_lease(partition);
                    }
                }
            }
        }
    }

    fn drop_lease(&mut self, partition: u16) {
        self.held.remove(&partition);
        self.ownership.revoke(partition);
        let _ = self.changes.send(LeaseChange::Revoked { partition });
    }

    async fn release(&mut self, partition: u16) {
        tracing::info!(partition, "handing a partition over (rebalancing)");
        let revision = self.held.get(&partition).map(|h| h.revision);
        self.drop_lease(partition);
        // Delete only our own revision: if the write fails the lease expires anyway.
        if let Some(revision) = revision {
            let key = partition_key(partition);
            if let Err(e) = self
                .store
                .delete_expect_revision(&key, Some(revision))
                .await
            {
                tracing::debug!(partition, error = %e, "could not delete a released lease");
            }
        }
    }

    async fn acquire(&mut self, mut wanted: usize) {
        let n = self.ownership.partitions().get();
        // Start at a per-instance offset so instances starting together try different ones.
        let offset = (cairn_schemas::subjects::fnv1a64(self.config.instance.as_bytes())
            % u64::from(n)) as u16;
        for i in 0..n {
            if wanted == 0 {
                return;
            }
            let partition = (offset + i) % n;
            if self.held.contains_key(&partition) {
                continue;
            }
            let key = partition_key(partition);
            let claim = LeaseValue {
                instance: self.config.instance.clone(),
                epoch: 0,
            };
            let created = match self.store.create(&key, claim.encode().into()).await {
                Ok(revision) => revision,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => {
                    tracing::debug!(partition, error = %e, "could not try a lease");
                    continue;
                }
            };
            let value = LeaseValue {
                instance: self.config.instance.clone(),
                epoch: created,
            };
            let revision = match self
                .store
                .update(&key, value.encode().into(), created)
                .await
            {
                Ok(revision) => revision,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "won a lease but could not stamp its epoch");
                    continue;
                }
            };
            tracing::info!(partition, epoch = created, "partition lease won");
            self.held.insert(
                partition,
                Held {
                    epoch: created,
                    revision,
                    renewed: Instant::now(),
                },
            );
            self.ownership.grant(partition, created, now_ms());
            let _ = self.changes.send(LeaseChange::Granted {
                partition,
                epoch: created,
            });
            wanted -= 1;
        }
    }

    async fn release_all(&mut self) {
        let partitions: Vec<u16> = self.held.keys().copied().collect();
        for partition in partitions {
            self.release(partition).await;
        }
        let _ = self.store.delete(instance_key(&self.config.instance)).await;
    }

    /// The partitions held now.
    pub fn held(&self) -> Vec<u16> {
        self.held.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use super::*;

    async fn manager(
        js: &jetstream::Context,
        instance: &str,
        ttl: Duration,
    ) -> (
        LeaseManager,
        Arc<Ownership>,
        mpsc::UnboundedReceiver<LeaseChange>,
    ) {
        let store = lease_bucket(js, ttl, 1).await.unwrap();
        let ownership = Arc::new(Ownership::none(NonZeroU16::new(4).unwrap()));
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = LeaseManager::new(
            store,
            LeaseConfig {
                instance: instance.into(),
                ttl,
                replicas: 1,
            },
            ownership.clone(),
            tx,
        )
        .unwrap();
        (manager, ownership, rx)
    }

    async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_share_partitions_and_take_over_a_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let server = cairn_tests::nats::NatsServer::start(dir.path());
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let ttl = Duration::from_secs(2);

        let (mut a, own_a, mut changes_a) = manager(&js, "orch-a", ttl).await;
        a.round().await;
        assert_eq!(
            a.held().len(),
            4,
            "alone, an instance takes every partition"
        );
        let epochs_a: Vec<u64> = (0..4).map(|p| own_a.get(p).unwrap().epoch).collect();
        assert!(epochs_a.iter().all(|&e| e > 0));
        let mut granted = 0;
        while let Ok(change) = changes_a.try_recv() {
            assert!(matches!(change, LeaseChange::Granted { .. }));
            granted += 1;
        }
        assert_eq!(granted, 4);

        let (mut b, own_b, _changes_b) = manager(&js, "orch-b", ttl).await;
        // b joins: a gives up its extra partitions, b takes them.
        wait_for("a fair share each", async || {
            a.round().await;
            b.round().await;
            a.held().len() == 2 && b.held().len() == 2
        })
        .await;
        for p in 0..4u16 {
            assert!(
                own_a.get(p).is_some() != own_b.get(p).is_some(),
                "partition {p} has exactly one owner"
            );
        }
        // The stored value names the owner and its epoch; workers fence with it.
        let store = lease_bucket(&js, ttl, 1).await.unwrap();
        for p in b.held() {
            let value =
                LeaseValue::decode(&store.get(partition_key(p)).await.unwrap().unwrap()).unwrap();
            assert_eq!(value.instance, "orch-b");
            assert_eq!(value.epoch, own_b.get(p).unwrap().epoch);
        }

        // a dies without releasing anything: b takes its partitions with newer epochs once
        // the leases expire.
        let a_held = a.held();
        drop(a);
        wait_for("b owning everything", async || {
            b.round().await;
            b.held().len() == 4
        })
        .await;
        for p in a_held {
            assert!(own_b.get(p).unwrap().epoch > epochs_a[usize::from(p)]);
        }
        // own_a still says a owns them: a dead process's table is never consulted again,
        // and a live one would have revoked them on its failed renewals (next test).
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_taken_over_is_revoked_on_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let server = cairn_tests::nats::NatsServer::start(dir.path());
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let ttl = Duration::from_secs(2);
        let (mut a, own_a, mut changes_a) = manager(&js, "orch-a", ttl).await;
        a.round().await;
        assert_eq!(a.held().len(), 4);
        while changes_a.try_recv().is_ok() {}
        // Someone else overwrites partition 0's lease (as if a's lease had expired and been
        // won while a was paused).
        let store = lease_bucket(&js, ttl, 1).await.unwrap();
        store
            .put(
                partition_key(0),
                LeaseValue {
                    instance: "orch-z".into(),
                    epoch: 999,
                }
                .encode()
                .into(),
            )
            .await
            .unwrap();
        a.renew_leases().await;
        assert!(own_a.get(0).is_none(), "a stops acting on partition 0");
        assert_eq!(
            changes_a.try_recv().unwrap(),
            LeaseChange::Revoked { partition: 0 }
        );
        assert!(own_a.get(1).is_some());
    }

    #[test]
    fn instance_ids_are_validated() {
        assert!(valid_instance("orch-1_a"));
        assert!(!valid_instance("orch.1"));
        assert!(!valid_instance(""));
        assert!(!valid_instance(&"x".repeat(65)));
    }
}
