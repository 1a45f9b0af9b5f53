//! Quota accounting: the request-quota check before a body is read, the charge of a valid
//! request (one request and its token reservation, both or neither), and the refund of
//! what it did not use — owned by a [`Charge`], so it happens on drop, on every path.

use std::sync::Arc;
use std::time::Instant;

use super::Admission;
use super::gcra::{Quotas, Receipt, Remaining, TierLimits};
use super::identity::Caller;
use super::outcome::Rejection;
use super::status;

/// A request's token pre-charge (prompt + `max_tokens`). Dropping it refunds what was not
/// used — all of it unless [`Charge::settle`] said otherwise — exactly once.
pub struct Charge {
    quotas: Arc<Quotas<String>>,
    key: String,
    limits: TierLimits,
    receipt: Option<Receipt>,
    reserved: u64,
    used: u64,
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("reserved", &self.reserved)
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl Charge {
    /// Tokens pre-charged.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// `used` tokens of the pre-charge were used: they are not refunded.
    pub fn settle(&mut self, used: u64) {
        self.used = used;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(receipt) = self.receipt.take() {
            let unused = self.reserved.saturating_sub(self.used);
            self.quotas
                .refund(&self.key, &self.limits, receipt, unused, Instant::now());
        }
    }
}

impl Admission {
    /// Refuses a caller whose request quota is spent, before anything else is done for
    /// the request (even its validation), so a flooding caller costs almost nothing.
    /// Charges nothing: [`Admission::charge`] charges the request and its tokens together
    /// once the request is valid.
    pub fn precheck_request(&self, caller: &Caller) -> Result<(), Rejection> {
        if self.remaining(caller).requests != Some(0) {
            return Ok(());
        }
        // Spent: the same check as `charge` with no tokens gives the exact wait (and
        // charges nothing when it refuses). Should a cell have freed up meanwhile, it
        // passes and charges one request; the request then goes on.
        self.charge_limits(caller, 0).map(drop)
    }

    /// Charges one request and `tokens` (prompt + `max_tokens`) together, both or
    /// neither; returns the quota left and the [`Charge`], which refunds the unused part
    /// when dropped.
    pub fn charge(&self, caller: &Caller, tokens: u64) -> Result<(Remaining, Charge), Rejection> {
        let receipt = self.charge_limits(caller, tokens)?;
        let charge = Charge {
            quotas: self.quotas.clone(),
            key: caller.key.clone(),
            limits: caller.tier.limits,
            receipt: Some(receipt),
            reserved: tokens,
            used: 0,
        };
        Ok((self.remaining(caller), charge))
    }

    /// The remaining quota of `caller` now (for metadata at the end of a call).
    pub fn remaining(&self, caller: &Caller) -> Remaining {
        self.quotas
            .remaining(&caller.key, &caller.tier.limits, Instant::now())
    }

    fn charge_limits(&self, caller: &Caller, tokens: u64) -> Result<Receipt, Rejection> {
        self.quotas
            .check(&caller.key, &caller.tier.limits, tokens, Instant::now())
            .map(|grant| grant.receipt)
            .map_err(|denied| {
                status::over_quota(&caller.tier, tokens, &denied, &self.remaining(caller))
            })
    }
}
