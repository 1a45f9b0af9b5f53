//! What a benchmark sends: tenants with their API keys and weights, the synthetic prompt
//! and output lengths, and the [`Scenario`] that ties them together.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use switchyard_proto::inference::v1::{
    GenerateRequest, ModelInfo, Priority, SamplingParams, TokenIds, generate_request,
};
use tonic::metadata::{Ascii, MetadataValue};

use super::rng::Rng;

/// A flag or file value that is not what it should be: which input, and what is accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what}: {problem}")]
pub struct InvalidInput {
    /// The input, e.g. `--vocab-range` or `--api-keys-file keys.txt line 3`.
    pub what: String,
    /// What is wrong and what would be accepted.
    pub problem: String,
}

impl InvalidInput {
    pub fn new(what: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            problem: problem.into(),
        }
    }
}

/// An API key, ready to send as `authorization: Bearer <key>`. Its `Debug` form hides it,
/// and errors about it never quote it.
#[derive(Clone)]
pub struct ApiKey(MetadataValue<Ascii>);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// Checks that `key` can travel in a gRPC metadata value (visible ASCII, no spaces).
    /// The error explains the rule without repeating the key.
    pub fn new(key: &str) -> Result<Self, String> {
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the API key may only hold visible ASCII characters (no spaces or control \
                 characters)"
                    .into(),
            );
        }
        let mut value = MetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| "the API key is not a valid gRPC metadata value".to_string())?;
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// The `authorization` value (`Bearer <key>`), for an HTTP request.
    pub fn header(&self) -> &str {
        // Built from visible ASCII in `new`.
        self.0.to_str().unwrap_or_default()
    }

    /// Adds the `authorization` entry to `request`.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
    }
}

/// Adds `authorization: Bearer <key>` when there is a key.
pub fn authorize<T>(request: &mut tonic::Request<T>, key: Option<&ApiKey>) {
    if let Some(key) = key {
        key.authorize(request);
    }
}

/// One tenant of a benchmark: a name for the report, its API key (none: no
/// `authorization` entry), and its weight in the split of requests.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub api_key: Option<ApiKey>,
    pub weight: u32,
}

impl Tenant {
    /// Parses `NAME:KEY[:WEIGHT]`. The key is everything between the first and the last
    /// `:`, so a key holding `:` needs the weight written out; an empty key sends no
    /// `authorization` entry; the weight defaults to 1. Errors never quote the key.
    pub fn parse(entry: &str) -> Result<Tenant, String> {
        const FORM: &str = "expected NAME:KEY[:WEIGHT], e.g. team-a:sk-123:3";
        let (name, rest) = entry
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("no ':' after the tenant name: {FORM}"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("the tenant name is empty: {FORM}"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "tenant name {name:?} may only hold ASCII letters, digits, '-', '_' and '.'"
            ));
        }
        let (key, weight) = match rest.rsplit_once(':') {
            Some((key, weight)) => {
                let weight = weight
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|&w| w > 0)
                    .ok_or_else(|| {
                        format!(
                            "tenant {name:?}: the weight (after the last ':') must be a whole \
                             number from 1 to {}",
                            u32::MAX
                        )
                    })?;
                (key, weight)
            }
            None => (rest, 1),
        };
        let api_key = if key.is_empty() {
            None
        } else {
            Some(ApiKey::new(key).map_err(|e| format!("tenant {name:?}: {e}"))?)
        };
        Ok(Tenant {
            name: name.to_string(),
            api_key,
            weight,
        })
    }
}

fn check_unique(tenants: &[Tenant], what: &str) -> Result<(), InvalidInput> {
    for (i, tenant) in tenants.iter().enumerate() {
        if tenants[..i].iter().any(|t| t.name == tenant.name) {
            return Err(InvalidInput::new(
                what,
                format!("tenant {:?} is named twice; names must differ", tenant.name),
            ));
        }
    }
    if tenants.is_empty() {
        return Err(InvalidInput::new(
            what,
            "no tenants given: expected NAME:KEY[:WEIGHT] entries",
        ));
    }
    Ok(())
}

