//! A small blocking client of `logbookd`'s local API (HTTP/1.1 over the
//! Unix socket `api.sock`), and session control for Rust programs on top of
//! it: open a session with tags, package and metadata, tag it, close it as
//! completed or failed.
//!
//! Invariant: std only (no async runtime in the host program); every call
//! is bounded by a timeout and every answer body by [`MAX_BODY`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::agent::types::{AddTag, OpenSession, SessionView, StopSession};
use crate::wire::{ErrorBody, Package};

/// Where `logbookd`'s local API listens unless told otherwise.
pub const DEFAULT_API_SOCKET: &str = "/run/logbook/api.sock";
/// Environment variable naming the API socket (used when the program does
/// not set one with [`Api::socket`]).
pub const API_SOCKET_ENV: &str = "LOGBOOK_API_SOCKET";
/// Largest answer read from the agent.
pub const MAX_BODY: usize = 16 << 20;
/// Longest header block read from the agent.
const MAX_HEADERS: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("is logbookd running? no socket at {}", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on {}: join the group that owns it (api.socket_group)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("talking to logbookd at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The agent refused the request; `code` is the API's error code (e.g.
    /// `conflict` when another session is active).
    #[error("{message} ({code}, HTTP {status})")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from logbookd: {0}")]
    Protocol(String),
}

/// A handle on the local API. Cheap; each call is one connection.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
    timeout: Duration,
}

impl Default for Api {
    fn default() -> Api {
        Api::new()
    }
}

