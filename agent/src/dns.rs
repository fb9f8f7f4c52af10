//! The DNS path (names in policy), as a library: the `[dns]` settings,
//! the messages, and the client of the upstream resolvers.
//!
//! A rule's `to` may name hosts. The kernel cannot resolve names, so the
//! agent learns, per identity, which addresses a name had when that
//! identity looked it up (docs/architecture.md, "The DNS path"):
//!
//! 1. The kernel redirects a workload's query for `NS:53` to the agent's
//!    listener at `127.N.(slot >> 8).(slot & 255):listen_port` of the
//!    workload's network namespace; the listener reads the slot (so the
//!    identity) from that destination address, never from the packet.
//! 2. [`parse_query`] checks the query: one question, opcode QUERY. A
//!    query that cannot be read gets [`formerr`] when its header can
//!    ([`QueryError::answerable_id`]), else it is dropped.
//! 3. The name must be covered by a name rule of the identity's policy,
//!    else [`refused`] (audit mode: forwarded, and recorded).
//! 4. [`Upstream::exchange`] forwards it to the configured upstreams
//!    (never to `NS`), with a fresh id, over UDP then TCP when truncated.
//! 5. [`filter_answer`] keeps the records the question reaches through its
//!    CNAME chain, drops the address hints of HTTPS/SVCB records, drops
//!    private-range addresses unless `private_answers = "allow"`, caps the
//!    TTLs, and lists the addresses learned with the TTL handed out.
//! 6. The caller writes each learned address into the kernel's learned
//!    map with an expiry of TTL + `grace`, and only once the update has
//!    returned answers the workload; when it cannot, [`servfail`].
//!
//! [`DnsPath`] runs it: the listeners of every network namespace
//! (`listener`, `server`), the per-query pipeline (`resolver`), the
//! learned addresses and their maps (`learned`, `kernel`), and the view of
//! the owner's state it reads (`view`).

mod config;
mod handover;
mod inspect;
mod kernel;
mod learned;
mod listener;
mod lookup;
mod message;
mod metrics;
mod path;
mod resolver;
mod server;
mod upstream;
mod view;

pub use config::{
    DnsConfig, DnsConfigError, PrivateAnswers, RESOLV_CONF, ResolvConf, ResolvConfError,
    UpstreamSource, in_reserved, parse_resolv_conf,
};
pub use handover::{Handover, HandoverError};
pub use inspect::{DnsReader, Figures};
pub use kernel::{EgressMaps, KernelError};
pub use learned::{LearnError, Learned, LearnedAddress, NameBook};
pub use listener::tcp_on_loopback;
pub use lookup::{HostLookup, LookupError};
pub use message::{
    AnswerError, Answered, DropReason, FilterOptions, Filtered, MAX_MESSAGE, Query, QueryError,
    answered_addresses, check_answers, filter_answer, formerr, not_found, parse_query, refused,
    servfail, truncated, udp_limit,
};
pub use metrics::DnsMetrics;
pub use path::{DnsPath, DnsPathError, DnsSenders, EgressListening};
pub use resolver::{DnsRecord, GrantAddresses, Outcome};
pub use upstream::{ExchangeError, Upstream, UpstreamError};
pub use view::{Asker, DnsView, GrantedName};
