//! Executions: one command run in a box, its output and its outcome.

use crate::output::OutputBuf;
use serde::Serialize;
use std::sync::Mutex;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
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

pub struct Execution {
    pub id: String,
    pub devbox_id: String,
    pub command: String,
    pub shell_name: Option<String>,
    pub stdout: OutputBuf,
    pub stderr: OutputBuf,
    pub attach_stdin: bool,
    state: Mutex<State>,
    status: watch::Sender<ExecStatus>,
}

#[derive(Default)]
struct State {
    exit_status: Option<i32>,
    agent_exec_id: Option<String>,
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
    pub fn new(id: String, devbox_id: String, command: String, shell_name: Option<String>, attach_stdin: bool) -> Self {
        Execution {
            id,
            devbox_id,
            command,
            shell_name,
            attach_stdin,
            stdout: OutputBuf::default(),
            stderr: OutputBuf::default(),
            state: Mutex::new(State::default()),
            status: watch::channel(ExecStatus::Queued).0,
        }
    }

    pub fn status(&self) -> ExecStatus {
        *self.status.borrow()
    }

    pub fn exit_status(&self) -> Option<i32> {
        self.state.lock().unwrap().exit_status
    }

    pub fn agent_exec_id(&self) -> Option<String> {
        self.state.lock().unwrap().agent_exec_id.clone()
    }

    pub(crate) fn set_running(&self, agent_exec_id: String) {
        self.state.lock().unwrap().agent_exec_id = Some(agent_exec_id);
        self.status.send_if_modified(|s| {
            if *s == ExecStatus::Queued {
                *s = ExecStatus::Running;
                true
            } else {
                false
            }
        });
    }

    /// Record the outcome once; later calls are ignored.
    pub(crate) fn complete(&self, exit_status: i32) {
        {
            let mut st = self.state.lock().unwrap();
            if st.exit_status.is_some() {
                return;
            }
            st.exit_status = Some(exit_status);
        }
        self.stdout.finish();
        self.stderr.finish();
        self.status.send_replace(ExecStatus::Completed);
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
