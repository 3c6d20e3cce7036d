//! Domain records. Serialized into the store as JSON; field names follow the Runloop API so the
//! edge can render them without renaming.

use crate::{CoreError, Result};
use devbox_runtime::Limits;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Provisioning,
    Initializing,
    Running,
    Suspending,
    Suspended,
    Resuming,
    Failure,
    Shutdown,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Queued,
        Status::Provisioning,
        Status::Initializing,
        Status::Running,
        Status::Suspending,
        Status::Suspended,
        Status::Resuming,
        Status::Failure,
        Status::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Provisioning => "provisioning",
            Status::Initializing => "initializing",
            Status::Running => "running",
            Status::Suspending => "suspending",
            Status::Suspended => "suspended",
            Status::Resuming => "resuming",
            Status::Failure => "failure",
            Status::Shutdown => "shutdown",
        }
    }

    /// Accepts `scheduled`, the deprecated alias of `queued`.
    pub fn parse(s: &str) -> Option<Status> {
        if s == "scheduled" {
            return Some(Status::Queued);
        }
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Failure | Status::Shutdown)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Transition {
    pub status: Status,
    pub transition_time_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AfterIdle {
    pub idle_time_seconds: i64,
    pub on_idle: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LifecycleHooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_commands: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_deadline_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Lifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_idle: Option<AfterIdle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_hooks: Option<LifecycleHooks>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// What to do with a box nobody uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdle {
    Shutdown,
    Suspend,
}

/// Lifecycle policy resolved from launch parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Shut down this long after creation or the last keep_alive (None when idle rules apply).
    pub keep_alive_ms: Option<i64>,
    pub idle: Option<(i64, OnIdle)>,
    pub suspend_commands: Vec<String>,
    pub suspend_deadline_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UserParameters {
    pub username: String,
    pub uid: i64,
}

/// `launch_parameters` of a create request. Unknown fields are kept (echoed back) but ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LaunchParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_size_request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_cpu_cores: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_gb_memory: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_disk_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_time_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_commands: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_parameters: Option<UserParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_idle: Option<AfterIdle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Resolved size of a box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Size {
    pub cpu_cores: f64,
    pub memory_gb: i64,
    pub disk_gb: i64,
}

const GIB: u64 = 1 << 30;
/// Processes and threads one box may hold, per GiB of memory (a fork bomb stops there).
pub const PIDS_PER_GB: u32 = 512;

impl LaunchParameters {
    /// Resource size from `resource_size_request` and `custom_*`, validated like Runloop does.
    pub fn size(&self) -> Result<Size> {
        let preset = |c, m, d| Size { cpu_cores: c, memory_gb: m, disk_gb: d };
        let base = match self.resource_size_request.as_deref() {
            None | Some("SMALL") => preset(1.0, 2, 4),
            Some("X_SMALL") => preset(0.5, 1, 4),
            Some("MEDIUM") => preset(2.0, 4, 8),
            Some("LARGE") => preset(2.0, 8, 16),
            Some("X_LARGE") => preset(4.0, 16, 16),
            Some("XX_LARGE") => preset(8.0, 32, 16),
            Some("CUSTOM_SIZE") => preset(1.0, 2, 4),
            Some(other) => {
                return Err(CoreError::BadRequest(format!(
                    "unknown resource_size_request {other:?}: use X_SMALL, SMALL, MEDIUM, LARGE, X_LARGE, XX_LARGE or CUSTOM_SIZE"
                )))
            }
        };
        let custom = self.resource_size_request.as_deref() == Some("CUSTOM_SIZE");
        let mut s = base;
        if custom {
            if let Some(c) = self.custom_cpu_cores {
                if !(c == 0.5 || c == 1.0 || ((2.0..=16.0).contains(&c) && c % 2.0 == 0.0)) {
                    return Err(CoreError::BadRequest(
                        "custom_cpu_cores must be 0.5, 1 or a multiple of 2 up to 16".into(),
                    ));
                }
                s.cpu_cores = c;
            }
            if let Some(m) = self.custom_gb_memory {
                if !(m == 1 || ((2..=64).contains(&m) && m % 2 == 0)) {
                    return Err(CoreError::BadRequest("custom_gb_memory must be 1 or a multiple of 2 up to 64".into()));
                }
                s.memory_gb = m;
            }
            if let Some(d) = self.custom_disk_size {
                if !(2..=64).contains(&d) || d % 2 != 0 {
                    return Err(CoreError::BadRequest("custom_disk_size must be a multiple of 2 from 2 to 64".into()));
                }
                s.disk_gb = d;
            }
        } else if self.custom_cpu_cores.is_some() || self.custom_gb_memory.is_some() || self.custom_disk_size.is_some()
        {
            return Err(CoreError::BadRequest(
                "custom_cpu_cores, custom_gb_memory and custom_disk_size need resource_size_request CUSTOM_SIZE".into(),
            ));
        }
        Ok(s)
    }

