//! Which partitions this orchestrator instance acts on, and with which owner epoch.
//!
//! Every instance applies the whole event log to its projections, so any instance answers
//! reads for every partition. Acting (scheduling, driving jobs, dispatching steps, appending
//! job events) is for the owner of a partition only. In `cairn up` one instance owns every
//! partition with one epoch; distributed, the lease manager (`bus::lease`) grants and revokes
//! partitions as it wins, renews and loses leases. The engine consults this table before each
//! decision and before each job append, so a partition revoked here is never written again by
//! this instance.
//!
//! Holds no IO and reads no clock: the time a partition was granted comes from the caller.

use std::collections::BTreeMap;
use std::num::NonZeroU16;
use std::sync::RwLock;

/// A partition this instance owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// The owner epoch (the lease revision that granted it); steps carry it.
    pub epoch: u64,
    /// When it was granted (Unix milliseconds): steps of earlier epochs get their grace from
    /// here.
    pub since_ms: u64,
}

/// The partitions one instance owns.
#[derive(Debug)]
pub struct Ownership {
    partitions: NonZeroU16,
    owned: RwLock<BTreeMap<u16, Owned>>,
}

impl Ownership {
    /// Owns nothing yet (distributed: leases will grant partitions).
    pub fn none(partitions: NonZeroU16) -> Self {
        Ownership {
            partitions,
            owned: RwLock::new(BTreeMap::new()),
        }
    }

    /// Owns every partition with one epoch (the embedded server).
    pub fn all(partitions: NonZeroU16, epoch: u64, since_ms: u64) -> Self {
        let owned = (0..partitions.get())
            .map(|p| (p, Owned { epoch, since_ms }))
            .collect();
        Ownership {
            partitions,
            owned: RwLock::new(owned),
        }
    }

    /// The number of partitions.
    pub fn partitions(&self) -> NonZeroU16 {
        self.partitions
    }

    /// Grants `partition` with `epoch`; returns false when the partition is out of range.
    pub fn grant(&self, partition: u16, epoch: u64, since_ms: u64) -> bool {
        if partition >= self.partitions.get() {
            return false;
        }
        self.owned
            .write()
            .expect("ownership lock")
            .insert(partition, Owned { epoch, since_ms });
        true
    }

    /// Stops owning `partition`.
    pub fn revoke(&self, partition: u16) {
        self.owned
            .write()
            .expect("ownership lock")
            .remove(&partition);
    }

    /// Whether and how this instance owns `partition`.
    pub fn get(&self, partition: u16) -> Option<Owned> {
        self.owned
            .read()
            .expect("ownership lock")
            .get(&partition)
            .copied()
    }

    /// The partitions owned now, in order.
    pub fn owned(&self) -> Vec<u16> {
        self.owned
            .read()
            .expect("ownership lock")
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_and_revoke() {
        let n = NonZeroU16::new(4).unwrap();
        let own = Ownership::none(n);
        assert!(own.owned().is_empty());
        assert!(own.grant(2, 7, 100));
        assert!(!own.grant(4, 7, 100), "out of range");
        assert_eq!(
            own.get(2),
            Some(Owned {
                epoch: 7,
                since_ms: 100
            })
        );
        assert_eq!(own.get(1), None);
        own.revoke(2);
        assert_eq!(own.get(2), None);
        let all = Ownership::all(n, 9, 5);
        assert_eq!(all.owned(), vec![0, 1, 2, 3]);
        assert_eq!(all.get(3).unwrap().epoch, 9);
    }
}
