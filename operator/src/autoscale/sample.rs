//! One poll: every ready frontend's `GET /demand` (its metrics port), in parallel, merged
//! into one [`Sample`]. The report's shape is the worker's
//! `switchyard_worker::admission::demand::Demand` (this crate does not depend on the
//! worker; the real-node test proves the two agree).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{Sample, TenantDemand};
use crate::fleet::poll_json;
pub use crate::fleet::{Poll, Target};

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
    /// Its KV cache's blocks; absent from older workers.
    #[serde(default)]
    pub kv_cache: Option<KvUse>,
    /// Its time to first token over the report's window; absent with no request in it.
    #[serde(default)]
    pub ttft: Option<Ttft>,
}

/// A frontend's KV cache blocks.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvUse {
    pub used_blocks: u64,
    pub free_blocks: u64,
}

/// A frontend's recent TTFT.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ttft {
    pub p99_seconds: f64,
}

/// Refusals per second, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
pub struct Refused {
    #[serde(default)]
    pub quota: f64,
    #[serde(default)]
    pub shed: f64,
    #[serde(default)]
    pub expired: f64,
}

fn one() -> u32 {
    1
}

/// One tenant in a [`Report`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportTenant {
    pub tenant: String,
    /// Its tier's name (absent from the oldest workers: the budget of an unnamed tier).
    #[serde(default)]
    pub tier: String,
    pub queued: usize,
    pub running: usize,
    /// This frontend's share of the most the tenant's quota keeps in the system; absent:
    /// no request quota.
    #[serde(default)]
    pub cap: Option<f64>,
    /// Over the report's window: tokens generated and requests refused, per second.
    #[serde(default)]
    pub tokens_per_second: f64,
    #[serde(default)]
    pub refused_per_second: Refused,
}

/// Polls every frontend's `/demand` at once; each has `timeout`.
pub async fn poll(targets: &[Target], timeout: Duration) -> Poll<Report> {
    poll_json(targets, "/demand", timeout).await
}

/// Polls every shard's `/load` at once; each has `timeout`.
pub async fn poll_shards(targets: &[Target], timeout: Duration) -> Poll<ShardLoad> {
    poll_json(targets, "/load", timeout).await
}

/// What one expert shard reports (`GET /load`; the worker's
/// `switchyard_worker::experts::shard::Load`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardLoad {
    /// Its StatefulSet index: it holds the experts of shard `index mod shards`.
    pub shard_index: u32,
    /// Fraction of its last ~10 s spent computing (0..1).
    pub utilisation: f64,
}

/// The shard pods the reported load needs, as a count: for each of the `shards` blocks,
/// the holders its utilisation needs at `target` each (the shard and its copies share
/// its work), and the pods it takes to give every block that many when copies go
/// round-robin (pod k holds block k mod `shards`). At least `shards`.
pub fn pods_needed(loads: &[ShardLoad], shards: u32, target: f64) -> u32 {
    let shards = shards.max(1);
    let mut busy = vec![0.0f64; shards as usize];
    for l in loads {
        busy[(l.shard_index % shards) as usize] += l.utilisation.clamp(0.0, 1.0);
    }
    busy.iter()
        .enumerate()
        .map(|(block, &u)| {
            let holders = ((u / target.max(0.01)).ceil() as u32).max(1);
            (holders - 1) * shards + block as u32 + 1
        })
        .max()
        .unwrap_or(shards)
        .max(shards)
}

/// What the frontends report beside the scaling signal, summed or at its worst, for
/// `status.autoscaling`: none of it drives a decision.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Seen {
    /// All demand in the system, quota or not (what an aggregate autoscaler scales on).
    pub total: f64,
    /// Refused (quota, shed, expired) and generated tokens, per second, all frontends.
    pub refused_per_second: f64,
    pub tokens_per_second: f64,
    /// The fullest KV cache, in percent of its blocks.
    pub kv_used_percent: Option<u32>,
    /// The slowest frontend's p99 TTFT.
    pub ttft_p99_seconds: Option<f64>,
}

