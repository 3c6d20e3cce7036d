//! Response shapes of the Runloop API, rendered from core records.

use devbox_core::{Devbox, ExecView, Snapshot, SnapshotStatus};
use serde_json::{json, Value};

pub fn devbox(d: &Devbox) -> Value {
    let mut v = json!({
        "id": d.id,
        "status": d.status.as_str(),
        "capabilities": [],
        "create_time_ms": d.create_time_ms,
        "launch_parameters": d.launch_parameters,
        "metadata": d.metadata,
        "state_transitions": d.state_transitions,
        "name": d.name,
        "end_time_ms": d.end_time_ms,
        "shutdown_reason": d.shutdown_reason,
        "failure_reason": d.failure_reason,
        "blueprint_id": null,
        "snapshot_id": d.snapshot_id,
        "initiator_type": "api",
        // Whether a suspended box kept its memory (frozen) or only its disk (hibernated).
        "hibernated": d.hibernated,
    });
    if let Some(detail) = &d.failure_detail {
        v["failure_detail"] = json!(detail);
    }
    v
}

pub fn execution(e: &ExecView) -> Value {
    let mut v = json!({
        "devbox_id": e.devbox_id,
        "execution_id": e.execution_id,
        "status": e.status,
        "exit_status": e.exit_status,
        "stdout": e.stdout,
        "stderr": e.stderr,
        "stdout_truncated": e.stdout_truncated,
        "stderr_truncated": e.stderr_truncated,
    });
    if let Some(s) = &e.shell_name {
        v["shell_name"] = json!(s);
    }
    v
}

pub fn snapshot(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "create_time_ms": s.create_time_ms,
        "metadata": s.metadata,
        "source_devbox_id": s.source_devbox_id,
        "name": s.name,
        "commit_message": s.commit_message,
        "size_bytes": s.size_bytes,
        "source_blueprint_id": null,
    })
}

pub fn snapshot_status(s: &Snapshot) -> Value {
    let status = match s.status {
        SnapshotStatus::InProgress => "in_progress",
        SnapshotStatus::Complete => "complete",
        SnapshotStatus::Error => "error",
        SnapshotStatus::Deleted => "deleted",
    };
    json!({
        "status": status,
        "error_message": s.error_message,
        "snapshot": if s.status == SnapshotStatus::Complete { snapshot(s) } else { Value::Null },
    })
}
