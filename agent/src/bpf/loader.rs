//! Loads idgate's object, attaches its programs to the scope with pinned
//! bpf links, and adopts what an earlier agent pinned.
//!
//! Pin layout under the pin directory: each map by its name, and each link
//! as `<program>@<scope cgroup id>`. A restarted agent finds its links by
//! that name and leaves them attached: enforcement has no gap. A pinned
//! link whose program is not this agent's (an upgrade changed the
//! program, or the pin was tampered with) is replaced the same way: every
//! new program is attached and pinned under a staging name first, then
//! each staged link is renamed over its old pin, which detaches the old
//! one. Links for another scope (the
//! configuration changed) are detached only after the new scope's links
//! are in place.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::raw_trace_point::RawTracePointLink;
use aya::programs::{CgroupAttachMode, Program, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use idgate_common::{Scope, maps, programs};

use super::maps::{BindingMaps, GenerationMaps, SlotTable};
use super::pins::Pins;
use super::{BpfError, LinkProblem, bpffs, syscall, upgrade};
use crate::cgroup;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/idgate"));

/// What `install` found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// Programs that were already attached and pinned, and kept.
    pub adopted: Vec<&'static str>,
    /// Pinned links that held another program (an older agent's), now
    /// holding this agent's.
    pub replaced: Vec<&'static str>,
    /// Programs attached now.
    pub attached: Vec<&'static str>,
    /// Stale links (for another scope) that were detached.
    pub detached: Vec<String>,
    /// Programs this kernel would not take, and why (enforcement of the
    /// others goes on; `idgate status` shows this).
    pub unavailable: Vec<(&'static str, String)>,
}

/// The programs in place and the maps that drive them.
pub struct Enforcer {
    pub bindings: BindingMaps,
    pub slots: SlotTable,
    pub attachment: Attachment,
    /// Exec notices from the tracepoint, while the agent runs; `None` when
    /// the tracepoint could not be attached (the periodic resync covers).
    pub exec_notices: Option<ExecNotices>,
    /// Handles that put back pins removed by hand.
    pub pins: Pins,
}

/// The exec tracepoint's link (detached when dropped) and its ring buffer.
pub struct ExecNotices {
    pub ring: RingBuf<MapData>,
    _link: RawTracePointLink,
}

impl std::os::fd::AsRawFd for ExecNotices {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

fn link_name(program: &str, scope_id: u64) -> String {
    format!("{program}@{scope_id}")
}

/// Loads the object (reusing pinned maps), tells the programs where the
/// scope is (`scope_level`: its depth below the cgroup v2 root), attaches
/// every program that is not already attached for `scope_dir`, and pins
/// it.
pub fn install(
    pin_dir: &Path,
    scope_dir: &Path,
    scope_level: u32,
    max_workloads: u32,
) -> Result<(Enforcer, GenerationMaps), BpfError> {
    bpffs::ensure(pin_dir)?;
    upgrade::remove_retired_maps(pin_dir)?;
    let tries_changed = upgrade::remove_changed_tries(pin_dir)?;
    let scope_id = cgroup::cgroup_id(scope_dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        // BTF-defined maps carry no pinning of their own.
        .map_pin_path(maps::SLOT_DESTS, pin_dir.join(maps::SLOT_DESTS))
        .map_pin_path(maps::SLOT_PORTS, pin_dir.join(maps::SLOT_PORTS))
        .map_max_entries(maps::IDENTITIES, max_workloads)
        .map_max_entries(maps::BINDING_EXPIRY, max_workloads)
        .load(OBJECT)?;
    let mut scope_map: Array<&mut MapData, Scope> = Array::try_from(
        ebpf.map_mut(maps::SCOPE)
            .ok_or(BpfError::MissingMap(maps::SCOPE))?,
    )
    .map_err(|source| BpfError::Map {
        name: maps::SCOPE,
        source,
    })?;
    scope_map
        .set(
            0,
            Scope {
                cgroup_id: scope_id,
                level: scope_level,
                _pad: 0,
            },
            0,
        )
        .map_err(|source| BpfError::Map {
            name: maps::SCOPE,
            source,
        })?;
    let mut attachment = Attachment {
        adopted: Vec::new(),
        replaced: Vec::new(),
        attached: Vec::new(),
        detached: Vec::new(),
        unavailable: Vec::new(),
    };
    let scope = File::open(scope_dir).map_err(|source| BpfError::Io {
        path: scope_dir.to_owned(),
        source,
    })?;
    let mut staged = Vec::new();
    // The kernel's programs, read once when a pin is first found.
    let mut loaded = None;
    for name in programs::PINNED {
        let pin = pin_dir.join(link_name(name, scope_id));
        let tag = load(&mut ebpf, name)?;
        if !pin.exists() {
            pin_link(attach(&mut ebpf, name, &scope)?, &pin)?;
            attachment.attached.push(name);
        } else if !tries_changed && pinned_tag(&pin, loaded.get_or_insert_with(loaded_tags))? == tag
        {
            attachment.adopted.push(name);
        } else {
            staged.push((stage(attach(&mut ebpf, name, &scope)?, &pin)?, pin));
            attachment.replaced.push(name);
        }
    }
    for (staged, pin) in staged {
        std::fs::rename(&staged, &pin).map_err(|source| BpfError::Io {
            path: pin.clone(),
            source,
        })?;
        tracing::warn!(pin = %pin.display(), "replaced a pinned link that held another program");
    }
    let exec_notices = match watch_exec(&mut ebpf) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "exec is not watched: attestation after exec waits for the periodic resync");
            attachment.unavailable.push((programs::EXEC, e.to_string()));
            None
        }
    };
    attachment.detached = detach_stale(pin_dir, scope_id)?;
    let bindings = BindingMaps::new(|name| ebpf.take_map(name))?;
    let generations = GenerationMaps::new(|name| ebpf.take_map(name))?;
    let slots = SlotTable::new(
        ebpf.take_map(maps::SLOT_IDS)
            .ok_or(BpfError::MissingMap(maps::SLOT_IDS))?,
    )?;
    let links = programs::PINNED
        .iter()
        .map(|p| pin_dir.join(link_name(p, scope_id)))
        .collect();
    let enforcer = Enforcer {
        bindings,
        slots,
        attachment,
        exec_notices,
        pins: Pins::open(pin_dir, links)?,
    };
    Ok((enforcer, generations))
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), BpfError> {
    link.pin(pin).map_err(|e| BpfError::Link {
        path: pin.to_owned(),
        what: "cannot pin",
        source: e.into(),
    })?;
    Ok(())
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Attaches the exec tracepoint for as long as the returned value lives.
fn watch_exec(ebpf: &mut Ebpf) -> Result<ExecNotices, BpfError> {
    let name = programs::EXEC;
    let program_err = |source| BpfError::Program { name, source };
    let program: &mut RawTracePoint = program_mut(ebpf, name)?;
    program.load().map_err(program_err)?;
    let id = program.attach("sched_process_exec").map_err(program_err)?;
    let link = program.take_link(id).map_err(program_err)?;
    let ring = RingBuf::try_from(
        ebpf.take_map(maps::EXEC_NOTICES)
            .ok_or(BpfError::MissingMap(maps::EXEC_NOTICES))?,
    )
    .map_err(|source| BpfError::Map {
        name: maps::EXEC_NOTICES,
        source,
    })?;
    Ok(ExecNotices { ring, _link: link })
}

/// Loads one of the cgroup programs; returns its tag (the kernel's hash
/// of its instructions, map references left out), which tells this
/// agent's program from another build's.
fn load(ebpf: &mut Ebpf, name: &'static str) -> Result<u64, BpfError> {
    let program_err = |source| BpfError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
    .map_err(program_err)?;
    Ok(program.info().map_err(program_err)?.tag())
}

/// Attaches a loaded cgroup program to the scope; the link stays attached
/// for as long as it is held or pinned.
fn attach(ebpf: &mut Ebpf, name: &'static str, scope: &File) -> Result<FdLink, BpfError> {
    let program_err = |source| BpfError::Program { name, source };
    let link_err = |e: aya::programs::links::LinkError| BpfError::Link {
        path: PathBuf::from(name),
        what: "cannot take the attached link",
        source: e.into(),
    };
    // With bpf links only `Single` is accepted (the kernel attaches links
    // as multi-attach; a descendant's own programs can add denials, never
    // lift ours).
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => {
            let id = p
                .attach(scope, CgroupAttachMode::Single)
                .map_err(program_err)?;
            p.take_link(id)
                .map_err(program_err)?
                .try_into()
                .map_err(link_err)
        }
        Some(Program::CgroupSock(p)) => {
            let id = p
                .attach(scope, CgroupAttachMode::Single)
                .map_err(program_err)?;
            p.take_link(id)
                .map_err(program_err)?
                .try_into()
                .map_err(link_err)
        }
        _ => Err(program_err(
            aya::programs::ProgramError::UnexpectedProgramType,
        )),
    }
}