    /// The lifecycle policy, validated like Runloop does.
    pub fn policy(&self) -> Result<Policy> {
        let nested = self.lifecycle.as_ref().and_then(|l| l.after_idle.clone());
        if let (Some(a), Some(b)) = (&self.after_idle, &nested) {
            if a != b {
                return Err(CoreError::BadRequest(
                    "after_idle and lifecycle.after_idle differ: give one, or the same in both".into(),
                ));
            }
        }
        let idle = match self.after_idle.clone().or(nested) {
            None => None,
            Some(a) => {
                if a.idle_time_seconds <= 0 {
                    return Err(CoreError::BadRequest("after_idle.idle_time_seconds must be positive".into()));
                }
                let on = match a.on_idle.as_str() {
                    "shutdown" => OnIdle::Shutdown,
                    "suspend" => OnIdle::Suspend,
                    other => {
                        return Err(CoreError::BadRequest(format!(
                            "after_idle.on_idle must be \"shutdown\" or \"suspend\", got {other:?}"
                        )))
                    }
                };
                Some((a.idle_time_seconds * 1000, on))
            }
        };
        let keep_alive_ms = match self.keep_alive_time_seconds {
            Some(k) if !(1..=172_800).contains(&k) => {
                return Err(CoreError::BadRequest("keep_alive_time_seconds must be between 1 and 172800".into()))
            }
            _ if idle.is_some() => None,
            Some(k) => Some(k * 1000),
            None => Some(3600 * 1000),
        };
        let hooks = self.lifecycle.as_ref().and_then(|l| l.lifecycle_hooks.clone()).unwrap_or_default();
        let deadline = hooks.suspend_deadline_ms.unwrap_or(30_000);
        if !(0..=60_000).contains(&deadline) {
            return Err(CoreError::BadRequest("suspend_deadline_ms must be between 0 and 60000".into()));
        }
        Ok(Policy {
            keep_alive_ms,
            idle,
            suspend_commands: hooks.suspend_commands.unwrap_or_default(),
            suspend_deadline_ms: deadline,
        })
    }

    pub fn limits(&self) -> Result<Limits> {
        let s = self.size()?;
        Ok(Limits {
            cpu_millis: (s.cpu_cores * 1000.0) as u32,
            memory_bytes: s.memory_gb as u64 * GIB,
            pids: (PIDS_PER_GB * s.memory_gb as u32).clamp(512, 16384),
            disk_bytes: s.disk_gb as u64 * GIB,
        })
    }
}

/// Parameters of `create`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateDevbox {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub environment_variables: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub launch_parameters: Option<LaunchParameters>,
    #[serde(default)]
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub blueprint_id: Option<String>,
    #[serde(default)]
    pub blueprint_name: Option<String>,
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// The box's Linux account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoxUser {
    pub name: String,
    pub uid: u32,
}

impl BoxUser {
    pub fn spec(&self) -> devbox_protocol::UserSpec {
        if self.uid == 0 {
            return devbox_protocol::UserSpec { name: self.name.clone(), uid: 0, gid: 0, home: "/root".into() };
        }
        devbox_protocol::UserSpec {
            name: self.name.clone(),
            uid: self.uid,
            gid: self.uid,
            home: format!("/home/{}", self.name),
        }
    }
}

/// A devbox as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Devbox {
    pub id: String,
    pub tenant: String,
    pub seq: i64,
    pub name: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub status: Status,
    pub create_time_ms: i64,
    pub end_time_ms: Option<i64>,
    pub launch_parameters: LaunchParameters,
    pub state_transitions: Vec<Transition>,
    pub shutdown_reason: Option<String>,
    pub failure_reason: Option<String>,
    /// Human-readable cause of a failure, beyond the API's enum.
    pub failure_detail: Option<String>,
    pub environment_variables: BTreeMap<String, String>,
    pub entrypoint: Option<String>,
    pub user: BoxUser,
    pub limits: Limits,
    pub request_id: Option<String>,
    pub runtime_state: serde_json::Value,
    /// The snapshot this box was created from.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Snapshot layers under the box's own writable layer, topmost first.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Start of the current keep-alive period (creation or the last keep_alive).
    #[serde(default)]
    pub keep_alive_from_ms: i64,
    /// The box's processes were stopped while suspended; its disk is kept and it boots again
    /// (running launch_commands) on resume.
    #[serde(default)]
    pub hibernated: bool,
    #[serde(default)]
    pub usage: UsageCounters,
}

