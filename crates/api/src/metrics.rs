//! `GET /metrics` in the Prometheus text format: devboxes by status, API latency, executions,
//! snapshot and create durations, host free memory and disk. Aggregates only (no ids), so it
//! is served without an API key, like most exporters.

use crate::AppState;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use devbox_core::metrics::{Histogram, LATENCY_BUCKETS};
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type Key = (String, String, u16);

fn requests() -> &'static Mutex<BTreeMap<Key, Histogram>> {
    static R: OnceLock<Mutex<BTreeMap<Key, Histogram>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Time every routed request by method, route template and status.
pub async fn track(req: Request, next: Next) -> Response {
    // Unknown methods collapse into one label: clients must not grow this map at will.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_string(),
        _ => "OTHER".to_string(),
    };
    let route =
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let resp = next.run(req).await;
    let key = (method, route, resp.status().as_u16());
    requests()
        .lock()
        .unwrap()
        .entry(key)
        .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
        .observe(start.elapsed().as_secs_f64());
    resp
}

fn meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024))
}

fn disk_free(path: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() * st.fragment_size())
}

pub async fn render(st: AppState) -> Response {
    let s = st.manager.stats();
    let mut out = String::new();
    out.push_str("# HELP devboxd_devboxes Devboxes by status.\n# TYPE devboxd_devboxes gauge\n");
    for (status, n) in &s.devboxes_by_status {
        out.push_str(&format!("devboxd_devboxes{{status=\"{status}\"}} {n}\n"));
    }
    out.push_str("# HELP devboxd_executions_total Executions started.\n# TYPE devboxd_executions_total counter\n");
    out.push_str(&format!("devboxd_executions_total {}\n", s.executions_total));
    out.push_str(
        "# HELP devboxd_executions_running Executions not completed.\n# TYPE devboxd_executions_running gauge\n",
    );
    out.push_str(&format!("devboxd_executions_running {}\n", s.executions_running));
    out.push_str("# HELP devboxd_snapshot_duration_seconds Disk snapshot durations.\n# TYPE devboxd_snapshot_duration_seconds histogram\n");
    s.snapshot_seconds.render("devboxd_snapshot_duration_seconds", "", &mut out);
    out.push_str("# HELP devboxd_boot_duration_seconds Devbox boot durations (create to running).\n# TYPE devboxd_boot_duration_seconds histogram\n");
    s.create_seconds.render("devboxd_boot_duration_seconds", "", &mut out);
    out.push_str("# HELP devboxd_api_request_duration_seconds API latency.\n# TYPE devboxd_api_request_duration_seconds histogram\n");
    for ((method, route, status), h) in requests().lock().unwrap().iter() {
        let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
        h.render("devboxd_api_request_duration_seconds", &labels, &mut out);
    }
    if let Some(m) = meminfo("MemAvailable:") {
        out.push_str("# HELP devboxd_host_memory_available_bytes Host memory available.\n# TYPE devboxd_host_memory_available_bytes gauge\n");
        out.push_str(&format!("devboxd_host_memory_available_bytes {m}\n"));
    }
    if let Some(d) = st.data_dir.as_deref().and_then(disk_free) {
        out.push_str("# HELP devboxd_host_disk_available_bytes Free space on the data dir's filesystem.\n# TYPE devboxd_host_disk_available_bytes gauge\n");
        out.push_str(&format!("devboxd_host_disk_available_bytes {d}\n"));
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
