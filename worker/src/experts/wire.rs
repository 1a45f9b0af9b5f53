//! Hidden rows on the wire: a `[rows, hidden]` tensor as packed little-endian bytes in
//! f32, bf16 or f16 (`switchyard.expert.v1.Tensor`), never as repeated floats.

use candle_core::{DType, Device, Tensor};
use switchyard_proto::expert::v1 as pb;

#[cfg(target_endian = "big")]
compile_error!(
    "the wire format is little-endian and is read in place: big-endian hosts are not supported"
);

/// The wire dtype named `name` (`f32`, `bf16` or `f16`).
pub fn parse_dtype(name: &str) -> Result<pb::Dtype, String> {
    match name {
        "f32" | "float32" => Ok(pb::Dtype::F32),
        "bf16" | "bfloat16" => Ok(pb::Dtype::Bf16),
        "f16" | "float16" => Ok(pb::Dtype::F16),
        other => Err(format!("wire dtype {other:?}: expected f32, bf16 or f16")),
    }
}

/// candle's dtype for a wire dtype.
pub fn candle_dtype(dtype: pb::Dtype) -> Option<DType> {
    match dtype {
        pb::Dtype::F32 => Some(DType::F32),
        pb::Dtype::Bf16 => Some(DType::BF16),
        pb::Dtype::F16 => Some(DType::F16),
        pb::Dtype::Unspecified => None,
    }
}

/// The wire dtype for a candle dtype, if it has one.
pub fn wire_dtype(dtype: DType) -> Option<pb::Dtype> {
    match dtype {
        DType::F32 => Some(pb::Dtype::F32),
        DType::BF16 => Some(pb::Dtype::Bf16),
        DType::F16 => Some(pb::Dtype::F16),
        _ => None,
    }
}

/// Packs `rows` f32 rows of `width` (`data.len() == rows · width`) as `dtype`.
pub fn encode_f32(data: &[f32], rows: usize, width: usize, dtype: pb::Dtype) -> pb::Tensor {
    let bytes: Vec<u8> = match dtype {
        pb::Dtype::Bf16 => data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        pb::Dtype::F16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        pb::Dtype::F32 | pb::Dtype::Unspecified => {
            data.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    let dtype = if dtype == pb::Dtype::Unspecified {
        pb::Dtype::F32
    } else {
        dtype
    };
    pb::Tensor {
        dtype: dtype as i32,
        shape: vec![rows as u64, width as u64],
        data: bytes.into(),
    }
}

/// Packs a `[rows, width]` tensor as `dtype`.
pub fn encode(t: &Tensor, dtype: pb::Dtype) -> candle_core::Result<pb::Tensor> {
    let (rows, width) = t.dims2()?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(encode_f32(&data, rows, width, dtype))
}

/// The elements of a validated tensor as f32, row-major.
pub fn decode_f32(t: &pb::Tensor) -> Result<Vec<f32>, switchyard_proto::expert::v1::TensorError> {
    t.validate()?;
    let dtype = t.supported_dtype()?;
    Ok(match dtype {
        pb::Dtype::Bf16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        pb::Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        pb::Dtype::F32 | pb::Dtype::Unspecified => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    })
}

/// A validated `[rows, width]` wire tensor as a candle tensor in its own dtype.
pub fn decode(t: &pb::Tensor, device: &Device) -> Result<Tensor, String> {
    let (rows, width) = t.matrix_shape().map_err(|e| e.to_string())?;
    let dtype = t
        .supported_dtype()
        .ok()
        .and_then(candle_dtype)
        .ok_or_else(|| "Tensor.dtype: unsupported".to_string())?;
    Tensor::from_raw_buffer(&t.data, dtype, &[rows, width], device).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_every_dtype() -> candle_core::Result<()> {
        let xs = Tensor::new(&[[1.0f32, -2.5, 3.25], [0.0, 1e-3, -7.0]], &Device::Cpu)?;
        for dtype in [pb::Dtype::F32, pb::Dtype::Bf16, pb::Dtype::F16] {
            let wire = encode(&xs, dtype)?;
            assert_eq!(wire.shape, vec![2, 3]);
            assert_eq!(wire.data.len(), 6 * dtype.size_bytes().unwrap_or(0));
            let back = decode(&wire, &Device::Cpu).map_err(candle_core::Error::Msg)?;
            let back = back.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let flat = decode_f32(&wire).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let tol = if dtype == pb::Dtype::F32 { 0.0 } else { 0.01 };
            for (row, want) in back.iter().zip(xs.to_vec2::<f32>()?) {
                for (a, b) in row.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1.0),
                        "{dtype:?}: {a} vs {b}"
                    );
                }
            }
            assert_eq!(flat.len(), 6);
        }
        Ok(())
    }

    #[test]
    fn names_the_accepted_dtypes() {
        assert_eq!(parse_dtype("bf16"), Ok(pb::Dtype::Bf16));
        let e = parse_dtype("int8").unwrap_err();
        assert!(e.contains("f32, bf16 or f16"), "{e}");
    }
}
