//! The engine service: the one task that owns the projections, appends to the event log and
//! dispatches steps. Its main loop selects over commands, worker reports and a timer; every
//! side effect (dispatching a step) happens only after the event that decided it is durable.
//!
//! Shape: [`Engine::start`] replays the log (snapshot + tail) and returns the engine and a
//! cheap [`Handle`]; [`Engine::run`] runs until its shutdown future resolves, then writes a
//! snapshot. Callers talk to the engine through the handle only.

use crate::error_code::ErrorCode;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cairn_schemas::{
    Aggregate, BrowseRequest, Command, CommandId, Event, EventId, GroupId, JobEvent, JobId,
    JobKind, JobReason, NodeId, Report, VmId,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::decide::{Emit, decide, request_job};
use super::jobs::{
    EngineConfig, Liveness, on_report, reconcile, retry_superseded, tracking_events,
};
use super::ownership::Ownership;
use super::ports::{CommandRouter, StepSink};
use super::protect;
use super::state::State;
use super::{read, read_policy, snapshot};
use crate::clock::{Clock, random10};
use crate::control::{BoxFuture, Control, ControlError};
use crate::log::{AppendRequest, EventLog, NewEvent, StoredEvent, Tail};
use crate::notify::{self, Notifier, NotifyConfig};
use crate::policy::datasource;
use crate::views::{
    Accepted, AlertView, AuditReport, BrowseView, CalendarDayView, CapacityView, EventView,
    GroupDetailView, GroupView, JobView, NodeView, RpView, VmView,
};

/// Options of an engine instance.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub config: EngineConfig,
    /// Owner epoch: fences steps and reports of earlier instances.
    pub epoch: u64,
    /// Actor recorded on events the engine decides by itself.
    pub actor: String,
    /// Where to keep the projection snapshot; `None` = always replay the whole log.
    pub snapshot_path: Option<PathBuf>,
    /// Write a snapshot after this many new events.
    pub snapshot_every: u64,
    /// How often the reconciler and the scheduler run.
    pub tick: Duration,
    /// The partitions this instance acts on; `None` = every partition with `epoch` (the
    /// embedded server).
    pub ownership: Option<Arc<Ownership>>,
}

/// Errors that stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("replaying the event log failed: {0}")]
    Replay(#[from] crate::log::Error),
}

enum Input {
    Submit {
        actor: String,
        id: Option<CommandId>,
        command: Command,
        reply: oneshot::Sender<Result<Accepted, ControlError>>,
    },
    /// A report, the node whose subject it came on (`None`: an in-process worker), and who
    /// waits for its events to be durable.
    Report(Report, Option<NodeId>, Option<oneshot::Sender<bool>>),
    /// Nodes whose worker stopped heartbeating: (node, last heartbeat, Unix ms).
    NodesSilent(Vec<(NodeId, u64)>),
    /// A notification about a finished recovery was delivered or given up on.
    Notified {
        job: JobId,
        target: String,
        delivered: bool,
        detail: String,
    },
}

struct Shared<L> {
    log: L,
    state: RwLock<State>,
    clock: Arc<dyn Clock>,
    tx: mpsc::Sender<Input>,
    seq: watch::Sender<u64>,
    config: EngineConfig,
    /// The step seam, for queries to workers (browse); the engine owns dispatching.
    steps: Arc<dyn StepSink>,
    ownership: Arc<Ownership>,
    router: std::sync::OnceLock<Arc<dyn CommandRouter>>,
    /// Where `audit_verify` finds signed checkpoints (set once at start, when there is a sink).
    checkpoints: std::sync::OnceLock<crate::audit::CheckpointTrust>,
}

/// A cheap, cloneable handle to a running engine.
pub struct Handle<L> {
    shared: Arc<Shared<L>>,
}

impl<L> Clone for Handle<L> {
    fn clone(&self) -> Self {
        Handle {
            shared: self.shared.clone(),
        }
    }
}

/// The engine: owns the projections and the log's write side.
pub struct Engine<L> {
    shared: Arc<Shared<L>>,
    rx: mpsc::Receiver<Input>,
    steps: Arc<dyn StepSink>,
    opts: EngineOptions,
    live: Liveness,
    snapshot_seq: u64,
    /// Jobs requested by the engine itself, reconciled by the main loop.
    to_reconcile: Vec<JobId>,
    /// When retention next looks for recovery points to prune (clock time).
    next_retention_at: u64,
    notifier: Arc<Notifier>,
    /// Notifications being delivered by a task of this process: (job, target).
    notifying: BTreeSet<(JobId, String)>,
    /// The log from the last applied event on: every event is applied in log order, this
    /// instance's own appends and other instances' alike.
    tail: Tail,
    /// Events applied since the last snapshot.
    since_snapshot: u64,
}

/// Notifications of jobs that ended longer ago than this are not sent after a restart.
const NOTIFY_WITHIN_MS: u64 = 24 * 3600 * 1000;

