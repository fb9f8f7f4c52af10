//! The DNS path's kernel half: a workload's query (port 53, UDP or TCP) is
//! sent to the agent's resolver at a loopback address that names the
//! asker's identity slot, and the reply is given back the address of the
//! server the workload asked. See "The DNS path" in docs/architecture.md.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap, SockHash},
    programs::SockAddrContext,
};
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use idgate_common::{
    DnsOrigin, DnsSettings, FAMILY_V4, FAMILY_V6, dns_address, reason, slot_policy,
    slot_policy_index,
};

use crate::{Dest, GENERATION, SLOT_POLICY};

#[map(name = "IDG_DNS_SETTINGS")]
pub(crate) static DNS_SETTINGS: Array<DnsSettings> = Array::pinned(1, 0);

/// Network-namespace cookie -> the resolver's UDP socket there. The
/// kernel removes an entry when its socket closes, so while no agent
/// listens (stopped, crashed) a query fails at once instead of waiting
/// for an answer that never comes.
#[map(name = "IDG_DNS_NETNS")]
static DNS_NETNS: SockHash<u64> = SockHash::pinned(MAX_NAMESPACES, 0);

/// Namespaces with listeners at once.
pub(crate) const MAX_NAMESPACES: u32 = 16_384;

/// Sockets whose query origin is remembered. An entry pushed out only
/// means a reply whose source is not restored, which the client drops:
/// the lookup fails, it never opens anything.
#[map(name = "IDG_DNS_ORIGINS")]
static DNS_ORIGINS: LruHashMap<u64, DnsOrigin> = LruHashMap::pinned(65_536, 0);

const DNS_PORT: u16 = 53;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// What the DNS path makes of a connect or send.
pub enum Redirect {
    /// Not a query the agent's resolver takes: judge it as any other.
    No,
    /// Sent to the resolver: let the call go on.
    Done,
    /// Denied for the [`reason`] given.
    Deny(u32),
}

/// Sends a query of `slot` to the agent's resolver, or says why not.
#[inline(always)]
pub fn redirect(
    ctx: &SockAddrContext,
    slot: u32,
    protocol: u32,
    port: u16,
    dest: &Dest,
) -> Redirect {
    let Some(settings) = DNS_SETTINGS.get(0) else {
        return Redirect::No;
    };
    if settings.enabled == 0 {
        return Redirect::No;
    }
    if dest.v4 && dns_address::slot(settings.net, dest.v4_bytes()).is_some() {
        return Redirect::Deny(reason::RESERVED);
    }
    if port != DNS_PORT || (protocol != IPPROTO_UDP && protocol != IPPROTO_TCP) || direct(slot) {
        return Redirect::No;
    }
    if !dest.v4 {
        return Redirect::Deny(reason::DNS_V6);
    }
    // SAFETY: the hook's context, valid for the call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    if !listening(&DNS_NETNS, netns) {
        return Redirect::Deny(reason::DNS_NOT_READY);
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let origin = DnsOrigin {
        addr: dest.addr,
        port: u32::from(DNS_PORT.to_be()),
        family: if dest.flags == 0 {
            FAMILY_V4
        } else {
            FAMILY_V6
        },
    };
    if DNS_ORIGINS.insert(&cookie, &origin, 0).is_err() {
        return Redirect::Deny(reason::DNS_NOT_READY);
    }
    to_slot_address(ctx, dest, settings.net, slot, settings.port);
    Redirect::Done
}

/// Rewrites the destination of a connect or send of `slot` to the
/// agent's address for it, `127.net.(slot >> 8).(slot & 255)`, and
/// `port` (host order); in a mapped IPv4 address (`dest.flags`), its last
/// word.
#[inline(always)]
pub fn to_slot_address(ctx: &SockAddrContext, dest: &Dest, net: u32, slot: u32, port: u32) {
    let to = u32::from_ne_bytes(dns_address::of_slot(net, slot));
    let to_port = u32::from((port as u16).to_be());
    // SAFETY: the hook's context; these fields may be written in the
    // connect and sendmsg hooks, one at a time.
    unsafe {
        let sa = ctx.sock_addr;
        if dest.flags == 0 {
            write_volatile(addr_of_mut!((*sa).user_ip4), to);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), to);
        }
        write_volatile(addr_of_mut!((*sa).user_port), to_port);
    }
}

/// Whether `sockets` (a socket hash by network-namespace cookie: the
/// agent's listeners) has a socket open in the namespace with `netns`.
#[inline(always)]
pub(crate) fn listening(sockets: &SockHash<u64>, netns: u64) -> bool {
    // SAFETY: the map is a SOCKHASH, whose lookup takes a reference on
    // the socket found; it is released at once.
    unsafe {
        let sk = bpf_map_lookup_elem(
            sockets as *const SockHash<u64> as *mut c_void,
            addr_of!(netns) as *const c_void,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// The slot's identity resolves by itself (`[dns] direct`).
#[inline(always)]
fn direct(slot: u32) -> bool {
    let generation = GENERATION.get(0).copied().unwrap_or(0) & 1;
    SLOT_POLICY
        .get(slot_policy_index(generation, slot))
        .is_some_and(|p| p.flags & slot_policy::DNS_DIRECT != 0)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn idgate_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn idgate_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn idgate_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn idgate_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true);
    1
}

/// When the address in `ctx` is the resolver's (a reply's source, or a
/// redirected socket's peer), writes back the server the workload asked.
#[inline(always)]
fn restore(ctx: &SockAddrContext, v6: bool) {
    let Some(settings) = DNS_SETTINGS.get(0) else {
        return;
    };
    if settings.enabled == 0 {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the hook's context, valid for the call; one field per load.
    let (ip, port) = unsafe {
        let ip = if v6 {
            let mapped = read_volatile(addr_of!((*sa).user_ip6[0])) == 0
                && read_volatile(addr_of!((*sa).user_ip6[1])) == 0
                && read_volatile(addr_of!((*sa).user_ip6[2])) == u32::from_be(0xffff);
            if !mapped {
                return;
            }
            read_volatile(addr_of!((*sa).user_ip6[3]))
        } else {
            read_volatile(addr_of!((*sa).user_ip4))
        };
        (ip, read_volatile(addr_of!((*sa).user_port)))
    };
    if dns_address::slot(settings.net, ip.to_ne_bytes()).is_none()
        || u16::from_be(port as u16) != settings.port as u16
    {
        return;
    }
    // SAFETY: the hook's context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    // SAFETY: a plain value read from a map owned by this program.
    let Some(origin) = (unsafe { DNS_ORIGINS.get(&cookie) }) else {
        return;
    };
    let a = origin.addr;
    // The server's IPv4 address. A dual-stack socket's datagram to a
    // mapped server went through sendmsg4 (the kernel hands a mapped
    // destination to udp_sendmsg), so its origin is IPv4 while the reply
    // comes back through recvmsg6, mapped; its connect went through
    // connect6, so that origin is the mapped IPv6 address.
    let server = if origin.family == FAMILY_V4 {
        [a[0], a[1], a[2], a[3]]
    } else if v6 && origin.family == FAMILY_V6 {
        [a[12], a[13], a[14], a[15]]
    } else {
        return;
    };
    // SAFETY: the hook's context; these fields may be written here.
    unsafe {
        if v6 {
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), u32::from_ne_bytes(server));
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(server));
        }
        write_volatile(addr_of_mut!((*sa).user_port), origin.port);
    }
}
