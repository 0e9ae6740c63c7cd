//! Commands over NATS: forwarding to the owner of a partition, and the command entry point
//! workers use.
//!
//! - `cairn.cmd.<p>`: subscribed by the owner of partition p only (while it holds the
//!   lease); a request is decided by that instance's engine.
//! - `cairn.node.<node>.cmd`: subscribed by every orchestrator in queue group
//!   `orchestrators`; a node's worker sends its registration, inventory and space reports
//!   there (nats-server lets only that node's identity publish on it), and the instance that
//!   receives one checks that the command is a node command about that node, records it as
//!   `node:<node>` whatever the envelope claims, and decides it or forwards it to the owner.
//!   Every other command comes through the HTTP API with its principal, or from another
//!   orchestrator on `cairn.cmd.<p>`.
//!
//! Requests carry `codec::encode_command(CommandEnvelope)`; replies are a versioned
//! [`WireReply`] (a format byte, then JSON): the accepted command, or the refusal with its
//! HTTP status and stable code. A forwarded command is retried while the partition has no
//! owner (no responders) or its owner is changing, up to [`FORWARD_FOR`].
//!
//! Must not: decide commands (the engine does); keep state beyond subscriptions.

use crate::error_code::ErrorCode;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use cairn_schemas::codec;
use cairn_schemas::subjects::node_of_command_subject;
use cairn_schemas::{Command, CommandEnvelope, CommandId, NodeId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::control::{BoxFuture, ControlError};
use crate::engine::ports::CommandRouter;
use crate::views::Accepted;

/// Queue group of the orchestrators on the node command subjects
/// ([`cairn_schemas::subjects::ALL_NODE_COMMANDS`]).
pub const QUEUE_GROUP: &str = "orchestrators";
/// How long a forwarded command is retried while its partition changes owner.
pub const FORWARD_FOR: Duration = Duration::from_secs(20);
/// Largest command request accepted (an inventory of 10,000 VMs fits).
const MAX_REQUEST: usize = 8 << 20;

/// `cairn.cmd.<partition>`: the owner's command subject.
pub fn command_subject(partition: u16) -> String {
    format!("cairn.cmd.{partition}")
}

/// Format byte in front of a [`WireReply`].
const REPLY_FORMAT: u8 = 1;

/// A refusal as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// HTTP status (400, 404, 409, 500, 503).
    pub status: u16,
    /// Stable code; one this build does not know arrives as [`ErrorCode::RemoteError`].
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
}

/// Why the bytes of a command reply are not a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("empty command reply")]
    Empty,
    #[error("command reply in unknown format {0}")]
    UnknownFormat(u8),
    #[error("malformed command reply: {0}")]
    Malformed(String),
}

/// The reply to a command request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireReply {
    /// Accepted.
    Accepted(Accepted),
    /// Refused.
    Refused(WireError),
}

impl WireReply {
    /// The reply for a decided command.
    pub fn of(result: &Result<Accepted, ControlError>) -> WireReply {
        match result {
            Ok(accepted) => WireReply::Accepted(accepted.clone()),
            Err(e) => WireReply::Refused(WireError {
                status: e.status(),
                code: e.code(),
                message: match e {
                    ControlError::Internal(m) | ControlError::Unavailable(m) => m.clone(),
                    other => other.to_string(),
                },
            }),
        }
    }

    /// Encoded: a format byte, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![REPLY_FORMAT];
        out.extend(serde_json::to_vec(self).expect("a reply serializes"));
        out
    }

    /// Decodes a reply; bad bytes are an error naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<WireReply, ReplyError> {
        match bytes.split_first() {
            Some((&REPLY_FORMAT, rest)) => {
                serde_json::from_slice(rest).map_err(|e| ReplyError::Malformed(e.to_string()))
            }
            Some((&other, _)) => Err(ReplyError::UnknownFormat(other)),
            None => Err(ReplyError::Empty),
        }
    }

    /// Back to the caller's result.
    pub fn into_result(self) -> Result<Accepted, ControlError> {
        match self {
            WireReply::Accepted(accepted) => Ok(accepted),
            WireReply::Refused(e) => Err(control_error(e)),
        }
    }
}

fn control_error(e: WireError) -> ControlError {
    match e.status {
        404 => ControlError::NotFound {
            code: e.code,
            message: e.message,
        },
        409 => ControlError::Conflict {
            code: e.code,
            message: e.message,
        },
        400 => ControlError::Invalid {
            code: e.code,
            message: e.message,
        },
        403 => ControlError::Forbidden {
            code: e.code,
            message: e.message,
        },
        503 => ControlError::Unavailable(e.message),
        _ => ControlError::Internal(e.message),
    }
}

