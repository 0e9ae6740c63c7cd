//! Tests of the HTTP API against a fake [`Control`]: every route's happy path and its
//! refusals, through the router in memory (`tower::ServiceExt::oneshot`) and over a real TCP
//! socket on port 0.

use crate::error_code::ErrorCode;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use cairn_schemas::{
    BackupMode, Command, CommandId, GroupId, JobId, RecoveryTarget, Role, SyncFrequency,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tower::ServiceExt;

use super::*;
use crate::control::{BoxFuture, ControlError};
use crate::views::{
    Accepted, AuditReport, DiskView, EventView, GroupView, JobView, NodeView, RpDiskView, RpView,
    StepView, VmView,
};

const VM_WEB: &str = "0190a000-0000-7000-8000-000000000001";
const VM_DB: &str = "0190a000-0000-7000-8000-000000000002";
const VM_UNKNOWN: &str = "0190a000-0000-7000-8000-0000000000ff";
const JOB_RUNNING: &str = "0190b000-0000-7000-8000-000000000001";
const JOB_DONE: &str = "0190b000-0000-7000-8000-000000000002";
const JOB_UNKNOWN: &str = "0190b000-0000-7000-8000-0000000000ff";
const RP_1: &str = "0190c000-0000-7000-8000-000000000001";
const GROUP_WEB: &str = "0190f000-0000-7000-8000-000000000001";
const TOKEN_1: &str = "0191a000-0000-7000-8000-000000000001";

/// The secret of the fake's token of `role`. The app owner's scope is VM web-01 and group web.
fn secret(role: Role) -> String {
    let tag = match role {
        Role::Admin => 1,
        Role::Operator => 2,
        Role::Viewer => 3,
        Role::AppOwner => 4,
    };
    crate::auth::secret_from(&[tag; 32])
}

fn principal(role: Role) -> crate::auth::Principal {
    crate::auth::Principal {
        token: TOKEN_1.parse().unwrap(),
        name: format!("{role}-token"),
        role,
        scope: (role == Role::AppOwner).then(|| crate::auth::Scope {
            vms: [VM_WEB.parse().unwrap()].into(),
            groups: [GROUP_WEB.parse().unwrap()].into(),
        }),
    }
}

/// An in-memory [`Control`] that records the commands it is given and refuses a few the way
/// `decide` would (unknown VM, duplicate group name, job already over).
struct Fake {
    vms: Vec<VmView>,
    groups: Vec<GroupView>,
    jobs: Vec<JobView>,
    rps: HashMap<String, Vec<RpView>>,
    nodes: Vec<NodeView>,
    events: Mutex<Vec<EventView>>,
    /// Notified (all waiters) when an event is pushed.
    event_added: Notify,
    /// Notified (one permit) each time `wait_for_events` starts to wait, so tests know a long
    /// poll is parked without sleeping.
    waiting: Notify,
    submitted: Mutex<Vec<(String, Command)>>,
    /// The command id of each submitted command (from its `Idempotency-Key`).
    command_ids: Mutex<Vec<Option<cairn_schemas::CommandId>>>,
    /// When set, `submit` answers with this error.
    submit_error: Mutex<Option<ControlError>>,
    audit: AuditReport,
    next_id: AtomicU64,
    /// Tokens made through `CreateToken` (listed as `tokens()`).
    tokens: Mutex<Vec<crate::views::TokenView>>,
}

fn vm(vm: &str, name: &str, node: &str) -> VmView {
    VmView {
        vm: vm.into(),
        name: name.into(),
        node: node.into(),
        power: "Running".into(),
        disks: vec![DiskView {
            disk: "disk0".into(),
            size_bytes: 10 << 30,
            format: "Qcow2".into(),
            image_path: format!("/var/lib/vms/{name}.qcow2"),
            state: "Protected".into(),
            change_tracking: "active".into(),
        }],
        group: None,
        last_backup_at: Some(1_700_000_000_000),
        recovery_points: 1,
        present: true,
    }
}

fn job(job: &str, vm: &str, state: &str, requested_at: u64) -> JobView {
    JobView {
        job: job.into(),
        kind: "Backup".into(),
        vm: vm.into(),
        vm_name: "web-01".into(),
        state: state.into(),
        wait_reason: None,
        reason: "Manual".into(),
        node: Some("kvm-01".into()),
        requested_at,
        started_at: Some(requested_at + 10),
        finished_at: None,
        error: None,
        cancel_requested: false,
        rp: None,
        steps: vec![StepView {
            step: "0190d000-0000-7000-8000-000000000001".into(),
            kind: "Snapshot".into(),
            state: "Succeeded".into(),
            attempt: 1,
            node: Some("kvm-01".into()),
            started_at: Some(requested_at + 10),
            finished_at: Some(requested_at + 20),
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        }],
        recovery: None,
    }
}

fn event(seq: u64) -> EventView {
    EventView {
        seq,
        event_id: format!("0190e000-0000-7000-8000-{seq:012}"),
        recorded_at: 1_700_000_000_000 + seq,
        aggregate: format!("job/{JOB_RUNNING}"),
        version: seq,
        name: "StepSucceeded".into(),
        actor: "node:kvm-01".into(),
        correlation: Some(JOB_RUNNING.into()),
        summary: format!("event {seq}"),
    }
}

impl Fake {
    fn new() -> Self {
        let rps = HashMap::from([(
            VM_WEB.to_owned(),
            vec![RpView {
                rp: RP_1.into(),
                vm: VM_WEB.into(),
                job: JOB_DONE.into(),
                taken_at: 1_700_000_000_000,
                consistency: "CrashConsistent".into(),
                disks: vec![RpDiskView {
                    disk: "disk0".into(),
                    bytes_read: 1 << 30,
                    bytes_stored: 1 << 28,
                }],
                state: "live".into(),
                deleted_at: None,
                purge_after: None,
                deleted_by: None,
            }],
        )]);
        Self {
            vms: vec![vm(VM_WEB, "web-01", "kvm-01"), vm(VM_DB, "db-01", "kvm-02")],
            groups: vec![GroupView {
                group: GROUP_WEB.into(),
                name: "web".into(),
                members: vec![VM_WEB.into()],
                retention_days: 5,
                sync: "15m".into(),
                created_at: 1_700_000_000_000,
            }],
            jobs: vec![
                job(JOB_RUNNING, VM_WEB, "Running", 2_000),
                job(JOB_DONE, VM_DB, "Succeeded", 1_000),
            ],
            rps,
            nodes: vec![NodeView {
                node: "kvm-01".into(),
                cluster: "lab".into(),
                online: true,
                last_seen: Some(1_700_000_000_000),
                vms: 1,
                running_backups: 1,
            }],
            events: Mutex::new(Vec::new()),
            event_added: Notify::new(),
            waiting: Notify::new(),
            submitted: Mutex::new(Vec::new()),
            command_ids: Mutex::new(Vec::new()),
            submit_error: Mutex::new(None),
            audit: AuditReport {
                ok: true,
                events_checked: 3,
                first_broken_seq: None,
                first_broken_event: None,
                detail: None,
                keyed_from: Some(1),
                checkpoints: None,
            },
            next_id: AtomicU64::new(1),
            tokens: Mutex::new(Vec::new()),
        }
    }

    fn push_event(&self, event: EventView) {
        self.events.lock().unwrap().push(event);
        self.event_added.notify_waiters();
    }

    fn submitted(&self) -> Vec<(String, Command)> {
        self.submitted.lock().unwrap().clone()
    }

    fn next_rand(&self) -> [u8; 10] {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rand = [0u8; 10];
        rand[2..].copy_from_slice(&n.to_be_bytes());
        rand
    }

    /// What `decide` would say about a command, roughly.
    fn check(&self, command: &Command) -> Result<String, ControlError> {
        let known_vm = |vm: &cairn_schemas::VmId| {
            let text = vm.to_string();
            if self.vms.iter().any(|v| v.vm == text) {
                Ok(())
            } else {
                Err(ControlError::NotFound {
                    code: ErrorCode::UnknownVm,
                    message: format!("no vm {text}"),
                })
            }
        };
        match command {
            Command::CreateToken {
                token, name, role, ..
            } => {
                self.tokens.lock().unwrap().push(crate::views::TokenView {
                    id: token.to_string(),
                    name: name.clone(),
                    role: role.to_string(),
                    vms: vec![],
                    groups: vec![],
                    created_at: 1_800_000_000_000,
                    created_by: "admin-token".into(),
                    expires_at: None,
                    revoked_at: None,
                    revoked_by: None,
                    live: true,
                });
                Ok(token.to_string())
            }
            Command::RevokeToken { token } => {
                let text = token.to_string();
                let mut tokens = self.tokens.lock().unwrap();
                let found = tokens.iter_mut().find(|t| t.id == text).ok_or_else(|| {
                    ControlError::NotFound {
                        code: ErrorCode::UnknownToken,
                        message: format!("no token {text}"),
                    }
                })?;
                found.revoked_at = Some(1_800_000_000_001);
                found.live = false;
                Ok(text)
            }
            Command::CreateGroup { group, name, .. } => {
                if self.groups.iter().any(|g| &g.name == name) {
                    return Err(ControlError::Conflict {
                        code: ErrorCode::DuplicateGroup,
                        message: format!("a group named {name:?} exists"),
                    });
                }
                Ok(group.to_string())
            }
            Command::RequestBackup { job, vm, .. }
            | Command::RequestRestore { job, vm, .. }
            | Command::RequestRecovery { job, vm, .. }
            | Command::RequestRecoveryInZone { job, vm, .. } => {
                known_vm(vm)?;
                Ok(job.to_string())
            }
            Command::CancelJob { job, .. } => {
                let text = job.to_string();
                match self.jobs.iter().find(|j| j.job == text) {
                    None => Err(ControlError::NotFound {
                        code: ErrorCode::UnknownJob,
                        message: format!("no job {text}"),
                    }),
                    Some(j) if j.state == "Succeeded" => Err(ControlError::Conflict {
                        code: ErrorCode::JobFinished,
                        message: format!("job {text} is already over"),
                    }),
                    Some(_) => Ok(text),
                }
            }
            _ => Ok(String::new()),
        }
    }
}

impl Control for Fake {
    fn vms(&self) -> Vec<VmView> {
        self.vms.clone()
    }

    fn groups(&self) -> Vec<GroupView> {
        self.groups.clone()
    }

    fn jobs(&self) -> Vec<JobView> {
        self.jobs.clone()
    }

    fn job(&self, job: &str) -> Result<JobView, ControlError> {
        self.jobs
            .iter()
            .find(|j| j.job == job)
            .cloned()
            .ok_or_else(|| ControlError::NotFound {
                code: ErrorCode::UnknownJob,
                message: format!("no job {job}"),
            })
    }

    fn recovery_points(&self, vm: &str) -> Result<Vec<RpView>, ControlError> {
        if !self.vms.iter().any(|v| v.vm == vm) {
            return Err(ControlError::NotFound {
                code: ErrorCode::UnknownVm,
                message: format!("no vm {vm}"),
            });
        }
        Ok(self.rps.get(vm).cloned().unwrap_or_default())
    }

    fn nodes(&self) -> Vec<NodeView> {
        self.nodes.clone()
    }

    fn submit(
        &self,
        actor: String,
        command_id: Option<cairn_schemas::CommandId>,
        command: Command,
    ) -> BoxFuture<'_, Result<Accepted, ControlError>> {
        Box::pin(async move {
            if let Some(err) = self.submit_error.lock().unwrap().clone() {
                return Err(err);
            }
            let id = self.check(&command)?;
            let mut submitted = self.submitted.lock().unwrap();
            submitted.push((actor, command));
            self.command_ids.lock().unwrap().push(command_id);
            Ok(Accepted {
                id,
                seq: 100 + submitted.len() as u64,
                replayed: false,
            })
        })
    }

    fn events(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<EventView>, ControlError>> {
        Box::pin(async move {
            Ok(self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.seq >= from_seq)
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn wait_for_events(&self, from_seq: u64, timeout_ms: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let deadline = tokio::time::sleep(Duration::from_millis(timeout_ms));
            tokio::pin!(deadline);
            loop {
                let added = self.event_added.notified();
                tokio::pin!(added);
                // Registered before the check, so an event pushed in between is not missed.
                added.as_mut().enable();
                if self
                    .events
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| e.seq >= from_seq)
                {
                    return;
                }
                self.waiting.notify_one();
                tokio::select! {
                    () = &mut deadline => return,
                    () = added => {}
                }
            }
        })
    }

    fn audit_verify(&self) -> BoxFuture<'_, Result<AuditReport, ControlError>> {
        Box::pin(async move { Ok(self.audit.clone()) })
    }

    fn new_job_id(&self) -> JobId {
        JobId::new_v7(1_800_000_000_000, self.next_rand())
    }

    fn new_group_id(&self) -> GroupId {
        GroupId::new_v7(1_800_000_000_000, self.next_rand())
    }

    fn new_command_id(&self) -> CommandId {
        CommandId::new_v7(1_800_000_000_000, self.next_rand())
    }

    fn default_repository(&self) -> String {
        "local".into()
    }

    fn timezone(&self) -> crate::policy::tz::TimeZone {
        crate::policy::tz::TimeZone::parse("Europe/Paris").unwrap()
    }

    fn authenticate(
        &self,
        secret_hash: &[u8; 32],
    ) -> Result<crate::auth::Principal, crate::control::AuthRefusal> {
        Role::ALL
            .into_iter()
            .find(|role| crate::auth::secret_hash(&secret(*role)) == *secret_hash)
            .map(principal)
            .ok_or(crate::control::AuthRefusal::Unknown)
    }

    fn tokens(&self) -> Vec<crate::views::TokenView> {
        self.tokens.lock().unwrap().clone()
    }

    fn new_token_id(&self) -> cairn_schemas::TokenId {
        cairn_schemas::TokenId::new_v7(1_800_000_000_000, self.next_rand())
    }

    fn app_owner_roots(&self, node: &cairn_schemas::NodeId) -> Vec<String> {
        if node.as_str() == "kvm-01" {
            vec!["/srv/owners".into()]
        } else {
            Vec::new()
        }
    }
}

