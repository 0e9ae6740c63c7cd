//! NATS subject names and the partition function. Pure string arithmetic; only the bus module
//! of the orchestrator talks to NATS.
//!
//! - `cairn.evt.<partition>.<aggregate kind>.<id>`: events (stream `CAIRN_EVENTS`);
//! - `cairn.step.<node>`: step queue of one node;
//! - `cairn.report.<partition>.<node>`: a node's worker reports for a partition's owner;
//! - `cairn.node.<node>.cmd`: a node's own commands (registration, inventory, space).
//!
//! Every subject a worker publishes or pulls names its node, so that nats-server's
//! per-identity permissions can bind each subject to one node's credentials, and the
//! orchestrator can compare the node a subject names with the node a message claims.
//!
//! Node names may contain '.', the NATS token separator, so names are escaped in subjects:
//! '.' becomes `%2E` ('%' cannot occur in a name, so the escaping is reversible).

use std::num::NonZeroU16;

use crate::ids::{GroupId, NodeId, VmId};
use crate::v1::Aggregate;

/// Number of partitions when the configuration names none.
pub const DEFAULT_PARTITIONS: NonZeroU16 = NonZeroU16::new(16).unwrap();

/// Filter matching every event subject.
pub const ALL_EVENTS: &str = "cairn.evt.>";

/// Filter matching every report subject.
pub const ALL_REPORTS: &str = "cairn.report.>";

/// Filter matching every node's command subject.
pub const ALL_NODE_COMMANDS: &str = "cairn.node.*.cmd";

/// 64-bit FNV-1a. Stable across builds, platforms and Rust versions (unlike `DefaultHasher`),
/// which is what a persistent partition assignment needs.
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    let mut idx = 0;
    while idx < bytes.len() {
        hash ^= bytes[idx] as u64;
        hash = hash.wrapping_mul(PRIME);
        idx += 1;
    }
    hash
}

/// The partition (0..n_partitions) of a protection group's events.
///
/// Changing this function or the number of partitions moves aggregates between partitions; a
/// cluster keeps its partition count for its lifetime.
pub fn partition_of(group: &GroupId, n_partitions: NonZeroU16) -> u16 {
    partition_of_key(group.as_bytes(), n_partitions)
}

/// The partition of a VM, of its jobs and of its events: the unit an orchestrator owns. A VM is
/// scheduled, and its jobs are driven, by its partition's owner.
pub fn partition_of_vm(vm: &VmId, n_partitions: NonZeroU16) -> u16 {
    partition_of_key(vm.as_bytes(), n_partitions)
}

/// The partition of a node's events (registration, inventory, heartbeats).
pub fn partition_of_node(node: &NodeId, n_partitions: NonZeroU16) -> u16 {
    partition_of_key(node.as_str().as_bytes(), n_partitions)
}

/// The partition of any key: FNV-1a, then a multiply-shift range reduction.
pub fn partition_of_key(key: &[u8], n_partitions: NonZeroU16) -> u16 {
    let hash = fnv1a64(key);
    // Multiply-shift range reduction: it takes the hash's high bits, which FNV mixes well.
    // (`hash % n` would take the low bits, and FNV's low 4 bits depend only on the low 4 bits
    // of each input byte.) The result is below n, so it fits in u16.
    ((u128::from(hash) * u128::from(n_partitions.get())) >> 64) as u16
}

/// A name made safe as one subject token: '.' becomes `%2E`.
pub fn subject_token(name: &str) -> String {
    name.replace('.', "%2E")
}

/// The node a subject token names ([`subject_token`] reversed), validated as a node name.
pub fn node_of_token(token: &str) -> Option<NodeId> {
    if token.contains('.') {
        return None;
    }
    NodeId::new(token.replace("%2E", ".")).ok()
}

/// `cairn.evt.<partition>.<kind>.<id>`.
pub fn event_subject(partition: u16, aggregate: &Aggregate) -> String {
    format!(
        "cairn.evt.{partition}.{}.{}",
        aggregate.kind(),
        subject_token(&aggregate.id_string())
    )
}

/// `cairn.evt.<partition>.>`: every event of one partition.
pub fn partition_events_filter(partition: u16) -> String {
    format!("cairn.evt.{partition}.>")
}

