use which::which;

/// Rebuild the eBPF object when bpf-linker changes (aya-template does the
/// same): a new linker can produce a different object.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("bpf-linker path is not UTF-8")
    );
}
