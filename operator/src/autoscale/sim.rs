//! A deterministic simulation of a deployment under a scenario's offered load, to compare
//! scaling policies on the *same* trace: ours ([`super::decide`] on legitimate demand,
//! polled every 500 ms) and the naive one every other autoscaler in the field runs (KEDA
//! or an HPA on the aggregate queue depth). `switchyard-operator simulate` writes its time
//! series (CSV) and a plot (SVG); docs/benchmarks.md has the four scenarios side by side.
//!
//! ```text
//!   every 100 ms:  arrivals per tenant (deterministic, at the scenario's offered rate)
//!                  admission: Legitimate — per-tenant GCRA quota (over: refused, never
//!                             queued); Aggregate — none (vLLM + KEDA: all of it queues)
//!                  FIFO queue → slots (replicas × slots each), fixed service time
//!                  replicas asked for become ready after the start-up delay
//!   Legitimate policy: decide() every 500 ms on Σ min(in-system, quota cap) per tenant
//!   Aggregate policy:  every 15 s, ceil(in-system / target); scale-down to the most
//!                      wanted over the last 300 s (the HPA's stabilization)
//! ```
//!
//! A model, not a measurement: it has no prefill, batching or network, and a fixed
//! service time. It isolates what the policies do with the same demand; the real-node
//! test (tests/tests/real_node.rs, step 7e/7f) measures the real system.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Policy, Sample, TenantDemand, decide};

/// Simulation step.
const TICK_MS: u64 = 100;

/// A tenant of a scenario.
#[derive(Debug, Clone)]
pub struct SimTenant {
    pub name: &'static str,
    /// Whether its traffic is legitimate (for the TTFT and the "bought by the flood"
    /// figures; the policies do not see it).
    pub legit: bool,
    /// Quota in requests per second, with a burst of `burst` requests; `None`: none.
    pub quota: Option<(f64, f64)>,
    /// Offered requests per second at a time (seconds from the start).
    pub offered: fn(f64) -> f64,
}

/// A scenario: tenants, length, and the system they run on.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub tenants: Vec<SimTenant>,
    pub seconds: u64,
    /// Requests one replica runs at once, and how long each takes.
    pub slots: u32,
    pub service: Duration,
    /// From the decision to a new replica taking requests.
    pub startup: Duration,
    /// When the attack runs, if any (for "replicas bought by the flood").
    pub attack: Option<(f64, f64)>,
    /// When the legitimate spike starts, if any (for the decision latency).
    pub spike_at: Option<f64>,
}

/// Which autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Ours: legitimate demand, per-tenant quotas in front.
    Legitimate,
    /// KEDA / HPA on the aggregate queue depth, no per-tenant admission.
    Aggregate,
}

impl PolicyKind {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "legitimate" => Ok(Self::Legitimate),
            "aggregate" => Ok(Self::Aggregate),
            other => Err(format!("{other:?}: expected legitimate or aggregate")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Legitimate => "legitimate",
            Self::Aggregate => "aggregate",
        }
    }
}

pub use switchyard_edge::series::Row;

/// The figures docs/benchmarks.md compares.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub scenario: &'static str,
    pub policy: PolicyKind,
    /// Most replicas asked for during the attack, minus the replicas before it.
    pub bought_by_attack: Option<i64>,
    /// From the spike's start to the first scale-up decision, in seconds.
    pub spike_decision_s: Option<f64>,
    /// p99 TTFT of every legitimate request, in seconds.
    pub legit_p99_ttft_s: f64,
    /// Legitimate requests refused or never started by the end.
    pub legit_failed: u64,
    pub replica_minutes: f64,
    /// Changes of scaling direction.
    pub reversals: u32,
    pub max_replicas: u32,
}

struct Request {
    tenant: usize,
    arrived_ms: u64,
}

struct Running {
    tenant: usize,
    ends_ms: u64,
    arrived_ms: u64,
}