/// Forwards commands to partition owners with NATS requests.
pub struct NatsRouter {
    client: Client,
    /// How long one request waits for its reply.
    pub request_timeout: Duration,
}

impl NatsRouter {
    /// A router over `client`.
    pub fn new(client: Client) -> NatsRouter {
        NatsRouter {
            client,
            request_timeout: Duration::from_secs(30),
        }
    }
}

fn new_command_id() -> CommandId {
    CommandId::new_v7(crate::clock::wall_ms(), crate::clock::random10())
}

/// Sends one command request to `subject` and retries while nobody owns the partition (no
/// responders) or the owner is moving (unavailable), up to [`FORWARD_FOR`].
pub async fn request_command(
    client: &Client,
    subject: String,
    envelope: &CommandEnvelope,
    request_timeout: Duration,
) -> Result<Accepted, ControlError> {
    let payload: bytes::Bytes = codec::encode_command(envelope).into();
    let deadline = Instant::now() + FORWARD_FOR;
    let mut delay = Duration::from_millis(100);
    loop {
        let outcome = tokio::time::timeout(
            request_timeout,
            client.request(subject.clone(), payload.clone()),
        )
        .await;
        let retry_reason = match outcome {
            Ok(Ok(reply)) => match WireReply::decode(&reply.payload) {
                Ok(reply) => match reply.into_result() {
                    Err(ControlError::Unavailable(m)) => m,
                    other => return other,
                },
                Err(e) => return Err(ControlError::Internal(e.to_string())),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no reply within {request_timeout:?}"),
        };
        if Instant::now() + delay > deadline {
            return Err(ControlError::Unavailable(format!(
                "{subject}: no orchestrator took the command within {FORWARD_FOR:?} \
                 (last: {retry_reason})"
            )));
        }
        tracing::debug!(subject, reason = %retry_reason, "command not taken yet; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

impl CommandRouter for NatsRouter {
    /// A command without an id gets a fresh one here, so the retries below (and the owner's
    /// retries of its append) cannot make it twice.
    fn forward(
        &self,
        partition: u16,
        actor: String,
        id: Option<CommandId>,
        command: Command,
    ) -> BoxFuture<'static, Result<Accepted, ControlError>> {
        let client = self.client.clone();
        let timeout = self.request_timeout;
        Box::pin(async move {
            let envelope = CommandEnvelope {
                id: id.unwrap_or_else(new_command_id),
                actor,
                traceparent: None,
                command,
            };
            request_command(&client, command_subject(partition), &envelope, timeout).await
        })
    }
}

/// What decides a command that arrived over NATS: `(actor, id, command, local_only)`. The id
/// is the envelope's for commands forwarded by an orchestrator (idempotent at the owner), and
/// `None` for a node's own commands (registrations and reports, which repeat harmlessly).
pub type Decider = Arc<
    dyn Fn(
            String,
            Option<CommandId>,
            Command,
            bool,
        ) -> BoxFuture<'static, Result<Accepted, ControlError>>
        + Send
        + Sync,
>;

/// Where a subscription's commands come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `cairn.cmd.<p>`: forwarded by another orchestrator; decided here or refused.
    Owner,
    /// `cairn.node.<node>.cmd`: a node's own commands; routed as needed.
    Node,
}

/// The node a node command is about; `None` for every command no node may send.
pub fn node_of_command(command: &Command) -> Option<&NodeId> {
    match command {
        Command::RegisterNode { node, .. }
        | Command::ReportInventory { node, .. }
        | Command::ReportRepositorySpace { node, .. }
        | Command::RegisterRepositories { node, .. } => Some(node),
        _ => None,
    }
}

/// Checks a command that arrived on `subject`, a node's command subject: it must be a node
/// command about the node the subject names. `Ok(actor)`: the node's identity, recorded as
/// the command's actor. Pure.
pub fn check_node_command(subject: &str, command: &Command) -> Result<String, ControlError> {
    let forbidden = |message: String| ControlError::Forbidden {
        code: ErrorCode::Forbidden,
        message,
    };
    let Some(sender) = node_of_command_subject(subject) else {
        return Err(forbidden(format!(
            "{subject} is not a node's command subject"
        )));
    };
    match node_of_command(command) {
        Some(node) if *node == sender => Ok(format!("node:{sender}")),
        Some(node) => Err(forbidden(format!(
            "node {sender} may send commands only about itself, not about node {node}"
        ))),
        None => Err(forbidden(format!(
            "node {sender} may send only node commands (registration, inventory, space); \
             other commands go through the HTTP API"
        ))),
    }
}

/// Answers requests on one subscription until it ends.
pub async fn serve(mut sub: async_nats::Subscriber, client: Client, decide: Decider, entry: Entry) {
    while let Some(message) = sub.next().await {
        let Some(reply_to) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject, "command without a reply subject ignored");
            continue;
        };
        let result = if message.payload.len() > MAX_REQUEST {
            Err(ControlError::Invalid {
                code: ErrorCode::InvalidRequest,
                message: format!(
                    "command of {} bytes is larger than {MAX_REQUEST}",
                    message.payload.len()
                ),
            })
        } else {
            match codec::decode_command(&message.payload) {
                Ok(envelope) => {
                    let checked = match entry {
                        Entry::Owner => Ok((envelope.actor.clone(), Some(envelope.id), true)),
                        Entry::Node => check_node_command(&message.subject, &envelope.command)
                            .map(|actor| (actor, None, false)),
                    };
                    match checked {
                        Ok((actor, id, local_only)) => {
                            let decide = decide.clone();
                            // Each command on a task of its own: a forwarded one may wait for
                            // its owner while others are served.
                            let client = client.clone();
                            tokio::spawn(async move {
                                let result = decide(actor, id, envelope.command, local_only).await;
                                let reply = WireReply::of(&result).encode();
                                if let Err(e) = client.publish(reply_to, reply.into()).await {
                                    tracing::debug!(error = %e, "could not send a command reply");
                                }
                            });
                            continue;
                        }
                        Err(refused) => {
                            tracing::warn!(subject = %message.subject, actor = %envelope.actor,
                                "refused a command from a node: {refused}");
                            Err(refused)
                        }
                    }
                }
                Err(e) => Err(ControlError::Invalid {
                    code: ErrorCode::InvalidRequest,
                    message: format!("undecodable command on {}: {e}", message.subject),
                }),
            }
        };
        let reply = WireReply::of(&result).encode();
        if let Err(e) = client.publish(reply_to, reply.into()).await {
            tracing::debug!(error = %e, "could not send a command reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let ok: Result<Accepted, ControlError> = Ok(Accepted {
            id: "x".into(),
            seq: 7,
            replayed: true,
        });
        let back = WireReply::decode(&WireReply::of(&ok).encode()).unwrap();
        assert_eq!(back.into_result(), ok);
        let refused: Result<Accepted, ControlError> = Err(ControlError::Conflict {
            code: ErrorCode::DuplicateGroup,
            message: "a group named \"a\" exists".into(),
        });
        let back = WireReply::decode(&WireReply::of(&refused).encode()).unwrap();
        assert_eq!(back.into_result(), refused);
        let gone: Result<Accepted, ControlError> = Err(ControlError::Unavailable("moving".into()));
        let back = WireReply::decode(&WireReply::of(&gone).encode()).unwrap();
        assert_eq!(back.into_result(), gone);
    }

    #[test]
    fn nodes_send_only_their_own_node_commands() {
        let node = |n: &str| NodeId::new(n).unwrap();
        let register = |n: &str| Command::RegisterNode {
            node: node(n),
            cluster: "lab".into(),
            worker_version: "1".into(),
        };
        assert_eq!(
            check_node_command("cairn.node.kvm-01%2Elab.cmd", &register("kvm-01.lab")).unwrap(),
            "node:kvm-01.lab"
        );
        let other = check_node_command("cairn.node.kvm-01.cmd", &register("kvm-02")).unwrap_err();
        assert_eq!((other.status(), other.code()), (403, ErrorCode::Forbidden));
        assert!(
            other.to_string().contains("not about node kvm-02"),
            "{other}"
        );
        let admin = Command::RevokeToken {
            token: cairn_schemas::TokenId::new_v7(1, [0; 10]),
        };
        let refused = check_node_command("cairn.node.kvm-01.cmd", &admin).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Forbidden);
        assert!(
            refused.to_string().contains("only node commands"),
            "{refused}"
        );
        assert!(check_node_command("cairn.cmd.3", &register("kvm-01")).is_err());
        // A refusal travels with its status.
        let reply = WireReply::of(&Err(other)).encode();
        let back = WireReply::decode(&reply)
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!((back.status(), back.code()), (403, ErrorCode::Forbidden));
    }

    #[test]
    fn hostile_replies_are_errors() {
        assert!(WireReply::decode(b"").is_err());
        assert!(WireReply::decode(b"\x07{}").is_err());
        assert!(WireReply::decode(b"\x01not json").is_err());
        // A code this build does not know (a newer peer's) keeps its status.
        let weird = [
            &[REPLY_FORMAT][..],
            br#"{"Refused":{"status":409,"code":"from_the_future","message":"m"}}"#,
        ]
        .concat();
        let refused = WireReply::decode(&weird)
            .unwrap()
            .into_result()
            .unwrap_err();
        let ControlError::Conflict { code, .. } = refused else {
            panic!("status 409 is a conflict: {refused:?}");
        };
        assert_eq!(code, ErrorCode::RemoteError);
    }
}
