//! How many tokens of KV cache a frontend holds when the user did not say: what fits in
//! the memory left after the weights, measured once they are loaded, less what one engine
//! step and the requests the frontend holds need beside the cache.
//!
//! ```text
//!  left      = the memory the process may still use (CPU: the cgroup's limit minus its
//!              usage — cgroup v2, or v1's memory controller — or MemAvailable, whichever
//!              is smaller)
//!  reserved  = maxBatchTokens × activation bytes per step token   (one step's values)
//!            + (maxBatchSize + maxQueued) × 64 KiB                 (each request held)
//!  usable    = (left − reserved) × 90 %
//!  tokens    = usable ÷ bytes per token, at most max_batch_size × context (more could
//!              never be used) — and an error when not even one full-context sequence fits
//! ```
//!
//! The reserve is an estimate, measured (2026-12-06, `VmHWM` of a frontend flooded with
//! 320 requests of 400 + 100 tokens, the qwen3_moe fixture): about 7 KiB per step token
//! beyond the cache at `maxBatchTokens` 8192 (≈ 3 × the widest per-token values a layer
//! holds, in f32: allocations are per op, and several are alive at once) and about 64 KiB
//! per request held (its stream's buffers, prompt and state). Without it, a frontend
//! under a tight memory limit gave 90 % of its room to the cache and was OOM-killed once
//! a flood filled it (the real-node test's memory-pressure step).
//!
//! On a GPU the free device memory is not measured yet: the cache is then sized as
//! `max_batch_size × min(context, 2048)` tokens, with a warning to set
//! `serving.kvCacheTokens`.

use std::path::Path;

use crate::model::config::ModelConfig;

/// The share of the memory left, after the reserve, that the KV cache may take.
const USABLE_PERCENT: u64 = 90;

/// Bytes kept per request the frontend holds (running or queued), beside its KV cache.
pub const REQUEST_BYTES: u64 = 64 << 10;

/// Why no KV cache size could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV cache needs {needed} bytes for one sequence of the full context ({context} tokens × \
     {per_token} bytes), but only {usable} bytes are usable ({USABLE_PERCENT}% of the {left} \
     bytes left after the weights, less {reserved} kept for one step's activations at \
     maxBatchTokens and the requests a frontend holds); give the frontend more memory, lower \
     serving.maxContextLength, serving.maxBatchTokens or serving.maxBatchSize, or set \
     serving.kvCacheTokens"
)]
pub struct KvBudgetError {
    /// Bytes one full-context sequence needs.
    pub needed: u64,
    /// Context length in tokens.
    pub context: u64,
    /// Bytes per cached token.
    pub per_token: u64,
    /// Bytes the cache may use.
    pub usable: u64,
    /// Bytes left after the weights.
    pub left: u64,
    /// Bytes kept for activations and requests ([`reserve`]).
    pub reserved: u64,
}

/// What the frontend keeps out of the cache: one step's activations at `max_batch_tokens`
/// and [`REQUEST_BYTES`] for each of `requests_held` (running + queued at most).
pub fn reserve(cfg: &ModelConfig, max_batch_tokens: u64, requests_held: u64) -> u64 {
    max_batch_tokens
        .saturating_mul(activation_bytes_per_token(cfg))
        .saturating_add(requests_held.saturating_mul(REQUEST_BYTES))
}

/// Three times the widest per-token values a layer holds at once, in f32: the residual
/// and its normed copy, queries, keys, values and the attention output, and the MLP's
/// (the routed experts' `top_k` × gate, up and product, the shared experts', and the
/// router's logits; a dense MLP's three intermediates).
pub fn activation_bytes_per_token(cfg: &ModelConfig) -> u64 {
    let heads = cfg.num_heads;
    let (q, kv, out) = match &cfg.mla {
        Some(m) => {
            let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
            (
                heads * qk,
                m.kv_lora_rank + heads * (m.qk_nope_head_dim + m.v_head_dim),
                heads * m.v_head_dim,
            )
        }
        None => (
            heads * cfg.head_dim,
            2 * cfg.num_kv_heads * cfg.head_dim,
            heads * cfg.head_dim,
        ),
    };
    let mlp = match &cfg.moe {
        Some(m) => {
            3 * m.top_k * m.expert_intermediate_size
                + 3 * m.shared_expert_intermediate_size.unwrap_or(0)
                + m.num_experts
        }
        None => 3 * cfg.intermediate_size,
    };
    let widest = 2 * cfg.hidden_size + q + kv + out + mlp;
    3 * 4 * widest as u64
}

/// The KV cache capacity in tokens for `left` bytes of memory left after the weights, of
/// which `reserved` ([`reserve`]) are not the cache's.
pub fn tokens_for(
    left: u64,
    reserved: u64,
    per_token: u64,
    context: u64,
    max_batch_size: u64,
) -> Result<u64, KvBudgetError> {
    let per_token = per_token.max(1);
    let usable = left.saturating_sub(reserved) / 100 * USABLE_PERCENT;
    let fits = usable / per_token;
    if fits < context {
        return Err(KvBudgetError {
            needed: context.saturating_mul(per_token),
            context,
            per_token,
            usable,
            left,
            reserved,
        });
    }
    Ok(fits.min(max_batch_size.max(1).saturating_mul(context)))
}

