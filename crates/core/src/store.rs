//! Durable state in one embedded SQLite file. Records are JSON documents keyed by id with the
//! few columns queries need; the schema version lives in `user_version`.

use crate::exec::ExecRecord;
use crate::model::{Devbox, LogEntry, Snapshot};
use crate::Result;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA_VERSION: i64 = 1;

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(crate::CoreError::BadRequest(format!(
                "the data dir was written by a newer devboxd (schema {version} > {SCHEMA_VERSION}): upgrade devboxd"
            )));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS devboxes (
                 id TEXT PRIMARY KEY,
                 tenant TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 status TEXT NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS devboxes_tenant ON devboxes (tenant, seq);
             CREATE TABLE IF NOT EXISTS executions (
                 id TEXT PRIMARY KEY,
                 devbox_id TEXT NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS executions_devbox ON executions (devbox_id);
             CREATE TABLE IF NOT EXISTS logs (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 devbox_id TEXT NOT NULL,
                 entry TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS logs_devbox ON logs (devbox_id, seq);
             CREATE TABLE IF NOT EXISTS snapshots (
                 id TEXT PRIMARY KEY,
                 tenant TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 record TEXT NOT NULL
             );",
        )?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    pub fn put_devbox(&self, d: &Devbox) -> Result<()> {
        let json = serde_json::to_string(d).expect("records serialize");
        self.conn.lock().unwrap().execute(
            "INSERT INTO devboxes (id, tenant, seq, status, record) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, record = excluded.record",
            params![d.id, d.tenant, d.seq, d.status.as_str(), json],
        )?;
        Ok(())
    }

    pub fn get_devbox(&self, id: &str) -> Result<Option<Devbox>> {
        let json: Option<String> = self
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT record FROM devboxes WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Every devbox, oldest first. Unreadable records are reported, not dropped silently.
    pub fn all_devboxes(&self) -> Result<Vec<Devbox>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare("SELECT id, record FROM devboxes ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = vec![];
        for row in rows {
            let (id, json) = row?;
            match serde_json::from_str(&json) {
                Ok(d) => out.push(d),
                Err(e) => {
                    tracing::error!(%id, error = %e, "unreadable devbox record kept in the store")
                }
            }
        }
        Ok(out)
    }

    pub fn put_execution(&self, e: &ExecRecord) -> Result<()> {
        let json = serde_json::to_string(e).expect("records serialize");
        self.conn.lock().unwrap().execute(
            "INSERT INTO executions (id, devbox_id, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![e.id, e.devbox_id, json],
        )?;
        Ok(())
    }

    pub fn executions_of(&self, devbox_id: &str) -> Result<Vec<ExecRecord>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare("SELECT record FROM executions WHERE devbox_id = ?1 ORDER BY rowid")?;
        let rows = stmt.query_map(params![devbox_id], |r| r.get::<_, String>(0))?;
        let mut out = vec![];
        for row in rows {
            if let Ok(e) = serde_json::from_str(&row?) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub fn add_log(&self, devbox_id: &str, e: &LogEntry) -> Result<()> {
        let json = serde_json::to_string(e).expect("records serialize");
        self.conn
            .lock()
            .unwrap()
            .execute("INSERT INTO logs (devbox_id, entry) VALUES (?1, ?2)", params![devbox_id, json])?;
        Ok(())
    }

    /// The newest `limit` log entries of a devbox, oldest first.
    pub fn logs_of(&self, devbox_id: &str, limit: usize) -> Result<Vec<LogEntry>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT entry FROM (SELECT seq, entry FROM logs WHERE devbox_id = ?1 ORDER BY seq DESC LIMIT ?2) ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![devbox_id, limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = vec![];
        for row in rows {
            if let Ok(e) = serde_json::from_str(&row?) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub fn put_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let json = serde_json::to_string(snap).expect("records serialize");
        self.conn.lock().unwrap().execute(
            "INSERT INTO snapshots (id, tenant, seq, record) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET record = excluded.record",
            params![snap.id, snap.tenant, snap.seq, json],
        )?;
        Ok(())
    }

    pub fn delete_snapshot_row(&self, id: &str) -> Result<()> {
        self.conn.lock().unwrap().execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn all_snapshots(&self) -> Result<Vec<Snapshot>> {
        let conn = self.conn.lock().unwrap();
        let mut stmt = conn.prepare("SELECT record FROM snapshots ORDER BY seq")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = vec![];
        for row in rows {
            if let Ok(s) = serde_json::from_str(&row?) {
                out.push(s);
            }
        }
        Ok(out)
    }

    pub fn max_seq(&self) -> Result<i64> {
        Ok(self.conn.lock().unwrap().query_row("SELECT COALESCE(MAX(seq), 0) FROM devboxes", [], |r| r.get(0))?)
    }
}
