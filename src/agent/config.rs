//! The agent's configuration: the table of known keys (source of every
//! `LOGBOOK_*` variable name), the raw serde struct it deserializes into, and
//! the resolved [`AgentConfig`] with absolute paths, byte sizes and durations.
//!
//! Invariant: a key exists in [`KEYS`] if and only if it is a field of
//! [`RawConfig`]; the test `table_and_struct_agree` keeps them in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Key, Kind};

/// Default path of the agent's configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/logbook/agent.toml";

const fn key(section: &'static str, key: &'static str, kind: Kind, doc: &'static str) -> Key {
    Key {
        section,
        key,
        kind,
        doc,
    }
}

/// Every key of `agent.toml`.
pub const KEYS: &[Key] = &[
    key(
        "device",
        "id",
        Kind::Str,
        "device id (default: /etc/machine-id)",
    ),
    key(
        "device",
        "name",
        Kind::Str,
        "device name (default: host name)",
    ),
    key("paths", "state_dir", Kind::Str, "database and artifacts"),
    key("paths", "runtime_dir", Kind::Str, "sockets"),
    key(
        "paths",
        "boot_id_file",
        Kind::Str,
        "the kernel's boot id, which tells a reboot from an agent restart",
    ),
    key(
        "ingest",
        "max_record_bytes",
        Kind::Bytes,
        "larger records are truncated",
    ),
    key(
        "ingest",
        "max_connections",
        Kind::U64,
        "concurrent ingest clients",
    ),
    key(
        "ingest",
        "syslog",
        Kind::Bool,
        "listen on syslog.sock; false: the socket is not created",
    ),
    key(
        "ingest",
        "forward",
        Kind::Bool,
        "listen on forward.sock (Fluent Forward); false: the socket is not created",
    ),
    key(
        "ingest",
        "journal",
        Kind::Bool,
        "read the systemd journal (journalctl), resuming where the agent stopped",
    ),
    key(
        "ingest",
        "journal_units",
        Kind::List,
        "only entries of these systemd units (with journal_identifiers: either); empty: all",
    ),
    key(
        "ingest",
        "journal_identifiers",
        Kind::List,
        "only entries with these syslog identifiers (SYSLOG_IDENTIFIER); empty: all",
    ),
    key(
        "ingest",
        "journal_priority",
        Kind::Choice(&[
            "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
        ]),
        "only entries of this priority and more urgent (as journalctl -p)",
    ),
    key(
        "ingest",
        "journal_directory",
        Kind::Str,
        "read this journal directory (journalctl --directory); empty: the system journal",
    ),
    key(
        "buffer",
        "max_bytes",
        Kind::Bytes,
        "on-disk bound of the ring buffer (db + WAL)",
    ),
    key(
        "buffer",
        "min_free_bytes",
        Kind::Bytes,
        "free space kept on the state filesystem",
    ),
    key(
        "buffer",
        "pinned_max",
        Kind::Bytes,
        "most record bytes that marks may pin against eviction (0: a quarter of max_bytes)",
    ),
    key(
        "buffer",
        "synchronous",
        Kind::Choice(&["normal", "full"]),
        "SQLite synchronous mode",
    ),
    key(
        "buffer",
        "commit_interval",
        Kind::Secs,
        "longest time a record waits for its commit",
    ),
    key(
        "buffer",
        "commit_records",
        Kind::U64,
        "most records in one transaction",
    ),
    key(
        "api",
        "socket_group",
        Kind::Str,
        "group owning the sockets (mode 0660)",
    ),
    key(
        "api",
        "console",
        Kind::Str,
        "loopback address of the read-only console (127.0.0.1:8900); empty: off",
    ),
    key(
        "log",
        "level",
        Kind::Str,
        "the agent's own log filter (tracing syntax)",
    ),
    key(
        "sync",
        "hub",
        Kind::Str,
        "hub base URL; empty disables sync",
    ),
    key("sync", "token", Kind::Str, "device token for the hub"),
    key(
        "sync",
        "ca_file",
        Kind::Str,
        "PEM CA certificates trusted for an https:// hub besides the system's (a private CA)",
    ),
    key(
        "sync",
        "client_cert",
        Kind::Str,
        "PEM client certificate presented to the hub (mTLS; names the device id as a DNS subjectAltName)",
    ),
    key(
        "sync",
        "client_key",
        Kind::Str,
        "PEM private key of sync.client_cert",
    ),
    key(
        "sync",
        "max_bytes_per_sec",
        Kind::Bytes,
        "upload bandwidth cap; 0 = none",
    ),
    key(
        "sync",
        "batch_records",
        Kind::U64,
        "a batch closes at this many records",
    ),
    key(
        "sync",
        "batch_bytes",
        Kind::Bytes,
        "a batch closes at this many bytes of records (before compression)",
    ),
    key(
        "sync",
        "linger",
        Kind::Secs,
        "longest a new record waits for more to fill its batch",
    ),
    key(
        "sync",
        "retry_min",
        Kind::Secs,
        "first retry delay (doubles, full jitter)",
    ),
    key("sync", "retry_max", Kind::Secs, "longest retry delay"),
    key(
        "sync",
        "stall_timeout",
        Kind::Secs,
        "an uploader without progress this long while online is restarted",
    ),
    key(
        "artifacts",
        "settle_secs",
        Kind::Secs,
        "a file unchanged this long is complete",
    ),
    key(
        "artifacts",
        "rescan_secs",
        Kind::Secs,
        "full rescan of watched artifact directories (catches missed events)",
    ),
    key(
        "artifacts",
        "chunk_bytes",
        Kind::Bytes,
        "bytes per tus PATCH; the acked offset is saved after each",
    ),
    key(
        "artifacts",
        "event_queue",
        Kind::U64,
        "file events queued for the watcher; beyond it a rescan replaces them",
    ),
    key(
        "artifacts",
        "retry_max_secs",
        Kind::Secs,
        "longest wait between artifact upload retries",
    ),
    key(
        "artifacts",
        "core_dir",
        Kind::Str,
        "where kernel.core_pattern writes cores; crashes there are attached to the active session (empty: off)",
    ),
    key(
        "artifacts",
        "cores",
        Kind::Bool,
        "attach the core file itself, not only the crash report",
    ),
    key(
        "artifacts",
        "core_max_bytes",
        Kind::Bytes,
        "larger cores are reported but not attached",
    ),
];