/// `cairn.step.<node>`: the node's step queue.
pub fn step_subject(node: &NodeId) -> String {
    format!("cairn.step.{}", subject_token(node.as_str()))
}

/// `cairn.report.<partition>.<node>`: `node`'s reports for the partition's owner.
pub fn report_subject(partition: u16, node: &NodeId) -> String {
    format!("cairn.report.{partition}.{}", subject_token(node.as_str()))
}

/// `cairn.report.<partition>.*`: every node's reports for one partition.
pub fn partition_reports_filter(partition: u16) -> String {
    format!("cairn.report.{partition}.*")
}

/// The node a report subject names (`cairn.report.<p>.<node>`), or `None` for any other
/// subject.
pub fn node_of_report_subject(subject: &str) -> Option<NodeId> {
    let rest = subject.strip_prefix("cairn.report.")?;
    let (partition, node) = rest.split_once('.')?;
    partition.parse::<u16>().ok()?;
    node_of_token(node)
}

/// `cairn.node.<node>.cmd`: commands a node's worker sends about itself.
pub fn node_command_subject(node: &NodeId) -> String {
    format!("cairn.node.{}.cmd", subject_token(node.as_str()))
}

/// The node a node-command subject names (`cairn.node.<node>.cmd`), or `None`.
pub fn node_of_command_subject(subject: &str) -> Option<NodeId> {
    let token = subject.strip_prefix("cairn.node.")?.strip_suffix(".cmd")?;
    node_of_token(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_is_pinned_and_spreads() {
        let n = DEFAULT_PARTITIONS;
        // Pinned: a change here silently moves every existing group to another partition.
        let group = GroupId::new_v7(1_700_000_000_000, [0x5a; 10]);
        // Cross-checked with an independent FNV-1a computation over the UUID bytes.
        assert_eq!(partition_of(&group, n), 4);
        let mut counts = [0u32; 16];
        for idx in 0u32..16_000 {
            let mut rand = [0u8; 10];
            rand[..4].copy_from_slice(&idx.to_be_bytes());
            let group = GroupId::new_v7(1_700_000_000_000 + u64::from(idx), rand);
            counts[usize::from(partition_of(&group, n))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let one = NonZeroU16::new(1).unwrap();
        assert_eq!(partition_of(&group, one), 0);
    }

    #[test]
    fn subjects() {
        let job = JobId::new_v7(1, [0; 10]);
        assert_eq!(
            event_subject(3, &Aggregate::Job(job)),
            format!("cairn.evt.3.job.{job}")
        );
        let node = NodeId::new("kvm-01.lab").unwrap();
        assert_eq!(
            event_subject(0, &Aggregate::Node(node.clone())),
            "cairn.evt.0.node.kvm-01%2Elab"
        );
        assert_eq!(step_subject(&node), "cairn.step.kvm-01%2Elab");
        assert_eq!(report_subject(15, &node), "cairn.report.15.kvm-01%2Elab");
        assert_eq!(partition_reports_filter(15), "cairn.report.15.*");
        assert_eq!(node_command_subject(&node), "cairn.node.kvm-01%2Elab.cmd");
        assert_eq!(partition_events_filter(2), "cairn.evt.2.>");
    }

    #[test]
    fn subjects_name_their_node() {
        let node = NodeId::new("kvm-01.lab").unwrap();
        assert_eq!(
            node_of_report_subject(&report_subject(3, &node)),
            Some(node.clone())
        );
        assert_eq!(
            node_of_command_subject(&node_command_subject(&node)),
            Some(node.clone())
        );
        for bad in [
            "cairn.report.3",
            "cairn.report.x.kvm-01",
            "cairn.report.3.kvm-01.extra",
            "cairn.report.3.",
            "cairn.evt.3.kvm-01",
        ] {
            assert_eq!(node_of_report_subject(bad), None, "{bad}");
        }
        for bad in [
            "cairn.node.cmd",
            "cairn.node.a.b.cmd",
            "cairn.node..cmd",
            "cairn.node.kvm-01.other",
        ] {
            assert_eq!(node_of_command_subject(bad), None, "{bad}");
        }
    }
}
