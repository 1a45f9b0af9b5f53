//! TLS on the client endpoint, with certificates that rotate without a restart.
//!
//! ```text
//!   --tls-cert / --tls-key (PEM; a kubernetes.io/tls Secret's tls.crt / tls.key)
//!     └─ ReloadingCert: re-read at most every RELOAD_CHECK, on the next handshake; a
//!        pair that does not parse or match keeps the previous one (logged)
//!   accept (per-address caps) ─> handshake (own task, HANDSHAKE_TIMEOUT, ALPN h2) ─> tonic
//! ```
//!
//! cert-manager renews a Secret in place and the kubelet refreshes the mounted files; new
//! connections get the new certificate, open ones keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admission::connections::Conn;

/// How often the certificate files are looked at again (on a handshake).
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate: both flags or neither (plaintext gRPC, `h2c`).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain to serve gRPC over TLS with (e.g. a `kubernetes.io/tls`
    /// Secret's `tls.crt`); re-read when it changes. Needs --tls-key.
    #[arg(long = "tls-cert", env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (`tls.key`).
    #[arg(long = "tls-key", env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("the key {} does not fit the certificate {}: {source}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsArgs {
    /// The acceptor, or `None` without a certificate.
    pub fn acceptor(&self) -> Result<Option<TlsAcceptor>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let resolver = Arc::new(ReloadingCert::load(cert, key)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        // gRPC clients (grpc-go among them) insist on HTTP/2 by ALPN; HTTP/1.1 for the
        // OpenAI-compatible API's clients that speak only that.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tracing::info!(cert = %cert.display(), key = %key.display(), "serving gRPC over TLS; the files are re-read when they change");
        Ok(Some(TlsAcceptor::from(Arc::new(config))))
    }
}

/// The certificate and key files, re-read when they change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// When the files were last looked at, and what they held.
    checked: Mutex<(Instant, Vec<u8>)>,
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let (bytes, certified) = read_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(certified)),
            checked: Mutex::new((Instant::now(), bytes)),
        })
    }

    /// Re-reads the files if [`RELOAD_CHECK`] has passed and they changed.
    fn maybe_reload(&self) {
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checked.0.elapsed() < RELOAD_CHECK {
            return;
        }
        checked.0 = Instant::now();
        let raw = [std::fs::read(&self.cert), std::fs::read(&self.key)];
        let [Ok(cert), Ok(key)] = raw else {
            // Mid-swap, or gone: keep serving the current pair, look again later.
            return;
        };
        let bytes = [cert, key].concat();
        if bytes == checked.1 {
            return;
        }
        checked.1 = bytes;
        match read_pair(&self.cert, &self.key) {
            Ok((_, certified)) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(certified);
                tracing::info!(cert = %self.cert.display(), "TLS certificate changed: new connections get the new one");
            }
            Err(e) => {
                tracing::error!(error = %e, "the TLS certificate files changed but cannot be used; keeping the previous certificate");
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Reads and checks a certificate chain and its key; also returns the raw bytes.
fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, CertifiedKey), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let pem_error = |path: &Path, what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error(key, format!("not a PEM private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| pem_error(key, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    Ok(([cert_pem, key_pem].concat(), certified))
}

/// An accepted connection, in the clear or inside TLS.
#[derive(Debug)]
pub enum MaybeTls {
    Plain(Conn),
    Tls(Box<tokio_rustls::server::TlsStream<Conn>>),
}

impl Connected for MaybeTls {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            MaybeTls::Plain(c) => c.connect_info(),
            MaybeTls::Tls(t) => t.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(c) => Pin::new(c).poll_read(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(c) => Pin::new(c).poll_write(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(c) => Pin::new(c).poll_flush(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(c) => Pin::new(c).poll_shutdown(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(c) => c.is_write_vectored(),
            MaybeTls::Tls(t) => t.is_write_vectored(),
        }
    }
}

/// `plain` as it is, or, with an acceptor, each connection after its TLS handshake. The
/// handshakes run in tasks of their own, so a slow or silent client holds up no one; a
/// failed or timed-out one is logged at debug and dropped.
pub fn incoming(
    plain: impl Stream<Item = io::Result<Conn>> + Send + 'static,
    acceptor: Option<TlsAcceptor>,
) -> Pin<Box<dyn Stream<Item = io::Result<MaybeTls>> + Send>> {
    let Some(acceptor) = acceptor else {
        return Box::pin(plain.map(|c| c.map(MaybeTls::Plain)));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<MaybeTls>>(64);
    tokio::spawn(async move {
        let mut plain = Box::pin(plain);
        loop {
            let next = tokio::select! {
                next = plain.next() => next,
                // The server stopped taking connections: stop accepting.
                () = tx.closed() => return,
            };
            let conn = match next {
                Some(Ok(conn)) => conn,
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(MaybeTls::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
