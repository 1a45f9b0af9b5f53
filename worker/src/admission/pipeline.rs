//! The admission pipeline: every check a call passes, in order, written once.
//!
//! ```text
//!  ── layers(), around the protocol's service: no request body needed ───────────────────
//!   CountOutcome   opens the call's record; counts its final status and, for generation,
//!                  the tenant's outcome, exactly once                     (outcome.rs)
//!   Identify       API key → Caller, into the request's extensions;
//!                  else UNAUTHENTICATED                                   (identity.rs)
//!   RequestQuota   generation only: request quota spent → RESOURCE_EXHAUSTED, before
//!                  the body is decoded; charges nothing                   (here)
//!  ── the protocol decodes and validates the body (INVALID_ARGUMENT), then ──────────────
//!   admit()        charge 1 request + prompt + max_tokens tokens          (accounting.rs)
//!                  (async: in redis mode the charge asks Redis)           (scope.rs)
//!                  count it accepted                                      (metrics.rs)
//!                  a slot now, or a place in the fair queue, or
//!                  UNAVAILABLE / DEADLINE_EXCEEDED                        (queue.rs)
//!   Reservation::start()  waits for the slot (shed or expired meanwhile → refused)
//!  ── the request runs holding its Slot; dropping the Slot or the Reservation refunds ────
//! ```
//!
//! Which of these a call gets is its RPC's [`Policy`], decided here from the method path
//! and nowhere else. A second protocol (an OpenAI-style HTTP API) plugs in at the same two
//! points: the same layers around its service (they read only headers, the peer address
//! and the path), and [`Admission::admit`] once it has decoded and validated a body.
//! Connections are limited before any of this, on accept ([`super::connections`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Status;
use tonic::body::Body;
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};

use super::Admission;
use super::identity::{Caller, IdentifyLayer};
use super::outcome::{Call, CountOutcomeLayer, ResponseFuture, StatusCounter};
use super::queue::Reservation;

/// What admission applies to one RPC beyond identity (which every RPC needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Refused while the caller's request quota is spent, and charged against it (with
    /// its tokens) by [`Admission::admit`].
    pub request_quota: bool,
    /// Counted per tenant in `switchyard_admission_requests_total`.
    pub counts_outcome: bool,
}

impl Policy {
    /// Generation: the whole pipeline.
    pub const GENERATION: Policy = Policy {
        request_quota: true,
        counts_outcome: true,
    };
    /// Metadata calls (tokenize, list models): a valid key; no quota.
    pub const LOOKUP: Policy = Policy {
        request_quota: false,
        counts_outcome: false,
    };

    /// The policy of the call at `path`: a gRPC method (`/package.Service/Method`) or an
    /// OpenAI-style HTTP route (`/v1/...`).
    pub fn of(path: &str) -> Policy {
        if let Some(route) = path.strip_prefix("/v1/") {
            return match route {
                "chat/completions" | "completions" => Policy::GENERATION,
                // Models, and unknown routes (answered 404 once identified).
                _ => Policy::LOOKUP,
            };
        }
        match path.rsplit('/').next() {
            Some("Generate" | "GenerateStream") => Policy::GENERATION,
            // Tokenize, ListModels, and anything added later until it is listed here.
            _ => Policy::LOOKUP,
        }
    }
}

/// The admission layers' stack: count outcome (outermost), identify, request quota.
pub type Layers = ServiceBuilder<
    Stack<RequestQuotaLayer, Stack<IdentifyLayer, Stack<CountOutcomeLayer, Identity>>>,
>;

/// The admission layers, outermost first. Wrap a protocol's service in them where the
/// server is built (`tonic::service::LayerExt::named_layer` keeps a gRPC service's name).
pub fn layers(admission: &Arc<Admission>, counter: Arc<dyn StatusCounter>) -> Layers {
    ServiceBuilder::new()
        .layer(CountOutcomeLayer::new(admission.clone(), counter))
        .layer(IdentifyLayer::new(admission.clone()))
        .layer(RequestQuotaLayer::new(admission.clone()))
}

/// What a valid request costs, for its token pre-charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Prompt tokens.
    pub prompt: u64,
    /// The most tokens it may generate.
    pub max_tokens: u64,
}

