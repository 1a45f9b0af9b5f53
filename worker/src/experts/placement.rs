//! Which routed experts an expert shard holds.
//!
//! Three sources, in the order a shard looks for them:
//! - a **placement file** (`--placement FILE`), JSON, for the whole deployment:
//!   ```json
//!   { "revision": "r7",
//!     "shards": [ { "experts": { "*": "0-31" } },
//!                 { "experts": { "*": "32-63", "5": "0-3,40-63" } } ] }
//!   ```
//!   `shards[i]` is shard `i`'s assignment: per MoE layer (its decoder index as a string,
//!   or `"*"` for every MoE layer not listed) a list of expert ids and inclusive ranges.
//!   The same expert on several shards is a replica. The file is re-read while the shard
//!   runs, so a changed placement takes effect without a restart. An entry may also list
//!   `"draining"` experts, in the same form: ones it still serves while a move hands them
//!   to other shards (make-before-break, below), not advertised as its own.
//! - the operator's **even spread** (`worker.json`: `placement.strategy: evenSpread` over
//!   `shards.count`): contiguous near-equal blocks of every MoE layer's experts. A shard
//!   whose index is past the count (`spec.experts.replicaShards`) copies block
//!   `index mod count`.
//! - the operator's **balanced** placement (`worker.json`: `placement.strategy: balanced`
//!   and `placement.file`): a placement file the operator rewrites from the measured
//!   expert load, as above. Until the file exists, or while it lists another number of
//!   shards than `shards.count` (the count just changed), the even spread; a copy
//!   (`replicaShards`) takes entry `index mod count`.
//! - nothing: the shard holds every routed expert (single-shard setups and tests).
//!
//! Every id is checked against the checkpoint: an expert it lacks, or a layer that is not
//! a MoE layer, stops the shard with a message naming it.
//!
//! **Moving experts without losing a call** takes two revisions of the file. First the
//! new placement, with every expert a shard loses listed under its `draining`: each shard
//! loads what it gains and keeps what it loses; `Describe` advertises the new set, plus
//! the draining one apart, and frontends send a draining expert to its old shard only
//! while no shard advertises it. Once every shard reports the revision (and the frontends
//! have asked every shard again: they do each second), the second revision drops `draining` and the
//! shards free those weights. During the move a shard holds at most its old set and its
//! new one together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::ModelConfig;

/// Where a shard's assignment comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementSource {
    /// Every routed expert.
    All,
    /// Entry `shard` of a placement file.
    File {
        /// The file (re-read on change).
        path: PathBuf,
        /// This shard's index in `shards`.
        shard: u32,
    },
    /// The operator's even spread of every MoE layer over `shards` shards.
    EvenSpread {
        /// Shards in the deployment.
        shards: u32,
        /// This shard's index.
        shard: u32,
        /// The placement revision the operator wrote.
        revision: String,
    },
    /// The operator's balanced placement: entry `shard mod n` of the file at `path`, `n`
    /// its entries, when it exists; the even spread over `shards` until then. The file's
    /// count, not worker.json's, decides: a shard-count change rolls no shard pod, and the
    /// operator moves experts between the running ones through the file (a pod added before
    /// the file lists it copies entry `shard mod n` meanwhile).
    Balanced {
        /// The file the operator rewrites (re-read on change).
        path: PathBuf,
        /// Shards in the deployment when this pod started (the even spread's count).
        shards: u32,
        /// This shard's index.
        shard: u32,
        /// The even spread's revision (worker.json's).
        revision: String,
    },
}

/// What one shard holds: per MoE layer, the expert ids, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Reported by `Describe`; empty when every expert is held without a placement.
    pub revision: String,
    /// Layer → experts assigned (advertised by `Describe`).
    pub layers: BTreeMap<usize, BTreeSet<u32>>,
    /// Layer → experts still served while a move hands them to other shards, disjoint
    /// from `layers` (an expert listed in both is assigned).
    pub draining: BTreeMap<usize, BTreeSet<u32>>,
}

impl Assignment {
    /// Whether `(layer, expert)` is assigned.
    pub fn holds(&self, layer: usize, expert: u32) -> bool {
        self.layers.get(&layer).is_some_and(|e| e.contains(&expert))
    }

    /// Whether `(layer, expert)` is assigned or draining: whether `Forward` computes it.
    pub fn serves(&self, layer: usize, expert: u32) -> bool {
        self.holds(layer, expert)
            || self
                .draining
                .get(&layer)
                .is_some_and(|e| e.contains(&expert))
    }

