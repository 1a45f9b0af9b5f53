//! How admission's refusals are encoded: the gRPC status code, a message that says what to
//! do next, and the metadata a client acts on (`grpc-retry-pushback-ms`, `retry-after`,
//! `x-ratelimit-*`, `www-authenticate`). Every refusal is built here, so the wire format
//! of admission is in one place.

use std::time::Duration;

use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::accounting::{Kept, QuotaView};
use super::fair_queue::Band;
use super::gcra::{Denied, DenyReason, Limit};
use super::outcome::{Outcome, Rejection};
use super::tiers::Tier;

/// No key, or an unknown one: `UNAUTHENTICATED` with `www-authenticate: Bearer`.
pub fn unauthenticated(message: &str) -> Rejection {
    let mut status = Status::unauthenticated(message.to_string());
    status
        .metadata_mut()
        .insert("www-authenticate", MetadataValue::from_static("Bearer"));
    Rejection {
        status,
        outcome: Outcome::Unauthenticated,
    }
}

/// Over a quota of `tier` (as `view` applies it): `RESOURCE_EXHAUSTED` naming the quota,
/// with the exact wait (or do-not-retry for a request larger than the bucket) and the
/// quota left.
pub fn over_quota(tier: &Tier, view: &QuotaView, tokens: u64, denied: &Denied) -> Rejection {
    let limits = &view.limits;
    // Split over several frontends: say so, or the numbers would not add up for the caller.
    let share = |whole: Option<Limit>, what: fn(&Limit) -> u64| match (view.kept, whole) {
        (Kept::Here { frontends }, Some(whole)) if frontends > 1 => format!(
            ": this frontend's share of {} over {frontends} frontends",
            what(&whole)
        ),
        _ => String::new(),
    };
    let (message, wait) = match denied.reason {
        DenyReason::TooLarge => (
            format!(
                "the request needs {tokens} tokens (prompt + max_tokens) but tier {:?} \
                 allows at most {} at once{}; lower max_tokens",
                tier.name,
                limits.tokens.map_or(0, |l| l.burst()),
                share(tier.limits.tokens, Limit::burst),
            ),
            None,
        ),
        DenyReason::Requests => (
            format!(
                "request quota of tier {:?} exhausted ({} per minute{}); retry in {} ms",
                tier.name,
                limits.requests.map_or(0, |l| l.rate_per_minute()),
                share(tier.limits.requests, Limit::rate_per_minute),
                denied.retry_after.as_millis().max(1)
            ),
            Some(denied.retry_after),
        ),
        DenyReason::Tokens => (
            format!(
                "token quota of tier {:?} exhausted ({} per minute{}); retry in {} ms",
                tier.name,
                limits.tokens.map_or(0, |l| l.rate_per_minute()),
                share(tier.limits.tokens, Limit::rate_per_minute),
                denied.retry_after.as_millis().max(1)
            ),
            Some(denied.retry_after),
        ),
    };
    let mut status = with_pushback(Status::resource_exhausted(message), wait);
    quota_metadata(status.metadata_mut(), view);
    Rejection {
        status,
        outcome: Outcome::Rejected,
    }
}

/// The queue is full of work of `band` or above: `UNAVAILABLE` with the drain time.
pub fn queue_full(queued: usize, band: Band, pushback: Duration) -> Rejection {
    Rejection {
        status: with_pushback(
            Status::unavailable(format!(
                "overloaded: {queued} requests are queued at {} priority or above and your \
                 tenant already holds the largest share of them; retry later",
                band.name()
            )),
            Some(pushback),
        ),
        outcome: Outcome::Shed,
    }
}

/// A queued request evicted for a newcomer of `band`: `UNAVAILABLE` with the drain time.
/// `same_band`: evicted because its tenant held the largest share of its own band.
pub fn shed_for(band: Band, same_band: bool, pushback: Duration) -> Rejection {
    let message = if same_band {
        format!(
            "overloaded: the request was shed because your tenant held the largest share of \
             the full queue at {} priority; retry later",
            band.name()
        )
    } else {
        format!(
            "overloaded: the request was shed for {} priority work; retry later",
            band.name()
        )
    };
    Rejection {
        status: with_pushback(Status::unavailable(message), Some(pushback)),
        outcome: Outcome::Shed,
    }
}

