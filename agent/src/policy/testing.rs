//! Test helpers: policies written to temporary files and loaded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{PolicyError, PolicySet, load};

/// A temporary policy directory, removed when dropped.
pub struct PolicyDir {
    pub path: PathBuf,
}

impl PolicyDir {
    /// A directory holding `files` (name, text).
    pub fn new(files: &[(&str, &str)]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "idgate-policy-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        for (name, text) in files {
            std::fs::write(path.join(name), text).unwrap();
        }
        Self { path }
    }

    pub fn load(&self, trust_domains: &[&str]) -> Result<PolicySet, PolicyError> {
        let td: Vec<String> = trust_domains.iter().map(|t| t.to_string()).collect();
        load(&self.path, &td)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The policy of one file's text; panics with the diagnostics if invalid.
pub fn policy(text: &str) -> PolicySet {
    PolicyDir::new(&[("p.toml", text)])
        .load(&[])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The problems in one file's text, as (line, message).
pub fn errors(text: &str) -> Vec<(u32, String)> {
    let dir = PolicyDir::new(&[("p.toml", text)]);
    let e = dir.load(&[]).expect_err("the policy should be refused");
    e.diagnostics
        .iter()
        .map(|d| {
            assert_eq!(&*d.file, Path::new(&dir.file("p.toml")));
            (d.position.expect("a position").0, d.message.clone())
        })
        .collect()
}

/// A secret file fit for credential rules (mode 0600), made once per test
/// process and left for the system's temporary-file cleanup.
pub fn secret_file() -> &'static Path {
    use std::os::unix::fs::PermissionsExt;
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("idgate-secret-{}", std::process::id()));
        std::fs::write(&path, "sk-test\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    })
}
