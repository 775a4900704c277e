//! Marks as operators read them (README "Marks"): of a session, of a
//! name across sessions, in a time range, oldest first.

use rusqlite::params;

use super::Db;
use crate::hub::store::{MarkQuery, MarkRow, StoreError};

impl Db {
    pub fn list_marks(
        &self,
        org: &str,
        project: &str,
        q: &MarkQuery,
    ) -> Result<Vec<MarkRow>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT s.id, d.device_id, m.mark_id, m.name, m.ts, m.before_ns, m.after_ns,
                        m.priority, m.metadata, m.released
                 FROM marks m JOIN devices d ON d.pk = m.device_pk
                 LEFT JOIN sessions s ON s.pk = m.session_pk
                 WHERE d.org = ?1 AND d.project = ?2
                   AND (?3 IS NULL OR m.session_pk = ?3) AND (?4 IS NULL OR m.name = ?4)
                   AND (?5 IS NULL OR m.ts >= ?5) AND (?6 IS NULL OR m.ts < ?6)
                 ORDER BY m.ts, m.pk LIMIT ?7",
            )?;
            let rows = st
                .query_map(
                    params![
                        org,
                        project,
                        q.session_pk,
                        q.name,
                        q.since_ns,
                        q.until_ns,
                        q.limit.min(i64::MAX as u64) as i64
                    ],
                    |r| {
                        Ok(MarkRow {
                            session_id: r.get(0)?,
                            device_id: r.get(1)?,
                            mark_id: r.get(2)?,
                            name: r.get(3)?,
                            timestamp_ns: r.get(4)?,
                            before_ns: r.get(5)?,
                            after_ns: r.get(6)?,
                            priority: r.get(7)?,
                            metadata: r.get(8)?,
                            released: r.get(9)?,
                        })
                    },
                )?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }
}
