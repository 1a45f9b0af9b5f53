//! API keys: who a caller is (tenant) and which tier it is in.
//!
//! The operator mounts the ModelDeployment's API-key Secret as a directory; every file in it
//! (every Secret entry) holds lines of
//!
//! ```text
//! # comments and blank lines are skipped
//! TENANT:KEY          # in the default tier
//! TENANT:KEY:TIER
//! ```
//!
//! A tenant may have several keys (rotation). Keys are compared in constant time and never
//! logged or echoed: errors name the file and line, not the key.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// Tenant name (quotas, fairness and metrics are per tenant).
    pub tenant: String,
    /// Tier name.
    pub tier: String,
}

/// The keys of one deployment, looked up without timing leaks.
pub struct KeyRing {
    /// Buckets by a secretly keyed hash of the key, so the lookup's timing says nothing
    /// useful about the keys; within a bucket every candidate is compared in full.
    buckets: HashMap<u64, Vec<(Vec<u8>, KeyOwner)>>,
    hasher: std::collections::hash_map::RandomState,
    count: usize,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("KeyRing")
            .field("keys", &self.count)
            .finish_non_exhaustive()
    }
}

/// Why the key files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file could not be read.
    #[error("API keys {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is malformed (the key itself is never shown).
    #[error("API keys {}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what is accepted.
        message: String,
    },
}

/// Shortest key accepted: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;
/// Longest tenant name (a Kubernetes label value's limit).
pub const MAX_TENANT_LEN: usize = 63;

/// A field of a key file as an error may quote it: in full when it cannot be a key (shorter
/// than [`MIN_KEY_LEN`]), else its first two characters and its length. A line with its
/// fields out of order puts a key where a tenant or tier name belongs, and errors end up
/// in logs.
fn shown(field: &str) -> String {
    if field.chars().count() < MIN_KEY_LEN {
        format!("{field:?}")
    } else {
        let start: String = field.chars().take(2).collect();
        format!(
            "\"{start}…\" ({} characters, not shown in full: it may be a key)",
            field.chars().count()
        )
    }
}

impl KeyRing {
    /// Reads every file of `dir` (skipping Kubernetes' `..data` links and hidden files).
    /// `tiers` are the valid tier names; `default_tier` places keys listed without one.
    pub fn load(
        dir: &Path,
        tiers: &[String],
        default_tier: Option<&str>,
    ) -> Result<Self, KeyError> {
        Self::from_files(&read_key_files(dir)?, tiers, default_tier)
    }

    /// The ring of files already read ([`read_key_files`]).
    pub fn from_files(
        files: &[(PathBuf, String)],
        tiers: &[String],
        default_tier: Option<&str>,
    ) -> Result<Self, KeyError> {
        let mut ring = Self::empty();
        for (file, text) in files {
            ring.add_text(file, text, tiers, default_tier)?;
        }
        Ok(ring)
    }

    /// A ring with no keys.
    pub fn empty() -> Self {
        Self {
            buckets: HashMap::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            count: 0,
        }
    }

    /// Adds the keys of one file's text.
    pub fn add_text(
        &mut self,
        path: &Path,
        text: &str,
        tiers: &[String],
        default_tier: Option<&str>,
    ) -> Result<(), KeyError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |message: String| KeyError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let mut parts = line.split(':');
            let (tenant, key, tier) = (parts.next(), parts.next(), parts.next());
            if parts.next().is_some() {
                return Err(bad(
                    "expected TENANT:KEY or TENANT:KEY:TIER (keys cannot contain ':')".into(),
                ));
            }
            let (Some(tenant), Some(key)) = (tenant.map(str::trim), key.map(str::trim)) else {
                return Err(bad("expected TENANT:KEY or TENANT:KEY:TIER".into()));
            };
            if tenant.is_empty()
                || tenant.len() > MAX_TENANT_LEN
                || !tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(format!(
                    "tenant {}: 1-{MAX_TENANT_LEN} characters of letters, digits, '-', '_' or '.'",
                    shown(tenant)
                )));
            }
            if key.len() < MIN_KEY_LEN || key.chars().any(char::is_whitespace) {
                return Err(bad(format!(
                    "the key of tenant {} must be at least {MIN_KEY_LEN} characters without spaces",
                    shown(tenant)
                )));
            }
            let tier = match tier.map(str::trim) {
                Some(t) if tiers.iter().any(|n| n == t) => t.to_string(),
                Some(t) => {
                    return Err(bad(format!(
                        "tier {} of tenant {} is not one of the configured tiers ({})",
                        shown(t),
                        shown(tenant),
                        tiers.join(", ")
                    )));
                }
                None => default_tier.map(str::to_string).ok_or_else(|| {
                    bad(format!(
                        "tenant {} names no tier and there is no default tier",
                        shown(tenant)
                    ))
                })?,
            };
            if self.lookup(key).is_some() {
                return Err(bad(format!(
                    "the key of tenant {} is already listed (each key must be unique)",
                    shown(tenant)
                )));
            }
            let bucket = self.hasher.hash_one(key.as_bytes());
            self.buckets.entry(bucket).or_default().push((
                key.as_bytes().to_vec(),
                KeyOwner {
                    tenant: tenant.to_string(),
                    tier,
                },
            ));
            self.count += 1;
        }
        Ok(())
    }

    /// The owner of `key`, if it is listed.
    pub fn lookup(&self, key: &str) -> Option<&KeyOwner> {
        let bucket = self.hasher.hash_one(key.as_bytes());
        let mut found = None;
        // Compare every candidate in full, whatever matched, so the time does not depend on
        // which one (if any) equals the key.
        for (k, owner) in self.buckets.get(&bucket)? {
            if constant_time_eq(k, key.as_bytes()) {
                found = Some(owner);
            }
        }
        found
    }

    /// Keys listed.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no key is listed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Every key file of `dir`, sorted by name, with its text: the Secret's entries, skipping
