//! The devbox manager: owns every box's state machine, its executions and its agent connection.

use crate::exec::{ExecRecord, ExecStatus, Execution};
use crate::ids::new_id;
use crate::model::{BoxUser, CreateDevbox, Devbox, LogEntry, Status};
use crate::store::Store;
use crate::{now_ms, CoreError, Result};
use bytes::Bytes;
use devbox_protocol::{ExecRequest, Exit, FrameKind, SetupRequest, Skipped};
use devbox_runtime::{AgentClient, BoxSpec, ByteStream, Runtime, Usage};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// How long `create_and_await_running` holds before answering with a transitional status
/// (the SDK then long-polls; its read timeout is 30 s).
pub const CREATE_HOLD: Duration = Duration::from_secs(25);

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub image: String,
    /// Where execution output is kept (`DIR/execs/<devbox>/<exec>.stdout`); None keeps it in
    /// memory only.
    pub data_dir: Option<std::path::PathBuf>,
    /// Suspended boxes hibernate (processes stopped, disk kept) after this long.
    pub hibernate_after_ms: Option<i64>,
}

/// Log entries kept and returned per devbox.
const LOG_LIMIT: usize = 10_000;
/// Ended boxes younger than this are checked for leftovers at start.
const LEFTOVER_SWEEP_MS: i64 = 24 * 3600 * 1000;
/// Creates are refused below this much free space on the data filesystem.
const MIN_FREE_DISK: u64 = 1 << 30;
/// Longest command accepted (bytes).
pub const MAX_COMMAND: usize = 128 << 10;
/// Executions a box keeps queryable; the oldest completed ones are forgotten beyond this.
const MAX_EXECS_PER_BOX: usize = 1000;

struct BoxEntry {
    rec: Mutex<Devbox>,
    status: watch::Sender<Status>,
    agent: Mutex<Option<AgentClient>>,
    execs: Mutex<HashMap<String, Arc<Execution>>>,
    command_ids: Mutex<HashMap<String, String>>,
    /// Named shells: the completion signal of each shell's last submitted command. The next
    /// command waits on it, so commands run one after another in submission order.
    shells: Mutex<HashMap<String, tokio::sync::oneshot::Receiver<()>>>,
    /// Serializes lifecycle transitions (boot, shutdown, suspend, resume) of this box.
    lifecycle: Arc<tokio::sync::Mutex<()>>,
    /// Last API activity (ms), for idle policies.
    last_activity: std::sync::atomic::AtomicI64,
    /// The suspend command currently running, killed at the suspend deadline.
    hook: Mutex<Option<Arc<Execution>>>,
    /// Set when a shutdown begins: a boot in progress gives up instead of holding it up.
    stopping: std::sync::atomic::AtomicBool,
}

impl BoxEntry {
    fn new(rec: Devbox) -> BoxEntry {
        BoxEntry {
            status: watch::channel(rec.status).0,
            rec: Mutex::new(rec),
            agent: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
            command_ids: Mutex::new(HashMap::new()),
            shells: Mutex::new(HashMap::new()),
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
            last_activity: std::sync::atomic::AtomicI64::new(now_ms()),
            hook: Mutex::new(None),
            stopping: Default::default(),
        }
    }

    fn snapshot(&self) -> Devbox {
        self.rec.lock().unwrap().clone()
    }

    fn status(&self) -> Status {
        *self.status.borrow()
    }

    fn agent(&self) -> Option<AgentClient> {
        self.agent.lock().unwrap().clone()
    }
}

mod lifecycle;
mod snapshot;
pub use lifecycle::ExitMode;
pub use snapshot::MetadataFilter;

pub struct Manager {
    /// Itself, for tasks spawned from `&self` methods.
    me: std::sync::Weak<Manager>,
    cfg: ManagerConfig,
    snapshots: Mutex<HashMap<String, crate::model::Snapshot>>,
    executions_total: std::sync::atomic::AtomicU64,
    snapshot_seconds: Mutex<crate::metrics::Histogram>,
    create_seconds: Mutex<crate::metrics::Histogram>,
    store: Store,
    runtime: Arc<dyn Runtime>,
    boxes: RwLock<HashMap<String, Arc<BoxEntry>>>,
    /// (tenant, x-request-id) -> devbox id, so a retried create returns the first box.
    request_ids: Mutex<HashMap<(String, String), String>>,
    seq: Mutex<i64>,
}

/// Parameters of an execution request.
#[derive(Debug, Clone, Default)]
pub struct ExecParams {
    pub command: String,
    pub shell_name: Option<String>,
    pub attach_stdin: bool,
    pub command_id: Option<String>,
}

/// A running box's agent, its user and its environment.
pub type AgentAccess = (AgentClient, devbox_protocol::UserSpec, Vec<(String, String)>);

#[derive(Clone, Copy)]
enum Move {
    Suspend,
    Resume,
}

/// One page of a list.
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
    pub total_count: usize,
}

