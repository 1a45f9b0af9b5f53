//! Who is calling: the API key's tenant and tier, or — when no keys are configured — an
//! anonymous caller keyed by its address. [`Identify`] is the layer that does it for every
//! call before its body is read, and puts the [`Caller`] into the request's extensions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;

use super::Admission;
use super::keys::{Bearer, bearer};
use super::outcome::{Call, Rejection, ResponseFuture};
use super::status;
use super::tiers::Tier;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The quota and fairness key: the tenant, or `anonymous/<address>`.
    pub key: String,
    /// The tenant label for metrics (`anonymous` for every anonymous caller, so an
    /// address flood does not create series).
    pub label: String,
    /// Its tier.
    pub tier: Arc<Tier>,
}

impl Admission {
    /// Who is calling, from the request's headers (`authorization: Bearer <key>`) and the
    /// peer's address: the API key's tenant and tier, or — when no keys are configured —
    /// an anonymous caller keyed by its address, in the default tier.
    pub fn identify(
        &self,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, Rejection> {
        let Some(keys) = &self.keys else {
            let ip = peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string());
            return Ok(Caller {
                key: format!("anonymous/{ip}"),
                label: "anonymous".into(),
                tier: self.tiers.default_tier(),
            });
        };
        let key = match bearer(headers) {
            Bearer::Key(key) => key,
            Bearer::Missing => {
                return Err(status::unauthenticated(
                    "authorization: an API key is required, as `authorization: Bearer <key>` \
                     metadata",
                ));
            }
            Bearer::Malformed => {
                return Err(status::unauthenticated(
                    "authorization: expected `Bearer <key>` (the scheme `Bearer`, a space, then \
                     the key)",
                ));
            }
        };
        let ring = keys.ring();
        let owner = ring
            .lookup(key)
            .ok_or_else(|| status::unauthenticated("authorization: the API key is not valid"))?;
        Ok(Caller {
            key: owner.tenant.clone(),
            label: owner.tenant.clone(),
            tier: self.tiers.get_or_default(&owner.tier),
        })
    }
}

/// The layer that makes [`Identify`] services.
#[derive(Debug, Clone)]
pub struct IdentifyLayer {
    admission: Arc<Admission>,
}

impl IdentifyLayer {
    /// Identifies callers with `admission`'s keys.
    pub fn new(admission: Arc<Admission>) -> Self {
        Self { admission }
    }
}

impl<S> tower::Layer<S> for IdentifyLayer {
    type Service = Identify<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Identify {
            inner,
            admission: self.admission.clone(),
        }
    }
}

/// Refuses unidentified callers (`UNAUTHENTICATED`); puts the [`Caller`] of the others
/// into the request's extensions and its [`Call`] record.
#[derive(Debug, Clone)]
pub struct Identify<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S, B> tower::Service<http::Request<B>> for Identify<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        let call = request
            .extensions()
            .get::<Call>()
            .cloned()
            .unwrap_or_default();
        match self.admission.identify(request.headers(), peer) {
            Ok(caller) => {
                call.identified(caller.clone());
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(rejection) => {
                let response = call.refuse(rejection).into_http::<Body>();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}
