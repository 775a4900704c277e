//! A session's timeline tree (README "Session timeline"; seed 002's
//! `session.timeline`): the session as the root, its status changes, its
//! marks with the events inside their windows, the first error of each
//! module, and the device's gaps. Served as `timeline` in
//! `GET /sessions/{id}` and alone at `GET /sessions/{id}/timeline`.
//!
//! Invariant: [`build`] is pure (rows in, tree out) and every tree is
//! bounded: at most [`MAX_MARKS`] marks, [`MAX_ERRORS`] error nodes and
//! [`MAX_GAPS`] gap nodes, plus the root and two status nodes; what was
//! left out is counted in the root's metadata. The rows come through the same `Store` methods as
//! every other route (`get_session`, `list_marks`, `first_errors`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{metadata_value, rfc3339};
use super::auth;
use super::error::ApiError;
use super::store::{LogRow, MarkQuery, MarkRow, SessionRow};
use super::Hub;

/// Most mark nodes in a tree (the session's oldest marks).
pub const MAX_MARKS: u64 = 1000;
/// Most error nodes in a tree (the modules whose first error came first).
pub const MAX_ERRORS: u64 = 250;
/// Most gap nodes in a tree (a device reports a counter per session,
/// level and reason; the agent has six reasons, a hub accepts any name).
pub const MAX_GAPS: usize = 100;

/// One node of the tree: `kind` (`session`, `status`, `mark`, `error`,
/// `gap`), a `name`, its `start` and `end` (RFC 3339; an instant has
/// both equal, a gap has neither: the device counts drops per level and
/// reason, not per time), `metadata` and `children`, sorted by start.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: &'static str,
    pub name: String,
    pub start_ns: Option<i64>,
    pub end_ns: Option<i64>,
    pub metadata: Map<String, Value>,
    pub children: Vec<Node>,
}

impl Node {
    fn instant(kind: &'static str, name: String, at_ns: i64, metadata: Map<String, Value>) -> Node {
        Node {
            kind,
            name,
            start_ns: Some(at_ns),
            end_ns: Some(at_ns),
            metadata,
            children: Vec::new(),
        }
    }