/// Accumulated resource use of a box.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageCounters {
    pub active_ms: u64,
    pub vcpu_seconds: f64,
    pub memory_gb_seconds: f64,
    pub disk_gb_seconds: f64,
    /// Last cumulative CPU reading of the box's cgroup (to add deltas).
    pub last_cpu_nanos: u64,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    /// Processes of the box the kernel killed for memory.
    #[serde(default)]
    pub oom_kills: u64,
}

impl Devbox {
    pub fn set_status(&mut self, status: Status, failure_reason: Option<String>) {
        self.status = status;
        self.state_transitions.push(Transition {
            status,
            transition_time_ms: crate::now_ms(),
            failure_reason: failure_reason.clone(),
        });
        if failure_reason.is_some() {
            self.failure_reason = failure_reason;
        }
        if status.is_terminal() && self.end_time_ms.is_none() {
            self.end_time_ms = Some(crate::now_ms());
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    InProgress,
    Complete,
    Error,
    Deleted,
}

/// A disk snapshot: the writable layer of a box at one instant, stacked on its parents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub tenant: String,
    pub seq: i64,
    pub name: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub commit_message: Option<String>,
    pub source_devbox_id: String,
    pub create_time_ms: i64,
    pub status: SnapshotStatus,
    pub error_message: Option<String>,
    pub size_bytes: Option<u64>,
    /// Parent snapshot layers (ids), topmost first; this snapshot's own layer goes on top.
    pub parents: Vec<String>,
}

/// Parameters of `snapshot_disk` and of a snapshot update.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SnapshotParams {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub commit_message: Option<String>,
}

/// One entry of `GET /v1/devboxes/{id}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    /// `info` or `error`.
    pub level: String,
    /// `setup_commands`, `entrypoint`, `exec` or `files`.
    pub source: String,
    pub timestamp_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shell_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_runloop_presets_and_rules() {
        let lp = |j: &str| serde_json::from_str::<LaunchParameters>(j).unwrap();
        assert_eq!(lp("{}").size().unwrap(), Size { cpu_cores: 1.0, memory_gb: 2, disk_gb: 4 });
        assert_eq!(lp(r#"{"resource_size_request":"LARGE"}"#).size().unwrap().memory_gb, 8);
        let c = lp(r#"{"resource_size_request":"CUSTOM_SIZE","custom_cpu_cores":0.5,"custom_gb_memory":1}"#);
        assert_eq!(c.limits().unwrap().cpu_millis, 500);
        assert_eq!(c.limits().unwrap().memory_bytes, 1 << 30);
        assert!(lp(r#"{"resource_size_request":"HUGE"}"#).size().is_err());
        assert!(lp(r#"{"resource_size_request":"CUSTOM_SIZE","custom_gb_memory":3}"#).size().is_err());
        assert!(lp(r#"{"custom_gb_memory":2}"#).size().is_err());
    }

    #[test]
    fn lifecycle_policy_rules() {
        let lp = |j: &str| serde_json::from_str::<LaunchParameters>(j).unwrap();
        let p = lp("{}").policy().unwrap();
        assert_eq!(p.keep_alive_ms, Some(3_600_000));
        assert_eq!(p.idle, None);
        let p = lp(r#"{"keep_alive_time_seconds":60,"lifecycle":{"after_idle":{"idle_time_seconds":5,"on_idle":"suspend"},"lifecycle_hooks":{"suspend_commands":["sync"]}}}"#).policy().unwrap();
        assert_eq!(p.keep_alive_ms, None, "after_idle wins over keep_alive_time_seconds");
        assert_eq!(p.idle, Some((5000, OnIdle::Suspend)));
        assert_eq!(p.suspend_commands, vec!["sync".to_string()]);
        assert!(lp(r#"{"after_idle":{"idle_time_seconds":5,"on_idle":"nap"}}"#).policy().is_err());
        assert!(lp(r#"{"keep_alive_time_seconds":0}"#).policy().is_err());
        assert!(lp(r#"{"after_idle":{"idle_time_seconds":5,"on_idle":"shutdown"},"lifecycle":{"after_idle":{"idle_time_seconds":6,"on_idle":"shutdown"}}}"#).policy().is_err());
    }

    #[test]
    fn unknown_launch_parameters_are_echoed() {
        let j = r#"{"launch_commands":["a"],"available_ports":[8080]}"#;
        let lp: LaunchParameters = serde_json::from_str(j).unwrap();
        let back = serde_json::to_value(&lp).unwrap();
        assert_eq!(back["available_ports"][0], 8080);
        assert_eq!(back["launch_commands"][0], "a");
    }

    #[test]
    fn status_names() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(Status::parse("scheduled"), Some(Status::Queued));
        assert_eq!(Status::parse("nope"), None);
    }
}
