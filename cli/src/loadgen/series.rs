//! The time series of a benchmark run (`switchyard bench --series DIR`), one row a second
//! from the start (the warmup included): what each tenant offered, what was accepted,
//! the replicas a command reports, and the legitimate p99 TTFT — the shape of
//! [`switchyard_edge::series`], which writes it as CSV and SVG.
//!
//! A request counts in the second it was sent. Accepted: admitted, i.e. anything but a
//! refusal — over quota (`resource_exhausted`), unauthenticated, or shed with pushback.
//! The legitimate p99 TTFT covers the successful requests of tenants that are not
//! attackers.

use std::process::Command;
use std::time::{Duration, Instant};

use switchyard_edge::series::Row;

use super::report::RequestOutcome;

/// Per second of the run.
#[derive(Debug, Clone, Default)]
struct Second {
    offered: Vec<u64>,
    accepted: u64,
    legit_ttft: Vec<Duration>,
    /// The last replica count the command reported in this second: (desired, ready).
    replicas: Option<(u32, u32)>,
}

/// Collects the series as requests are sent and end.
#[derive(Debug)]
pub struct SeriesRecorder {
    start: Instant,
    legit: Vec<bool>,
    seconds: Vec<Second>,
}

impl SeriesRecorder {
    /// For a run that started at `start`; `legit[i]`: tenant `i` is not an attacker.
    pub fn new(start: Instant, legit: Vec<bool>) -> Self {
        Self {
            start,
            legit,
            seconds: Vec::new(),
        }
    }

    fn second(&mut self, at: Instant) -> &mut Second {
        let s = usize::try_from(at.saturating_duration_since(self.start).as_secs())
            .unwrap_or(usize::MAX);
        if self.seconds.len() <= s {
            self.seconds.resize(s + 1, Second::default());
        }
        let second = &mut self.seconds[s];
        if second.offered.len() < self.legit.len() {
            second.offered.resize(self.legit.len(), 0);
        }
        second
    }

    /// A request of `tenant` sent at `at`.
    pub fn sent(&mut self, tenant: usize, at: Instant) {
        if let Some(n) = self.second(at).offered.get_mut(tenant) {
            *n += 1;
        }
    }

    /// The end of a request sent at `sent`.
    pub fn ended(&mut self, sent: Instant, outcome: &RequestOutcome) {
        let legit = self.legit.get(outcome.tenant).copied().unwrap_or(false);
        let second = self.second(sent);
        let refused = match &outcome.result {
            Ok(_) => false,
            Err(label) => {
                label == "resource_exhausted"
                    || label == "unauthenticated"
                    || (label == "unavailable" && outcome.pushback)
            }
        };
        if !refused {
            second.accepted += 1;
        }
        if let (true, Ok(_), Some(ttft)) = (legit, &outcome.result, outcome.ttft) {
            second.legit_ttft.push(ttft);
        }
    }

    /// The replicas the command reported at `at`.
    pub fn replicas(&mut self, at: Instant, desired: u32, ready: u32) {
        self.second(at).replicas = Some((desired, ready));
    }

    /// One row per second; a second without a replica report carries the last one
    /// forward (0 before the first, or without a command).
    pub fn rows(&self) -> Vec<Row> {
        let mut replicas = (0, 0);
        self.seconds
            .iter()
            .enumerate()
            .map(|(s, second)| {
                replicas = second.replicas.unwrap_or(replicas);
                let mut ttft = second.legit_ttft.clone();
                ttft.sort_unstable();
                let p99 = if ttft.is_empty() {
                    0.0
                } else {
                    ttft[(ttft.len() * 99).div_ceil(100).max(1) - 1].as_secs_f64()
                };
                Row {
                    second: s as u64,
                    offered: (0..self.legit.len())
                        .map(|t| second.offered.get(t).copied().unwrap_or(0) as f64)
                        .collect(),
                    accepted: second.accepted as f64,
                    desired: replicas.0,
                    ready: replicas.1,
                    legit_p99_ttft: p99,
                }
            })
            .collect()
    }
}

