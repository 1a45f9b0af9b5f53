//! Routers: router logits → the experts each token goes to and their weights ([`Routes`]).
//! Pure functions of the logits, one [`RouterRule`] per routing method, written to match
//! Hugging Face `transformers` exactly (the checkpoints are validated with it). A leaf
//! module: the config resolves the rule, the MoE block feeds it logits, the expert backends
//! consume its [`Routes`].
//!
//! | rule | scores | selection | weights |
//! |---|---|---|---|
//! | `Softmax` (Mixtral, Qwen-MoE, OLMoE) | softmax | top-k | renormalised iff `norm_topk_prob` |
//! | `DeepSeekV2` | softmax | top-k, or top-k inside the `topk_group` groups with the highest max score | × `routed_scaling_factor` (transformers never renormalises V2) |
//! | `DeepSeekV3` | sigmoid | score + `e_score_correction_bias`; groups ranked by the sum of their top-2 biased scores; top-k inside the kept groups | the *unbiased* scores, renormalised iff `norm_topk_prob`, then always × `routed_scaling_factor` |
//!
//! Dropped groups are masked as transformers 5.24 masks them: `0.0` for V2 (its softmax
//! scores are positive, so it makes no difference) and `-inf` for V3, where it does: with
//! `0.0`, a dropped expert beats kept ones whose biased scores are negative. Ties go to the
//! lower expert index.

/// How a sparse layer turns router logits into routes: resolved from `config.json` and the
/// family's defaults by `model::config`, run here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterRule {
    /// Softmax over the experts, top-k.
    Softmax {
        /// Renormalise the chosen probabilities to sum to one.
        norm_topk_prob: bool,
    },
    /// DeepSeek-V2: softmax, `greedy` or `group_limited_greedy`.
    DeepSeekV2 {
        /// Multiplier of the chosen probabilities (never renormalised, as in transformers).
        routed_scaling_factor: f32,
        /// `Some((n_group, topk_group))` for `group_limited_greedy`.
        groups: Option<(usize, usize)>,
    },
    /// DeepSeek-V3 (`noaux_tc`): sigmoid scores, a per-expert correction bias for
    /// selection only, group-limited top-k.
    DeepSeekV3 {
        /// Renormalise the chosen (unbiased) scores.
        norm_topk_prob: bool,
        /// Always multiplies the final weights.
        routed_scaling_factor: f32,
        /// Groups of experts.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
    },
}

impl RouterRule {
    /// Whether the rule reads a per-layer `e_score_correction_bias`.
    pub fn has_correction_bias(&self) -> bool {
        matches!(self, Self::DeepSeekV3 { .. })
    }
}

/// One layer's router: its rule, how many experts each token gets, and (DeepSeek-V3) the
/// layer's correction bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    /// The rule.
    pub rule: RouterRule,
    /// Experts per token.
    pub top_k: usize,
    /// `e_score_correction_bias`, one per expert, when the rule has one.
    pub correction_bias: Vec<f32>,
}

