//! API tokens on the command line: `cairn token create|list|revoke`, where the CLI finds its
//! token, and the admin token `cairn up` (and `cairn orchestrator --bootstrap-token`) makes at
//! its first start.
//!
//! The CLI's token, first found wins: `--token-file` (or `CAIRN_TOKEN_FILE`), `CAIRN_TOKEN`,
//! then the user's config folder, `$XDG_CONFIG_HOME/cairn/tokens/HOST_PORT` (default
//! `~/.config`), which `cairn up` writes for the address it serves. A token file must be
//! private to its owner (0600), like a key file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::auth;
use cairn_orchestrator::control::{AuthRefusal, Control};
use cairn_orchestrator::views::{NewTokenView, TokenView};
use cairn_schemas::{Command, Role};
use clap::{Args, Subcommand};

use crate::client_cmd::{Client, ServerOpts, Table, from_value, print_json, resolve_vms};
use crate::repo_cmd::format_ms;

/// The admin token's file in `cairn up`'s data folder.
pub const DATA_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; its secret is printed this once (with --json in the field `token`).
    Create(CreateArgs),
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Revoke a token: every orchestrator refuses it from then on.
    Revoke {
        /// The token's id (see `cairn token list`) or its name.
        token: String,
        #[command(flatten)]
        opts: ServerOpts,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Its name: A-Z, a-z, 0-9, '.', '_', '-' (at most 64), unique among live tokens.
    #[arg(long)]
    name: String,
    /// admin, operator, viewer or app-owner.
    #[arg(long)]
    role: String,
    /// For app-owner: a VM of its scope (name or id); repeatable.
    #[arg(long = "vm")]
    vms: Vec<String>,
    /// For app-owner: a protection group of its scope (name or id); its members are in scope.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Lifetime: e.g. 90d, 12h, 30m, 2w; default: no expiry.
    #[arg(long)]
    expires: Option<String>,
    #[command(flatten)]
    opts: ServerOpts,
}

pub fn run(command: TokenCommand) -> Result<i32> {
    match command {
        TokenCommand::Create(args) => create(&args),
        TokenCommand::List { opts } => list(&opts),
        TokenCommand::Revoke { token, opts } => revoke(&opts, &token),
    }
}

fn create(args: &CreateArgs) -> Result<i32> {
    if Role::parse(&args.role).is_none() {
        bail!(
            "--role {:?} is not one of admin, operator, viewer, app-owner",
            args.role
        );
    }
    let expires_in_secs = args
        .expires
        .as_deref()
        .map(parse_lifetime)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    let client = Client::new(&args.opts)?;
    let vms = if args.vms.is_empty() {
        Vec::new()
    } else {
        resolve_vms(&client, &args.vms)?
    };
    let groups = args
        .groups
        .iter()
        .map(|g| crate::policy_cmd::resolve_group(&client, g))
        .collect::<Result<Vec<_>>>()?;
    let body = serde_json::json!({
        "name": args.name,
        "role": args.role,
        "vms": vms,
        "groups": groups,
        "expires_in_secs": expires_in_secs,
    });
    let answer = client.post("/v1/tokens", Some(&body))?;
    if args.opts.json() {
        print_json(&answer);
        return Ok(0);
    }
    let made: NewTokenView = from_value(answer)?;
    println!(
        "token {} ({}) made, id {}{}",
        made.view.name,
        made.view.role,
        made.view.id,
        made.view
            .expires_at
            .map(|at| format!(", expires {}", format_ms(at)))
            .unwrap_or_default()
    );
    println!(
        "its secret, shown this once (send it as Authorization: Bearer, or save it 0600 for --token-file):"
    );
    println!("{}", made.token);
    Ok(0)
}

