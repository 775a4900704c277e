//! `logbook log`, the shell's way in (like `logger(1)`): records written as
//! JSON lines to `ingest.sock`, so they carry the sender's trusted fields
//! like any other client's.
//!
//! Invariant: one connection, one blocking write per record with a
//! timeout; a record is one line whatever its message holds (JSON escapes
//! newlines), and nothing is sent before the level is known to be valid.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wire::Level;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("is logbookd running? no socket at {}", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on {}: join the group that owns it (ingest.socket_group)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("writing to {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What every record of one `logbook log` carries.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    /// Empty: no module.
    pub module: String,
}

impl LogLine {
    /// The JSON line for `message`.
    pub fn encode(&self, message: &str) -> Vec<u8> {
        let mut obj = serde_json::Map::new();
        obj.insert("level".into(), self.level.as_str().into());
        if !self.module.is_empty() {
            obj.insert("module".into(), self.module.as_str().into());
        }
        obj.insert("message".into(), message.into());
        let mut line = serde_json::to_vec(&obj).expect("a map of strings serializes");
        line.push(b'\n');
        line
    }
}

/// Sends one record per message to the ingest socket at `socket`; returns
/// how many were written, once the agent has read to their end (or after
/// 5 s). Read is not committed: a caller that must see them stored asks
/// the local API to flush.
pub fn send(
    socket: &Path,
    line: &LogLine,
    messages: impl IntoIterator<Item = std::io::Result<String>>,
) -> Result<u64, LogError> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            LogError::NotRunning(socket.to_owned())
        }
        std::io::ErrorKind::PermissionDenied => LogError::PermissionDenied(socket.to_owned()),
        _ => LogError::Io {
            path: socket.to_owned(),
            source: e,
        },
    })?;
    let io = |source| LogError::Io {
        path: socket.to_owned(),
        source,
    };
    // The agent never makes a client wait long; a stuck one is an error.
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    // One write per record, unbuffered: a pipe that stays open (`tail -f |
    // logbook log`) gets each line to the agent as it comes.
    let mut out = stream;
    let mut sent = 0;
    for m in messages {
        let m = m.map_err(|source| LogError::Io {
            path: PathBuf::from("stdin"),
            source,
        })?;
        out.write_all(&line.encode(&m)).map_err(io)?;
        sent += 1;
    }
    // Wait until the agent has taken the connection: it reads the sender's
    // trusted fields (process name from /proc) when it accepts, and a
    // process that has already exited by then has none. The agent closes
    // its side after our end of stream; a bounded wait, never an error
    // (every record was written).
    let _ = out.shutdown(std::net::Shutdown::Write);
    let _ = out.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = std::io::Read::read(&mut out, &mut [0u8; 1]);
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(level: Level, module: &str, message: &str, expected: &str) {
        let line = LogLine {
            level,
            module: module.into(),
        };
        assert_eq!(String::from_utf8(line.encode(message)).unwrap(), expected);
    }

    #[test]
    fn lines() {
        check(
            Level::Info,
            "",
            "hello",
            "{\"level\":\"info\",\"message\":\"hello\"}\n",
        );
        check(
            Level::Warn,
            "power",
            "battery \"low\"\nreally",
            "{\"level\":\"warn\",\"message\":\"battery \\\"low\\\"\\nreally\",\"module\":\"power\"}\n",
        );
    }
}
