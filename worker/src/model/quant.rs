//! Which storage type each weight matrix gets: `quantization: auto | none | int8 | int4`.
//!
//! | setting | dense checkpoint (safetensors, f32/f16 GGUF tensors) | quantized GGUF tensor |
//! |---|---|---|
//! | `auto` | as stored, in `dtype` | as stored |
//! | `none` | as stored, in `dtype` | dequantized to `dtype` |
//! | `int8` | `Q8_0` | kept if `Q8_0`, else re-quantized to `Q8_0` |
//! | `int4` | `Q4_K` (rows of 256·n), else `Q4_0` | kept if 4-bit (`Q4_0`, `Q4_1`, `Q4_K`), else `Q4_K`/`Q4_0` |
//!
//! Precision rules, as llama.cpp applies them:
//! - norms, biases, the MoE router (and a shared expert's gate) and MLA's `kv_b_proj` (which
//!   the absorbed attention reads as a dense matrix) are never quantized;
//! - the embedding stays dense (`dtype`): a lookup reads one row per token, so its size
//!   costs memory, not time;
//! - the LM head (or the tied embedding used as one) gets `Q8_0` under `int8` and `Q6_K`
//!   (rows of 256·n, else `Q8_0`) under `int4`: it decides every token, so it keeps more bits.
//!
//! Every quantized type here stores one scale per 32 weights (`Q8_0`, `Q4_0`, and `Q4_K`'s
//! sub-blocks, `Q6_K`'s of 16), so the group size is fixed at 32: `quantizationGroupSize`
//! accepts 32 only. Where llama.cpp's `Q4_K_M` mix would use 5 or 6 bits for a width that is
//! not a multiple of 256, we use `Q4_0`, so `int4` means 4-bit everywhere but the head.

use candle_core::quantized::GgmlDType;

/// The `quantization` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Every tensor as the checkpoint stores it.
    #[default]
    Auto,
    /// Dense weights in `dtype` (a GGUF's quantized tensors dequantized).
    None,
    /// 8-bit `Q8_0` matrices.
    Int8,
    /// 4-bit `Q4_K` / `Q4_0` matrices, `Q6_K`/`Q8_0` head.
    Int4,
}

/// The one group size every quantized type here has.
pub const GROUP_SIZE: u32 = 32;

impl Quantization {
    /// Every accepted spelling, for messages.
    pub const ACCEPTED: &'static str = "auto, none, int8, int4";

    /// Parses a setting as users write it.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            "int4" => Ok(Self::Int4),
            other => Err(format!(
                "quantization {other:?}: expected one of {}",
                Self::ACCEPTED
            )),
        }
    }

    /// The setting's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a matrix is, for the precision rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Attention projections, MLPs, experts.
    Body,
    /// The LM head.
    Head,
}

/// How to hold one matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The stored quantized tensor, as is.
    Keep,
    /// Dense, in the weights' dtype.
    Dense,
    /// Quantized at load to this type.
    Quantize(GgmlDType),
}

fn four_bit(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K)
}

/// The type `setting` gives a matrix of role `role` whose rows are `cols` wide; `None`
/// means dense (no setting, or a width no block type divides).
pub fn target(setting: Quantization, role: Role, cols: usize) -> Option<GgmlDType> {
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size()).then_some(t);
    match (setting, role) {
        (Quantization::Auto | Quantization::None, _) => None,
        (Quantization::Int8, _) => fits(GgmlDType::Q8_0),
        (Quantization::Int4, Role::Body) => fits(GgmlDType::Q4K).or_else(|| fits(GgmlDType::Q4_0)),
        (Quantization::Int4, Role::Head) => fits(GgmlDType::Q6K).or_else(|| fits(GgmlDType::Q8_0)),
    }
}