/// The tag of every program loaded in the kernel, by program id.
fn loaded_tags() -> HashMap<u32, u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.tag()))
        .collect()
}

/// The tag of the program behind a pinned link, found in `loaded`.
fn pinned_tag(pin: &Path, loaded: &HashMap<u32, u64>) -> Result<u64, BpfError> {
    let unusable = |source: LinkProblem| BpfError::Link {
        path: pin.to_owned(),
        what: "pinned but not a usable link",
        source,
    };
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| unusable(e.into()))?);
    let id = link.info().map_err(|e| unusable(e.into()))?.program_id();
    loaded
        .get(&id)
        .copied()
        .ok_or_else(|| unusable(LinkProblem::ProgramGone(id)))
}

/// Pins `link` (already attached) under a staging name next to `pin`,
/// and returns that path. Until it is renamed over `pin`, both programs
/// run; a staged pin left by a crash is removed as a stale link.
fn stage(link: FdLink, pin: &Path) -> Result<PathBuf, BpfError> {
    // Not `.new`: bpffs refuses names with a dot.
    let mut staged = pin.as_os_str().to_owned();
    staged.push("-staged");
    let staged = PathBuf::from(staged);
    match std::fs::remove_file(&staged) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(BpfError::Io {
                path: staged,
                source: e,
            });
        }
        _ => {}
    }
    pin_link(link, &staged)?;
    Ok(staged)
}