impl Manager {
    /// Load every devbox from the store and reattach the live ones.
    pub async fn start(cfg: ManagerConfig, store: Store, runtime: Arc<dyn Runtime>) -> Result<Arc<Manager>> {
        let seq = store.max_seq()?;
        let m = Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            cfg,
            store,
            runtime,
            boxes: RwLock::new(HashMap::new()),
            request_ids: Mutex::new(HashMap::new()),
            seq: Mutex::new(seq),
            snapshots: Mutex::new(HashMap::new()),
            executions_total: Default::default(),
            snapshot_seconds: Mutex::new(crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS)),
            create_seconds: Mutex::new(crate::metrics::Histogram::new(crate::metrics::LATENCY_BUCKETS)),
        });
        m.load_snapshots()?;
        let hib = if m.cfg.hibernate_after_ms.is_some() { "after the configured time" } else { "only on request" };
        tracing::info!(
            "suspend keeps memory (freezer); hibernation {hib} keeps the disk only and boots again on resume ({})",
            criu_status()
        );
        for rec in m.store.all_devboxes()? {
            let entry = Arc::new(BoxEntry::new(rec.clone()));
            if let Some(rid) = &rec.request_id {
                m.request_ids.lock().unwrap().insert((rec.tenant.clone(), rid.clone()), rec.id.clone());
            }
            m.boxes.write().unwrap().insert(rec.id.clone(), entry.clone());
            if !rec.status.is_terminal() {
                m.recover(&entry).await;
            }
            if !entry.status().is_terminal() {
                m.reload_executions(&entry);
            } else if rec.end_time_ms.is_some_and(|t| now_ms() - t < LEFTOVER_SWEEP_MS) {
                // A box that ended shortly before a crash may have left its disk mounted or
                // its cgroups behind: release them (idempotent, cheap when nothing is left).
                if let Err(e) = m.runtime.destroy(&rec.id, &serde_json::Value::Null).await {
                    tracing::warn!(id = %rec.id, error = %e, "could not release what an ended devbox left");
                }
            }
        }
        m.start_policies();
        Ok(m)
    }

    async fn recover(self: &Arc<Self>, entry: &Arc<BoxEntry>) {
        let rec = entry.snapshot();
        if rec.hibernated {
            // Nothing runs; it boots again on resume. A resume the previous server did not
            // finish is undone: stop what it may have started, back to suspended.
            if rec.status != Status::Suspended {
                let _ = self.runtime.stop(&rec.id, &rec.runtime_state).await;
                self.transition(entry, Status::Suspended, None);
            }
            return;
        }
        let (id, state) = (rec.id.clone(), rec.runtime_state.clone());
        let attached = match rec.status {
            // A snapshot may have frozen it when the previous server died: thaw, then talk.
            Status::Running | Status::Resuming => {
                let _ = self.runtime.thaw(&id, &state).await;
                self.runtime.attach(&id, &state).await.ok()
            }
            // Frozen boxes cannot answer a handshake; check they exist, connect on resume.
            Status::Suspended | Status::Suspending if self.runtime.alive(&id, &state) => {
                if self.runtime.freeze(&id, &state).await.is_ok() {
                    Some(self.runtime.agent(&id))
                } else {
                    None
                }
            }
            _ => None,
        };
        match attached {
            Some(agent) => {
                *entry.agent.lock().unwrap() = Some(agent);
                // Finish a transition the previous server process was in the middle of.
                match rec.status {
                    Status::Suspending => self.transition(entry, Status::Suspended, None),
                    Status::Resuming => self.transition(entry, Status::Running, None),
                    _ => {}
                }
                tracing::info!(id = %rec.id, status = rec.status.as_str(), "reattached devbox");
            }
            None => {
                tracing::warn!(id = %rec.id, status = rec.status.as_str(), "devbox runtime state is gone");
                let _ = self.runtime.destroy(&rec.id, &rec.runtime_state).await;
                self.fail(entry, "runtime state lost while the server was down (host reboot or killed box)");
            }
        }
    }

    /// Refuse new boxes when the data filesystem is nearly full: running boxes' sparse disks,
    /// snapshots and the store need the room more.
    fn admit(&self) -> Result<()> {
        let Some(dir) = &self.cfg.data_dir else { return Ok(()) };
        if let Ok(st) = nix::sys::statvfs::statvfs(dir.as_path()) {
            let free = st.blocks_available() * st.fragment_size();
            if free < MIN_FREE_DISK {
                return Err(CoreError::NoSpace(format!(
                    "the server's disk is nearly full ({} MiB free): shut down devboxes or delete snapshots",
                    free >> 20
                )));
            }
        }
        Ok(())
    }

    fn next_seq(&self) -> i64 {
        let mut s = self.seq.lock().unwrap();
        *s += 1;
        *s
    }

    fn persist(&self, rec: &Devbox) {
        if let Err(e) = self.store.put_devbox(rec) {
            tracing::error!(id = %rec.id, error = %e, "failed to persist devbox");
        }
    }

    fn transition(&self, entry: &BoxEntry, status: Status, failure_reason: Option<String>) {
        let rec = {
            let mut r = entry.rec.lock().unwrap();
            r.set_status(status, failure_reason);
            r.clone()
        };
        self.persist(&rec);
        entry.status.send_replace(status);
    }

    fn fail(&self, entry: &BoxEntry, detail: &str) {
        let id = {
            let mut r = entry.rec.lock().unwrap();
            r.failure_detail = Some(detail.to_string());
            r.id.clone()
        };
        self.transition(entry, Status::Failure, Some("execution_failed".into()));
        if let Some(dir) = self.exec_dir(&id) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn entry(&self, tenant: &str, id: &str) -> Result<Arc<BoxEntry>> {
        let g = self.boxes.read().unwrap();
        match g.get(id) {
            Some(e) if e.rec.lock().unwrap().tenant == tenant => {
                e.last_activity.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                Ok(e.clone())
            }
            _ => Err(CoreError::NotFound(format!("devbox {id} not found"))),
        }
    }

    pub fn stats(&self) -> crate::metrics::Stats {
        let mut by: HashMap<Status, usize> = HashMap::new();
        let mut running_execs = 0;
        for e in self.boxes.read().unwrap().values() {
            *by.entry(e.status()).or_default() += 1;
            running_execs += e.execs.lock().unwrap().values().filter(|x| x.status() != ExecStatus::Completed).count();
        }
        crate::metrics::Stats {
            devboxes_by_status: Status::ALL.iter().map(|s| (s.as_str(), by.get(s).copied().unwrap_or(0))).collect(),
            executions_total: self.executions_total.load(std::sync::atomic::Ordering::Relaxed),
            executions_running: running_execs,
            snapshot_seconds: self.snapshot_seconds.lock().unwrap().clone(),
            create_seconds: self.create_seconds.lock().unwrap().clone(),
        }
    }

    pub fn runtime_kind(&self) -> &'static str {
        self.runtime.kind()
    }

    // ---- devboxes -------------------------------------------------------------------------

    /// Create a devbox and start booting it. A repeated `request_id` returns the first box.
    pub fn create(self: &Arc<Self>, tenant: &str, req: CreateDevbox, request_id: Option<String>) -> Result<Devbox> {
        // Held for the whole create: two concurrent retries of one request make one box.
        let mut request_ids = self.request_ids.lock().unwrap();
        if let Some(rid) = &request_id {
            if let Some(id) = request_ids.get(&(tenant.to_string(), rid.clone())).cloned() {
                drop(request_ids);
                return self.get(tenant, &id);
            }
        }
        if req.blueprint_id.is_some() || req.blueprint_name.is_some() {
            return Err(CoreError::NotFound("blueprint not found: this server has no blueprints yet".into()));
        }
        let layers = match req.snapshot_id.as_deref().filter(|s| !s.is_empty()) {
            Some(sid) => self.layers_for_create(tenant, sid)?,
            None => vec![],
        };
        let lp = req.launch_parameters.clone().unwrap_or_default();
        let limits = lp.limits()?;
        lp.policy()?;
        self.admit()?;
        let user = match &lp.user_parameters {
            Some(u) => {
                if u.username.is_empty()
                    || u.username.len() > 32
                    || !u.username.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(CoreError::BadRequest(
                        "user_parameters.username must be 1-32 letters, digits, '_' or '-'".into(),
                    ));
                }
                if !(0..=60000).contains(&u.uid) || (u.uid == 0) != (u.username == "root") {
                    return Err(CoreError::BadRequest(
                        "user_parameters.uid must be 0 for root and 1-60000 otherwise".into(),
                    ));
                }
                BoxUser { name: u.username.clone(), uid: u.uid as u32 }
            }
            None => BoxUser { name: "user".into(), uid: 1000 },
        };
        for k in req.environment_variables.iter().flat_map(|m| m.keys()) {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(CoreError::BadRequest(format!("invalid environment variable name {k:?}")));
            }
        }
        let now = now_ms();
        let id = new_id("dbx");
        let mut rec = Devbox {
            id: id.clone(),
            tenant: tenant.to_string(),
            seq: self.next_seq(),
            name: req.name.filter(|n| !n.is_empty()),
            metadata: req.metadata.unwrap_or_default(),
            status: Status::Provisioning,
            create_time_ms: now,
            end_time_ms: None,
            launch_parameters: lp,
            state_transitions: vec![],
            shutdown_reason: None,
            failure_reason: None,
            failure_detail: None,
            environment_variables: req.environment_variables.unwrap_or_default(),
            entrypoint: req.entrypoint,
            user,
            limits,
            request_id: request_id.clone(),
            runtime_state: serde_json::Value::Null,
            snapshot_id: layers.first().cloned(),
            layers,
            keep_alive_from_ms: now,
            hibernated: false,
            usage: Default::default(),
        };
        rec.set_status(Status::Provisioning, None);
        self.store.put_devbox(&rec)?;
        let entry = Arc::new(BoxEntry::new(rec.clone()));
        self.boxes.write().unwrap().insert(id.clone(), entry.clone());
        if let Some(rid) = request_id {
            request_ids.insert((tenant.to_string(), rid), id.clone());
        }
        drop(request_ids);
        let me = self.clone();
        tokio::spawn(async move { me.boot(entry).await });
        Ok(rec)
    }

    async fn boot(self: Arc<Self>, entry: Arc<BoxEntry>) {
        let _guard = entry.lifecycle.lock().await;
        if entry.status() != Status::Provisioning {
            return; // shut down before it booted
        }
        let started = std::time::Instant::now();
        match self.start_box(&entry, true).await {
            Ok(()) => {
                self.create_seconds.lock().unwrap().observe(started.elapsed().as_secs_f64());
                self.transition(&entry, Status::Running, None);
                tracing::info!(id = %entry.rec.lock().unwrap().id, "devbox running");
                self.start_entrypoint(&entry);
            }
            // A shutdown interrupted the boot: it records the outcome.
            Err(_) if entry.stopping.load(std::sync::atomic::Ordering::SeqCst) => {}
            Err(detail) => self.fail(&entry, &detail),
        }
    }

    /// Boot the box's runtime, set up its user and run its launch commands. On failure the
    /// runtime is released (keeping the disk when `fresh` is false) and the cause returned.
    async fn start_box(&self, entry: &Arc<BoxEntry>, fresh: bool) -> std::result::Result<(), String> {
        let rec = entry.snapshot();
        let layers: Vec<std::path::PathBuf> = rec
            .layers
            .iter()
            .map(|l| self.layer_dir(l))
            .collect::<Result<_>>()
            .map_err(|e| format!("boot failed: {e}"))?;
        let spec = BoxSpec {
            id: rec.id.clone(),
            hostname: rec.id.clone(),
            image: self.cfg.image.clone(),
            layers,
            limits: rec.limits,
        };
        let launched = self.runtime.create(&spec).await.map_err(|e| {
            tracing::error!(id = %rec.id, error = %e, "devbox failed to boot");
            format!("boot failed: {e}")
        })?;
        entry.rec.lock().unwrap().runtime_state = launched.state.clone();
        *entry.agent.lock().unwrap() = Some(launched.agent.clone());
        if fresh {
            self.transition(entry, Status::Initializing, None);
        }
        let (rid, rstate) = (rec.id.clone(), launched.state.clone());
        let release = |detail: String| async move {
            *entry.agent.lock().unwrap() = None;
            let r =
                if fresh { self.runtime.destroy(&rid, &rstate).await } else { self.runtime.stop(&rid, &rstate).await };
            if let Err(e) = r {
                tracing::warn!(id = %rid, error = %e, "releasing a box that failed to start");
            }
            Err(detail)
        };
        let setup = SetupRequest { user: rec.user.spec(), sudo: true };
        match tokio::time::timeout(Duration::from_secs(30), launched.agent.setup(&setup)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return release(format!("user setup failed: {e}")).await,
            Err(_) => return release("user setup did not finish in 30 s".into()).await,
        }
        for (i, cmd) in rec.launch_parameters.launch_commands.iter().flatten().enumerate() {
            let exec = Arc::new(Execution::new(&self.new_exec_record(&rec.id, cmd, None, false, None), None));
            self.log(&rec.id, "setup_commands", "info", None, Some(&exec), None);
            self.run_exec(entry, &launched.agent, exec.clone(), "setup_commands", true).await;
            let status = exec.exit_status().unwrap_or(-1);
            if status != 0 {
                let tail = exec.stderr.last_lines(5).text;
                return release(format!("launch command {} exited {status}: {tail}", i + 1)).await;
            }
        }
        Ok(())
    }

    pub fn get(&self, tenant: &str, id: &str) -> Result<Devbox> {
        Ok(self.entry(tenant, id)?.snapshot())
    }

    /// Newest first, like Runloop; `starting_after` is the id of the last item of the previous page.
    pub fn list(
        &self,
        tenant: &str,
        status: Option<Status>,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<Page<Devbox>> {
        let mut all: Vec<Devbox> = self
            .boxes
            .read()
            .unwrap()
            .values()
            .map(|e| e.snapshot())
            .filter(|d| d.tenant == tenant && status.is_none_or(|s| d.status == s))
            .collect();
        all.sort_by_key(|d| std::cmp::Reverse(d.seq));
        let total = all.len();
        let start = match starting_after {
            Some(after) => match all.iter().position(|d| d.id == after) {
                Some(p) => p + 1,
                None => {
                    return Err(CoreError::BadRequest(format!("starting_after {after:?} is not a devbox in this list")))
                }
            },
            None => 0,
        };
        let items: Vec<Devbox> = all.into_iter().skip(start).take(limit).collect();
        let has_more = start + items.len() < total;
        Ok(Page { items, has_more, total_count: total })
    }

    /// `name`: Some("") clears it. `metadata` replaces the whole map.
    pub fn update(
        &self,
        tenant: &str,
        id: &str,
        name: Option<String>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Devbox> {
        let entry = self.entry(tenant, id)?;
        let rec = {
            let mut r = entry.rec.lock().unwrap();
            if let Some(n) = name {
                r.name = if n.is_empty() { None } else { Some(n) };
            }
            if let Some(m) = metadata {
                r.metadata = m;
            }
            r.clone()
        };
        self.store.put_devbox(&rec)?;
        Ok(rec)
    }

    /// Hold until the status is in `statuses`; `None` when `timeout` expires first.
    pub async fn wait_for_status(
        &self,
        tenant: &str,
        id: &str,
        statuses: &[Status],
        timeout: Duration,
    ) -> Result<Option<Devbox>> {
        let entry = self.entry(tenant, id)?;
        let mut rx = entry.status.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|s| statuses.contains(s))).await;
        Ok(match reached {
            Ok(Ok(_)) => Some(entry.snapshot()),
            _ => None,
        })
    }

    pub async fn shutdown(&self, tenant: &str, id: &str, reason: &str, force: bool) -> Result<Devbox> {
        let entry = self.entry(tenant, id)?;
        if !force && self.snapshot_in_progress(id) {
            return Err(CoreError::Conflict(format!(
                "devbox {id} has a snapshot in progress: wait for it, or shut down with force=true"
            )));
        }
        entry.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        // A boot (launch commands can run for ever) holds the lifecycle lock: end the box's
        // processes first so the boot returns, then take the lock.
        if matches!(entry.status(), Status::Provisioning | Status::Initializing | Status::Resuming) {
            let state = entry.rec.lock().unwrap().runtime_state.clone();
            if !state.is_null() {
                let _ = self.runtime.stop(id, &state).await;
            }
        }
        let _guard = entry.lifecycle.lock().await;
        if entry.status().is_terminal() {
            return Ok(entry.snapshot());
        }
        let state = entry.rec.lock().unwrap().runtime_state.clone();
        if let Err(e) = self.runtime.destroy(id, &state).await {
            tracing::error!(%id, error = %e, "destroy failed during shutdown");
        }
        *entry.agent.lock().unwrap() = None;
        for exec in entry.execs.lock().unwrap().values() {
            if exec.status() != ExecStatus::Completed {
                exec.stderr.push(b"devbox was shut down\n");
                exec.complete(137);
            }
        }
        entry.rec.lock().unwrap().shutdown_reason = Some(reason.to_string());
        self.transition(&entry, Status::Shutdown, None);
        self.collect_layers();
        // Output stays readable through the open files until this process exits.
        if let Some(dir) = self.exec_dir(id) {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(entry.snapshot())
    }

    /// Start suspending: `suspending` now, `suspended` once suspend commands ran and every
    /// process is frozen (memory and processes kept).
    pub async fn suspend(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Devbox> {
        self.start_move(tenant, id, Move::Suspend).await
    }

    /// Start resuming: `resuming` now, `running` once thawed (or booted again after
    /// hibernation, with launch_commands run again).
    pub async fn resume(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Devbox> {
        self.start_move(tenant, id, Move::Resume).await
    }

    /// Enter the transitional status at once and finish the move in the background, holding
    /// the box's lifecycle lock throughout. Asking again while it happens (or once done) is
    /// not an error.
    async fn start_move(self: &Arc<Self>, tenant: &str, id: &str, mv: Move) -> Result<Devbox> {
        let (from, via, done, verb) = match mv {
            Move::Suspend => (Status::Running, Status::Suspending, Status::Suspended, "suspend"),
            Move::Resume => (Status::Suspended, Status::Resuming, Status::Running, "resume"),
        };
        let entry = self.entry(tenant, id)?;
        let guard = entry.lifecycle.clone().lock_owned().await;
        match entry.status() {
            s if s == done || s == via => return Ok(entry.snapshot()),
            s if s == from => {}
            s => return Err(CoreError::Conflict(format!("cannot {verb} a devbox that is {}", s.as_str()))),
        }
        self.transition(&entry, via, None);
        let (me, e2) = (self.clone(), entry.clone());
        tokio::spawn(async move {
            let _guard = guard;
            match mv {
                Move::Suspend => me.do_suspend(&e2).await,
                Move::Resume => me.do_resume(&e2).await,
            }
        });
        Ok(entry.snapshot())
    }

    /// Restart the keep-alive period (and, like any call, the idle timer).
    pub fn keep_alive(&self, tenant: &str, id: &str) -> Result<()> {
        let entry = self.entry(tenant, id)?;
        if entry.status().is_terminal() {
            return Err(CoreError::Conflict(format!("devbox {id} is {}", entry.status().as_str())));
        }
        let rec = {
            let mut r = entry.rec.lock().unwrap();
            r.keep_alive_from_ms = now_ms();
            r.clone()
        };
        self.store.put_devbox(&rec)?;
        Ok(())
    }

    pub fn usage(&self, tenant: &str, id: &str) -> Result<(Devbox, Usage)> {
        let entry = self.entry(tenant, id)?;
        Ok((entry.snapshot(), self.runtime.usage(id)))
    }

    fn running_agent(&self, entry: &BoxEntry) -> Result<AgentClient> {
        let st = entry.status();
        if st != Status::Running {
            let id = entry.rec.lock().unwrap().id.clone();
            let hint = match st {
                Status::Suspended => ": resume it first",
                Status::Provisioning | Status::Initializing => ": wait until it is running",
                _ => "",
            };
            return Err(CoreError::Conflict(format!("devbox {id} is {}{hint}", st.as_str())));
        }
        entry.agent().ok_or_else(|| CoreError::Conflict("devbox has no agent connection".into()))
    }

    /// The agent of a running box and the box's user, for features that talk to the agent
    /// directly (interactive terminals).
    pub fn agent_for(&self, tenant: &str, id: &str) -> Result<AgentAccess> {
        let entry = self.entry(tenant, id)?;
        let agent = self.running_agent(&entry)?;
        let r = entry.rec.lock().unwrap();
        let env = r.environment_variables.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok((agent, r.user.spec(), env))
    }

    // ---- executions -----------------------------------------------------------------------

    fn exec_dir(&self, devbox_id: &str) -> Option<std::path::PathBuf> {
        self.cfg.data_dir.as_ref().map(|d| d.join("execs").join(devbox_id))
    }

    fn new_exec_record(
        &self,
        devbox_id: &str,
        command: &str,
        shell_name: Option<String>,
        attach_stdin: bool,
        command_id: Option<String>,
    ) -> ExecRecord {
        ExecRecord {
            id: new_id("exe"),
            devbox_id: devbox_id.to_string(),
            command: command.to_string(),
            shell_name,
            attach_stdin,
            command_id,
            status: ExecStatus::Queued,
            exit_status: None,
            create_time_ms: now_ms(),
            end_time_ms: None,
            skipped: [0, 0],
        }
    }

    fn log(
        &self,
        devbox_id: &str,
        source: &str,
        level: &str,
        message: Option<String>,
        exec: Option<&Execution>,
        exit_code: Option<i32>,
    ) {
        let entry = LogEntry {
            level: level.to_string(),
            source: source.to_string(),
            timestamp_ms: now_ms(),
            message,
            cmd: exec.map(|e| e.command.clone()),
            cmd_id: exec.map(|e| e.id.clone()),
            exit_code,
            shell_name: exec.and_then(|e| e.shell_name.clone()),
        };
        if let Err(e) = self.store.add_log(devbox_id, &entry) {
            tracing::warn!(%devbox_id, error = %e, "could not store log entry");
        }
    }

    /// Executions of a box from the store (after a restart); unfinished ones are reattached.
    fn reload_executions(self: &Arc<Self>, entry: &Arc<BoxEntry>) {
        let id = entry.rec.lock().unwrap().id.clone();
        let recs = match self.store.executions_of(&id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%id, error = %e, "could not load executions");
                return;
            }
        };
        let dir = self.exec_dir(&id);
        for rec in recs {
            let exec = Arc::new(Execution::new(&rec, dir.as_deref()));
            entry.execs.lock().unwrap().insert(exec.id.clone(), exec.clone());
            if let Some(cid) = &rec.command_id {
                entry.command_ids.lock().unwrap().insert(cid.clone(), exec.id.clone());
            }
            if rec.status != ExecStatus::Completed {
                match entry.agent() {
                    Some(agent) => {
                        // Records come back in submission order: rebuild each named shell's
                        // queue so its waiting commands still run one after another.
                        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                        let before =
                            rec.shell_name.clone().and_then(|n| entry.shells.lock().unwrap().insert(n, done_rx));
                        let (me, e2) = (self.clone(), entry.clone());
                        tokio::spawn(async move {
                            if let Some(before) = before {
                                let _ = before.await;
                            }
                            me.run_exec(&e2, &agent, exec, "exec", false).await;
                            drop(done_tx);
                        });
                    }
                    None => {
                        exec.stderr.push(b"devboxd: the box was lost while the server was down\n");
                        self.finish_exec(&id, &exec, 137, None, "exec");
                    }
                }
            }
        }
    }

    pub fn exec(self: &Arc<Self>, tenant: &str, id: &str, p: ExecParams) -> Result<Arc<Execution>> {
        let entry = self.entry(tenant, id)?;
        if let Some(cid) = &p.command_id {
            let existing = entry.command_ids.lock().unwrap().get(cid).cloned();
            if let Some(eid) = existing {
                if let Some(e) = entry.execs.lock().unwrap().get(&eid) {
                    return Ok(e.clone());
                }
            }
        }
        if let Some(name) = &p.shell_name {
            if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
                return Err(CoreError::BadRequest("shell_name must be 1-64 letters, digits, '.', '_' or '-'".into()));
            }
        }
        if p.command.len() > MAX_COMMAND {
            return Err(CoreError::BadRequest(format!(
                "command is {} bytes; the limit is {MAX_COMMAND}: write a script with write_file_contents and run it",
                p.command.len()
            )));
        }
        let agent = self.running_agent(&entry)?;
        let rec = self.new_exec_record(id, &p.command, p.shell_name.clone(), p.attach_stdin, p.command_id.clone());
        self.store.put_execution(&rec)?;
        let dir = self.exec_dir(id);
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)
                .map_err(|e| CoreError::Runtime(devbox_runtime::RuntimeError::io("create execution output dir", e)))?;
        }
        let exec = Arc::new(Execution::new(&rec, dir.as_deref()));
        self.executions_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut execs = entry.execs.lock().unwrap();
            // Bound what a box keeps in memory: forget the oldest completed executions.
            if execs.len() >= MAX_EXECS_PER_BOX {
                let mut done: Vec<(i64, String)> = execs
                    .values()
                    .filter(|e| e.status() == ExecStatus::Completed)
                    .map(|e| (e.create_time_ms, e.id.clone()))
                    .collect();
                done.sort();
                for (_, old) in done.into_iter().take(execs.len() + 1 - MAX_EXECS_PER_BOX) {
                    execs.remove(&old);
                }
            }
            execs.insert(exec.id.clone(), exec.clone());
        }
        if let Some(cid) = p.command_id {
            entry.command_ids.lock().unwrap().insert(cid, exec.id.clone());
        }
        self.log(id, "exec", "info", None, Some(&exec), None);
        // Take a place in the shell's queue now, in submission order (a spawned task would
        // reach a lock in whatever order the scheduler runs it).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let before = p.shell_name.and_then(|n| entry.shells.lock().unwrap().insert(n, done_rx));
        let (me, e2, x2) = (self.clone(), entry.clone(), exec.clone());
        tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await; // Ok or dropped: the previous command is done either way
            }
            me.run_exec(&e2, &agent, x2, "exec", true).await;
            drop(done_tx);
        });
        Ok(exec)
    }

    /// Drive one execution to completion: start it (or reattach if it already started),
    /// store its output, survive a dropped agent connection, record the outcome.
    async fn run_exec(&self, entry: &BoxEntry, agent: &AgentClient, exec: Arc<Execution>, source: &str, fresh: bool) {
        let devbox_id = exec.devbox_id.clone();
        let mut attempts = 0u32;
        loop {
            let stream = if !fresh || attempts > 0 {
                let (o, e) = exec.agent_offsets();
                agent.attach(&exec.id, o, e).await
            } else {
                Err(devbox_runtime::RuntimeError::Gone)
            };
            let stream = match stream {
                Ok(s) => Ok(s),
                // Never started (or the agent never heard of it): start it now.
                Err(devbox_runtime::RuntimeError::Gone) | Err(devbox_runtime::RuntimeError::Agent(_))
                    if !exec.started() =>
                {
                    let req = {
                        let r = entry.rec.lock().unwrap();
                        let command = match &exec.shell_name {
                            Some(name) => shell_wrap(name, &exec.command),
                            None => exec.command.clone(),
                        };
                        ExecRequest {
                            command,
                            argv: vec![],
                            shell: true,
                            user: r.user.spec(),
                            env: r.environment_variables.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                            cwd: None,
                            stdin: exec.attach_stdin,
                            id: Some(exec.id.clone()),
                        }
                    };
                    agent.exec(&req).await
                }
                Err(e) => Err(e),
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    let lost = matches!(&e, devbox_runtime::RuntimeError::Agent(a) if a.kind == devbox_protocol::ErrorKind::NotFound);
                    // A started command lives on in the box: keep trying to reach it while the
                    // box lives (the agent may be busy, or frozen by a snapshot), unless the
                    // agent says it no longer knows it.
                    if exec.started() && !lost && !entry.status().is_terminal() && attempts < 40 {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis((50 * attempts as u64).min(1000))).await;
                        continue;
                    }
                    if exec.started() {
                        exec.stderr.push(format!("devboxd: lost the running command: {e}\n").as_bytes());
                        self.finish_exec(&devbox_id, &exec, 137, Some(agent), source);
                    } else {
                        exec.stderr.push(format!("devboxd: could not run the command: {e}\n").as_bytes());
                        self.finish_exec(&devbox_id, &exec, 127, Some(agent), source);
                    }
                    return;
                }
            };
            while let Ok(Some(f)) = stream.next().await {
                {
                    match f.kind {
                        FrameKind::Started => exec.set_running(),
                        FrameKind::Stdout => exec.stdout.push(&f.payload),
                        FrameKind::Stderr => exec.stderr.push(&f.payload),
                        FrameKind::Skipped => {
                            if let Ok(sk) = serde_json::from_slice::<Skipped>(&f.payload) {
                                exec.add_skipped(sk.stream, sk.to.saturating_sub(sk.from));
                                let _ = self.store.put_execution(&exec.record());
                            }
                        }
                        FrameKind::Exit => {
                            let status = serde_json::from_slice::<Exit>(&f.payload).map(|e| e.status()).unwrap_or(-1);
                            self.finish_exec(&devbox_id, &exec, status, Some(agent), source);
                            return;
                        }
                        FrameKind::Error => {
                            let msg = serde_json::from_slice::<devbox_protocol::AgentError>(&f.payload)
                                .map(|e| e.message)
                                .unwrap_or_else(|_| "unknown error".into());
                            exec.stderr.push(format!("devboxd: could not start the command: {msg}\n").as_bytes());
                            self.finish_exec(&devbox_id, &exec, 127, Some(agent), source);
                            return;
                        }
                    }
                }
            }
            // The stream broke before the exit frame: the box died, or only the connection did.
            if exec.status() == ExecStatus::Completed {
                return;
            }
            if entry.status().is_terminal() || attempts >= 40 {
                exec.stderr.push(b"devboxd: lost contact with the box while the command ran\n");
                self.finish_exec(&devbox_id, &exec, 137, None, source);
                return;
            }
            attempts += 1;
            tokio::time::sleep(Duration::from_millis(50 * attempts as u64)).await;
        }
    }

    fn finish_exec(
        &self,
        devbox_id: &str,
        exec: &Arc<Execution>,
        status: i32,
        agent: Option<&AgentClient>,
        source: &str,
    ) {
        if !exec.complete(status) {
            return;
        }
        if exec.stdout.disk_len().is_some() || source == "exec" {
            if let Err(e) = self.store.put_execution(&exec.record()) {
                tracing::error!(id = %exec.id, error = %e, "could not store execution outcome");
            }
        }
        let level = if status == 0 { "info" } else { "error" };
        self.log(devbox_id, source, level, None, Some(exec), Some(status));
        if let Some(agent) = agent.cloned() {
            let id = exec.id.clone();
            tokio::spawn(async move {
                let _ = agent.release(&id).await;
            });
        }
    }

    pub fn logs(
        &self,
        tenant: &str,
        id: &str,
        execution_id: Option<&str>,
        shell_name: Option<&str>,
    ) -> Result<Vec<LogEntry>> {
        self.entry(tenant, id)?;
        let all = self.store.logs_of(id, LOG_LIMIT)?;
        Ok(all
            .into_iter()
            .filter(|e| execution_id.is_none_or(|x| e.cmd_id.as_deref() == Some(x)))
            .filter(|e| shell_name.is_none_or(|s| e.shell_name.as_deref() == Some(s)))
            .collect())
    }

    pub fn execution(&self, tenant: &str, id: &str, exec_id: &str) -> Result<Arc<Execution>> {
        let entry = self.entry(tenant, id)?;
        let e = entry.execs.lock().unwrap().get(exec_id).cloned();
        e.ok_or_else(|| CoreError::NotFound(format!("execution {exec_id} not found on devbox {id}")))
    }

    /// Signal the execution (SIGKILL) and wait briefly for it to report completion.
    pub async fn kill(&self, tenant: &str, id: &str, exec_id: &str, group: bool) -> Result<Arc<Execution>> {
        let exec = self.execution(tenant, id, exec_id)?;
        if exec.status() == ExecStatus::Completed {
            return Ok(exec);
        }
        let entry = self.entry(tenant, id)?;
        if let Some(agent) = entry.agent() {
            if let Err(e) = agent.signal(&exec.id, SIGKILL, group).await {
                tracing::debug!(%exec_id, error = %e, "kill: process already gone");
            }
        }
        exec.wait_for(&[ExecStatus::Completed], Duration::from_secs(5)).await;
        Ok(exec)
    }

    pub async fn send_stdin(
        &self,
        tenant: &str,
        id: &str,
        exec_id: &str,
        text: Option<String>,
        signal: Option<&str>,
    ) -> Result<()> {
        let exec = self.execution(tenant, id, exec_id)?;
        if exec.status() == ExecStatus::Completed {
            return Err(CoreError::Conflict(format!("execution {exec_id} has completed")));
        }
        let entry = self.entry(tenant, id)?;
        let agent = self.running_agent(&entry)?;
        if !exec.started() {
            // Clients send input right after starting the command: give it a moment to start.
            exec.wait_for(&[ExecStatus::Running, ExecStatus::Completed], Duration::from_secs(10)).await;
            if !exec.started() {
                return Err(CoreError::Conflict("execution has not started yet (queued): retry later".into()));
            }
        }
        let aid = exec.id.clone();
        match signal {
            Some("EOF") => agent.stdin(&aid, Bytes::new(), true).await.map_err(CoreError::from_runtime),
            Some("INTERRUPT") => agent.signal(&aid, 2, true).await.map_err(CoreError::from_runtime),
            Some(other) => Err(CoreError::BadRequest(format!("unknown signal {other:?}: use EOF or INTERRUPT"))),
            None => {
                if !exec.attach_stdin {
                    return Err(CoreError::BadRequest("execution was not started with attach_stdin".into()));
                }
                agent.stdin(&aid, Bytes::from(text.unwrap_or_default()), false).await.map_err(CoreError::from_runtime)
            }
        }
    }

    // ---- files ----------------------------------------------------------------------------

    /// Resolve a client path: relative paths start in the user's home.
    fn resolve(&self, entry: &BoxEntry, path: &str) -> Result<String> {
        if path.is_empty() || path.contains('\0') {
            return Err(CoreError::BadRequest("file path must be a non-empty string without NUL bytes".into()));
        }
        if path.starts_with('/') {
            return Ok(path.to_string());
        }
        let home = entry.rec.lock().unwrap().user.spec().home;
        Ok(format!("{home}/{path}"))
    }

    pub async fn read_file(&self, tenant: &str, id: &str, path: &str) -> Result<ByteStream> {
        let entry = self.entry(tenant, id)?;
        let agent = self.running_agent(&entry)?;
        let p = self.resolve(&entry, path)?;
        // No size: /proc files stat as 0 bytes and files change while they stream.
        agent.read_file(&p).await.map(|(_size, stream)| stream).map_err(CoreError::from_runtime)
    }

    pub async fn write_file(&self, tenant: &str, id: &str, path: &str, data: ByteStream) -> Result<u64> {
        let entry = self.entry(tenant, id)?;
        let agent = self.running_agent(&entry)?;
        let p = self.resolve(&entry, path)?;
        let spec = entry.rec.lock().unwrap().user.spec();
        let n = agent.write_file(&p, spec.uid, spec.gid, data).await.map_err(CoreError::from_runtime)?;
        self.log(id, "files", "info", Some(format!("wrote {n} bytes to {p}")), None, None);
        Ok(n)
    }
}

