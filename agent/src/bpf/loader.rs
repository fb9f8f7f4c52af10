//! Loads idgate's object, attaches its programs to the scope with pinned
//! bpf links, and adopts what an earlier agent pinned.
//!
//! Pin layout under the pin directory: each map by its name, and each link
//! as `<program>@<scope cgroup id>`. A restarted agent finds its links by
//! that name and leaves them attached: enforcement has no gap. Links for
//! another scope (the configuration changed) are detached only after the
//! new scope's links are in place.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use idgate_common::{maps, programs};

use super::maps::{PolicyMaps, SlotTable};
use super::{BpfError, bpffs};
use crate::cgroup;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/idgate"));

/// What `install` found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// Programs that were already attached and pinned, and kept.
    pub adopted: Vec<&'static str>,
    /// Programs attached now.
    pub attached: Vec<&'static str>,
    /// Stale links (for another scope) that were detached.
    pub detached: Vec<String>,
}

/// The programs in place and the maps that drive them.
pub struct Enforcer {
    pub maps: PolicyMaps,
    pub slots: SlotTable,
    pub attachment: Attachment,
}

fn link_name(program: &str, scope_id: u64) -> String {
    format!("{program}@{scope_id}")
}

/// Loads the object (reusing pinned maps), attaches every program that is
/// not already attached to `scope_dir`, and pins it.
pub fn install(pin_dir: &Path, scope_dir: &Path) -> Result<Enforcer, BpfError> {
    bpffs::ensure(pin_dir)?;
    let scope_id = cgroup::cgroup_id(scope_dir).map_err(|e| BpfError::Io {
        path: scope_dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(OBJECT)?;
    let mut attachment = Attachment {
        adopted: Vec::new(),
        attached: Vec::new(),
        detached: Vec::new(),
    };
    let scope = File::open(scope_dir).map_err(|source| BpfError::Io {
        path: scope_dir.to_owned(),
        source,
    })?;
    for name in programs::ALL {
        let pin = pin_dir.join(link_name(name, scope_id));
        if pin.exists() {
            PinnedLink::from_pin(&pin).map_err(|e| BpfError::Link {
                path: pin.clone(),
                message: format!("pinned but not a usable link: {e}"),
            })?;
            attachment.adopted.push(name);
            continue;
        }
        attach(&mut ebpf, name, &scope, &pin)?;
        attachment.attached.push(name);
    }
    attachment.detached = detach_stale(pin_dir, scope_id)?;
    let maps = PolicyMaps::new(|name| ebpf.take_map(name))?;
    let slots = SlotTable::new(
        ebpf.take_map(maps::SLOT_IDS)
            .ok_or(BpfError::MissingMap(maps::SLOT_IDS))?,
    )?;
    Ok(Enforcer {
        maps,
        slots,
        attachment,
    })
}

fn attach(ebpf: &mut Ebpf, name: &'static str, scope: &File, pin: &Path) -> Result<(), BpfError> {
    let program_err = |source| BpfError::Program { name, source };
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(BpfError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(program_err)?;
    program.load().map_err(program_err)?;
    // With bpf links only `Single` is accepted (the kernel attaches links
    // as multi-attach; a descendant's own programs can add denials, never
    // lift ours).
    let id = program
        .attach(scope, CgroupAttachMode::Single)
        .map_err(program_err)?;
    let link: FdLink = program
        .take_link(id)
        .map_err(program_err)?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| BpfError::Link {
            path: pin.to_owned(),
            message: e.to_string(),
        })?;
    link.pin(pin).map_err(|e| BpfError::Link {
        path: pin.to_owned(),
        message: format!("cannot pin: {e}"),
    })?;
    Ok(())
}

/// Unpins links of this agent's programs that belong to another scope.
fn detach_stale(pin_dir: &Path, scope_id: u64) -> Result<Vec<String>, BpfError> {
    let mut detached = Vec::new();
    for path in pinned_links(pin_dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else { continue };
        if !name.ends_with(&format!("@{scope_id}")) {
            std::fs::remove_file(&path).map_err(|source| BpfError::Io {
                path: path.clone(),
                source,
            })?;
            tracing::warn!(link = %name, "detached a link left for another scope");
            detached.push(name);
        }
    }
    Ok(detached)
}

/// Every link pin of idgate's programs in `pin_dir`.
fn pinned_links(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let read = std::fs::read_dir(pin_dir).map_err(|source| BpfError::Io {
        path: pin_dir.to_owned(),
        source,
    })?;
    Ok(read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('@'))
                .is_some_and(|(prog, _)| programs::ALL.contains(&prog))
        })
        .collect())
}

/// Removes every pin idgate made: its links (which detaches the programs
/// once no process holds them) and its maps. Returns what was removed.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    if !pin_dir.exists() {
        return Ok(Vec::new());
    }
    let mut removed = pinned_links(pin_dir)?;
    removed.extend(
        maps::ALL
            .iter()
            .map(|m| pin_dir.join(m))
            .filter(|p| p.exists()),
    );
    for path in &removed {
        std::fs::remove_file(path).map_err(|source| BpfError::Io {
            path: path.clone(),
            source,
        })?;
    }
    // Only an empty directory goes: anything else in it is not ours.
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        tracing::warn!(path = %pin_dir.display(), error = %e, "pin directory left in place");
    }
    Ok(removed)
}
