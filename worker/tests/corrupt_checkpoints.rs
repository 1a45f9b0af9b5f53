//! A safetensors checkpoint is input from whoever made it: any byte of its JSON header (or
//! of the 8-byte length before it) changed, or the file cut short, must give an error
//! naming the file (or load, when the change is harmless), never a panic, an abort or an
//! allocation the file cannot back. The same for `config.json`. (GGUF headers: `gguf.rs`.)

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use proptest::prelude::*;
use switchyard_worker::model::LoadedModel;
use switchyard_worker::model::quant::Quantization;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3_moe")
}

/// A checkpoint's files (name, bytes), and the length of its safetensors header with the
/// 8-byte prefix.
type Files = (Vec<(String, Vec<u8>)>, usize);

/// The fixture's files.
fn valid() -> &'static Files {
    static VALID: std::sync::OnceLock<Files> = std::sync::OnceLock::new();
    VALID.get_or_init(|| {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(fixture()).expect("fixture") {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("reference") || name.starts_with("chat_reference") {
                continue;
            }
            files.push((name, std::fs::read(entry.path()).expect("read")));
        }
        let st = &files
            .iter()
            .find(|(n, _)| n == "model.safetensors")
            .expect("model.safetensors")
            .1;
        let header = u64::from_le_bytes(st[..8].try_into().expect("8 bytes")) as usize;
        (files, 8 + header)
    })
}

/// Writes the fixture with `file` replaced by `bytes` into a fresh directory and loads it:
/// `Err` with the message when it does not load, which must name the file.
fn load(file: &str, bytes: &[u8], case: u64) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-corrupt-{}-{:?}-{case}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, data) in &valid().0 {
        let data = if name == file { bytes } else { data };
        std::fs::write(dir.join(name), data).expect("write");
    }
    let loaded = LoadedModel::load(&dir, Some(DType::F32), Quantization::Auto, &Device::Cpu);
    let _ = std::fs::remove_dir_all(&dir);
    match loaded {
        Ok(_) => Ok(()),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(file) || message.contains(&dir.display().to_string()),
                "the error names the file or the checkpoint: {message}"
            );
            Err(message)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_changed_safetensors_header_byte_is_an_error_or_harmless(
        at in any::<prop::sample::Index>(), value in any::<u8>(), case in any::<u64>()
    ) {
        let (files, header) = valid();
        let mut st = files.iter().find(|(n, _)| n == "model.safetensors").expect("st").1.clone();
        st[at.index(*header)] = value;
        let _ = load("model.safetensors", &st, case);
    }

    #[test]
    fn a_safetensors_file_cut_short_is_an_error(at in any::<prop::sample::Index>(), case in any::<u64>()) {
        let (files, _) = valid();
        let st = &files.iter().find(|(n, _)| n == "model.safetensors").expect("st").1;
        prop_assert!(load("model.safetensors", &st[..at.index(st.len())], case).is_err());
    }

    #[test]
    fn a_changed_config_byte_is_an_error_or_harmless(
        at in any::<prop::sample::Index>(), value in any::<u8>(), case in any::<u64>()
    ) {
        let (files, _) = valid();
        let mut config = files.iter().find(|(n, _)| n == "config.json").expect("config").1.clone();
        let i = at.index(config.len());
        config[i] = value;
        let _ = load("config.json", &config, case);
    }
}