/// How to hold a matrix stored as `stored` (`None`: dense) under `setting`.
pub fn plan(setting: Quantization, role: Role, stored: Option<GgmlDType>, cols: usize) -> Plan {
    let kept = |t: GgmlDType| match (setting, role) {
        (Quantization::Auto, _) => true,
        (Quantization::None, _) => false,
        (Quantization::Int8, _) => t == GgmlDType::Q8_0,
        (Quantization::Int4, Role::Body) => four_bit(t),
        (Quantization::Int4, Role::Head) => matches!(t, GgmlDType::Q6K | GgmlDType::Q8_0),
    };
    match stored {
        Some(t) if kept(t) => Plan::Keep,
        _ => target(setting, role, cols).map_or(Plan::Dense, Plan::Quantize),
    }
}

/// Which storage types a loaded model holds, per part: what the start-up log and
/// `ListModels` show (`attention: q4_k ×96; head: q6_k; ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(
    std::collections::BTreeMap<&'static str, std::collections::BTreeMap<String, usize>>,
);

impl Tally {
    /// Counts one matrix of `part` held as `type_name`.
    pub fn add(&mut self, part: &'static str, type_name: impl Into<String>) {
        *self
            .0
            .entry(part)
            .or_default()
            .entry(type_name.into())
            .or_default() += 1;
    }

    /// `(part, type, matrices)`, parts in a fixed order.
    pub fn rows(&self) -> Vec<(&'static str, String, usize)> {
        self.0
            .iter()
            .flat_map(|(part, types)| types.iter().map(|(t, n)| (*part, t.clone(), *n)))
            .collect()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (part, types) in &self.0 {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{part}:")?;
            for (t, n) in types {
                if *n == 1 {
                    write!(f, " {t}")?;
                } else {
                    write!(f, " {t} ×{n}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_in_the_module_docs_holds() {
        use GgmlDType::*;
        use Quantization as Q;
        // Dense checkpoints.
        assert_eq!(plan(Q::Auto, Role::Body, None, 512), Plan::Dense);
        assert_eq!(plan(Q::None, Role::Body, None, 512), Plan::Dense);
        assert_eq!(plan(Q::Int8, Role::Body, None, 576), Plan::Quantize(Q8_0));
        assert_eq!(plan(Q::Int4, Role::Body, None, 512), Plan::Quantize(Q4K));
        assert_eq!(plan(Q::Int4, Role::Body, None, 576), Plan::Quantize(Q4_0));
        assert_eq!(plan(Q::Int4, Role::Head, None, 512), Plan::Quantize(Q6K));
        assert_eq!(plan(Q::Int4, Role::Head, None, 576), Plan::Quantize(Q8_0));
        // A width no block divides stays dense.
        assert_eq!(plan(Q::Int4, Role::Body, None, 100), Plan::Dense);
        // Quantized GGUF tensors.
        assert_eq!(plan(Q::Auto, Role::Body, Some(Q4_1), 576), Plan::Keep);
        assert_eq!(plan(Q::None, Role::Body, Some(Q4_1), 576), Plan::Dense);
        assert_eq!(plan(Q::Int4, Role::Body, Some(Q4_1), 576), Plan::Keep);
        assert_eq!(
            plan(Q::Int8, Role::Body, Some(Q4_1), 576),
            Plan::Quantize(Q8_0)
        );
        assert_eq!(plan(Q::Int8, Role::Head, Some(Q8_0), 576), Plan::Keep);
        assert_eq!(
            plan(Q::Int4, Role::Body, Some(Q8_0), 512),
            Plan::Quantize(Q4K)
        );
        assert_eq!(plan(Q::Int4, Role::Head, Some(Q8_0), 576), Plan::Keep);
    }

    #[test]
    fn settings_parse_and_name_themselves() {
        for q in [
            Quantization::Auto,
            Quantization::None,
            Quantization::Int8,
            Quantization::Int4,
        ] {
            assert_eq!(Quantization::parse(q.name()), Ok(q));
        }
        let e = Quantization::parse("int3").expect_err("int3");
        assert!(e.contains("auto, none, int8, int4"), "{e}");
    }
}