    /// `(layer, expert)` pairs assigned.
    pub fn len(&self) -> usize {
        self.layers.values().map(BTreeSet::len).sum()
    }

    /// `(layer, expert)` pairs whose weights are held: assigned or draining.
    pub fn held(&self) -> usize {
        self.len() + self.draining.values().map(BTreeSet::len).sum::<usize>()
    }

    /// Whether nothing is assigned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a placement cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The file could not be read.
    #[error("placement file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid, or names something the checkpoint lacks.
    #[error("placement file {}: {message}", path.display())]
    Invalid {
        /// The file (or `worker.json` for the even spread).
        path: PathBuf,
        /// Which field, what was found and what is accepted.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    revision: String,
    shards: Vec<ShardEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardEntry {
    experts: BTreeMap<String, String>,
    #[serde(default)]
    draining: BTreeMap<String, String>,
}

impl PlacementSource {
    /// The assignment for `cfg`'s model, checked against it.
    pub fn resolve(&self, cfg: &ModelConfig) -> Result<Assignment, PlacementError> {
        let moe_layers = moe_layers(cfg);
        let num_experts = cfg.moe.as_ref().map_or(0, |m| m.num_experts) as u32;
        match self {
            PlacementSource::All => Ok(Assignment {
                revision: String::new(),
                layers: moe_layers
                    .iter()
                    .map(|&l| (l, (0..num_experts).collect()))
                    .collect(),
                draining: BTreeMap::new(),
            }),
            PlacementSource::EvenSpread {
                shards,
                shard,
                revision,
            } => {
                let invalid = |message: String| PlacementError::Invalid {
                    path: PathBuf::from("worker.json"),
                    message,
                };
                if *shards == 0 {
                    return Err(invalid("shards.count is 0: no shard to spread over".into()));
                }
                // Shards past the count (`experts.replicaShards`) copy a block: shard k
                // holds block k mod count, so every pod added is one more holder of one
                // block's experts, and the frontends spread rows over the holders.
                let block = switchyard_proto::worker_config::even_block(
                    num_experts,
                    *shards,
                    *shard % *shards,
                );
                Ok(Assignment {
                    revision: revision.clone(),
                    layers: moe_layers
                        .iter()
                        .map(|&l| (l, block.clone().collect()))
                        .filter(|(_, e): &(usize, BTreeSet<u32>)| !e.is_empty())
                        .collect(),
                    draining: BTreeMap::new(),
                })
            }
            PlacementSource::File { path, shard } => {
                let text = std::fs::read_to_string(path).map_err(|source| PlacementError::Io {
                    path: path.clone(),
                    source,
                })?;
                parse(path, &text, *shard, cfg)
            }
            PlacementSource::Balanced {
                path,
                shards,
                shard,
                revision,
            } => {
                let even = || {
                    PlacementSource::EvenSpread {
                        shards: *shards,
                        shard: *shard,
                        revision: revision.clone(),
                    }
                    .resolve(cfg)
                };
                let text = match std::fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return even(),
                    Err(source) => {
                        return Err(PlacementError::Io {
                            path: path.clone(),
                            source,
                        });
                    }
                };
                let entries = serde_json::from_str::<PlacementFile>(&text)
                    .map(|f| f.shards.len())
                    .map_err(|e| PlacementError::Invalid {
                        path: path.clone(),
                        message: format!("not valid: {e}"),
                    })?;
                if entries == 0 {
                    return Err(PlacementError::Invalid {
                        path: path.clone(),
                        message: "shards is empty: no entry to hold".into(),
                    });
                }
                let entries = u32::try_from(entries).unwrap_or(u32::MAX);
                parse(path, &text, *shard % entries, cfg)
            }
        }
    }

    /// The file re-read while the shard runs, if the placement comes from one.
    pub fn watched_file(&self) -> Option<&Path> {
        match self {
            PlacementSource::File { path, .. } | PlacementSource::Balanced { path, .. } => {
                Some(path)
            }
            PlacementSource::All | PlacementSource::EvenSpread { .. } => None,
        }
    }
}

fn moe_layers(cfg: &ModelConfig) -> Vec<usize> {
    cfg.moe.as_ref().map_or_else(Vec::new, |m| {
        m.sparse_layers
            .iter()
            .enumerate()
            .filter(|(_, s)| **s)
            .map(|(l, _)| l)
            .collect()
    })
}

/// Shard `shard`'s assignment from a placement file's text.
pub fn parse(
    path: &Path,
    text: &str,
    shard: u32,
    cfg: &ModelConfig,
) -> Result<Assignment, PlacementError> {
    let invalid = |message: String| PlacementError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let file: PlacementFile =
        serde_json::from_str(text).map_err(|e| invalid(format!("not valid: {e}")))?;
    let entry = file.shards.get(shard as usize).ok_or_else(|| {
        invalid(format!(
            "shards has {} entries; this is shard {shard}",
            file.shards.len()
        ))
    })?;
    let layers =
        layer_map(&entry.experts, &format!("shards[{shard}].experts"), cfg).map_err(invalid)?;
    let mut draining =
        layer_map(&entry.draining, &format!("shards[{shard}].draining"), cfg).map_err(invalid)?;
    for (layer, experts) in &mut draining {
        if let Some(held) = layers.get(layer) {
            experts.retain(|e| !held.contains(e));
        }
    }
    draining.retain(|_, e| !e.is_empty());
    Ok(Assignment {
        revision: file.revision,
        layers,
        draining,
    })
}

/// One entry's layer → expert lists (`field` names it in errors), `"*"` expanded to every
/// MoE layer not listed, empty layers dropped.
fn layer_map(
    entry: &BTreeMap<String, String>,
    field: &str,
    cfg: &ModelConfig,
) -> Result<BTreeMap<usize, BTreeSet<u32>>, String> {
    let moe_layers = moe_layers(cfg);
    let num_experts = cfg.moe.as_ref().map_or(0, |m| m.num_experts) as u32;
    let mut layers = BTreeMap::new();
    let mut default = None;
    for (key, list) in entry {
        let field = format!("{field}[{key:?}]");
        let experts = parse_ids(list, num_experts).map_err(|e| format!("{field}: {e}"))?;
        if key == "*" {
            default = Some(experts);
            continue;
        }
        let layer: usize = key
            .parse()
            .map_err(|_| format!("{field}: a layer is a decoder layer index or \"*\""))?;
        if !moe_layers.contains(&layer) {
            return Err(format!(
                "{field}: layer {layer} is not a MoE layer of this checkpoint (MoE layers: {})",
                describe_layers(&moe_layers)
            ));
        }
        layers.insert(layer, experts);
    }
    if let Some(default) = default {
        for &l in &moe_layers {
            layers.entry(l).or_insert_with(|| default.clone());
        }
    }
    layers.retain(|_, e| !e.is_empty());
    Ok(layers)
}

/// `"0-3,7,9-10"` → {0, 1, 2, 3, 7, 9, 10}, every id below `experts` (checked before a
/// range is expanded, so `"0-4294967295"` is an error, not four billion entries).
pub fn parse_ids(list: &str, experts: u32) -> Result<BTreeSet<u32>, String> {
    let missing = |bad: u32| {
        format!(
            "expert {bad} does not exist: the checkpoint has {experts} routed experts per layer (0-{})",
            experts.saturating_sub(1)
        )
    };
    let mut ids = BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim().parse::<u32>().map_err(|_| {
                format!("{s:?} is not an expert id (expected ids and ranges like \"0-7,12\")")
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("range {part:?} is empty (start above end)"));
                }
                if b >= experts {
                    return Err(missing(b));
                }
                ids.extend(a..=b);
            }
            None => {
                let id = number(part)?;
                if id >= experts {
                    return Err(missing(id));
                }
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

fn describe_layers(layers: &[usize]) -> String {
    match (layers.first(), layers.last()) {
        (Some(a), Some(b)) if layers.len() == b - a + 1 => format!("{a}-{b}"),
        _ => layers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{RawConfig, resolve};

    /// 4 layers, the first dense, 8 experts.
    fn cfg() -> ModelConfig {
        let raw: RawConfig = serde_json::from_value(serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "moe_intermediate_size": 24, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
            "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
            "v_head_dim": 8, "n_group": 4, "topk_group": 2
        }))
        .expect("raw");
        resolve(Path::new("config.json"), raw).expect("valid")
    }

    #[test]
    fn file_with_default_and_per_layer_entries() {
        let text = r#"{"revision": "r1", "shards": [
            {"experts": {"*": "0-3"}},
            {"experts": {"*": "4-7", "2": "0,6-7"}}]}"#;
        let a = parse(Path::new("p.json"), text, 1, &cfg()).expect("valid");
        assert_eq!(a.revision, "r1");
        assert_eq!(a.layers[&1], BTreeSet::from([4, 5, 6, 7]));
        assert_eq!(a.layers[&2], BTreeSet::from([0, 6, 7]));
        assert!(!a.layers.contains_key(&0), "layer 0 is dense");
        assert_eq!(a.len(), 4 + 3 + 4);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Any expert list: an error, or ids the checkpoint has; never a panic or a huge
        /// set.
        #[test]
        fn any_expert_list_parses_or_is_refused(list in "[0-9, -]{0,24}") {
            if let Ok(ids) = parse_ids(&list, 8) {
                proptest::prop_assert!(ids.iter().all(|e| *e < 8));
            }
        }

