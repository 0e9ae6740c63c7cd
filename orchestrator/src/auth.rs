//! Who may do what: the rights of each role, the principal a request is made by, and app
//! owners' scopes. Pure: the API layer authenticates (token → [`Principal`]) and asks here.
//!
//! | right | admin | operator | viewer | app-owner |
//! |---|---|---|---|---|
//! | `read` (inventory, groups, jobs, alerts, nodes, recovery points) | ✓ | ✓ | ✓ | its scope |
//! | `events` (the event log) | ✓ | ✓ | ✓ | its scope |
//! | `audit` (walk the hash chain) | ✓ | ✓ | ✓ | |
//! | `backup` (back up now, cancel a job) | ✓ | ✓ | | its scope |
//! | `recover` (restore, recover, browse, recover items) | ✓ | ✓ | | its scope, to the original VM or its node's app-owner roots |
//! | `maintain` (consistency check, verify) | ✓ | ✓ | | |
//! | `policy` (groups, policies, seeds) | ✓ | ✓ | | |
//! | `tokens` (tokens and node settings) | ✓ | | | |
//! | `delete` (soft-delete and undelete recovery points, delete groups) | ✓ | ✓ | | |
//! | `settings` (a group's soft-delete period) | ✓ | | | |
//!
//! Lowering a group's retention lock needs the admin role too; the route needs `policy` (a
//! raise is an operator's) and `decide` refuses a lowering without `by_admin`.

use std::collections::BTreeSet;

use cairn_schemas::{GroupId, Role, TokenId, VmId};

/// Something a request needs to be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Right {
    /// Nothing beyond being authenticated (the API's description).
    Authenticated,
    /// Read the projections: VMs, groups, jobs, alerts, nodes, recovery points.
    Read,
    /// Read the event log.
    Events,
    /// Walk the whole log's hash chain.
    Audit,
    /// Back a VM up now; cancel a job.
    Backup,
    /// Restore, recover, browse recovery points, recover items.
    Recover,
    /// Consistency checks and verification.
    Maintain,
    /// Create groups, change policies, import seeds.
    Policy,
    /// Make, list and revoke tokens; node settings.
    Tokens,
    /// Soft-delete and undelete recovery points; delete groups.
    Delete,
    /// Settings that weaken protection: a group's soft-delete period.
    Settings,
}

impl Right {
    /// Every right.
    pub const ALL: [Right; 11] = [
        Right::Authenticated,
        Right::Read,
        Right::Events,
        Right::Audit,
        Right::Backup,
        Right::Recover,
        Right::Maintain,
        Right::Policy,
        Right::Tokens,
        Right::Delete,
        Right::Settings,
    ];

    /// The right's name, as 403 answers name it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Right::Authenticated => "authenticated",
            Right::Read => "read",
            Right::Events => "events",
            Right::Audit => "audit",
            Right::Backup => "backup",
            Right::Recover => "recover",
            Right::Maintain => "maintain",
            Right::Policy => "policy",
            Right::Tokens => "tokens",
            Right::Delete => "delete",
            Right::Settings => "settings",
        }
    }
}

/// Whether `role` has `right` (for an app owner: over its scope).
pub const fn role_allows(role: Role, right: Right) -> bool {
    match role {
        Role::Admin => true,
        Role::Operator => !matches!(right, Right::Tokens | Right::Settings),
        Role::Viewer => matches!(
            right,
            Right::Authenticated | Right::Read | Right::Events | Right::Audit
        ),
        Role::AppOwner => matches!(
            right,
            Right::Authenticated | Right::Read | Right::Events | Right::Backup | Right::Recover
        ),
    }
}

/// The VMs and groups an app owner may see and act on, resolved when the request is
/// authenticated: the VMs listed on its token and the members of the groups listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub vms: BTreeSet<VmId>,
    pub groups: BTreeSet<GroupId>,
}

impl Scope {
    /// Whether a VM is in scope.
    pub fn has_vm(&self, vm: &VmId) -> bool {
        self.vms.contains(vm)
    }

    /// Whether a group is in scope.
    pub fn has_group(&self, group: &GroupId) -> bool {
        self.groups.contains(group)
    }
}