/// The reports of one poll as a [`Sample`] (with `ready` frontends at the time), and what
/// else they say ([`Seen`]).
///
/// A tenant's demand is summed over the frontends; its cap is the largest of
/// `share × frontends` any of them reports (each frontend reports its share of the cap:
/// in split mode the shares add up to the whole, in Redis mode any one of them times the
/// count is the whole).
pub fn merge(at_ms: u64, ready: u32, reports: &[Report]) -> (Sample, Seen) {
    let mut tenants: BTreeMap<&str, TenantDemand> = BTreeMap::new();
    let mut seen = Seen::default();
    for report in reports {
        seen.total += (report.running + report.queued) as f64;
        if let Some(kv) = report.kv_cache {
            let blocks = kv.used_blocks + kv.free_blocks;
            let percent = (kv.used_blocks * 100).checked_div(blocks).unwrap_or(0);
            let percent = u32::try_from(percent).unwrap_or(100);
            seen.kv_used_percent = Some(seen.kv_used_percent.unwrap_or(0).max(percent));
        }
        if let Some(ttft) = report.ttft {
            seen.ttft_p99_seconds =
                Some(seen.ttft_p99_seconds.unwrap_or(0.0).max(ttft.p99_seconds));
        }
        for t in &report.tenants {
            let r = t.refused_per_second;
            seen.refused_per_second += r.quota + r.shed + r.expired;
            seen.tokens_per_second += t.tokens_per_second;
            let cap = t
                .cap
                .map(|share| share * f64::from(report.frontends.max(1)));
            // Anonymous callers share one budget, whichever tier serves them.
            let tier = if t.tenant == super::decide::ANONYMOUS {
                super::decide::ANONYMOUS
            } else {
                t.tier.as_str()
            };
            let entry = tenants.entry(&t.tenant).or_insert(TenantDemand {
                tier: tier.to_string(),
                demand: 0.0,
                cap,
            });
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
    (sample, seen)
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
                    tier: "t".into(),
                    queued,
                    running,
                    cap,
                    tokens_per_second: 0.0,
                    refused_per_second: Refused::default(),
                })
                .collect(),
            kv_cache: None,
            ttft: None,
        }
    }

    #[test]
    fn a_tenant_is_summed_over_frontends_and_capped_by_its_whole_quota() {
        // Split over 2 frontends: each reports half the cap (2 of 4).
        let (sample, seen) = merge(
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
        assert_eq!(seen.total, 64.0);
        assert_eq!(
            sample.tenants,
            vec![
                TenantDemand {
                    tier: "t".into(),
                    demand: 63.0,
                    cap: Some(4.0)
                },
                TenantDemand {
                    tier: "t".into(),
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
        // Anonymous callers are their own budget group, whatever their tier.
        assert_eq!(sample.tenants[0].tier, "anonymous");
    }

    #[test]
    fn refusals_and_tokens_add_up_and_kv_and_ttft_take_the_worst_frontend() {
        // The worker's report shape, as `switchyard_worker::admission::demand` writes it.
        let a: Report = serde_json::from_str(
            r#"{"meanServiceSeconds":0.2,"running":1,"queued":0,"frontends":2,
                "windowSeconds":10,
                "tenants":[{"tenant":"mallory","tier":"free","queued":0,"running":1,
                  "cap":0.01,"admittedPerSecond":0.1,"tokensPerSecond":6.4,
                  "refusedPerSecond":{"quota":4.9,"shed":0.0,"expired":0.1}}],
                "kvCache":{"usedBlocks":30,"freeBlocks":70},
                "ttft":{"samples":12,"p50Seconds":0.003,"p99Seconds":0.008}}"#,
        )
        .unwrap();
        let b: Report = serde_json::from_str(
            r#"{"running":0,"queued":0,"frontends":2,
                "tenants":[{"tenant":"acme","tier":"standard","queued":0,"running":0,
                  "admittedPerSecond":2.0,"tokensPerSecond":16.0,
                  "refusedPerSecond":{"quota":0.0,"shed":1.0,"expired":0.0}}],
                "kvCache":{"usedBlocks":1,"freeBlocks":99}}"#,
        )
        .unwrap();
        let (_, seen) = merge(0, 2, &[a, b]);
        assert_eq!(seen.kv_used_percent, Some(30));
        assert_eq!(seen.ttft_p99_seconds, Some(0.008));
        assert!((seen.refused_per_second - 6.0).abs() < 1e-9, "{seen:?}");
        assert!((seen.tokens_per_second - 22.4).abs() < 1e-9, "{seen:?}");
    }

    #[test]
    fn shard_pods_follow_the_busiest_blocks_copies() {
        let load = |shard_index, utilisation| ShardLoad {
            shard_index,
            utilisation,
        };
        // Two blocks, both idle: the two shards.
        assert_eq!(pods_needed(&[load(0, 0.1), load(1, 0.2)], 2, 0.7), 2);
        // Block 1 saturated: it needs 2 holders at 70 %: pods 0, 1, 2, 3 (3 copies 1).
        assert_eq!(pods_needed(&[load(0, 0.1), load(1, 1.0)], 2, 0.7), 4);
        // Block 0 saturated: pod 2 is its copy.
        assert_eq!(pods_needed(&[load(0, 1.0), load(1, 0.1)], 2, 0.7), 3);
        // With its copy (pod 2) sharing the work, block 0 at 0.5 + 0.5 keeps it.
        assert_eq!(
            pods_needed(&[load(0, 0.5), load(1, 0.1), load(2, 0.5)], 2, 0.7),
            3
        );
        // Both copies idle again: back to the shards.
        assert_eq!(
            pods_needed(&[load(0, 0.0), load(1, 0.0), load(2, 0.0)], 2, 0.7),
            2
        );
        // The worker's report shape parses.
        let parsed: ShardLoad = serde_json::from_str(
            r#"{"shardIndex":2,"utilisation":0.25,"inFlightRequests":1,"queueDepth":0,
                "rowsProcessedTotal":9,"expertRowsProcessedTotal":18}"#,
        )
        .unwrap();
        assert_eq!(parsed, load(2, 0.25));
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
