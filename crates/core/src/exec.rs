//! Executions: one command run in a box, its output and its outcome.

use crate::output::OutputBuf;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    Queued,
    Running,
    Completed,
}

impl ExecStatus {
    pub fn parse(s: &str) -> Option<ExecStatus> {
        match s {
            "queued" => Some(ExecStatus::Queued),
            "running" => Some(ExecStatus::Running),
            "completed" => Some(ExecStatus::Completed),
            _ => None,
        }
    }
}

/// What the store keeps of an execution (output lives in files beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRecord {
    pub id: String,
    pub devbox_id: String,
    pub command: String,
    pub shell_name: Option<String>,
    pub attach_stdin: bool,
    pub command_id: Option<String>,
    pub status: ExecStatus,
    pub exit_status: Option<i32>,
    pub create_time_ms: i64,
    pub end_time_ms: Option<i64>,
    /// Bytes the agent dropped before the host read them, per stream; with the bytes on disk
    /// this gives the agent offsets to reattach from.
    #[serde(default)]
    pub skipped: [u64; 2],
}

pub struct Execution {
    pub id: String,
    pub devbox_id: String,
    pub command: String,
    pub shell_name: Option<String>,
    pub command_id: Option<String>,
    pub stdout: OutputBuf,
    pub stderr: OutputBuf,
    pub attach_stdin: bool,
    pub create_time_ms: i64,
    state: Mutex<State>,
    status: watch::Sender<ExecStatus>,
}

#[derive(Default)]
struct State {
    exit_status: Option<i32>,
    started: bool,
    end_time_ms: Option<i64>,
    skipped: [u64; 2],
}

/// What the API shows of an execution.
#[derive(Debug, Clone)]
pub struct ExecView {
    pub devbox_id: String,
    pub execution_id: String,
    pub status: ExecStatus,
    pub exit_status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub shell_name: Option<String>,
}

impl Execution {
    /// `out_dir`: where output files go (None keeps output in memory only).
    pub fn new(rec: &ExecRecord, out_dir: Option<&Path>) -> Self {
        let buf = |ext: &str| match out_dir {
            Some(d) => OutputBuf::at(&d.join(format!("{}.{ext}", rec.id))),
            None => OutputBuf::default(),
        };
        let e = Execution {
            id: rec.id.clone(),
            devbox_id: rec.devbox_id.clone(),
            command: rec.command.clone(),
            shell_name: rec.shell_name.clone(),
            command_id: rec.command_id.clone(),
            attach_stdin: rec.attach_stdin,
            create_time_ms: rec.create_time_ms,
            stdout: buf("stdout"),
            stderr: buf("stderr"),
            state: Mutex::new(State {
                exit_status: rec.exit_status,
                started: rec.status != ExecStatus::Queued,
                end_time_ms: rec.end_time_ms,
                skipped: rec.skipped,
            }),
            status: watch::channel(rec.status).0,
        };
        if rec.status == ExecStatus::Completed {
            e.stdout.finish();
            e.stderr.finish();
        }
        e
    }

    pub fn record(&self) -> ExecRecord {
        let st = self.state.lock().unwrap();
        ExecRecord {
            id: self.id.clone(),
            devbox_id: self.devbox_id.clone(),
            command: self.command.clone(),
            shell_name: self.shell_name.clone(),
            attach_stdin: self.attach_stdin,
            command_id: self.command_id.clone(),
            status: self.status(),
            exit_status: st.exit_status,
            create_time_ms: self.create_time_ms,
            end_time_ms: st.end_time_ms,
            skipped: st.skipped,
        }
    }

    pub fn status(&self) -> ExecStatus {
        *self.status.borrow()
    }

    pub fn exit_status(&self) -> Option<i32> {
        self.state.lock().unwrap().exit_status
    }

    pub(crate) fn started(&self) -> bool {
        self.state.lock().unwrap().started
    }

    pub(crate) fn set_running(&self) {
        self.state.lock().unwrap().started = true;
        self.status.send_if_modified(|s| {
            if *s == ExecStatus::Queued {
                *s = ExecStatus::Running;
                true
            } else {
                false
            }
        });
    }

    /// A gap the agent reported in stream 1 (stdout) or 2 (stderr).
    pub(crate) fn add_skipped(&self, stream: u8, bytes: u64) {
        let idx = if stream == 1 { 0 } else { 1 };
        self.state.lock().unwrap().skipped[idx] += bytes;
        if stream == 1 {
            self.stdout.mark_lossy()
        } else {
            self.stderr.mark_lossy()
        }
    }

    /// Agent-side offsets of what the host has on disk, to reattach from.
    pub(crate) fn agent_offsets(&self) -> (u64, u64) {
        let sk = self.state.lock().unwrap().skipped;
        let off = |b: &OutputBuf, s: u64| match b.disk_len() {
            Some(n) if n >= crate::output::OUTPUT_DISK_CAP => u64::MAX, // agent clamps to its end
            Some(n) => n + s,
            None => b.total() + s,
        };
        (off(&self.stdout, sk[0]), off(&self.stderr, sk[1]))
    }

    /// Record the outcome once; later calls are ignored. Returns whether this call did it.
    pub(crate) fn complete(&self, exit_status: i32) -> bool {
        {
            let mut st = self.state.lock().unwrap();
            if st.exit_status.is_some() {
                return false;
            }
            st.exit_status = Some(exit_status);
            st.end_time_ms = Some(crate::now_ms());
        }
        self.stdout.finish();
        self.stderr.finish();
        self.status.send_replace(ExecStatus::Completed);
        true
    }

    pub fn subscribe(&self) -> watch::Receiver<ExecStatus> {
        self.status.subscribe()
    }

    /// Wait until the status is one of `statuses`; false on timeout.
    pub async fn wait_for(&self, statuses: &[ExecStatus], timeout: std::time::Duration) -> bool {
        let mut rx = self.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|s| statuses.contains(s))).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// `last_n`: lines of each stream to include (default 100, like Runloop).
    pub fn view(&self, last_n: Option<usize>) -> ExecView {
        let n = last_n.unwrap_or(100);
        let (o, e) = (self.stdout.last_lines(n), self.stderr.last_lines(n));
        ExecView {
            devbox_id: self.devbox_id.clone(),
            execution_id: self.id.clone(),
            status: self.status(),
            exit_status: self.exit_status(),
            stdout: o.text,
            stderr: e.text,
            stdout_truncated: o.truncated,
            stderr_truncated: e.truncated,
            shell_name: self.shell_name.clone(),
        }
    }
}