/// Parses `--tenants`: comma-separated `NAME:KEY[:WEIGHT]` entries (see [`Tenant::parse`]).
pub fn parse_tenant_list(list: &str) -> Result<Vec<Tenant>, InvalidInput> {
    let tenants = list
        .split(',')
        .enumerate()
        .map(|(i, entry)| {
            Tenant::parse(entry)
                .map_err(|e| InvalidInput::new(format!("--tenants entry {}", i + 1), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&tenants, "--tenants")?;
    Ok(tenants)
}

/// Parses an `--api-keys-file`: one `NAME:KEY[:WEIGHT]` per line; blank lines and lines
/// starting with `#` are skipped. `source` names the file in errors.
pub fn parse_tenant_file(text: &str, source: &str) -> Result<Vec<Tenant>, InvalidInput> {
    let mut tenants = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        tenants.push(
            Tenant::parse(line)
                .map_err(|e| InvalidInput::new(format!("{source} line {}", i + 1), e))?,
        );
    }
    check_unique(&tenants, source)?;
    Ok(tenants)
}

/// A half-open range of token ids, `START..END`, that synthetic prompts draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabRange {
    pub start: u32,
    pub end: u32,
}

impl fmt::Display for VocabRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for VocabRange {
    type Err = String;

    /// `START..END` with `START < END` (ids `START` to `END - 1`).
    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "expected START..END with START < END (END excluded), e.g. 1000..8000";
        let (start, end) = s.trim().split_once("..").ok_or(FORM)?;
        let start: u32 = start.trim().parse().map_err(|_| FORM)?;
        let end: u32 = end.trim().parse().map_err(|_| FORM)?;
        if start >= end {
            return Err(FORM.into());
        }
        Ok(Self { start, end })
    }
}

/// Parses a duration: a number with a unit, `ms`, `s`, `m` or `h` (`500ms`, `30s`, `1.5m`,
/// `2h`), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let form = || {
        format!(
            "{s:?} is not a duration: expected a number with ms, s, m or h, e.g. 500ms, 30s, 2m"
        )
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| form())?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(form()),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| form())
}

/// Parses a priority name as `GenerateRequest.priority` takes it: `low`, `normal`,
/// `high`, `critical`, or `unspecified` (the tenant tier's default).
pub fn parse_priority(s: &str) -> Result<Priority, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "unspecified" | "default" => Ok(Priority::Unspecified),
        "low" => Ok(Priority::Low),
        "normal" => Ok(Priority::Normal),
        "high" => Ok(Priority::High),
        "critical" => Ok(Priority::Critical),
        _ => Err(format!(
            "{s:?} is not a priority: expected low, normal, high, critical or unspecified"
        )),
    }
}

/// The shape of one tenant's requests: synthetic token-id prompts of a fixed (or jittered)
/// length and outputs of an exact length.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// `GenerateRequest.model`; empty selects the deployment's only model.
    pub model: String,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Each prompt's length is drawn uniformly from `prompt_tokens ± jitter` (at least 1).
    pub prompt_tokens_jitter: u32,
    /// Tokens to generate: sent as `max_tokens` with `ignore_eos`, so every successful
    /// request generates exactly this many.
    pub output_tokens: u32,
    /// Token ids prompts draw from.
    pub vocab: VocabRange,
    pub priority: Priority,
    /// Tokens every prompt starts with (a shared system prompt), before its own
    /// `prompt_tokens`.
    pub shared_prefix: Vec<u32>,
}

impl Workload {
    /// The longest prompt this workload sends.
    pub fn max_prompt_tokens(&self) -> u32 {
        self.prompt_tokens
            .saturating_add(self.prompt_tokens_jitter)
            .saturating_add(u32::try_from(self.shared_prefix.len()).unwrap_or(u32::MAX))
    }