/// The merged configuration before resolution, exactly the shape of the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub device: RawDevice,
    pub paths: RawPaths,
    pub ingest: RawIngest,
    pub buffer: RawBuffer,
    pub api: RawApi,
    pub log: RawLog,
    pub sync: RawSync,
    pub artifacts: RawArtifacts,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDevice {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPaths {
    pub state_dir: String,
    pub runtime_dir: String,
    pub boot_id_file: String,
}

impl Default for RawPaths {
    fn default() -> Self {
        RawPaths {
            state_dir: "/var/lib/logbook".into(),
            runtime_dir: "/run/logbook".into(),
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawIngest {
    pub max_record_bytes: u64,
    pub max_connections: u64,
    pub syslog: bool,
    pub forward: bool,
    pub journal: bool,
    pub journal_units: Vec<String>,
    pub journal_identifiers: Vec<String>,
    pub journal_priority: String,
    pub journal_directory: String,
}

impl Default for RawIngest {
    fn default() -> Self {
        RawIngest {
            max_record_bytes: 64 << 10,
            max_connections: 1024,
            syslog: true,
            forward: true,
            journal: false,
            journal_units: Vec::new(),
            journal_identifiers: Vec::new(),
            journal_priority: "debug".into(),
            journal_directory: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBuffer {
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    pub pinned_max: u64,
    pub synchronous: String,
    pub commit_interval: f64,
    pub commit_records: u64,
}

impl Default for RawBuffer {
    fn default() -> Self {
        RawBuffer {
            max_bytes: 256 << 20,
            min_free_bytes: 64 << 20,
            pinned_max: 0,
            synchronous: "normal".into(),
            commit_interval: 0.2,
            commit_records: 20_000,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawApi {
    pub socket_group: String,
    pub console: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSync {
    pub hub: String,
    pub token: String,
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
    pub max_bytes_per_sec: u64,
    pub batch_records: u64,
    pub batch_bytes: u64,
    pub linger: f64,
    pub retry_min: f64,
    pub retry_max: f64,
    pub stall_timeout: f64,
}

impl Default for RawSync {
    fn default() -> Self {
        RawSync {
            hub: String::new(),
            token: String::new(),
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            max_bytes_per_sec: 0,
            // 20k records of a few hundred bytes gzip to well under a MiB:
            // few requests when draining a backlog, far below the hub's
            // default bounds (100k records, 16 MiB body).
            batch_records: 20_000,
            batch_bytes: 8 << 20,
            // An idle robot's records reach the hub within about a second.
            linger: 0.5,
            retry_min: 0.5,
            retry_max: 60.0,
            stall_timeout: 120.0,
        }
    }
}

/// The resolved `[sync]` section; `None` in [`AgentConfig::sync`] when no
/// hub is configured (sync disabled).
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// Base URL without a trailing slash.
    pub hub: String,
    pub token: String,
    /// `sync.ca_file`, `sync.client_cert` and `sync.client_key`, read.
    pub tls: std::sync::Arc<LinkTls>,
    pub max_bytes_per_sec: Option<u64>,
    pub batch_records: usize,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub stall_timeout: Duration,
}

/// The TLS material of the link to the hub, read from the files
/// `sync.ca_file`, `sync.client_cert` and `sync.client_key` name when the
/// configuration is loaded (at start and on every SIGHUP, so renewed files
/// are picked up by a reload). Checked as reqwest will use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkTls {
    /// PEM CA certificates added to the system's roots.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate chain followed by its private key.
    pub identity: Option<Vec<u8>>,
}

impl LinkTls {
    /// The CA certificates, parsed.
    pub fn roots(&self) -> Vec<reqwest::Certificate> {
        self.ca
            .as_deref()
            .and_then(|pem| reqwest::Certificate::from_pem_bundle(pem).ok())
            .unwrap_or_default()
    }

    /// The client identity, parsed.
    pub fn client_identity(&self) -> Option<reqwest::Identity> {
        self.identity
            .as_deref()
            .and_then(|pem| reqwest::Identity::from_pem(pem).ok())
    }
}

fn load_link_tls(
    raw: &RawSync,
    bad: &impl Fn(&str, String) -> ConfigError,
) -> Result<LinkTls, ConfigError> {
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| bad(key, format!("{path}: cannot read: {e}")))
    };
    let path = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let ca = match path(&raw.ca_file) {
        None => None,
        Some(p) => {
            let pem = read("sync.ca_file", &p)?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(pem),
                Ok(_) => {
                    return Err(bad(
                        "sync.ca_file",
                        format!("{p}: no CERTIFICATE block in this PEM file"),
                    ))
                }
                Err(e) => return Err(bad("sync.ca_file", format!("{p}: bad PEM: {e}"))),
            }
        }
    };
    let identity = match (path(&raw.client_cert), path(&raw.client_key)) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(bad(
                "sync.client_key",
                "sync.client_cert is set but sync.client_key is not".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(bad(
                "sync.client_cert",
                "sync.client_key is set but sync.client_cert is not".into(),
            ))
        }
        (Some(c), Some(k)) => {
            let mut pem = read("sync.client_cert", &c)?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(bad(
                    "sync.client_cert",
                    format!("{c}: no CERTIFICATE block in this PEM file"),
                ));
            }
            pem.push(b'\n');
            pem.extend(read("sync.client_key", &k)?);
            if let Err(e) = reqwest::Identity::from_pem(&pem) {
                return Err(bad(
                    "sync.client_key",
                    format!("{k}: not a private key for {c} (PEM PKCS#8, PKCS#1 or SEC1): {e}"),
                ));
            }
            Some(pem)
        }
    };
    Ok(LinkTls { ca, identity })
}

/// Resolves `[sync]`: a hub URL turns sync on and then needs a token.
fn resolve_sync(
    raw: &RawSync,
    bad: impl Fn(&str, String) -> ConfigError,
) -> Result<Option<SyncConfig>, ConfigError> {
    let hub = raw.hub.trim().trim_end_matches('/');
    if hub.is_empty() {
        return Ok(None);
    }
    if !(hub.starts_with("http://") || hub.starts_with("https://")) {
        return Err(bad(
            "sync.hub",
            format!("must be an http:// or https:// URL, found {hub:?}"),
        ));
    }
    if raw.token.trim().is_empty() {
        return Err(bad(
            "sync.token",
            "sync.hub is set but sync.token is empty (create one with `logbook-hub token create --device ...`)".into(),
        ));
    }
    if raw.batch_records == 0 || raw.batch_records > 100_000 {
        return Err(bad(
            "sync.batch_records",
            format!("must be 1 to 100000, found {}", raw.batch_records),
        ));
    }
    if raw.batch_bytes < 4096 {
        return Err(bad(
            "sync.batch_bytes",
            format!("must be at least 4KiB, found {}", raw.batch_bytes),
        ));
    }
    for (name, v) in [
        ("sync.linger", raw.linger),
        ("sync.retry_min", raw.retry_min),
        ("sync.retry_max", raw.retry_max),
        ("sync.stall_timeout", raw.stall_timeout),
    ] {
        if !(v > 0.0 && v <= 86_400.0) {
            return Err(bad(
                name,
                format!("must be above 0 and at most 1 day, found {v}"),
            ));
        }
    }
    if raw.retry_max < raw.retry_min {
        return Err(bad(
            "sync.retry_max",
            "must not be less than sync.retry_min".into(),
        ));
    }
    let tls = std::sync::Arc::new(load_link_tls(raw, &bad)?);
    Ok(Some(SyncConfig {
        hub: hub.to_owned(),
        token: raw.token.trim().to_owned(),
        tls,
        max_bytes_per_sec: Some(raw.max_bytes_per_sec).filter(|r| *r > 0),
        batch_records: raw.batch_records as usize,
        batch_bytes: raw.batch_bytes as usize,
        linger: Duration::from_secs_f64(raw.linger),
        retry_min: Duration::from_secs_f64(raw.retry_min),
        retry_max: Duration::from_secs_f64(raw.retry_max),
        stall_timeout: Duration::from_secs_f64(raw.stall_timeout),
    }))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawArtifacts {
    pub settle_secs: f64,
    pub rescan_secs: f64,
    pub chunk_bytes: u64,
    pub event_queue: u64,
    pub retry_max_secs: f64,
    pub core_dir: String,
    pub cores: bool,
    pub core_max_bytes: u64,
}

impl Default for RawArtifacts {
    fn default() -> Self {
        RawArtifacts {
            settle_secs: 5.0,
            rescan_secs: 30.0,
            chunk_bytes: 4 << 20,
            event_queue: 4096,
            retry_max_secs: 300.0,
            core_dir: String::new(),
            cores: false,
            core_max_bytes: 256 << 20,
        }
    }
}

/// Flags of `logbookd` that stand in for config keys.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub raw: RawConfig,
    pub device_id: String,
    pub device_name: String,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub max_record_bytes: usize,
    pub max_connections: usize,
    /// Whether `syslog.sock` is served.
    pub syslog: bool,
    /// Whether `forward.sock` is served.
    pub forward: bool,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    /// Most record bytes marks may pin (`buffer.pinned_max`, resolved).
    pub pinned_max: u64,
    pub synchronous_full: bool,
    pub commit_interval: Duration,
    pub commit_records: usize,
    pub socket_group: Option<String>,
    /// Where the read-only console listens (`api.console`, a loopback
    /// address); `None`: off.
    pub console: Option<std::net::SocketAddr>,
    /// Where the kernel's boot id is read (tests point it at a file they own).
    pub boot_id_file: PathBuf,
    /// Sync to the hub; `None` when disabled.
    pub sync: Option<SyncConfig>,
}

impl AgentConfig {
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("agent.db")
    }
    pub fn ingest_socket(&self) -> PathBuf {
        self.runtime_dir.join("ingest.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.runtime_dir.join("api.sock")
    }
    pub fn syslog_socket(&self) -> PathBuf {
        self.runtime_dir.join("syslog.sock")
    }
    pub fn forward_socket(&self) -> PathBuf {
        self.runtime_dir.join("forward.sock")
    }
    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
    }
}

/// Loads `file` (required only when given explicitly) and the environment,
/// applies the flags, and resolves.
pub fn load(
    file: Option<&Path>,
    overrides: &Overrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<AgentConfig, ConfigError> {
    let (path, required) = match file {
        Some(p) => (p.to_owned(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut raw: RawConfig = crate::config::load(KEYS, Some(&path), required, env)?;
    if let Some(dir) = &overrides.state_dir {
        raw.paths.state_dir = dir.display().to_string();
    }
    if let Some(dir) = &overrides.runtime_dir {
        raw.paths.runtime_dir = dir.display().to_string();
    }
    resolve(raw, &path)
}

/// The fuzz entry point of the agent's configuration (fuzz target
/// `config`): `data` as `agent.toml` (see [`crate::config::fuzz_one`]),
/// resolved when it loads. Never panics; a refusal is one line.
pub fn fuzz_one(data: &[u8]) {
    if let Some(raw) = crate::config::fuzz_one::<RawConfig>(KEYS, data) {
        if let Err(e) = resolve(raw, Path::new("fuzz.toml")) {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}

fn resolve(raw: RawConfig, file: &Path) -> Result<AgentConfig, ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Key {
        origin: file.display().to_string(),
        message: format!("{key}: {message}"),
    };
    let abs = |key: &str, p: &str| -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(p);
        if p.as_os_str().is_empty() {
            return Err(bad(key, "must not be empty".into()));
        }
        if p.is_absolute() {
            Ok(p)
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(p))
                .map_err(|e| bad(key, format!("cannot resolve a relative path: {e}")))
        }
    };
    let state_dir = abs("paths.state_dir", &raw.paths.state_dir)?;
    let runtime_dir = abs("paths.runtime_dir", &raw.paths.runtime_dir)?;
    let boot_id_file = abs("paths.boot_id_file", &raw.paths.boot_id_file)?;
    // A Unix socket path is limited to 108 bytes; say so now, not at bind.
    if runtime_dir.join("forward.sock").as_os_str().len() >= 108 {
        return Err(bad(
            "paths.runtime_dir",
            format!(
                "{} is too long for Unix socket paths (108 bytes)",
                runtime_dir.display()
            ),
        ));
    }
    if raw.ingest.max_record_bytes < 256 || raw.ingest.max_record_bytes > 16 << 20 {
        return Err(bad(
            "ingest.max_record_bytes",
            format!(
                "must be between 256 and 16MiB, found {}",
                raw.ingest.max_record_bytes
            ),
        ));
    }
    if raw.buffer.max_bytes < 256 << 10 {
        return Err(bad(
            "buffer.max_bytes",
            format!("must be at least 256KiB, found {}", raw.buffer.max_bytes),
        ));
    }
    if raw.buffer.pinned_max > raw.buffer.max_bytes {
        return Err(bad(
            "buffer.pinned_max",
            format!(
                "must be at most buffer.max_bytes ({}), found {}",
                raw.buffer.max_bytes, raw.buffer.pinned_max
            ),
        ));
    }
    if raw.buffer.commit_records == 0 {
        return Err(bad("buffer.commit_records", "must be at least 1".into()));
    }
    if raw.buffer.commit_interval <= 0.0 || raw.buffer.commit_interval > 60.0 {
        return Err(bad(
            "buffer.commit_interval",
            format!(
                "must be above 0 and at most 60s, found {}",
                raw.buffer.commit_interval
            ),
        ));
    }
    check_artifacts(&raw.artifacts).map_err(|(k, m)| bad(k, m))?;
    if raw.ingest.max_connections == 0 {
        return Err(bad("ingest.max_connections", "must be at least 1".into()));
    }
    let device_id = if raw.device.id.trim().is_empty() {
        std::fs::read_to_string("/etc/machine-id")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                bad(
                    "device.id",
                    "not set and /etc/machine-id is missing or empty; set device.id".into(),
                )
            })?
    } else {
        raw.device.id.trim().to_owned()
    };
    let device_name = if raw.device.name.trim().is_empty() {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    } else {
        raw.device.name.trim().to_owned()
    };
    let sync = resolve_sync(&raw.sync, bad)?;
    let console = console_addr(&raw.api.console).map_err(|m| bad("api.console", m))?;
    Ok(AgentConfig {
        console,
        sync,
        device_id,
        device_name,
        state_dir,
        runtime_dir,
        max_record_bytes: raw.ingest.max_record_bytes as usize,
        max_connections: raw.ingest.max_connections as usize,
        syslog: raw.ingest.syslog,
        forward: raw.ingest.forward,
        max_bytes: raw.buffer.max_bytes,
        min_free_bytes: raw.buffer.min_free_bytes,
        pinned_max: match raw.buffer.pinned_max {
            0 => raw.buffer.max_bytes / 4,
            n => n,
        },
        synchronous_full: raw.buffer.synchronous == "full",
        commit_interval: Duration::from_secs_f64(raw.buffer.commit_interval),
        commit_records: raw.buffer.commit_records as usize,
        socket_group: Some(raw.api.socket_group.clone()).filter(|g| !g.is_empty()),
        boot_id_file,
        raw,
    })
}

/// `api.console`: empty is off; otherwise an IP address and port on the
/// loopback (the console has no sign-in, so no other machine may reach it).
fn console_addr(v: &str) -> Result<Option<std::net::SocketAddr>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = v.parse().map_err(|_| {
        format!("{v:?} is not an address and port (such as 127.0.0.1:8900 or [::1]:8900)")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{v} is not a loopback address: the console has no sign-in, so it is \
             served on 127.0.0.1 or [::1] only (reach it from elsewhere through an SSH tunnel)"
        ));
    }
    Ok(Some(addr))
}

/// Bounds of the `artifacts.*` keys: (key, message) of the first bad one.
fn check_artifacts(a: &RawArtifacts) -> Result<(), (&'static str, String)> {
    if !(4096..=(64 << 20)).contains(&a.chunk_bytes) {
        return Err((
            "artifacts.chunk_bytes",
            format!("must be between 4KiB and 64MiB, found {}", a.chunk_bytes),
        ));
    }
    if !(16..=1 << 20).contains(&a.event_queue) {
        return Err((
            "artifacts.event_queue",
            format!("must be between 16 and 1048576, found {}", a.event_queue),
        ));
    }
    for (key, v) in [
        ("artifacts.settle_secs", a.settle_secs),
        ("artifacts.rescan_secs", a.rescan_secs),
        ("artifacts.retry_max_secs", a.retry_max_secs),
    ] {
        if !(0.05..=86_400.0).contains(&v) {
            return Err((key, format!("must be between 50ms and one day, found {v}")));
        }
    }
    Ok(())
}

/// The effective configuration as TOML, for `logbookd --print-config`. The
/// device token is masked: this output ends up in bug reports.
pub fn to_toml(cfg: &AgentConfig) -> String {
    let mut raw = cfg.raw.clone();
    raw.device.id = cfg.device_id.clone();
    raw.device.name = cfg.device_name.clone();
    raw.paths.state_dir = cfg.state_dir.display().to_string();
    raw.paths.runtime_dir = cfg.runtime_dir.display().to_string();
    if !raw.sync.token.is_empty() {
        raw.sync.token = "<set>".into();
    }
    toml::to_string(&raw).expect("the config always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_mutated_never_panic() {
        let sample = b"[device]\nid = \"robot-7\"\n[buffer]\nmax_bytes = \"64MiB\"\nsynchronous = \"full\"\n\
            [sync]\nhub = \"https://hub.example:8443\"\nlinger = \"250ms\"\nretry_max = 30\n\
            [ingest]\nmax_record_bytes = 65536\n";
        let mut rng = crate::test_rng::Rng::new(0xc0f);
        // The sample itself loads: mutations start from the good path.
        assert!(crate::config::fuzz_one::<RawConfig>(KEYS, sample).is_some());
        fuzz_one(sample);
        for _ in 0..3_000 {
            fuzz_one(&crate::test_rng::mutate(&mut rng, sample));
        }
    }

    /// The commented `agent.toml` the Debian package installs names every
    /// key, and the values it shows are the defaults (but for the device
    /// and hub, which it shows as examples).
    #[test]
    fn the_packaged_agent_toml_shows_every_key_with_its_default() {
        let shipped = include_str!("../../packaging/agent.toml");
        let mut section = "";
        let mut shown = Vec::new();
        let mut uncommented = String::new();
        for line in shipped.lines() {
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_end_matches(']');
                uncommented.push_str(line);
            } else if let Some(kv) = line.strip_prefix("# ").filter(|kv| {
                kv.split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            }) {
                shown.push(format!("{section}.{}", kv.split_once(" = ").unwrap().0));
                uncommented.push_str(kv);
            }
            uncommented.push('\n');
        }
        let keys: Vec<String> = KEYS.iter().map(|k| k.dotted()).collect();
        let mut sorted = shown.clone();
        sorted.sort();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(
            sorted, want,
            "packaging/agent.toml must show every key once"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, uncommented).unwrap();
        let mut raw: RawConfig = crate::config::load(KEYS, Some(&path), true, []).unwrap();
        raw.device = RawDevice::default();
        raw.sync.hub = RawConfig::default().sync.hub;
        assert_eq!(raw, RawConfig::default());
    }

    #[test]
    fn the_console_is_served_on_loopback_only() {
        assert_eq!(console_addr(""), Ok(None));
        assert_eq!(
            console_addr("127.0.0.1:8900"),
            Ok(Some("127.0.0.1:8900".parse().unwrap()))
        );
        assert!(console_addr("[::1]:0").unwrap().is_some());
        let e = console_addr("0.0.0.0:8900").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        assert!(console_addr("192.168.1.5:80").is_err());
        let e = console_addr("localhost:8900").unwrap_err();
        assert!(e.contains("127.0.0.1:8900"), "{e}");
    }

    #[test]
    fn table_and_struct_agree() {
        // Every field of the serialized struct is a key of the table, and
        // every key of the table is a field.
        let value = toml::Value::try_from(RawConfig::default()).unwrap();
        let mut fields = Vec::new();
        for (section, table) in value.as_table().unwrap() {
            for (name, _) in table.as_table().unwrap() {
                fields.push(format!("{section}.{name}"));
            }
        }
        let mut keys: Vec<String> = KEYS.iter().map(|k| k.dotted()).collect();
        fields.sort();
        keys.sort();
        assert_eq!(fields, keys);
    }

    fn sample(kind: Kind) -> &'static str {
        match kind {
            Kind::Str => "x1",
            Kind::Bool => "true",
            Kind::U64 | Kind::Bytes => "4096",
            Kind::Secs => "3",
            Kind::Choice(options) => options[options.len() - 1],
            Kind::List => "a,b",
        }
    }

    #[test]
    fn every_key_round_trips_through_its_env_var() {
        for key in KEYS {
            let name = key.env_name();
            assert_eq!(
                name,
                format!("LOGBOOK_{}_{}", key.section, key.key).to_ascii_uppercase()
            );
            let env = vec![(name.clone(), sample(key.kind).to_owned())];
            let raw: RawConfig = crate::config::load(KEYS, None, false, env).unwrap();
            let value = toml::Value::try_from(&raw).unwrap();
            let got = &value[key.section][key.key];
            let want = sample(key.kind);
            let got_text = match got {
                toml::Value::String(s) => s.clone(),
                toml::Value::Float(f) => format!("{f}"),
                toml::Value::Array(items) => items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            assert_eq!(got_text, want, "{name}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let check = |env: &[(&str, &str)], want: &str| {
            let env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("LOGBOOK_DEVICE_ID".to_string(), "d1".to_string())]);
            let err = load(
                Some(Path::new("/nonexistent.toml")),
                &Overrides::default(),
                env,
            );
            let msg = err.unwrap_err().to_string();
            assert!(msg.contains(want), "{msg} should contain {want}");
        };
        check(&[], "/nonexistent.toml: cannot read");
    }

    #[test]
    fn resolved_values() {
        let env = vec![
            ("LOGBOOK_DEVICE_ID".to_string(), "robot-7".to_string()),
            ("LOGBOOK_BUFFER_MAX_BYTES".to_string(), "1MiB".to_string()),
            (
                "LOGBOOK_BUFFER_COMMIT_INTERVAL".to_string(),
                "50ms".to_string(),
            ),
        ];
        let o = Overrides {
            state_dir: Some("/tmp/s".into()),
            runtime_dir: Some("/tmp/r".into()),
        };
        let cfg = load(None, &o, env).unwrap();
        assert_eq!(cfg.device_id, "robot-7");
        assert_eq!(cfg.max_bytes, 1 << 20);
        assert_eq!(cfg.commit_interval, Duration::from_millis(50));
        assert_eq!(cfg.api_socket(), PathBuf::from("/tmp/r/api.sock"));
        let text = to_toml(&cfg);
        assert!(text.contains("state_dir = \"/tmp/s\""), "{text}");
        let small = vec![
            ("LOGBOOK_DEVICE_ID".to_string(), "r".to_string()),
            ("LOGBOOK_BUFFER_MAX_BYTES".to_string(), "1KiB".to_string()),
        ];
        let err = load(None, &o, small).unwrap_err().to_string();
        assert!(
            err.contains("buffer.max_bytes: must be at least 256KiB"),
            "{err}"
        );
    }
}
