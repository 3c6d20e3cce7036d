//! Lifecycle: suspend and resume (with suspend hooks), hibernation, the entrypoint, keep-alive
//! and idle policies, usage accounting, and what happens to boxes when the server exits.

use super::{BoxEntry, Manager};
use crate::exec::{ExecStatus, Execution};
use crate::model::{OnIdle, Status};
use crate::{now_ms, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often policies are checked and usage sampled.
const TICK: Duration = Duration::from_millis(500);
/// Disk usage is a directory walk: sample it less often.
const DISK_SAMPLE_EVERY: u32 = 20;

/// What a stopping server does with the boxes it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// Leave them running; the next server start reattaches them.
    Keep,
    Shutdown,
    /// Suspend and hibernate: processes stop, disks are kept, resume boots them again.
    Hibernate,
}

impl Manager {
    pub(super) async fn do_suspend(&self, entry: &Arc<BoxEntry>) {
        let rec = entry.snapshot();
        let policy = rec.launch_parameters.policy().unwrap_or_else(|_| crate::model::Policy {
            keep_alive_ms: None,
            idle: None,
            suspend_commands: vec![],
            suspend_deadline_ms: 30_000,
        });
        if !policy.suspend_commands.is_empty() {
            if let Some(agent) = entry.agent() {
                let deadline = Duration::from_millis(policy.suspend_deadline_ms as u64);
                let run = async {
                    for cmd in &policy.suspend_commands {
                        let exec =
                            Arc::new(Execution::new(&self.new_exec_record(&rec.id, cmd, None, false, None), None));
                        self.log(&rec.id, "exec", "info", Some("suspend command".into()), Some(&exec), None);
                        let current = exec.clone();
                        let work = self.run_exec(entry, &agent, exec, "exec", true);
                        tokio::pin!(work);
                        // Remember what runs so it can be killed at the deadline.
                        *entry.hook.lock().unwrap() = Some(current);
                        work.await;
                    }
                };
                if tokio::time::timeout(deadline, run).await.is_err() {
                    let running = entry.hook.lock().unwrap().take();
                    if let Some(e) = running {
                        let _ = agent.signal(&e.id, super::SIGKILL, true).await;
                    }
                    self.log(
                        &rec.id,
                        "exec",
                        "error",
                        Some("suspend commands passed their deadline".into()),
                        None,
                        None,
                    );
                }
                *entry.hook.lock().unwrap() = None;
            }
        }
        match self.runtime.freeze(&rec.id, &rec.runtime_state).await {
            Ok(()) => self.transition(entry, Status::Suspended, None),
            Err(e) => {
                tracing::error!(id = %rec.id, error = %e, "freeze failed");
                self.transition(entry, Status::Running, None);
            }
        }
    }

    pub(super) async fn do_resume(&self, entry: &Arc<BoxEntry>) {
        let rec = entry.snapshot();
        if rec.hibernated {
            match self.start_box(entry, false).await {
                Ok(()) => {
                    entry.rec.lock().unwrap().hibernated = false;
                    entry.last_activity.store(now_ms(), Ordering::Relaxed);
                    self.transition(entry, Status::Running, None);
                    self.start_entrypoint(entry);
                }
                Err(detail) => {
                    tracing::error!(id = %rec.id, %detail, "resume from hibernation failed");
                    self.log(&rec.id, "exec", "error", Some(format!("resume failed: {detail}")), None, None);
                    self.transition(entry, Status::Suspended, None);
                }
            }
            return;
        }
        match self.runtime.thaw(&rec.id, &rec.runtime_state).await {
            Ok(()) => {
                entry.last_activity.store(now_ms(), Ordering::Relaxed);
                self.transition(entry, Status::Running, None)
            }
            Err(e) => {
                tracing::error!(id = %rec.id, error = %e, "thaw failed");
                self.transition(entry, Status::Suspended, None);
            }
        }
    }

    /// Stop a suspended box's processes, keeping its disk (without CRIU this is all a box can
    /// keep once its memory is released). It boots again, with launch_commands, on resume.
    pub(super) async fn hibernate(&self, entry: &Arc<BoxEntry>) -> Result<()> {
        let _guard = entry.lifecycle.lock().await;
        if entry.status() != Status::Suspended || entry.rec.lock().unwrap().hibernated {
            return Ok(());
        }
        let rec = entry.snapshot();
        self.runtime.stop(&rec.id, &rec.runtime_state).await?;
        *entry.agent.lock().unwrap() = None;
        for exec in entry.execs.lock().unwrap().values() {
            if exec.status() != ExecStatus::Completed {
                exec.stderr.push(b"devboxd: the devbox hibernated; its processes were stopped\n");
                self.finish_exec(&rec.id, exec, 137, None, "exec");
            }
        }
        let updated = {
            let mut r = entry.rec.lock().unwrap();
            r.hibernated = true;
            r.runtime_state = serde_json::Value::Null;
            r.clone()
        };
        self.persist(&updated);
        tracing::info!(id = %rec.id, "devbox hibernated (disk kept, processes stopped)");
        Ok(())
    }

