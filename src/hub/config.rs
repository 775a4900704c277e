//! The hub's configuration: the table of known keys (`LOGBOOK_*` environment
//! names derive from it) and the typed, resolved [`HubConfig`].
//!
//! Invariant: every limit the hub enforces on a request is a field here, so
//! an operator can see and change all of them in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, Key, Kind};

/// Default configuration file, read when present (required with `--config`).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/logbook/hub.toml";

/// Every key `logbook-hub` understands.
pub const KEYS: &[Key] = &[
    Key {
        section: "server",
        key: "listen",
        kind: Kind::Str,
        doc: "address to listen on (host:port; port 0 picks a free one)",
    },
    Key {
        section: "server",
        key: "data_dir",
        kind: Kind::Str,
        doc: "directory holding hub.db, blobs/ and uploads/",
    },
    Key {
        section: "server",
        key: "max_streams",
        kind: Kind::U64,
        doc: "most live WebSocket log streams at once",
    },
    Key {
        section: "server",
        key: "tls_cert",
        kind: Kind::Str,
        doc: "PEM certificate chain to serve TLS with (with server.tls_key); unset: plain HTTP",
    },
    Key {
        section: "server",
        key: "tls_key",
        kind: Kind::Str,
        doc: "PEM private key of server.tls_cert",
    },
    Key {
        section: "server",
        key: "client_ca",
        kind: Kind::Str,
        doc: "PEM CA certificates: every client must present a certificate they signed (mTLS); a device's must name its device id (DNS subjectAltName)",
    },
    Key {
        section: "server",
        key: "max_connections",
        kind: Kind::U64,
        doc: "most open client connections; more wait in the kernel's backlog",
    },
    Key {
        section: "server",
        key: "header_timeout",
        kind: Kind::Secs,
        doc: "longest a client may take for the TLS handshake and for a request's headers (also the idle time of a kept-alive connection)",
    },
    Key {
        section: "server",
        key: "body_timeout",
        kind: Kind::Secs,
        doc: "longest a client may send nothing in the middle of a request body",
    },
    Key {
        section: "server",
        key: "stream_send_timeout",
        kind: Kind::Secs,
        doc: "a live stream whose client takes longer than this to take one message is closed (slow consumer)",
    },
    Key {
        section: "devices",
        key: "requests_per_sec",
        kind: Kind::U64,
        doc: "ingest requests (batches, upload requests) one device token may make per second on average; 0: no limit",
    },
    Key {
        section: "devices",
        key: "burst",
        kind: Kind::U64,
        doc: "ingest requests one device token may make at once above its rate",
    },
    Key {
        section: "devices",
        key: "max_concurrent",
        kind: Kind::U64,
        doc: "ingest requests of one device token in progress at once",
    },
    Key {
        section: "ingest",
        key: "max_body_bytes",
        kind: Kind::Bytes,
        doc: "largest compressed batch body",
    },
    Key {
        section: "ingest",
        key: "max_decompressed_bytes",
        kind: Kind::Bytes,
        doc: "largest batch after gunzip (a gzip bomb stops here)",
    },
    Key {
        section: "ingest",
        key: "max_inflight_bytes",
        kind: Kind::Bytes,
        doc: "most batch bytes held at once across requests (bodies, then decoded); more wait their turn",
    },
    Key {
        section: "ingest",
        key: "max_records",
        kind: Kind::U64,
        doc: "most records in one batch",
    },
    Key {
        section: "ingest",
        key: "max_field_bytes",
        kind: Kind::Bytes,
        doc: "largest message or metadata of one record",
    },
    Key {
        section: "uploads",
        key: "max_bytes",
        kind: Kind::Bytes,
        doc: "largest artifact upload",
    },
    Key {
        section: "uploads",
        key: "expire_after",
        kind: Kind::Secs,
        doc: "an unfinished upload with no write for this long is deleted (tus expiration)",
    },
    Key {
        section: "storage",
        key: "database",
        kind: Kind::Str,
        doc: "postgres:// URL of the database (a fleet of replicas); unset: SQLite hub.db in server.data_dir",
    },
    Key {
        section: "storage",
        key: "blobs",
        kind: Kind::Str,
        doc: "s3://bucket/prefix for artifacts (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); unset: blobs/ and uploads/ in server.data_dir",
    },
    Key {
        section: "storage",
        key: "s3_endpoint",
        kind: Kind::Str,
        doc: "S3 endpoint URL (MinIO, Ceph RGW, R2, ...); unset: AWS_ENDPOINT_URL, else AWS itself",
    },
    Key {
        section: "storage",
        key: "s3_region",
        kind: Kind::Str,
        doc: "S3 region; unset: AWS_REGION, else us-east-1",
    },
    Key {
        section: "storage",
        key: "s3_virtual_hosted",
        kind: Kind::Bool,
        doc: "address the bucket as bucket.endpoint (virtual-hosted style) instead of endpoint/bucket (path style, the default)",
    },
    Key {
        section: "storage",
        key: "s3_allow_http",
        kind: Kind::Bool,
        doc: "allow a plain http:// endpoint (a local MinIO); on by default when the endpoint is http://",
    },
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct Raw {
    server: RawServer,
    ingest: RawIngest,
    uploads: RawUploads,
    storage: RawStorage,
    devices: RawDevices,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct RawServer {
    listen: String,
    data_dir: String,
    max_streams: u64,
    /// Empty: plain HTTP.
    tls_cert: String,
    tls_key: String,
    /// Empty: no client certificates asked for.
    client_ca: String,
    max_connections: u64,
    header_timeout: f64,
    body_timeout: f64,
    stream_send_timeout: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct RawDevices {
    requests_per_sec: u64,
    burst: u64,
    max_concurrent: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct RawIngest {
    max_body_bytes: u64,
    max_decompressed_bytes: u64,
    max_inflight_bytes: u64,
    max_records: u64,
    max_field_bytes: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct RawStorage {
    /// Empty: the default.
    database: String,
    /// Empty: the default.
    blobs: String,
    /// Empty: from the environment.
    s3_endpoint: String,
    /// Empty: from the environment.
    s3_region: String,
    s3_virtual_hosted: Option<bool>,
    s3_allow_http: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct RawUploads {
    max_bytes: u64,
    expire_after: f64,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            server: RawServer {
                listen: "127.0.0.1:8470".into(),
                data_dir: "/var/lib/logbook-hub".into(),
                max_streams: 256,
                tls_cert: String::new(),
                tls_key: String::new(),
                client_ca: String::new(),
                max_connections: 4096,
                header_timeout: 10.0,
                body_timeout: 30.0,
                stream_send_timeout: 30.0,
            },
            devices: RawDevices {
                // An agent sends a batch at most every linger (0.5 s) and
                // an upload in chunks: far below this, except a misbehaving
                // one.
                requests_per_sec: 20,
                burst: 40,
                max_concurrent: 4,
            },
            ingest: RawIngest {
                max_body_bytes: 16 << 20,
                max_decompressed_bytes: 128 << 20,
                max_inflight_bytes: 512 << 20,
                max_records: 100_000,
                max_field_bytes: 64 << 10,
            },
            uploads: RawUploads {
                max_bytes: 16 << 30,
                // A robot may be offline for days mid-upload.
                expire_after: 7.0 * 24.0 * 3600.0,
            },
            storage: RawStorage::default(),
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        Raw::default().server
    }
}
impl Default for RawIngest {
    fn default() -> Self {
        Raw::default().ingest
    }
}
impl Default for RawDevices {
    fn default() -> Self {
        Raw::default().devices
    }
}
impl Default for RawUploads {
    fn default() -> Self {
        Raw::default().uploads
    }
}

/// The resolved configuration of one hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_streams: usize,
    pub limits: Limits,
    /// An unfinished upload with no write for this long is deleted.
    pub upload_expire_after: std::time::Duration,
    pub database: Database,
    pub blobs: BlobStorage,
    /// TLS served by the hub itself (`server.tls_*`); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Bounds on connections (`server.max_connections`, `*_timeout`).
    pub conn: ConnLimits,
    /// Bounds on one device token's ingest (`[devices]`).
    pub devices: DeviceLimits,
}

/// The PEM files of `server.tls_cert`, `server.tls_key` and
/// `server.client_ca` (read when the hub starts: `hub::listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Bounds on client connections.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// TLS handshake, request headers, keep-alive idle.
    pub header_timeout: std::time::Duration,
    /// Longest silence in the middle of a request body.
    pub body_timeout: std::time::Duration,
    /// Longest one live-stream message may wait for its client.
    pub stream_send_timeout: std::time::Duration,
}

/// Bounds on one device token's ingest requests.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLimits {
    /// Average rate; `None`: unlimited.
    pub requests_per_sec: Option<u32>,
    pub burst: u32,
    pub max_concurrent: usize,
}

/// Where the hub keeps its rows (`storage.database`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// SQLite, `hub.db` in the data directory (the key unset).
    SqliteInDataDir,
    /// PostgreSQL at this URL (`postgres://` or `postgresql://`).
    Postgres(PostgresUrl),
}

/// A PostgreSQL URL; its `Debug` and [`PostgresUrl::redacted`] never show
/// the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The URL itself, password included: only for connecting.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`, for messages.
    pub fn redacted(&self) -> String {
        crate::hub::store::PgStore::redact(&self.0)
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted())
    }
}

