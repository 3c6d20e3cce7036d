//! Disk snapshots: a box's writable layer copied at one instant (the box frozen meanwhile),
//! stacked on the layers it was itself created from. A box created from a snapshot adds a new
//! writable layer on top; nothing is copied at create time.

use super::{BoxEntry, Manager, Page};
use crate::ids::new_id;
use crate::model::{Snapshot, SnapshotParams, SnapshotStatus, Status};
use crate::{now_ms, CoreError, Result};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

/// `metadata[key]=value` (equality) and `metadata[key][in]=a,b` (any of) filters.
#[derive(Debug, Clone, Default)]
pub struct MetadataFilter {
    pub equals: Vec<(String, String)>,
    pub any_of: Vec<(String, Vec<String>)>,
}

impl MetadataFilter {
    fn matches(&self, s: &Snapshot) -> bool {
        self.equals.iter().all(|(k, v)| s.metadata.get(k) == Some(v))
            && self.any_of.iter().all(|(k, vs)| s.metadata.get(k).is_some_and(|v| vs.contains(v)))
    }
}

impl Manager {
    fn snapshots_dir(&self) -> Result<PathBuf> {
        self.cfg
            .data_dir
            .as_ref()
            .map(|d| d.join("snapshots"))
            .ok_or_else(|| CoreError::BadRequest("snapshots need a data dir".into()))
    }

    /// Directory holding a snapshot's layer.
    pub(crate) fn layer_dir(&self, snapshot_id: &str) -> Result<PathBuf> {
        Ok(self.snapshots_dir()?.join(snapshot_id).join("layer"))
    }

    pub(super) fn load_snapshots(&self) -> Result<()> {
        for mut s in self.store.all_snapshots()? {
            if s.status == SnapshotStatus::InProgress {
                // Interrupted by a server stop: never half-visible.
                s.status = SnapshotStatus::Error;
                s.error_message = Some("the server stopped while the snapshot was being taken: take it again".into());
                if let Ok(dir) = self.snapshots_dir() {
                    let _ = std::fs::remove_dir_all(dir.join(&s.id).join("layer.partial"));
                }
                self.store.put_snapshot(&s)?;
            }
            self.snapshots.lock().unwrap().insert(s.id.clone(), s);
        }
        Ok(())
    }

    fn snapshot_of(&self, tenant: &str, sid: &str) -> Result<Snapshot> {
        match self.snapshots.lock().unwrap().get(sid) {
            Some(s) if s.tenant == tenant => Ok(s.clone()),
            _ => Err(CoreError::NotFound(format!("snapshot {sid} not found"))),
        }
    }

    /// Layers (ids, topmost first) a new box from `sid` stacks on the image.
    pub(super) fn layers_for_create(&self, tenant: &str, sid: &str) -> Result<Vec<String>> {
        let s = self.snapshot_of(tenant, sid)?;
        match s.status {
            SnapshotStatus::Complete => {
                let mut layers = vec![s.id.clone()];
                layers.extend(s.parents);
                Ok(layers)
            }
            SnapshotStatus::Deleted => Err(CoreError::NotFound(format!("snapshot {sid} was deleted"))),
            SnapshotStatus::InProgress => {
                Err(CoreError::Conflict(format!("snapshot {sid} is still being taken: wait until it is complete")))
            }
            SnapshotStatus::Error => Err(CoreError::BadRequest(format!("snapshot {sid} failed and cannot be used"))),
        }
    }

    pub(super) fn snapshot_in_progress(&self, devbox_id: &str) -> bool {
        self.snapshots
            .lock()
            .unwrap()
            .values()
            .any(|s| s.source_devbox_id == devbox_id && s.status == SnapshotStatus::InProgress)
    }

    /// Start a snapshot of a running or suspended box; with `wait`, return once it is done.
    pub async fn snapshot_disk(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        p: SnapshotParams,
        wait: bool,
    ) -> Result<Snapshot> {
        let entry = self.entry(tenant, id)?;
        let st = entry.status();
        if !matches!(st, Status::Running | Status::Suspended) {
            return Err(CoreError::Conflict(format!(
                "cannot snapshot a devbox that is {}: it must be running or suspended",
                st.as_str()
            )));
        }
        if let Some(m) = &p.commit_message {
            if m.chars().count() > 1000 {
                return Err(CoreError::BadRequest("commit_message is limited to 1000 characters".into()));
            }
        }
        let dir = self.snapshots_dir()?;
        let parents = entry.rec.lock().unwrap().layers.clone();
        let snap = Snapshot {
            id: new_id("snp"),
            tenant: tenant.to_string(),
            seq: self.next_seq(),
            name: p.name.filter(|n| !n.is_empty()),
            metadata: p.metadata.unwrap_or_default(),
            commit_message: p.commit_message,
            source_devbox_id: id.to_string(),
            create_time_ms: now_ms(),
            status: SnapshotStatus::InProgress,
            error_message: None,
            size_bytes: None,
            parents,
        };
        self.store.put_snapshot(&snap)?;
        self.snapshots.lock().unwrap().insert(snap.id.clone(), snap.clone());
        let (me, sid) = (self.clone(), snap.id.clone());
        let task = tokio::spawn(async move { me.take_snapshot(entry, &sid, dir).await });
        if wait {
            let _ = task.await;
            return self.snapshot_of(tenant, &snap.id);
        }
        Ok(snap)
    }

