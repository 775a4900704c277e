//! Tokens: the hashes of operator keys and device tokens, and whom each
//! belongs to.

use deadpool_postgres::GenericClient;

use super::now_ns;
use crate::hub::store::{Principal, StoreError, TokenKind};

pub(super) async fn create(
    c: &impl GenericClient,
    hash: &str,
    principal: &Principal,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO tokens (hash, kind, org, project, device_id, created_at_ns)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &hash,
            &principal.kind.as_str(),
            &principal.org,
            &principal.project,
            &principal.device_id,
            &now_ns(),
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn find(
    c: &impl GenericClient,
    hash: &str,
) -> Result<Option<Principal>, StoreError> {
    let st = c
        .prepare_cached("SELECT kind, org, project, device_id FROM tokens WHERE hash = $1")
        .await?;
    Ok(c.query_opt(&st, &[&hash]).await?.map(|r| {
        let kind: String = r.get(0);
        Principal {
            kind: if kind == "operator" {
                TokenKind::Operator
            } else {
                TokenKind::Device
            },
            org: r.get(1),
            project: r.get(2),
            device_id: r.get(3),
        }
    }))
}