fn app_with(fake: &Arc<Fake>, config: ApiConfig) -> Router {
    router(fake.clone(), config)
}

fn app(fake: &Arc<Fake>) -> Router {
    app_with(fake, ApiConfig::default())
}

/// A request with an optional JSON body (sent as `application/json`), made by an admin.
fn request(method: &str, uri: &str, body: Option<&str>) -> Request<Body> {
    request_as(Some(Role::Admin), method, uri, body)
}

/// A request builder carrying the admin's token.
fn authed() -> axum::http::request::Builder {
    Request::builder().header("authorization", format!("Bearer {}", secret(Role::Admin)))
}

/// A request made with the fake's token of `role`, or with no token.
fn request_as(role: Option<Role>, method: &str, uri: &str, body: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(role) = role {
        builder = builder.header("authorization", format!("Bearer {}", secret(role)));
    }
    match body {
        Some(text) => builder
            .header("content-type", "application/json")
            .body(Body::from(text.to_owned()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    if content_type.as_deref() == Some("application/json") {
        (status, serde_json::from_slice(&bytes).unwrap())
    } else {
        (
            status,
            Value::String(String::from_utf8_lossy(&bytes).into()),
        )
    }
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
    send(app, request(method, uri, body)).await
}

/// Asserts an error answer: its status, its code, and words its message must contain.
#[track_caller]
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str, words: &[&str]) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    let message = answer.1["error"]["message"].as_str().unwrap();
    for word in words {
        assert!(
            message.contains(word),
            "{message:?} should contain {word:?}"
        );
    }
}

#[tokio::test]
async fn lists_vms_groups_nodes() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, vms) = call(&app, "GET", "/v1/vms", None).await;
    assert_eq!(status, StatusCode::OK);
    let vms: Vec<VmView> = serde_json::from_value(vms).unwrap();
    assert_eq!(vms, fake.vms);
    let (status, groups) = call(&app, "GET", "/v1/groups", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(groups[0]["name"], "web");
    let (status, nodes) = call(&app, "GET", "/v1/nodes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nodes[0]["node"], "kvm-01");
}

#[tokio::test]
async fn recovery_points_of_a_vm() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, rps) = call(
        &app,
        "GET",
        &format!("/v1/vms/{VM_WEB}/recovery-points"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rps[0]["rp"], RP_1);
    let (status, rps) = call(
        &app,
        "GET",
        &format!("/v1/vms/{VM_DB}/recovery-points"),
        None,
    )
    .await;
    assert_eq!((status, rps), (StatusCode::OK, json!([])));
    let answer = call(
        &app,
        "GET",
        &format!("/v1/vms/{VM_UNKNOWN}/recovery-points"),
        None,
    )
    .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "unknown_vm", &[VM_UNKNOWN]);
    let answer = call(&app, "GET", "/v1/vms/web-01/recovery-points", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_id",
        &["vm", "web-01"],
    );
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, jobs) = call(&app, "GET", "/v1/jobs", None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [JOB_RUNNING, JOB_DONE]);

    let (_, jobs) = call(&app, "GET", "/v1/jobs?state=Succeeded", None).await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["job"], JOB_DONE);
    let (_, jobs) = call(
        &app,
        "GET",
        &format!("/v1/jobs?vm={VM_WEB}&state=Running"),
        None,
    )
    .await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["job"], JOB_RUNNING);
    let (_, jobs) = call(&app, "GET", "/v1/jobs?limit=1", None).await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["job"], JOB_RUNNING);

    let answer = call(&app, "GET", "/v1/jobs?state=Sleeping", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["Sleeping", "Running"],
    );
    let answer = call(&app, "GET", "/v1/jobs?vm=web-01", None).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_id", &["vm"]);
    let answer = call(&app, "GET", "/v1/jobs?limit=0", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["limit"],
    );
    let answer = call(&app, "GET", "/v1/jobs?limit=many", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["limit"],
    );
    let answer = call(&app, "GET", "/v1/jobs?statte=Running", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["statte"],
    );
}

