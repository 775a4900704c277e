//! [`LogbookLayer`]: a `tracing_subscriber::Layer` that turns each event
//! into one JSON line of the agent's ingest format (`timestamp`, `level`,
//! `module` from the target, `message`, `fields`, `spans`) and queues it
//! for the background sender.
//!
//! Invariant: formatting is bounded ([`Builder::max_event_bytes`] per text
//! value, and a callsite has a fixed set of fields) and the
//! hand-off never blocks, so a control loop that logs keeps its timing
//! whether or not `logbookd` is running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::sender::{Config, Sender, Shared};
use super::{DEFAULT_INGEST_SOCKET, INGEST_SOCKET_ENV};

/// Appended to a message cut to fit [`Builder::max_event_bytes`] (the same
/// mark the agent uses for records it cuts).
const TRUNCATION_MARK: &str = " …[truncated]";

/// Configures a [`LogbookLayer`].
#[derive(Debug, Clone)]
pub struct Builder {
    socket: Option<PathBuf>,
    queue_capacity: usize,
    backoff_min: Duration,
    backoff_max: Duration,
    max_event_bytes: usize,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            socket: None,
            queue_capacity: 8192,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_event_bytes: 64 << 10,
        }
    }
}

impl Builder {
    /// The agent's JSON-lines socket. Default: `$LOGBOOK_INGEST_SOCKET`,
    /// else `/run/logbook/ingest.sock`.
    pub fn socket(mut self, path: impl AsRef<Path>) -> Builder {
        self.socket = Some(path.as_ref().to_owned());
        self
    }

    /// Events held while the agent is slow or away (default 8192); beyond
    /// it events are dropped and counted.
    pub fn queue_capacity(mut self, n: usize) -> Builder {
        self.queue_capacity = n.max(1);
        self
    }

    /// Reconnect delays: starts at `min`, doubles per failure, capped at
    /// `max` (default 100 ms to 5 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Builder {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Longest message or field text sent (default 64 KiB); longer ones are
    /// cut with a visible mark, so the queue's memory stays bounded.
    pub fn max_event_bytes(mut self, n: usize) -> Builder {
        self.max_event_bytes = n.max(256);
        self
    }

    /// Starts the sender thread and returns the layer.
    pub fn build(self) -> LogbookLayer {
        let env = std::env::var_os(INGEST_SOCKET_ENV).map(PathBuf::from);
        let socket = resolve_socket(self.socket, env);
        let sender = Sender::start(Config {
            socket,
            queue_capacity: self.queue_capacity,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
        });
        LogbookLayer {
            sender: Arc::new(sender),
            max_event_bytes: self.max_event_bytes,
        }
    }
}

/// The explicit path wins, then the environment, then the default.
pub(super) fn resolve_socket(explicit: Option<PathBuf>, env: Option<PathBuf>) -> PathBuf {
    explicit
        .or(env.filter(|p| !p.as_os_str().is_empty()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INGEST_SOCKET))
}

/// Sends every event to `logbookd`; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct LogbookLayer {
    sender: Arc<Sender>,
    max_event_bytes: usize,
}

impl LogbookLayer {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle to flush and inspect the sender after the layer has moved
    /// into a subscriber.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.sender.shared.clone(),
        }
    }
}

/// Flush and statistics for a running [`LogbookLayer`].
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Waits up to `timeout` until every event logged before the call has
    /// been written to the agent (or counted as dropped). Returns false on
    /// timeout, typically because the agent is not running. For shutdown.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.shared.flush(timeout)
    }

    /// Events dropped since start (queue full or agent away).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped_total()
    }

    /// Whether the sender's last attempt to reach the agent succeeded.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }
}

impl<S> Layer<S> for LogbookLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if self.sender.surely_full() {
            self.sender.count_drop();
            return;
        }
        let meta = event.metadata();
        let mut visitor = Fields {
            max: self.max_event_bytes,
            ..Fields::default()
        };
        event.record(&mut visitor);
        let module = visitor
            .log_target
            .take()
            .unwrap_or_else(|| meta.target().to_owned());
        let spans: Vec<Value> = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| Value::String(span.name().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let level = match *meta.level() {
            tracing::Level::TRACE => "trace",
            tracing::Level::DEBUG => "debug",
            tracing::Level::INFO => "info",
            tracing::Level::WARN => "warn",
            tracing::Level::ERROR => "error",
        };
        let message = visitor.message;
        let mut record = Map::new();
        record.insert("timestamp".into(), Value::String(now_rfc3339()));
        record.insert("level".into(), Value::String(level.into()));
        record.insert("module".into(), Value::String(module));
        record.insert("message".into(), Value::String(message));
        if let Some(event) = mark_event(&mut visitor.fields) {
            record.insert("event".into(), event);
        }
        if !visitor.fields.is_empty() {
            record.insert("fields".into(), Value::Object(visitor.fields));
        }
        if !spans.is_empty() {
            record.insert("spans".into(), Value::Array(spans));
        }
        let mut line = serde_json::to_vec(&record).expect("a JSON object always serializes");
        line.push(b'\n');
        self.sender.send(line);
    }
}

/// An event's `mark` field (with `mark_before`, `mark_after`,
/// `mark_priority`) as the `event` object the agent makes a mark of
/// (README "Marks"), taken out of the fields.
fn mark_event(fields: &mut Map<String, Value>) -> Option<Value> {
    let name = fields.remove("mark")?;
    let mut event = Map::new();
    event.insert("name".into(), name);
    for (field, key) in [
        ("mark_before", "before"),
        ("mark_after", "after"),
        ("mark_priority", "priority"),
    ] {
        if let Some(v) = fields.remove(field) {
            event.insert(key.into(), v);
        }
    }
    Some(Value::Object(event))
}

/// Collects an event's fields: `message` apart, `log.target` (events
/// bridged from the `log` crate) as the module, the rest typed as JSON.
#[derive(Default)]
struct Fields {
    /// Longest text kept per value (message or field).
    max: usize,
    message: String,
    log_target: Option<String>,
    fields: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, mut value: Value) {
        if let Value::String(s) = &mut value {
            truncate(s, self.max);
        }
        match field.name() {
            "message" => {
                self.message = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                }
            }
            "log.target" => self.log_target = value.as_str().map(str::to_owned),
            // The rest of the `log` bridge's fields say where in the source
            // the call was; keep them like any field.
            name => {
                self.fields.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain, on one line, like the binaries print it.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            let _ = write!(text, ": {s}");
            source = s.source();
        }
        self.put(field, Value::String(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

/// Cuts `s` to at most `max` bytes (mark included) on a char boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut keep = max.saturating_sub(TRUNCATION_MARK.len());
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    s.truncate(keep);
    s.push_str(TRUNCATION_MARK);
}

/// Now as RFC 3339 UTC with nanoseconds, the agent's preferred time form.
pub(crate) fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}
