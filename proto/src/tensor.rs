//! Checks on [`Tensor`]: the element type is one we know, and `data` holds exactly
//! `product(shape) × element size` bytes. Pure arithmetic on the message; nothing here
//! reads or converts the elements.

use crate::expert::v1::{Dtype, Tensor};

/// Why a [`Tensor`] cannot be used. Each message names the field at fault and what would
/// be accepted; a server returns it as `INVALID_ARGUMENT` (see the `From` impl for
/// [`tonic::Status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// `dtype` is `DTYPE_UNSPECIFIED` or a value this version does not know.
    #[error(
        "Tensor.dtype: {} is not accepted; accepted values: {}",
        describe_dtype(*value),
        accepted_dtypes()
    )]
    UnsupportedDtype {
        /// The raw enum value received.
        value: i32,
    },
    /// The byte size implied by `shape` does not fit in memory addresses.
    #[error("Tensor.shape: {shape:?} of {dtype} elements is too large to address")]
    ShapeOverflow {
        /// The shape received.
        shape: Vec<u64>,
        /// The element type, as its proto name.
        dtype: &'static str,
    },
    /// `data` is not exactly as long as `dtype` and `shape` require.
    #[error(
        "Tensor.data: {actual} bytes, but shape {shape:?} of {dtype} elements \
         ({element_bytes} bytes each) needs exactly {expected} bytes"
    )]
    DataLength {
        /// Bytes required.
        expected: usize,
        /// Bytes received.
        actual: usize,
        /// The shape received.
        shape: Vec<u64>,
        /// The element type, as its proto name.
        dtype: &'static str,
        /// Bytes per element of `dtype`.
        element_bytes: usize,
    },
    /// A two-dimensional tensor (`[rows, width]`) was required.
    #[error("Tensor.shape: expected 2 dimensions [rows, width], got {shape:?}")]
    NotMatrix {
        /// The shape received.
        shape: Vec<u64>,
    },
}