/// The memory this process may still use, on the CPU: the smaller of the cgroup's room
/// (`memory.max` − `memory.current` on cgroup v2; `memory.limit_in_bytes` −
/// `memory.usage_in_bytes` of the memory controller on a cgroup v1 host, where the
/// container runtime mounts the container's own cgroup) and the kernel's `MemAvailable`.
/// `None` when neither can be read.
pub fn cpu_memory_left() -> Option<u64> {
    let cgroup = cgroup_room(Path::new("/sys/fs/cgroup"))
        .or_else(|| cgroup_v1_room(Path::new("/sys/fs/cgroup/memory")));
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t));
    match (cgroup, meminfo) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `memory.max` − `memory.current` of the cgroup mounted at `root` (`None` when unlimited
/// or unreadable).
fn cgroup_room(root: &Path) -> Option<u64> {
    // "max" (unlimited) does not parse.
    let max = read_bytes(&root.join("memory.max"))?;
    Some(max.saturating_sub(read_bytes(&root.join("memory.current"))?))
}

/// `memory.limit_in_bytes` − `memory.usage_in_bytes` of the cgroup v1 memory controller
/// mounted at `root` (`None` when unreadable or unlimited: v1 writes no limit as a number
/// near 2^63, the page-rounded `i64::MAX`).
fn cgroup_v1_room(root: &Path) -> Option<u64> {
    let limit = read_bytes(&root.join("memory.limit_in_bytes"))?;
    if limit >= 1 << 62 {
        return None;
    }
    Some(limit.saturating_sub(read_bytes(&root.join("memory.usage_in_bytes"))?))
}

/// A cgroup file holding one number of bytes.
fn read_bytes(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_takes_what_fits_up_to_every_sequence_at_full_context() {
        // 1 GiB left, 1 KiB a token: 90% of it is 943 718 tokens.
        let left = 1 << 30;
        assert_eq!(tokens_for(left, 0, 1024, 4096, 1000), Ok(943_718));
        // Never more than max_batch_size full-context sequences.
        assert_eq!(tokens_for(left, 0, 1024, 4096, 8), Ok(8 * 4096));
        // What is reserved is not the cache's: 90% of the 512 MiB beyond it.
        assert_eq!(tokens_for(left, 512 << 20, 1024, 4096, 1000), Ok(471_859));
    }

    #[test]
    fn not_even_one_full_context_sequence_is_an_error_that_says_what_to_do() {
        let e = tokens_for(1 << 20, 0, 1024, 4096, 8).expect_err("too small");
        assert_eq!(e.needed, 4096 * 1024);
        let text = e.to_string();
        assert!(text.contains("serving.maxContextLength"), "{text}");
        assert!(text.contains("serving.kvCacheTokens"), "{text}");
        // Room that the reserve takes whole names it and the settings that shrink it.
        let e = tokens_for(64 << 20, 80 << 20, 256, 512, 8).expect_err("reserved");
        assert_eq!((e.usable, e.reserved), (0, 80 << 20));
        assert!(e.to_string().contains("serving.maxBatchTokens"), "{e}");
    }

    #[test]
    fn the_reserve_counts_a_steps_widest_values_and_every_request_held() {
        let raw: crate::model::config::RawConfig = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/models/qwen3_moe/config.json"
            ))
            .expect("fixture"),
        )
        .expect("raw config");
        let cfg = crate::model::config::resolve(Path::new("config.json"), raw).expect("valid");
        // hidden 64 (twice), q 4 × 8, k + v 2 × 2 × 8, out 32, top 4 × 40 × 3 + 8 logits.
        let widest = 2 * 64 + 32 + 32 + 32 + 4 * 40 * 3 + 8;
        assert_eq!(activation_bytes_per_token(&cfg), 12 * widest);
        // What the flood measured needed beside the cache at maxBatchTokens 8192 (about
        // 60 MB for the step, 64 KiB a request) is within the reserve.
        assert!(reserve(&cfg, 8192, 0) >= 60_000_000);
        assert_eq!(reserve(&cfg, 0, 320), 320 * REQUEST_BYTES);
    }

    #[test]
    fn memory_left_is_read_from_the_cgroup_and_meminfo() {
        let dir = std::env::temp_dir().join(format!("switchyard-kv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("memory.max"), "1000\n").expect("max");
        std::fs::write(dir.join("memory.current"), "400\n").expect("current");
        assert_eq!(cgroup_room(&dir), Some(600));
        std::fs::write(dir.join("memory.max"), "max\n").expect("unlimited");
        assert_eq!(cgroup_room(&dir), None);
        // A cgroup v1 host (the memory controller mounted on its own).
        std::fs::write(dir.join("memory.limit_in_bytes"), "67108864\n").expect("limit");
        std::fs::write(dir.join("memory.usage_in_bytes"), "25165824\n").expect("usage");
        assert_eq!(cgroup_v1_room(&dir), Some(40 << 20));
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n")
            .expect("unlimited");
        assert_eq!(cgroup_v1_room(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            mem_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"),
            Some(2 << 20)
        );
        // This machine has one of the two.
        assert!(cpu_memory_left().is_some_and(|b| b > 0));
    }
}
