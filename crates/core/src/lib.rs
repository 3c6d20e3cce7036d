//! The devbox domain. HTTP never reaches this crate: the API layer turns requests into the
//! typed calls of [`Manager`] and maps [`CoreError`] to statuses at the edge.

mod error;
mod exec;
mod ids;
mod manager;
pub mod metrics;
mod model;
mod output;
mod store;

pub use error::CoreError;
pub use exec::{ExecRecord, ExecStatus, ExecView, Execution};
pub use ids::tenant_of_key;
pub use manager::{AgentAccess, ExecParams, ExitMode, Manager, ManagerConfig, MetadataFilter, Page, CREATE_HOLD};
pub use model::*;
pub use output::{OutputBuf, OutputSlice, OUTPUT_MEMORY_CAP};
pub use store::Store;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
