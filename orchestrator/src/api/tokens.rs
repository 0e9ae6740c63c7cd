//! `/v1/tokens`: make, list and revoke API tokens (admins only, by the route table). The
//! secret is made here, from the operating system's randomness, and answered once; the engine
//! sees only its hash.

use crate::error_code::ErrorCode;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cairn_schemas::{Command, GroupId, Role, TokenId, VmId};

use super::extract::{Actor, IdPath, JsonBody};
use super::wire::CreateTokenRequest;
use super::{AppState, Error};
use crate::auth;
use crate::control::ControlError;
use crate::views::{NewTokenView, TokenView};

pub(super) async fn list_tokens(State(state): State<AppState>) -> Json<Vec<TokenView>> {
    let mut tokens = state.control.tokens();
    tokens.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Json(tokens)
}

pub(super) async fn create_token(
    State(state): State<AppState>,
    actor: Actor,
    JsonBody(request): JsonBody<CreateTokenRequest>,
) -> Result<(StatusCode, Json<NewTokenView>), Error> {
    let role = Role::parse(&request.role).ok_or_else(|| {
        Error::invalid_request(format!(
            "role {:?} is not one of admin, operator, viewer, app-owner",
            request.role
        ))
    })?;
    let vms = parse_ids::<VmId>("vms", &request.vms)?;
    let groups = parse_ids::<GroupId>("groups", &request.groups)?;
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random).map_err(|err| {
        Error::Control(ControlError::Internal(format!(
            "no randomness for a token's secret: {err}"
        )))
    })?;
    let secret = auth::secret_from(&random);
    let token = state.control.new_token_id();
    let command = Command::CreateToken {
        token,
        name: request.name.clone(),
        role,
        vms,
        groups,
        secret_hash: auth::secret_hash(&secret),
        expires_in_secs: request.expires_in_secs,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    if accepted.replayed {
        // The secret exists only in the first answer; it is never stored.
        return Err(Error::Control(ControlError::Conflict {
            code: ErrorCode::SecretShownOnce,
            message: format!(
                "token {} was made by the first request with this Idempotency-Key, and its \
                 secret was shown only in that answer; if it is lost, revoke the token and \
                 make another",
                accepted.id
            ),
        }));
    }
    let view = find(&state, &token)?;
    tracing::info!(target: "cairn::api", token = %token, name = %view.name, role = %view.role, "token created");
    Ok((
        StatusCode::CREATED,
        Json(NewTokenView {
            view,
            token: secret,
        }),
    ))
}

pub(super) async fn revoke_token(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(token): IdPath<TokenId>,
) -> Result<Json<TokenView>, Error> {
    state
        .control
        .submit(actor.name, actor.command_id, Command::RevokeToken { token })
        .await?;
    let view = find(&state, &token)?;
    tracing::info!(target: "cairn::api", token = %token, name = %view.name, "token revoked");
    Ok(Json(view))
}

/// The token's view once its events are applied (`submit` returns after they are).
fn find(state: &AppState, token: &TokenId) -> Result<TokenView, Error> {
    let id = token.to_string();
    state
        .control
        .tokens()
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| {
            Error::Control(ControlError::NotFound {
                code: ErrorCode::UnknownToken,
                message: format!("no token {id}"),
            })
        })
}

fn parse_ids<T: std::str::FromStr>(field: &str, values: &[String]) -> Result<Vec<T>, Error>
where
    T::Err: std::fmt::Display,
{
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            value
                .parse()
                .map_err(|err| Error::invalid_id(format!("{field}[{i}]: {err}")))
        })
        .collect()
}
