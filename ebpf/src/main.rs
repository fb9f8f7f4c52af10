//! idgate's kernel programs: one thin entry per cgroup sock_addr hook, all
//! calling [`decide`]. The lookup chain is described in `idgate-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};
use core::ptr::{addr_of, read_volatile};
use idgate_common::{
    DEST_FIXED_BITS, DestTables, DestV4, DestV6, GENERATIONS, MAX_BOUND_CGROUPS, MAX_DEST_ENTRIES,
    MAX_PORT_ENTRIES, MAX_SLOTS, NO_TABLE, PORT_FIXED_BITS, PortKey, RuleVerdict, SlotPolicy,
    UNKNOWN_SLOT, slot_policy, slot_policy_index, slot_state, verdict,
};

#[map(name = "IDG_IDENTITIES")]
static IDENTITIES: HashMap<u64, u32> = HashMap::pinned(MAX_BOUND_CGROUPS, 0);

#[map(name = "IDG_SLOT_STATE")]
static SLOT_STATE: Array<u32> = Array::pinned(MAX_SLOTS, 0);

#[map(name = "IDG_GENERATION")]
static GENERATION: Array<u32> = Array::pinned(1, 0);

#[map(name = "IDG_SLOT_POLICY")]
static SLOT_POLICY: Array<SlotPolicy> = Array::pinned(GENERATIONS * MAX_SLOTS, 0);

#[map(name = "IDG_DEST_V4")]
static DEST_V4: LpmTrie<DestV4, DestTables> = LpmTrie::pinned(MAX_DEST_ENTRIES, 0);

#[map(name = "IDG_DEST_V6")]
static DEST_V6: LpmTrie<DestV6, DestTables> = LpmTrie::pinned(MAX_DEST_ENTRIES, 0);

#[map(name = "IDG_PORTS")]
static PORTS: LpmTrie<PortKey, RuleVerdict> = LpmTrie::pinned(MAX_PORT_ENTRIES, 0);

/// Not read here: the agent keeps its slot table in it (see idgate-common).
#[map(name = "IDG_SLOT_IDS")]
static SLOT_IDS: Array<[u8; 32]> = Array::pinned(MAX_SLOTS, 0);

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_MPTCP: u32 = 262;

/// A destination as the hook saw it, in network byte order.
enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[cgroup_sock_addr(connect4)]
pub fn idgate_connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, dest_v4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn idgate_connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, dest_v6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn idgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, dest_v4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn idgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, dest_v6(&ctx))
}

// Context fields are read one at a time with volatile loads: the verifier
// rejects a load that spans two fields, which LLVM may otherwise merge.

fn dest_v4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: the pointer is the hook's context, valid for the whole call.
    let ip = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) };
    Dest::V4(ip.to_ne_bytes())
}

fn dest_v6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in `dest_v4`.
    let w = unsafe {
        [
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[0])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[1])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[2])),
            read_volatile(addr_of!((*ctx.sock_addr).user_ip6[3])),
        ]
    };
    // `::ffff:a.b.c.d` reaches an IPv4 host: judge it by the IPv4 rules.
    if w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0xffff) {
        return Dest::V4(w[3].to_ne_bytes());
    }
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    Dest::V6(addr)
}

/// The verdict for one connect or send: 1 lets it through, 0 fails it with
/// EPERM. Every miss on the way falls to a deny or to a default that user
/// space chose; nothing falls open.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dest: Dest) -> i32 {
    // SAFETY: as in `dest_v4`.
    let (protocol, user_port) = unsafe {
        (
            read_volatile(addr_of!((*ctx.sock_addr).protocol)),
            read_volatile(addr_of!((*ctx.sock_addr).user_port)),
        )
    };
    // The identity is that of the task making the call, in the cgroup it is
    // in now (`bpf_sk_cgroup_id` is not allowed in these hooks). Which
    // programs run at all is decided by the socket's cgroup, so a socket
    // made outside the scope is not judged here: see docs/architecture.md.
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };

    // SAFETY: plain value reads from maps owned by this program.
    let slot = unsafe { IDENTITIES.get(&cgroup) }
        .copied()
        .unwrap_or(UNKNOWN_SLOT);
    let state = SLOT_STATE.get(slot).copied().unwrap_or(slot_state::REVOKED);
    if state & slot_state::REVOKED != 0 {
        return verdict::DENY as i32;
    }
    let generation = GENERATION.get(0).copied().unwrap_or(0) & 1;
    let Some(policy) = SLOT_POLICY.get(slot_policy_index(generation, slot)) else {
        return verdict::DENY as i32;
    };
    if policy.flags & slot_policy::PRESENT == 0 {
        return verdict::DENY as i32;
    }

    let tables = match dest {
        Dest::V4(addr) => DEST_V4
            .get(Key::new(
                DEST_FIXED_BITS + 32,
                DestV4 {
                    generation,
                    slot,
                    addr,
                },
            ))
            .copied(),
        Dest::V6(addr) => DEST_V6
            .get(Key::new(
                DEST_FIXED_BITS + 128,
                DestV6 {
                    generation,
                    slot,
                    addr,
                },
            ))
            .copied(),
    };
    let table = match (tables, protocol) {
        (Some(t), IPPROTO_TCP | IPPROTO_MPTCP) => t.tcp,
        (Some(t), IPPROTO_UDP) => t.udp,
        _ => NO_TABLE,
    };
    let mut decided = policy.default_verdict;
    if table != NO_TABLE {
        let port = u16::from_be(user_port as u16).to_be_bytes();
        let key = PortKey {
            generation,
            table,
            port,
            _pad: [0; 2],
        };
        if let Some(rule) = PORTS.get(Key::new(PORT_FIXED_BITS + 16, key)) {
            decided = rule.verdict;
        }
    }
    if decided == verdict::ALLOW || policy.flags & slot_policy::AUDIT != 0 {
        verdict::ALLOW as i32
    } else {
        verdict::DENY as i32
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
