//! The host <-> agent contract.
//!
//! Transport: HTTP/2 (prior knowledge, no TLS) over one byte stream per box — a unix socket for
//! containers, a virtio-serial port for VMs. Every request and response type lives here so the
//! host and the agent cannot drift apart. See `docs/protocol.md` for the compatibility rules.

use serde::{Deserialize, Serialize};

mod body;
mod frame;
pub mod pty;
pub use body::{BodyError, ChannelBody};
pub use frame::{Frame, FrameDecoder, FrameError, FrameKind, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD};

/// Bumped on any incompatible change. The host refuses agents whose major version differs.
pub const PROTOCOL_VERSION: u32 = 1;

/// Paths of the agent's HTTP/2 endpoints.
pub mod paths {
    pub const HELLO: &str = "/v1/hello";
    pub const SETUP: &str = "/v1/setup";
    pub const EXEC: &str = "/v1/exec";
    /// `/v1/exec/{id}/stdin` and `/v1/exec/{id}/signal` are built with [`exec_path`].
    pub const FILES: &str = "/v1/files";

    pub fn exec_path(exec_id: &str, action: &str) -> String {
        format!("/v1/exec/{exec_id}/{action}")
    }
}

/// Answer to `GET /v1/hello`: the readiness handshake. The agent only answers once it can serve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
}

/// A Linux account inside the box.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl UserSpec {
    pub fn root() -> Self {
        UserSpec { name: "root".into(), uid: 0, gid: 0, home: "/root".into() }
    }
}

/// `POST /v1/setup`: make the box ready for its user (account, home, sudo). Idempotent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetupRequest {
    pub user: UserSpec,
    /// Grant the user passwordless sudo.
    pub sudo: bool,
}

/// `POST /v1/exec`: start a process. The response body is a stream of [`Frame`]s:
/// one `Started`, any number of `Stdout`/`Stderr`, then exactly one `Exit` (or `Error`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Run through `bash -lc <command>` when `shell` is true, else `argv`.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default = "yes")]
    pub shell: bool,
    pub user: UserSpec,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep stdin open for `/v1/exec/{id}/stdin`; otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Host-chosen id (so the host knows it before the agent answers and can reattach after
    /// a crash); the agent makes one up when absent. Letters, digits, `_` and `-` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Query of `GET /v1/exec/{id}/attach`: replay output from these byte offsets, then follow.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct AttachQuery {
    #[serde(default)]
    pub stdout: u64,
    #[serde(default)]
    pub stderr: u64,
}

/// Payload of the `Skipped` frame: output between `from` and `to` of one stream was dropped
/// by the agent's bounded buffer before the host could read it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    /// 1 stdout, 2 stderr.
    pub stream: u8,
    pub from: u64,
    pub to: u64,
}

fn yes() -> bool {
    true
}

/// Payload of the `Started` frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    pub exec_id: String,
    /// Pid inside the box's pid namespace.
    pub pid: i32,
}

/// Payload of the `Exit` frame.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    /// Exit code if the process exited normally.
    pub code: Option<i32>,
    /// Signal number if it was killed.
    pub signal: Option<i32>,
}

impl Exit {
    /// Shell convention: the exit code, or 128 + signal.
    pub fn status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }
}

/// `POST /v1/exec/{id}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalRequest {
    pub signal: i32,
    /// Signal the whole process group (every execution runs in its own group).
    #[serde(default = "yes")]
    pub group: bool,
}

/// `POST /v1/exec/{id}/stdin?close=1`: the body is written to the process's stdin; `close`
/// closes stdin after writing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StdinQuery {
    #[serde(default)]
    pub close: bool,
}

/// Query of `GET /v1/files` (stream a file out) and `PUT /v1/files` (stream a file in).
/// `path` must be absolute; the host resolves relative paths against the user's home.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileQuery {
    pub path: String,
    /// Owner for files and parent directories created by a PUT.
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// Error body of every non-2xx agent answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    IsADirectory,
    PermissionDenied,
    NoSpace,
    Io,
    Unsupported,
    /// The resource is busy: a terminal session already has a client attached.
    Conflict,
}

impl ErrorKind {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest | ErrorKind::IsADirectory => 400,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::NoSpace => 507,
            ErrorKind::Io => 500,
            ErrorKind::Unsupported => 501,
            ErrorKind::Conflict => 409,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frozen wire shapes: an old agent inside an old snapshot must still be understood.
    #[test]
    fn wire_shapes_are_frozen() {
        let req = ExecRequest {
            command: "echo hi".into(),
            argv: vec![],
            shell: true,
            user: UserSpec::root(),
            env: vec![("A".into(), "b".into())],
            cwd: None,
            stdin: false,
            id: None,
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"command":"echo hi","argv":[],"shell":true,"user":{"name":"root","uid":0,"gid":0,"home":"/root"},"env":[["A","b"]],"cwd":null,"stdin":false}"#
        );
        let minimal: ExecRequest =
            serde_json::from_str(r#"{"command":"x","user":{"name":"u","uid":1,"gid":1,"home":"/h"}}"#).unwrap();
        assert!(minimal.shell);
        assert_eq!(
            serde_json::to_string(&Exit { code: None, signal: Some(9) }).unwrap(),
            r#"{"code":null,"signal":9}"#
        );
        assert_eq!(serde_json::to_string(&ErrorKind::NotFound).unwrap(), r#""not_found""#);
    }

    #[test]
    fn exit_status_follows_shell_convention() {
        assert_eq!(Exit { code: Some(3), signal: None }.status(), 3);
        assert_eq!(Exit { code: None, signal: Some(9) }.status(), 137);
    }
}

/// Boot file of `devbox-agent container-init BOOT.json`, written by the container runtime.
/// All paths are host paths; the agent reads it before it leaves the host's view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerBoot {
    /// Read-only layers, topmost first (overlayfs `lowerdir` order).
    pub lower_dirs: Vec<String>,
    pub upper_dir: String,
    pub work_dir: String,
    /// Empty directory where the box's root is assembled.
    pub root_dir: String,
    pub hostname: String,
    /// The agent binds this unix socket before it pivots, so the host can reach the agent
    /// while no process in the box can see the socket.
    pub socket_path: String,
    /// `cgroup.procs` files to join before anything else happens.
    pub cgroup_procs: Vec<String>,
    /// Written with the pid (host view) of the box's init once it exists.
    pub pid_file: String,
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AgentError {}