    /// `n` token ids from `vocab`, the same for the same `seed`: a shared prefix.
    pub fn prefix(vocab: VocabRange, n: u32, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed ^ 0x5348_4152_4544);
        (0..n)
            .map(|_| rng.range_u32(vocab.start, vocab.end))
            .collect()
    }

    /// Draws one request: a prompt of random ids from `vocab`, its length jittered.
    pub fn request(&self, rng: &mut Rng, request_id: String) -> GenerateRequest {
        let low = self
            .prompt_tokens
            .saturating_sub(self.prompt_tokens_jitter)
            .max(1);
        let high = self
            .prompt_tokens
            .saturating_add(self.prompt_tokens_jitter)
            .max(low);
        let len = rng.range_u32(low, high.saturating_add(1));
        let mut ids = self.shared_prefix.clone();
        ids.extend((0..len).map(|_| rng.range_u32(self.vocab.start, self.vocab.end)));
        GenerateRequest {
            model: self.model.clone(),
            input: Some(generate_request::Input::TokenIds(TokenIds { ids })),
            sampling: Some(SamplingParams {
                max_tokens: Some(self.output_tokens),
                ignore_eos: true,
                ..SamplingParams::default()
            }),
            priority: self.priority as i32,
            request_id: Some(request_id),
        }
    }

    /// Checks this workload against the model the deployment reports (`ListModels`), so a
    /// benchmark that could only fail says why before it starts. `what` names the flags.
    pub fn check_against(&self, model: &ModelInfo) -> Result<(), InvalidInput> {
        if model.vocab_size > 0 && self.vocab.end > model.vocab_size {
            return Err(InvalidInput::new(
                "--vocab-range",
                format!(
                    "{} reaches past the vocabulary of model {:?} ({} ids): give a range within \
                     0..{}",
                    self.vocab, model.id, model.vocab_size, model.vocab_size
                ),
            ));
        }
        if model.max_tokens_per_request > 0 && self.output_tokens > model.max_tokens_per_request {
            return Err(InvalidInput::new(
                "--output-tokens",
                format!(
                    "{} is above the max_tokens_per_request of model {:?}: give at most {}",
                    self.output_tokens, model.id, model.max_tokens_per_request
                ),
            ));
        }
        let longest = u64::from(self.max_prompt_tokens()) + u64::from(self.output_tokens);
        if model.context_length > 0 && longest > u64::from(model.context_length) {
            return Err(InvalidInput::new(
                "--prompt-tokens/--prompt-tokens-jitter/--output-tokens",
                format!(
                    "prompts of up to {} tokens plus {} output tokens exceed the context length \
                     of model {:?}: keep the sum at most {}",
                    self.max_prompt_tokens(),
                    self.output_tokens,
                    model.id,
                    model.context_length
                ),
            ));
        }
        Ok(())
    }
}

/// One tenant's part in a scenario.
#[derive(Debug, Clone)]
pub struct TenantLoad {
    pub tenant: Tenant,
    pub workload: Workload,
    /// Sends the attack (not legitimate traffic: no shape, no TTFT in the series).
    pub attacker: bool,
}

/// What a benchmark sends, whatever drives its timing ([`Load`](super::Load)): the tenants,
/// each with its weight in the split of requests and its own workload.
///
/// The flags describe one scenario ([`Scenario::uniform`]: every tenant sends the same
/// workload). Named scenarios (a noisy neighbour flooding long prompts beside an
/// interactive tenant, priority mixes, ...) are further constructors returning a
/// `Scenario`, for a later `--scenario NAME`.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Shown in reports.
    pub name: String,
    /// At least one tenant.
    pub tenants: Vec<TenantLoad>,
    /// How the legitimate tenants' rate changes over the run (open loop only); their
    /// weights are their rates at its peak.
    pub shape: Shape,
}

/// How the legitimate tenants' request rate changes over a run (the autoscaling
/// scenarios), as a factor on their base rate at each time since the warmup ended.
/// Attackers always send at their own rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// The base rate throughout.
    Steady,
    /// `factor` × the base rate from `from` to `to`.
    Spike {
        from: Duration,
        to: Duration,
        factor: f64,
    },
    /// `factor` × the base rate for `burst` at the start of every `period` (periodic
    /// bursts: the Yo-Yo pattern).
    Yoyo {
        period: Duration,
        burst: Duration,
        factor: f64,
    },
}

impl Shape {
    /// The factor at `t` after the warmup.
    pub fn factor_at(&self, t: Duration) -> f64 {
        match *self {
            Shape::Steady => 1.0,
            Shape::Spike { from, to, factor } if t >= from && t < to => factor,
            Shape::Yoyo {
                period,
                burst,
                factor,
            } if !period.is_zero() && t.as_nanos() % period.as_nanos() < burst.as_nanos() => factor,
            _ => 1.0,
        }
    }

    /// The largest factor of the run.
    pub fn peak(&self) -> f64 {
        match *self {
            Shape::Steady => 1.0,
            Shape::Spike { factor, .. } | Shape::Yoyo { factor, .. } => factor.max(1.0),
        }
    }
}