/// The client's deadline leaves too little time to generate `max_tokens` at the recent
/// rate (`needs`), with `left` until it: `DEADLINE_EXCEEDED`, counted expired.
pub fn cannot_finish(needs: Duration, left: Duration, max_tokens: u64) -> Rejection {
    let message = if needs.is_zero() {
        format!(
            "the deadline ({} ms away) is too close for the request to start",
            left.as_millis()
        )
    } else {
        format!(
            "the request cannot finish before its deadline: {max_tokens} tokens take about \
             {} ms at the current rate and {} ms are left; allow more time or lower max_tokens",
            needs.as_millis(),
            left.as_millis()
        )
    };
    Rejection {
        status: Status::deadline_exceeded(message),
        outcome: Outcome::Expired,
    }
}

/// A queued request whose deadline passed: `DEADLINE_EXCEEDED`, saying how long it waited.
pub fn expired_in_queue(waited: Duration, behind: usize) -> Rejection {
    Rejection {
        status: Status::deadline_exceeded(format!(
            "the request could not start before its deadline: it waited {} ms in the queue \
             behind {behind} others",
            waited.as_millis(),
        )),
        outcome: Outcome::Expired,
    }
}

/// `grpc-retry-pushback-ms` and `retry-after` for `wait`; without a wait, the negative
/// pushback that means "do not retry" (the gRPC retry design's convention).
pub fn with_pushback(mut status: Status, wait: Option<Duration>) -> Status {
    let md = status.metadata_mut();
    match wait {
        Some(w) => {
            let ms = w.as_millis().max(1);
            if let Ok(v) = MetadataValue::try_from(ms.to_string()) {
                md.insert("grpc-retry-pushback-ms", v);
            }
            if let Ok(v) = MetadataValue::try_from(w.as_secs_f64().ceil().max(1.0).to_string()) {
                md.insert("retry-after", v);
            }
        }
        None => {
            md.insert("grpc-retry-pushback-ms", MetadataValue::from_static("-1"));
        }
    }
    status
}

/// Adds the remaining-quota metadata (`x-ratelimit-*`, as the major LLM APIs send): the
/// limits applied (a frontend's split share in split mode) and what is left of them.
pub fn quota_metadata(md: &mut MetadataMap, view: &QuotaView) {
    let r = &view.remaining;
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = MetadataValue::try_from(v) {
            md.insert(name, v);
        }
    };
    if let (Some(l), Some(left)) = (view.limits.requests, r.requests) {
        put(
            "x-ratelimit-limit-requests",
            l.rate_per_minute().to_string(),
        );
        put("x-ratelimit-remaining-requests", left.to_string());
        put(
            "x-ratelimit-reset-requests-ms",
            r.reset_requests.as_millis().to_string(),
        );
    }
    if let (Some(l), Some(left)) = (view.limits.tokens, r.tokens) {
        put("x-ratelimit-limit-tokens", l.rate_per_minute().to_string());
        put("x-ratelimit-remaining-tokens", left.to_string());
        put(
            "x-ratelimit-reset-tokens-ms",
            r.reset_tokens.as_millis().to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_is_rounded_up_and_negative_means_do_not_retry() {
        let s = with_pushback(Status::unavailable("x"), Some(Duration::from_micros(1500)));
        let get = |s: &Status, k: &str| {
            s.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(get(&s, "grpc-retry-pushback-ms").as_deref(), Some("1"));
        assert_eq!(get(&s, "retry-after").as_deref(), Some("1"));
        let s = with_pushback(Status::resource_exhausted("x"), None);
        assert_eq!(get(&s, "grpc-retry-pushback-ms").as_deref(), Some("-1"));
        assert_eq!(get(&s, "retry-after"), None);
    }
}