impl Api {
    /// The socket from `$LOGBOOK_API_SOCKET`, else [`DEFAULT_API_SOCKET`].
    pub fn new() -> Api {
        let socket = std::env::var_os(API_SOCKET_ENV)
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_API_SOCKET), PathBuf::from);
        Api {
            socket,
            timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(mut self, path: impl AsRef<Path>) -> Api {
        self.socket = path.as_ref().to_owned();
        self
    }

    /// How long one call may take (connect, send, answer). Default 30 s: a
    /// session change first commits what clients already sent.
    pub fn timeout(mut self, timeout: Duration) -> Api {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Opens a session; fails with [`ApiError::Refused`] (`conflict`) when
    /// one is already active.
    pub fn open(&self, new: &NewSession) -> Result<Session, ApiError> {
        let body = serde_json::to_vec(&new.0).expect("serializable");
        let view: SessionView = self.json("POST", "/v1/sessions", Some(&body))?;
        Ok(Session {
            api: self.clone(),
            view,
        })
    }

    /// The active session, if any, to tag or close it.
    pub fn current(&self) -> Result<Option<Session>, ApiError> {
        match self.json::<SessionView>("GET", "/v1/sessions/current", None) {
            Ok(view) => Ok(Some(Session {
                api: self.clone(),
                view,
            })),
            Err(ApiError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One request; the status and body of the answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let io = |source| ApiError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ApiError::NotRunning(self.socket.clone())
            }
            std::io::ErrorKind::PermissionDenied => ApiError::PermissionDenied(self.socket.clone()),
            _ => io(e),
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: logbookd\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(body);
        s.write_all(&msg).map_err(io)?;
        read_response(BufReader::new(s)).map_err(|e| match e {
            Answer::Io(e) => io(e),
            Answer::Bad(m) => ApiError::Protocol(m),
        })
    }

    /// Calls and decodes a success body; an error body becomes
    /// [`ApiError::Refused`].
    pub fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self.call(method, path, body)?;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ApiError::Refused {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => ApiError::Refused {
                    status,
                    code: "http".into(),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol(format!("{path}: {e}")))
    }
}

/// What to open a session with.
#[derive(Debug, Clone, Default)]
pub struct NewSession(OpenSession);

impl NewSession {
    pub fn new() -> NewSession {
        NewSession::default()
    }

    pub fn tag(mut self, tag: impl Into<String>) -> NewSession {
        self.0.tags.push(tag.into());
        self
    }

    /// The software running (name and optional version).
    pub fn package(mut self, name: impl Into<String>, version: Option<&str>) -> NewSession {
        self.0.package = Some(Package {
            name: name.into(),
            version: version.map(str::to_owned),
        });
        self
    }

    pub fn meta(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> NewSession {
        self.0.metadata.insert(key.into(), value.into());
        self
    }
}

/// An open session. Dropping it leaves the session open (it outlives the
/// program unless closed, like `logbook session start`).
#[derive(Debug, Clone)]
pub struct Session {
    api: Api,
    view: SessionView,
}

impl Session {
    pub fn id(&self) -> uuid::Uuid {
        self.view.id
    }

    /// Where files for this session go; the agent uploads what appears.
    pub fn artifact_dir(&self) -> &Path {
        Path::new(&self.view.artifact_dir)
    }

    /// The session as the agent last answered.
    pub fn view(&self) -> &SessionView {
        &self.view
    }

    pub fn tag(&mut self, tag: &str) -> Result<(), ApiError> {
        let body = serde_json::to_vec(&AddTag { tag: tag.into() }).expect("serializable");
        self.view = self.api.json(
            "POST",
            &format!("/v1/sessions/{}/tags", self.view.id),
            Some(&body),
        )?;
        Ok(())
    }

    /// Closes the session as completed.
    pub fn close(self) -> Result<SessionView, ApiError> {
        self.stop(StopSession::default())
    }

    /// Closes the session as failed, with the reason.
    pub fn fail(self, error: &str) -> Result<SessionView, ApiError> {
        self.stop(StopSession {
            failed: true,
            error: Some(error.into()),
        })
    }

    fn stop(self, req: StopSession) -> Result<SessionView, ApiError> {
        let body = serde_json::to_vec(&req).expect("serializable");
        self.api.json(
            "POST",
            &format!("/v1/sessions/{}/stop", self.view.id),
            Some(&body),
        )
    }
}

enum Answer {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for Answer {
    fn from(e: std::io::Error) -> Answer {
        Answer::Io(e)
    }
}

/// Reads one HTTP/1.1 answer: status, then a body framed by
/// Content-Length, chunked encoding or the end of the connection.
fn read_response(mut r: impl BufRead) -> Result<(u16, Vec<u8>), Answer> {
    let mut head = 0;
    let mut line = String::new();
    let mut next_line = |r: &mut dyn BufRead, line: &mut String| -> Result<(), Answer> {
        line.clear();
        let n = r.take((MAX_HEADERS - head) as u64).read_line(line)?;
        head += n;
        if n == 0 || !line.ends_with('\n') {
            return Err(Answer::Bad("the answer's head ended early".into()));
        }
        Ok(())
    };
    next_line(&mut r, &mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Answer::Bad(format!("bad status line {:?}", line.trim_end())))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        next_line(&mut r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| Answer::Bad(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let too_big = || Answer::Bad(format!("answer over {MAX_BODY} bytes"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.by_ref().take(1024).read_line(&mut line)?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| Answer::Bad(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                break;
            }
            if body.len() + n > MAX_BODY {
                return Err(too_big());
            }
            let at = body.len();
            body.resize(at + n, 0);
            r.read_exact(&mut body[at..])?;
            let mut crlf = [0; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(too_big());
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_BODY {
            return Err(too_big());
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<(u16, &str), &str>) {
        let got = match read_response(raw.as_bytes()) {
            Ok((s, b)) => Ok((s, String::from_utf8(b).unwrap())),
            Err(Answer::Bad(m)) => Err(m),
            Err(Answer::Io(e)) => Err(e.to_string()),
        };
        let expected = expected
            .map(|(s, b)| (s, b.to_owned()))
            .map_err(str::to_owned);
        assert_eq!(got, expected, "{raw:?}");
    }

    #[test]
    fn answers() {
        check(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            Ok((200, "{}")),
        );
        check(
            "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            Ok((201, "abcde")),
        );
        check(
            "HTTP/1.1 404 Not Found\r\n\r\nto the end",
            Ok((404, "to the end")),
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            Err("failed to fill whole buffer"),
        );
        check("garbage\r\n\r\n", Err("bad status line \"garbage\""));
        check("HTTP/1.1 200 OK\r\n", Err("the answer's head ended early"));
        check(
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            ),
            Err("answer over 16777216 bytes"),
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            Err("bad Content-Length \"x\""),
        );
    }
}
