//! Compiles the `.proto` files without a system `protoc`: `protox` (pure Rust) parses them
//! into a `FileDescriptorSet`, `tonic-prost-build` generates messages, clients and servers
//! from it, and the encoded set (with comments) is written for gRPC server reflection.

use std::path::PathBuf;

/// Root of the proto tree; package `a.b.v1` lives in `a/b/v1/`.
const PROTO_ROOT: &str = "proto";

/// The files this crate compiles, relative to [`PROTO_ROOT`].
const PROTO_FILES: &[&str] = &[
    "switchyard/v1/inference.proto",
    "switchyard/expert/v1/expert_shard.proto",
];

/// File in `OUT_DIR` holding the encoded descriptor set; `src/lib.rs` includes it.
const DESCRIPTOR_SET_FILE: &str = "switchyard_descriptor_set.bin";

fn main() {
    if let Err(message) = run() {
        // Cargo shows a failed build script's stderr.
        eprintln!("error: compiling the Switchyard .proto files: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);

    // protox's Debug form is `file:line:column: message`, which is what a proto author needs.
    let located = |err: protox::Error| format!("{err:?}");
    let mut compiler = protox::Compiler::new([PROTO_ROOT]).map_err(located)?;
    // Imports (well-known types, if any are ever used) go into the reflection set so a
    // reflection client can resolve every dependency; comments go in so it shows the docs.
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES).map_err(located)?;

    let descriptor_path = out_dir.join(DESCRIPTOR_SET_FILE);
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())
        .map_err(|err| format!("writing {}: {err}", descriptor_path.display()))?;

    // Generate code for our own files only; imported google.protobuf types map to
    // prost-types by default.
    let mut fds = compiler.file_descriptor_set();
    fds.file.retain(|file| PROTO_FILES.contains(&file.name()));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Hidden-row payloads: `Bytes` clones are O(1), so a request can be re-sent to a
        // replica shard without copying its tensor.
        .bytes(".switchyard.expert.v1.Tensor.data")
        .compile_fds(fds)
        .map_err(|err| format!("generating Rust code: {err}"))
}
