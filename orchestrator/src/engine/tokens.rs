//! API tokens in the engine: their projection (applied from `TokenCreated`/`TokenRevoked`)
//! and the decisions of `CreateToken`/`RevokeToken`. Pure, like the rest of the engine: time
//! comes in as `now`, and the secret never reaches it (only its BLAKE3 hash).

use crate::error_code::ErrorCode;
use std::collections::BTreeMap;

use cairn_schemas::{Aggregate, Command, GroupId, Role, TokenEvent, TokenId, VmId};
use serde::{Deserialize, Serialize};

use super::decide::{Emit, conflict, invalid, not_found};
use super::state::State;
use crate::control::ControlError;

/// Longest lifetime a token may be given: ten years.
pub const MAX_LIFETIME_SECS: u64 = 10 * 366 * 86_400;
/// Most VMs plus groups in one app owner's scope.
pub const MAX_SCOPE: usize = 1_000;

/// One token, as its events describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    pub vms: Vec<VmId>,
    pub groups: Vec<GroupId>,
    pub secret_hash: [u8; 32],
    pub expires_at: Option<u64>,
    pub created_at: u64,
    /// The actor that made it.
    pub created_by: String,
    pub revoked_at: Option<u64>,
    /// The actor that revoked it.
    pub revoked_by: Option<String>,
}

impl Token {
    /// Valid at `now`: not revoked and not expired.
    pub fn is_live(&self, now: u64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }
}

/// Every token, and an index by the hash of its secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub by_id: BTreeMap<TokenId, Token>,
    pub by_hash: BTreeMap<[u8; 32], TokenId>,
}

impl Tokens {
    /// The token whose secret hashes to `hash`, live or not.
    pub fn by_secret_hash(&self, hash: &[u8; 32]) -> Option<&Token> {
        self.by_hash.get(hash).and_then(|id| self.by_id.get(id))
    }

    pub(super) fn apply(&mut self, id: TokenId, event: &TokenEvent, actor: &str, at: u64) {
        match event {
            TokenEvent::TokenCreated {
                name,
                role,
                vms,
                groups,
                secret_hash,
                expires_at,
            } => {
                self.by_hash.insert(*secret_hash, id);
                self.by_id.insert(
                    id,
                    Token {
                        id,
                        name: name.clone(),
                        role: *role,
                        vms: vms.clone(),
                        groups: groups.clone(),
                        secret_hash: *secret_hash,
                        expires_at: *expires_at,
                        created_at: at,
                        created_by: actor.to_owned(),
                        revoked_at: None,
                        revoked_by: None,
                    },
                );
            }
            TokenEvent::TokenRevoked => {
                if let Some(token) = self.by_id.get_mut(&id) {
                    token.revoked_at.get_or_insert(at);
                    token.revoked_by.get_or_insert_with(|| actor.to_owned());
                }
            }
        }
    }
}

/// The principal of the live token whose secret hashes to `hash`, with an app owner's scope
/// resolved against the current groups.
pub fn authenticate(
    state: &State,
    hash: &[u8; 32],
    now: u64,
) -> Result<crate::auth::Principal, crate::control::AuthRefusal> {
    use crate::control::AuthRefusal;
    let token = state
        .tokens
        .by_secret_hash(hash)
        .ok_or(AuthRefusal::Unknown)?;
    if token.revoked_at.is_some() {
        return Err(AuthRefusal::Revoked);
    }
    if !token.is_live(now) {
        return Err(AuthRefusal::Expired);
    }
    let scope = (token.role == Role::AppOwner).then(|| {
        let mut vms: std::collections::BTreeSet<VmId> = token.vms.iter().copied().collect();
        for group in &token.groups {
            if let Some(found) = state.groups.get(group) {
                vms.extend(found.members.iter().copied());
            }
        }
        crate::auth::Scope {
            vms,
            groups: token.groups.iter().copied().collect(),
        }
    });
    Ok(crate::auth::Principal {
        token: token.id,
        name: token.name.clone(),
        role: token.role,
        scope,
    })
}

/// A token as the API shows it.
pub fn view(token: &Token, now: u64) -> crate::views::TokenView {
    crate::views::TokenView {
        id: token.id.to_string(),
        name: token.name.clone(),
        role: token.role.to_string(),
        vms: token.vms.iter().map(ToString::to_string).collect(),
        groups: token.groups.iter().map(ToString::to_string).collect(),
        created_at: token.created_at,
        created_by: token.created_by.clone(),
        expires_at: token.expires_at,
        revoked_at: token.revoked_at,
        revoked_by: token.revoked_by.clone(),
        live: token.is_live(now),
    }
}