/// Whether CRIU could checkpoint process trees here (reported at startup).
fn criu_status() -> String {
    match std::process::Command::new("criu").arg("check").output() {
        Err(_) => "CRIU not installed".into(),
        Ok(o) if o.status.success() => "CRIU works here but checkpointing is not implemented yet".into(),
        Ok(_) => "CRIU installed but `criu check` fails on this kernel".into(),
    }
}

/// Signal number sent to kill a command (the agent speaks raw numbers).
pub(crate) const SIGKILL: i32 = nix::sys::signal::Signal::SIGKILL as i32;

/// A named shell is a state directory in the user's home: each command starts from the saved
/// working directory and exported environment and saves them on exit (even on `exit N`).
/// Functions, aliases and unexported variables do not persist.
fn shell_wrap(name: &str, command: &str) -> String {
    format!(
        r#"__dbx_d="$HOME/.local/state/devbox/shells/{name}"; mkdir -p "$__dbx_d"
[ -f "$__dbx_d/env" ] && . "$__dbx_d/env"
[ -f "$__dbx_d/cwd" ] && {{ cd "$(cat "$__dbx_d/cwd")" 2>/dev/null || true; }}
__dbx_save() {{ __dbx_rc=$?; export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_|__dbx_[a-z]+)=' > "$__dbx_d/env.tmp" && mv -f "$__dbx_d/env.tmp" "$__dbx_d/env"; pwd > "$__dbx_d/cwd"; exit $__dbx_rc; }}
trap __dbx_save EXIT
{command}
"#
    )
}