    /// The node as the API shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": self.kind,
            "name": self.name,
            "start": self.start_ns.map(rfc3339),
            "end": self.end_ns.map(rfc3339),
            "metadata": self.metadata,
            "children": self.children.iter().map(Node::to_json).collect::<Vec<_>>(),
        })
    }

    /// Nodes in this tree, itself included.
    #[cfg(test)]
    fn count(&self) -> usize {
        1 + self.children.iter().map(Node::count).sum::<usize>()
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Timed nodes by start (then end, kind and name, so equal times always
/// sort alike), untimed ones (gaps) after them in the order given.
fn sort(nodes: &mut [Node]) {
    nodes.sort_by(|a, b| match (a.start_ns, b.start_ns) {
        (Some(x), Some(y)) => (x, a.end_ns, a.kind, &a.name).cmp(&(y, b.end_ns, b.kind, &b.name)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
}

/// The tree of `session` from its marks (oldest first, at most
/// [`MAX_MARKS`] + 1 to tell a cut) and the first errors of its modules
/// (at most [`MAX_ERRORS`] + 1).
///
/// Shape (README "Session timeline"): the root is the session (`start`
/// and `end` its own; metadata: status, error, device). Its children are
/// the status nodes (`opened` at the start; `completed` or `failed` at the
/// end, a reboot's failure with `"rebooted": true`), the mark nodes (their
/// window as start and end) and the error nodes (`name` the module, at
/// the record's time). An instant inside one or more mark windows is not
/// a child of the root but of the mark that contains it and started last
/// (the narrowest context, usually the mark made for it): an operator
/// opens "collision" and finds the error and the failure that followed
/// it. Marks never nest in each other: each is a child of the root,
/// overlapping or not. Gap nodes close the root's children.
pub fn build(session: &SessionRow, marks: &[MarkRow], errors: &[LogRow]) -> Node {
    let mut instants = Vec::new();
    instants.push(Node::instant(
        "status",
        "opened".into(),
        session.started_at_ns,
        Map::new(),
    ));
    if let (Some(end), true) = (session.ended_at_ns, session.status != "active") {
        let mut meta = Map::new();
        if let Some(e) = &session.error {
            meta.insert("error".into(), Value::String(e.clone()));
        }
        if session.status == "failed" && session.error.as_deref() == Some("device rebooted") {
            meta.insert("rebooted".into(), Value::Bool(true));
        }
        instants.push(Node::instant("status", session.status.clone(), end, meta));
    }
    let error_nodes = errors.len().min(MAX_ERRORS as usize);
    for r in &errors[..error_nodes] {
        let meta = obj(json!({
            "seq": r.seq,
            "level": r.level,
            "message": r.message,
            "metadata": metadata_value(&r.metadata),
            "process": r.process,
            "pid": r.pid,
        }));
        instants.push(Node::instant(
            "error",
            r.module.clone(),
            r.timestamp_ns,
            meta,
        ));
    }

    let mark_nodes = marks.len().min(MAX_MARKS as usize);
    let mut windows: Vec<Node> = marks[..mark_nodes]
        .iter()
        .map(|m| Node {
            kind: "mark",
            name: m.name.clone(),
            start_ns: Some(m.timestamp_ns - m.before_ns),
            end_ns: Some(m.timestamp_ns + m.after_ns),
            metadata: obj(json!({
                "id": m.mark_id,
                "timestamp": rfc3339(m.timestamp_ns),
                "priority": m.priority,
                "released": m.released,
                "metadata": metadata_value(&m.metadata),
            })),
            children: Vec::new(),
        })
        .collect();
    sort(&mut windows);

    let mut top = Vec::new();
    for node in instants {
        let at = node.start_ns.unwrap_or_default();
        // The containing window that started last; `windows` is sorted by
        // start, so it is the last one whose start is at or before `at`
        // and whose end is at or after it.
        let inside = windows
            .iter_mut()
            .rev()
            .filter(|w| w.start_ns <= Some(at))
            .find(|w| w.end_ns >= Some(at));
        match inside {
            Some(w) => w.children.push(node),
            None => top.push(node),
        }
    }
    for w in &mut windows {
        sort(&mut w.children);
    }
    top.extend(windows);
    sort(&mut top);
    for g in session.gaps.iter().take(MAX_GAPS) {
        top.push(Node {
            kind: "gap",
            name: g.reason.clone(),
            start_ns: None,
            end_ns: None,
            metadata: obj(json!({ "level": g.level, "dropped": g.dropped })),
            children: Vec::new(),
        });
    }

    let mut meta = obj(json!({
        "device_id": session.device_id,
        "status": session.status,
        "error": session.error,
    }));
    let left_out_marks = marks.len() - mark_nodes;
    let left_out_errors = errors.len() - error_nodes;
    let left_out_gaps = session.gaps.len().saturating_sub(MAX_GAPS);
    if left_out_marks + left_out_errors + left_out_gaps > 0 {
        meta.insert("truncated".into(), Value::Bool(true));
        meta.insert("marks_left_out".into(), json!(left_out_marks));
        meta.insert("error_modules_left_out".into(), json!(left_out_errors));
        meta.insert("gaps_left_out".into(), json!(left_out_gaps));
    }
    Node {
        kind: "session",
        name: session.id.clone(),
        start_ns: Some(session.started_at_ns),
        end_ns: session.ended_at_ns,
        metadata: meta,
        children: top,
    }
}

/// Reads what [`build`] needs through the store and builds the tree of
/// `session`.
pub async fn of_session(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    session: &SessionRow,
) -> Result<Node, ApiError> {
    let q = MarkQuery {
        session_pk: Some(session.pk),
        limit: MAX_MARKS + 1,
        ..Default::default()
    };
    let marks = hub.store.list_marks(org, project, &q).await?;
    let errors = hub.store.first_errors(session.pk, MAX_ERRORS + 1).await?;
    Ok(build(session, &marks, &errors))
}

/// `GET /sessions/{id}/timeline`: the session's timeline tree alone, as
/// `{"session_id", "timeline"}`.
pub async fn session_timeline(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let session = hub
        .store
        .get_session(&org, &project, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
    let tree = of_session(&hub, &org, &project, &session).await?;
    Ok(Json(json!({ "session_id": id, "timeline": tree.to_json() })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::store::GapRow;
    use crate::wire::Level;

    const S: i64 = 1_000_000_000_000;

    fn session(status: &str, end: Option<i64>, error: Option<&str>) -> SessionRow {
        SessionRow {
            pk: 1,
            id: "s1".into(),
            device_id: "robot".into(),
            device_name: "robot".into(),
            status: status.into(),
            started_at_ns: S,
            ended_at_ns: end,
            duration_ns: end.map(|e| e - S),
            tags: vec![],
            package_name: None,
            package_version: None,
            metadata: "{}".into(),
            error: error.map(str::to_owned),
            level_counts: [0; 6],
            artifact_count: 0,
            artifact_bytes: 0,
            gaps: vec![GapRow {
                level: Level::Debug,
                reason: "evicted".into(),
                dropped: 7,
            }],
        }
    }

    fn mark(id: i64, name: &str, at: i64, before: i64, after: i64) -> MarkRow {
        MarkRow {
            session_id: Some("s1".into()),
            device_id: "robot".into(),
            mark_id: id,
            name: name.into(),
            timestamp_ns: at,
            before_ns: before,
            after_ns: after,
            priority: "normal".into(),
            metadata: String::new(),
            released: None,
        }
    }

    fn error(module: &str, at: i64) -> LogRow {
        LogRow {
            id: 1,
            device_pk: 1,
            session_pk: Some(1),
            session_id: Some("s1".into()),
            device_id: "robot".into(),
            seq: at as u64,
            timestamp_ns: at,
            level: Level::Error,
            module: module.into(),
            message: "bad".into(),
            metadata: String::new(),
            pid: None,
            uid: None,
            gid: None,
            process: None,
        }
    }

    /// `kind:name` of each node, children in brackets.
    fn outline(n: &Node) -> String {
        let mut s = format!("{}:{}", n.kind, n.name);
        if !n.children.is_empty() {
            let kids: Vec<String> = n.children.iter().map(outline).collect();
            s.push_str(&format!("[{}]", kids.join(" ")));
        }
        s
    }

    #[test]
    fn instants_nest_in_the_mark_that_started_last() {
        let s = session("failed", Some(S + 100), Some("device rebooted"));
        let marks = [
            mark(1, "wide", S + 50, 40, 50),
            mark(2, "narrow", S + 60, 5, 5),
        ];
        let errors = [
            error("nav", S + 20),
            error("arm", S + 58),
            error("io", S + 200),
        ];
        let tree = build(&s, &marks, &errors);
        assert_eq!(
            outline(&tree),
            "session:s1[status:opened mark:wide[error:nav status:failed] \
             mark:narrow[error:arm] error:io gap:evicted]"
        );
        let failed = &tree.children[1].children[1];
        assert_eq!(failed.metadata["rebooted"], Value::Bool(true));
        assert_eq!(failed.metadata["error"], "device rebooted");
        assert_eq!(tree.children.last().unwrap().start_ns, None);
        assert!(!tree.metadata.contains_key("truncated"));
    }

    #[test]
    fn an_active_session_has_no_end_node() {
        let tree = build(&session("active", None, None), &[], &[]);
        assert_eq!(outline(&tree), "session:s1[status:opened gap:evicted]");
        assert_eq!(tree.end_ns, None);
    }

    #[test]
    fn the_tree_is_bounded_and_says_what_it_left_out() {
        let marks: Vec<MarkRow> = (0..MAX_MARKS as i64 + 1)
            .map(|i| mark(i, "m", S + i * 10, 1, 1))
            .collect();
        let errors: Vec<LogRow> = (0..MAX_ERRORS as i64 + 1)
            .map(|i| error(&format!("mod{i}"), S + i * 10 + 5))
            .collect();
        let mut s = session("active", None, None);
        s.gaps = (0..MAX_GAPS + 1)
            .map(|i| GapRow {
                level: Level::Info,
                reason: format!("r{i}"),
                dropped: 1,
            })
            .collect();
        let tree = build(&s, &marks, &errors);
        assert_eq!(
            tree.count(),
            3 + MAX_MARKS as usize + MAX_ERRORS as usize + MAX_GAPS - 1,
            "root, opened, and the capped marks, errors and gaps"
        );
        assert_eq!(tree.metadata["truncated"], Value::Bool(true));
        assert_eq!(tree.metadata["marks_left_out"], 1);
        assert_eq!(tree.metadata["error_modules_left_out"], 1);
        assert_eq!(tree.metadata["gaps_left_out"], 1);
    }
}
