//! The paged KV cache's bookkeeping: a fixed pool of fixed-size blocks, handed to sequences
//! as they grow and returned when they end or are preempted, with a prefix cache over the
//! full blocks. The storage itself
//! ([`crate::model::attention::PagedKv`]) is indexed by the slots these blocks cover.
//!
//! ```text
//!  block:  held (refs ≥ 1) ──release──> cached (refs 0, has a hash) ──evict──> free
//!            ^   ^                          │                                  │
//!            │   └──────── lookup (a hit) ──┘                                  │
//!            └───────────── allocate (free first, then evict) ─────────────────┘
//! ```
//!
//! A full block's hash chains its parent's hash, its tokens and a salt ([`BlockHasher`]):
//! equal hashes mean the same tokens at the same positions after the same prefix, hence
//! the same keys and values. The salt is per tenant (and model), so one tenant's blocks are
//! never another's hit, and no tenant can learn from its time to first token what another
//! sent. A block any sequence holds is never evicted (reference counts); an unheld cached
//! block stays until its space is needed, then goes by fairness first and age second: the
//! least recently used block of the tenant holding the most unheld cached blocks
//! ([`BlockPool::allocate`]), so a tenant flooding the cache with new prompts evicts its
//! own blocks before anyone else's.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Blocks needed for `tokens` token positions.
pub fn blocks_for_tokens(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// A full block's identity: its tokens, every token before them and the salt.
pub type BlockHash = u128;

/// Hashes a sequence's full blocks in order, each chained to the one before.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    salt: u64,
    parent: BlockHash,
}

impl BlockHasher {
    /// Starts a chain under `salt` (the tenant's and the model's).
    pub fn new(salt: u64) -> Self {
        Self { salt, parent: 0 }
    }

    /// Continues a chain under `salt` after the block hashed `last` (`None`: from the
    /// start).
    pub fn after(salt: u64, last: Option<BlockHash>) -> Self {
        Self {
            salt,
            parent: last.unwrap_or(0),
        }
    }

    /// The next block's hash, for its `tokens` (a whole block).
    pub fn next(&mut self, tokens: &[u32]) -> BlockHash {
        // Two SipHash runs under different leading words: 128 bits, so that a collision
        // (which would serve one prefix's keys and values for another) is out of reach.
        let half = |lane: u64| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (lane, self.salt, self.parent).hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        self.parent = (u128::from(half(0x5157_4954_4348_5944)) << 64) | u128::from(half(1));
        self.parent
    }

    /// The hashes of the first `blocks` full blocks of `tokens` under `salt`.
    pub fn chain(salt: u64, tokens: &[u32], block_size: usize, blocks: usize) -> Vec<BlockHash> {
        let mut hasher = Self::new(salt);
        tokens
            .chunks_exact(block_size)
            .take(blocks)
            .map(|block| hasher.next(block))
            .collect()
    }
}

/// The prefix cache's counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Prompt tokens looked up (the cacheable part of each admitted prompt).
    pub queried_tokens: u64,
    /// Of those, found in the cache.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evicted_blocks: u64,
}

/// A pool of `total` blocks, each `block_size` token positions, with a prefix cache.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    total: usize,
    /// Blocks with nothing worth keeping; popped from the end, so recently freed
    /// (memory-warm) blocks go first.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// Per block: its hash and salt, while it is in the cache.
    cached: Vec<Option<(BlockHash, u64)>>,
    by_hash: HashMap<BlockHash, u32>,
    /// Unheld cached blocks per salt, by when they were last released (oldest first).
    unheld: HashMap<u64, BTreeMap<u64, u32>>,
    unheld_count: usize,
    /// Per block: its key in `unheld` while it is there.
    released_at: Vec<u64>,
    clock: u64,
    counters: CacheCounters,
}

impl BlockPool {
    /// A pool with every block free and nothing cached.
    pub fn new(total: usize, block_size: usize) -> Self {
        Self {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            cached: vec![None; total],
            by_hash: HashMap::new(),
            unheld: HashMap::new(),
            unheld_count: 0,
            released_at: vec![0; total],
            clock: 0,
            counters: CacheCounters::default(),
        }
    }

    /// Token positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks a new sequence can get: free ones and unheld cached ones.
    pub fn free(&self) -> usize {
        self.free.len() + self.unheld_count
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total - self.free()
    }

    /// Blocks in the prefix cache (held or not).
    pub fn cached(&self) -> usize {
        self.by_hash.len()
    }

    /// Unheld cached blocks of `salt`.
    pub fn cached_unheld(&self, salt: u64) -> usize {
        self.unheld.get(&salt).map_or(0, BTreeMap::len)
    }

