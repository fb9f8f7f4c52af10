//! Builds the kernel programs in `ebpf/` for the BPF target (nightly,
//! `-Z build-std=core`, bpf-linker) and leaves the object in `OUT_DIR`.
//! `AYA_BUILD_SKIP=1` skips it (for clippy or docs jobs).
fn main() -> anyhow::Result<()> {
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
