//! Tokens: the hashes of operator keys and device tokens, whom each
//! belongs to, and the console's sign-ins made with them.

use rusqlite::{params, OptionalExtension};

use super::{now_ns, Db};
use crate::hub::store::{Principal, SignInRow, StoreError, TokenKind};

impl Db {
    /// Stores the hash of a new token.
    pub fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (hash, kind, org, project, device_id, created_at_ns, all_projects)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    hash,
                    principal.kind.as_str(),
                    principal.org,
                    principal.project,
                    principal.device_id,
                    now_ns(),
                    principal.all_projects
                ],
            )?;
            Ok(())
        })
    }

    pub fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT kind, org, project, device_id, all_projects FROM tokens WHERE hash = ?1",
            )?
            .query_row([hash], principal)
            .optional()?)
        })
    }

    pub fn revoke_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        self.write(|tx| {
            let who = tx
                .query_row(
                    "DELETE FROM tokens WHERE hash = ?1
                     RETURNING kind, org, project, device_id, all_projects",
                    [hash],
                    principal,
                )
                .optional()?;
            tx.execute("DELETE FROM signins WHERE token_hash = ?1", [hash])?;
            Ok(who)
        })
    }

    pub fn create_signin(&self, s: &SignInRow, max: u32) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM signins WHERE expires_at_ns <= ?1", [now_ns()])?;
            tx.execute(
                "DELETE FROM signins WHERE hash IN
                 (SELECT hash FROM signins ORDER BY expires_at_ns DESC LIMIT -1 OFFSET ?1)",
                [i64::from(max.saturating_sub(1))],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO signins (hash, token_hash, csrf, expires_at_ns)
                 VALUES (?1, ?2, ?3, ?4)",
                params![s.hash, s.token_hash, s.csrf, s.expires_at_ns],
            )?;
            Ok(())
        })
    }

    pub fn find_signin(
        &self,
        hash: &str,
        now_ns: i64,
    ) -> Result<Option<(Principal, String)>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT t.kind, t.org, t.project, t.device_id, t.all_projects, s.csrf
                 FROM signins s JOIN tokens t ON t.hash = s.token_hash
                 WHERE s.hash = ?1 AND s.expires_at_ns > ?2",
            )?
            .query_row(params![hash, now_ns], |r| Ok((principal(r)?, r.get(5)?)))
            .optional()?)
        })
    }

    pub fn list_projects(&self, org: &str) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT project FROM devices WHERE org = ?1
                 UNION SELECT project FROM tokens WHERE org = ?1 AND project <> ''
                 ORDER BY 1",
            )?;
            let rows = st
                .query_map([org], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn delete_signin(&self, hash: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM signins WHERE hash = ?1", [hash])?;
            Ok(())
        })
    }
}

/// A token's principal from columns `kind, org, project, device_id,
/// all_projects`.
fn principal(r: &rusqlite::Row<'_>) -> rusqlite::Result<Principal> {
    let kind: String = r.get(0)?;
    Ok(Principal {
        kind: if kind == "operator" {
            TokenKind::Operator
        } else {
            TokenKind::Device
        },
        org: r.get(1)?,
        project: r.get(2)?,
        device_id: r.get(3)?,
        all_projects: r.get(4)?,
    })
}