    /// The prefix cache's counters so far.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// `n` blocks, held once each, or `None` (and nothing taken) when fewer are free.
    /// Free blocks go first; then cached blocks no sequence holds are evicted: the least
    /// recently released one of the salt holding the most of them.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free() {
            return None;
        }
        let from_free = n.min(self.free.len());
        let mut out = self.free.split_off(self.free.len() - from_free);
        while out.len() < n {
            let victim = self
                .unheld
                .iter()
                .max_by_key(|(_, blocks)| {
                    // Most blocks first; on a tie the oldest block (a larger Reverse).
                    let oldest = blocks.keys().next().copied().unwrap_or(u64::MAX);
                    (blocks.len(), std::cmp::Reverse(oldest))
                })
                .map(|(salt, _)| *salt);
            let Some(block) = victim.and_then(|salt| self.take_unheld(salt)) else {
                // `free()` counted them: unreachable, but never leak what was taken.
                self.free.extend(out);
                return None;
            };
            self.uncache(block);
            self.counters.evicted_blocks += 1;
            out.push(block);
        }
        for &b in &out {
            self.refs[b as usize] = 1;
        }
        Some(out)
    }

    /// The oldest unheld block of `salt`, out of the unheld lists.
    fn take_unheld(&mut self, salt: u64) -> Option<u32> {
        let blocks = self.unheld.get_mut(&salt)?;
        let (_, block) = blocks.pop_first()?;
        if blocks.is_empty() {
            self.unheld.remove(&salt);
        }
        self.unheld_count -= 1;
        Some(block)
    }

    fn uncache(&mut self, block: u32) {
        if let Some((hash, _)) = self.cached[block as usize].take() {
            self.by_hash.remove(&hash);
        }
    }

    /// The longest run of `hashes`, from the first, found in the cache: those blocks, now
    /// held once more each. Counts the lookup (`block_size` tokens per hash).
    pub fn lookup(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut hits = Vec::new();
        for hash in hashes {
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            let b = block as usize;
            if self.refs[b] == 0 {
                // Out of the unheld lists: it cannot be evicted while held.
                if let Some((_, salt)) = self.cached[b]
                    && let Some(blocks) = self.unheld.get_mut(&salt)
                    && blocks.remove(&self.released_at[b]).is_some()
                {
                    self.unheld_count -= 1;
                    if blocks.is_empty() {
                        self.unheld.remove(&salt);
                    }
                }
            }
            self.refs[b] += 1;
            hits.push(block);
        }
        self.counters.queried_tokens += (hashes.len() * self.block_size) as u64;
        self.counters.hit_tokens += (hits.len() * self.block_size) as u64;
        hits
    }

    /// Puts `block`, a full block whose keys and values are now computed, in the cache
    /// under `hash`. Returns false (and caches nothing) when another block already holds
    /// that content (two sequences computed it at once) or `block` is cached already.
    pub fn register(&mut self, block: u32, hash: BlockHash, salt: u64) -> bool {
        let b = block as usize;
        if self.cached[b].is_some() || self.by_hash.contains_key(&hash) {
            return false;
        }
        self.by_hash.insert(hash, block);
        self.cached[b] = Some((hash, salt));
        true
    }

    /// A sequence lets go of `blocks` (in its order: the prefix first). A block no one
    /// holds any more becomes free, or, when cached, unheld: the end of a sequence is
    /// released before its start, so a prefix outlives its continuations.
    pub fn release(&mut self, blocks: Vec<u32>) {
        for block in blocks.into_iter().rev() {
            let b = block as usize;
            debug_assert!(self.refs[b] > 0, "block {block} released more than held");
            self.refs[b] = self.refs[b].saturating_sub(1);
            if self.refs[b] > 0 {
                continue;
            }
            match self.cached[b] {
                Some((_, salt)) => {
                    self.clock += 1;
                    self.released_at[b] = self.clock;
                    self.unheld
                        .entry(salt)
                        .or_default()
                        .insert(self.clock, block);
                    self.unheld_count += 1;
                }
                None => self.free.push(block),
            }
        }
        debug_assert!(self.free() <= self.total, "a block was released twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut a = BlockPool::new(4, 16);
        let x = a.allocate(3).expect("3 of 4");
        assert_eq!(a.free(), 1);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.free(), 1, "a failed allocation takes nothing");
        a.release(x);
        assert_eq!((a.free(), a.used()), (4, 0));
    }

    #[test]
    fn blocks_are_distinct_until_released() {
        let mut a = BlockPool::new(8, 4);
        let mut seen: Vec<u32> = a.allocate(3).into_iter().flatten().collect();
        seen.extend(a.allocate(5).into_iter().flatten());
        seen.sort_unstable();
        assert_eq!(seen, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn budget_arithmetic() {
        assert_eq!(blocks_for_tokens(17, 16), 2);
        assert_eq!(blocks_for_tokens(16, 16), 1);
    }

    /// A sequence of `tokens` under `salt` computes and caches its full blocks, then ends.
    fn run(pool: &mut BlockPool, salt: u64, tokens: &[u32]) -> Vec<u32> {
        let bs = pool.block_size();
        let hashes = BlockHasher::chain(salt, tokens, bs, tokens.len() / bs);
        let mut blocks = pool.lookup(&hashes);
        let hit = blocks.clone();
        let more = blocks_for_tokens(tokens.len(), bs) - blocks.len();
        blocks.extend(pool.allocate(more).expect("room"));
        for (i, h) in hashes.iter().enumerate().skip(hit.len()) {
            pool.register(blocks[i], *h, salt);
        }
        pool.release(blocks);
        hit
    }

    #[test]
    fn a_repeated_prefix_hits_and_a_different_one_does_not() {
        let mut pool = BlockPool::new(16, 4);
        let a: Vec<u32> = (0..10).collect();
        assert!(run(&mut pool, 1, &a).is_empty());
        assert_eq!(pool.cached(), 2, "two full blocks of 10 tokens");
        assert_eq!(pool.free(), 16, "unheld cached blocks count as free");
        // Same first 8 tokens: both blocks hit.
        let b: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        assert_eq!(run(&mut pool, 1, &b).len(), 2);
        // The same tokens after a different first token: nothing (the chain differs).
        let c: Vec<u32> = [7].into_iter().chain(1..10).collect();
        assert!(run(&mut pool, 1, &c).is_empty());
        let counters = pool.counters();
        assert_eq!((counters.queried_tokens, counters.hit_tokens), (24, 8));
    }

    #[test]
    fn tenants_never_share_blocks() {
        let mut pool = BlockPool::new(16, 4);
        let prompt: Vec<u32> = (0..12).collect();
        run(&mut pool, 1, &prompt);
        assert!(run(&mut pool, 2, &prompt).is_empty(), "another salt misses");
        assert_eq!(pool.cached(), 6, "each tenant has its own 3 blocks");
        assert_eq!(run(&mut pool, 2, &prompt).len(), 3);
    }

    #[test]
    fn a_held_block_is_never_evicted_and_the_biggest_holder_goes_first() {
        let mut pool = BlockPool::new(8, 4);
        let hot: Vec<u32> = (0..8).collect();
        run(&mut pool, 1, &hot);
        // Tenant 2 floods with new prompts: it evicts its own blocks, not tenant 1's 2.
        for i in 0..20u32 {
            let prompt: Vec<u32> = (0..8).map(|t| 1000 * (i + 1) + t).collect();
            run(&mut pool, 2, &prompt);
            assert_eq!(pool.cached_unheld(1), 2, "after flood request {i}");
        }
        assert_eq!(run(&mut pool, 1, &hot).len(), 2, "the hot prefix survived");
        // Held blocks: allocating everything else leaves them alone.
        let held = pool.lookup(&BlockHasher::chain(1, &hot, 4, 2));
        assert_eq!(held.len(), 2);
        let rest = pool.allocate(6).expect("the 6 others");
        assert!(rest.iter().all(|b| !held.contains(b)));
        assert!(pool.allocate(1).is_none(), "held blocks are not evictable");
        pool.release(rest);
        pool.release(held);
        assert_eq!(pool.free(), 8);
    }

    #[test]
    fn a_flood_of_new_prompts_does_not_evict_another_tenants_hot_system_prompt() {
        // A cache of 256 blocks of 16 tokens. The victim sends a 1,000-token system prompt
        // (62 full blocks) and a new question each time; between two of its requests the
        // flooder sends 10 prompts of 1,040 random tokens: 650 new blocks, 2.5 times the
        // cache, so least-recently-used eviction alone would evict the system prompt before
        // every victim request. Evicting the biggest holder's blocks first, the victim
        // keeps it: every request after the first hits all 62 blocks.
        let mut pool = BlockPool::new(256, 16);
        let system: Vec<u32> = (0..1000).collect();
        let mut next = 10_000u32;
        let mut fresh = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| {
                    next += 1;
                    next
                })
                .collect()
        };
        let mut hits = Vec::new();
        for _ in 0..20 {
            let mut prompt = system.clone();
            prompt.extend(fresh(40));
            hits.push(run(&mut pool, 1, &prompt).len());
            for _ in 0..10 {
                let flood = fresh(1040);
                run(&mut pool, 2, &flood);
            }
        }
        assert_eq!(hits[0], 0);
        assert!(hits[1..].iter().all(|&h| h == 62), "{hits:?}");
        assert!(
            pool.counters().evicted_blocks > 1000,
            "the flood churned the cache"
        );
    }

    #[test]
    fn a_block_computed_twice_is_cached_once() {
        let mut pool = BlockPool::new(4, 2);
        let h = BlockHasher::chain(0, &[1, 2], 2, 1)[0];
        let x = pool.allocate(2).expect("two");
        assert!(pool.register(x[0], h, 0));
        assert!(!pool.register(x[1], h, 0), "same content, second block");
        pool.release(x);
        assert_eq!(pool.cached(), 1);
        assert_eq!(pool.free(), 4);
    }
}
