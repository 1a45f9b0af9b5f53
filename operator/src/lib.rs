//! The Switchyard operator: it turns `ModelDeployment` objects into running pods.
//!
//! ```text
//!   ModelDeployment ──watch──> reconcile ──build (pure)──> desired objects
//!        ▲                         │                            │
//!        └──── status, events ─────┴──── server-side apply ─────┘
//! ```
//!
//! This crate will own the CRD types, the pure builders (spec → desired objects), the
//! apply/status shell around them and the autoscaler. It depends on `kube` and
//! `k8s-openapi` only, never on the inference engine, so the operator image stays free of
//! candle and CUDA. (The reconciler lands with the ModelDeployment issue; today the crate
//! only pins that dependency boundary.)
#![forbid(unsafe_code)]