impl<L: EventLog + 'static> Engine<L> {
    /// Rebuilds the projections from the snapshot (if usable) and the log after it.
    pub async fn start(
        log: L,
        opts: EngineOptions,
        clock: Arc<dyn Clock>,
        steps: Arc<dyn StepSink>,
    ) -> Result<(Engine<L>, Handle<L>), Error> {
        let started = std::time::Instant::now();
        let mut state = opts
            .snapshot_path
            .as_deref()
            .and_then(snapshot::load)
            .unwrap_or_default();
        let from_snapshot = state.last_seq;
        let last = log.last_seq().await?;
        if state.last_seq > last {
            tracing::warn!(
                snapshot = state.last_seq,
                log = last,
                "snapshot is ahead of the log; replaying the whole log"
            );
            state = State::default();
        }
        loop {
            let batch = log.read_from(state.last_seq + 1, 16_384).await?;
            if batch.is_empty() {
                break;
            }
            for stored in &batch {
                state.apply(stored);
            }
        }
        tracing::info!(
            events = state.last_seq,
            from_snapshot,
            ms = started.elapsed().as_millis() as u64,
            "projections rebuilt"
        );
        let (tx, rx) = mpsc::channel(1024);
        let (seq, _) = watch::channel(state.last_seq);
        let now = clock.now_ms();
        let snapshot_seq = state.last_seq;
        let tail = log.tail(state.last_seq + 1);
        let ownership = opts
            .ownership
            .clone()
            .unwrap_or_else(|| Arc::new(Ownership::all(opts.config.partitions, opts.epoch, now)));
        let shared = Arc::new(Shared {
            log,
            state: RwLock::new(state),
            clock,
            tx,
            seq,
            config: opts.config.clone(),
            steps: steps.clone(),
            ownership,
            router: std::sync::OnceLock::new(),
            checkpoints: std::sync::OnceLock::new(),
        });
        let engine = Engine {
            shared: shared.clone(),
            rx,
            steps,
            opts,
            live: Liveness {
                last_report: Default::default(),
                started_at: now,
                last_refused: Default::default(),
            },
            snapshot_seq,
            to_reconcile: Vec::new(),
            next_retention_at: 0,
            notifier: Arc::new(Notifier::new(NotifyConfig::new(
                None,
                "cairn@localhost".into(),
            ))),
            notifying: BTreeSet::new(),
            tail,
            since_snapshot: 0,
        };
        Ok((engine, Handle { shared }))
    }

    /// Replaces the notifier (SMTP server, sender) of recovery notifications.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = Arc::new(notifier);
        self
    }

    /// Runs until `shutdown` resolves; then writes a snapshot.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        let mut tick = tokio::time::interval(self.opts.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                input = self.rx.recv() => match input {
                    Some(Input::Submit { actor, id, command, reply }) => {
                        let result = self.submit(&actor, id, command).await;
                        let _ = reply.send(result);
                    }
                    Some(Input::Report(report, sender, done)) => {
                        let appended = self.report(report, sender).await;
                        if let Some(done) = done {
                            let _ = done.send(appended);
                        }
                    }
                    Some(Input::NodesSilent(nodes)) => self.nodes_silent(nodes).await,
                    Some(Input::Notified { job, target, delivered, detail }) => {
                        self.notified(job, target, delivered, detail).await;
                    }
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
                next = self.tail.next() => match next {
                    Some(Ok(stored)) => self.apply_foreign(stored),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "reading the event log failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None => break,
                },
            }
            while let Some(job) = self.to_reconcile.pop() {
                self.reconcile_job(job).await;
            }
            self.maybe_snapshot(false).await;
        }
        self.maybe_snapshot(true).await;
    }

    fn now(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Decides and commits a command of a partition this instance owns. A version conflict
    /// (another instance wrote one of the aggregates since this one read it) catches up with
    /// the log and decides again, a few times.
    ///
    /// With an `id` the command is idempotent: if an append carrying that id was made before
    /// (by this instance or any other, at any time the log remembers), the first answer is
    /// returned, marked as replayed, and nothing is decided or appended. The id goes on the
    /// command's first append; the log refuses to store it twice.
    async fn submit(
        &mut self,
        actor: &str,
        id: Option<CommandId>,
        command: Command,
    ) -> Result<Accepted, ControlError> {
        let partition = {
            let state = self.shared.state.read().expect("state lock");
            command_partition(&state, &command, self.shared.config.partitions)
        };
        if self.shared.ownership.get(partition).is_none() {
            return Err(ControlError::Unavailable(format!(
                "partition {partition} is not owned by this orchestrator"
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(id) = id {
                match self.shared.log.processed(id).await {
                    Ok(Some(earlier)) => return Ok(replayed_answer(&command, &earlier)),
                    Ok(None) => {}
                    Err(e) => return Err(ControlError::Internal(e.to_string())),
                }
            }
            match self.submit_once(actor, id, &command).await {
                Err(e) if is_version_conflict(&e) && attempt < 4 => {
                    tracing::debug!(attempt, error = %e, "version conflict; catching up");
                    self.catch_up_to_log().await;
                }
                result => return result,
            }
        }
    }

    async fn submit_once(
        &mut self,
        actor: &str,
        command_id: Option<CommandId>,
        command: &Command,
    ) -> Result<Accepted, ControlError> {
        let now = self.now();
        let emits = {
            let state = self.shared.state.read().expect("state lock");
            decide(&state, command, now)?
        };
        let id = created_id(command);
        let mut jobs = BTreeSet::new();
        for (idx, emit) in emits.into_iter().enumerate() {
            if let Aggregate::Job(job) = emit.aggregate {
                jobs.insert(job);
            }
            let tagged = if idx == 0 { command_id } else { None };
            if let Some(earlier) = self.commit(emit, actor, tagged).await?.earlier {
                // The log had the command already (it raced past the check above, e.g. a
                // crash between the append and its index entry): the first answer stands.
                return Ok(replayed_answer(command, &earlier));
            }
        }
        for job in jobs {
            self.reconcile_job(job).await;
        }
        Ok(Accepted {
            id,
            seq: *self.shared.seq.borrow(),
            replayed: false,
        })
    }

    /// Turns a worker's report into events; false when they could not be appended (the
    /// report should be delivered again).
    async fn report(&mut self, report: Report, sender: Option<NodeId>) -> bool {
        let now = self.now();
        let refused = {
            let state = self.shared.state.read().expect("state lock");
            super::jobs::refused_report(&state, &report, sender.as_ref())
        };
        if let Some(command) = refused {
            self.refuse_report(&report, command, now).await;
            // Done with: acknowledged, never applied.
            return true;
        }
        self.live
            .last_report
            .insert((report.step, report.attempt), now);
        let (events, vm_events) = {
            let state = self.shared.state.read().expect("state lock");
            let vm = state.jobs.get(&report.job).map(|j| j.vm);
            (
                {
                    let events = on_report(&state, &self.shared.config, &report, now);
                    match self.shared.ownership.get(report.partition) {
                        Some(owned) => retry_superseded(
                            events,
                            &report,
                            owned.epoch,
                            self.shared.config.max_attempts,
                            now,
                        ),
                        None => events,
                    }
                },
                vm.map(|vm| (vm, tracking_events(&state, &report))),
            )
        };
        if let Some((vm, vm_events)) = vm_events
            && !vm_events.is_empty()
        {
            let emit = Emit::new(
                Aggregate::Vm(vm),
                vm_events.into_iter().map(Event::from).collect(),
            );
            if let Err(e) = self
                .commit(emit, &format!("node:{}", report.node), None)
                .await
            {
                tracing::error!(job = %report.job, error = %e, "could not record lost change tracking");
            }
        }
        if !events.is_empty() {
            let emit = Emit::new(
                Aggregate::Job(report.job),
                events.iter().cloned().map(Event::from).collect(),
            );
            if let Err(e) = self
                .commit(emit, &format!("node:{}", report.node), None)
                .await
            {
                tracing::error!(job = %report.job, error = %e, "could not record a worker report");
                return false;
            }
            self.follow_up(report.job, &events).await;
        }
        self.reconcile_job(report.job).await;
        true
    }

    /// Logs a report refused as another node's and records it on the sending node (at most
    /// once per [`super::jobs::REFUSED_REPORT_EVERY_MS`] per node), decided here when this
    /// instance owns the node's partition, else forwarded to its owner on a task of its own.
    async fn refuse_report(&mut self, report: &Report, command: Command, now: u64) {
        let Command::RecordRefusedReport {
            node,
            dispatched_to,
            ..
        } = &command
        else {
            return;
        };
        tracing::error!(
            sender = %node,
            claimed = %report.node,
            dispatched_to = ?dispatched_to.as_ref().map(NodeId::as_str),
            job = %report.job,
            step = %report.step,
            "refused a report: node {node} reported for node {}",
            dispatched_to.as_ref().filter(|to| *to != node).unwrap_or(&report.node)
        );
        let last = self.live.last_refused.get(node).copied();
        if last.is_some_and(|at| now.saturating_sub(at) < super::jobs::REFUSED_REPORT_EVERY_MS) {
            return;
        }
        self.live.last_refused.insert(node.clone(), now);
        let actor = format!("{}/reports", self.opts.actor);
        let partition =
            cairn_schemas::subjects::partition_of_node(node, self.shared.config.partitions);
        if self.shared.ownership.get(partition).is_some() {
            if let Err(e) = self.submit(&actor, None, command).await {
                tracing::warn!(error = %e, "could not record a refused report");
            }
        } else if let Some(router) = self.shared.router.get().cloned() {
            tokio::spawn(async move {
                if let Err(e) = router.forward(partition, actor, None, command).await {
                    tracing::warn!(error = %e, "could not record a refused report");
                }
            });
        }
    }

    /// Records that nodes of owned partitions stopped heartbeating; their jobs then wait with
    /// `NodeOffline` until the worker registers again.
    async fn nodes_silent(&mut self, nodes: Vec<(NodeId, u64)>) {
        for (node, last_seen) in nodes {
            let partition =
                cairn_schemas::subjects::partition_of_node(&node, self.shared.config.partitions);
            let online = {
                let state = self.shared.state.read().expect("state lock");
                state.nodes.get(&node).is_some_and(|n| n.online)
            };
            if !online || self.shared.ownership.get(partition).is_none() {
                continue;
            }
            tracing::warn!(node = %node, last_seen, "worker stopped heartbeating; node offline");
            let emit = Emit::new(
                Aggregate::Node(node.clone()),
                vec![cairn_schemas::NodeEvent::NodeHeartbeatLost { last_seen }.into()],
            );
            let actor = format!("{}/liveness", self.opts.actor);
            if let Err(e) = self.commit(emit, &actor, None).await {
                tracing::warn!(node = %node, error = %e, "could not record a silent node");
            }
        }
    }

    /// Whether this instance owns the job's partition now, with the owner details.
    fn owns_job(&self, job: JobId) -> Option<super::ownership::Owned> {
        let partition = {
            let state = self.shared.state.read().expect("state lock");
            state.partition_of(&Aggregate::Job(job), &[], self.shared.config.partitions)
        };
        self.shared.ownership.get(partition)
    }

    /// Applies one event read from the log's tail, in order.
    fn apply_stored(&mut self, stored: &StoredEvent) {
        let applied = {
            let mut state = self.shared.state.write().expect("state lock");
            let before = state.last_seq;
            state.apply(stored);
            state.last_seq > before
        };
        if !applied {
            return;
        }
        self.since_snapshot += 1;
        let last = stored.seq;
        self.shared.seq.send_if_modified(|seq| {
            let newer = last > *seq;
            if newer {
                *seq = last;
            }
            newer
        });
    }

    /// Applies an event another instance (or an earlier append of this one) wrote; a job of
    /// an owned partition that moved is reconciled.
    fn apply_foreign(&mut self, stored: StoredEvent) {
        self.apply_stored(&stored);
        if let Aggregate::Job(job) = stored.envelope.aggregate
            && self.owns_job(job).is_some()
            && !self.to_reconcile.contains(&job)
        {
            self.to_reconcile.push(job);
        }
    }

    /// Applies the tail until the projections include event `until`.
    async fn catch_up(&mut self, until: u64, own: Option<(u64, u64)>) {
        while self.shared.state.read().expect("state lock").last_seq < until {
            match tokio::time::timeout(Duration::from_secs(30), self.tail.next()).await {
                Ok(Some(Ok(stored))) => {
                    if own.is_some_and(|(first, last)| (first..=last).contains(&stored.seq)) {
                        self.apply_stored(&stored);
                    } else {
                        self.apply_foreign(stored);
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::error!(error = %e, until, "catching up with the event log failed");
                    return;
                }
                Ok(None) => return,
                Err(_) => {
                    tracing::error!(until, "the event log's tail did not deliver within 30 s");
                    return;
                }
            }
        }
    }

    /// Catches up with everything durable in the log now.
    async fn catch_up_to_log(&mut self) {
        match self.shared.log.last_seq().await {
            Ok(last) => self.catch_up(last, None).await,
            Err(e) => tracing::warn!(error = %e, "could not read the log's last sequence"),
        }
    }

    async fn notified(&mut self, job: JobId, target: String, delivered: bool, detail: String) {
        self.notifying.remove(&(job, target.clone()));
        let detail: String = detail.chars().take(1000).collect();
        let emit = Emit::new(
            Aggregate::Job(job),
            vec![
                JobEvent::NotificationSent {
                    target,
                    delivered,
                    detail,
                }
                .into(),
            ],
        );
        let actor = format!("{}/notifier", self.opts.actor);
        if let Err(e) = self.commit(emit, &actor, None).await {
            tracing::error!(job = %job, error = %e, "could not record a notification");
        }
    }

    /// Starts delivering the notifications of recoveries that ended (durably) and whose
    /// targets have no outcome in the log yet, each on a task of its own.
    fn send_notifications(&mut self) {
        let now = self.now();
        let due: Vec<(JobId, String, notify::Notice)> = {
            let state = self.shared.state.read().expect("state lock");
            let mut due = Vec::new();
            for (id, recovery) in &state.recoveries {
                let Some(job) = state.jobs.get(id) else {
                    continue;
                };
                let partition =
                    state.partition_of(&Aggregate::Job(*id), &[], self.shared.config.partitions);
                if self.shared.ownership.get(partition).is_none() {
                    continue;
                }
                if !job.state.is_terminal()
                    || job
                        .finished_at
                        .is_none_or(|t| now.saturating_sub(t) > NOTIFY_WITHIN_MS)
                {
                    continue;
                }
                let pending = recovery.pending();
                if pending.is_empty() {
                    continue;
                }
                let notice = notify::notice(&state, job);
                for target in pending {
                    if !self.notifying.contains(&(*id, target.clone())) {
                        due.push((*id, target, notice.clone()));
                    }
                }
            }
            due
        };
        for (job, target, notice) in due {
            self.notifying.insert((job, target.clone()));
            let notifier = self.notifier.clone();
            let tx = self.shared.tx.clone();
            tokio::spawn(async move {
                let (delivered, detail) = notifier.deliver(&target, &notice).await;
                let _ = tx
                    .send(Input::Notified {
                        job,
                        target,
                        delivered,
                        detail,
                    })
                    .await;
            });
        }
    }

    async fn tick(&mut self) {
        self.send_notifications();
        self.schedule_runs().await;
        let open: Vec<JobId> = {
            let state = self.shared.state.read().expect("state lock");
            let n = self.shared.config.partitions;
            state
                .jobs
                .values()
                .filter(|j| {
                    !j.state.is_terminal()
                        && self
                            .shared
                            .ownership
                            .get(cairn_schemas::subjects::partition_of_vm(&j.vm, n))
                            .is_some()
                })
                .map(|j| j.id)
                .collect()
        };
        for job in open {
            self.reconcile_job(job).await;
        }
        // Forget liveness of steps that are no longer in flight.
        let state = self.shared.state.read().expect("state lock");
        self.live.last_report.retain(|(step, attempt), _| {
            state.jobs.values().any(|j| {
                j.steps
                    .iter()
                    .any(|s| s.id == *step && s.attempt == *attempt && s.status.in_flight())
            })
        });
    }

    /// Requests what protection groups' policies make due: scheduled synchronizations,
    /// express fulls, initial replications and consistency checks (the pure scheduler in
    /// `policy::schedule` decides, per VM), and, every `retention_every_ms`, prune jobs for VMs
    /// with recovery points past retention.
    async fn schedule_runs(&mut self) {
        let now = self.now();
        let tz = self.shared.config.timezone.clone();
        let retention_due = now >= self.next_retention_at
            || self.next_retention_at > now + self.shared.config.retention_every_ms;
        if retention_due {
            self.next_retention_at = now + self.shared.config.retention_every_ms;
        }
        let requests: Vec<(VmId, JobKind, JobReason)> = {
            let state = self.shared.state.read().expect("state lock");
            let mut out = protect::due_runs(&state, &tz, now);
            if retention_due {
                out.extend(
                    protect::prune_candidates(&state, now)
                        .into_iter()
                        .map(|vm| (vm, JobKind::Prune, JobReason::Scheduled)),
                );
            }
            out
        };
        let n = self.shared.config.partitions;
        for (vm, kind, reason) in requests {
            let partition = cairn_schemas::subjects::partition_of_vm(&vm, n);
            if self.shared.ownership.get(partition).is_some() {
                self.request(vm, kind, reason).await;
            }
        }
    }

    /// Requests a job the engine decided on by itself; it is reconciled by the main loop.
    async fn request(&mut self, vm: VmId, kind: JobKind, reason: JobReason) {
        let now = self.now();
        let job = JobId::new_v7(now, random10());
        let emit = {
            let state = self.shared.state.read().expect("state lock");
            request_job(&state, job, vm, kind, reason)
        };
        match emit {
            Ok(emit) => {
                let actor = format!("{}/scheduler", self.opts.actor);
                if self.commit(emit, &actor, None).await.is_ok() {
                    self.to_reconcile.push(job);
                }
            }
            Err(e) => tracing::debug!(vm = %vm, error = %e, "job not requested"),
        }
    }

    /// What must follow a job's events: data source state changes, the mandatory check after
    /// a seed import, gc after a prune.
    async fn follow_up(&mut self, job: JobId, events: &[JobEvent]) {
        let follow = {
            let state = self.shared.state.read().expect("state lock");
            datasource::after_job_events(&state, job, events)
        };
        if let Some(emit) = follow.emit {
            let actor = self.opts.actor.clone();
            if let Err(e) = self.commit(emit, &actor, None).await {
                tracing::error!(job = %job, error = %e, "could not record a data source state change");
            }
        }
        if let Some(vm) = follow.check {
            self.request(
                vm,
                JobKind::ConsistencyCheck,
                JobReason::ReplicaInconsistent,
            )
            .await;
        }
        if let Some(vm) = follow.gc {
            self.request(vm, JobKind::GarbageCollect, JobReason::Scheduled)
                .await;
        }
    }

    /// Runs the reconciler on one job until it has nothing more to say.
    async fn reconcile_job(&mut self, job: JobId) {
        for _ in 0..16 {
            let Some(owned) = self.owns_job(job) else {
                return;
            };
            self.live.started_at = owned.since_ms;
            let now = self.now();
            let events = {
                let state = self.shared.state.read().expect("state lock");
                let Some(found) = state.jobs.get(&job) else {
                    return;
                };
                reconcile(
                    &state,
                    &self.shared.config,
                    owned.epoch,
                    found,
                    &self.live,
                    now,
                )
            };
            if events.is_empty() {
                return;
            }
            let actor = self.opts.actor.clone();
            let emit = Emit::new(
                Aggregate::Job(job),
                events.iter().cloned().map(Event::from).collect(),
            );
            if let Err(e) = self.commit(emit, &actor, None).await {
                tracing::error!(job = %job, error = %e, "could not advance a job");
                return;
            }
            self.follow_up(job, &events).await;
        }
        tracing::warn!(job = %job, "job reconciler did not settle after 16 rounds");
    }

    /// Appends one aggregate's events, applies them, then dispatches the steps they decided.
    /// When the log already had `command`, nothing is appended and the earlier events come
    /// back in [`Committed::earlier`].
    async fn commit(
        &mut self,
        emit: Emit,
        actor: &str,
        command: Option<CommandId>,
    ) -> Result<Committed, ControlError> {
        let now = self.now();
        let correlation = match &emit.aggregate {
            Aggregate::Job(job) => Some(*job),
            _ => None,
        };
        let (expected, partition) = {
            let state = self.shared.state.read().expect("state lock");
            (
                state.version(&emit.aggregate),
                state.partition_of(&emit.aggregate, &emit.events, self.shared.config.partitions),
            )
        };
        let events: Vec<NewEvent> = emit
            .events
            .into_iter()
            .map(|payload| NewEvent {
                event_id: EventId::new_v7(now, random10()),
                actor: actor.to_string(),
                correlation,
                causation: None,
                traceparent: None,
                payload,
            })
            .collect();
        let first_event = events.first().map(|e| e.event_id);
        let request = AppendRequest {
            aggregate: emit.aggregate,
            partition,
            expected_version: expected,
            command,
            recorded_at: now,
            events,
        };
        // Fencing: a job's events are written only by the owner of its partition, and only
        // while this instance holds the partition's lease.
        if matches!(request.aggregate, Aggregate::Job(_))
            && self.shared.ownership.get(request.partition).is_none()
        {
            return Err(ControlError::Unavailable(format!(
                "partition {} is not owned by this orchestrator",
                request.partition
            )));
        }
        let stored = self.shared.log.append(request).await.map_err(|e| match e {
            crate::log::Error::Conflict { .. } => ControlError::Conflict {
                code: ErrorCode::VersionConflict,
                message: e.to_string(),
            },
            e => ControlError::Internal(e.to_string()),
        })?;
        if command.is_some() && stored.first().map(|s| s.envelope.event_id) != first_event {
            return Ok(Committed {
                earlier: Some(stored),
            });
        }
        let mut specs = Vec::new();
        let mut cancels = Vec::new();
        for s in &stored {
            match &s.envelope.payload {
                Event::Job(JobEvent::StepDispatched { spec, .. }) => specs.push(spec.clone()),
                Event::Job(JobEvent::JobCancelRequested { .. }) => cancels.extend(correlation),
                _ => {}
            }
        }
        let first = stored.first().map_or(0, |s| s.seq);
        let last = stored.last().map_or(0, |s| s.seq);
        // Applied through the tail, so events of other instances that came before are applied
        // first, in log order.
        self.catch_up(last, Some((first, last))).await;
        for job in cancels {
            self.steps.cancel(job);
        }
        for spec in specs {
            tracing::info!(job = %spec.job, step = %spec.step, attempt = spec.attempt, node = %spec.node, "dispatching step");
            self.steps.dispatch(spec);
        }
        Ok(Committed { earlier: None })
    }

    async fn maybe_snapshot(&mut self, force: bool) {
        let Some(path) = self.opts.snapshot_path.clone() else {
            return;
        };
        let last = *self.shared.seq.borrow();
        if last == self.snapshot_seq || (!force && self.since_snapshot < self.opts.snapshot_every) {
            return;
        }
        let state = self.shared.state.read().expect("state lock").clone();
        let seq = state.last_seq;
        match tokio::task::spawn_blocking(move || snapshot::save(&path, &state)).await {
            Ok(Ok(())) => {
                self.snapshot_seq = seq;
                self.since_snapshot = 0;
                tracing::debug!(seq, "snapshot written");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not write the snapshot"),
            Err(e) => tracing::warn!(error = %e, "snapshot writer panicked"),
        }
    }
}

/// What [`Engine::commit`] did.
struct Committed {
    /// The events an earlier append of the same command stored; nothing was appended.
    earlier: Option<Vec<crate::log::StoredEvent>>,
}

/// Whether `command` creates the thing it names, with an id the client's request chose (so
/// a repeat names a new id, and the first one is the answer). Exhaustive on purpose: a new
/// command must say which it is.
fn creates(command: &Command) -> bool {
    match command {
        Command::CreateGroup { .. }
        | Command::RequestBackup { .. }
        | Command::RequestConsistencyCheck { .. }
        | Command::RequestRestore { .. }
        | Command::RequestRecovery { .. }
        | Command::RequestRecoveryInZone { .. }
        | Command::ImportSeed { .. }
        | Command::RequestVerify { .. }
        | Command::CreateToken { .. } => true,
        Command::ChangeGroupMembers { .. }
        | Command::ChangeGroupPolicy { .. }
        | Command::DeleteGroup { .. }
        | Command::CancelJob { .. }
        | Command::RegisterNode { .. }
        | Command::ReportInventory { .. }
        | Command::ReportRepositorySpace { .. }
        | Command::RevokeToken { .. }
        | Command::RegisterRepositories { .. }
        | Command::DeleteRecoveryPoints { .. }
        | Command::UndeleteRecoveryPoints { .. }
        | Command::SetRetentionLock { .. }
        | Command::SetSoftDeletePeriod { .. }
        | Command::RecordRefusedReport { .. }
        | Command::EditGroupMembers { .. } => false,
    }
}

/// The answer a command gave the first time, from the events its first append stored: the
/// created thing's id (for commands that create, the aggregate the first time created; for
/// the others, the one the command names) and the last of those events.
fn replayed_answer(command: &Command, earlier: &[crate::log::StoredEvent]) -> Accepted {
    let id = match earlier.first() {
        Some(first) if creates(command) => first.envelope.aggregate.id_string(),
        _ => created_id(command),
    };
    Accepted {
        id,
        seq: earlier.last().map_or(0, |s| s.seq),
        replayed: true,
    }
}

fn is_version_conflict(e: &ControlError) -> bool {
    matches!(
        e,
        ControlError::Conflict {
            code: ErrorCode::VersionConflict,
            ..
        }
    )
}

/// The partition whose owner decides a command: the group's, the VM's, the job's (its VM's),
/// or the node's.
pub fn command_partition(state: &State, command: &Command, n: std::num::NonZeroU16) -> u16 {
    use cairn_schemas::subjects::{partition_of, partition_of_node, partition_of_vm};
    match command {
        Command::CreateGroup { group, .. }
        | Command::ChangeGroupMembers { group, .. }
        | Command::ChangeGroupPolicy { group, .. }
        | Command::DeleteGroup { group, .. }
        | Command::SetRetentionLock { group, .. }
        | Command::SetSoftDeletePeriod { group, .. }
        | Command::EditGroupMembers { group, .. } => partition_of(group, n),
        Command::DeleteRecoveryPoints { vm, .. } | Command::UndeleteRecoveryPoints { vm, .. } => {
            partition_of_vm(vm, n)
        }
        Command::RequestBackup { vm, .. }
        | Command::RequestConsistencyCheck { vm, .. }
        | Command::RequestRestore { vm, .. }
        | Command::RequestRecovery { vm, .. }
        | Command::RequestRecoveryInZone { vm, .. }
        | Command::ImportSeed { vm, .. }
        | Command::RequestVerify { vm, .. } => partition_of_vm(vm, n),
        Command::CancelJob { job, .. } => state.partition_of(&Aggregate::Job(*job), &[], n),
        Command::RegisterNode { node, .. }
        | Command::ReportInventory { node, .. }
        | Command::ReportRepositorySpace { node, .. }
        | Command::RegisterRepositories { node, .. }
        | Command::RecordRefusedReport { node, .. } => partition_of_node(node, n),
        Command::CreateToken { token, .. } | Command::RevokeToken { token } => {
            cairn_schemas::subjects::partition_of_key(token.as_bytes(), n)
        }
    }
}

fn created_id(command: &Command) -> String {
    match command {
        Command::CreateGroup { group, .. }
        | Command::ChangeGroupMembers { group, .. }
        | Command::ChangeGroupPolicy { group, .. }
        | Command::DeleteGroup { group, .. }
        | Command::SetRetentionLock { group, .. }
        | Command::SetSoftDeletePeriod { group, .. }
        | Command::EditGroupMembers { group, .. } => group.to_string(),
        Command::DeleteRecoveryPoints { vm, .. } | Command::UndeleteRecoveryPoints { vm, .. } => {
            vm.to_string()
        }
        Command::RequestBackup { job, .. }
        | Command::RequestConsistencyCheck { job, .. }
        | Command::RequestRestore { job, .. }
        | Command::RequestRecovery { job, .. }
        | Command::RequestRecoveryInZone { job, .. }
        | Command::CancelJob { job, .. } => job.to_string(),
        Command::RegisterNode { node, .. }
        | Command::ReportInventory { node, .. }
        | Command::ReportRepositorySpace { node, .. }
        | Command::RegisterRepositories { node, .. }
        | Command::RecordRefusedReport { node, .. } => node.to_string(),
        Command::ImportSeed { job, .. } | Command::RequestVerify { job, .. } => job.to_string(),
        Command::CreateToken { token, .. } | Command::RevokeToken { token } => token.to_string(),
    }
}

impl<L: EventLog + 'static> Handle<L> {
    /// Hands a worker's report to the engine.
    pub async fn report(&self, report: Report) {
        let _ = self.shared.tx.send(Input::Report(report, None, None)).await;
    }

    /// Hands a worker's report to the engine and waits until its events are durable: true
    /// when the report is done with (recorded, or ignored as stale), false when it should be
    /// delivered again.
    pub async fn report_acked(&self, report: Report) -> bool {
        self.report_input(report, None).await
    }

    /// [`Handle::report_acked`] for a report that came on `sender`'s subject (so from its
    /// NATS identity): refused, and recorded on `sender`, when it is about another node's
    /// work.
    pub async fn report_acked_from(&self, report: Report, sender: NodeId) -> bool {
        self.report_input(report, Some(sender)).await
    }

    async fn report_input(&self, report: Report, sender: Option<NodeId>) -> bool {
        let (done, rx) = oneshot::channel();
        if self
            .shared
            .tx
            .send(Input::Report(report, sender, Some(done)))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Tells the engine that these nodes' workers stopped heartbeating.
    pub async fn nodes_silent(&self, nodes: Vec<(NodeId, u64)>) {
        if !nodes.is_empty() {
            let _ = self.shared.tx.send(Input::NodesSilent(nodes)).await;
        }
    }

    /// The partitions this instance acts on.
    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.shared.ownership
    }

    /// Sets the checkpoint sink that `audit_verify` checks the log against (once).
    pub fn set_checkpoint_trust(&self, trust: crate::audit::CheckpointTrust) {
        let _ = self.shared.checkpoints.set(trust);
    }

    /// Sets where commands for partitions owned elsewhere go (once).
    pub fn set_router(&self, router: Arc<dyn CommandRouter>) {
        let _ = self.shared.router.set(router);
    }

    /// The partition whose owner decides `command`.
    pub fn command_partition(&self, command: &Command) -> u16 {
        self.read(|s| command_partition(s, command, self.shared.config.partitions))
    }

    /// Submits a command as `actor`: to this instance's engine when it owns the command's
    /// partition, otherwise through the router to the owner. With an `id` the command is
    /// idempotent wherever it is decided: a repeat returns the first answer.
    pub async fn submit_as(
        &self,
        actor: String,
        id: Option<CommandId>,
        command: Command,
    ) -> Result<Accepted, ControlError> {
        let partition = self.command_partition(&command);
        if self.shared.ownership.get(partition).is_none()
            && let Some(router) = self.shared.router.get()
        {
            return router.forward(partition, actor, id, command).await;
        }
        self.submit_local(actor, id, command).await
    }

    /// Submits a command to this instance's engine only (a command forwarded here by
    /// another instance); refused as unavailable when this instance does not own its
    /// partition.
    pub async fn submit_local(
        &self,
        actor: String,
        id: Option<CommandId>,
        command: Command,
    ) -> Result<Accepted, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .tx
            .send(Input::Submit {
                actor,
                id,
                command,
                reply,
            })
            .await
            .map_err(|_| ControlError::Unavailable("the engine is shutting down".into()))?;
        rx.await
            .map_err(|_| ControlError::Unavailable("the engine stopped".into()))?
    }

    /// Reads the projections.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.shared.state.read().expect("state lock"))
    }

    pub fn last_seq(&self) -> u64 {
        *self.shared.seq.borrow()
    }
}

fn parse_id<T: std::str::FromStr>(what: &'static str, text: &str) -> Result<T, ControlError> {
    text.parse().map_err(|_| ControlError::Invalid {
        code: ErrorCode::InvalidId,
        message: format!("{text:?} is not a valid {what} id"),
    })
}

impl<L: EventLog + 'static> Control for Handle<L> {
    fn vms(&self) -> Vec<VmView> {
        self.read(read::vms)
    }

    fn groups(&self) -> Vec<GroupView> {
        self.read(read::groups)
    }

    fn jobs(&self) -> Vec<JobView> {
        self.read(read::jobs)
    }

    fn job(&self, job: &str) -> Result<JobView, ControlError> {
        let id: JobId = parse_id("job", job)?;
        self.read(|s| {
            s.jobs
                .get(&id)
                .map(|j| read::job(s, j))
                .ok_or_else(|| ControlError::NotFound {
                    code: ErrorCode::UnknownJob,
                    message: format!("no job {id}"),
                })
        })
    }

    fn recovery_points(&self, vm: &str) -> Result<Vec<RpView>, ControlError> {
        let id: cairn_schemas::VmId = parse_id("VM", vm)?;
        self.read(|s| {
            if !s.vms.contains_key(&id) {
                return Err(ControlError::NotFound {
                    code: ErrorCode::UnknownVm,
                    message: format!("no VM {id}"),
                });
            }
            Ok(read::rps(s, &id))
        })
    }

    fn nodes(&self) -> Vec<NodeView> {
        self.read(read::nodes)
    }

    fn submit(
        &self,
        actor: String,
        id: Option<CommandId>,
        command: Command,
    ) -> BoxFuture<'_, Result<Accepted, ControlError>> {
        Box::pin(self.submit_as(actor, id, command))
    }

    fn events(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<EventView>, ControlError>> {
        Box::pin(async move {
            let stored: Vec<StoredEvent> = self
                .shared
                .log
                .read_from(from_seq.max(1), limit.min(10_000))
                .await
                .map_err(|e| ControlError::Internal(e.to_string()))?;
            Ok(stored.iter().map(read::event).collect())
        })
    }

    fn wait_for_events(&self, from_seq: u64, timeout_ms: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut rx = self.shared.seq.subscribe();
            let _ = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                rx.wait_for(|seq| *seq >= from_seq),
            )
            .await;
        })
    }

    fn audit_verify(&self) -> BoxFuture<'_, Result<AuditReport, ControlError>> {
        Box::pin(async move {
            let log = &self.shared.log;
            let mut report = crate::audit::verify::chain_report(log).await?;
            if let Some(trust) = self.shared.checkpoints.get() {
                let checkpoints = trust.verify(log).await.map_err(ControlError::Internal)?;
                report.ok &= checkpoints.ok;
                report.checkpoints = Some(checkpoints);
            }
            Ok(report)
        })
    }

    fn new_job_id(&self) -> JobId {
        JobId::new_v7(self.shared.clock.now_ms(), random10())
    }

    fn new_group_id(&self) -> GroupId {
        GroupId::new_v7(self.shared.clock.now_ms(), random10())
    }

    fn new_command_id(&self) -> CommandId {
        CommandId::new_v7(self.shared.clock.now_ms(), random10())
    }

    fn authenticate(
        &self,
        secret_hash: &[u8; 32],
    ) -> Result<crate::auth::Principal, crate::control::AuthRefusal> {
        let now = self.shared.clock.now_ms();
        self.read(|s| super::tokens::authenticate(s, secret_hash, now))
    }

    fn tokens(&self) -> Vec<crate::views::TokenView> {
        let now = self.shared.clock.now_ms();
        self.read(|s| {
            s.tokens
                .by_id
                .values()
                .map(|t| super::tokens::view(t, now))
                .collect()
        })
    }

    fn new_token_id(&self) -> cairn_schemas::TokenId {
        cairn_schemas::TokenId::new_v7(self.shared.clock.now_ms(), random10())
    }

    fn app_owner_roots(&self, node: &NodeId) -> Vec<String> {
        self.read(|s| {
            s.nodes
                .get(node)
                .map(|n| n.app_owner_roots.clone())
                .unwrap_or_default()
        })
    }

    fn default_repository(&self) -> String {
        self.shared.config.repository.clone()
    }

    fn timezone(&self) -> crate::policy::tz::TimeZone {
        self.shared.config.timezone.clone()
    }

    fn group(&self, group: &str) -> Result<GroupDetailView, ControlError> {
        let id: GroupId = parse_id("group", group)?;
        let now = self.shared.clock.now_ms();
        let cfg = &self.shared.config;
        self.read(|s| {
            let found = read_policy::live_group(s, id).ok_or_else(|| unknown_group(id))?;
            let repository = group_repository(cfg, found);
            Ok(read_policy::group_detail(
                s,
                found,
                &repository,
                &cfg.timezone,
                now,
            ))
        })
    }

    fn group_plan(&self, group: &str) -> Result<CapacityView, ControlError> {
        let id: GroupId = parse_id("group", group)?;
        let now = self.shared.clock.now_ms();
        let cfg = &self.shared.config;
        self.read(|s| {
            let found = read_policy::live_group(s, id).ok_or_else(|| unknown_group(id))?;
            let repository = group_repository(cfg, found);
            Ok(read_policy::group_plan(s, found, &repository, now))
        })
    }

    fn alerts(&self, all: bool) -> Vec<AlertView> {
        let now = self.shared.clock.now_ms();
        self.read(|s| read_policy::alerts(s, all, now))
    }

    fn calendar(&self, vm: &str) -> Result<Vec<CalendarDayView>, ControlError> {
        let id: cairn_schemas::VmId = parse_id("VM", vm)?;
        let tz = self.shared.config.timezone.clone();
        self.read(|s| {
            if !s.vms.contains_key(&id) {
                return Err(ControlError::NotFound {
                    code: ErrorCode::UnknownVm,
                    message: format!("no VM {id}"),
                });
            }
            Ok(read_policy::calendar(s, id, &tz))
        })
    }

    fn browse(
        &self,
        vm: &str,
        rp: &str,
        disk: Option<&str>,
        path: &str,
    ) -> BoxFuture<'_, Result<BrowseView, ControlError>> {
        let resolved = self.resolve_browse(vm, rp, disk, path);
        Box::pin(async move {
            let (node, request) = resolved?;
            let entries = self
                .shared
                .steps
                .browse(node, request.clone())
                .await
                .map_err(|message| ControlError::Invalid {
                    code: ErrorCode::BrowseFailed,
                    message,
                })?;
            Ok(BrowseView {
                vm: request.vm.to_string(),
                rp: request.rp.to_string(),
                disk: request.disk.to_string(),
                path: request.path,
                entries,
            })
        })
    }
}

