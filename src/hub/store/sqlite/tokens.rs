//! Tokens: the hashes of operator keys and device tokens, and whom each
//! belongs to.

use rusqlite::{params, OptionalExtension};

use super::{now_ns, Db};
use crate::hub::store::{Principal, StoreError, TokenKind};

impl Db {
    /// Stores the hash of a new token.
    pub fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (hash, kind, org, project, device_id, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    hash,
                    principal.kind.as_str(),
                    principal.org,
                    principal.project,
                    principal.device_id,
                    now_ns()
                ],
            )?;
            Ok(())
        })
    }

    pub fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT kind, org, project, device_id FROM tokens WHERE hash = ?1",
            )?
            .query_row([hash], |r| {
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
                })
            })
            .optional()?)
        })
    }
}