/// hidden files and Kubernetes' `..data` links (the entries are links through `..data`,
/// which the kubelet swaps atomically when the Secret changes).
pub fn read_key_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(io(&file))?;
            Ok((file, text))
        })
        .collect()
}

/// The keys of a mounted Secret, re-read while the frontend runs: a changed Secret (the
/// kubelet refreshes the volume) takes effect without a restart, a removed key stops
/// working, and a broken edit keeps the last good keys (and is logged, naming the file
/// and line).
pub struct LiveKeys {
    dir: PathBuf,
    tiers: Vec<String>,
    default_tier: Option<String>,
    ring: std::sync::RwLock<std::sync::Arc<KeyRing>>,
    /// Digest of the files the ring was built from (or last refused).
    seen: std::sync::Mutex<u64>,
}

impl std::fmt::Debug for LiveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKeys")
            .field("dir", &self.dir)
            .field("ring", &*self.ring())
            .finish_non_exhaustive()
    }
}

/// What [`LiveKeys::reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// New keys are in use: how many.
    Reloaded(usize),
    /// The files changed but do not parse; the previous keys stay.
    Refused(String),
}

impl LiveKeys {
    /// Loads the keys of `dir` (a start-up failure is an error: no keys, no frontend).
    pub fn load(
        dir: &Path,
        tiers: Vec<String>,
        default_tier: Option<String>,
    ) -> Result<Self, KeyError> {
        let files = read_key_files(dir)?;
        let ring = KeyRing::from_files(&files, &tiers, default_tier.as_deref())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tiers,
            default_tier,
            ring: std::sync::RwLock::new(std::sync::Arc::new(ring)),
            seen: std::sync::Mutex::new(digest(&files)),
        })
    }

    /// The keys in use.
    pub fn ring(&self) -> std::sync::Arc<KeyRing> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the directory; swaps the keys in if the files changed and parse.
    pub fn reload(&self) -> Reload {
        let files = match read_key_files(&self.dir) {
            Ok(files) => files,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        let now = digest(&files);
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *seen == now {
            return Reload::Unchanged;
        }
        *seen = now;
        match KeyRing::from_files(&files, &self.tiers, self.default_tier.as_deref()) {
            Ok(ring) => {
                let count = ring.len();
                *self
                    .ring
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(ring);
                Reload::Reloaded(count)
            }
            Err(e) => Reload::Refused(e.to_string()),
        }
    }
}

