//! How many tokens of KV cache a frontend holds when the user did not say: what fits in
//! the memory left after the weights, measured once they are loaded.
//!
//! ```text
//!  left      = the memory the process may still use (CPU: the cgroup's limit minus its
//!              usage, or MemAvailable, whichever is smaller)
//!  usable    = left × 90 %          (activations and the runtime need the rest)
//!  tokens    = usable ÷ bytes per token, at most max_batch_size × context (more could
//!              never be used) — and an error when not even one full-context sequence fits
//! ```
//!
//! On a GPU the free device memory is not measured yet: the cache is then sized as
//! `max_batch_size × min(context, 2048)` tokens, with a warning to set
//! `serving.kvCacheTokens`.

use std::path::Path;

/// The share of the memory left that the KV cache may take.
const USABLE_PERCENT: u64 = 90;

/// Why no KV cache size could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV cache needs {needed} bytes for one sequence of the full context ({context} tokens × \
     {per_token} bytes), but only {usable} bytes are usable ({USABLE_PERCENT}% of {left} left \
     after the weights); give the frontend more memory, lower serving.maxContextLength, or \
     set serving.kvCacheTokens"
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
}

/// The KV cache capacity in tokens for `left` bytes of memory left after the weights.
pub fn tokens_for(
    left: u64,
    per_token: u64,
    context: u64,
    max_batch_size: u64,
) -> Result<u64, KvBudgetError> {
    let per_token = per_token.max(1);
    let usable = left / 100 * USABLE_PERCENT;
    let fits = usable / per_token;
    if fits < context {
        return Err(KvBudgetError {
            needed: context.saturating_mul(per_token),
            context,
            per_token,
            usable,
            left,
        });
    }
    Ok(fits.min(max_batch_size.max(1).saturating_mul(context)))
}

/// The memory this process may still use, on the CPU: the smaller of the cgroup's room
/// (`memory.max` − `memory.current`, cgroup v2) and the kernel's `MemAvailable`. `None`
/// when neither can be read.
pub fn cpu_memory_left() -> Option<u64> {
    let cgroup = cgroup_room(Path::new("/sys/fs/cgroup"));
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
    let max = std::fs::read_to_string(root.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" (unlimited) does not parse
    let current: u64 = std::fs::read_to_string(root.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
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
        assert_eq!(tokens_for(left, 1024, 4096, 1000), Ok(943_718));
        // Never more than max_batch_size full-context sequences.
        assert_eq!(tokens_for(left, 1024, 4096, 8), Ok(8 * 4096));
    }

    #[test]
    fn not_even_one_full_context_sequence_is_an_error_that_says_what_to_do() {
        let e = tokens_for(1 << 20, 1024, 4096, 8).expect_err("too small");
        assert_eq!(e.needed, 4096 * 1024);
        let text = e.to_string();
        assert!(text.contains("serving.maxContextLength"), "{text}");
        assert!(text.contains("serving.kvCacheTokens"), "{text}");
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
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            mem_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"),
            Some(2 << 20)
        );
        // This machine has one of the two.
        assert!(cpu_memory_left().is_some_and(|b| b > 0));
    }
}