/// Named traffic mixes for `switchyard bench --scenario` (admission under attack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioKind {
    /// Every tenant sends the workload, split by weight (the default).
    Uniform,
    /// Only the legitimate tenants (not `attacker`, not `bot-*`), at `--rate` split by
    /// weight: the reference the attacks are compared with.
    Baseline,
    /// The legitimate tenants as in `baseline`, plus the tenant named `attacker` at
    /// `--attack-rate`.
    Flood,
    /// The legitimate tenants, plus every tenant named `bot-*`, each at `--attack-rate`.
    Botnet,
    /// The legitimate tenants, while attackers abuse HTTP/2 and TCP (rapid reset, header
    /// floods, connection floods).
    H2Abuse,
    /// The legitimate tenants, their rate multiplied for a while (a legitimate spike).
    Spike,
    /// `flood` and `spike` at once: the attacker throughout, the legitimate spike within.
    FloodSpike,
    /// The legitimate tenants in periodic bursts (the Yo-Yo pattern).
    Yoyo,
}

impl ScenarioKind {
    /// Parses `uniform`, `baseline`, `flood`, `botnet` or `h2-abuse`.
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "uniform" => Self::Uniform,
            "baseline" => Self::Baseline,
            "flood" => Self::Flood,
            "botnet" => Self::Botnet,
            "h2-abuse" => Self::H2Abuse,
            "spike" => Self::Spike,
            "flood+spike" => Self::FloodSpike,
            "yoyo" => Self::Yoyo,
            other => {
                return Err(format!(
                    "{other:?}: expected uniform, baseline, flood, botnet, h2-abuse, spike, \
                     flood+spike or yoyo"
                ));
            }
        })
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Baseline => "baseline",
            Self::Flood => "flood",
            Self::Botnet => "botnet",
            Self::H2Abuse => "h2-abuse",
            Self::Spike => "spike",
            Self::FloodSpike => "flood+spike",
            Self::Yoyo => "yoyo",
        }
    }

    /// Whether its legitimate rate changes over the run (the autoscaling scenarios).
    pub fn shaped(self) -> bool {
        matches!(self, Self::Spike | Self::FloodSpike | Self::Yoyo)
    }

    fn attacker(self, tenant: &Tenant) -> bool {
        match self {
            Self::Flood | Self::FloodSpike => tenant.name == "attacker",
            Self::Botnet => tenant.name.starts_with("bot-"),
            _ => tenant.name == "attacker" || tenant.name.starts_with("bot-"),
        }
    }
}

impl Scenario {
    /// The open-loop scenario `kind` over `tenants`: legitimate tenants share `rate`
    /// requests per second by their weights; each attacking tenant sends `attack_rate`.
    /// Returns it with the total arrival rate (one Poisson stream split by weight, so
    /// each tenant's arrivals are Poisson at its own rate).
    pub fn named(
        kind: ScenarioKind,
        tenants: Vec<Tenant>,
        workload: Workload,
        rate: f64,
        attack_rate: f64,
    ) -> Result<(Self, f64), InvalidInput> {
        Self::named_shaped(kind, tenants, workload, rate, attack_rate, Shape::Steady)
    }

    /// [`Self::named`], the legitimate tenants' rate following `shape`: their weights and
    /// the total are at its peak, and the load generator thins their arrivals to the
    /// factor of the moment (a thinned Poisson process is Poisson at the lower rate).
    pub fn named_shaped(
        kind: ScenarioKind,
        tenants: Vec<Tenant>,
        workload: Workload,
        rate: f64,
        attack_rate: f64,
        shape: Shape,
    ) -> Result<(Self, f64), InvalidInput> {
        if kind == ScenarioKind::Uniform {
            return Ok((Self::uniform(tenants, workload), rate));
        }
        let (attackers, legit): (Vec<Tenant>, Vec<Tenant>) =
            tenants.into_iter().partition(|t| kind.attacker(t));
        if legit.is_empty() {
            return Err(InvalidInput::new(
                "--tenants/--api-keys-file",
                "no legitimate tenant (every tenant is named attacker or bot-*)",
            ));
        }
        let attacking = matches!(
            kind,
            ScenarioKind::Flood | ScenarioKind::Botnet | ScenarioKind::FloodSpike
        );
        if attacking && attackers.is_empty() {
            return Err(InvalidInput::new(
                "--tenants/--api-keys-file",
                format!(
                    "scenario {} needs {}",
                    kind.name(),
                    if kind != ScenarioKind::Botnet {
                        "a tenant named attacker"
                    } else {
                        "tenants named bot-*"
                    }
                ),
            ));
        }
        let total_weight: u32 = legit.iter().map(|t| t.weight).sum::<u32>().max(1);
        // Integer weights in thousandths of a request per second.
        let milli = |r: f64| ((r * 1000.0).round() as u32).max(1);
        let peak = rate * shape.peak();
        let mut loads: Vec<TenantLoad> = legit
            .into_iter()
            .map(|t| TenantLoad {
                tenant: Tenant {
                    weight: milli(peak * f64::from(t.weight) / f64::from(total_weight)),
                    ..t
                },
                workload: workload.clone(),
                attacker: false,
            })
            .collect();
        let mut total = peak;
        if attacking {
            for t in attackers {
                loads.push(TenantLoad {
                    tenant: Tenant {
                        weight: milli(attack_rate),
                        ..t
                    },
                    workload: workload.clone(),
                    attacker: true,
                });
                total += attack_rate;
            }
        }
        Ok((
            Self {
                name: kind.name().into(),
                tenants: loads,
                shape,
            },
            total,
        ))
    }

