//! Where `suggest` reads records from: an audit log and its rotated files,
//! line by line. A line that is not a record is skipped with a warning
//! that names its file and line; a file that cannot be read is an error.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Suggester;
use crate::events::{Event, LostRecord, audit_log_files};

/// Why `suggest` cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    #[error("{path}: cannot read the audit log: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no such audit log (nor rotated files of it)")]
    NoLog { path: PathBuf },
    #[error(
        "--since {text:?} is neither an RFC 3339 time (like 2026-12-07T10:00:00Z) nor a duration back from now (like 1h or 30m)"
    )]
    Since { text: String },
}

/// `--since`: an RFC 3339 time, or a duration back from `now`.
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, SuggestError> {
    let bad = || SuggestError::Since {
        text: text.to_owned(),
    };
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    let back = humantime::parse_duration(text).map_err(|_| bad())?;
    now.checked_sub(back).ok_or_else(bad)
}

/// Reads the audit log at `path` and its rotated files, oldest first, into
/// `into`. Returns a warning per line skipped, as `FILE:LINE: ...`.
pub fn read_audit_log(path: &Path, into: &mut Suggester) -> Result<Vec<String>, SuggestError> {
    let files = audit_log_files(path);
    if files.is_empty() {
        return Err(SuggestError::NoLog {
            path: path.to_owned(),
        });
    }
    let mut warnings = Vec::new();
    for file in files {
        let read = |source| SuggestError::Read {
            path: file.clone(),
            source,
        };
        let reader = std::io::BufReader::new(std::fs::File::open(&file).map_err(read)?);
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(read)?;
            if let Err(why) = add_line(&line, into) {
                warnings.push(format!(
                    "{}:{}: skipped, not a decision record: {why}",
                    file.display(),
                    n + 1
                ));
            }
        }
    }
    Ok(warnings)
}

/// One line of the log: a decision record is taken, and so is a record of
/// records lost; a record of another kind (a grant's) and an empty line
/// are passed over.
fn add_line(line: &str, into: &mut Suggester) -> Result<(), String> {
    if line.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    match value.get("kind").and_then(|k| k.as_str()) {
        None => {
            let event: Event = serde_json::from_value(value).map_err(|e| e.to_string())?;
            into.add(&event).map_err(|e| e.to_string())
        }
        Some("lost") => {
            let lost: LostRecord = serde_json::from_value(value).map_err(|e| e.to_string())?;
            into.lost(&lost).map_err(|e| e.to_string())
        }
        Some(_) => Ok(()),
    }
}
