//! One poll: every ready frontend's `GET /demand` (its metrics port), in parallel, merged
//! into one [`Sample`]. The report's shape is the worker's
//! `switchyard_worker::admission::demand::Demand` (this crate does not depend on the
//! worker; the real-node test proves the two agree).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{Sample, TenantDemand};

/// What one frontend reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Requests in its engine and in its queue, all tenants, quota or not.
    pub running: usize,
    pub queued: usize,
    /// The frontends it shares quotas with (itself included); caps are its share.
    #[serde(default = "one")]
    pub frontends: u32,
    #[serde(default)]
    pub tenants: Vec<ReportTenant>,
}

fn one() -> u32 {
    1
}

/// One tenant in a [`Report`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportTenant {
    pub tenant: String,
    pub queued: usize,
    pub running: usize,
    /// This frontend's share of the most the tenant's quota keeps in the system; absent:
    /// no request quota.
    #[serde(default)]
    pub cap: Option<f64>,
}

/// A ready frontend to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pod: String,
    /// `ip:port` of its metrics port.
    pub authority: String,
}

/// The answers of one poll.
#[derive(Debug, Default)]
pub struct Poll {
    pub reports: Vec<Report>,
    /// `pod: why` for each frontend that did not answer usefully.
    pub failures: Vec<String>,
}

/// Polls every target at once; each has `timeout`.
pub async fn poll(targets: &[Target], timeout: Duration) -> Poll {
    let answers = futures::future::join_all(targets.iter().map(|t| async move {
        let result = match crate::http::get(&t.authority, "/demand", timeout).await {
            Ok((200, body)) => serde_json::from_slice::<Report>(&body)
                .map_err(|e| format!("unreadable /demand: {e}")),
            Ok((status, _)) => Err(format!("/demand answered HTTP {status}")),
            Err(e) => Err(format!("/demand at {}: {e}", t.authority)),
        };
        result.map_err(|why| format!("{}: {why}", t.pod))
    }))
    .await;
    let mut poll = Poll::default();
    for answer in answers {
        match answer {
            Ok(report) => poll.reports.push(report),
            Err(why) => poll.failures.push(why),
        }
    }
    poll
}

/// The reports of one poll as a [`Sample`] (with `ready` frontends at the time), and all
/// the demand they hold, quota or not (what an aggregate autoscaler would scale on).
///
/// A tenant's demand is summed over the frontends; its cap is the largest of
/// `share × frontends` any of them reports (each frontend reports its share of the cap:
/// in split mode the shares add up to the whole, in Redis mode any one of them times the
/// count is the whole).
pub fn merge(at_ms: u64, ready: u32, reports: &[Report]) -> (Sample, f64) {
    let mut tenants: BTreeMap<&str, TenantDemand> = BTreeMap::new();
    let mut total = 0.0;
    for report in reports {
        total += (report.running + report.queued) as f64;
        for t in &report.tenants {
            let cap = t
                .cap
                .map(|share| share * f64::from(report.frontends.max(1)));
            let entry = tenants
                .entry(&t.tenant)
                .or_insert(TenantDemand { demand: 0.0, cap });
            entry.demand += (t.queued + t.running) as f64;
            entry.cap = match (entry.cap, cap) {
                (Some(a), Some(b)) => Some(a.max(b)),
                // One frontend says unlimited (a tier changed mid-rollout): the larger.
                _ => None,
            };
        }
    }
    let sample = Sample {
        at_ms,
        ready,
        reporting: u32::try_from(reports.len()).unwrap_or(u32::MAX),
        tenants: tenants.into_values().collect(),
    };
    (sample, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(frontends: u32, tenants: &[(&str, usize, usize, Option<f64>)]) -> Report {
        Report {
            running: tenants.iter().map(|t| t.2).sum(),
            queued: tenants.iter().map(|t| t.1).sum(),
            frontends,
            tenants: tenants
                .iter()
                .map(|&(tenant, queued, running, cap)| ReportTenant {
                    tenant: tenant.into(),
                    queued,
                    running,
                    cap,
                })
                .collect(),
        }
    }

    #[test]
    fn a_tenant_is_summed_over_frontends_and_capped_by_its_whole_quota() {
        // Split over 2 frontends: each reports half the cap (2 of 4).
        let (sample, total) = merge(
            7,
            2,
            &[
                report(
                    2,
                    &[("flood", 30, 4, Some(2.0)), ("legit", 0, 1, Some(2.0))],
                ),
                report(2, &[("flood", 25, 4, Some(2.0))]),
            ],
        );
        assert_eq!(sample.reporting, 2);
        assert_eq!(total, 64.0);
        assert_eq!(
            sample.tenants,
            vec![
                TenantDemand {
                    demand: 63.0,
                    cap: Some(4.0)
                },
                TenantDemand {
                    demand: 1.0,
                    cap: Some(4.0)
                },
            ]
        );
        // The flood counts for its quota (4), the legitimate tenant in full (1).
        assert_eq!(sample.legitimate(), 5.0);
    }

    #[test]
    fn a_report_without_a_cap_counts_in_full_and_an_old_report_shape_parses() {
        let old: Report = serde_json::from_str(
            r#"{"meanServiceSeconds":0.5,"running":1,"queued":2,
                "tenants":[{"tenant":"anonymous","tier":"default","queued":2,"running":1}]}"#,
        )
        .unwrap();
        assert_eq!(old.frontends, 1);
        let (sample, _) = merge(0, 1, &[old]);
        assert_eq!(sample.legitimate(), 3.0);
    }

    #[tokio::test]
    async fn a_frontend_that_does_not_answer_is_a_named_failure_not_a_hang() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = listener.local_addr().unwrap().to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let targets = [
            Target {
                pod: "silent".into(),
                authority: silent,
            },
            Target {
                pod: "gone".into(),
                authority: closed,
            },
        ];
        let started = std::time::Instant::now();
        let poll = poll(&targets, Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(poll.reports.is_empty());
        assert_eq!(poll.failures.len(), 2);
        assert!(
            poll.failures[0].starts_with("silent: "),
            "{:?}",
            poll.failures
        );
        assert!(
            poll.failures[1].starts_with("gone: "),
            "{:?}",
            poll.failures
        );
        drop(listener);
    }
}