impl Router {
    /// Routes every row of `logits` (`rows × num_experts`, row-major, f32).
    pub fn route(&self, logits: &[f32], num_experts: usize) -> Routes {
        let top_k = self.top_k;
        let rows = logits.len() / num_experts.max(1);
        let mut experts = Vec::with_capacity(rows * top_k);
        let mut weights = Vec::with_capacity(rows * top_k);
        let mut scores = vec![0f32; num_experts];
        let mut choice = vec![0f32; num_experts];
        for row in logits.chunks_exact(num_experts) {
            match self.rule {
                RouterRule::Softmax { .. } | RouterRule::DeepSeekV2 { .. } => {
                    softmax_into(row, &mut scores);
                    choice.copy_from_slice(&scores);
                }
                RouterRule::DeepSeekV3 { .. } => {
                    for (i, (s, c)) in scores.iter_mut().zip(&mut choice).enumerate() {
                        *s = 1.0 / (1.0 + (-row[i]).exp());
                        *c = *s + self.correction_bias.get(i).copied().unwrap_or(0.0);
                    }
                }
            }
            match self.rule {
                RouterRule::DeepSeekV2 {
                    groups: Some((n_group, topk_group)),
                    ..
                } => mask_groups(&mut choice, n_group, topk_group, GroupScore::Max, 0.0),
                RouterRule::DeepSeekV3 {
                    n_group,
                    topk_group,
                    ..
                } => mask_groups(
                    &mut choice,
                    n_group,
                    topk_group,
                    GroupScore::SumTop2,
                    f32::NEG_INFINITY,
                ),
                _ => {}
            }
            let chosen = top_indices(&choice, top_k);
            // Weights come from the unbiased scores, in the order chosen.
            let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
            let (norm, scale) = match self.rule {
                RouterRule::Softmax { norm_topk_prob } => (norm_topk_prob, None),
                // transformers' V2 router never renormalises (it does not read
                // norm_topk_prob) and always scales; DeepSeek's own code renormalises when
                // norm_topk_prob is set and then does not scale. The two agree on every
                // published V2 checkpoint (norm_topk_prob false); we follow transformers.
                RouterRule::DeepSeekV2 {
                    routed_scaling_factor,
                    ..
                } => (false, Some(routed_scaling_factor)),
                RouterRule::DeepSeekV3 {
                    norm_topk_prob,
                    routed_scaling_factor,
                    ..
                } => (norm_topk_prob, Some(routed_scaling_factor)),
            };
            if norm {
                let eps = if matches!(self.rule, RouterRule::Softmax { .. }) {
                    0.0
                } else {
                    1e-20
                };
                let sum: f32 = w.iter().sum::<f32>() + eps;
                w.iter_mut().for_each(|x| *x /= sum);
            }
            if let Some(s) = scale {
                w.iter_mut().for_each(|x| *x *= s);
            }
            experts.extend(chosen.iter().map(|&e| e as u32));
            weights.extend(w);
        }
        Routes {
            top_k,
            experts,
            weights,
        }
    }
}

/// The experts chosen for each row of a batch: `top_k` `(expert, weight)` pairs per row,
/// flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    /// Experts per row.
    pub top_k: usize,
    /// `experts[row * top_k + j]`.
    pub experts: Vec<u32>,
    /// `weights[row * top_k + j]`, the multiplier of that expert's output.
    pub weights: Vec<f32>,
}

impl Routes {
    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Every `(row, expert, weight)`, row-major.
    pub fn pairs(&self) -> impl Iterator<Item = (u32, u32, f32)> + '_ {
        self.experts
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (&e, &w))| ((i / self.top_k) as u32, e, w))
    }

    /// For each expert that has work: the rows it serves and their weights, experts in
    /// ascending order and rows in batch order (the fixed order partial sums are added in).
    pub fn by_expert(&self, num_experts: usize) -> Vec<ExpertRows> {
        group_by_expert(self.pairs(), num_experts)
    }
}

/// One expert's share of a batch: `(expert, rows, weights)`.
pub type ExpertRows = (u32, Vec<u32>, Vec<f32>);

/// Groups `(row, expert, weight)` pairs by expert: experts ascending, rows in the order
/// given. Experts `>= num_experts` are left out.
pub fn group_by_expert(
    pairs: impl Iterator<Item = (u32, u32, f32)>,
    num_experts: usize,
) -> Vec<ExpertRows> {
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_experts];
    let mut weights: Vec<Vec<f32>> = vec![Vec::new(); num_experts];
    for (row, e, w) in pairs {
        let e = e as usize;
        if e < num_experts {
            rows[e].push(row);
            weights[e].push(w);
        }
    }
    rows.into_iter()
        .zip(weights)
        .enumerate()
        .filter(|(_, (r, _))| !r.is_empty())
        .map(|(e, (r, w))| (e as u32, r, w))
        .collect()
}

#[derive(Clone, Copy)]
enum GroupScore {
    /// V2: a group's best expert.
    Max,
    /// V3: the sum of a group's two best experts.
    SumTop2,
}

