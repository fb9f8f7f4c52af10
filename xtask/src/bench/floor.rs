//! Configuration (e), the floor: on each of the five hooks idgate's
//! programs use (`common::programs::PINNED`), a program that does nothing
//! but allow, attached to a workload cgroup of its own.
//!
//! Why it exists: a cgroup hook costs something before any program on it
//! decides anything, so no policy engine on these hooks can be faster than
//! a program that allows at once. Measured in the same rounds as the other
//! configurations, it shows how much of idgate's figures over (a) is the
//! price of being on these hooks at all.
//!
//! The programs are two instructions each (`r0 = 1; exit`), loaded with
//! `bpf(2)` directly (no object file, no loader library) and attached with
//! BPF links that are not pinned: dropping [`Floor`] closes the links'
//! descriptors, which detaches the programs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// `enum bpf_cmd`.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
/// `enum bpf_prog_type`.
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// Bytes of the verifier's log, printed when a program is refused.
const LOG_BYTES: usize = 64 * 1024;

/// One of the hooks idgate attaches to.
pub struct Hook {
    prog_type: u32,
    /// `enum bpf_attach_type`.
    attach_type: u32,
    /// The attach type as bpftool names it.
    pub attach_name: &'static str,
    /// The program's name (at most 15 bytes).
    prog_name: &'static str,
}

/// idgate's five hooks.
pub const HOOKS: [Hook; 5] = [
    Hook {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: 10, // BPF_CGROUP_INET4_CONNECT
        attach_name: "cgroup_inet4_connect",
        prog_name: "floor_connect4",
    },
    Hook {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: 11, // BPF_CGROUP_INET6_CONNECT
        attach_name: "cgroup_inet6_connect",
        prog_name: "floor_connect6",
    },
    Hook {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: 14, // BPF_CGROUP_UDP4_SENDMSG
        attach_name: "cgroup_udp4_sendmsg",
        prog_name: "floor_sendmsg4",
    },
    Hook {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type: 15, // BPF_CGROUP_UDP6_SENDMSG
        attach_name: "cgroup_udp6_sendmsg",
        prog_name: "floor_sendmsg6",
    },
    Hook {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK,
        attach_type: 2, // BPF_CGROUP_INET_SOCK_CREATE
        attach_name: "cgroup_inet_sock_create",
        prog_name: "floor_sock",
    },
];

/// `struct bpf_insn`: the register byte holds `dst_reg` in its low four
/// bits and `src_reg` in its high four.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = 1; exit`: allow.
const ALLOW: [Insn; 2] = [
    // BPF_MOV64_IMM(BPF_REG_0, 1): BPF_ALU64 | BPF_MOV | BPF_K.
    Insn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm: 1,
    },
    // BPF_EXIT_INSN(): BPF_JMP | BPF_EXIT.
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// The start of `union bpf_attr` as `BPF_PROG_LOAD` reads it, up to
/// `expected_attach_type`; the kernel takes the fields after it as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The start of `union bpf_attr` as `BPF_LINK_CREATE` reads it, up to
/// `flags`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

const _: () = assert!(size_of::<ProgLoadAttr>() == 72 && size_of::<LinkCreateAttr>() == 16);

/// The five programs, attached to one cgroup while this lives.
pub struct Floor {
    cgroup: PathBuf,
    /// One BPF link per hook; closing it detaches its program.
    _links: Vec<OwnedFd>,
}

impl Floor {
    /// Loads the programs and links each to `cgroup`.
    pub fn attach(cgroup: &Path) -> Result<Self> {
        let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let links = HOOKS
            .iter()
            .map(|hook| {
                let prog = load(hook)?;
                link(&prog, &dir, hook).with_context(|| {
                    format!(
                        "linking {} to {} ({})",
                        hook.prog_name,
                        cgroup.display(),
                        hook.attach_name
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cgroup: cgroup.to_owned(),
            _links: links,
        })
    }

    /// Proof that the programs are in force: what the kernel runs for the
    /// cgroup (`bpftool cgroup show CGROUP effective`, so inherited
    /// programs too) is these five, one on each hook, and nothing else.
    pub fn check(&self) -> Result<()> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&self.cgroup)
            .arg("effective")
            .output()
            .context("running bpftool cgroup show")?;
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parsing bpftool cgroup show {}: {}",
                self.cgroup.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        let mut attached: Vec<(&str, &str)> = shown
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["attach_type"].as_str().unwrap_or("?"),
                    p["name"].as_str().unwrap_or("?"),
                )
            })
            .collect();
        let mut expected: Vec<(&str, &str)> =
            HOOKS.iter().map(|h| (h.attach_name, h.prog_name)).collect();
        attached.sort_unstable();
        expected.sort_unstable();
        if attached != expected {
            bail!(
                "{} runs {attached:?}, not the empty programs {expected:?}",
                self.cgroup.display()
            );
        }
        Ok(())
    }
}

/// Programs attached to any cgroup of the machine on one of [`HOOKS`]
/// (`bpftool cgroup tree`), as `(cgroup, attach type, name)`.
pub fn attached_anywhere() -> Result<Vec<(String, String, String)>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "tree"])
        .output()
        .context("running bpftool cgroup tree")?;
    let tree: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing bpftool cgroup tree: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    Ok(tree
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|cgroup| {
            cgroup["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |p| {
                    (
                        text(&cgroup["cgroup"]),
                        text(&p["attach_type"]),
                        text(&p["name"]),
                    )
                })
        })
        .filter(|(_, attach, _)| HOOKS.iter().any(|h| h.attach_name == attach))
        .collect())
}

/// Loads [`ALLOW`] for `hook`; the verifier's log is in the error if the
/// kernel refuses it.
fn load(hook: &Hook) -> Result<OwnedFd> {
    let mut log = vec![0u8; LOG_BYTES];
    let mut attr = ProgLoadAttr {
        prog_type: hook.prog_type,
        insn_cnt: ALLOW.len() as u32,
        insns: ALLOW.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 1,
        log_size: LOG_BYTES as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: hook.attach_type,
        ..Default::default()
    };
    attr.prog_name[..hook.prog_name.len()].copy_from_slice(hook.prog_name.as_bytes());
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "loading {} (BPF_PROG_LOAD); the verifier's log: {:?}",
            hook.prog_name,
            String::from_utf8_lossy(&log[..end]).trim()
        )
    })
}

/// Links `prog` to the cgroup open as `cgroup` on `hook`.
fn link(prog: &OwnedFd, cgroup: &File, hook: &Hook) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: hook.attach_type,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")
}

/// `bpf(cmd, attr, sizeof attr)` for a command that makes a descriptor.
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a repr(C) start of `union bpf_attr` for `cmd`, and
    // its size is passed with it; the pointers in it (instructions,
    // license, log) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}