impl From<TensorError> for tonic::Status {
    fn from(err: TensorError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

impl Dtype {
    /// The element types a [`Tensor`] may carry (every value but `Unspecified`).
    pub const SUPPORTED: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element; `None` for [`Dtype::Unspecified`].
    pub const fn size_bytes(self) -> Option<usize> {
        match self {
            Dtype::Unspecified => None,
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::Bf16 => Some(2),
        }
    }
}

impl Tensor {
    /// The element type, if it is one a tensor may carry.
    pub fn supported_dtype(&self) -> Result<Dtype, TensorError> {
        match Dtype::try_from(self.dtype) {
            Ok(dtype) if dtype.size_bytes().is_some() => Ok(dtype),
            _ => Err(TensorError::UnsupportedDtype { value: self.dtype }),
        }
    }

    /// Number of bytes `data` must hold: the product of `shape` (1 for an empty shape, a
    /// scalar) times the element size.
    pub fn expected_data_len(&self) -> Result<usize, TensorError> {
        let dtype = self.supported_dtype()?;
        let element_bytes = dtype.size_bytes().unwrap_or_default();
        self.shape
            .iter()
            .try_fold(element_bytes, |bytes, &dim| {
                usize::try_from(dim)
                    .ok()
                    .and_then(|dim| bytes.checked_mul(dim))
            })
            .ok_or_else(|| TensorError::ShapeOverflow {
                shape: self.shape.clone(),
                dtype: dtype.as_str_name(),
            })
    }

    /// Checks that `dtype` is supported and `data` is exactly as long as `shape` requires.
    pub fn validate(&self) -> Result<(), TensorError> {
        let expected = self.expected_data_len()?;
        if self.data.len() == expected {
            return Ok(());
        }
        let dtype = self.supported_dtype()?;
        Err(TensorError::DataLength {
            expected,
            actual: self.data.len(),
            shape: self.shape.clone(),
            dtype: dtype.as_str_name(),
            element_bytes: dtype.size_bytes().unwrap_or_default(),
        })
    }

    /// Validates the tensor as a matrix and returns `(rows, width)`; hidden rows are
    /// `[rows, hidden_size]`. Checks dimensions first, then [`validate`](Self::validate).
    pub fn matrix_shape(&self) -> Result<(usize, usize), TensorError> {
        let &[rows, width] = self.shape.as_slice() else {
            return Err(TensorError::NotMatrix {
                shape: self.shape.clone(),
            });
        };
        self.validate()?;
        // validate() converted every dimension to usize, so these conversions succeed.
        let to_usize = |dim: u64| usize::try_from(dim).unwrap_or(usize::MAX);
        Ok((to_usize(rows), to_usize(width)))
    }
}

fn describe_dtype(value: i32) -> String {
    match Dtype::try_from(value) {
        Ok(dtype) => format!("{} ({value})", dtype.as_str_name()),
        Err(_) => format!("unknown value {value}"),
    }
}

fn accepted_dtypes() -> String {
    Dtype::SUPPORTED
        .iter()
        .map(|dtype| format!("{} ({})", dtype.as_str_name(), *dtype as i32))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dtype: Dtype, shape: &[u64], data_len: usize) -> Tensor {
        Tensor {
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data: vec![0u8; data_len].into(),
        }
    }

    #[test]
    fn element_sizes() {
        assert_eq!(Dtype::F32.size_bytes(), Some(4));
        assert_eq!(Dtype::F16.size_bytes(), Some(2));
        assert_eq!(Dtype::Bf16.size_bytes(), Some(2));
        assert_eq!(Dtype::Unspecified.size_bytes(), None);
        assert!(Dtype::SUPPORTED.iter().all(|d| d.size_bytes().is_some()));
    }

    #[test]
    fn expected_length_is_product_of_shape_times_element_size() {
        assert_eq!(
            tensor(Dtype::Bf16, &[3, 64], 0).expected_data_len(),
            Ok(384)
        );
        assert_eq!(tensor(Dtype::F32, &[3, 64], 0).expected_data_len(), Ok(768));
        assert_eq!(tensor(Dtype::F16, &[0, 64], 0).expected_data_len(), Ok(0));
        // A scalar: the empty product is 1.
        assert_eq!(tensor(Dtype::F32, &[], 0).expected_data_len(), Ok(4));
    }

    #[test]
    fn matching_length_validates() {
        assert_eq!(tensor(Dtype::Bf16, &[2, 8], 32).validate(), Ok(()));
        assert_eq!(tensor(Dtype::F32, &[2, 8], 64).matrix_shape(), Ok((2, 8)));
    }

    #[test]
    fn wrong_length_names_the_field_and_the_required_length() {
        let err = tensor(Dtype::F16, &[2, 8], 33).validate().unwrap_err();
        assert_eq!(
            err,
            TensorError::DataLength {
                expected: 32,
                actual: 33,
                shape: vec![2, 8],
                dtype: "DTYPE_F16",
                element_bytes: 2,
            }
        );
        let msg = err.to_string();
        assert!(msg.starts_with("Tensor.data: 33 bytes"), "{msg}");
        assert!(msg.contains("needs exactly 32 bytes"), "{msg}");
    }

    #[test]
    fn unspecified_and_unknown_dtypes_list_the_accepted_values() {
        for value in [0, 99, -1] {
            let t = Tensor {
                dtype: value,
                shape: vec![1, 4],
                data: vec![0u8; 16].into(),
            };
            let err = t.validate().unwrap_err();
            assert_eq!(err, TensorError::UnsupportedDtype { value });
            let msg = err.to_string();
            assert!(msg.starts_with("Tensor.dtype: "), "{msg}");
            assert!(
                msg.contains("accepted values: DTYPE_F32 (1), DTYPE_F16 (2), DTYPE_BF16 (3)"),
                "{msg}"
            );
        }
        let msg = TensorError::UnsupportedDtype { value: 0 }.to_string();
        assert!(
            msg.contains("DTYPE_UNSPECIFIED (0) is not accepted"),
            "{msg}"
        );
        let msg = TensorError::UnsupportedDtype { value: 99 }.to_string();
        assert!(msg.contains("unknown value 99 is not accepted"), "{msg}");
    }

    #[test]
    fn huge_shapes_are_rejected_not_overflowed() {
        let err = tensor(Dtype::F32, &[u64::MAX, 2], 0)
            .validate()
            .unwrap_err();
        assert!(matches!(err, TensorError::ShapeOverflow { .. }), "{err:?}");
        let err = tensor(Dtype::Bf16, &[1 << 32, 1 << 32], 0)
            .matrix_shape()
            .unwrap_err();
        assert!(matches!(err, TensorError::ShapeOverflow { .. }), "{err:?}");
        assert!(err.to_string().starts_with("Tensor.shape: "), "{err}");
    }

    #[test]
    fn matrix_shape_requires_two_dimensions() {
        for shape in [&[][..], &[16][..], &[1, 2, 8][..]] {
            let t = tensor(Dtype::F32, shape, 64);
            assert_eq!(
                t.matrix_shape(),
                Err(TensorError::NotMatrix {
                    shape: shape.to_vec()
                })
            );
        }
    }

    #[test]
    fn errors_become_invalid_argument() {
        let status = tonic::Status::from(TensorError::NotMatrix { shape: vec![3] });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "Tensor.shape: expected 2 dimensions [rows, width], got [3]"
        );
    }
}