/// Checks a token's name: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "token name {name:?} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.'"
        ))
    }
}

/// Decides `CreateToken` and `RevokeToken`; any other command is refused (it is not this
/// module's).
pub(super) fn decide(
    state: &State,
    command: &Command,
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    match command {
        Command::CreateToken {
            token,
            name,
            role,
            vms,
            groups,
            secret_hash,
            expires_in_secs,
        } => create(
            state,
            *token,
            name,
            *role,
            vms,
            groups,
            secret_hash,
            *expires_in_secs,
            now,
        ),
        Command::RevokeToken { token } => revoke(state, *token),
        other => Err(ControlError::Internal(format!(
            "{other:?} is not a token command"
        ))),
    }
}

#[allow(clippy::too_many_arguments, reason = "the fields of one command")]
fn create(
    state: &State,
    token: TokenId,
    name: &str,
    role: Role,
    vms: &[VmId],
    groups: &[GroupId],
    secret_hash: &[u8; 32],
    expires_in_secs: Option<u64>,
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    check_name(name).map_err(|m| invalid(ErrorCode::InvalidRequest, m))?;
    let tokens = &state.tokens;
    if tokens.by_id.contains_key(&token) {
        return Err(conflict(
            ErrorCode::DuplicateToken,
            format!("token {token} exists already"),
        ));
    }
    if tokens
        .by_id
        .values()
        .any(|t| t.name == name && t.is_live(now))
    {
        return Err(conflict(
            ErrorCode::DuplicateToken,
            format!("a live token is named {name:?} already; revoke it or choose another name"),
        ));
    }
    if tokens.by_hash.contains_key(secret_hash) || *secret_hash == [0; 32] {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            "the token's secret hash is not usable".into(),
        ));
    }
    let scoped = !vms.is_empty() || !groups.is_empty();
    match role {
        Role::AppOwner if !scoped => {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                "an app-owner token needs at least one VM or group in its scope (--vm, --group)"
                    .into(),
            ));
        }
        Role::Admin | Role::Operator | Role::Viewer if scoped => {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!("a {role} token has no scope; VMs and groups are for app-owner tokens"),
            ));
        }
        _ => {}
    }
    if vms.len() + groups.len() > MAX_SCOPE {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("a scope holds at most {MAX_SCOPE} VMs and groups"),
        ));
    }
    for vm in vms {
        if !state.vms.contains_key(vm) {
            return Err(not_found(ErrorCode::UnknownVm, format!("no VM {vm}")));
        }
    }
    for group in groups {
        if !state.groups.contains_key(group) {
            return Err(not_found(
                ErrorCode::UnknownGroup,
                format!("no group {group}"),
            ));
        }
    }
    let expires_at = match expires_in_secs {
        None => None,
        Some(0) => {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                "a token's lifetime must be at least one second".into(),
            ));
        }
        Some(secs) if secs > MAX_LIFETIME_SECS => {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!(
                    "a token's lifetime is at most {} days",
                    MAX_LIFETIME_SECS / 86_400
                ),
            ));
        }
        Some(secs) => Some(now.saturating_add(secs.saturating_mul(1000))),
    };
    let mut vms = vms.to_vec();
    vms.sort();
    vms.dedup();
    let mut groups = groups.to_vec();
    groups.sort();
    groups.dedup();
    Ok(vec![Emit::new(
        Aggregate::Token(token),
        vec![
            TokenEvent::TokenCreated {
                name: name.to_owned(),
                role,
                vms,
                groups,
                secret_hash: *secret_hash,
                expires_at,
            }
            .into(),
        ],
    )])
}

fn revoke(state: &State, token: TokenId) -> Result<Vec<Emit>, ControlError> {
    let found = state
        .tokens
        .by_id
        .get(&token)
        .ok_or_else(|| not_found(ErrorCode::UnknownToken, format!("no token {token}")))?;
    if found.revoked_at.is_some() {
        // Revoking twice changes nothing and is not an error: the wanted state holds.
        return Ok(vec![]);
    }
    Ok(vec![Emit::new(
        Aggregate::Token(token),
        vec![TokenEvent::TokenRevoked.into()],
    )])
}

#[cfg(test)]
mod tests {
    use cairn_schemas::{Envelope, EventId};

    use super::*;
    use crate::control::AuthRefusal;
    use crate::log::StoredEvent;

    const NOW: u64 = 1_800_000_000_000;

