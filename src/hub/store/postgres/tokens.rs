//! Tokens: the hashes of operator keys and device tokens, whom each
//! belongs to, and the console's sign-ins made with them.

use deadpool_postgres::GenericClient;

use super::now_ns;
use crate::hub::store::{Principal, SignInRow, StoreError, TokenKind};

pub(super) async fn create(
    c: &impl GenericClient,
    hash: &str,
    principal: &Principal,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO tokens (hash, kind, org, project, device_id, created_at_ns, all_projects)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &hash,
            &principal.kind.as_str(),
            &principal.org,
            &principal.project,
            &principal.device_id,
            &now_ns(),
            &principal.all_projects,
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
        .prepare_cached(
            "SELECT kind, org, project, device_id, all_projects FROM tokens WHERE hash = $1",
        )
        .await?;
    Ok(c.query_opt(&st, &[&hash]).await?.as_ref().map(principal))
}

pub(super) async fn revoke(
    c: &mut deadpool_postgres::Client,
    hash: &str,
) -> Result<Option<Principal>, StoreError> {
    let tx = c.transaction().await?;
    let who = tx
        .query_opt(
            "DELETE FROM tokens WHERE hash = $1
             RETURNING kind, org, project, device_id, all_projects",
            &[&hash],
        )
        .await?
        .as_ref()
        .map(principal);
    tx.execute("DELETE FROM signins WHERE token_hash = $1", &[&hash])
        .await?;
    tx.commit().await?;
    Ok(who)
}

pub(super) async fn create_signin(
    c: &mut deadpool_postgres::Client,
    s: &SignInRow,
    max: u32,
) -> Result<(), StoreError> {
    let tx = c.transaction().await?;
    tx.execute(
        "DELETE FROM signins WHERE expires_at_ns <= $1",
        &[&now_ns()],
    )
    .await?;
    tx.execute(
        "DELETE FROM signins WHERE hash IN
         (SELECT hash FROM signins ORDER BY expires_at_ns DESC OFFSET $1)",
        &[&i64::from(max.saturating_sub(1))],
    )
    .await?;
    tx.execute(
        "INSERT INTO signins (hash, token_hash, csrf, expires_at_ns) VALUES ($1, $2, $3, $4)
         ON CONFLICT (hash) DO UPDATE SET token_hash = EXCLUDED.token_hash,
             csrf = EXCLUDED.csrf, expires_at_ns = EXCLUDED.expires_at_ns",
        &[&s.hash, &s.token_hash, &s.csrf, &s.expires_at_ns],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn find_signin(
    c: &impl GenericClient,
    hash: &str,
    now_ns: i64,
) -> Result<Option<(Principal, String)>, StoreError> {
    let st = c
        .prepare_cached(
            "SELECT t.kind, t.org, t.project, t.device_id, t.all_projects, s.csrf
             FROM signins s JOIN tokens t ON t.hash = s.token_hash
             WHERE s.hash = $1 AND s.expires_at_ns > $2",
        )
        .await?;
    Ok(c.query_opt(&st, &[&hash, &now_ns])
        .await?
        .map(|r| (principal(&r), r.get(5))))
}

pub(super) async fn delete_signin(c: &impl GenericClient, hash: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM signins WHERE hash = $1", &[&hash])
        .await?;
    Ok(())
}

pub(super) async fn list_projects(
    c: &impl GenericClient,
    org: &str,
) -> Result<Vec<String>, StoreError> {
    let st = c
        .prepare_cached(
            "SELECT project FROM (SELECT project FROM devices WHERE org = $1
                 UNION SELECT project FROM tokens WHERE org = $1 AND project <> '') p
             ORDER BY project COLLATE \"C\"",
        )
        .await?;
    Ok(c.query(&st, &[&org])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A token's principal from columns `kind, org, project, device_id,
/// all_projects`.
fn principal(r: &tokio_postgres::Row) -> Principal {
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
        all_projects: r.get(4),
    }
}
