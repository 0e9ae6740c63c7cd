//! API tokens: identities with a role, and for app owners a scope of VMs and groups. Only the
//! BLAKE3 hash of a token's secret is ever recorded; the secret is shown once, at creation.

use serde::{Deserialize, Serialize};

use crate::ids::{GroupId, VmId};

/// What a token may do. The rights of each role are the orchestrator's (`auth` module); the
/// role itself is recorded here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything, including tokens and node settings.
    Admin,
    /// Groups, policies, jobs and recoveries.
    Operator,
    /// Read only, including the event log and its audit.
    Viewer,
    /// Self-service over the VMs and groups of its scope: back up, browse, recover.
    AppOwner,
}

impl Role {
    /// Every role, in order of decreasing power.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::AppOwner];

    /// The name used on the command line and in the API: `admin`, `operator`, `viewer`,
    /// `app-owner`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::AppOwner => "app-owner",
        }
    }

    /// Parses a role's name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API token's events. Who made or revoked it is the envelope's actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenEvent {
    /// A token was made.
    TokenCreated {
        /// Its name, for people and the audit (`[A-Za-z0-9._-]{1,64}`).
        name: String,
        /// Its role.
        role: Role,
        /// For app owners: the VMs it may act on.
        vms: Vec<VmId>,
        /// For app owners: the groups whose members it may act on.
        groups: Vec<GroupId>,
        /// BLAKE3 of the secret.
        secret_hash: [u8; 32],
        /// Unix ms after which it is refused; `None`: it does not expire.
        expires_at: Option<u64>,
    },
    /// The token was revoked; it is refused from now on.
    TokenRevoked,
}