    fn commit(state: &mut State, emits: Vec<Emit>, at: u64) {
        for emit in emits {
            for payload in emit.events {
                let seq = state.last_seq + 1;
                let version = state.version(&emit.aggregate) + 1;
                state.apply(&StoredEvent {
                    seq,
                    envelope: Envelope {
                        event_id: EventId::new_v7(at, [seq as u8; 10]),
                        aggregate: emit.aggregate.clone(),
                        aggregate_version: version,
                        recorded_at: at,
                        actor: "root (token x)".into(),
                        correlation: None,
                        causation: None,
                        command: None,
                        traceparent: None,
                        prev_hash: [0; 32],
                        payload,
                    },
                });
            }
        }
    }

    fn token_id(name: &str) -> TokenId {
        TokenId::new_v7(NOW, [name.bytes().fold(0u8, |a, b| a.wrapping_add(b)); 10])
    }

    fn create(name: &str, role: Role, hash: u8, expires_in_secs: Option<u64>) -> Command {
        Command::CreateToken {
            token: token_id(name),
            name: name.into(),
            role,
            vms: vec![],
            groups: vec![],
            secret_hash: [hash; 32],
            expires_in_secs,
        }
    }

    #[test]
    fn a_token_authenticates_until_it_expires_or_is_revoked() {
        let mut state = State::default();
        let made = decide(&state, &create("ci", Role::Operator, 1, Some(60)), NOW).unwrap();
        commit(&mut state, made, NOW);
        let principal = authenticate(&state, &[1; 32], NOW + 59_999).unwrap();
        assert_eq!(
            (principal.name.as_str(), principal.role),
            ("ci", Role::Operator)
        );
        assert!(principal.scope.is_none());
        assert_eq!(
            authenticate(&state, &[1; 32], NOW + 60_000),
            Err(AuthRefusal::Expired)
        );
        assert_eq!(
            authenticate(&state, &[2; 32], NOW),
            Err(AuthRefusal::Unknown)
        );
        let id = token_id("ci");
        let revoked = decide(&state, &Command::RevokeToken { token: id }, NOW).unwrap();
        commit(&mut state, revoked, NOW + 1);
        assert_eq!(
            authenticate(&state, &[1; 32], NOW + 2),
            Err(AuthRefusal::Revoked)
        );
        // Revoking again is no change; the view says who did it.
        assert!(
            decide(&state, &Command::RevokeToken { token: id }, NOW)
                .unwrap()
                .is_empty()
        );
        let view = view(&state.tokens.by_id[&id], NOW + 2);
        assert_eq!(view.revoked_by.as_deref(), Some("root (token x)"));
        assert!(!view.live);
    }

    #[test]
    fn bad_tokens_are_refused_with_codes() {
        let mut state = State::default();
        let made = decide(&state, &create("ci", Role::Viewer, 1, None), NOW).unwrap();
        commit(&mut state, made, NOW);
        let code = |command: Command| decide(&state, &command, NOW).unwrap_err().code();
        assert_eq!(
            code(create("ci", Role::Viewer, 2, None)),
            ErrorCode::DuplicateToken
        );
        assert_eq!(
            code(create("bad name", Role::Viewer, 3, None)),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(create(".hidden", Role::Viewer, 3, None)),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(create("other", Role::Viewer, 1, None)),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(create("other", Role::Viewer, 3, Some(0))),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(create(
                "other",
                Role::Viewer,
                3,
                Some(MAX_LIFETIME_SECS + 1)
            )),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(create("owner", Role::AppOwner, 4, None)),
            ErrorCode::InvalidRequest
        );
        let vm = VmId::new_v7(NOW, [9; 10]);
        let scoped = |role| Command::CreateToken {
            token: TokenId::new_v7(NOW, [5; 10]),
            name: "owner".into(),
            role,
            vms: vec![vm],
            groups: vec![],
            secret_hash: [5; 32],
            expires_in_secs: None,
        };
        assert_eq!(code(scoped(Role::Operator)), ErrorCode::InvalidRequest);
        assert_eq!(code(scoped(Role::AppOwner)), ErrorCode::UnknownVm);
        assert_eq!(
            code(Command::RevokeToken {
                token: TokenId::new_v7(NOW, [7; 10])
            }),
            ErrorCode::UnknownToken
        );
        // A revoked token's name may be used again.
        let revoke = Command::RevokeToken {
            token: token_id("ci"),
        };
        let revoked = decide(&state, &revoke, NOW).unwrap();
        commit(&mut state, revoked, NOW);
        let again = Command::CreateToken {
            token: TokenId::new_v7(NOW, [6; 10]),
            name: "ci".into(),
            role: Role::Viewer,
            vms: vec![],
            groups: vec![],
            secret_hash: [6; 32],
            expires_in_secs: None,
        };
        assert!(decide(&state, &again, NOW).is_ok());
    }
}