    async fn take_snapshot(&self, entry: Arc<BoxEntry>, sid: &str, dir: PathBuf) {
        let started = std::time::Instant::now();
        let result = async {
            let _guard = entry.lifecycle.lock().await;
            let (id, state, status) = {
                let r = entry.rec.lock().unwrap();
                (r.id.clone(), r.runtime_state.clone(), r.status)
            };
            if !matches!(status, Status::Running | Status::Suspended) {
                return Err(CoreError::Conflict(format!("the devbox became {}", status.as_str())));
            }
            let base = dir.join(sid);
            std::fs::create_dir_all(&base).map_err(|e| CoreError::BadRequest(format!("create snapshot dir: {e}")))?;
            let partial = base.join("layer.partial");
            let frozen_here = status == Status::Running;
            if frozen_here {
                self.runtime.freeze(&id, &state).await?;
            }
            let copied = self.runtime.snapshot(&id, &state, &partial).await;
            if frozen_here {
                if let Err(e) = self.runtime.thaw(&id, &state).await {
                    tracing::error!(%id, error = %e, "thaw after snapshot failed");
                }
            }
            let size = copied?;
            std::fs::rename(&partial, base.join("layer"))
                .map_err(|e| CoreError::BadRequest(format!("finish snapshot: {e}")))?;
            Ok(size)
        }
        .await;
        let mut s = match self.snapshots.lock().unwrap().get(sid) {
            Some(s) => s.clone(),
            None => return,
        };
        match result {
            Ok(size) => {
                self.snapshot_seconds.lock().unwrap().observe(started.elapsed().as_secs_f64());
                s.status = SnapshotStatus::Complete;
                s.size_bytes = Some(size);
                tracing::info!(snapshot = %sid, bytes = size, ms = started.elapsed().as_millis() as u64, "snapshot complete");
            }
            Err(e) => {
                s.status = SnapshotStatus::Error;
                s.error_message = Some(e.to_string());
                let _ = std::fs::remove_dir_all(dir.join(sid));
                tracing::warn!(snapshot = %sid, error = %e, "snapshot failed");
            }
        }
        if let Err(e) = self.store.put_snapshot(&s) {
            tracing::error!(snapshot = %sid, error = %e, "could not store snapshot outcome");
        }
        self.snapshots.lock().unwrap().insert(sid.to_string(), s);
    }

    pub fn snapshot_status(&self, tenant: &str, sid: &str) -> Result<Snapshot> {
        self.snapshot_of(tenant, sid)
    }

    pub fn list_snapshots(
        &self,
        tenant: &str,
        devbox_id: Option<&str>,
        filter: &MetadataFilter,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<Page<Snapshot>> {
        let mut all: Vec<Snapshot> = self
            .snapshots
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.tenant == tenant && s.status != SnapshotStatus::Deleted)
            .filter(|s| devbox_id.is_none_or(|d| s.source_devbox_id == d))
            .filter(|s| filter.matches(s))
            .cloned()
            .collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.seq));
        let total = all.len();
        let start = match starting_after {
            Some(after) => all.iter().position(|s| s.id == after).map(|p| p + 1).ok_or_else(|| {
                CoreError::BadRequest(format!("starting_after {after:?} is not a snapshot in this list"))
            })?,
            None => 0,
        };
        let items: Vec<Snapshot> = all.into_iter().skip(start).take(limit).collect();
        let has_more = start + items.len() < total;
        Ok(Page { items, has_more, total_count: total })
    }

    /// Full replace of name, metadata and commit message.
    pub fn update_snapshot(&self, tenant: &str, sid: &str, p: SnapshotParams) -> Result<Snapshot> {
        let mut s = self.snapshot_of(tenant, sid)?;
        if s.status == SnapshotStatus::Deleted {
            return Err(CoreError::NotFound(format!("snapshot {sid} was deleted")));
        }
        if p.commit_message.as_ref().is_some_and(|m| m.chars().count() > 1000) {
            return Err(CoreError::BadRequest("commit_message is limited to 1000 characters".into()));
        }
        s.name = p.name.filter(|n| !n.is_empty());
        s.metadata = p.metadata.unwrap_or_default();
        s.commit_message = p.commit_message;
        self.store.put_snapshot(&s)?;
        self.snapshots.lock().unwrap().insert(sid.to_string(), s.clone());
        Ok(s)
    }

    /// Hide a snapshot; its layer is removed once no box or snapshot stands on it.
    pub fn delete_snapshot(&self, tenant: &str, sid: &str) -> Result<()> {
        let mut s = self.snapshot_of(tenant, sid)?;
        if s.status == SnapshotStatus::InProgress {
            return Err(CoreError::Conflict(format!("snapshot {sid} is still being taken")));
        }
        s.status = SnapshotStatus::Deleted;
        self.store.put_snapshot(&s)?;
        self.snapshots.lock().unwrap().insert(sid.to_string(), s);
        self.collect_layers();
        Ok(())
    }

    /// Remove the files of deleted snapshots nothing stands on any more.
    pub(super) fn collect_layers(&self) {
        let mut used: HashSet<String> = HashSet::new();
        for e in self.boxes.read().unwrap().values() {
            let r = e.rec.lock().unwrap();
            if !r.status.is_terminal() {
                used.extend(r.layers.iter().cloned());
            }
        }
        let snaps: Vec<Snapshot> = self.snapshots.lock().unwrap().values().cloned().collect();
        for s in &snaps {
            if s.status != SnapshotStatus::Deleted {
                used.insert(s.id.clone());
                used.extend(s.parents.iter().cloned());
            }
        }
        let Ok(dir) = self.snapshots_dir() else { return };
        for s in snaps.iter().filter(|s| s.status == SnapshotStatus::Deleted && !used.contains(&s.id)) {
            let d = dir.join(&s.id);
            if d.exists() {
                match std::fs::remove_dir_all(&d) {
                    Ok(()) => tracing::info!(snapshot = %s.id, "removed deleted snapshot's layer"),
                    Err(e) => tracing::warn!(snapshot = %s.id, error = %e, "could not remove layer"),
                }
            }
        }
    }
}
