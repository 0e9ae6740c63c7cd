//! What each NATS identity of a cairn deployment may publish and subscribe to: the one place
//! that turns cairn's subjects into nats-server permissions (`cairn ops nats-init` writes them
//! into the server's configuration). Pure; it knows the subjects and stream names of this
//! module and of the event log, nothing of files or servers.
//!
//! Three kinds of identity, each a client certificate mapped to a user (`verify_and_map`):
//! - an orchestrator (`CN=cairn-orchestrator-<name>`) owns the event log, dispatches steps,
//!   takes partition leases and forwards commands; it may not forge a worker's report, nor
//!   delete or purge a stream;
//! - a node (`CN=cairn-node-<name>`) may take its own steps, report on them, write its own
//!   heartbeat, send commands about itself, answer browse requests for itself and read the
//!   leases that fence its steps: no other node's subjects, no event, no lease, no admin
//!   command;
//! - automation (`CN=cairn-automation`) may only subscribe to the public event subjects.
//!
//! NATS wildcards match whole tokens, so every pattern below names whole tokens; a node's
//! name is written as its subject token ([`subject_token`]).

use cairn_schemas::NodeId;
use cairn_schemas::subjects::{
    ALL_EVENTS, ALL_NODE_COMMANDS, node_command_subject, step_subject, subject_token,
};

use super::{
    CANCEL_SUBJECT, Heartbeat, LEASES_BUCKET, NODES_BUCKET, REPORTS_STREAM, STEPS_STREAM,
    browse_subject, node_inbox_prefix, worker::consumer_name,
};

/// The bucket of processed command ids (the default of `log::jetstream`).
pub const COMMANDS_BUCKET: &str = "CAIRN_COMMANDS";
/// Public event subjects that automation may follow.
pub const PUBLIC_EVENTS: &str = "cairn.public.>";

/// One NATS identity of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// An orchestrator instance (its `--instance` name).
    Orchestrator(NodeId),
    /// A node's worker.
    Node(NodeId),
    /// Read-only automation: dashboards, event-driven scripts.
    Automation,
}

/// What one identity may do, in nats-server's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish_allow: Vec<String>,
    /// Subjects it may never publish to, even when an allow pattern covers them.
    pub publish_deny: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe_allow: Vec<String>,
    /// Whether it may answer requests it received (publish once to their reply subject).
    pub allow_responses: bool,
}

impl Identity {
    /// The certificate's common name: `cairn-orchestrator-ctl-01`, `cairn-node-kvm-01`,
    /// `cairn-automation`.
    pub fn common_name(&self) -> String {
        match self {
            Identity::Orchestrator(name) => format!("cairn-orchestrator-{name}"),
            Identity::Node(name) => format!("cairn-node-{name}"),
            Identity::Automation => "cairn-automation".into(),
        }
    }

    /// The NATS user the certificate maps to (its subject, RFC 2253).
    pub fn user(&self) -> String {
        format!("CN={}", self.common_name())
    }

    /// What this identity may publish and subscribe to.
    pub fn permissions(&self) -> Permissions {
        match self {
            Identity::Orchestrator(_) => orchestrator(),
            Identity::Node(node) => node_permissions(node),
            // An empty allow list means "everything" to nats-server: deny instead.
            Identity::Automation => Permissions {
                publish_deny: vec![">".into()],
                subscribe_allow: vec![PUBLIC_EVENTS.into()],
                ..Permissions::default()
            },
        }
    }
}

/// Stream management that no identity may do: cairn's streams are never deleted or purged
/// through the bus (the event stream also refuses it itself: `deny_delete`, `deny_purge`).
pub fn destructive_stream_api() -> Vec<String> {
    ["STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.DELETE"]
        .iter()
        .map(|action| format!("$JS.API.{action}.>"))
        .collect()
}