/// Keeps the `keep` best of `n_group` equal groups of `scores`; the others' scores become
/// `fill`.
fn mask_groups(scores: &mut [f32], n_group: usize, keep: usize, how: GroupScore, fill: f32) {
    // A config whose experts do not split into `n_group` groups is refused at load time.
    if n_group <= 1 || keep >= n_group || !scores.len().is_multiple_of(n_group) {
        return;
    }
    let size = scores.len() / n_group;
    let group_scores: Vec<f32> = scores
        .chunks_exact(size)
        .map(|g| match how {
            GroupScore::Max => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            GroupScore::SumTop2 => top_indices(g, 2.min(size)).iter().map(|&i| g[i]).sum(),
        })
        .collect();
    let kept = top_indices(&group_scores, keep);
    for (gi, g) in scores.chunks_exact_mut(size).enumerate() {
        if !kept.contains(&gi) {
            g.iter_mut().for_each(|x| *x = fill);
        }
    }
}

/// Indices of the `k` largest values, largest first, ties to the lower index.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

fn softmax_into(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(row: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; row.len()];
        softmax_into(row, &mut out);
        out
    }

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn by_expert_groups_rows_in_order() {
        let routes = Routes {
            top_k: 2,
            experts: vec![3, 1, 1, 0, 3, 0],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5],
        };
        assert_eq!(
            routes.by_expert(4),
            vec![
                (0, vec![1, 2], vec![0.3, 0.5]),
                (1, vec![0, 1], vec![0.4, 0.7]),
                (3, vec![0, 2], vec![0.6, 0.5]),
            ]
        );
    }

    #[test]
    fn softmax_top_k_without_renormalisation_keeps_softmax_mass() {
        let rule = Router {
            rule: RouterRule::Softmax {
                norm_topk_prob: false,
            },
            top_k: 2,
            correction_bias: Vec::new(),
        };
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let r = rule.route(&logits, 4);
        assert_eq!(r.experts, vec![1, 2]);
        let p = softmax(&logits);
        assert!(close(&r.weights, &[p[1], p[2]]));
    }

    #[test]
    fn softmax_renormalised_weights_sum_to_one_and_ties_go_low() {
        let rule = Router {
            rule: RouterRule::Softmax {
                norm_topk_prob: true,
            },
            top_k: 2,
            correction_bias: Vec::new(),
        };
        let r = rule.route(&[0.5, 0.1, 3.0, 2.0, 1.0, 0.0, -2.0, 4.0], 4);
        assert_eq!(r.experts, vec![2, 3, 3, 0]);
        for pair in r.weights.chunks(2) {
            assert!((pair.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let one = Router {
            rule: RouterRule::Softmax {
                norm_topk_prob: true,
            },
            top_k: 1,
            correction_bias: Vec::new(),
        };
        assert_eq!(one.route(&[1.0, 3.0, 3.0], 3).experts, vec![1]);
    }

    /// 8 experts in 4 groups of 2; group maxima (by logit) g0 = 2.0, g1 = 3.0, g2 = 1.0,
    /// g3 = 2.5, so keeping 2 groups keeps g1 and g3. Expert 0 is the third best overall but
    /// its group is dropped: the naive top-3 {2, 7, 0} becomes {2, 7, 6}.
    #[test]
    fn v2_group_limited_greedy_masks_dropped_groups() {
        let logits = [2.0f32, -1.0, 3.0, 0.0, 1.0, 0.5, 1.8, 2.5];
        let rule = Router {
            rule: RouterRule::DeepSeekV2 {
                routed_scaling_factor: 1.0,
                groups: Some((4, 2)),
            },
            top_k: 3,
            correction_bias: Vec::new(),
        };
        let r = rule.route(&logits, 8);
        assert_eq!(r.experts, vec![2, 7, 6]);
        let greedy = Router {
            rule: RouterRule::DeepSeekV2 {
                routed_scaling_factor: 1.0,
                groups: None,
            },
            top_k: 3,
            correction_bias: Vec::new(),
        };
        assert_eq!(
            greedy.route(&logits, 8).experts,
            vec![2, 7, 0],
            "the naive answer differs"
        );
        // Weights are the softmax over all experts (not over the kept ones).
        let p = softmax(&logits);
        assert!(close(&r.weights, &[p[2], p[7], p[6]]));
    }

    #[test]
    fn v2_scales_and_never_renormalises() {
        let logits = [1.0f32, 0.0, 2.0, -1.0];
        let p = softmax(&logits);
        let rule = Router {
            rule: RouterRule::DeepSeekV2 {
                routed_scaling_factor: 16.0,
                groups: None,
            },
            top_k: 2,
            correction_bias: Vec::new(),
        };
        let w = rule.route(&logits, 4).weights;
        assert!(close(&w, &[16.0 * p[2], 16.0 * p[0]]), "{w:?}");
        let renormalised = [16.0 * p[2] / (p[2] + p[0]), 16.0 * p[0] / (p[2] + p[0])];
        assert!(
            !close(&w, &renormalised),
            "the renormalising variant differs"
        );
    }

    fn v3(top_k: usize, norm: bool, n_group: usize, topk_group: usize, bias: Vec<f32>) -> Router {
        Router {
            rule: RouterRule::DeepSeekV3 {
                norm_topk_prob: norm,
                routed_scaling_factor: 2.5,
                n_group,
                topk_group,
            },
            top_k,
            correction_bias: bias,
        }
    }

    #[test]
    fn v3_bias_selects_but_does_not_weigh_and_scaling_applies_once() {
        // Expert 3 has the lowest score but a large bias: it is chosen, weighted by its
        // own (small) sigmoid score.
        let logits = [1.0f32, 0.5, 0.0, -2.0];
        let bias = vec![0.0, 0.0, 0.0, 2.0];
        let r = v3(2, true, 1, 1, bias.clone()).route(&logits, 4);
        assert_eq!(r.experts, vec![3, 0]);
        let (s3, s0) = (sigmoid(-2.0), sigmoid(1.0));
        let want = [2.5 * s3 / (s3 + s0), 2.5 * s0 / (s3 + s0)];
        assert!(close(&r.weights, &want), "{:?} vs {want:?}", r.weights);
        // The naive variants give other numbers: biased weights, or scaling twice.
        let biased = [
            2.5 * (s3 + 2.0) / (s3 + 2.0 + s0),
            2.5 * s0 / (s3 + 2.0 + s0),
        ];
        assert!(!close(&r.weights, &biased));
        assert!(!close(&r.weights, &want.map(|w| w * 2.5)));
        // Without renormalisation the scores are scaled, still once.
        let r = v3(2, false, 1, 1, bias).route(&logits, 4);
        assert!(close(&r.weights, &[2.5 * s3, 2.5 * s0]));
    }

    #[test]
    fn v3_ranks_groups_by_the_sum_of_their_top_two() {
        // Group 0 = experts 0..3 has the single best score; group 1 = experts 3..6 has the
        // better top-2 sum. Keeping one group: sum-of-top-2 keeps group 1 (max would keep 0).
        let logits = [3.0f32, -3.0, -3.0, 1.5, 1.5, -3.0];
        let r = v3(2, true, 2, 1, vec![0.0; 6]).route(&logits, 6);
        assert_eq!(r.experts, vec![3, 4]);
    }

    #[test]
    fn v3_masks_dropped_groups_with_minus_infinity_like_transformers() {
        // Group 0 (experts 0, 1) ranks first but its biased scores are negative (σ − 2 < 0);
        // keeping one group, transformers 5.24 masks group 1 with -inf, so experts 0 and 1
        // are chosen. Masking with 0.0 would choose the dropped experts 2 and 3.
        let logits = [4.0f32, 3.0, 0.0, 0.0];
        let bias = vec![-2.0, -2.0, -3.0, -3.0];
        let r = v3(2, false, 2, 1, bias).route(&logits, 4);
        assert_eq!(r.experts, vec![0, 1]);
        assert!(close(&r.weights, &[2.5 * sigmoid(4.0), 2.5 * sigmoid(3.0)]));
    }
}
