//! The hub's own accept loop: at most `server.max_connections` open
//! connections, TLS when `server.tls_cert` and `server.tls_key` are set
//! (client certificates required when `server.client_ca` is), and time
//! bounds on what a client may leave the hub waiting for — the TLS
//! handshake and each request's headers (`server.header_timeout`, also the
//! idle time of a kept-alive connection) and any silence in the middle of
//! a body (`server.body_timeout`). Each request reaches the router with
//! the connection's [`PeerCert`] as an extension.
//!
//! Invariant: a slow or silent client holds one connection slot for at
//! most these bounds, never the accept loop; a refused handshake or a
//! timed-out read ends only its own connection.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::config::{ConnLimits, HubConfig, TlsFiles};

/// A configuration file the hub cannot serve TLS with: one line naming
/// the key, the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key} {path}: {message}")]
pub struct TlsError {
    key: &'static str,
    path: String,
    message: String,
}

/// How the hub accepts connections: its TLS (if any) and its bounds.
#[derive(Clone)]
pub struct Acceptor {
    tls: Option<TlsAcceptor>,
    /// Whether connections must present a client certificate.
    pub mtls: bool,
    limits: ConnLimits,
}

impl Acceptor {
    /// Reads the PEM files `config` names (a clear error for a missing or
    /// unreadable file, or one without what it should hold). Blocking.
    pub fn load(config: &HubConfig) -> Result<Acceptor, TlsError> {
        let tls = config.tls.as_ref().map(server_config).transpose()?;
        Ok(Acceptor {
            mtls: config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            tls: tls.map(|c| TlsAcceptor::from(Arc::new(c))),
            limits: config.conn.clone(),
        })
    }

    /// `https` or `http`, for messages.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError {
        key,
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(key, path)?;
    let bad = |message: String| TlsError {
        key,
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block in this PEM file".into()));
    }
    Ok(certs)
}

/// The rustls server configuration of `files`.
fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let certs = certificates("server.tls_cert", &files.cert)?;
    let key_pem = read_pem("server.tls_key", &files.key)?;
    let bad_key = |message: String| TlsError {
        key: "server.tls_key",
        path: files.key.display().to_string(),
        message,
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        bad_key(format!(
            "no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_key(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates("server.client_ca", ca)? {
                roots.add(c).map_err(|e| TlsError {
                    key: "server.client_ca",
                    path: ca.display().to_string(),
                    message: format!("not a CA certificate rustls can use: {e}"),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError {
                key: "server.client_ca",
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad_key(format!("does not go with server.tls_cert: {e}")))?;
    // The hub speaks HTTP/1.1 only (WebSocket upgrades included).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificate a client presented on this request's connection
/// (`None` without mTLS): a request extension every request carries.
#[derive(Debug, Clone, Default)]
pub struct PeerCert(pub Option<Arc<CertificateDer<'static>>>);

impl PeerCert {
    /// Whether the certificate names `device_id` as a DNS subjectAltName
    /// (the form rustls checks; the certificate's chain was verified in the
    /// handshake). `Ok` without a certificate: the connection had no mTLS.
    pub fn check_device(&self, device_id: &str) -> Result<(), String> {
        let Some(der) = &self.0 else { return Ok(()) };
        let name = ServerName::try_from(device_id).map_err(|_| {
            format!(
                "device id {device_id:?} cannot be named by a client certificate (not a DNS name)"
            )
        })?;
        let cert = rustls::server::ParsedCertificate::try_from(der.as_ref())
            .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
        rustls::client::verify_server_name(&cert, &name).map_err(|_| {
            format!("the client certificate does not name device {device_id:?} (its DNS subjectAltName must)")
        })
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets each
/// connection finish its request in flight and waits for them.
pub async fn serve(
    listener: TcpListener,
    acceptor: Acceptor,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(acceptor.limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        // A slot first: past the limit, connections wait in the backlog.
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: the loop goes
                    // on once some connection ends.
                    tracing::warn!("accept failed: {e}");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, stop) = (acceptor.clone(), router.clone(), stop.clone());
        connections.spawn(async move {
            connection(tcp, acceptor, router, stop).await;
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn connection(tcp: TcpStream, acceptor: Acceptor, router: Router, stop: CancellationToken) {
    let limits = acceptor.limits.clone();
    match &acceptor.tls {
        None => {
            http(
                TokioIo::new(tcp),
                PeerCert::default(),
                router,
                &limits,
                stop,
            )
            .await
        }
        Some(tls) => {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(limits.header_timeout, tls.accept(tcp)) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                },
            };
            let peer = PeerCert(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(c.clone().into_owned())),
            );
            http(TokioIo::new(stream), peer, router, &limits, stop).await
        }
    }
}

async fn http<I>(
    io: I,
    peer: PeerCert,
    router: Router,
    limits: &ConnLimits,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let body_timeout = limits.body_timeout;
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(|b| axum::body::Body::new(IdleBody::new(b, body_timeout)));
        req.extensions_mut().insert(peer.clone());
        let mut router = router.clone();
        tower_service::Service::call(&mut router, req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

/// A request body that fails once its client sent nothing for `timeout`
/// while the hub waited for more (the time a handler takes between reads
/// does not count).
struct IdleBody {
    inner: Incoming,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

impl IdleBody {
    fn new(inner: Incoming, timeout: Duration) -> IdleBody {
        IdleBody {
            inner,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            waiting: false,
        }
    }
}

/// The error a body that went silent ends with.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of the body for {0:?} (server.body_timeout)")]
pub struct BodyTimeout(Duration);

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