/// Where the hub keeps artifact bytes (`storage.blobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobStorage {
    /// `blobs/` and `uploads/` in the data directory (the key unset).
    DirInDataDir,
    /// An S3-compatible bucket (`s3://bucket/prefix`).
    S3(S3Config),
}

/// An S3-compatible bucket and the `storage.s3_*` keys; what they leave
/// unset comes from the standard `AWS_*` variables (credentials always do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without slashes at either end.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub virtual_hosted: Option<bool>,
    pub allow_http: Option<bool>,
}

impl S3Config {
    /// `s3://bucket/prefix`, for messages.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Bounds on what one request may make the hub read or hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    /// Bytes of batches held at once by every request together
    /// (`Hub::inflight`).
    pub max_inflight_bytes: usize,
    pub max_records: usize,
    /// Bound on a record's message and metadata, and on an upload's path.
    pub max_field_bytes: usize,
    pub max_upload_bytes: u64,
}

impl Limits {
    /// The permits of the in-flight budget (`Hub::inflight`): the bytes of
    /// `ingest.max_inflight_bytes`, as many as a semaphore can hold.
    pub fn inflight_permits(&self) -> usize {
        self.max_inflight_bytes
            .min(tokio::sync::Semaphore::MAX_PERMITS)
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        resolve(Raw::default(), "defaults").expect("the defaults are valid")
    }
}

