//! The frontend's accounting invariant, read from its `/metrics` text: every request
//! admitted (`switchyard_admission_accepted_total{tenant,tier}`) ends exactly once, as
//! completed, shed, expired, cancelled or failed
//! (`switchyard_admission_requests_total{tenant,tier,outcome}`), or is still queued or
//! running (`switchyard_admission_queued`, `switchyard_admission_inflight`).
//!
//! ```text
//!   accepted = completed + shed + expired + cancelled + failed + queued + in flight
//! ```
//!
//! In total at any moment; per tenant once nothing is queued or running (the gauges are
//! not per tenant). Tests that put load on a frontend check it at the end of their run.

use std::collections::BTreeMap;

/// How an admitted request can end.
pub const ENDINGS: [&str; 5] = ["completed", "shed", "expired", "cancelled", "failed"];

/// The sum of every series of a metric whose line starts with `prefix` (the name and an
/// opening brace, or the whole name) and contains `needle`.
pub fn metric_sum(text: &str, prefix: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of label `name` in a series line (`metric{a="x",b="y"} 1`).
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// The counts the invariant is made of, per tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accounting {
    /// Tenant → requests admitted.
    pub accepted: BTreeMap<String, f64>,
    /// Tenant → outcome → requests that ended so (admitted or not: `rejected`,
    /// `unauthenticated` and `invalid` are refusals before admission).
    pub outcomes: BTreeMap<String, BTreeMap<String, f64>>,
    /// Requests queued or running now.
    pub open: f64,
}

impl Accounting {
    /// Reads the counts from a frontend's `/metrics` text.
    pub fn parse(text: &str) -> Self {
        let mut a = Self::default();
        for line in text.lines() {
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            if line.starts_with("switchyard_admission_accepted_total{") {
                let tenant = label(line, "tenant").unwrap_or_default().to_string();
                *a.accepted.entry(tenant).or_default() += value;
            } else if line.starts_with("switchyard_admission_requests_total{") {
                let tenant = label(line, "tenant").unwrap_or_default().to_string();
                let outcome = label(line, "outcome").unwrap_or_default().to_string();
                *a.outcomes
                    .entry(tenant)
                    .or_default()
                    .entry(outcome)
                    .or_default() += value;
            } else if line.starts_with("switchyard_admission_queued{")
                || line.starts_with("switchyard_admission_inflight ")
            {
                a.open += value;
            }
        }
        a
    }

    /// Requests admitted, all tenants.
    pub fn accepted_total(&self) -> f64 {
        self.accepted.values().sum()
    }

    /// Requests of `tenant` (all tenants: `None`) that ended as one of [`ENDINGS`].
    pub fn ended(&self, tenant: Option<&str>) -> f64 {
        self.outcomes
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|want| want == t.as_str()))
            .flat_map(|(_, o)| o.iter())
            .filter(|(o, _)| ENDINGS.contains(&o.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// `Err` with the counts when the invariant does not hold: in total, and per tenant
    /// when nothing is open.
    pub fn check(&self) -> Result<(), String> {
        let (accepted, ended) = (self.accepted_total(), self.ended(None));
        if accepted != ended + self.open {
            return Err(format!(
                "accepted {accepted} != ended {ended} + queued or running {}: {self:?}",
                self.open
            ));
        }
        if self.open == 0.0 {
            for (tenant, &n) in &self.accepted {
                let ended = self.ended(Some(tenant));
                if n != ended {
                    return Err(format!(
                        "tenant {tenant:?}: accepted {n} != ended {ended}: {self:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP switchyard_admission_accepted_total x
switchyard_admission_accepted_total{tenant="a",tier="pro"} 3
switchyard_admission_accepted_total{tenant="b",tier="free"} 1
switchyard_admission_requests_total{outcome="completed",tenant="a",tier="pro"} 2
switchyard_admission_requests_total{outcome="cancelled",tenant="a",tier="pro"} 1
switchyard_admission_requests_total{outcome="rejected",tenant="b",tier="free"} 5
switchyard_admission_requests_total{outcome="expired",tenant="b",tier="free"} 1
switchyard_admission_queued{band="normal"} 0
switchyard_admission_inflight 0
"#;

    #[test]
    fn the_counts_add_up_per_tenant_and_refusals_do_not_count() {
        let a = Accounting::parse(TEXT);
        assert_eq!((a.accepted_total(), a.ended(None), a.open), (4.0, 4.0, 0.0));
        assert_eq!(a.ended(Some("b")), 1.0);
        a.check().expect("holds");
    }

    #[test]
    fn a_request_counted_nowhere_breaks_it() {
        let text = TEXT.replace("tier=\"pro\"} 3", "tier=\"pro\"} 4");
        let e = Accounting::parse(&text).check().expect_err("one missing");
        assert!(e.starts_with("accepted 5 != ended 4"), "{e}");
        // In flight, it is accounted for in total, not yet per tenant.
        let text = text.replace(
            "switchyard_admission_inflight 0",
            "switchyard_admission_inflight 1",
        );
        Accounting::parse(&text).check().expect("open");
        // An ending moved to another tenant breaks the per-tenant count.
        let text = TEXT.replace(
            "outcome=\"expired\",tenant=\"b\"",
            "outcome=\"expired\",tenant=\"a\"",
        );
        let e = Accounting::parse(&text).check().expect_err("per tenant");
        assert!(e.starts_with("tenant \"a\": accepted 3 != ended 4"), "{e}");
    }
}
