//! The kernel half of the egress broker, end to end: a workload's TCP
//! connect to a learned address of a credential rule's host goes to the
//! broker's listening socket (here a plain TCP listener the test opens
//! and registers, standing in for the agent's broker) at the loopback
//! address of the workload's slot, on the broker's port; without one it
//! fails at once; UDP to the host is denied.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use idgate::dns::EgressMaps;
use idgate_common::EgressSettings;
use idgate_tests::WEB;
use idgate_tests::dns::{DigQuery, DnsServer, NOWHERE, Resolver, Zone, audit, connect};
use idgate_tests::dns::{dns_config, loopback_ip, web_and_other};
use idgate_tests::{
    Agent, Cgroups, assert_schema, events_schema, free_port, probe, require_privileges,
    require_tools, wait_for,
};

/// The DNS path's reserved range, as `dns_config` leaves it.
const RESERVED_NET: u8 = 53;

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `socket` is in.
fn netns_cookie(socket: &impl AsRawFd) -> u64 {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid descriptor, and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_NETNS_COOKIE: {}",
        std::io::Error::last_os_error()
    );
    cookie
}

/// The records of the audit log at `log` with `reason`, once there is one.
fn records(log: &std::path::Path, reason: &str) -> Vec<serde_json::Value> {
    wait_for(
        &format!("a record with reason {reason}"),
        Duration::from_secs(5),
        || {
            let found: Vec<_> = audit(log)
                .into_iter()
                .filter(|e| e["reason"] == reason)
                .collect();
            (!found.is_empty()).then_some(found)
        },
    )
}

#[test]
fn a_credential_host_s_connects_go_to_the_broker_s_listener() {
    require_privileges!();
    require_tools!("dnsmasq", "dig");
    let api = Ipv4Addr::new(127, 0, 0, 1);
    let zone = Zone::new().host("api.broker.example", &[IpAddr::V4(api)], 300);
    let upstream = DnsServer::start(SocketAddr::new(loopback_ip(), 53), &zone);
    let mut cg = Cgroups::new("broker-redirect");
    let web = cg.inside("web");
    let log = std::env::temp_dir().join(format!("{}-audit.jsonl", cg.name()));
    let _ = std::fs::remove_file(&log);
    let secret = std::env::temp_dir().join(format!("{}-secret", cg.name()));
    std::fs::write(&secret, "sk-test").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let policy = format!(
        "[[identity]]\nid = \"{WEB}\"\n[[identity.credential]]\nname = \"api-key\"\nhost = \"api.broker.example\"\nheader = \"x-api-key\"\nsecret_file = {secret:?}\n"
    );
    let agent = Agent::start(
        &cg,
        &policy,
        &format!(
            "{}{}",
            web_and_other(),
            dns_config(upstream.addr(), &log, "private_answers = \"allow\"")
        ),
    );

    // The host is a name WEB may look up.
    let answer = Resolver::new(&[NOWHERE])
        .in_cgroup(&web)
        .dig(&DigQuery::new("api.broker.example"));
    assert_eq!(answer.addrs, vec![IpAddr::V4(api)], "{answer:?}");

    // No broker yet: denied at once, with a record naming the rule.
    assert_eq!(connect(&web, "127.0.0.1", 443), "EPERM");
    let not_ready = records(&log, "egress_not_ready");
    assert_eq!(not_ready[0]["rule"], "api-key");
    assert_eq!(not_ready[0]["verdict"], "deny");

    // A broker: its listener, in the workload's (here the host's)
    // namespace, and the settings.
    let tls_port = free_port();
    let listener = TcpListener::bind(("0.0.0.0", tls_port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut maps = EgressMaps::open(&agent.pin_path()).unwrap();
    maps.listening(netns_cookie(&listener), &listener).unwrap();
    maps.set(EgressSettings {
        enabled: 1,
        tls_port: u32::from(tls_port),
        http_port: u32::from(free_port()),
        _pad: 0,
    })
    .unwrap();

    // The connect to the real address and port reaches the listener, at
    // the address of WEB's slot.
    assert_eq!(probe(Some(&web), "tcp", "127.0.0.1:443"), "ok");
    let (conn, _) = listener.accept().expect("the redirected connection");
    let local = conn.local_addr().unwrap();
    let IpAddr::V4(to) = local.ip() else {
        panic!("{local}")
    };
    assert_eq!(local.port(), tls_port);
    assert_eq!(to.octets()[..2], [127, RESERVED_NET], "{local}");
    let brokered = records(&log, "brokered");
    assert_eq!(brokered[0]["rule"], "api-key");
    assert_eq!(brokered[0]["verdict"], "allow");
    assert_eq!(brokered[0]["dst_port"], 443);
    assert_eq!(brokered[0]["dst_name"], "api.broker.example");
    assert_schema(&events_schema(), &brokered[0]);

    // Port 80 is not the rule's (no `http`), and UDP to the host is
    // denied (QUIC falls back to TCP).
    assert_eq!(connect(&web, "127.0.0.1", 80), "EPERM");
    assert_eq!(probe(Some(&web), "udp-sendto", "127.0.0.1:443"), "EPERM");

    // The listener closed: the kernel forgets it, and connects fail at
    // once again.
    drop(listener);
    assert_eq!(connect(&web, "127.0.0.1", 443), "EPERM");
    drop(agent);
    let _ = std::fs::remove_file(&secret);
    let _ = std::fs::remove_file(&log);
}