impl Admission {
    /// The body-dependent steps, for a request the protocol has validated: charges the
    /// request and its tokens (prompt + `max_tokens`), counts it accepted, and gives it a
    /// slot or a place in the fair queue — or refuses it, its outcome noted on `call`.
    ///
    /// `priority` is the protocol's 1 (low) … 4 (critical), anything else the tier's
    /// default; a request may lower its band below its tier's, never raise it. `deadline`
    /// is the client's: when the request must have finished (it is not started once it
    /// can no longer finish in time); `None`: it must start within the configured default.
    ///
    /// Async for the quota scope `redis`, whose charge asks Redis (bounded by its timeout,
    /// after which the request is decided locally); otherwise it never waits.
    pub async fn admit(
        self: &Arc<Self>,
        call: &Call,
        cost: Cost,
        priority: i32,
        deadline: Option<Instant>,
    ) -> Result<Reservation, Status> {
        let caller = call.caller().ok_or_else(|| {
            Status::internal(
                "the call was not identified (the service is served without admission)",
            )
        })?;
        let (quota, charge) = self
            .charge(caller, cost.prompt + cost.max_tokens)
            .await
            .map_err(|r| call.refuse(r))?;
        self.record_accepted(caller);
        let band = caller.tier.band_for(priority);
        let paced = super::share::paced(&quota.limits, &quota.remaining);
        let turn = self
            .enter(caller, band, paced, cost, charge, deadline)
            .map_err(|r| call.refuse(r))?;
        Ok(Reservation {
            call: call.clone(),
            caller: caller.clone(),
            band,
            turn,
            quota,
        })
    }
}

/// The layer that makes [`RequestQuota`] services.
#[derive(Debug, Clone)]
pub struct RequestQuotaLayer {
    admission: Arc<Admission>,
}

impl RequestQuotaLayer {
    /// Checks request quotas with `admission`'s.
    pub fn new(admission: Arc<Admission>) -> Self {
        Self { admission }
    }
}

impl<S> tower::Layer<S> for RequestQuotaLayer {
    type Service = RequestQuota<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestQuota {
            inner,
            admission: self.admission.clone(),
        }
    }
}

/// Refuses a call of an RPC with a request quota while its caller's is spent, before its
/// body is decoded, so a flooding tenant costs almost nothing. Charges nothing:
/// [`Admission::admit`] charges the request with its tokens once the body is valid.
#[derive(Debug, Clone)]
pub struct RequestQuota<S> {
    inner: S,
    admission: Arc<Admission>,
}