#[tokio::test]
async fn one_job() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, job) = call(&app, "GET", &format!("/v1/jobs/{JOB_RUNNING}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let job: JobView = serde_json::from_value(job).unwrap();
    assert_eq!(job, fake.jobs[0]);
    let answer = call(&app, "GET", &format!("/v1/jobs/{JOB_UNKNOWN}"), None).await;
    assert_error(
        &answer,
        StatusCode::NOT_FOUND,
        "unknown_job",
        &[JOB_UNKNOWN],
    );
    let answer = call(&app, "GET", "/v1/jobs/42", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_id",
        &["job", "42"],
    );
}

#[tokio::test]
async fn create_group_builds_the_policy() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let body = json!({"name": "databases", "vms": [VM_DB], "retention_days": 14, "sync": "1h"});
    let (status, accepted) = call(&app, "POST", "/v1/groups", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::CREATED, "{accepted}");
    let submitted = fake.submitted();
    assert_eq!(submitted.len(), 1);
    let (actor, command) = &submitted[0];
    assert_eq!(actor, &format!("admin-token (token {TOKEN_1})"));
    let Command::CreateGroup {
        group,
        name,
        members,
        policy,
    } = command
    else {
        panic!("expected CreateGroup, got {command:?}");
    };
    assert_eq!(accepted["id"], group.to_string());
    assert_eq!(accepted["seq"], 101);
    assert_eq!(name, "databases");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].to_string(), VM_DB);
    assert_eq!(policy.retention_days, 14);
    assert_eq!(policy.sync, SyncFrequency::EveryMinutes(60));
    assert_eq!(policy.repository, "local");

    // Defaults, and the repository named by the request.
    let body = json!({"name": "empty", "repository": "offsite", "sync": "before-recovery-point"});
    let (status, _) = call(&app, "POST", "/v1/groups", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::CREATED);
    let Command::CreateGroup {
        policy, members, ..
    } = &fake.submitted()[1].1
    else {
        panic!("expected CreateGroup");
    };
    assert!(members.is_empty());
    assert_eq!(policy.repository, "offsite");
    assert_eq!(policy.retention_days, 5);
    assert_eq!(policy.sync, SyncFrequency::JustBeforeRecoveryPoint);
}

