//! The DNS messages of the path, parsed, checked and built with
//! hickory-proto: a workload's query, the answers given back to it (the
//! upstream's, filtered, or an error), and which addresses an answer
//! teaches. Pure functions, no I/O.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::ProtoError;
use hickory_proto::op::{self, Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Mandatory, SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::rdata::{CNAME, HTTPS};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::PrivateAnswers;

/// The longest DNS message: what a TCP length prefix can say.
pub const MAX_MESSAGE: usize = u16::MAX as usize;

/// The UDP payload size the agent's own error answers advertise when the
/// query had EDNS (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// A workload's query, checked: one question, opcode QUERY, QR=0.
#[derive(Debug, Clone)]
pub struct Query {
    message: Message,
    name: String,
}

impl Query {
    /// The whole message as parsed.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The workload's message id.
    pub fn id(&self) -> u16 {
        self.message.id()
    }

    /// The question, as the workload wrote it (case kept).
    pub fn question(&self) -> &op::Query {
        &self.message.queries()[0]
    }

    /// The question name, canonical: lowercase ASCII, without the final
    /// dot (the root is `""`). Bytes outside letters, digits, `-`, `_` and
    /// a leading `*` are escaped (`\.`, `\ooo` octal, as hickory writes
    /// them), so such a name matches no name pattern of a policy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The question type.
    pub fn qtype(&self) -> RecordType {
        self.question().query_type()
    }

    /// The question class.
    pub fn qclass(&self) -> DNSClass {
        self.question().query_class()
    }
}

/// Why a message is not a query the agent answers.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("message of {0} bytes is longer than 65535")]
    TooLong(usize),
    #[error("unreadable header: {0}")]
    Header(#[source] ProtoError),
    #[error("a response (QR=1), not a query")]
    Response,
    #[error("malformed query: {source}")]
    Malformed {
        id: u16,
        #[source]
        source: ProtoError,
    },
    #[error("opcode {op} is not QUERY")]
    OpCode { id: u16, op: OpCode },
    #[error("{count} questions, not one")]
    Questions { id: u16, count: usize },
}

impl QueryError {
    /// The id to answer FORMERR with ([`formerr`]), when the header was
    /// readable and the message claims to be a query; `None`: drop it
    /// (never answer a response: that could start a loop).
    pub fn answerable_id(&self) -> Option<u16> {
        match *self {
            Self::Malformed { id, .. } | Self::OpCode { id, .. } | Self::Questions { id, .. } => {
                Some(id)
            }
            Self::TooLong(_) | Self::Header(_) | Self::Response => None,
        }
    }
}

/// Parses and checks a workload's query.
pub fn parse_query(bytes: &[u8]) -> Result<Query, QueryError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(QueryError::TooLong(bytes.len()));
    }
    let header = Header::read(&mut BinDecoder::new(bytes)).map_err(QueryError::Header)?;
    if header.message_type() != MessageType::Query {
        return Err(QueryError::Response);
    }
    let id = header.id();
    let message =
        Message::from_vec(bytes).map_err(|source| QueryError::Malformed { id, source })?;
    if message.op_code() != OpCode::Query {
        return Err(QueryError::OpCode {
            id,
            op: message.op_code(),
        });
    }
    let [question] = message.queries() else {
        return Err(QueryError::Questions {
            id,
            count: message.queries().len(),
        });
    };
    let name = canonical_name(question.name());
    Ok(Query { message, name })
}

/// `name` in lowercase ASCII without the final dot.
fn canonical_name(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

/// REFUSED for `query` (its name is not in the identity's policy).
pub fn refused(query: &Query) -> Vec<u8> {
    error_answer(query, ResponseCode::Refused)
}

/// NXDOMAIN for `query`: the answer to a name no rule of the asking
/// identity covers. Of the refusals it is the one glibc, musl and dig all
/// take as "try the next search domain" (REFUSED and SERVFAIL make musl
/// wait out its timeout and fail), so a Kubernetes-style search list
/// still reaches an allowed name (tests/tests/dns_fixtures.rs measures
/// it).
pub fn not_found(query: &Query) -> Vec<u8> {
    error_answer(query, ResponseCode::NXDomain)
}

/// SERVFAIL for `query` (no upstream answered, or the addresses could not
/// be learned).
pub fn servfail(query: &Query) -> Vec<u8> {
    error_answer(query, ResponseCode::ServFail)
}

/// FORMERR for a query that could not be read past its header (see
/// [`QueryError::answerable_id`]).
pub fn formerr(id: u16) -> Vec<u8> {
    let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
    m.set_recursion_available(true);
    m.to_vec().expect("a header-only message encodes")
}

fn error_answer(query: &Query, rcode: ResponseCode) -> Vec<u8> {
    let asked = query.message();
    let mut m = Message::error_msg(query.id(), OpCode::Query, rcode);
    m.set_recursion_desired(asked.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(asked.checking_disabled())
        .add_query(query.question().clone());
    if asked.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m.to_vec()
        .expect("a message of one parsed question encodes")
}

/// How answers are filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterOptions {
    /// Whether private-range addresses are kept and learned.
    pub private_answers: PrivateAnswers,
    /// Every TTL is capped to this (whole seconds, at most 2^31 - 1).
    pub max_ttl: Duration,
}

impl FilterOptions {
    /// The options `[dns]` asks for.
    pub fn of_config(config: &super::DnsConfig) -> Self {
        Self {
            private_answers: config.private_answers,
            max_ttl: config.max_ttl,
        }
    }

    fn max_ttl_secs(&self) -> u32 {
        u32::try_from(self.max_ttl.as_secs())
            .unwrap_or(u32::MAX)
            .min(i32::MAX as u32)
    }
}

/// Why an address was taken out of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), fc00::/7.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8 ("this network"), ::.
    Unspecified,
    /// 100.64.0.0/10 (carrier-grade NAT, RFC 6598).
    SharedCgnat,
}