impl<S, B> tower::Service<http::Request<B>> for RequestQuota<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if Policy::of(request.uri().path()).request_quota
            && let Some(caller) = request.extensions().get::<Caller>()
            && let Err(rejection) = self.admission.precheck_request(caller)
        {
            let call = request
                .extensions()
                .get::<Call>()
                .cloned()
                .unwrap_or_default();
            let response = call.refuse(rejection).into_http::<Body>();
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt as _, StreamBody};
    use switchyard_proto::worker_config::{AdmissionConfig, TierConfig};
    use tower::Service as _;

    use futures::StreamExt as _;

    use super::*;
    use crate::admission::fair_queue::Band;
    use crate::admission::{AdmissionOptions, Outcome};
    use crate::frontend::FrontendMetrics;

    const KEY: &str = "acme-key-0123456789";

    /// Tier `free`: `requests` a minute, 100 tokens a minute; the key `KEY` is tenant
    /// `acme` in it.
    fn admission(
        requests: u64,
        max_inflight: usize,
        max_queued: u32,
    ) -> (Arc<Admission>, Arc<FrontendMetrics>) {
        let tier = TierConfig {
            name: "free".into(),
            priority: "normal".into(),
            weight: 1,
            requests_per_minute: Some(requests),
            tokens_per_minute: Some(100),
            cached_prompt_token_percent: None,
        };
        admission_with(
            &format!("acme:{KEY}:free\n"),
            tier,
            max_inflight,
            max_queued,
        )
    }

    /// Admission with the key file `keys` and the one tier `tier` (the default).
    fn admission_with(
        keys: &str,
        tier: TierConfig,
        max_inflight: usize,
        max_queued: u32,
    ) -> (Arc<Admission>, Arc<FrontendMetrics>) {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-pipeline-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tenants"), keys).expect("keys");
        let opts = AdmissionOptions {
            config: AdmissionConfig {
                api_keys_dir: Some(dir.to_string_lossy().into_owned()),
                default_tier: Some(tier.name.clone()),
                tiers: vec![tier],
                max_queued,
                default_deadline_seconds: 30,
                quota_scope: None,
            },
            max_inflight,
            min_service: Duration::from_millis(1),
            redis_timeout: Duration::from_millis(50),
        };
        let metrics = Arc::new(FrontendMetrics::new(1, 0));
        let admission = Admission::new(&opts, metrics.registry()).expect("admission");
        let _ = std::fs::remove_dir_all(&dir);
        (admission, metrics)
    }

    fn rand_suffix() -> u64 {
        static N: AtomicUsize = AtomicUsize::new(0);
        N.fetch_add(1, Ordering::Relaxed) as u64
    }

    /// Stands in for the gRPC service: answers every call with one message and `OK`
    /// trailers, or, with `hang`, one message and then nothing.
    #[derive(Clone)]
    struct Service {
        calls: Arc<AtomicUsize>,
        hang: bool,
    }

    impl tower::Service<http::Request<Body>> for Service {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            assert!(request.extensions().get::<Caller>().is_some(), "identified");
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let message =
                futures::stream::iter([Ok::<_, Status>(Frame::data(Bytes::from_static(b"reply")))]);
            let body = if self.hang {
                Body::new(StreamBody::new(message.chain(futures::stream::pending())))
            } else {
                Body::new(StreamBody::new(
                    message.chain(futures::stream::iter([Ok(Frame::trailers(trailers))])),
                ))
            };
            std::future::ready(Ok(http::Response::new(body)))
        }
    }

    fn request(method: &str, key: Option<&str>) -> http::Request<Body> {
        let mut r = http::Request::builder().uri(format!("/switchyard.v1.Inference/{method}"));
        if let Some(key) = key {
            r = r.header("authorization", format!("Bearer {key}"));
        }
        r.body(Body::empty()).expect("request")
    }

    async fn call<S>(svc: &mut S, r: http::Request<Body>) -> http::Response<Body>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    {
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .expect("ready");
        svc.call(r).await.expect("infallible")
    }

    fn series(metrics: &FrontendMetrics, name: &str) -> f64 {
        crate::telemetry::render(metrics.registry())
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// One call counted, as `deadline_exceeded` and `expired`, none as cancelled.
    fn assert_counted_expired_once(metrics: &FrontendMetrics) {
        let status = |s: &str| {
            series(
                metrics,
                &format!("switchyard_requests_total{{status=\"{s}\"}}"),
            )
        };
        assert_eq!(status("deadline_exceeded"), 1.0);
        assert_eq!(status("cancelled"), 0.0);
        assert_eq!(
            series(
                metrics,
                "switchyard_admission_requests_total{outcome=\"expired\",tenant=\"acme\",tier=\"free\"}"
            ),
            1.0
        );
    }

    fn code(response: &http::Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status")?.to_str().ok()
    }

    fn stack(
        admission: &Arc<Admission>,
        metrics: &Arc<FrontendMetrics>,
        hang: bool,
    ) -> (
        impl tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = Service {
            calls: calls.clone(),
            hang,
        };
        (layers(admission, metrics.clone()).service(inner), calls)
    }

    #[tokio::test]
    async fn list_models_successes_are_counted_once_by_the_outcome_layer() {
        let (admission, metrics) = admission(60, 4, 8);
        let (mut svc, calls) = stack(&admission, &metrics, false);
        for n in 1..=2 {
            let response = call(&mut svc, request("ListModels", Some(KEY))).await;
            let body = response.into_body().collect().await.expect("body");
            assert_eq!(
                body.trailers().and_then(|t| t.get("grpc-status")),
                Some(&http::HeaderValue::from_static("0"))
            );
            assert_eq!(
                series(&metrics, "switchyard_requests_total{status=\"ok\"}"),
                n as f64
            );
        }
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        // Lookups are not generation: no tenant outcome.
        let text = crate::telemetry::render(metrics.registry());
        assert!(
            !text.contains("switchyard_admission_requests_total{"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unidentified_calls_are_refused_before_the_service_and_counted_once() {
        let (admission, metrics) = admission(60, 4, 8);
        let (mut svc, calls) = stack(&admission, &metrics, false);
        for method in ["ListModels", "Tokenize", "Generate"] {
            let response = call(&mut svc, request(method, None)).await;
            assert_eq!(code(&response), Some("16"), "{method}: UNAUTHENTICATED");
            assert_eq!(
                response.headers().get("www-authenticate"),
                Some(&http::HeaderValue::from_static("Bearer"))
            );
        }
        let response = call(
            &mut svc,
            request("GenerateStream", Some("not-a-key-0123456789")),
        )
        .await;
        assert_eq!(code(&response), Some("16"));
        assert_eq!(calls.load(Ordering::Relaxed), 0, "the service never ran");
        assert_eq!(
            series(
                &metrics,
                "switchyard_requests_total{status=\"unauthenticated\"}"
            ),
            4.0
        );
        assert_eq!(
            series(
                &metrics,
                "switchyard_admission_requests_total{outcome=\"unauthenticated\",tenant=\"unknown\",tier=\"unknown\"}"
            ),
            2.0,
            "generation only"
        );
    }

    #[tokio::test]
    async fn a_spent_request_quota_refuses_generation_before_its_body_not_lookups() {
        let (admission, metrics) = admission(1, 4, 8);
        let caller = admission
            .identify(&request("Generate", Some(KEY)).headers().clone(), None)
            .expect("caller");
        // The one request a minute is spent.
        let spent = admission.charge(&caller, 0).await.expect("first");
        drop(spent);
        let (mut svc, calls) = stack(&admission, &metrics, false);
        let response = call(&mut svc, request("Generate", Some(KEY))).await;
        assert_eq!(code(&response), Some("8"), "RESOURCE_EXHAUSTED");
        let pushback: u64 = response
            .headers()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("pushback");
        assert!((1..=60_000).contains(&pushback), "{pushback}");
        assert_eq!(calls.load(Ordering::Relaxed), 0, "refused before the body");
        assert_eq!(
            series(
                &metrics,
                "switchyard_admission_requests_total{outcome=\"rejected\",tenant=\"acme\",tier=\"free\"}"
            ),
            1.0
        );
        // Lookups have no request quota.
        let response = call(&mut svc, request("Tokenize", Some(KEY))).await;
        assert_eq!(code(&response), None, "passed to the service");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_call_whose_client_goes_away_is_counted_cancelled_once() {
        let (admission, metrics) = admission(60, 4, 8);
        let (mut svc, _) = stack(&admission, &metrics, true);
        let response = call(&mut svc, request("GenerateStream", Some(KEY))).await;
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.is_data());
        assert_eq!(
            series(&metrics, "switchyard_requests_total{status=\"cancelled\"}"),
            0.0,
            "still running"
        );
        drop(body);
        // And a call dropped before its response (a unary call's client went away).
        let pending = svc.call(request("Generate", Some(KEY)));
        drop(pending);
        assert_eq!(
            series(&metrics, "switchyard_requests_total{status=\"cancelled\"}"),
            2.0
        );
        assert_eq!(
            series(
                &metrics,
                "switchyard_admission_requests_total{outcome=\"cancelled\",tenant=\"acme\",tier=\"free\"}"
            ),
            2.0
        );
    }

    fn identified(admission: &Admission) -> Call {
        identified_as(admission, KEY)
    }

    /// A call identified by the API key `key`.
    fn identified_as(admission: &Admission, key: &str) -> Call {
        let call = Call::default();
        let caller = admission
            .identify(&request("Generate", Some(key)).headers().clone(), None)
            .expect("caller");
        call.identified(caller);
        call
    }

    fn tokens_left(admission: &Admission, call: &Call) -> u64 {
        admission
            .remaining(call.caller().expect("caller"))
            .remaining
            .tokens
            .expect("a token quota")
    }

    /// `left` tokens, allowing the one that may refill (100 a minute) while the test runs.
    fn about(actual: u64, left: u64) -> bool {
        (left..=left + 1).contains(&actual)
    }

    #[tokio::test]
    async fn every_path_out_of_admission_refunds_what_was_not_used() {
        // One request in the engine, one in the queue.
        let (admission, _metrics) = admission(60, 1, 1);
        let call = identified(&admission);
        let cost = Cost {
            prompt: 10,
            max_tokens: 20,
        };
        let deadline = None;
        let running = admission
            .admit(&call, cost, 0, deadline)
            .await
            .expect("runs at once");
        let queued = admission
            .admit(&call, cost, 0, deadline)
            .await
            .expect("queued");
        let left = tokens_left(&admission, &call);
        assert!(about(left, 40), "{left}");
        // The queue is full: refused, and the refused charge is refunded at once.
        let full = admission
            .admit(&call, cost, 0, deadline)
            .await
            .expect_err("full");
        assert_eq!(full.code(), tonic::Code::Unavailable);
        assert!(about(tokens_left(&admission, &call), 40));
        // A queued request whose client went away: all of it.
        drop(queued);
        assert!(about(tokens_left(&admission, &call), 70));
        // A running one: what it did not generate; its prompt was used.
        let slot = running.start().await.expect("slot");
        slot.generated(5);
        drop(slot);
        assert!(about(tokens_left(&admission, &call), 70 + 15));
        // A deadline too close to start: refused and refunded.
        let late = admission
            .admit(&call, cost, 0, Some(Instant::now()))
            .await
            .expect_err("too late");
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded);
        assert!(about(tokens_left(&admission, &call), 85));
    }

    #[tokio::test]
    async fn cached_prompt_tokens_cost_a_quarter_of_computed_ones() {
        let (admission, metrics) = admission(60, 1, 1);
        let call = identified(&admission);
        let cost = Cost {
            prompt: 40,
            max_tokens: 20,
        };
        let slot = admission
            .admit(&call, cost, 0, None)
            .await
            .expect("runs at once")
            .start()
            .await
            .expect("slot");
        assert!(about(tokens_left(&admission, &call), 40));
        // 39 of the 40 prompt tokens from the prefix cache: they cost ⌈39 / 4⌉ = 10.
        slot.cached_prompt(39);
        slot.generated(5);
        drop(slot);
        assert!(about(tokens_left(&admission, &call), 100 - (1 + 10 + 5)));
        let tokens = |kind: &str| {
            series(
                &metrics,
                &format!("switchyard_tenant_tokens_total{{kind=\"{kind}\",tenant=\"acme\"}}"),
            )
        };
        assert_eq!((tokens("prompt"), tokens("cached_prompt")), (1.0, 39.0));
    }

    #[tokio::test]
    async fn a_shed_request_is_refunded_and_its_outcome_noted() {
        let (admission, _metrics) = admission(60, 1, 1);
        let low_call = identified(&admission);
        let cost = Cost {
            prompt: 5,
            max_tokens: 5,
        };
        let running = admission
            .admit(&low_call, cost, 0, None)
            .await
            .expect("runs");
        let low = admission
            .admit(&low_call, cost, 1, None)
            .await
            .expect("queued, low");
        let high_call = identified(&admission);
        let _high = admission
            .admit(&high_call, cost, 0, None)
            .await
            .expect("queued, evicting the low one");
        let shed = low.start().await.expect_err("shed");
        assert_eq!(shed.code(), tonic::Code::Unavailable);
        assert!(
            shed.message().contains("shed for normal priority work"),
            "{}",
            shed.message()
        );
        assert_eq!(low_call.noted(), Some(Outcome::Shed));
        // running (10) and the high one (10) are charged; the shed one is refunded.
        assert!(about(tokens_left(&admission, &low_call), 80));
        drop(running);
    }

    #[tokio::test]
    async fn a_request_that_cannot_finish_by_its_deadline_is_not_started() {
        let (admission, _metrics) = admission(60, 1, 4);
        let call = identified(&admission);
        // The recent rate: 10 ms a token, so 20 tokens take 200 ms (225 ms with margins).
        admission
            .us_per_token
            .store(10_000, std::sync::atomic::Ordering::Relaxed);
        let cost = Cost {
            prompt: 1,
            max_tokens: 20,
        };
        let now = Instant::now();
        let refused = admission
            .admit(&call, cost, 0, Some(now + Duration::from_millis(100)))
            .await
            .expect_err("cannot finish");
        assert_eq!(refused.code(), tonic::Code::DeadlineExceeded);
        assert!(
            refused
                .message()
                .contains("cannot finish before its deadline"),
            "{}",
            refused.message()
        );
        assert_eq!(call.noted(), Some(Outcome::Expired));
        // Time enough: it runs; a second one queues behind it with 250 ms to go...
        let running = admission
            .admit(&call, cost, 0, Some(now + Duration::from_secs(5)))
            .await
            .expect("runs");
        let slot = running.start().await.expect("slot");
        let late_call = identified(&admission);
        let queued = admission
            .admit(&late_call, cost, 0, Some(now + Duration::from_millis(250)))
            .await
            .expect("queued");
        // ... and when the slot frees 100 ms later it could no longer finish: expired,
        // never started.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(slot);
        let expired = queued.start().await.expect_err("expired at its turn");
        assert_eq!(expired.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(late_call.noted(), Some(Outcome::Expired));
    }

    #[tokio::test]
    async fn a_call_dropped_at_its_deadline_is_counted_expired_not_cancelled() {
        let (admission, metrics) = admission(60, 4, 8);
        let (mut svc, _) = stack(&admission, &metrics, true);
        let mut r = request("GenerateStream", Some(KEY));
        r.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("20m"));
        let response = call(&mut svc, r).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(response);
        assert_counted_expired_once(&metrics);
    }

    /// Tenants `legit` and `flood` in one unlimited tier, `max_inflight` slots.
    fn two_tenants(max_inflight: usize) -> (Arc<Admission>, Call, Call) {
        let tier = TierConfig {
            name: "open".into(),
            priority: "normal".into(),
            weight: 1,
            requests_per_minute: None,
            tokens_per_minute: None,
            cached_prompt_token_percent: None,
        };
        let (admission, _metrics) = admission_with(
            "legit:legit-key-0123456789\nflood:flood-key-0123456789\n",
            tier,
            max_inflight,
            256,
        );
        let legit = identified_as(&admission, "legit-key-0123456789");
        let flood = identified_as(&admission, "flood-key-0123456789");
        (admission, legit, flood)
    }

    #[tokio::test]
    async fn a_flood_never_holds_more_than_its_share_while_a_steady_tenant_is_active() {
        use futures::FutureExt as _;
        let (admission, legit, flood) = two_tenants(8);
        let cost = Cost {
            prompt: 4,
            max_tokens: 4,
        };
        // The steady tenant has a request running when the flood starts.
        let steady = admission
            .admit(&legit, cost, 0, None)
            .await
            .expect("admitted")
            .start()
            .await
            .expect("runs");
        let mut running = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..60 {
            let r = admission
                .admit(&flood, cost, 0, None)
                .await
                .expect("admitted");
            let mut turn = Box::pin(r.start());
            match (&mut turn).now_or_never() {
                Some(slot) => running.push(slot.expect("slot")),
                None => waiting.push(turn),
            }
        }
        assert_eq!(waiting.len(), 56, "queued, not refused");
        // Equal weights, two active tenants: half of the 8 slots.
        assert_eq!(running.len(), 4);
        let held = |a: &Admission| a.lock().shares.held(Band::Normal, "flood");
        assert_eq!(held(&admission), 4);
        // The steady tenant's next requests start at once, up to its own share.
        let mut legit_slots = vec![steady];
        for _ in 0..3 {
            let r = admission
                .admit(&legit, cost, 0, None)
                .await
                .expect("admitted");
            legit_slots.push(r.start().now_or_never().expect("at once").expect("slot"));
        }
        // As flood requests end, the next flood ones take their place, never more.
        for _ in 0..4 {
            drop(running.pop());
            assert_eq!(held(&admission), 4);
            let next = waiting
                .remove(0)
                .await
                .expect("the next flood request starts");
            running.push(next);
        }
        // Once the steady tenant's requests end and it goes quiet, the flood may use every
        // slot (checked by the share's own tests: the quiet window is 5 s).
        drop(legit_slots);
        assert_eq!(held(&admission), 4);
    }

    #[tokio::test]
    async fn a_reply_not_ready_at_the_deadline_is_deadline_exceeded_not_cancelled() {
        let (admission, metrics) = admission(60, 4, 8);
        let never = tower::service_fn(|_: http::Request<Body>| {
            std::future::pending::<Result<http::Response<Body>, Infallible>>()
        });
        let mut svc = layers(&admission, metrics.clone()).service(never);
        let mut r = request("Generate", Some(KEY));
        r.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("30m"));
        let started = Instant::now();
        let response = call(&mut svc, r).await;
        assert!(started.elapsed() < Duration::from_millis(30));
        assert_eq!(code(&response), Some("4"), "DEADLINE_EXCEEDED");
        assert_counted_expired_once(&metrics);
    }
}