fn list(opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let answer = client.get("/v1/tokens", &[])?;
    if opts.json() {
        print_json(&answer);
        return Ok(0);
    }
    let tokens: Vec<TokenView> = from_value(answer)?;
    let mut table = Table::new(&[
        "NAME", "ID", "ROLE", "SCOPE", "CREATED", "BY", "EXPIRES", "STATE",
    ]);
    for t in &tokens {
        let scope = if t.vms.is_empty() && t.groups.is_empty() {
            "-".to_string()
        } else {
            format!("{} VMs, {} groups", t.vms.len(), t.groups.len())
        };
        let state = match (t.live, t.revoked_at) {
            (true, _) => "live".to_string(),
            (false, Some(at)) => format!("revoked {}", format_ms(at)),
            (false, None) => "expired".to_string(),
        };
        table.row(vec![
            t.name.clone(),
            t.id.clone(),
            t.role.clone(),
            scope,
            format_ms(t.created_at),
            t.created_by.clone(),
            t.expires_at.map_or_else(|| "never".into(), format_ms),
            state,
        ]);
    }
    print!("{}", table.render());
    Ok(0)
}

fn revoke(opts: &ServerOpts, token: &str) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = if token.parse::<cairn_schemas::TokenId>().is_ok() {
        token.to_string()
    } else {
        let tokens: Vec<TokenView> = from_value(client.get("/v1/tokens", &[])?)?;
        let live: Vec<&TokenView> = tokens
            .iter()
            .filter(|t| t.name == token && t.live)
            .collect();
        match live.as_slice() {
            [one] => one.id.clone(),
            [] => bail!("no live token named {token:?} (see `cairn token list`)"),
            _ => bail!("several live tokens are named {token:?}; name one by its id"),
        }
    };
    let answer = client.post::<serde_json::Value>(&format!("/v1/tokens/{id}/revoke"), None)?;
    if opts.json() {
        print_json(&answer);
        return Ok(0);
    }
    let view: TokenView = from_value(answer)?;
    println!("token {} ({}) revoked", view.name, view.id);
    Ok(0)
}

/// `90d`, `12h`, `30m`, `45s`, `2w` → seconds.
pub fn parse_lifetime(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{trimmed:?} needs a unit: s, m, h, d or w (e.g. 90d, 1h30m)"
        ));
    }
    match crate::units::parse_whole(trimmed, std::time::Duration::from_secs(1), "seconds") {
        Ok(0) => Err(format!("{trimmed:?} is not a usable lifetime")),
        Ok(secs) => Ok(secs),
        Err(err) => Err(err.to_string()),
    }
}