/// A change detector over the files' names and texts (not a security boundary).
fn digest(files: &[(PathBuf, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What a request's `authorization` metadata holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer<'a> {
    /// No `authorization` entry.
    Missing,
    /// An entry that is not `Bearer <key>` (another scheme, a bare key, not ASCII).
    Malformed,
    /// The key of `Bearer <key>`.
    Key(&'a str),
}

/// The key in `authorization: Bearer <key>` metadata, or why there is none.
pub fn bearer(headers: &http::HeaderMap) -> Bearer<'_> {
    let Some(value) = headers.get("authorization") else {
        return Bearer::Missing;
    };
    let key = value.to_str().ok().and_then(|v| {
        let (scheme, key) = v.split_once(' ')?;
        let key = key.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
    });
    key.map_or(Bearer::Malformed, Bearer::Key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> Vec<String> {
        vec!["free".into(), "pro".into()]
    }

    #[test]
    fn lines_map_keys_to_tenants_and_tiers() {
        let mut ring = KeyRing::empty();
        ring.add_text(
            Path::new("keys"),
            "# comment\n\nacme:aaaaaaaaaaaaaaaa1:pro\nbeta:bbbbbbbbbbbbbbbb2 # default tier\nacme:aaaaaaaaaaaaaaaa3:free\n",
            &tiers(),
            Some("free"),
        )
        .expect("valid");
        assert_eq!(ring.len(), 3);
        let owner = ring.lookup("aaaaaaaaaaaaaaaa1").expect("listed");
        assert_eq!(
            (owner.tenant.as_str(), owner.tier.as_str()),
            ("acme", "pro")
        );
        assert_eq!(
            ring.lookup("bbbbbbbbbbbbbbbb2").map(|o| o.tier.as_str()),
            Some("free")
        );
        assert!(
            ring.lookup("bbbbbbbbbbbbbbbb").is_none(),
            "a prefix is not a key"
        );
        assert!(ring.lookup("").is_none());
    }

    #[test]
    fn bad_lines_name_the_line_never_the_key() {
        let cases = [
            ("acme:short", "at least 16 characters"),
            ("acme:cccccccccccccccc4:gold", "tier \"gold\""),
            ("a b:cccccccccccccccc4", "tenant \"a b\""),
            ("acme:cccccccccccccccc4:pro:x", "cannot contain ':'"),
            ("acme", "expected TENANT:KEY"),
            // Fields out of order: the key where the tenant or the tier belongs.
            ("cccccccccccccccc4:pro", "\"cc…\" (17 characters"),
            ("acme:pro:cccccccccccccccc4", "at least 16 characters"),
            ("acme:dddddddddddddddd6:cccccccccccccccc4", "tier \"cc…\""),
        ];
        for (line, want) in cases {
            let mut ring = KeyRing::empty();
            let e = ring
                .add_text(
                    Path::new("keys"),
                    &format!("\n{line}\n"),
                    &tiers(),
                    Some("free"),
                )
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("API keys keys:2: ") && e.contains(want),
                "{line}: {e}"
            );
            assert!(!e.contains("cccccccccccccccc4"), "the key leaked: {e}");
        }
        let mut ring = KeyRing::empty();
        let e = ring
            .add_text(
                Path::new("k"),
                "a:dddddddddddddddd5\nb:dddddddddddddddd5\n",
                &tiers(),
                Some("free"),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("k:2") && e.contains("already listed"), "{e}");
        let e = KeyRing::empty()
            .add_text(Path::new("k"), "a:dddddddddddddddd5\n", &tiers(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no default tier"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Any line made of key-like, name-like and junk fields in any order: loaded, or an
        /// error naming the file and line that quotes no key-like field in full.
        #[test]
        fn no_error_quotes_a_key(
            fields in proptest::collection::vec(
                proptest::prop_oneof!["[a-z]{1,8}", "[A-Za-z0-9_-]{16,40}", "[ -~]{0,20}"],
                0..5,
            )
        ) {
            let line = fields.join(":");
            let mut ring = KeyRing::empty();
            if let Err(e) = ring.add_text(Path::new("keys"), &line, &tiers(), Some("free")) {
                let e = e.to_string();
                proptest::prop_assert!(e.starts_with("API keys keys:1: "), "{}", e);
                for f in fields.iter().map(|f| f.trim()).filter(|f| f.chars().count() >= MIN_KEY_LEN) {
                    proptest::prop_assert!(!e.contains(f), "{} quoted in {}", f, e);
                }
            }
        }
    }

    #[test]
    fn bearer_metadata() {
        let mut m = http::HeaderMap::new();
        assert_eq!(bearer(&m), Bearer::Missing);
        m.insert("authorization", "Bearer  abc ".parse().expect("ascii"));
        assert_eq!(bearer(&m), Bearer::Key("abc"));
        for malformed in [
            "Basic abc",
            "abcdefghijklmnopqrstuvwxyz",
            "Bearer ",
            "Bearer",
        ] {
            m.insert("authorization", malformed.parse().expect("ascii"));
            assert_eq!(bearer(&m), Bearer::Malformed, "{malformed:?}");
        }
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn live_keys_pick_up_a_changed_directory_and_keep_the_last_good_keys() {
        let dir = std::env::temp_dir().join(format!("switchyard-live-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tenants"), "a:aaaaaaaaaaaaaaaa1\n").expect("write");
        let keys = LiveKeys::load(&dir, tiers(), Some("free".into())).expect("load");
        assert!(keys.ring().lookup("aaaaaaaaaaaaaaaa1").is_some());
        assert_eq!(keys.reload(), Reload::Unchanged);
        // Rotation: a new key added, the old one removed.
        std::fs::write(dir.join("tenants"), "a:bbbbbbbbbbbbbbbb2\n").expect("write");
        assert_eq!(keys.reload(), Reload::Reloaded(1));
        assert!(
            keys.ring().lookup("aaaaaaaaaaaaaaaa1").is_none(),
            "removed key"
        );
        assert!(keys.ring().lookup("bbbbbbbbbbbbbbbb2").is_some(), "new key");
        // A broken edit: refused, naming the line; the last good keys stay.
        std::fs::write(dir.join("tenants"), "a:short\n").expect("write");
        match keys.reload() {
            Reload::Refused(why) => assert!(why.contains("tenants:1"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(keys.ring().lookup("bbbbbbbbbbbbbbbb2").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_of_secret_entries() {
        let dir = std::env::temp_dir().join(format!("switchyard-keys-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..data")).expect("dir");
        std::fs::write(dir.join("team-a"), "a:eeeeeeeeeeeeeeee6:pro\n").expect("write");
        std::fs::write(dir.join("team-b"), "b:ffffffffffffffff7\n").expect("write");
        std::fs::write(dir.join(".hidden"), "not a key file").expect("write");
        let ring = KeyRing::load(&dir, &tiers(), Some("free")).expect("load");
        assert_eq!(ring.len(), 2);
        assert_eq!(format!("{ring:?}"), "KeyRing { keys: 2, .. }");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