fn unknown_group(id: GroupId) -> ControlError {
    ControlError::NotFound {
        code: ErrorCode::UnknownGroup,
        message: format!("no protection group {id}"),
    }
}

/// The repository a group writes to: its policy's, or the engine's default.
fn group_repository(cfg: &EngineConfig, group: &super::state::Group) -> String {
    if group.policy.repository.is_empty() {
        cfg.repository.clone()
    } else {
        group.policy.repository.clone()
    }
}

impl<L> Handle<L> {
    /// Checks a browse query against the projections: the VM, its recovery point and disk,
    /// the node whose worker reads it and the repository that holds it.
    fn resolve_browse(
        &self,
        vm: &str,
        rp: &str,
        disk: Option<&str>,
        path: &str,
    ) -> Result<(NodeId, BrowseRequest), ControlError> {
        let vm_id: cairn_schemas::VmId = parse_id("VM", vm)?;
        let rp_id: cairn_schemas::RecoveryPointId = parse_id("recovery point", rp)?;
        if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
            return Err(ControlError::Invalid {
                code: ErrorCode::InvalidPath,
                message: format!("path {path:?} must start with / and be at most 4096 bytes"),
            });
        }
        let state = self.shared.state.read().expect("state lock");
        let found = state
            .vms
            .get(&vm_id)
            .ok_or_else(|| ControlError::NotFound {
                code: ErrorCode::UnknownVm,
                message: format!("no VM {vm_id}"),
            })?;
        let point = state
            .rps
            .get(&vm_id)
            .and_then(|list| list.iter().find(|r| r.rp == rp_id))
            .ok_or_else(|| ControlError::NotFound {
                code: ErrorCode::UnknownRp,
                message: format!("VM {} has no recovery point {rp_id}", found.name),
            })?;
        super::softdelete::check_usable(point, &found.name)?;
        let disk_id = match disk {
            Some(d) => point
                .disks
                .iter()
                .find(|c| c.disk.as_str() == d)
                .map(|c| c.disk.clone()),
            None => point.disks.first().map(|c| c.disk.clone()),
        }
        .ok_or_else(|| ControlError::NotFound {
            code: ErrorCode::UnknownDisk,
            message: format!(
                "recovery point {rp_id} has no disk {}",
                disk.unwrap_or("(none at all)")
            ),
        })?;
        // Where the point was written, whatever the group names now.
        let repository = Some(point.repository.clone())
            .filter(|r| !r.is_empty())
            .or_else(|| {
                found
                    .group
                    .and_then(|g| state.groups.get(&g))
                    .map(|g| g.policy.repository.clone())
                    .filter(|r| !r.is_empty())
            })
            .unwrap_or_else(|| self.shared.config.repository.clone());
        Ok((
            found.node.clone(),
            BrowseRequest {
                vm: vm_id,
                rp: rp_id,
                disk: disk_id,
                repository,
                path: path.to_string(),
            },
        ))
    }
}

