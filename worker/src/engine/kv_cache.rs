//! The paged KV cache's bookkeeping: a fixed pool of fixed-size blocks, handed to sequences
//! and returned when they end. The storage itself ([`crate::model::attention::PagedKv`])
//! is indexed by the slots these blocks cover.
//!
//! Blocks are reserved for a sequence's whole budget (prompt + `max_tokens`, capped by the
//! context) when it is admitted, so a running sequence can never run out of cache and
//! nothing is ever overwritten or preempted: when the pool is short, new work waits.

/// Blocks needed for `tokens` token positions.
pub fn blocks_for_tokens(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// A pool of `total` blocks, each `block_size` token positions.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Free block ids; popped from the end, so recently freed (cache-warm) blocks go first.
    free: Vec<u32>,
}

impl BlockAllocator {
    /// A pool with every block free.
    pub fn new(total: usize, block_size: usize) -> Self {
        Self {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
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

    /// Blocks not held by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// `n` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at))
    }

    /// Returns `blocks` to the pool.
    pub fn release(&mut self, blocks: Vec<u32>) {
        debug_assert!(blocks.iter().all(|b| (*b as usize) < self.total));
        self.free.extend(blocks);
        debug_assert!(self.free.len() <= self.total, "a block was released twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut a = BlockAllocator::new(4, 16);
        let x = a.allocate(3).expect("3 of 4");
        assert_eq!(a.free(), 1);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.free(), 1, "a failed allocation takes nothing");
        a.release(x);
        assert_eq!((a.free(), a.used()), (4, 0));
    }

    #[test]
    fn blocks_are_distinct_until_released() {
        let mut a = BlockAllocator::new(8, 4);
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
}