/// Runs `scenario` under `kind` with the decision rules `policy` (bounds, target and the
/// windows; the aggregate policy uses the target and bounds only). Returns one row per
/// second and the summary.
pub fn simulate(scenario: &Scenario, kind: PolicyKind, policy: &Policy) -> (Vec<Row>, Summary) {
    let n = scenario.tenants.len();
    let service_ms = scenario.service.as_millis() as u64;
    let mut carry = vec![0.0f64; n];
    // GCRA as a token bucket per tenant: tokens, last refill.
    let mut buckets: Vec<f64> = scenario
        .tenants
        .iter()
        .map(|t| t.quota.map_or(0.0, |(_, burst)| burst))
        .collect();
    let mut queue: VecDeque<Request> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut mean_in_system_ms = service_ms as f64;
    let mut desired = policy.min.max(1);
    let mut ready = desired;
    let mut starting: Vec<(u64, u32)> = Vec::new();
    let mut history: Vec<Sample> = Vec::new();
    let mut aggregate_wanted: VecDeque<(u64, u32)> = VecDeque::new();
    let mut rows = Vec::new();
    let mut legit_ttfts: Vec<f64> = Vec::new();
    let mut second_ttfts: Vec<f64> = Vec::new();
    let mut accepted_this_second = 0.0;
    let mut legit_failed = 0u64;
    let mut replica_ms = 0u64;
    let mut last_direction = 0i32;
    let mut reversals = 0;
    let mut max_replicas = desired;
    let mut spike_decision_s = None;
    let mut before_attack = None;
    let mut most_in_attack = 0u32;

    let end_ms = scenario.seconds * 1000;
    let mut now = 0;
    while now < end_ms {
        let t = now as f64 / 1000.0;
        // Replicas that finished starting.
        starting.retain(|&(at, count)| {
            if at <= now {
                ready = ready.max(count.min(desired));
                false
            } else {
                true
            }
        });
        // Arrivals and admission.
        for (i, tenant) in scenario.tenants.iter().enumerate() {
            if let Some((rate, burst)) = tenant.quota {
                buckets[i] = (buckets[i] + rate * TICK_MS as f64 / 1000.0).min(burst);
            }
            carry[i] += (tenant.offered)(t) * TICK_MS as f64 / 1000.0;
            while carry[i] >= 1.0 {
                carry[i] -= 1.0;
                let admitted = match (kind, tenant.quota) {
                    (PolicyKind::Legitimate, Some(_)) if buckets[i] >= 1.0 => {
                        buckets[i] -= 1.0;
                        true
                    }
                    (PolicyKind::Legitimate, Some(_)) => false,
                    _ => true,
                };
                if admitted {
                    accepted_this_second += 1.0;
                    queue.push_back(Request {
                        tenant: i,
                        arrived_ms: now,
                    });
                } else if tenant.legit {
                    legit_failed += 1;
                }
            }
        }
        // Service.
        running.retain(|r| {
            if r.ends_ms <= now {
                let in_system = (r.ends_ms - r.arrived_ms) as f64;
                mean_in_system_ms = 0.9 * mean_in_system_ms + 0.1 * in_system;
                false
            } else {
                true
            }
        });
        let capacity = (ready * scenario.slots) as usize;
        while running.len() < capacity {
            let Some(request) = queue.pop_front() else {
                break;
            };
            if scenario.tenants[request.tenant].legit {
                let ttft = (now - request.arrived_ms) as f64 / 1000.0;
                legit_ttfts.push(ttft);
                second_ttfts.push(ttft);
            }
            running.push(Running {
                tenant: request.tenant,
                ends_ms: now + service_ms,
                arrived_ms: request.arrived_ms,
            });
        }
        replica_ms += u64::from(ready) * TICK_MS;

        // The policy.
        let before = desired;
        match kind {
            PolicyKind::Legitimate if now % 500 == 0 => {
                let mut tenants: Vec<TenantDemand> = scenario
                    .tenants
                    .iter()
                    .map(|t| TenantDemand {
                        tier: String::new(),
                        demand: 0.0,
                        cap: t.quota.map(|(rate, _)| rate * mean_in_system_ms / 1000.0),
                    })
                    .collect();
                for r in &queue {
                    tenants[r.tenant].demand += 1.0;
                }
                for r in &running {
                    tenants[r.tenant].demand += 1.0;
                }
                history.push(Sample {
                    at_ms: now,
                    ready,
                    reporting: ready,
                    tenants,
                });
                desired = decide(&history, policy, desired, now).desired;
            }
            PolicyKind::Aggregate if now % 15_000 == 0 => {
                let depth = (queue.len() + running.len()) as f64;
                let wanted = ((depth / policy.target_per_replica).ceil() as u32)
                    .clamp(policy.min, policy.max);
                aggregate_wanted.push_back((now, wanted));
                while aggregate_wanted
                    .front()
                    .is_some_and(|&(at, _)| at + 300_000 < now)
                {
                    aggregate_wanted.pop_front();
                }
                let held = aggregate_wanted
                    .iter()
                    .map(|&(_, w)| w)
                    .max()
                    .unwrap_or(wanted);
                desired = if wanted >= desired {
                    wanted
                } else {
                    held.min(desired)
                };
            }
            _ => {}
        }
        if desired != before {
            let direction = if desired > before { 1 } else { -1 };
            if last_direction != 0 && direction != last_direction {
                reversals += 1;
            }
            last_direction = direction;
            if desired > before {
                starting.push((now + scenario.startup.as_millis() as u64, desired));
                if spike_decision_s.is_none()
                    && let Some(at) = scenario.spike_at
                    && t >= at
                {
                    spike_decision_s = Some(t - at);
                }
            } else {
                ready = ready.min(desired);
                starting.retain(|&(_, count)| count <= desired);
            }
        }
        max_replicas = max_replicas.max(desired);
        if let Some((from, to)) = scenario.attack {
            if t < from {
                before_attack = Some(desired);
            } else if t < to {
                most_in_attack = most_in_attack.max(desired);
            }
        }

        now += TICK_MS;
        if now % 1000 == 0 {
            rows.push(Row {
                second: now / 1000,
                offered: scenario
                    .tenants
                    .iter()
                    .map(|tenant| (tenant.offered)(t))
                    .collect(),
                accepted: std::mem::take(&mut accepted_this_second),
                desired,
                ready,
                legit_p99_ttft: p99(&mut second_ttfts),
            });
            second_ttfts.clear();
        }
    }
    legit_failed += queue
        .iter()
        .filter(|r| scenario.tenants[r.tenant].legit)
        .count() as u64;
    let summary = Summary {
        scenario: scenario.name,
        policy: kind,
        bought_by_attack: scenario
            .attack
            .map(|_| i64::from(most_in_attack) - i64::from(before_attack.unwrap_or(0))),
        spike_decision_s,
        legit_p99_ttft_s: p99(&mut legit_ttfts),
        legit_failed,
        replica_minutes: replica_ms as f64 / 60_000.0,
        reversals,
        max_replicas,
    };
    (rows, summary)
}