impl HubConfig {
    /// Loads `file` (required when given explicitly, else the default file
    /// if it exists) and the environment `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<HubConfig, ConfigError> {
        let (path, required) = match file {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let raw: Raw = crate::config::load(KEYS, Some(&path), required, env)?;
        resolve(raw, &path.display().to_string())
    }
}

/// The fuzz entry point of the hub's configuration (fuzz target `config`):
/// `data` as `hub.toml` (see [`crate::config::fuzz_one`]), resolved when
/// it loads. Never panics; a refusal is one line.
pub fn fuzz_one(data: &[u8]) {
    if let Some(raw) = crate::config::fuzz_one::<Raw>(KEYS, data) {
        if let Err(e) = resolve(raw, "fuzz.toml") {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}

fn resolve(raw: Raw, origin: &str) -> Result<HubConfig, ConfigError> {
    let err = |message: String| ConfigError::Key {
        origin: origin.to_owned(),
        message,
    };
    let listen = raw.server.listen.parse().map_err(|_| {
        err(format!(
            "server.listen: expected host:port like 127.0.0.1:8470, found {:?}",
            raw.server.listen
        ))
    })?;
    if raw.server.data_dir.is_empty() {
        return Err(err("server.data_dir: must not be empty".into()));
    }
    for (name, v) in [
        ("ingest.max_body_bytes", raw.ingest.max_body_bytes),
        (
            "ingest.max_decompressed_bytes",
            raw.ingest.max_decompressed_bytes,
        ),
        ("ingest.max_inflight_bytes", raw.ingest.max_inflight_bytes),
        ("ingest.max_records", raw.ingest.max_records),
        ("ingest.max_field_bytes", raw.ingest.max_field_bytes),
        ("uploads.max_bytes", raw.uploads.max_bytes),
    ] {
        if v == 0 {
            return Err(err(format!("{name}: must be greater than 0")));
        }
    }
    let secs = |name: &str, v: f64| {
        if !(v > 0.0 && v <= 86_400.0) {
            return Err(err(format!(
                "{name}: must be above 0 and at most 1 day, found {v}"
            )));
        }
        Ok(std::time::Duration::from_secs_f64(v))
    };
    let conn = ConnLimits {
        max_connections: match raw.server.max_connections {
            0 => return Err(err("server.max_connections: must be greater than 0".into())),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        },
        header_timeout: secs("server.header_timeout", raw.server.header_timeout)?,
        body_timeout: secs("server.body_timeout", raw.server.body_timeout)?,
        stream_send_timeout: secs("server.stream_send_timeout", raw.server.stream_send_timeout)?,
    };
    let small = |name: &str, v: u64| {
        u32::try_from(v)
            .map_err(|_| err(format!("{name}: must be at most {}, found {v}", u32::MAX)))
    };
    let devices = DeviceLimits {
        requests_per_sec: Some(small(
            "devices.requests_per_sec",
            raw.devices.requests_per_sec,
        )?)
        .filter(|r| *r > 0),
        burst: small("devices.burst", raw.devices.burst)?.max(1),
        max_concurrent: match raw.devices.max_concurrent {
            0 => return Err(err("devices.max_concurrent: must be greater than 0".into())),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        },
    };
    let path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
    let tls = match (path(&raw.server.tls_cert), path(&raw.server.tls_key)) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: path(&raw.server.client_ca),
        }),
        (None, None) if path(&raw.server.client_ca).is_some() => {
            return Err(err(
                "server.client_ca: needs server.tls_cert and server.tls_key (client certificates need TLS)".into(),
            ))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(err("server.tls_cert is set but server.tls_key is not".into()))
        }
        (None, Some(_)) => {
            return Err(err("server.tls_key is set but server.tls_cert is not".into()))
        }
    };
    if raw.uploads.expire_after <= 0.0 {
        return Err(err("uploads.expire_after: must be greater than 0".into()));
    }
    let database = match raw.storage.database.trim() {
        "" => Database::SqliteInDataDir,
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            // Parsed now, so a malformed URL is a configuration error, not
            // a failure at the first connection.
            if let Err(e) = url.parse::<tokio_postgres::Config>() {
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                return Err(err(format!(
                    "storage.database: {}: {why}",
                    crate::hub::store::PgStore::redact(url)
                )));
            }
            Database::Postgres(PostgresUrl(url.to_owned()))
        }
        _ => {
            return Err(err(
                "storage.database: expected a postgres:// URL, or nothing for SQLite in server.data_dir".into(),
            ))
        }
    };
    let blobs = match raw.storage.blobs.trim() {
        "" => BlobStorage::DirInDataDir,
        url if url.starts_with("s3://") => {
            let rest = &url["s3://".len()..];
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // S3's bucket naming rules, so a typo is caught before a request.
            let valid = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
                && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !valid {
                return Err(err(format!(
                    "storage.blobs: {url}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')"
                )));
            }
            let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
            BlobStorage::S3(S3Config {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
                endpoint: opt(&raw.storage.s3_endpoint),
                region: opt(&raw.storage.s3_region),
                virtual_hosted: raw.storage.s3_virtual_hosted,
                allow_http: raw.storage.s3_allow_http,
            })
        }
        _ => {
            return Err(err(
                "storage.blobs: expected an s3://bucket/prefix URL, or nothing for blobs/ in server.data_dir".into(),
            ))
        }
    };
    let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(HubConfig {
        listen,
        data_dir: PathBuf::from(raw.server.data_dir),
        max_streams: size(raw.server.max_streams),
        limits: Limits {
            max_body_bytes: size(raw.ingest.max_body_bytes),
            max_decompressed_bytes: size(raw.ingest.max_decompressed_bytes),
            max_inflight_bytes: size(raw.ingest.max_inflight_bytes),
            max_records: size(raw.ingest.max_records),
            max_field_bytes: size(raw.ingest.max_field_bytes),
            max_upload_bytes: raw.uploads.max_bytes,
        },
        upload_expire_after: std::time::Duration::try_from_secs_f64(raw.uploads.expire_after)
            .map_err(|e| err(format!("uploads.expire_after: {e}")))?,
        database,
        blobs,
        tls,
        conn,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_mutated_never_panic() {
        let sample = b"[server]\nlisten = \"0.0.0.0:8443\"\nmax_streams = 64\n\
            [ingest]\nmax_body_bytes = \"8MiB\"\nmax_records = 20000\n[uploads]\nexpire_after = \"3600s\"\n";
        let mut rng = crate::test_rng::Rng::new(0xc0e);
        // The sample itself loads: mutations start from the good path.
        assert!(crate::config::fuzz_one::<Raw>(KEYS, sample).is_some());
        fuzz_one(sample);
        for _ in 0..3_000 {
            fuzz_one(&crate::test_rng::mutate(&mut rng, sample));
        }
    }

    fn check(env: &[(&str, &str)], expected: Result<&str, &str>) {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let got = HubConfig::load(Some(Path::new("/nonexistent/hub.toml")), vec![])
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(got.is_err(), "an explicit missing file is an error");
        let got = crate::config::load::<Raw>(KEYS, None, false, env)
            .map_err(|e| e.to_string())
            .and_then(|raw| resolve(raw, "env").map_err(|e| e.to_string()))
            .map(|c| {
                format!(
                    "{} {} {}",
                    c.listen,
                    c.data_dir.display(),
                    c.limits.max_body_bytes
                )
            });
        assert_eq!(got.as_deref().map_err(|e| e.as_str()), expected);
    }

    #[test]
    fn env_overrides_and_errors() {
        check(&[], Ok("127.0.0.1:8470 /var/lib/logbook-hub 16777216"));
        check(
            &[
                ("LOGBOOK_SERVER_LISTEN", "0.0.0.0:9000"),
                ("LOGBOOK_SERVER_DATA_DIR", "/srv/hub"),
                ("LOGBOOK_INGEST_MAX_BODY_BYTES", "1MiB"),
            ],
            Ok("0.0.0.0:9000 /srv/hub 1048576"),
        );
        check(
            &[("LOGBOOK_SERVER_LISTEN", "nowhere")],
            Err("env: server.listen: expected host:port like 127.0.0.1:8470, found \"nowhere\""),
        );
        check(
            &[("LOGBOOK_INGEST_MAX_RECORDS", "0")],
            Err("env: ingest.max_records: must be greater than 0"),
        );
        check(
            &[("LOGBOOK_UPLOADS_EXPIRE_AFTER", "0s")],
            Err("env: uploads.expire_after: must be greater than 0"),
        );
    }

    #[test]
    fn storage_defaults_to_the_data_dir_and_refuses_what_this_build_cannot_serve() {
        let check = |env: &[(&str, &str)], expected: Result<(Database, BlobStorage), &str>| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            let got = crate::config::load::<Raw>(KEYS, None, false, env)
                .map_err(|e| e.to_string())
                .and_then(|raw| resolve(raw, "env").map_err(|e| e.to_string()))
                .map(|c| (c.database, c.blobs));
            assert_eq!(
                got.as_ref().map_err(|e| e.as_str()),
                expected.as_ref().map_err(|e| *e)
            );
        };
        let default = (Database::SqliteInDataDir, BlobStorage::DirInDataDir);
        check(&[], Ok(default.clone()));
        check(
            &[
                ("LOGBOOK_STORAGE_DATABASE", ""),
                ("LOGBOOK_STORAGE_BLOBS", " "),
            ],
            Ok(default),
        );
        let pg = |url: &str| Database::Postgres(PostgresUrl(url.into()));
        check(
            &[("LOGBOOK_STORAGE_DATABASE", "postgres://hub@db/logbook")],
            Ok((pg("postgres://hub@db/logbook"), BlobStorage::DirInDataDir)),
        );
        check(
            &[(
                "LOGBOOK_STORAGE_DATABASE",
                " postgresql://hub:pw@db/logbook ",
            )],
            Ok((
                pg("postgresql://hub:pw@db/logbook"),
                BlobStorage::DirInDataDir,
            )),
        );
        check(
            &[("LOGBOOK_STORAGE_DATABASE", "postgres://hub:pw@db:notaport/logbook")],
            Err("env: storage.database: postgres://hub:***@db:notaport/logbook: invalid connection string: invalid value for option `port`"),
        );
        assert_eq!(
            format!("{:?}", pg("postgres://hub:secret@db/logbook")),
            "Postgres(PostgresUrl(postgres://hub:***@db/logbook))"
        );
        check(
            &[("LOGBOOK_STORAGE_DATABASE", "/srv/hub.db")],
            Err("env: storage.database: expected a postgres:// URL, or nothing for SQLite in server.data_dir"),
        );
        check(
            &[
                ("LOGBOOK_STORAGE_BLOBS", "s3://fleet-logs/hub/a/"),
                ("LOGBOOK_STORAGE_S3_ENDPOINT", "http://127.0.0.1:9000"),
                ("LOGBOOK_STORAGE_S3_ALLOW_HTTP", "true"),
            ],
            Ok((
                Database::SqliteInDataDir,
                BlobStorage::S3(S3Config {
                    bucket: "fleet-logs".into(),
                    prefix: "hub/a".into(),
                    endpoint: Some("http://127.0.0.1:9000".into()),
                    region: None,
                    virtual_hosted: None,
                    allow_http: Some(true),
                }),
            )),
        );
        check(
            &[("LOGBOOK_STORAGE_BLOBS", "s3://Fleet_Logs")],
            Err("env: storage.blobs: s3://Fleet_Logs: \"Fleet_Logs\" is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')"),
        );
        check(
            &[("LOGBOOK_STORAGE_BLOBS", "s3://")],
            Err("env: storage.blobs: s3://: \"\" is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')"),
        );
        check(
            &[("LOGBOOK_STORAGE_BLOBS", "/srv/blobs")],
            Err("env: storage.blobs: expected an s3://bucket/prefix URL, or nothing for blobs/ in server.data_dir"),
        );
    }

    #[test]
    fn env_names() {
        let names: Vec<String> = KEYS.iter().map(Key::env_name).collect();
        assert!(names.contains(&"LOGBOOK_SERVER_DATA_DIR".to_string()));
        assert!(names.contains(&"LOGBOOK_UPLOADS_MAX_BYTES".to_string()));
        assert!(names.contains(&"LOGBOOK_STORAGE_DATABASE".to_string()));
        assert!(names.contains(&"LOGBOOK_STORAGE_BLOBS".to_string()));
        assert!(names.contains(&"LOGBOOK_STORAGE_S3_ENDPOINT".to_string()));
        assert!(names.contains(&"LOGBOOK_STORAGE_S3_ALLOW_HTTP".to_string()));
    }
}