#[tokio::test]
async fn create_group_refusals() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let post = |body: Value| {
        let app = app.clone();
        async move { call(&app, "POST", "/v1/groups", Some(&body.to_string())).await }
    };
    let answer = post(json!({"name": "g", "sync": "20m"})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
        &["sync", "20"],
    );
    let answer = post(json!({"name": "g", "sync": "hourly"})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
        &["sync", "hourly"],
    );
    let answer = post(json!({"name": "g", "retention_days": 0})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
        &["retention_days"],
    );
    let answer = post(json!({"name": "g", "repository": ""})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
        &["repository"],
    );
    let answer = post(json!({"name": "g", "vms": [VM_WEB, "web-01"]})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_id",
        &["vms[1]", "web-01"],
    );
    let answer = post(json!({"name": "g", "vms": [VM_WEB, VM_WEB]})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["vms[1]", "twice"],
    );
    let answer = post(json!({"name": ""})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["name"],
    );
    let answer = post(json!({"name": "g", "retention": 14})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["retention"],
    );
    let answer = post(json!({"name": "g", "retention_days": "14"})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["retention_days"],
    );
    let answer = post(json!({"vms": []})).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["name"],
    );
    let answer = post(json!({"name": "web"})).await;
    assert_error(&answer, StatusCode::CONFLICT, "duplicate_group", &["web"]);
    assert!(fake.submitted().is_empty());

    // Malformed JSON, trailing garbage, no body, wrong content type.
    let answer = call(&app, "POST", "/v1/groups", Some(r#"{"name": "g""#)).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["not valid JSON"],
    );
    let answer = call(&app, "POST", "/v1/groups", Some(r#"{"name": "g"} x"#)).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["not valid JSON"],
    );
    let answer = call(&app, "POST", "/v1/groups", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["body is required"],
    );
    let text = authed()
        .method("POST")
        .uri("/v1/groups")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"name": "g"}"#))
        .unwrap();
    let answer = send(&app, text).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["text/plain"],
    );
    let untyped = authed()
        .method("POST")
        .uri("/v1/groups")
        .body(Body::from(r#"{"name": "g"}"#))
        .unwrap();
    let answer = send(&app, untyped).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["Content-Type"],
    );
    assert!(fake.submitted().is_empty());
}