/// Nearest-rank p99 (0 for none).
fn p99(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (values.len() * 99).div_ceil(100).max(1);
    values[rank - 1]
}

/// One replica: 4 requests at once, 2 s each (2 requests/s); new replicas take 10 s.
/// Two legitimate tenants at 1 request/s together (half a replica), quotas 6 and 2/s; the
/// attacker's quota is 0.2/s (12 a minute).
fn base(name: &'static str, seconds: u64) -> Scenario {
    Scenario {
        name,
        tenants: Vec::new(),
        seconds,
        slots: 4,
        service: Duration::from_secs(2),
        startup: Duration::from_secs(10),
        attack: None,
        spike_at: None,
    }
}

fn acme(offered: fn(f64) -> f64) -> SimTenant {
    SimTenant {
        name: "acme",
        legit: true,
        quota: Some((6.0, 12.0)),
        offered,
    }
}

fn beta() -> SimTenant {
    SimTenant {
        name: "beta",
        legit: true,
        quota: Some((2.0, 4.0)),
        offered: |_| 0.4,
    }
}

fn attacker() -> SimTenant {
    SimTenant {
        name: "attacker",
        legit: false,
        quota: Some((0.2, 2.0)),
        // 50× its quota for 2 minutes.
        offered: |t| {
            if (60.0..180.0).contains(&t) {
                10.0
            } else {
                0.0
            }
        },
    }
}