    /// Hibernate on request (a devboxd extension): suspend if running, then release memory
    /// and processes, keeping the disk. Answers once done.
    pub async fn hibernate_now(self: &Arc<Self>, tenant: &str, id: &str) -> Result<crate::model::Devbox> {
        let entry = self.entry(tenant, id)?;
        if entry.status() == Status::Running {
            self.suspend(tenant, id).await?;
        }
        let mut rx = entry.status.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(65), rx.wait_for(|s| *s != Status::Suspending)).await;
        if entry.status() != Status::Suspended {
            return Err(crate::CoreError::Conflict(format!(
                "cannot hibernate a devbox that is {}",
                entry.status().as_str()
            )));
        }
        self.hibernate(&entry).await?;
        Ok(entry.snapshot())
    }

    /// Run the box's entrypoint; its exit shuts the box down.
    pub(super) fn start_entrypoint(&self, entry: &Arc<BoxEntry>) {
        let rec = entry.snapshot();
        let (Some(cmd), Some(agent)) = (rec.entrypoint.clone().filter(|c| !c.trim().is_empty()), entry.agent()) else {
            return;
        };
        let Some(me) = self.me.upgrade() else { return };
        let e2 = entry.clone();
        tokio::spawn(async move {
            let exec = Arc::new(Execution::new(&me.new_exec_record(&rec.id, &cmd, None, false, None), None));
            me.log(&rec.id, "entrypoint", "info", None, Some(&exec), None);
            me.run_exec(&e2, &agent, exec.clone(), "entrypoint", true).await;
            // Only an exit of the running box's own entrypoint ends it (not a stop by us).
            if e2.status() == Status::Running && !e2.rec.lock().unwrap().hibernated {
                let tenant = e2.rec.lock().unwrap().tenant.clone();
                let _ = me.shutdown(&tenant, &rec.id, "entrypoint_exit", true).await;
            }
        });
    }

    /// Keep-alive, idle and hibernation policies, and usage sampling.
    pub(super) fn start_policies(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            let mut n: u32 = 0;
            loop {
                tick.tick().await;
                let Some(m) = me.upgrade() else { return };
                n = n.wrapping_add(1);
                m.policy_pass(n.is_multiple_of(DISK_SAMPLE_EVERY));
            }
        });
    }

    fn policy_pass(self: &Arc<Self>, sample_disk: bool) {
        let now = now_ms();
        let entries: Vec<Arc<BoxEntry>> = self.boxes.read().unwrap().values().cloned().collect();
        for entry in entries {
            let status = entry.status();
            if status.is_terminal() {
                continue;
            }
            self.sample_usage(&entry, now, sample_disk);
            let rec = entry.snapshot();
            if status == Status::Running
                && sample_disk
                && !entry.stopping.load(Ordering::SeqCst)
                && !self.runtime.alive(&rec.id, &rec.runtime_state)
            {
                self.box_died(&entry);
                continue;
            }
            let Ok(policy) = rec.launch_parameters.policy() else { continue };
            if status == Status::Suspended {
                if let Some(after) = self.cfg.hibernate_after_ms {
                    let since = rec.state_transitions.last().map(|t| t.transition_time_ms).unwrap_or(now);
                    if !rec.hibernated && now - since >= after {
                        let (me, e2) = (self.clone(), entry.clone());
                        tokio::spawn(async move {
                            if let Err(e) = me.hibernate(&e2).await {
                                tracing::warn!(error = %e, "hibernate failed");
                            }
                        });
                    }
                }
                continue;
            }
            if status != Status::Running {
                continue;
            }
            let tenant = rec.tenant.clone();
            if let Some(ttl) = policy.keep_alive_ms {
                if now - rec.keep_alive_from_ms.max(rec.create_time_ms) >= ttl {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = me.shutdown(&tenant, &rec.id, "keep_alive_timeout", true).await;
                    });
                    continue;
                }
            }
            if let Some((idle_ms, action)) = policy.idle {
                let busy = entry.execs.lock().unwrap().values().any(|e| e.status() != ExecStatus::Completed);
                if busy {
                    entry.last_activity.store(now, Ordering::Relaxed);
                    continue;
                }
                if now - entry.last_activity.load(Ordering::Relaxed) >= idle_ms {
                    // Count the action as activity so it is not repeated while it runs.
                    entry.last_activity.store(now, Ordering::Relaxed);
                    let me = self.clone();
                    tokio::spawn(async move {
                        let r = match action {
                            OnIdle::Shutdown => me.shutdown(&tenant, &rec.id, "idle", true).await.map(|_| ()),
                            OnIdle::Suspend => me.suspend(&tenant, &rec.id).await.map(|_| ()),
                        };
                        if let Err(e) = r {
                            tracing::warn!(id = %rec.id, error = %e, "idle action failed");
                        }
                    });
                }
            }
        }
    }

    fn sample_usage(&self, entry: &Arc<BoxEntry>, now: i64, sample_disk: bool) {
        let id = entry.rec.lock().unwrap().id.clone();
        let running = entry.status() == Status::Running;
        let hibernated = entry.rec.lock().unwrap().hibernated;
        let u = if hibernated { Default::default() } else { self.runtime.usage(&id) };
        let disk = if sample_disk { Some(self.runtime.disk_usage(&id)) } else { None };
        let mut r = entry.rec.lock().unwrap();
        let dt_ms = TICK.as_millis() as u64;
        let c = &mut r.usage;
        if running {
            c.active_ms += dt_ms;
        }
        if u.cpu_nanos >= c.last_cpu_nanos {
            c.vcpu_seconds += (u.cpu_nanos - c.last_cpu_nanos) as f64 / 1e9;
        } else {
            c.vcpu_seconds += u.cpu_nanos as f64 / 1e9; // counter restarted (reboot after hibernation)
        }
        c.last_cpu_nanos = u.cpu_nanos;
        c.memory_bytes = u.memory_bytes;
        if let Some(d) = disk {
            c.disk_bytes = d;
        }
        let secs = dt_ms as f64 / 1000.0;
        c.memory_gb_seconds += u.memory_bytes as f64 / (1u64 << 30) as f64 * secs;
        c.disk_gb_seconds += c.disk_bytes as f64 / (1u64 << 30) as f64 * secs;
        let new_ooms = u.oom_kills.saturating_sub(c.oom_kills);
        c.oom_kills = c.oom_kills.max(u.oom_kills);
        let limit_gib = r.limits.memory_bytes as f64 / (1u64 << 30) as f64;
        drop(r);
        if new_ooms > 0 {
            self.log(
                &id,
                "exec",
                "error",
                Some(format!(
                    "out of memory: the kernel killed {new_ooms} process(es) of this devbox at its {limit_gib} GiB limit; \
                     use a larger resource_size_request or custom_gb_memory"
                )),
                None,
                None,
            );
        }
        // Persist now and then; a crash loses at most this much accounting.
        if now % 30_000 < TICK.as_millis() as i64 {
            self.persist(&entry.snapshot());
        }
    }

    /// The box's processes vanished under us (killed from outside, or its init crashed).
    fn box_died(&self, entry: &Arc<BoxEntry>) {
        let rec = entry.snapshot();
        let reason = if rec.usage.oom_kills > 0 {
            "out_of_memory"
        } else if rec.usage.disk_bytes > 0 && rec.usage.disk_bytes >= rec.limits.disk_bytes / 100 * 98 {
            "out_of_disk"
        } else {
            "execution_failed"
        };
        tracing::warn!(id = %rec.id, reason, "devbox processes are gone");
        entry.rec.lock().unwrap().failure_detail = Some("the devbox's init process died".into());
        *entry.agent.lock().unwrap() = None;
        for exec in entry.execs.lock().unwrap().values() {
            if exec.status() != ExecStatus::Completed {
                exec.stderr.push(b"devboxd: the devbox died while the command ran\n");
                self.finish_exec(&rec.id, exec, 137, None, "exec");
            }
        }
        self.transition(entry, Status::Failure, Some(reason.to_string()));
        if let Some(dir) = self.exec_dir(&rec.id) {
            let _ = std::fs::remove_dir_all(dir);
        }
        let (rt, id, state) = (self.runtime.clone(), rec.id.clone(), rec.runtime_state.clone());
        tokio::spawn(async move {
            let _ = rt.destroy(&id, &state).await;
        });
    }

    /// Persist usage counters (called periodically and at exit).
    pub fn flush_usage(&self) {
        let entries: Vec<Arc<BoxEntry>> = self.boxes.read().unwrap().values().cloned().collect();
        for e in entries {
            if !e.status().is_terminal() {
                self.persist(&e.snapshot());
            }
        }
    }

    /// The server is stopping.
    pub async fn on_exit(self: &Arc<Self>, mode: ExitMode) {
        self.flush_usage();
        if mode == ExitMode::Keep {
            return;
        }
        let entries: Vec<Arc<BoxEntry>> = self.boxes.read().unwrap().values().cloned().collect();
        for entry in entries {
            let (id, tenant) = {
                let r = entry.rec.lock().unwrap();
                (r.id.clone(), r.tenant.clone())
            };
            match (mode, entry.status()) {
                (_, s) if s.is_terminal() => {}
                (ExitMode::Shutdown, _) => {
                    let _ = self.shutdown(&tenant, &id, "api_shutdown", true).await;
                }
                (ExitMode::Hibernate, Status::Running | Status::Suspended) => {
                    let _ = self.hibernate_now(&tenant, &id).await;
                }
                _ => {}
            }
        }
    }
}