#[tokio::test]
async fn backup_requests_a_job() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, accepted) = call(&app, "POST", &format!("/v1/vms/{VM_WEB}/backup"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let body = r#"{"mode": "express-full"}"#;
    let (status, _) = call(&app, "POST", &format!("/v1/vms/{VM_DB}/backup"), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let submitted = fake.submitted();
    let Command::RequestBackup { job, vm, mode } = &submitted[0].1 else {
        panic!("expected RequestBackup, got {:?}", submitted[0].1);
    };
    assert_eq!(accepted["id"], job.to_string());
    assert_eq!(
        (vm.to_string().as_str(), *mode),
        (VM_WEB, BackupMode::Incremental)
    );
    let Command::RequestBackup { vm, mode, .. } = &submitted[1].1 else {
        panic!("expected RequestBackup");
    };
    assert_eq!(
        (vm.to_string().as_str(), *mode),
        (VM_DB, BackupMode::ExpressFull)
    );

    let answer = call(&app, "POST", &format!("/v1/vms/{VM_UNKNOWN}/backup"), None).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "unknown_vm", &[VM_UNKNOWN]);
    let answer = call(&app, "POST", "/v1/vms/web-01/backup", None).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_id", &["vm"]);
    let answer = call(
        &app,
        "POST",
        &format!("/v1/vms/{VM_WEB}/backup"),
        Some(r#"{"mode": "full"}"#),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["mode", "full"],
    );

    // A conflict from `decide` passes through with its code.
    *fake.submit_error.lock().unwrap() = Some(ControlError::Conflict {
        code: ErrorCode::JobRunning,
        message: format!("vm {VM_WEB} already has a backup running"),
    });
    let answer = call(&app, "POST", &format!("/v1/vms/{VM_WEB}/backup"), None).await;
    assert_error(&answer, StatusCode::CONFLICT, "job_running", &["already"]);
    assert_eq!(fake.submitted().len(), 2);
}

#[tokio::test]
async fn restore_copies_to_a_folder() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let uri = format!("/v1/vms/{VM_DB}/restore");
    let body = json!({"rp": RP_1, "to": "/srv/restore/db"}).to_string();
    let (status, accepted) = call(&app, "POST", &uri, Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let body = json!({"rp": RP_1, "to": "/srv/restore/db", "node": "kvm-09"}).to_string();
    let (status, _) = call(&app, "POST", &uri, Some(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let submitted = fake.submitted();
    let Command::RequestRestore {
        job,
        vm,
        rp,
        target,
    } = &submitted[0].1
    else {
        panic!("expected RequestRestore, got {:?}", submitted[0].1);
    };
    assert_eq!(accepted["id"], job.to_string());
    assert_eq!(vm.to_string(), VM_DB);
    assert_eq!(rp.to_string(), RP_1);
    // The node defaults to the one hosting the VM.
    let RecoveryTarget::CopyToFolder { node, path } = target else {
        panic!("expected CopyToFolder, got {target:?}");
    };
    assert_eq!(
        (node.as_str(), path.as_str()),
        ("kvm-02", "/srv/restore/db")
    );
    let Command::RequestRestore {
        target: RecoveryTarget::CopyToFolder { node, .. },
        ..
    } = &submitted[1].1
    else {
        panic!("expected RequestRestore to a folder");
    };
    assert_eq!(node.as_str(), "kvm-09");

    let cases = [
        (
            json!({"rp": RP_1, "to": "restore/db"}),
            "invalid_path",
            "to",
        ),
        (
            json!({"rp": RP_1, "to": "/srv/../etc"}),
            "invalid_path",
            "..",
        ),
        (json!({"rp": "latest", "to": "/srv"}), "invalid_id", "rp"),
        (
            json!({"rp": RP_1, "to": "/srv", "node": "kvm 01"}),
            "invalid_id",
            "node",
        ),
        (json!({"rp": RP_1}), "invalid_request", "to"),
        (
            json!({"rp": RP_1, "to": "/srv", "format": "raw"}),
            "invalid_request",
            "format",
        ),
    ];
    for (body, code, word) in cases {
        let answer = call(&app, "POST", &uri, Some(&body.to_string())).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, code, &[word]);
    }
    let body = json!({"rp": RP_1, "to": "/srv"}).to_string();
    let answer = call(
        &app,
        "POST",
        &format!("/v1/vms/{VM_UNKNOWN}/restore"),
        Some(&body),
    )
    .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "unknown_vm", &[VM_UNKNOWN]);
    assert_eq!(fake.submitted().len(), 2);
}

#[tokio::test]
async fn recover_throttle_work_hours_in_a_named_zone() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let uri = format!("/v1/vms/{VM_DB}/recover");
    let throttle = |extra: serde_json::Value| {
        let mut throttle = json!({"work_bytes_per_sec": 1048576});
        for (key, value) in extra.as_object().unwrap() {
            throttle[key] = value.clone();
        }
        json!({"rp": RP_1, "target": "original", "throttle": throttle}).to_string()
    };
    // (throttle fields, the zone carried, the fixed offset written into the throttle)
    let accepted = [
        (
            json!({"timezone": "america/santiago"}),
            Some("America/Santiago"),
        ),
        // Without a zone or offset: the orchestrator's (the fake's Europe/Paris).
        (json!({}), Some("Europe/Paris")),
        // A fixed offset as a zone is the old form.
        (json!({"timezone": "+05:30"}), None),
        (json!({"utc_offset_minutes": 60}), None),
    ];
    for (fields, zone) in &accepted {
        let (status, body) = call(&app, "POST", &uri, Some(&throttle(fields.clone()))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{fields}: {body}");
        let (_, command) = fake.submitted().last().cloned().unwrap();
        match (&command, zone) {
            (
                Command::RequestRecoveryInZone {
                    timezone, options, ..
                },
                Some(zone),
            ) => {
                assert_eq!(timezone, zone, "{fields}");
                let offset = options.throttle.as_ref().unwrap().utc_offset_minutes;
                let expected = crate::policy::tz::TimeZone::parse(zone)
                    .unwrap()
                    .offset_at(1_800_000_000_000);
                assert_eq!(i32::from(offset), expected, "{fields}");
            }
            (Command::RequestRecovery { options, .. }, None) => {
                let offset = options.throttle.as_ref().unwrap().utc_offset_minutes;
                assert!(offset == 330 || offset == 60, "{fields}: {offset}");
            }
            (other, _) => panic!("{fields}: unexpected {other:?}"),
        }
    }
    let n_submitted = fake.submitted().len();
    for (fields, says) in [
        (
            json!({"timezone": "Mars/Olympus"}),
            "\"Mars/Olympus\" is not understood",
        ),
        (json!({"timezone": "Europe/Pariss"}), "\"Europe/Pariss\""),
        (
            json!({"timezone": "UTC", "utc_offset_minutes": 60}),
            "not both",
        ),
    ] {
        let (status, body) = call(&app, "POST", &uri, Some(&throttle(fields.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{fields}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{fields}: {body}");
    }
    assert_eq!(fake.submitted().len(), n_submitted, "nothing submitted");
}

#[tokio::test]
async fn recover_to_each_target_with_options() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let uri = format!("/v1/vms/{VM_DB}/recover");
    let bodies = [
        json!({"rp": RP_1, "target": "original",
               "throttle": {"work_bytes_per_sec": 1048576, "off_bytes_per_sec": 0,
                            "work_hours": "07:30-19:00", "work_days": "mon-sat",
                            "utc_offset_minutes": -300},
               "notify_email": ["ops@example.com"], "webhooks": ["https://h:81/x"]}),
        json!({"rp": RP_1, "target": "host", "node": "kvm-09", "path": "/dr", "format": "vhdx",
               "name": "db-dr"}),
        json!({"rp": RP_1, "target": "folder", "path": "/copies"}),
    ];
    for body in &bodies {
        let (status, accepted) = call(&app, "POST", &uri, Some(&body.to_string())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}: {accepted}");
    }
    let submitted = fake.submitted();
    let targets: Vec<(RecoveryTarget, cairn_schemas::RecoveryOptions)> = submitted
        .iter()
        .map(|(_, c)| match c {
            Command::RequestRecovery {
                target, options, ..
            } => (target.clone(), options.clone()),
            other => panic!("expected RequestRecovery, got {other:?}"),
        })
        .collect();
    assert_eq!(targets[0].0, RecoveryTarget::OriginalVm);
    let throttle = targets[0].1.throttle.clone().unwrap();
    assert_eq!(
        (
            throttle.work_bytes_per_sec,
            throttle.off_bytes_per_sec,
            throttle.work_start_minute,
            throttle.work_end_minute,
            throttle.work_days,
            throttle.utc_offset_minutes
        ),
        (1 << 20, 0, 450, 1140, 0b011_1111, -300)
    );
    assert_eq!(targets[0].1.notify_email, vec!["ops@example.com"]);
    assert_eq!(
        targets[1].0,
        RecoveryTarget::AlternateHost {
            node: "kvm-09".parse().unwrap(),
            path: "/dr".into(),
            format: cairn_schemas::ImageFormat::Vhdx
        }
    );
    assert_eq!(targets[1].1.new_name.as_deref(), Some("db-dr"));
    // The folder's node defaults to the VM's.
    assert_eq!(
        targets[2].0,
        RecoveryTarget::CopyToFolder {
            node: "kvm-02".parse().unwrap(),
            path: "/copies".into()
        }
    );
    let cases = [
        (
            json!({"rp": RP_1, "target": "sideways"}),
            "invalid_request",
            "target",
        ),
        (
            json!({"rp": RP_1, "target": "host", "path": "/dr"}),
            "invalid_request",
            "node",
        ),
        (
            json!({"rp": RP_1, "target": "folder"}),
            "invalid_request",
            "path",
        ),
        (
            json!({"rp": RP_1, "target": "folder", "path": "/a/../b"}),
            "invalid_path",
            "..",
        ),
        (
            json!({"rp": RP_1, "target": "original", "path": "/x"}),
            "invalid_request",
            "original",
        ),
        (
            json!({"rp": RP_1, "target": "folder", "path": "/x", "format": "raw"}),
            "invalid_request",
            "format",
        ),
        (
            json!({"rp": RP_1, "target": "original", "throttle": {"work_bytes_per_sec": 1}}),
            "invalid_request",
            "minimum",
        ),
        (
            json!({"rp": RP_1, "target": "original", "throttle": {"work_bytes_per_sec": 0, "work_hours": "9-5"}}),
            "invalid_request",
            "HH:MM",
        ),
        (
            json!({"rp": RP_1, "target": "original", "extra": 1}),
            "invalid_request",
            "extra",
        ),
    ];
    for (body, code, word) in cases {
        let answer = call(&app, "POST", &uri, Some(&body.to_string())).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, code, &[word]);
    }
    assert_eq!(fake.submitted().len(), 3);
}

#[tokio::test]
async fn cancel_a_job() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let uri = format!("/v1/jobs/{JOB_RUNNING}/cancel");
    let (status, accepted) = call(&app, "POST", &uri, Some(r#"{"reason": "window over"}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(accepted["id"], JOB_RUNNING);
    let (status, _) = call(&app, "POST", &uri, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let submitted = fake.submitted();
    let reasons: Vec<&str> = submitted
        .iter()
        .map(|(_, command)| match command {
            Command::CancelJob { reason, .. } => reason.as_str(),
            other => panic!("expected CancelJob, got {other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "window over",
            &format!("cancelled by admin-token (token {TOKEN_1})")
        ]
    );

    let answer = call(&app, "POST", &format!("/v1/jobs/{JOB_DONE}/cancel"), None).await;
    assert_error(&answer, StatusCode::CONFLICT, "job_finished", &[JOB_DONE]);
    let answer = call(
        &app,
        "POST",
        &format!("/v1/jobs/{JOB_UNKNOWN}/cancel"),
        None,
    )
    .await;
    assert_error(
        &answer,
        StatusCode::NOT_FOUND,
        "unknown_job",
        &[JOB_UNKNOWN],
    );
    let long = json!({"reason": "x".repeat(1025)}).to_string();
    let answer = call(&app, "POST", &uri, Some(&long)).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["reason"],
    );
}

#[tokio::test]
async fn the_actor_is_the_token_and_no_header_names_another() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let mut request = request_as(
        Some(Role::Operator),
        "POST",
        &format!("/v1/vms/{VM_WEB}/backup"),
        None,
    );
    request
        .headers_mut()
        .insert("x-cairn-actor", "user:mallory".parse().unwrap());
    let (status, _) = send(&app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        fake.submitted()[0].0,
        format!("operator-token (token {TOKEN_1})")
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let answer = call(&app, "GET", "/v1/volcanoes", None).await;
    assert_error(
        &answer,
        StatusCode::NOT_FOUND,
        "not_found",
        &["/v1/volcanoes"],
    );
    let answer = call(&app, "GET", "/v2/vms", None).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "not_found", &["GET"]);
    let answer = call(&app, "DELETE", "/v1/vms", None).await;
    assert_error(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &["DELETE"],
    );
    let answer = call(&app, "GET", &format!("/v1/vms/{VM_WEB}/backup"), None).await;
    assert_error(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &["GET"],
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let name = "n".repeat(1 << 20);
    let body = json!({ "name": name }).to_string();
    assert!(body.len() > 1 << 20);
    let answer = call(&app, "POST", "/v1/groups", Some(&body)).await;
    assert_error(
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["1048576"],
    );
    // Also when the body's length is announced up front.
    let announced = authed()
        .method("POST")
        .uri("/v1/groups")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let answer = send(&app, announced).await;
    assert_error(
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &[],
    );
    assert!(fake.submitted().is_empty());
}

#[tokio::test]
async fn internal_errors_keep_their_details_to_the_log() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    *fake.submit_error.lock().unwrap() = Some(ControlError::Internal(
        "sled: /var/lib/cairn/db is corrupt".into(),
    ));
    let answer = call(&app, "POST", &format!("/v1/vms/{VM_WEB}/backup"), None).await;
    assert_error(
        &answer,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        &["log"],
    );
    assert!(!answer.1.to_string().contains("sled"), "{}", answer.1);
    *fake.submit_error.lock().unwrap() = Some(ControlError::Unavailable("starting".into()));
    let answer = call(&app, "POST", &format!("/v1/vms/{VM_WEB}/backup"), None).await;
    assert_error(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &["starting"],
    );
}

#[tokio::test]
async fn health_openapi_and_audit() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let (status, health) = call(&app, "GET", "/healthz", None).await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let response = app
        .clone()
        .oneshot(request("GET", "/openapi.yaml", None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/yaml");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, OPENAPI_YAML.as_bytes());
    let (status, report) = call(&app, "GET", "/v1/audit/verify", None).await;
    assert_eq!(status, StatusCode::OK);
    let report: AuditReport = serde_json::from_value(report).unwrap();
    assert_eq!(report, fake.audit);
}

#[tokio::test]
async fn events_page_from_a_sequence_number() {
    let fake = Arc::new(Fake::new());
    for seq in 1..=5 {
        fake.push_event(event(seq));
    }
    let app = app(&fake);
    let (status, page) = call(&app, "GET", "/v1/events?from=2&limit=2", None).await;
    assert_eq!(status, StatusCode::OK);
    let page: wire::EventsPage = serde_json::from_value(page).unwrap();
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!((seqs, page.next_from), (vec![2, 3], 4));
    let (_, page) = call(&app, "GET", "/v1/events", None).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_from"], 6);
    // Nothing new and no wait: an empty page that points at the same place.
    let (_, page) = call(&app, "GET", "/v1/events?from=6", None).await;
    assert_eq!(page, json!({"events": [], "next_from": 6}));
    let answer = call(&app, "GET", "/v1/events?limit=1001", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["limit", "1000"],
    );
    let answer = call(&app, "GET", "/v1/events?from=-1", None).await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &["from"],
    );
}

#[tokio::test(start_paused = true)]
async fn long_poll_returns_when_an_event_appears() {
    let fake = Arc::new(Fake::new());
    fake.push_event(event(1));
    let app = app(&fake);
    let started = tokio::time::Instant::now();
    let poll = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "GET", "/v1/events?from=2&wait_ms=30000", None).await }
    });
    // The poll is parked in `wait_for_events`; nothing else can run, so time stands still.
    fake.waiting.notified().await;
    fake.push_event(event(2));
    let (status, page) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["events"][0]["seq"], 2);
    assert_eq!(page["next_from"], 3);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn long_poll_gives_up_after_its_wait() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let started = tokio::time::Instant::now();
    let (status, page) = call(&app, "GET", "/v1/events?from=1&wait_ms=1500", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page, json!({"events": [], "next_from": 1}));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    // A longer wait than allowed is cut to the configured maximum.
    let app = app_with(
        &fake,
        ApiConfig {
            max_wait_ms: 2000,
            ..ApiConfig::default()
        },
    );
    let started = tokio::time::Instant::now();
    let (_, page) = call(&app, "GET", "/v1/events?from=1&wait_ms=999999", None).await;
    assert_eq!(page["events"], json!([]));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2000) && waited < Duration::from_millis(3000),
        "{waited:?}"
    );
}