/// The offered load of a legitimate spike, within acme's quota: 0.6/s, then 3.6/s (with
/// beta, 2× one replica's capacity) from 60 s to 240 s.
fn spiking(t: f64) -> f64 {
    if (60.0..240.0).contains(&t) { 3.6 } else { 0.6 }
}

/// The four scenarios of issue 16, by name: `spike`, `flood`, `flood+spike`, `yoyo`.
pub fn scenario(name: &str) -> Result<Scenario, String> {
    let s = match name {
        "spike" => {
            let mut s = base("spike", 600);
            s.tenants = vec![acme(spiking), beta()];
            s.spike_at = Some(60.0);
            s
        }
        "flood" => {
            let mut s = base("flood", 600);
            s.tenants = vec![acme(|_| 0.6), beta(), attacker()];
            s.attack = Some((60.0, 180.0));
            s
        }
        "flood+spike" => {
            let mut s = base("flood+spike", 600);
            s.tenants = vec![acme(spiking), beta(), attacker()];
            s.spike_at = Some(60.0);
            s
        }
        "yoyo" => {
            // Bursts of 3× one replica for 20 s every 60 s (shorter than the scale-down
            // delay): the Yo-Yo attack's shape, from an in-quota tenant.
            let mut s = base("yoyo", 600);
            s.tenants = vec![acme(|t| if t % 60.0 < 20.0 { 5.6 } else { 0.6 }), beta()];
            s
        }
        other => {
            return Err(format!(
                "{other:?}: expected spike, flood, flood+spike or yoyo"
            ));
        }
    };
    Ok(s)
}

/// Every scenario name.
pub const SCENARIOS: [&str; 4] = ["spike", "flood", "flood+spike", "yoyo"];

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        super::super::run::policy(
            &serde_json::from_value(serde_json::json!({
                "enabled": true,
                "frontend": {"minReplicas": 1, "maxReplicas": 12},
                "targetQueueDepth": 4,
            }))
            .unwrap(),
        )
    }

    fn run(name: &str, kind: PolicyKind) -> Summary {
        simulate(&scenario(name).unwrap(), kind, &policy()).1
    }

    #[test]
    fn a_flood_buys_nothing_from_ours_and_the_maximum_from_the_aggregate_policy() {
        let ours = run("flood", PolicyKind::Legitimate);
        let naive = run("flood", PolicyKind::Aggregate);
        assert_eq!(ours.bought_by_attack, Some(0), "{ours:?}");
        assert!(naive.bought_by_attack.unwrap() >= 3, "{naive:?}");
        assert_eq!(ours.legit_failed, 0, "{ours:?}");
        assert!(
            ours.replica_minutes < naive.replica_minutes,
            "{ours:?} {naive:?}"
        );
    }

    #[test]
    fn flood_and_spike_buy_within_one_replica_of_the_spike_alone() {
        let spike = run("spike", PolicyKind::Legitimate);
        let both = run("flood+spike", PolicyKind::Legitimate);
        assert!(
            both.max_replicas.abs_diff(spike.max_replicas) <= 1,
            "{spike:?} {both:?}"
        );
        // Ours decides within the panic window; the aggregate one at its next poll.
        assert!(spike.spike_decision_s.unwrap() <= 2.0, "{spike:?}");
    }

    #[test]
    fn yoyo_bursts_reverse_ours_at_most_once() {
        let ours = run("yoyo", PolicyKind::Legitimate);
        assert!(ours.reversals <= 1, "{ours:?}");
    }

    #[test]
    fn the_time_series_has_a_row_per_second_and_a_column_per_tenant() {
        let s = scenario("flood").unwrap();
        let (rows, _) = simulate(&s, PolicyKind::Legitimate, &policy());
        assert_eq!(rows.len(), 600);
        let names: Vec<&str> = s.tenants.iter().map(|t| t.name).collect();
        let csv = switchyard_edge::series::csv(&names, &rows);
        assert!(csv.starts_with(
            "second,offered_acme,offered_beta,offered_attacker,accepted,desired_replicas"
        ));
        assert_eq!(csv.lines().count(), 601);
        let plot = switchyard_edge::series::svg("flood", &names, &rows);
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
        assert!(scenario("nope").unwrap_err().contains("expected spike"));
    }
}