/// Detaches and unpins links of this agent's programs that belong to another scope.
fn detach_stale(pin_dir: &Path, scope_id: u64) -> Result<Vec<String>, BpfError> {
    let mut detached = Vec::new();
    for path in pinned_links(pin_dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else { continue };
        if !name.ends_with(&format!("@{scope_id}")) {
            remove_link(&path)?;
            tracing::warn!(link = %name, "detached a link left for another scope");
            detached.push(name);
        }
    }
    Ok(detached)
}

/// Every link pin of idgate's programs in `pin_dir`.
fn pinned_links(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    Ok(bpffs::pins(pin_dir)?
        .into_iter()
        .filter(|(name, _)| {
            name.split_once('@')
                .is_some_and(|(prog, _)| programs::PINNED.contains(&prog))
        })
        .map(|(_, path)| path)
        .collect())
}

/// Detaches the link pinned at `path` and removes the pin; enforcement by
/// its program has ended when this returns.
fn remove_link(path: &Path) -> Result<(), BpfError> {
    syscall::detach_pinned(path).map_err(|source| BpfError::Io {
        path: path.to_owned(),
        source,
    })?;
    bpffs::unpin(path)
}

/// What [`uninstall`] found and did.
#[derive(Debug)]
pub enum Uninstalled {
    /// No bpffs holds the pin directory (none is mounted where it would
    /// be): nothing can be pinned there, and nothing was removed. Uninstall
    /// never mounts one: a mount would hide another one that a process
    /// starting at the same moment makes.
    NoBpffs,
    /// The pins removed; none when the pin directory is not there.
    Removed(Vec<PathBuf>),
}

/// Removes every pin idgate made: its links, detached first, and its maps.
/// Never mounts anything.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, BpfError> {
    if !bpffs::holds_pins(pin_dir) {
        return Ok(Uninstalled::NoBpffs);
    }
    if !pin_dir.exists() {
        return Ok(Uninstalled::Removed(Vec::new()));
    }
    let links = pinned_links(pin_dir)?;
    for path in &links {
        remove_link(path)?;
    }
    let maps: Vec<PathBuf> = maps::ALL
        .iter()
        .map(|m| pin_dir.join(m))
        .filter(|p| p.exists())
        .collect();
    for path in &maps {
        bpffs::unpin(path)?;
    }
    let mut removed = links;
    removed.extend(maps);
    // Only an empty directory goes: anything else in it is not ours.
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        tracing::warn!(path = %pin_dir.display(), error = %e, "pin directory left in place");
    }
    Ok(Uninstalled::Removed(removed))
}
