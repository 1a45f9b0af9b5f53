//! Service tiers as admission applies them: parsed once from the configuration's
//! `tiers`/`defaultTier`, each with its band, fair-share weight and quotas.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_proto::worker_config::AdmissionConfig;

use super::AdmissionError;
use super::fair_queue::Band;
use super::gcra::{Limit, TierLimits};

/// A service tier as admission applies it.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Name.
    pub name: String,
    /// Highest band its requests may use (also the default).
    pub band: Band,
    /// Fair-share weight of each tenant.
    pub weight: u32,
    /// Quotas per tenant.
    pub limits: TierLimits,
    /// What a prompt token from the prefix cache costs against the token quota, in
    /// percent of a computed one.
    pub cached_prompt_percent: u32,
}

/// What a cached prompt token costs when a tier does not say: a quarter of a computed one
/// (DeepSeek's price ratio).
pub const DEFAULT_CACHED_PROMPT_PERCENT: u32 = 25;

impl Tier {
    /// The band of a request of this tier asking for `priority` (the protocol's 1 = low
    /// … 4 = critical; anything else is the tier's default): a request may lower its
    /// band, never raise it above its tier's.
    pub fn band_for(&self, priority: i32) -> Band {
        band_of(priority).map_or(self.band, |b| b.min(self.band))
    }
}

/// Every configured tier by name, and the default one.
#[derive(Clone)]
pub struct Tiers {
    by_name: HashMap<String, Arc<Tier>>,
    default: Arc<Tier>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Tiers {
    /// The tiers of `c`; each error names the field that is wrong and what is accepted.
    pub fn from_config(c: &AdmissionConfig) -> Result<Self, AdmissionError> {
        let mut by_name = HashMap::new();
        for t in &c.tiers {
            let band = Band::parse(&t.priority).ok_or_else(|| {
                AdmissionError::Tier(format!(
                    "admission.tiers[{}].priority: {:?} is not one of low, normal, high, critical",
                    t.name, t.priority
                ))
            })?;
            let tier = Tier {
                name: t.name.clone(),
                band,
                weight: t.weight.max(1),
                limits: TierLimits {
                    requests: per_minute(&t.name, "requestsPerMinute", t.requests_per_minute)?,
                    tokens: per_minute(&t.name, "tokensPerMinute", t.tokens_per_minute)?,
                },
                cached_prompt_percent: match t.cached_prompt_token_percent {
                    None => DEFAULT_CACHED_PROMPT_PERCENT,
                    Some(p) if p <= 100 => p,
                    Some(p) => {
                        return Err(AdmissionError::Tier(format!(
                            "admission.tiers[{}].cachedPromptTokenPercent: {p} is not a \
                             percentage (0 to 100)",
                            t.name
                        )));
                    }
                },
            };
            if by_name.insert(t.name.clone(), Arc::new(tier)).is_some() {
                return Err(AdmissionError::Tier(format!(
                    "admission.tiers: {:?} is listed twice",
                    t.name
                )));
            }
        }
        let default = match &c.default_tier {
            Some(name) => by_name.get(name).cloned().ok_or_else(|| {
                AdmissionError::Tier(format!(
                    "admission.defaultTier: {name:?} is not one of admission.tiers"
                ))
            })?,
            None => Arc::new(Tier {
                name: "default".into(),
                band: Band::Normal,
                weight: 1,
                limits: TierLimits::default(),
                cached_prompt_percent: DEFAULT_CACHED_PROMPT_PERCENT,
            }),
        };
        Ok(Self { by_name, default })
    }

    /// The configured tier names.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// The tier called `name`, or the default one.
    pub fn get_or_default(&self, name: &str) -> Arc<Tier> {
        self.by_name
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }

    /// The tier of callers nothing else places (anonymous ones, keys without a tier).
    pub fn default_tier(&self) -> Arc<Tier> {
        self.default.clone()
    }
}

/// A tier's `field` (per minute) as a limit whose bucket holds one minute's worth.
fn per_minute(
    tier: &str,
    field: &str,
    value: Option<u64>,
) -> Result<Option<Limit>, AdmissionError> {
    value
        .map(|n| {
            Limit::per_minute(n).map_err(|e| {
                AdmissionError::Tier(format!(
                    "admission.tiers[{tier}].{field}: {e} (at least 1 per minute)"
                ))
            })
        })
        .transpose()
}

/// The protocol's priority value (1 = low … 4 = critical) of `band`, as
/// `GenerateSummary.priority` reports the band a request ran in.
pub fn priority_of(band: Band) -> i32 {
    band as i32 + 1
}

fn band_of(priority: i32) -> Option<Band> {
    match priority {
        1 => Some(Band::Low),
        2 => Some(Band::Normal),
        3 => Some(Band::High),
        4 => Some(Band::Critical),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::worker_config::TierConfig;

    fn config(tiers: Vec<TierConfig>, default_tier: Option<&str>) -> AdmissionConfig {
        AdmissionConfig {
            api_keys_dir: None,
            tiers,
            default_tier: default_tier.map(str::to_string),
            max_queued: 8,
            default_deadline_seconds: 30,
            quota_scope: None,
        }
    }

    fn tier(name: &str, priority: &str) -> TierConfig {
        TierConfig {
            name: name.into(),
            priority: priority.into(),
            weight: 0,
            requests_per_minute: Some(60),
            tokens_per_minute: None,
            cached_prompt_token_percent: None,
        }
    }

    #[test]
    fn a_request_may_lower_its_band_but_not_raise_it() {
        let tiers =
            Tiers::from_config(&config(vec![tier("pro", "high")], Some("pro"))).expect("valid");
        let pro = tiers.get_or_default("pro");
        assert_eq!(pro.weight, 1, "a weight of 0 is read as 1");
        assert_eq!(pro.band_for(0), Band::High);
        assert_eq!(pro.band_for(1), Band::Low);
        assert_eq!(pro.band_for(4), Band::High);
        assert_eq!(tiers.get_or_default("nope").name, "pro");
    }

    #[test]
    fn errors_name_the_field() {
        let err = Tiers::from_config(&config(vec![tier("x", "urgent")], None))
            .expect_err("bad priority")
            .to_string();
        assert!(err.contains("admission.tiers[x].priority"), "{err}");
        let err = Tiers::from_config(&config(vec![tier("x", "low"), tier("x", "low")], None))
            .expect_err("twice")
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
        let err = Tiers::from_config(&config(vec![], Some("gold")))
            .expect_err("unknown default")
            .to_string();
        assert!(err.contains("admission.defaultTier"), "{err}");
    }
}