/// Who made a request: an authenticated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token: TokenId,
    pub name: String,
    pub role: Role,
    /// Set for app owners only: everything else sees everything.
    pub scope: Option<Scope>,
}

impl Principal {
    /// The actor recorded on the events its commands cause: `name (token ID)`.
    pub fn actor(&self) -> String {
        format!("{} (token {})", self.name, self.token)
    }

    /// Whether its role has `right`.
    pub fn may(&self, right: Right) -> bool {
        role_allows(self.role, right)
    }

    /// Whether it may see a VM.
    pub fn sees_vm(&self, vm: &VmId) -> bool {
        self.scope.as_ref().is_none_or(|s| s.has_vm(vm))
    }

    /// Whether it may see a VM given by its id's text (a malformed id is not seen).
    pub fn sees_vm_text(&self, vm: &str) -> bool {
        self.scope.is_none() || vm.parse().is_ok_and(|vm| self.sees_vm(&vm))
    }

    /// Whether it may see a group.
    pub fn sees_group(&self, group: &GroupId) -> bool {
        self.scope.as_ref().is_none_or(|s| s.has_group(group))
    }
}

/// The BLAKE3 hash of a token's secret, as tokens are looked up by.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

/// Prefix of every secret, so that a leaked one is recognisable (secret scanners, logs).
pub const SECRET_PREFIX: &str = "cairn_";

/// A new secret from 32 random bytes: `cairn_` and 64 hex digits.
pub fn secret_from(random: &[u8; 32]) -> String {
    let mut out = String::with_capacity(SECRET_PREFIX.len() + 64);
    out.push_str(SECRET_PREFIX);
    for byte in random {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The file name under `cairn/tokens/` in a user's config folder that holds the token saved
/// for the server at `host_port`: the address with anything but letters, digits, '.' and '-'
/// made '_'.
pub fn saved_token_name(host_port: &str) -> String {
    host_port
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `text` has the shape of a secret (checked before it is hashed and looked up, so
/// junk in an `Authorization` header gets a clear answer).
pub fn looks_like_secret(text: &str) -> bool {
    text.strip_prefix(SECRET_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_has_every_right_and_viewer_only_reads() {
        for right in Right::ALL {
            assert!(role_allows(Role::Admin, right), "{right:?}");
        }
        assert!(!role_allows(Role::Operator, Right::Tokens));
        for right in [
            Right::Backup,
            Right::Recover,
            Right::Maintain,
            Right::Policy,
            Right::Tokens,
        ] {
            assert!(!role_allows(Role::Viewer, right), "{right:?}");
        }
        for right in [Right::Audit, Right::Maintain, Right::Policy, Right::Tokens] {
            assert!(!role_allows(Role::AppOwner, right), "{right:?}");
        }
        assert!(role_allows(Role::AppOwner, Right::Backup));
    }

    #[test]
    fn only_app_owners_are_scoped() {
        let vm = |n: u8| VmId::new_v7(1, [n; 10]);
        let group = GroupId::new_v7(1, [9; 10]);
        let mut principal = Principal {
            token: TokenId::new_v7(1, [1; 10]),
            name: "web-team".into(),
            role: Role::AppOwner,
            scope: Some(Scope {
                vms: [vm(1)].into(),
                groups: [group].into(),
            }),
        };
        assert!(principal.sees_vm(&vm(1)));
        assert!(!principal.sees_vm(&vm(2)));
        assert!(!principal.sees_vm_text("not-an-id"));
        assert!(principal.sees_group(&group));
        assert!(!principal.sees_group(&GroupId::new_v7(1, [8; 10])));
        principal.role = Role::Viewer;
        principal.scope = None;
        assert!(principal.sees_vm(&vm(2)));
        assert!(principal.actor().starts_with("web-team (token "));
    }

    #[test]
    fn secrets_have_a_recognisable_shape() {
        let secret = secret_from(&[0xab; 32]);
        assert!(looks_like_secret(&secret));
        assert!(!looks_like_secret("cairn_xyz"));
        assert!(!looks_like_secret(&secret[1..]));
        assert_ne!(secret_hash(&secret), secret_hash("cairn_other"));
    }
}