impl DropReason {
    /// The reason's name in records and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::Unspecified => "unspecified",
            Self::SharedCgnat => "cgnat",
        }
    }

    /// Why `ip` is not a public address, if it is not; an IPv4-mapped
    /// IPv6 address is judged by the IPv4 address it maps.
    pub fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => {
                let [o0, o1, ..] = a.octets();
                if o0 == 127 {
                    Some(Self::Loopback)
                } else if a.is_private() {
                    Some(Self::Private)
                } else if a.is_link_local() {
                    Some(Self::LinkLocal)
                } else if o0 == 0 {
                    Some(Self::Unspecified)
                } else if o0 == 100 && (o1 & 0xc0) == 64 {
                    Some(Self::SharedCgnat)
                } else {
                    None
                }
            }
            IpAddr::V6(a) => {
                if let Some(v4) = a.to_ipv4_mapped() {
                    return Self::of(IpAddr::V4(v4));
                }
                let first = a.segments()[0];
                if a.is_loopback() {
                    Some(Self::Loopback)
                } else if a.is_unspecified() {
                    Some(Self::Unspecified)
                } else if first & 0xfe00 == 0xfc00 {
                    Some(Self::Private)
                } else if first & 0xffc0 == 0xfe80 {
                    Some(Self::LinkLocal)
                } else {
                    None
                }
            }
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upstream answer made fit for the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The response to give the workload: its own id and question.
    pub bytes: Vec<u8>,
    /// Addresses the question name reaches, with the TTL (seconds) the
    /// answer hands the workload for each; the kernel entry must last at
    /// least that (plus `dns.grace`).
    pub learned: Vec<(IpAddr, u32)>,
    /// Addresses removed from the answer, and why.
    pub dropped: Vec<(IpAddr, DropReason)>,
    /// The upstream's response code.
    pub rcode: ResponseCode,
}