/// The `paths:` of the OpenAPI description with their methods, by a line scan: a path is a
/// line `  /...:` and a method a line `    get:` below it.
fn openapi_routes() -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in OPENAPI_YAML.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line == "paths:";
            path = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(rest) = line.strip_prefix("  /") {
            path = Some(format!("/{}", rest.trim_end().trim_end_matches(':')));
        } else if let (Some(p), Some(rest)) = (&path, line.strip_prefix("    ")) {
            let word = rest.trim_end().trim_end_matches(':');
            if !rest.starts_with(' ') && ["get", "post", "put", "patch", "delete"].contains(&word) {
                routes.push((word.to_owned(), p.clone()));
            }
        }
    }
    routes
}

#[test]
fn openapi_describes_every_route_and_no_other() {
    let mut described = openapi_routes();
    let mut served: Vec<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(served, described);
    assert!(served.len() >= 14, "{served:?}");
}

/// One HTTP/1.1 request over a fresh TCP connection; returns the status and the body.
async fn raw_http(addr: std::net::SocketAddr, head: &str, body: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        secret(Role::Admin),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn serves_over_tcp_and_shuts_down() {
    let fake = Arc::new(Fake::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, fake.clone(), async move {
        let _ = stopped.await;
    }));

    let (status, vms) = raw_http(addr, "GET /v1/vms HTTP/1.1", "").await;
    assert_eq!(status, 200);
    assert_eq!(vms[1]["name"], "db-01");
    let body = json!({"name": "lab", "vms": [VM_WEB, VM_DB], "sync": "30m"}).to_string();
    let (status, accepted) = raw_http(addr, "POST /v1/groups HTTP/1.1", &body).await;
    assert_eq!(status, 201, "{accepted}");
    let (status, error) = raw_http(addr, "POST /v1/groups HTTP/1.1", "{oops").await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["code"], "invalid_request");
    assert_eq!(fake.submitted().len(), 1);

    // A long poll in flight does not hold the shutdown up for its whole wait.
    let poll = tokio::spawn(async move {
        raw_http(addr, "GET /v1/events?from=1&wait_ms=30000 HTTP/1.1", "").await
    });
    fake.waiting.notified().await;
    stop.send(()).unwrap();
    let (status, page) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll should end at shutdown")
        .unwrap();
    assert_eq!((status, page["events"].clone()), (200, json!([])));
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server should stop")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Who may call each route, written out here rather than derived, so that a route whose rule
/// changes, or a new route, fails this test until its row says what it should be. Letters:
/// `a` admin, `o` operator, `v` viewer, `p` app owner (over its scope).
const WHO_MAY: &[(&str, &str, &str)] = &[
    ("get", "/healthz", "aovp"),
    ("get", "/openapi.yaml", "aovp"),
    ("get", "/v1/vms", "aovp"),
    ("get", "/v1/vms/{vm}/recovery-points", "aovp"),
    ("post", "/v1/vms/{vm}/backup", "aop"),
    ("post", "/v1/vms/{vm}/restore", "aop"),
    ("post", "/v1/vms/{vm}/recover", "aop"),
    ("get", "/v1/groups", "aovp"),
    ("post", "/v1/groups", "ao"),
    ("get", "/v1/groups/{group}", "aovp"),
    ("post", "/v1/groups/{group}/policy", "ao"),
    ("get", "/v1/groups/{group}/plan", "aovp"),
    ("post", "/v1/vms/{vm}/check", "ao"),
    ("post", "/v1/vms/{vm}/verify", "ao"),
    ("post", "/v1/vms/{vm}/seed", "ao"),
    ("get", "/v1/vms/{vm}/calendar", "aovp"),
    ("get", "/v1/alerts", "aovp"),
    ("get", "/v1/nodes", "aovp"),
    ("get", "/v1/jobs", "aovp"),
    ("get", "/v1/jobs/{job}", "aovp"),
    ("post", "/v1/jobs/{job}/cancel", "aop"),
    ("get", "/v1/events", "aovp"),
    ("get", "/v1/audit/verify", "aov"),
    ("get", "/v1/vms/{vm}/browse", "aop"),
    ("post", "/v1/vms/{vm}/recover-items", "aop"),
    ("post", "/v1/vms/{vm}/recovery-points/delete", "ao"),
    ("post", "/v1/vms/{vm}/recovery-points/undelete", "ao"),
    ("post", "/v1/groups/{group}/delete", "ao"),
    ("post", "/v1/groups/{group}/members", "ao"),
    ("post", "/v1/groups/{group}/retention-lock", "ao"),
    ("post", "/v1/groups/{group}/soft-delete", "a"),
    ("get", "/v1/tokens", "a"),
    ("post", "/v1/tokens", "a"),
    ("post", "/v1/tokens/{token}/revoke", "a"),
];

