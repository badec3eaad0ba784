//! Compiles `proto/` with protox (pure Rust, no system protoc) and writes the
//! file-descriptor set that the servers register for gRPC reflection.
use prost::Message;
use std::path::PathBuf;

const FILES: &[&str] = &[
    "ramsnap/common/v1/common.proto",
    "ramsnap/storage/v1/storage.proto",
    "ramsnap/host/v1/host.proto",
    "ramsnap/snapshot/v1/snapshot.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ramsnap_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
