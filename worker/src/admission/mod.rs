//! Admission control on frontends: who may call, how much, and in what order — before a
//! request reaches the engine.
//!
//! ```text
//!  request ─ identify ─────── API key → (tenant, tier), or anonymous per client address
//!          │                    none / unknown ─> UNAUTHENTICATED
//!          ─ validate (frontend::validate) ─> INVALID_ARGUMENT
//!          ─ charge quotas ─── GCRA per tenant: 1 request, prompt + max_tokens tokens
//!          │                    over ─> RESOURCE_EXHAUSTED + grpc-retry-pushback-ms, retry-after
//!          ─ fair queue ────── strict bands by tier/priority; within a band the tenant with the
//!          │                    least virtual tokens served; deadline-aware; bounded
//!          │                    full ─> UNAVAILABLE + pushback (lowest band shed first)
//!          │                    can no longer start in time ─> DEADLINE_EXCEEDED
//!          ─ slot ──────────── at most `max_inflight` requests in the engine (its knee)
//!  end ─ refund unused tokens, charge generated tokens to the tenant's counter, count the
//!        outcome once: completed | rejected | unauthenticated | invalid | shed | expired |
//!        cancelled | failed
//! ```
//!
//! - [`connections`]: HTTP/2 and per-peer connection limits ([`TransportLimits`]).
//! - [`keys`]: API keys (constant-time lookup, never logged).
//! - [`gcra`]: per-tenant quotas (GCRA with exact refunds).
//! - [`fair_queue`]: the bounded fair queue.

pub mod connections;
pub mod control;
pub mod fair_queue;
pub mod gcra;
pub mod keys;

pub use connections::TransportLimits;
pub use control::{
    Admission, AdmissionOptions, Caller, Outcome, OutcomeRecorder, Rejection, Slot, Turn,
};