fn role_letter(role: Role) -> char {
    match role {
        Role::Admin => 'a',
        Role::Operator => 'o',
        Role::Viewer => 'v',
        Role::AppOwner => 'p',
    }
}

/// A route's path with its parameter filled in: things inside the app owner's scope.
fn concrete(path: &str) -> String {
    path.replace("{vm}", VM_WEB)
        .replace("{group}", GROUP_WEB)
        .replace("{job}", JOB_RUNNING)
        .replace("{token}", TOKEN_1)
}

#[tokio::test]
async fn every_route_refuses_each_role_it_should_and_serves_the_others() {
    let served: Vec<(&str, &str)> = routes().iter().map(|r| (r.method, r.path)).collect();
    let listed: Vec<(&str, &str)> = WHO_MAY.iter().map(|(m, p, _)| (*m, *p)).collect();
    for route in &served {
        assert!(
            listed.contains(route),
            "route {route:?} has no row in WHO_MAY: say which roles may call it"
        );
    }
    for row in &listed {
        assert!(
            served.contains(row),
            "WHO_MAY lists {row:?}, which is no route"
        );
    }
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let mut accepted = 0;
    for route in routes() {
        let (_, _, who) = WHO_MAY
            .iter()
            .find(|(m, p, _)| (*m, *p) == (route.method, route.path))
            .unwrap();
        let uri = concrete(route.path);
        let method = route.method.to_ascii_uppercase();
        let body = (method == "POST").then_some("{}");
        for role in Role::ALL {
            let answer = send(&app, request_as(Some(role), &method, &uri, body)).await;
            let status = answer.0;
            if who.contains(role_letter(role)) {
                if status == StatusCode::ACCEPTED {
                    accepted += 1;
                }
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{role} should be let through {method} {uri}, got {status}: {}",
                    answer.1
                );
            } else {
                let Access::Needs(right, _) = route.access else {
                    panic!("{method} {uri} is open but {role} is not in its row");
                };
                assert_error(
                    &answer,
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &[right.as_str(), route.path],
                );
            }
        }
        // Without a token, only the open routes answer.
        let answer = send(&app, request_as(None, &method, &uri, body)).await;
        if route.access == Access::Open {
            assert_eq!(answer.0, StatusCode::OK, "{method} {uri}");
        } else {
            assert_error(
                &answer,
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                &["Bearer"],
            );
        }
    }
    // Refusals change nothing: only the calls that were let through and accepted submitted a
    // command (backup, check, verify and cancel take `{}`), and none of a refused role.
    let submitted = fake.submitted();
    assert_eq!(submitted.len(), accepted, "{submitted:?}");
    assert!(
        submitted
            .iter()
            .all(|(actor, _)| !actor.starts_with("viewer")),
        "{submitted:?}"
    );
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_say_why() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let with_header = |value: &str| {
        Request::builder()
            .uri("/v1/vms")
            .header("authorization", value)
            .body(Body::empty())
            .unwrap()
    };
    let unknown = crate::auth::secret_from(&[0x77; 32]);
    for (header, words) in [
        ("Basic YWRtaW46YWRtaW4=", &["Basic", "not Bearer"][..]),
        ("Bearer", &["not Bearer <token>"][..]),
        ("Bearer hunter2", &["not a cairn token"][..]),
        (&format!("Bearer {unknown}") as &str, &["not known"][..]),
    ] {
        let answer = send(&app, with_header(header)).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "unauthenticated", words);
    }
    // The scheme is case-insensitive (RFC 7235); the secret is exact to its last digit.
    let lower = send(
        &app,
        with_header(&format!("bearer {}", secret(Role::Viewer))),
    )
    .await;
    assert_eq!(lower.0, StatusCode::OK);
    let mut near = secret(Role::Viewer);
    near.pop();
    near.push('4');
    let answer = send(&app, with_header(&format!("Bearer {near}"))).await;
    assert_eq!(answer.0, StatusCode::UNAUTHORIZED);
    // /healthz needs none.
    let health = send(&app, request_as(None, "GET", "/healthz", None)).await;
    assert_eq!(health.0, StatusCode::OK);
}

