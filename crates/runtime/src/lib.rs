//! Runtimes: where a box lives. A box is something that boots, offers one byte stream to its
//! agent, can be frozen, thawed and destroyed. Everything runtime-specific stays below the
//! [`Runtime`] trait; the core only sees [`BoxSpec`], [`Launched`] and an [`AgentClient`].

pub mod agent_client;
pub mod container;
pub mod image;

pub use agent_client::{AgentClient, ByteStream, ExecStream};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the box's agent did not become ready: {0}")]
    AgentNotReady(String),
    #[error("agent speaks protocol {agent}, this server speaks {host}: rebuild the box's image or upgrade devboxd")]
    ProtocolMismatch { agent: u32, host: u32 },
    #[error("agent connection: {0}")]
    Transport(String),
    #[error("agent: {0}")]
    Agent(devbox_protocol::AgentError),
    #[error("image {0:?} is not built: run `devboxd image build`")]
    ImageMissing(String),
    #[error("image build failed: {0}")]
    ImageBuild(String),
    #[error("the box is gone (its processes no longer exist)")]
    Gone,
    #[error("{0}")]
    Unsupported(String),
}

impl RuntimeError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io { what: what.into(), source }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Resource limits of one box.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// CPU in thousandths of a core.
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub pids: u32,
    pub disk_bytes: u64,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BoxSpec {
    pub id: String,
    pub hostname: String,
    /// Image name (the base layer).
    pub image: String,
    /// Snapshot layers stacked on the image, topmost first (made by [`Runtime::snapshot`]).
    pub layers: Vec<std::path::PathBuf>,
    pub limits: Limits,
}

/// Runtime-private facts about a running box, persisted by the core so a restarted server
/// can find the box again.
pub type RuntimeState = serde_json::Value;

pub struct Launched {
    pub state: RuntimeState,
    pub agent: AgentClient,
}

/// Point-in-time resource counters of a box.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short name for logs ("container", "vm").
    fn kind(&self) -> &'static str;
    /// Boot a box and return once its agent answered the handshake.
    async fn create(&self, spec: &BoxSpec) -> Result<Launched>;
    /// Reconnect to a box booted by an earlier server process; `Gone` if it no longer exists.
    async fn attach(&self, id: &str, state: &RuntimeState) -> Result<AgentClient>;
    /// Whether the box's processes still exist.
    fn alive(&self, id: &str, state: &RuntimeState) -> bool;
    /// A client for the box's agent that connects on first use, without a handshake.
    fn agent(&self, id: &str) -> AgentClient;
    async fn freeze(&self, id: &str, state: &RuntimeState) -> Result<()>;
    async fn thaw(&self, id: &str, state: &RuntimeState) -> Result<()>;
    /// Copy the box's writable layer into `dest` (which must not exist) and return its size in
    /// bytes. The caller freezes the box around it so the copy is one instant of the disk.
    async fn snapshot(&self, id: &str, state: &RuntimeState, dest: &std::path::Path) -> Result<u64>;
    /// Kill every process of the box but keep its disk: `create` with the same id boots it
    /// again on that disk.
    async fn stop(&self, id: &str, state: &RuntimeState) -> Result<()>;
    /// Bytes the box's own writable layer uses.
    fn disk_usage(&self, id: &str) -> u64;
    /// Kill every process of the box and release its resources. Idempotent.
    async fn destroy(&self, id: &str, state: &RuntimeState) -> Result<()>;
    fn usage(&self, id: &str) -> Usage;
}