        /// Any placement file text (valid JSON shapes with arbitrary lists and layer keys,
        /// and arbitrary text): an error naming the file, or an assignment inside the
        /// checkpoint.
        #[test]
        fn any_placement_file_parses_or_is_refused(
            key in "[*0-9a-z]{0,4}", list in "[0-9, -]{0,16}", shard in 0u32..3, junk in ".{0,40}"
        ) {
            let text = format!(
                r#"{{"revision": "r", "shards": [{{"experts": {{"{key}": "{list}"}}}}]}}"#
            );
            for text in [text.as_str(), junk.as_str()] {
                match parse(Path::new("p.json"), text, shard, &cfg()) {
                    Ok(a) => proptest::prop_assert!(a
                        .layers
                        .iter()
                        .all(|(l, e)| (1..4).contains(l) && e.iter().all(|x| *x < 8))),
                    Err(e) => proptest::prop_assert!(e.to_string().contains("p.json")),
                }
            }
        }
    }

    #[test]
    fn draining_experts_are_served_not_assigned() {
        let text = r#"{"revision": "r2", "shards": [
            {"experts": {"*": "4-7"}, "draining": {"*": "0-4", "3": "1"}}]}"#;
        let a = parse(Path::new("p.json"), text, 0, &cfg()).expect("valid");
        assert_eq!(a.layers[&1], BTreeSet::from([4, 5, 6, 7]));
        // An expert both assigned and draining is assigned.
        assert_eq!(a.draining[&1], BTreeSet::from([0, 1, 2, 3]));
        assert_eq!(a.draining[&3], BTreeSet::from([1]));
        assert!(a.serves(1, 0) && !a.holds(1, 0) && a.holds(1, 4) && !a.serves(3, 0));
        assert_eq!((a.len(), a.held()), (12, 12 + 4 + 4 + 1));
        let text = r#"{"revision": "r2", "shards": [{"experts": {}, "draining": {"*": "9"}}]}"#;
        let e = parse(Path::new("p.json"), text, 0, &cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shards[0].draining[\"*\"]: expert 9 does not exist"),
            "{e}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]

        /// Any shard count and index, as `--shard-count`/`--shard-index` or worker.json
        /// can give them: an error, or a block of existing experts, at once. (Before, the
        /// list of every shard's block was built first: 4 billion shards ran out of
        /// memory.)
        #[test]
        fn any_even_spread_resolves_without_a_list_per_shard(
            shards in proptest::prop_oneof![0u32..20, proptest::prelude::any::<u32>()],
            shard in proptest::prop_oneof![0u32..20, proptest::prelude::any::<u32>()],
        ) {
            let src = PlacementSource::EvenSpread { shards, shard, revision: "r".into() };
            match src.resolve(&cfg()) {
                Ok(a) => proptest::prop_assert!(a.layers.values().all(|e| e.len() <= 8 && e.iter().all(|x| *x < 8))),
                Err(e) => proptest::prop_assert!(shards == 0 && e.to_string().contains("shards.count")),
            }
        }
    }

    #[test]
    fn an_expert_the_checkpoint_lacks_is_named() {
        let text = r#"{"revision": "r1", "shards": [{"experts": {"*": "0-8"}}]}"#;
        let e = parse(Path::new("p.json"), text, 0, &cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expert 8 does not exist") && e.contains("8 routed experts per layer (0-7)"),
            "{e}"
        );
        let text = r#"{"revision": "r1", "shards": [{"experts": {"0": "1"}}]}"#;
        let e = parse(Path::new("p.json"), text, 0, &cfg())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 0 is not a MoE layer") && e.contains("1-3"),
            "{e}"
        );
        let e = parse(Path::new("p.json"), text, 3, &cfg())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shards has 1 entries; this is shard 3"), "{e}");
        assert!(parse_ids("3-1", 8).unwrap_err().contains("empty"));
        assert!(parse_ids("a", 8).unwrap_err().contains("not an expert id"));
        // A huge range is refused before it is expanded.
        assert!(
            parse_ids("0-4294967295", 8)
                .unwrap_err()
                .contains("expert 4294967295 does not exist")
        );
        assert!(parse_ids("8", 8).unwrap_err().contains("0-7"));
    }

    #[test]
    fn even_spread_and_all() {
        let src = PlacementSource::EvenSpread {
            shards: 3,
            shard: 2,
            revision: "abc".into(),
        };
        let a = src.resolve(&cfg()).expect("valid");
        assert_eq!(a.layers[&3], BTreeSet::from([6, 7]));
        assert_eq!(a.revision, "abc");
        // A shard past the count copies block index mod count.
        let copy = PlacementSource::EvenSpread {
            shards: 3,
            shard: 5,
            revision: "abc".into(),
        };
        assert_eq!(
            copy.resolve(&cfg()).expect("valid").layers[&3],
            a.layers[&3]
        );
        let all = PlacementSource::All.resolve(&cfg()).expect("valid");
        assert_eq!(all.len(), 3 * 8);
        assert!(all.holds(1, 7) && !all.holds(0, 0));
    }

    #[test]
    fn the_balanced_source_holds_the_even_spread_until_the_operator_writes_its_file() {
        let dir = std::env::temp_dir().join(format!("balanced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("placement.json");
        let _ = std::fs::remove_file(&path);
        let src = |shard| PlacementSource::Balanced {
            path: path.clone(),
            shards: 2,
            shard,
            revision: "even".into(),
        };
        assert_eq!(src(0).watched_file(), Some(path.as_path()));
        // No file yet: the even spread, under worker.json's revision.
        let a = src(1).resolve(&cfg()).expect("valid");
        assert_eq!(
            (a.revision.as_str(), &a.layers[&3]),
            ("even", &BTreeSet::from([4, 5, 6, 7]))
        );
        // The file's count decides, not the count this pod started with: a file for 3
        // shards (the count grew) gives shard 1 entry 1, and a pod past it (index 4) entry
        // 4 mod 3.
        std::fs::write(
            &path,
            r#"{"revision": "b1", "shards": [{"experts": {"*": "0-7"}}, {"experts": {"*": "1-7"}}, {"experts": {"*": "0"}}]}"#,
        )
        .expect("write");
        let grown = src(1).resolve(&cfg()).expect("valid");
        assert_eq!(
            (grown.revision.as_str(), &grown.layers[&3]),
            ("b1", &BTreeSet::from([1, 2, 3, 4, 5, 6, 7]))
        );
        assert_eq!(src(4).resolve(&cfg()).expect("valid"), grown);
        // The operator's file for 2 shards: entry `shard`, and a copy takes entry `shard mod 2`.
        std::fs::write(
            &path,
            r#"{"revision": "b2", "shards": [{"experts": {"*": "0-4"}}, {"experts": {"*": "0,5-7"}, "draining": {"*": "4"}}]}"#,
        )
        .expect("write");
        let b = src(1).resolve(&cfg()).expect("valid");
        assert_eq!(b.revision, "b2");
        assert_eq!(b.layers[&3], BTreeSet::from([0, 5, 6, 7]));
        assert_eq!(b.draining[&3], BTreeSet::from([4]));
        assert_eq!(
            src(3).resolve(&cfg()).expect("valid"),
            b,
            "a copy of shard 1"
        );
        // A file with no entry, or a broken one, is an error (the running shard keeps
        // what it holds).
        std::fs::write(&path, r#"{"revision": "b3", "shards": []}"#).expect("write");
        assert!(
            src(0)
                .resolve(&cfg())
                .unwrap_err()
                .to_string()
                .contains("shards is empty")
        );
        std::fs::write(&path, "{").expect("write");
        assert!(
            src(0)
                .resolve(&cfg())
                .unwrap_err()
                .to_string()
                .contains("not valid")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