    /// Every tenant sends `workload`; requests split by the tenants' weights.
    pub fn uniform(tenants: Vec<Tenant>, workload: Workload) -> Self {
        Self {
            name: "uniform".into(),
            tenants: tenants
                .into_iter()
                .map(|tenant| TenantLoad {
                    tenant,
                    workload: workload.clone(),
                    attacker: false,
                })
                .collect(),
            shape: Shape::Steady,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(t: &Tenant) -> Option<String> {
        t.api_key.as_ref().map(|k| {
            k.0.to_str()
                .expect("ascii")
                .trim_start_matches("Bearer ")
                .to_string()
        })
    }

    #[test]
    fn tenants_parse_with_and_without_weight() {
        let ts = parse_tenant_list("a:sk-1:3, b:sk:with:colons:2,c:sk-3,anon:").expect("valid");
        let got: Vec<(String, Option<String>, u32)> = ts
            .iter()
            .map(|t| (t.name.clone(), key_of(t), t.weight))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), Some("sk-1".into()), 3),
                ("b".into(), Some("sk:with:colons".into()), 2),
                ("c".into(), Some("sk-3".into()), 1),
                ("anon".into(), None, 1),
            ]
        );
    }

    #[test]
    fn tenant_errors_name_the_entry_and_never_the_key() {
        for (list, expected) in [
            ("a:secret:0", "--tenants entry 1: tenant \"a\": the weight"),
            ("a:secret:x", "--tenants entry 1: tenant \"a\": the weight"),
            ("a:k:1,secret", "--tenants entry 2: no ':'"),
            (":secret:1", "--tenants entry 1: the tenant name is empty"),
            (
                "a:sec ret",
                "--tenants entry 1: tenant \"a\": the API key may only hold",
            ),
            ("a:k,a:k2", "--tenants: tenant \"a\" is named twice"),
        ] {
            let e = parse_tenant_list(list).expect_err(list).to_string();
            assert!(e.starts_with(expected), "{list}: {e}");
            assert!(!e.contains("secret") && !e.contains("sec ret"), "{e}");
        }
    }

    #[test]
    fn tenant_file_skips_comments_and_names_lines() {
        let text = "# tenants\n\na:k1:2\n  b:k2  \n";
        let ts = parse_tenant_file(text, "keys.txt").expect("valid");
        assert_eq!(ts.len(), 2);
        assert_eq!((ts[0].weight, ts[1].weight), (2, 1));
        let e = parse_tenant_file("a:k\nbad\n", "keys.txt").expect_err("bad line");
        assert!(e.to_string().starts_with("keys.txt line 2: "), "{e}");
        let e = parse_tenant_file("# nothing\n", "keys.txt").expect_err("empty");
        assert!(e.to_string().contains("no tenants"), "{e}");
    }

    #[test]
    fn api_key_debug_is_redacted() {
        let k = ApiKey::new("sk-very-secret").expect("valid");
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        let mut request = tonic::Request::new(());
        authorize(&mut request, Some(&k));
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().ok()),
            Some(Some("Bearer sk-very-secret"))
        );
        assert!(ApiKey::new("").is_err());
        assert!(ApiKey::new("a\nb").is_err());
    }

    #[test]
    fn vocab_ranges_and_durations_parse() {
        assert_eq!(
            "10..20".parse::<VocabRange>(),
            Ok(VocabRange { start: 10, end: 20 })
        );
        for bad in ["20..10", "5..5", "1-2", "a..b", ""] {
            assert!(bad.parse::<VocabRange>().is_err(), "{bad}");
        }
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "3 parsecs", "-1s", "1e400s"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("expected a number with ms, s, m or h"), "{e}");
        }
        assert_eq!(parse_priority("HIGH"), Ok(Priority::High));
        assert!(parse_priority("urgent").is_err());
    }

    fn workload(prompt: u32, jitter: u32) -> Workload {
        Workload {
            model: String::new(),
            prompt_tokens: prompt,
            prompt_tokens_jitter: jitter,
            output_tokens: 16,
            vocab: VocabRange {
                start: 100,
                end: 110,
            },
            priority: Priority::Unspecified,
            shared_prefix: Vec::new(),
        }
    }

    fn prompt_len(r: &GenerateRequest) -> usize {
        match &r.input {
            Some(generate_request::Input::TokenIds(t)) => t.ids.len(),
            other => panic!("expected token ids, got {other:?}"),
        }
    }

    #[test]
    fn a_shared_prefix_starts_every_prompt() {
        let mut w = workload(8, 0);
        w.shared_prefix = Workload::prefix(w.vocab, 20, 9);
        assert_eq!(w.shared_prefix, Workload::prefix(w.vocab, 20, 9), "seeded");
        assert_eq!(w.max_prompt_tokens(), 28);
        let mut rng = Rng::new(1);
        let ids = |r: GenerateRequest| match r.input {
            Some(generate_request::Input::TokenIds(t)) => t.ids,
            _ => panic!("token ids"),
        };
        let (a, b) = (
            ids(w.request(&mut rng, String::new())),
            ids(w.request(&mut rng, String::new())),
        );
        assert_eq!((a.len(), b.len()), (28, 28));
        assert_eq!(a[..20], w.shared_prefix[..]);
        assert_eq!(b[..20], w.shared_prefix[..]);
        assert_ne!(a[20..], b[20..], "each its own question");
    }

    #[test]
    fn requests_have_exact_lengths_and_ids_in_range() {
        let mut rng = Rng::new(5);
        let r = workload(64, 0).request(&mut rng, "bench-1".into());
        assert_eq!(prompt_len(&r), 64);
        let Some(generate_request::Input::TokenIds(ids)) = &r.input else {
            panic!("token ids");
        };
        assert!(ids.ids.iter().all(|&id| (100..110).contains(&id)));
        let sampling = r.sampling.expect("sampling");
        assert_eq!(sampling.max_tokens, Some(16));
        assert!(sampling.ignore_eos);
        assert_eq!(r.request_id.as_deref(), Some("bench-1"));

        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let len = prompt_len(&workload(10, 3).request(&mut rng, String::new()));
            assert!((7..=13).contains(&len), "{len}");
            seen.insert(len);
        }
        assert_eq!(seen.len(), 7, "every length in 7..=13 occurs");
        // Jitter never gives an empty prompt.
        for _ in 0..100 {
            assert!(prompt_len(&workload(2, 5).request(&mut rng, String::new())) >= 1);
        }
    }

    #[test]
    fn workload_is_checked_against_the_model() {
        let model = ModelInfo {
            id: "m".into(),
            context_length: 100,
            max_tokens_per_request: 32,
            vocab_size: 105,
            ..ModelInfo::default()
        };
        let e = workload(10, 0).check_against(&model).expect_err("vocab");
        assert!(
            e.to_string()
                .starts_with("--vocab-range: 100..110 reaches past"),
            "{e}"
        );
        let fits = ModelInfo {
            vocab_size: 1000,
            ..model
        };
        assert!(workload(10, 0).check_against(&fits).is_ok());
        let e = workload(80, 5).check_against(&fits).expect_err("context");
        assert!(e.to_string().contains("keep the sum at most 100"), "{e}");
        let mut long = workload(10, 0);
        long.output_tokens = 33;
        let e = long.check_against(&fits).expect_err("max tokens");
        assert!(e.to_string().starts_with("--output-tokens: 33"), "{e}");
    }
}
