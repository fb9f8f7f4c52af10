//! The fixture the enforcement and events tests share: loopback listeners
//! outside every scope, and a policy in which the `web` identity may reach
//! TCP on 127.0.0.1 and ::1 at the listeners' TCP port, and unknown
//! workloads nothing.

use crate::Listeners;

/// The identity the fixture's policy allows the TCP port to.
pub const WEB: &str = "spiffe://example.org/web";

/// Listeners, and the policy that names their ports; they listen while
/// this lives.
pub struct Fixture {
    _listeners: Listeners,
    pub tcp_port: u16,
    pub udp_port: u16,
}

impl Fixture {
    pub fn new() -> Self {
        let listeners = Listeners::new();
        Self {
            tcp_port: listeners.tcp_port,
            udp_port: listeners.udp_port,
            _listeners: listeners,
        }
    }

    /// `[unknown]` denies everything; `web` denies by default and has the
    /// rule `tcp-local` to the TCP port, then the `[[identity.egress]]`
    /// tables (and further `[[identity]]` tables) in `more`.
    pub fn policy(&self, more: &str) -> String {
        format!(
            r#"
            [unknown]
            default = "deny"

            [[identity]]
            id = "{WEB}"
            default = "deny"

            [[identity.egress]]
            name = "tcp-local"
            to = ["127.0.0.1/32", "::1/128"]
            ports = [{tcp}]
            protocol = "tcp"
            action = "allow"
            {more}"#,
            tcp = self.tcp_port,
        )
    }

    /// The allowed TCP destination on 127.0.0.1.
    pub fn tcp4(&self) -> String {
        format!("127.0.0.1:{}", self.tcp_port)
    }

    /// 127.0.0.1 at the port after the TCP one: `tcp-local` does not
    /// allow it.
    pub fn next_tcp4(&self) -> String {
        format!("127.0.0.1:{}", self.tcp_port + 1)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}
