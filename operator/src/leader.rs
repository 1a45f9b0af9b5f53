//! Leader election on a `coordination.k8s.io/v1` Lease: one replica reconciles, the others
//! wait and take over when the leader stops renewing.
//!
//! ```text
//!   standby ──try every retry period──> Lease free or expired? ──yes──> leader
//!   leader  ──renew every renew period─> renewed?                ──no───> exit (lost it)
//!   leader on SIGTERM ──> release (expire the lease now) so a standby takes over at once
//! ```
//!
//! Writes use the Lease's resourceVersion (optimistic concurrency), so two replicas racing
//! for a free lease cannot both win: the loser gets a conflict and stays standby.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`.
    pub identity: String,
    /// How long a lease is valid without renewal; a standby takes over after it.
    pub duration: Duration,
    /// How often the leader renews (well inside `duration`).
    pub renew_every: Duration,
    /// How often a standby tries.
    pub retry_every: Duration,
}

/// Tries to become or stay the leader.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// One attempt: returns whether this replica holds the lease afterwards. A lost race
    /// (conflict) is `Ok(false)`, not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        if !ours && !expired(spec, now) {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_secs);
        // `replace` sends the resourceVersion we read: a concurrent writer makes this fail.
        conflict_is_false(
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Waits until this replica is the leader.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.config.name, "leader election: cannot reach the lease")
                }
            }
            tokio::time::sleep(self.config.retry_every).await;
        }
    }

    /// Renews until a renewal fails for longer than the lease lasts (another replica may
    /// then hold it); returns then. Never returns while the lease is held.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renewal failed");
                    if last_renewed.elapsed() >= self.config.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (if held) so a standby need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
        if let Err(e) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "leader election: could not release the lease");
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    spec.holder_identity.is_none() || renewed + duration < now
}

fn conflict_is_false<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where a pod finds its own namespace when `POD_NAMESPACE` is not set (every pod with a
/// ServiceAccount token has it).
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace of the Lease: `--lease-namespace`, else `POD_NAMESPACE`, else the pod's
/// ServiceAccount namespace file, else `default` (run outside a cluster).
pub fn lease_namespace(
    flag: Option<String>,
    pod_namespace: Option<String>,
    service_account_file: &std::path::Path,
) -> String {
    flag.filter(|n| !n.is_empty())
        .or_else(|| pod_namespace.filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string(service_account_file)
                .ok()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_namespace_falls_back_to_the_service_account_file() {
        let dir = std::env::temp_dir().join(format!("switchyard-lease-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("namespace");
        std::fs::write(&file, "team-a\n").expect("write");
        let some = |s: &str| Some(s.to_string());
        assert_eq!(lease_namespace(some("flag"), some("pod"), &file), "flag");
        assert_eq!(lease_namespace(None, some("pod"), &file), "pod");
        assert_eq!(lease_namespace(None, None, &file), "team-a");
        assert_eq!(lease_namespace(None, some(""), &file), "team-a");
        assert_eq!(lease_namespace(None, None, &dir.join("missing")), "default");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn spec(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> (LeaseSpec, Timestamp) {
        let now = Timestamp::from_second(1_000_000).unwrap();
        (
            LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            },
            now,
        )
    }

    #[test]
    fn a_lease_expires_only_after_its_duration_without_renewal() {
        let (fresh, now) = spec(Some("a"), 5, 15);
        assert!(!expired(&fresh, now));
        let (stale, now) = spec(Some("a"), 16, 15);
        assert!(expired(&stale, now));
        let (released, now) = spec(None, 0, 15);
        assert!(expired(&released, now));
    }
}