#[tokio::test]
async fn an_app_owner_sees_only_its_scope_and_outside_it_things_do_not_exist() {
    let fake = Arc::new(Fake::new());
    for (seq, aggregate) in [
        (1, format!("vm/{VM_WEB}")),
        (2, format!("vm/{VM_DB}")),
        (3, format!("job/{JOB_RUNNING}")),
        (4, format!("job/{JOB_DONE}")),
        (5, format!("group/{GROUP_WEB}")),
        (6, format!("token/{TOKEN_1}")),
        (7, "node/kvm-02".to_string()),
    ] {
        fake.push_event(EventView {
            aggregate,
            ..event(seq)
        });
    }
    let app = app(&fake);
    let owner = |method: &str, uri: &str, body: Option<&str>| {
        request_as(Some(Role::AppOwner), method, uri, body)
    };
    let list = |answer: &(StatusCode, Value), field: &str| -> Vec<String> {
        assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
        answer
            .1
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[field].as_str().unwrap().to_owned())
            .collect()
    };
    let vms = send(&app, owner("GET", "/v1/vms", None)).await;
    assert_eq!(list(&vms, "vm"), [VM_WEB]);
    let jobs = send(&app, owner("GET", "/v1/jobs", None)).await;
    assert_eq!(list(&jobs, "job"), [JOB_RUNNING]);
    let groups = send(&app, owner("GET", "/v1/groups", None)).await;
    assert_eq!(list(&groups, "group"), [GROUP_WEB]);
    let nodes = send(&app, owner("GET", "/v1/nodes", None)).await;
    assert_eq!(list(&nodes, "node"), ["kvm-01"]);
    let page = send(&app, owner("GET", "/v1/events?from=1", None)).await;
    let shown: Vec<&str> = page.1["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["aggregate"].as_str().unwrap())
        .collect();
    assert_eq!(
        shown,
        [
            format!("vm/{VM_WEB}"),
            format!("job/{JOB_RUNNING}"),
            format!("group/{GROUP_WEB}")
        ]
    );
    // The reader moves past what it was not shown.
    assert_eq!(page.1["next_from"], 8);
    // An admin sees everything.
    let all = send(&app, request("GET", "/v1/vms", None)).await;
    assert_eq!(list(&all, "vm").len(), 2);

    // Outside the scope: 404 with the codes of things that do not exist.
    for (method, uri, code) in [
        (
            "GET",
            format!("/v1/vms/{VM_DB}/recovery-points"),
            "unknown_vm",
        ),
        ("POST", format!("/v1/vms/{VM_DB}/backup"), "unknown_vm"),
        ("GET", format!("/v1/vms/{VM_DB}/calendar"), "unknown_vm"),
        (
            "GET",
            format!("/v1/vms/{VM_DB}/browse?rp={RP_1}&path=/"),
            "unknown_vm",
        ),
        ("GET", format!("/v1/jobs/{JOB_DONE}"), "unknown_job"),
        ("POST", format!("/v1/jobs/{JOB_DONE}/cancel"), "unknown_job"),
        (
            "GET",
            "/v1/groups/0190f000-0000-7000-8000-0000000000ff".to_string(),
            "unknown_group",
        ),
    ] {
        let answer = send(&app, owner(method, &uri, None)).await;
        assert_error(&answer, StatusCode::NOT_FOUND, code, &[]);
    }
    // Inside it, it may back up.
    let backup = send(
        &app,
        owner("POST", &format!("/v1/vms/{VM_WEB}/backup"), None),
    )
    .await;
    assert_eq!(backup.0, StatusCode::ACCEPTED, "{}", backup.1);
    assert_eq!(fake.submitted().len(), 1);
}

#[tokio::test]
async fn an_app_owner_recovers_only_to_the_original_vm_or_below_its_nodes_owner_roots() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let owner = |uri: &str, body: Value| {
        request_as(Some(Role::AppOwner), "POST", uri, Some(&body.to_string()))
    };
    let restore = format!("/v1/vms/{VM_WEB}/restore");
    let recover = format!("/v1/vms/{VM_WEB}/recover");
    let items = format!("/v1/vms/{VM_WEB}/recover-items");
    let allowed = [
        owner(&restore, json!({"rp": RP_1, "to": "/srv/owners/web"})),
        owner(&recover, json!({"rp": RP_1, "target": "original"})),
        owner(
            &recover,
            json!({"rp": RP_1, "target": "folder", "path": "/srv/owners/copy"}),
        ),
        owner(
            &items,
            json!({"rp": RP_1, "items": ["/p1/etc/hosts"], "to": "/srv/owners/items"}),
        ),
    ];
    for request in allowed {
        let answer = send(&app, request).await;
        assert_eq!(answer.0, StatusCode::ACCEPTED, "{}", answer.1);
    }
    let refused = [
        (
            owner(&restore, json!({"rp": RP_1, "to": "/srv/ownersX"})),
            "/srv/owners",
        ),
        (
            owner(&restore, json!({"rp": RP_1, "to": "/etc/cron.d"})),
            "app-owner roots",
        ),
        (
            owner(
                &restore,
                json!({"rp": RP_1, "to": "/srv/owners/web", "node": "kvm-02"}),
            ),
            "it has none",
        ),
        (
            owner(
                &recover,
                json!({"rp": RP_1, "target": "host", "node": "kvm-01", "path": "/srv/owners/dr"}),
            ),
            "another host",
        ),
        (
            owner(
                &items,
                json!({"rp": RP_1, "items": ["/p1/etc/shadow"], "to": "/root"}),
            ),
            "/root",
        ),
    ];
    for (request, word) in refused {
        let answer = send(&app, request).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "forbidden", &[word]);
    }
    assert_eq!(fake.submitted().len(), 4);
    // An operator is not limited to the owners' roots.
    let answer = send(
        &app,
        request(
            "POST",
            &restore,
            Some(&json!({"rp": RP_1, "to": "/srv/dr"}).to_string()),
        ),
    )
    .await;
    assert_eq!(answer.0, StatusCode::ACCEPTED, "{}", answer.1);
}

#[tokio::test]
async fn tokens_are_made_listed_and_revoked_by_admins() {
    let fake = Arc::new(Fake::new());
    let app = app(&fake);
    let body = json!({"name": "ci", "role": "operator", "expires_in_secs": 3600}).to_string();
    let made = call(&app, "POST", "/v1/tokens", Some(&body)).await;
    assert_eq!(made.0, StatusCode::CREATED, "{}", made.1);
    let secret_text = made.1["token"].as_str().unwrap();
    assert!(crate::auth::looks_like_secret(secret_text), "{secret_text}");
    assert_eq!(made.1["role"], "operator");
    let Command::CreateToken {
        secret_hash,
        expires_in_secs,
        ..
    } = &fake.submitted()[0].1
    else {
        panic!("{:?}", fake.submitted());
    };
    // Only the hash goes to the engine.
    assert_eq!(*secret_hash, crate::auth::secret_hash(secret_text));
    assert_eq!(*expires_in_secs, Some(3600));
    let listed = call(&app, "GET", "/v1/tokens", None).await;
    assert_eq!(listed.1[0]["name"], "ci");
    assert!(listed.1[0].get("token").is_none(), "no secret in lists");
    let id = made.1["id"].as_str().unwrap();
    let revoked = call(&app, "POST", &format!("/v1/tokens/{id}/revoke"), None).await;
    assert_eq!(revoked.0, StatusCode::OK, "{}", revoked.1);
    assert_eq!(revoked.1["live"], false);
    for (body, code, word) in [
        (
            json!({"name": "x", "role": "root"}),
            "invalid_request",
            "root",
        ),
        (
            json!({"name": "x", "role": "app-owner", "vms": ["web-01"]}),
            "invalid_id",
            "vms[0]",
        ),
        (
            json!({"name": "x", "role": "viewer", "secret": "mine"}),
            "invalid_request",
            "secret",
        ),
    ] {
        let answer = call(&app, "POST", "/v1/tokens", Some(&body.to_string())).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, code, &[word]);
    }
    let unknown = call(
        &app,
        "POST",
        "/v1/tokens/0191a000-0000-7000-8000-0000000000ff/revoke",
        None,
    )
    .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "unknown_token", &[]);
}

mod browser;