fn kv(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn orchestrator() -> Permissions {
    let mut publish_allow = strings(&[
        ALL_EVENTS,
        "cairn.step.>",
        "cairn.cmd.>",
        "cairn.browse.>",
        CANCEL_SUBJECT,
        // Creating and reading streams, consumers and buckets, direct gets, fetches.
        "$JS.API.>",
        // Acknowledging reports once their events are appended.
        "$JS.ACK.>",
        // Flow control of ordered consumers (the log's tail, KV watches).
        "$JS.FC.>",
        // Its own replies (probes of new subscriptions).
        "_INBOX.>",
    ]);
    publish_allow.push(kv(LEASES_BUCKET));
    publish_allow.push(kv(COMMANDS_BUCKET));
    let mut publish_deny = destructive_stream_api();
    // Reports and node commands come from nodes only.
    publish_deny.push("cairn.report.>".into());
    publish_deny.push(ALL_NODE_COMMANDS.into());
    Permissions {
        publish_allow,
        publish_deny,
        subscribe_allow: strings(&["_INBOX.>", "cairn.cmd.>", ALL_NODE_COMMANDS]),
        allow_responses: true,
    }
}

fn node_permissions(node: &NodeId) -> Permissions {
    let token = subject_token(node.as_str());
    let consumer = consumer_name(node);
    let inbox = format!("{}.>", node_inbox_prefix(node));
    let mut publish_allow = vec![
        // Its reports, to any partition.
        format!("cairn.report.*.{token}"),
        node_command_subject(node),
        format!("$KV.{NODES_BUCKET}.{}", Heartbeat::key(node)),
        // Probes of its own subscriptions.
        inbox.clone(),
        "$JS.API.INFO".into(),
    ];
    for stream in [
        STEPS_STREAM.to_string(),
        REPORTS_STREAM.to_string(),
        format!("KV_{LEASES_BUCKET}"),
        format!("KV_{NODES_BUCKET}"),
    ] {
        publish_allow.push(format!("$JS.API.STREAM.INFO.{stream}"));
    }
    publish_allow.extend([
        // Its durable consumer, filtered to its own step subject: the server refuses a create
        // whose subject and configuration disagree, so no other filter can be asked for.
        format!(
            "$JS.API.CONSUMER.CREATE.{STEPS_STREAM}.{consumer}.{}",
            step_subject(node)
        ),
        format!("$JS.API.CONSUMER.INFO.{STEPS_STREAM}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{STEPS_STREAM}.{consumer}"),
        // Acks and progress acks of its steps.
        format!("$JS.ACK.{STEPS_STREAM}.{consumer}.>"),
        // Reading the partition leases (a step of a deposed owner is not run).
        format!("$JS.API.DIRECT.GET.KV_{LEASES_BUCKET}"),
        format!("$JS.API.DIRECT.GET.KV_{LEASES_BUCKET}.>"),
        format!("$JS.API.STREAM.MSG.GET.KV_{LEASES_BUCKET}"),
    ]);
    Permissions {
        publish_allow,
        publish_deny: destructive_stream_api(),
        subscribe_allow: vec![inbox, browse_subject(node), CANCEL_SUBJECT.into()],
        allow_responses: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a NATS pattern matches a subject (whole tokens; `*` one, `>` the rest).
    fn matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn may_publish(p: &Permissions, subject: &str) -> bool {
        p.publish_allow.iter().any(|a| matches(a, subject))
            && !p.publish_deny.iter().any(|d| matches(d, subject))
    }

    fn may_subscribe(p: &Permissions, subject: &str) -> bool {
        p.subscribe_allow.iter().any(|a| matches(a, subject))
    }

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[test]
    fn a_node_may_use_its_own_subjects_only() {
        let p = Identity::Node(node("kvm-01")).permissions();
        for own in [
            "cairn.report.3.kvm-01",
            "cairn.node.kvm-01.cmd",
            "$KV.CAIRN_NODES.kvm-01",
            "$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-01.cairn.step.kvm-01",
            "$JS.API.CONSUMER.MSG.NEXT.CAIRN_STEPS.worker-kvm-01",
            "$JS.ACK.CAIRN_STEPS.worker-kvm-01.1.2.3.4.5.0",
            "$JS.API.DIRECT.GET.KV_CAIRN_LEASES.$KV.CAIRN_LEASES.partition.3",
            "_INBOX.node.kvm-01.abc",
        ] {
            assert!(may_publish(&p, own), "{own}");
        }
        for foreign in [
            "cairn.report.3.kvm-02",
            "cairn.node.kvm-02.cmd",
            "$KV.CAIRN_NODES.kvm-02",
            "$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-02.cairn.step.kvm-02",
            "$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-01.cairn.step.kvm-02",
            "$JS.API.CONSUMER.CREATE.CAIRN_STEPS",
            "$JS.API.CONSUMER.DURABLE.CREATE.CAIRN_STEPS.worker-kvm-01",
            "$JS.API.CONSUMER.MSG.NEXT.CAIRN_STEPS.worker-kvm-02",
            "$JS.ACK.CAIRN_STEPS.worker-kvm-02.1.2.3.4.5.0",
            "cairn.evt.3.vm.x",
            "cairn.cmd.3",
            "cairn.step.kvm-01",
            "$KV.CAIRN_LEASES.partition.3",
            "$JS.API.STREAM.DELETE.CAIRN_EVENTS",
            "$JS.API.STREAM.PURGE.CAIRN_STEPS",
            "$JS.API.DIRECT.GET.CAIRN_EVENTS",
            "_INBOX.abc",
        ] {
            assert!(!may_publish(&p, foreign), "{foreign}");
        }
        assert!(may_subscribe(&p, "cairn.browse.kvm-01"));
        assert!(may_subscribe(&p, "_INBOX.node.kvm-01.x"));
        assert!(!may_subscribe(&p, "cairn.browse.kvm-02"));
        assert!(!may_subscribe(&p, "_INBOX.x"));
        assert!(!may_subscribe(&p, "_INBOX.node.kvm-02.x"));
        assert!(!may_subscribe(&p, "cairn.evt.>"));
    }

    #[test]
    fn a_dotted_node_name_is_one_token() {
        let p = Identity::Node(node("kvm-01.lab")).permissions();
        assert!(may_publish(&p, "cairn.report.0.kvm-01%2Elab"));
        assert!(may_publish(&p, "$KV.CAIRN_NODES.kvm-01=2Elab"));
        assert!(may_subscribe(&p, "cairn.browse.kvm-01%2Elab"));
        assert!(!may_publish(&p, "cairn.report.0.kvm-01"));
        for pattern in p.publish_allow.iter().chain(&p.subscribe_allow) {
            assert!(!pattern.contains("kvm-01.lab"), "{pattern}");
        }
    }

    #[test]
    fn orchestrators_run_the_log_but_never_forge_reports_or_destroy_streams() {
        let p = Identity::Orchestrator(node("ctl-01")).permissions();
        for allowed in [
            "cairn.evt.3.vm.x",
            "cairn.step.kvm-01",
            "cairn.cmd.3",
            "cairn.browse.kvm-01",
            "$KV.CAIRN_LEASES.partition.3",
            "$JS.API.STREAM.CREATE.CAIRN_EVENTS",
            "$JS.ACK.CAIRN_REPORTS.x.1.2.3.4.5.0",
        ] {
            assert!(may_publish(&p, allowed), "{allowed}");
        }
        for denied in [
            "cairn.report.3.kvm-01",
            "cairn.node.kvm-01.cmd",
            "$JS.API.STREAM.DELETE.CAIRN_EVENTS",
            "$JS.API.STREAM.PURGE.CAIRN_EVENTS",
            "$JS.API.STREAM.MSG.DELETE.CAIRN_EVENTS",
            "$KV.CAIRN_NODES.kvm-01",
        ] {
            assert!(!may_publish(&p, denied), "{denied}");
        }
        assert!(may_subscribe(&p, "cairn.node.kvm-01.cmd"));
    }

    #[test]
    fn automation_only_listens_to_public_events() {
        let p = Identity::Automation.permissions();
        assert!(!may_publish(&p, "cairn.public.job"));
        assert!(!may_publish(&p, "anything"));
        assert_eq!(p.publish_deny, [">"]);
        assert!(!p.allow_responses);
        assert!(may_subscribe(&p, "cairn.public.job.finished"));
        assert!(!may_subscribe(&p, "cairn.evt.3.vm.x"));
        assert_eq!(Identity::Automation.user(), "CN=cairn-automation");
        assert_eq!(
            Identity::Node(node("kvm-01")).user(),
            "CN=cairn-node-kvm-01"
        );
    }
}