/// The CLI's token for `server`, by the order in the module's doc; `None` when there is none.
pub fn discover(server: &str, token_file: Option<&Path>) -> Result<Option<String>> {
    if let Some(path) = token_file {
        return read_token_file(path).map(Some);
    }
    if let Ok(token) = std::env::var("CAIRN_TOKEN") {
        let token = token.trim().to_string();
        if !auth::looks_like_secret(&token) {
            bail!("CAIRN_TOKEN is not a cairn token (cairn_ and 64 hex digits)");
        }
        return Ok(Some(token));
    }
    let Some(path) = host_port(server).and_then(|hp| config_token_path(&hp)) else {
        return Ok(None);
    };
    match std::fs::symlink_metadata(&path) {
        Ok(_) => read_token_file(&path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `host:port` of an `http(s)://host:port/...` URL (default ports 80 and 443).
pub fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    if has_port {
        Some(authority.to_string())
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        Some(format!("{authority}:{port}"))
    }
}

/// `$XDG_CONFIG_HOME/cairn/tokens/HOST_PORT` (or `~/.config/...`); `None` without either.
pub fn config_token_path(host_port: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    let name: String = host_port
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Some(base.join("cairn").join("tokens").join(name))
}

/// Reads a token file: private to its owner, one secret.
pub fn read_token_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "token file {} is open to group or others (mode {mode:04o}); chmod 600 it",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim();
    if !auth::looks_like_secret(token) {
        bail!(
            "token file {} does not hold a cairn token (cairn_ and 64 hex digits)",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Writes `secret` to `path` as a new 0600 file (through a temp file, fsynced, renamed, the
/// folder fsynced), making missing parent folders 0700.
pub fn write_token_file(path: &Path, secret: &str) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no folder", path.display()))?;
    if !dir.exists() {
        crate::files::make_dir(dir, 0o700).with_context(|| format!("making {}", dir.display()))?;
    }
    crate::files::write_atomic(path, format!("{secret}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// Makes sure an admin token exists whose secret is in `file`: the secret is written first
/// (so a crash leaves a file whose token the next start creates), then created as a token
/// unless the engine knows it already. Returns the secret.
pub async fn bootstrap(control: &dyn Control, file: &Path, actor: &str) -> Result<String> {
    let secret = if file.exists() {
        read_token_file(file)?
    } else {
        let mut random = [0u8; 32];
        getrandom::getrandom(&mut random).context("randomness for the admin token")?;
        let secret = auth::secret_from(&random);
        write_token_file(file, &secret)?;
        secret
    };
    let hash = auth::secret_hash(&secret);
    match control.authenticate(&hash) {
        Ok(_) => return Ok(secret),
        Err(refusal @ (AuthRefusal::Revoked | AuthRefusal::Expired)) => {
            tracing::warn!(file = %file.display(), %refusal, "the admin token in this file is no longer accepted; use another admin token, or remove the file to make a new one at the next start");
            return Ok(secret);
        }
        Err(AuthRefusal::Unknown) => {}
    }
    let taken = control
        .tokens()
        .iter()
        .any(|t| t.name == "bootstrap-admin" && t.live);
    let token = control.new_token_id();
    let name = if taken {
        format!("bootstrap-admin-{}", &token.to_string()[..8])
    } else {
        "bootstrap-admin".to_string()
    };
    let command = Command::CreateToken {
        token,
        name,
        role: Role::Admin,
        vms: Vec::new(),
        groups: Vec::new(),
        secret_hash: hash,
        expires_in_secs: None,
    };
    match control.submit(actor.to_string(), None, command).await {
        Ok(_) => {
            tracing::info!(file = %file.display(), "made the admin token");
            Ok(secret)
        }
        // Another orchestrator made it from the same file meanwhile.
        Err(_) if control.authenticate(&hash).is_ok() => Ok(secret),
        Err(e) => Err(anyhow::anyhow!("making the admin token: {e}")),
    }
}

/// Saves the admin token where the CLI of this user finds it for `addr` (and, for a loopback
/// or unspecified address, for `localhost` and `127.0.0.1` at the same port).
pub fn save_for_cli(
    secret: &str,
    addr: std::net::SocketAddr,
    client_url: &str,
) -> Result<Vec<PathBuf>> {
    let mut names = vec![addr.to_string()];
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        names.push(format!("127.0.0.1:{}", addr.port()));
        names.push(format!("localhost:{}", addr.port()));
    }
    // The name a client on this machine is told to use (an `--api-host` with TLS).
    if let Some(authority) = client_url.split_once("://").map(|(_, rest)| rest) {
        names.push(authority.trim_end_matches('/').to_ascii_lowercase());
    }
    names.dedup();
    let mut written = Vec::new();
    for name in names {
        let Some(path) = config_token_path(&name) else {
            continue;
        };
        if written.contains(&path) {
            continue;
        }
        write_token_file(&path, secret)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse() {
        assert_eq!(parse_lifetime("90d"), Ok(90 * 86_400));
        assert_eq!(parse_lifetime("12h"), Ok(43_200));
        assert_eq!(parse_lifetime("2w"), Ok(14 * 86_400));
        assert_eq!(parse_lifetime("1h30m"), Ok(5400));
        for bad in [
            "",
            "d",
            "90",
            "0d",
            "5 parsecs",
            "-1d",
            "99999999999999999999w",
            "1500ms",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn servers_map_to_host_and_port() {
        assert_eq!(
            host_port("http://127.0.0.1:7480").as_deref(),
            Some("127.0.0.1:7480")
        );
        assert_eq!(
            host_port("https://orch.example/").as_deref(),
            Some("orch.example:443")
        );
        assert_eq!(
            host_port("http://[::1]:7480/x").as_deref(),
            Some("[::1]:7480")
        );
        assert_eq!(host_port("orch:7480"), None);
    }

    #[test]
    fn token_files_must_be_private_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("t");
        let secret = auth::secret_from(&[7; 32]);
        write_token_file(&path, &secret).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), secret);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::write(dir.path().join("junk"), "hunter2").unwrap();
        std::fs::set_permissions(
            dir.path().join("junk"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let err = read_token_file(&dir.path().join("junk"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not hold a cairn token"), "{err}");
    }
}
