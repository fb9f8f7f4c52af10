//! `cgroup/sock_create` on the scope: a raw IPv4 or IPv6 socket never
//! passes the connect and sendmsg hooks, so a managed workload may only
//! make one when its identity's policy says so. (Packet sockets are not
//! inet sockets and do not reach this hook: they need CAP_NET_RAW, which a
//! managed workload must not have; see docs/architecture.md.)

use aya_ebpf::{helpers::bpf_get_current_cgroup_id, macros::cgroup_sock, programs::SockContext};
use core::ptr::{addr_of, read_volatile};
use idgate_common::{slot_policy, slot_policy_index, slot_state};

use crate::{GENERATION, SLOT_POLICY, SLOT_STATE, slot_of};

const SOCK_RAW: u32 = 3;

/// 1 lets the socket be made; 0 fails `socket()` with EPERM.
#[cgroup_sock(sock_create)]
pub fn idgate_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the hook's socket, valid for the call; one field, one load.
    let kind = unsafe { read_volatile(addr_of!((*ctx.sock).type_)) };
    i32::from(kind != SOCK_RAW || raw_sockets_allowed())
}

/// The caller's identity may have raw sockets: bound, not revoked, and
/// its policy in the active generation says so.
#[inline(always)]
fn raw_sockets_allowed() -> bool {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let slot = slot_of(cgroup);
    let state = SLOT_STATE.get(slot).copied().unwrap_or(slot_state::REVOKED);
    if state & slot_state::REVOKED != 0 {
        return false;
    }
    let generation = GENERATION.get(0).copied().unwrap_or(0) & 1;
    SLOT_POLICY
        .get(slot_policy_index(generation, slot))
        .is_some_and(|p| {
            p.flags & slot_policy::PRESENT != 0 && p.flags & slot_policy::RAW_SOCKETS != 0
        })
}
