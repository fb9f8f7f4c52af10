//! The Python the end-to-end tests run: a venv under the target
//! directory with the packages of tests/python/requirements.txt, pinned,
//! as PyPI ships them (the `spiffe` packages and PyJWT of tests/svid.rs,
//! `pycares` for the c-ares client of the DNS tests), and the scripts of
//! tests/python/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The venv's python, made once per test process: the venv is made
/// again (`python3 -m venv --clear`, `pip install -r`) only when
/// tests/python/requirements.txt differs from what its `.installed`
/// stamp recorded. `None`, with the reason given to [`crate::cannot_run`]
/// (so it panics under `IDGATE_E2E`), when python3, its venv module or
/// PyPI is missing here.
pub fn env() -> Option<PathBuf> {
    static PYTHON: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);
    let mut made = PYTHON.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(python) = &*made {
        return python.clone();
    }
    let python = make_env();
    *made = Some(python.clone());
    python
}

/// A script of tests/python/.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

fn make_env() -> Option<PathBuf> {
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("tests/python/requirements.txt");
    let target = crate::target_bin("idgate")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned();
    let venv = target.join("py-tests");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if std::fs::read_to_string(&ready).ok().as_deref() == Some(wanted.as_str()) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output();
    match made {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            crate::cannot_run(&format!(
                "python3 -m venv failed (install python3-venv): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            return None;
        }
        Err(e) => {
            crate::cannot_run(&format!("no python3: {e}"));
            return None;
        }
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(&requirements)
        .output()
        .expect("pip");
    if !out.status.success() {
        crate::cannot_run(&format!(
            "pip install -r {}: {}",
            requirements.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
        return None;
    }
    std::fs::write(&ready, &wanted).expect("write the venv's .installed stamp");
    Some(python)
}
