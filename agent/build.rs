//! Builds the kernel programs in `ebpf/` for the BPF target (nightly,
//! `-Z build-std=core`, bpf-linker) and leaves the object in `OUT_DIR`.
//! `AYA_BUILD_SKIP=1` skips it (for clippy or docs jobs).
//!
//! Also compiles the SPIFFE Workload API (`proto/workload.proto`) with the
//! `protoc` that the `protoc-bin-vendored` crate ships.
fn main() -> anyhow::Result<()> {
    compile_workload_api()?;
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "idgate-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn compile_workload_api() -> anyhow::Result<()> {
    let proto = std::path::PathBuf::from("proto/workload.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &[std::path::PathBuf::from("proto"), include])?;
    Ok(())
}
