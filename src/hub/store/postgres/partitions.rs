//! The month partitions of `logs`, made on insert: before a batch's
//! transaction, every month its records fall in that has no partition yet
//! gets one (`logs_yYYYYmMM`, its own transaction under an advisory lock,
//! so replicas making the same month take turns and the second finds it
//! made). Records outside 2000..2100 go to the default partition
//! `logs_other` and make none.

use std::collections::HashSet;
use std::sync::Mutex;

use time::{Date, Month, OffsetDateTime};

use super::PARTITION_LOCK;
use crate::hub::store::StoreError;

/// The first nanosecond of the month `ts_ns` falls in and of the next one,
/// with the partition's name; `None` outside 2000..2100.
pub(super) fn month_of(ts_ns: i64) -> Option<(i64, i64, String)> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ns)).ok()?;
    if !(2000..2100).contains(&t.year()) {
        return None;
    }
    let start = Date::from_calendar_date(t.year(), t.month(), 1).ok()?;
    let (ny, nm) = match t.month() {
        Month::December => (t.year() + 1, Month::January),
        m => (t.year(), m.next()),
    };
    let next = Date::from_calendar_date(ny, nm, 1).ok()?;
    let ns = |d: Date| (d.midnight().assume_utc().unix_timestamp_nanos()) as i64;
    Some((
        ns(start),
        ns(next),
        format!("logs_y{:04}m{:02}", t.year(), u8::from(t.month())),
    ))
}

/// Makes the partitions `timestamps` need that `known` does not list.
pub(super) async fn ensure(
    client: &mut deadpool_postgres::Client,
    known: &Mutex<HashSet<i64>>,
    timestamps: impl Iterator<Item = i64>,
) -> Result<(), StoreError> {
    let mut missing: Vec<(i64, i64, String)> = Vec::new();
    {
        let known = known.lock().unwrap_or_else(|p| p.into_inner());
        for ts in timestamps {
            if let Some(m) = month_of(ts) {
                if !known.contains(&m.0) && !missing.iter().any(|x| x.0 == m.0) {
                    missing.push(m);
                }
            }
        }
    }
    for (from, to, name) in missing {
        // Its own transaction: the lock is held only while the partition
        // is made, and the batch's transaction sees it committed.
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF logs FOR VALUES FROM ({from}) TO ({to})"
        ))
        .await?;
        tx.commit().await?;
        known.lock().unwrap_or_else(|p| p.into_inner()).insert(from);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::month_of;

    #[test]
    fn months_bound_partitions() {
        // 2026-12-04T17:00:00Z
        let (from, to, name) = month_of(1_796_403_600_000_000_000).unwrap();
        assert_eq!(name, "logs_y2026m12");
        assert_eq!(from, 1_796_083_200_000_000_000); // 2026-12-01
        assert_eq!(to, 1_798_761_600_000_000_000); // 2027-01-01
        assert_eq!(month_of(1_000), None);
        assert_eq!(month_of(i64::MAX), None);
    }
}