#[cfg(test)]
mod replay_tests {
    use cairn_schemas::{Envelope, RecoveryOptions, RecoveryPointId, RecoveryTarget};

    use super::*;
    use crate::log::StoredEvent;

    fn stored(aggregate: Aggregate, seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            envelope: Envelope {
                event_id: EventId::new_v7(1, [1; 10]),
                aggregate,
                aggregate_version: 1,
                recorded_at: 1,
                actor: "user:test".into(),
                correlation: None,
                causation: None,
                command: Some(CommandId::new_v7(1, [2; 10])),
                traceparent: None,
                prev_hash: [0; 32],
                payload: Event::Job(JobEvent::JobCancelRequested {
                    reason: "any event".into(),
                }),
            },
        }
    }

    #[test]
    fn a_replayed_creating_command_names_what_the_first_one_created() {
        let first = JobId::new_v7(1, [3; 10]);
        let retried = JobId::new_v7(2, [4; 10]);
        let vm = VmId::new_v7(1, [5; 10]);
        let earlier = [
            stored(Aggregate::Job(first), 7),
            stored(Aggregate::Job(first), 8),
        ];
        let options = RecoveryOptions {
            throttle: None,
            notify_email: vec![],
            webhooks: vec![],
            new_name: None,
        };
        for command in [
            Command::RequestBackup {
                job: retried,
                vm,
                mode: cairn_schemas::BackupMode::Incremental,
            },
            Command::RequestRecoveryInZone {
                job: retried,
                vm,
                rp: RecoveryPointId::new_v7(1, [6; 10]),
                target: RecoveryTarget::OriginalVm,
                options: options.clone(),
                timezone: "Europe/Paris".into(),
            },
        ] {
            let answer = replayed_answer(&command, &earlier);
            assert_eq!(answer.id, first.to_string(), "{command:?}");
            assert_eq!((answer.seq, answer.replayed), (8, true));
        }
        // A command about an existing thing names it, whatever its first append's aggregate.
        let cancel = Command::CancelJob {
            job: first,
            reason: "x".into(),
        };
        assert_eq!(replayed_answer(&cancel, &earlier).id, first.to_string());
    }
}