/// Why an upstream's bytes are not an answer to the query.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("message of {0} bytes is longer than 65535")]
    TooLong(usize),
    #[error("malformed answer: {0}")]
    Malformed(#[source] ProtoError),
    #[error("the answer does not match the query: {0}")]
    Mismatch(&'static str),
    #[error("cannot encode the filtered answer: {0}")]
    Encode(#[source] ProtoError),
}

/// Checks that `reply` answers `query`: QR=1, opcode QUERY, the one
/// question of the same name (any case), type and class. The id is the
/// caller's to check.
pub fn check_answers(query: &Query, reply: &Message) -> Result<(), AnswerError> {
    if reply.message_type() != MessageType::Response {
        return Err(AnswerError::Mismatch("not a response (QR=0)"));
    }
    if reply.op_code() != OpCode::Query {
        return Err(AnswerError::Mismatch("opcode is not QUERY"));
    }
    let [q] = reply.queries() else {
        return Err(AnswerError::Mismatch("not exactly one question"));
    };
    let asked = query.question();
    if q.name() != asked.name() {
        return Err(AnswerError::Mismatch("question name differs"));
    }
    if q.query_type() != asked.query_type() || q.query_class() != asked.query_class() {
        return Err(AnswerError::Mismatch("question type or class differs"));
    }
    Ok(())
}

/// Filters the upstream's answer to `query` (see the module doc of
/// `dns`): keeps the records the question name reaches through its CNAME
/// chain in the answer section, learns their A/AAAA addresses (public
/// ones, or all with `private_answers = allow`), removes the address
/// hints of HTTPS/SVCB records and every A/AAAA record outside the chain
/// (the authority and additional sections included), caps every TTL at
/// `max_ttl`, and gives the workload's id and question back.
pub fn filter_answer(
    query: &Query,
    upstream: &[u8],
    opts: FilterOptions,
) -> Result<Filtered, AnswerError> {
    if upstream.len() > MAX_MESSAGE {
        return Err(AnswerError::TooLong(upstream.len()));
    }
    let mut reply = Message::from_vec(upstream).map_err(AnswerError::Malformed)?;
    check_answers(query, &reply)?;
    let max_ttl = opts.max_ttl_secs();
    let answers = reply.take_answers();
    let (chain, links) = cname_chain(query.question().name(), &answers);

    let mut learned = Vec::new();
    let mut dropped = Vec::new();
    let mut kept = Vec::with_capacity(answers.len());
    for (i, mut record) in answers.into_iter().enumerate() {
        let on_chain = if record.record_type() == RecordType::CNAME {
            links.contains(&i)
        } else {
            chain.contains(record.name())
        };
        if !on_chain {
            continue;
        }
        record.set_ttl(record.ttl().min(max_ttl));
        match address_of(&record) {
            Address::Not => {}
            Address::Broken => continue,
            Address::Ip(ip) => {
                if opts.private_answers == PrivateAnswers::Deny
                    && let Some(why) = DropReason::of(ip)
                {
                    dropped.push((ip, why));
                    continue;
                }
                learned.push((ip, record.ttl()));
            }
        }
        strip_hints(&mut record);
        kept.push(record);
    }
    reply.insert_answers(kept);
    let clean = |section: Vec<Record>| -> Vec<Record> {
        section
            .into_iter()
            .filter(|r| matches!(address_of(r), Address::Not))
            .map(|mut r| {
                r.set_ttl(r.ttl().min(max_ttl));
                strip_hints(&mut r);
                r
            })
            .collect()
    };
    let authority = clean(reply.take_name_servers());
    reply.insert_name_servers(authority);
    let additional = clean(reply.take_additionals());
    reply.insert_additionals(additional);

    let rcode = reply.response_code();
    reply.set_id(query.id());
    *reply.queries_mut() = vec![query.question().clone()];
    if query.message().extensions().is_none() {
        *reply.extensions_mut() = None;
    }
    let bytes = reply.to_vec().map_err(AnswerError::Encode)?;
    Ok(Filtered {
        bytes,
        learned,
        dropped,
        rcode,
    })
}

/// The names `qname` reaches through the CNAME records of `answers`
/// (itself first), and the indices of the CNAME records on that chain.
/// Bounded by the number of records; a CNAME back to a name already on
/// the chain ends it.
fn cname_chain(qname: &Name, answers: &[Record]) -> (HashSet<Name>, HashSet<usize>) {
    let mut chain = HashSet::from([qname.clone()]);
    let mut links = HashSet::new();
    let mut current = qname.clone();
    for _ in 0..answers.len() {
        let next = answers
            .iter()
            .enumerate()
            .find_map(|(i, r)| match r.data() {
                RData::CNAME(CNAME(target))
                    if r.record_type() == RecordType::CNAME && *r.name() == current =>
                {
                    Some((i, target))
                }
                _ => None,
            });
        let Some((i, target)) = next else { break };
        if !chain.insert(target.clone()) {
            break;
        }
        links.insert(i);
        current = target.clone();
    }
    (chain, links)
}

enum Address {
    /// Not an A/AAAA record.
    Not,
    /// An A/AAAA record without its address (empty data).
    Broken,
    Ip(IpAddr),
}

fn address_of(record: &Record) -> Address {
    match (record.record_type(), record.data()) {
        (RecordType::A, RData::A(a)) => Address::Ip(IpAddr::V4(a.0)),
        (RecordType::AAAA, RData::AAAA(a)) => Address::Ip(IpAddr::V6(a.0)),
        (RecordType::A | RecordType::AAAA, _) => Address::Broken,
        (_, RData::A(_) | RData::AAAA(_)) => Address::Broken,
        _ => Address::Not,
    }
}

/// Removes `ipv4hint` and `ipv6hint` from an HTTPS or SVCB record (and
/// from its `mandatory` list): a workload must not get addresses the
/// agent has not learned.
fn strip_hints(record: &mut Record) {
    let svcb = match record.data() {
        RData::HTTPS(HTTPS(s)) | RData::SVCB(s) => s,
        _ => return,
    };
    let hint = |k: &SvcParamKey| matches!(k, SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint);
    if !svcb.svc_params().iter().any(|(k, v)| {
        hint(k)
            || matches!(v, SvcParamValue::Ipv4Hint(_) | SvcParamValue::Ipv6Hint(_))
            || matches!(v, SvcParamValue::Mandatory(Mandatory(keys)) if keys.iter().any(hint))
    }) {
        return;
    }
    let params = svcb
        .svc_params()
        .iter()
        .filter(|(k, v)| {
            !hint(k) && !matches!(v, SvcParamValue::Ipv4Hint(_) | SvcParamValue::Ipv6Hint(_))
        })
        .map(|(k, v)| match v {
            SvcParamValue::Mandatory(Mandatory(keys)) => (
                *k,
                SvcParamValue::Mandatory(Mandatory(
                    keys.iter().filter(|k| !hint(k)).copied().collect(),
                )),
            ),
            _ => (*k, v.clone()),
        })
        .collect();
    let stripped = SVCB::new(svcb.svc_priority(), svcb.target_name().clone(), params);
    let data = match record.data() {
        RData::HTTPS(_) => RData::HTTPS(HTTPS(stripped)),
        _ => RData::SVCB(stripped),
    };
    record.set_data(data);
}
