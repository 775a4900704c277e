//! The full-text index's documents: one per block of at most
//! [`BLOCK_RECORDS`] records that one batch stored in a row for one
//! session (or one device's records without a session). A block is indexed
//! under its first record's id; `fts_blocks` holds the last id of each
//! block of more than one (a document without a row there is one record,
//! as every document written before migration 8 is). Log messages repeat
//! their words, and FTS5 writes a word once per document, so a block costs
//! about half of what its records cost one by one (BENCHMARKS.md, issue
//! 18).
//!
//! A block matches when its records together hold the words; a search
//! then keeps the records that hold them themselves
//! ([`words_match`], registered as `logbook_words`), so results are the
//! same as with one document per record.
//!
//! Invariant: a block's text is its records' messages in id order, one
//! per line (a newline never joins two words), rebuilt the same way to
//! remove it: a contentless index can only forget what it is told again
//! word for word.

use rusqlite::functions::FunctionFlags;
use rusqlite::{params, CachedStatement, Connection, Transaction};

/// Records per document at most.
pub(super) const BLOCK_RECORDS: usize = 64;
/// Text per document at most (bytes): past it, a block ends early.
const BLOCK_BYTES: usize = 16 * 1024;

/// The words of a text: the query's (`super::logs::fts_query`) and the
/// per-record check's ([`words_match`]), which must agree.
pub(super) fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// Does `message` hold every word of `search` as a whole word (case
/// folded)? What one document per record answered.
pub(super) fn words_match(message: &str, search: &str) -> bool {
    let message = message.to_lowercase();
    let have: Vec<&str> = words(&message).collect();
    words(search).all(|w| {
        let w = w.to_lowercase();
        have.iter().any(|h| *h == w)
    })
}

/// Registers `logbook_words(message, search)` on a connection.
pub(super) fn register(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        "logbook_words",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let message = ctx.get_raw(0).as_str().unwrap_or("");
            let search = ctx.get_raw(1).as_str().unwrap_or("");
            Ok(words_match(message, search))
        },
    )
}

/// Builds the blocks of one batch as its records are stored.
pub(super) struct Blocks<'t> {
    doc: CachedStatement<'t>,
    block: CachedStatement<'t>,
    /// The open block: session, first id, last id, text.
    open: Option<(Option<i64>, i64, i64, String)>,
    records: usize,
}

impl<'t> Blocks<'t> {
    pub(super) fn new(tx: &'t Transaction<'_>) -> rusqlite::Result<Blocks<'t>> {
        Ok(Blocks {
            doc: tx.prepare_cached("INSERT INTO logs_fts (rowid, message) VALUES (?1, ?2)")?,
            block: tx.prepare_cached("INSERT INTO fts_blocks (first, last) VALUES (?1, ?2)")?,
            open: None,
            records: 0,
        })
    }

    /// The record `id` of `session` was stored with `message`.
    pub(super) fn add(
        &mut self,
        session: Option<i64>,
        id: i64,
        message: &str,
    ) -> rusqlite::Result<()> {
        if let Some((s, _, last, text)) = &mut self.open {
            if *s == session
                && id == *last + 1
                && self.records < BLOCK_RECORDS
                && text.len() < BLOCK_BYTES
            {
                text.push('\n');
                text.push_str(message);
                *last = id;
                self.records += 1;
                return Ok(());
            }
        }
        self.flush()?;
        self.open = Some((session, id, id, message.to_owned()));
        self.records = 1;
        Ok(())
    }

    /// Indexes the open block, if any.
    pub(super) fn flush(&mut self) -> rusqlite::Result<()> {
        if let Some((_, first, last, text)) = self.open.take() {
            self.doc.execute(params![first, text])?;
            if last > first {
                self.block.execute(params![first, last])?;
            }
        }
        Ok(())
    }
}

/// Removes from the index every block of `session`'s records (before the
/// records go: their text is what the index is told to forget).
pub(super) fn delete_session(tx: &Transaction<'_>, session: i64) -> rusqlite::Result<()> {
    let mut lasts = tx.prepare(
        "SELECT b.first, b.last FROM fts_blocks b
         WHERE b.first IN (SELECT id FROM logs WHERE session_pk = ?1)",
    )?;
    let lasts: std::collections::HashMap<i64, i64> = lasts
        .query_map([session], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut forget =
        tx.prepare("INSERT INTO logs_fts (logs_fts, rowid, message) VALUES ('delete', ?1, ?2)")?;
    let mut rows = tx.prepare("SELECT id, message FROM logs WHERE session_pk = ?1 ORDER BY id")?;
    let mut rows = rows.query([session])?;
    // The block being gathered: first id, last id, text.
    let mut open: Option<(i64, i64, String)> = None;
    while let Some(r) = rows.next()? {
        let (id, message): (i64, String) = (r.get(0)?, r.get(1)?);
        let block = match open.take() {
            Some((first, last, mut text)) if id <= last => {
                text.push('\n');
                text.push_str(&message);
                (first, last, text)
            }
            cut => {
                // Cut short (cannot happen: a block's records are deleted
                // together): forget what it held.
                if let Some((first, _, text)) = cut {
                    forget.execute(params![first, text])?;
                }
                (id, lasts.get(&id).copied().unwrap_or(id), message)
            }
        };
        if id >= block.1 {
            forget.execute(params![block.0, block.2])?;
        } else {
            open = Some(block);
        }
    }
    if let Some((first, _, text)) = open {
        forget.execute(params![first, text])?;
    }
    tx.execute(
        "DELETE FROM fts_blocks WHERE first IN (SELECT id FROM logs WHERE session_pk = ?1)",
        [session],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_case_folded() {
        assert!(words_match("Obstacle too close", "obstacle"));
        assert!(words_match("Detected 5 obstacles", "DETECTED 5"));
        assert!(!words_match("Detected 5 obstacles", "obstacle"));
        assert!(words_match("disk: full (sda)", "full sda"));
        assert!(!words_match("disk: fullness", "full"));
        assert!(words_match("Ärger über Öl", "öl ärger"));
        assert!(words_match("anything", ";;"), "no words: nothing to hold");
    }
}