/// Runs `command` with `sh -c` and reads the replica count it prints: `DESIRED` or
/// `DESIRED READY` (e.g. `kubectl get modeldeployment NAME -o
/// jsonpath='{.spec.frontend.replicas} {.status.frontend.readyReplicas}'`).
pub fn replicas_from(command: &str) -> Result<(u32, u32), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .map_err(|e| format!("running `{command}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{command}` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_replicas(&String::from_utf8_lossy(&out.stdout))
        .map_err(|why| format!("`{command}` printed {why}"))
}

/// `DESIRED` or `DESIRED READY` (an empty READY, as a status without ready pods prints,
/// is 0).
fn parse_replicas(text: &str) -> Result<(u32, u32), String> {
    let mut words = text.split_whitespace();
    let number = |w: &str| {
        w.parse::<u32>()
            .map_err(|_| format!("{:?}: expected DESIRED [READY], whole numbers", text.trim()))
    };
    let desired = number(words.next().ok_or("nothing: expected DESIRED [READY]")?)?;
    let ready = words.next().map(number).transpose()?.unwrap_or(0);
    Ok((desired, ready))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(tenant: usize, result: Result<&str, &str>, ttft_ms: u64) -> RequestOutcome {
        RequestOutcome {
            tenant,
            measured: true,
            ended: Instant::now(),
            result: result.map(str::to_string).map_err(str::to_string),
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: Vec::new(),
            e2e: Duration::from_millis(ttft_ms),
            prompt_tokens: 1,
            cached_prompt_tokens: 0,
            output_tokens: 1,
            pushback: false,
        }
    }

    #[test]
    fn rows_count_offers_acceptance_and_legit_ttft_by_the_second_sent() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = SeriesRecorder::new(t0, vec![true, false]);
        s.replicas(at(0), 1, 1);
        for ms in [100, 200, 300] {
            s.sent(0, at(ms));
        }
        s.sent(1, at(500));
        s.ended(at(100), &outcome(0, Ok("length"), 10));
        s.ended(at(200), &outcome(0, Ok("length"), 30));
        s.ended(at(300), &outcome(0, Err("deadline_exceeded"), 0));
        // The attacker's refusal is not accepted, and no TTFT of it counts.
        s.ended(at(500), &outcome(1, Err("resource_exhausted"), 1));
        s.sent(1, at(2_100));
        s.ended(at(2_100), &outcome(1, Ok("length"), 900));
        s.replicas(at(2_500), 3, 1);
        let rows = s.rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].offered, vec![3.0, 1.0]);
        assert_eq!(rows[0].accepted, 3.0);
        assert_eq!(rows[0].legit_p99_ttft, 0.030);
        assert_eq!((rows[1].desired, rows[1].ready), (1, 1), "carried forward");
        assert_eq!(rows[1].offered, vec![0.0, 0.0]);
        assert_eq!((rows[2].desired, rows[2].ready), (3, 1));
        assert_eq!(rows[2].accepted, 1.0);
        assert_eq!(
            rows[2].legit_p99_ttft, 0.0,
            "an attacker's TTFT is not legit"
        );
    }

    #[test]
    fn a_replica_command_prints_desired_and_maybe_ready() {
        assert_eq!(parse_replicas("3 2\n"), Ok((3, 2)));
        assert_eq!(parse_replicas("3 \n"), Ok((3, 0)));
        assert!(parse_replicas("").unwrap_err().contains("nothing"));
        assert!(
            parse_replicas("three")
                .unwrap_err()
                .contains("whole numbers")
        );
        assert_eq!(replicas_from("echo 4 4"), Ok((4, 4)));
        assert!(replicas_from("exit 3").unwrap_err().contains("exited"));
    }
}
