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

/// NOERROR with no records for `query`: the name is there, but has no
/// records of the type asked (NODATA). The answer to an AAAA query for a
/// credential rule's host: the broker is reached over IPv4 only, so its
/// clients are given none of its IPv6 addresses.
pub fn no_data(query: &Query) -> Vec<u8> {
    error_answer(query, ResponseCode::NoError)
}

/// The largest answer `query`'s client takes over UDP: its EDNS payload
/// size, else 512 (RFC 1035).
pub fn udp_limit(query: &Query) -> usize {
    query.message().max_payload().max(512).into()
}

/// An empty answer with TC set, for an answer larger than the client
/// takes over UDP: it asks again over TCP (RFC 7766), which the kernel
/// sends to the resolver too. Its addresses are already learned.
pub fn truncated(query: &Query) -> Vec<u8> {
    let mut m = answer_message(query, ResponseCode::NoError);
    m.set_truncated(true);
    m.to_vec()
        .expect("a message of one parsed question encodes")
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
    answer_message(query, rcode)
        .to_vec()
        .expect("a message of one parsed question encodes")
}

/// An answer to `query` with no records and `rcode`.
fn answer_message(query: &Query, rcode: ResponseCode) -> Message {
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
    m
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

/// An address an answer gave the question name, for the record of a
/// query forwarded as it is (audit mode): what the workload got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub addr: IpAddr,
    /// The TTL (seconds) the upstream gave it (at most 2^31 - 1).
    pub ttl: u32,
    /// Why a name rule's answer would have dropped it, with the given
    /// `private_answers`; `None` when a name rule would learn it.
    pub would_drop: Option<DropReason>,
}

/// The addresses the upstream's answer to `query` gives the question
/// name: the A/AAAA records on its CNAME chain, as [`filter_answer`]
/// finds them (it is called with nothing dropped and no TTL cap, and
/// the text it makes is not used), each marked with what `private`
/// would do to it in a name rule's answer. For the record of a query
/// whose answer goes to the workload unchanged.
pub fn answered_addresses(
    query: &Query,
    upstream: &[u8],
    private: PrivateAnswers,
) -> Result<Vec<Answered>, AnswerError> {
    let everything = FilterOptions {
        private_answers: PrivateAnswers::Allow,
        max_ttl: Duration::MAX,
    };
    let filtered = filter_answer(query, upstream, everything)?;
    Ok(filtered
        .learned
        .into_iter()
        .map(|(addr, ttl)| Answered {
            addr,
            ttl,
            would_drop: match private {
                PrivateAnswers::Deny => DropReason::of(addr),
                PrivateAnswers::Allow => None,
            },
        })
        .collect())
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

#[cfg(test)]
pub(super) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::rr::rdata::svcb::{Alpn, IpHint};
    use hickory_proto::rr::rdata::{A, AAAA};

    use super::*;

    /// A workload's query, built by hickory.
    pub(in crate::dns) fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_recursion_desired(true)
            .add_query(op::Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    pub(in crate::dns) fn query(name: &str, qtype: RecordType) -> Query {
        parse_query(&query_bytes(0x1234, name, qtype)).unwrap()
    }

    /// An upstream's answer to `query` with `answers`, and id `id`.
    pub(in crate::dns) fn response(query: &Query, id: u16, answers: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .add_query(query.question().clone())
            .add_answers(answers);
        m
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    pub(in crate::dns) fn a(owner: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn aaaa(owner: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn cname(owner: &str, target: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn https_with_hints(owner: &str) -> Record {
        let params = vec![
            (
                SvcParamKey::Mandatory,
                SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::Alpn, SvcParamKey::Ipv4Hint])),
            ),
            (
                SvcParamKey::Alpn,
                SvcParamValue::Alpn(Alpn(vec!["h2".to_owned()])),
            ),
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(93, 184, 216, 34))])),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(
                    Ipv6Addr::from_str("2001:db8::1").unwrap(),
                )])),
            ),
        ];
        Record::from_rdata(
            name(owner),
            300,
            RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))),
        )
    }

    const DENY: FilterOptions = FilterOptions {
        private_answers: PrivateAnswers::Deny,
        max_ttl: Duration::from_secs(3600),
    };

    fn filter(query: &Query, m: &Message, opts: FilterOptions) -> (Filtered, Message) {
        let f = filter_answer(query, &m.to_vec().unwrap(), opts).unwrap();
        let out = Message::from_vec(&f.bytes).unwrap();
        (f, out)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_query_is_parsed_and_its_name_made_canonical() {
        let q = parse_query(&query_bytes(7, "WWW.Example.COM.", RecordType::AAAA)).unwrap();
        assert_eq!(q.id(), 7);
        assert_eq!(q.name(), "www.example.com");
        assert_eq!(q.qtype(), RecordType::AAAA);
        assert_eq!(q.qclass(), DNSClass::IN);
        assert_eq!(q.question().name().to_ascii(), "WWW.Example.COM.");
        assert!(q.message().recursion_desired());
        assert_eq!(query(".", RecordType::NS).name(), "");
    }

    #[test]
    fn bad_queries_say_whether_to_answer() {
        let mut m = Message::from_vec(&query_bytes(9, "a.example", RecordType::A)).unwrap();
        m.set_message_type(MessageType::Response);
        let e = parse_query(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(e, QueryError::Response) && e.answerable_id().is_none());

        let mut m = Message::from_vec(&query_bytes(9, "a.example", RecordType::A)).unwrap();
        m.add_query(op::Query::query(name("b.example."), RecordType::A));
        let e = parse_query(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(e, QueryError::Questions { count: 2, .. }), "{e}");
        assert_eq!(e.answerable_id(), Some(9));

        let mut m = Message::new();
        m.set_id(10);
        let e = parse_query(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(e, QueryError::Questions { count: 0, .. }), "{e}");

        let mut m = Message::from_vec(&query_bytes(11, "a.example", RecordType::A)).unwrap();
        m.set_op_code(OpCode::Status);
        let e = parse_query(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(e, QueryError::OpCode { .. }), "{e}");
        assert_eq!(e.answerable_id(), Some(11));

        let e = parse_query(&[0, 1, 2]).unwrap_err();
        assert!(matches!(e, QueryError::Header(_)) && e.answerable_id().is_none());

        let mut bytes = query_bytes(12, "a.example", RecordType::A);
        bytes.truncate(bytes.len() - 3);
        let e = parse_query(&bytes).unwrap_err();
        assert!(matches!(e, QueryError::Malformed { .. }), "{e}");
        assert_eq!(e.answerable_id(), Some(12));

        let mut bytes = query_bytes(13, "a.example", RecordType::A);
        bytes.resize(MAX_MESSAGE + 1, 0);
        let e = parse_query(&bytes).unwrap_err();
        assert!(matches!(e, QueryError::TooLong(_)) && e.answerable_id().is_none());
    }

    /// A query header (id 0x0102, RD, one question) before hand-made
    /// question bytes: test data only.
    fn handmade(question: &[u8]) -> Vec<u8> {
        let mut b = vec![0x01, 0x02, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(question);
        b
    }

    #[test]
    fn overlong_names_and_compression_loops_are_parse_errors() {
        // Five labels of 63 bytes: 320 bytes on the wire, over 255.
        let mut q = Vec::new();
        for _ in 0..5 {
            q.push(63);
            q.extend_from_slice(&[b'a'; 63]);
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let e = parse_query(&handmade(&q)).unwrap_err();
        assert!(matches!(e, QueryError::Malformed { id: 0x0102, .. }), "{e}");

        // A name that points at itself.
        let e = parse_query(&handmade(&[0xc0, 12, 0, 1, 0, 1])).unwrap_err();
        assert!(matches!(e, QueryError::Malformed { .. }), "{e}");
        // A label, then a pointer back to that label.
        let e = parse_query(&handmade(&[1, b'a', 0xc0, 12, 0, 1, 0, 1])).unwrap_err();
        assert!(matches!(e, QueryError::Malformed { .. }), "{e}");
        // A pointer forward, into a pointer back.
        let e = parse_query(&handmade(&[0xc0, 18, 0, 1, 0, 1, 0xc0, 12])).unwrap_err();
        assert!(matches!(e, QueryError::Malformed { .. }), "{e}");
        // The same name without a loop parses.
        let q = parse_query(&handmade(&[1, b'A', 0, 0, 1, 0, 1])).unwrap();
        assert_eq!(q.name(), "a");
    }

    #[test]
    fn error_answers_echo_the_question() {
        let q = query("Api.Example.com", RecordType::A);
        for (bytes, rcode) in [
            (refused(&q), ResponseCode::Refused),
            (servfail(&q), ResponseCode::ServFail),
        ] {
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!(m.id(), 0x1234);
            assert_eq!(m.message_type(), MessageType::Response);
            assert_eq!(m.response_code(), rcode);
            assert!(m.recursion_available() && m.recursion_desired());
            assert_eq!(m.queries(), q.message().queries());
            assert_eq!(m.queries()[0].name().to_ascii(), "Api.Example.com.");
            assert!(m.answers().is_empty() && m.extensions().is_none());
        }
        let mut asked = Message::from_vec(&query_bytes(5, "a.example", RecordType::A)).unwrap();
        asked.set_recursion_desired(false).set_edns(Edns::new());
        let q = parse_query(&asked.to_vec().unwrap()).unwrap();
        let m = Message::from_vec(&refused(&q)).unwrap();
        assert!(!m.recursion_desired() && m.recursion_available());
        assert_eq!(m.extensions().as_ref().unwrap().max_payload(), EDNS_PAYLOAD);

        let m = Message::from_vec(&formerr(77)).unwrap();
        assert_eq!((m.id(), m.response_code()), (77, ResponseCode::FormErr));
        assert!(m.recursion_available() && m.queries().is_empty());
        assert_eq!(m.message_type(), MessageType::Response);
    }

    #[test]
    fn only_the_cname_chain_is_kept_and_learned() {
        let q = query("WWW.example.com", RecordType::A);
        let m = response(
            &q,
            0x1234,
            vec![
                cname("www.example.com.", "cdn.example.net.", 60),
                cname("cdn.example.net.", "Edge.Example.org.", 30),
                a("edge.example.org.", "93.184.216.34", 300),
                a("edge.example.org.", "93.184.216.35", 20),
                a("other.example.", "1.2.3.4", 300),
                cname("other.example.", "www.example.com.", 300),
                cname("www.example.com.", "evil.example.", 300),
                a("evil.example.", "5.6.7.8", 300),
            ],
        );
        let (f, out) = filter(&q, &m, DENY);
        assert_eq!(
            f.learned,
            vec![(ip("93.184.216.34"), 300), (ip("93.184.216.35"), 20)]
        );
        assert!(f.dropped.is_empty());
        assert_eq!(f.rcode, ResponseCode::NoError);
        assert_eq!(out.answers().len(), 4);
        assert_eq!(out.id(), 0x1234);
        assert_eq!(out.queries()[0].name().to_ascii(), "WWW.example.com.");
    }

    #[test]
    fn answered_addresses_are_the_chain_s_uncapped_and_marked() {
        let q = query("www.example.com", RecordType::A);
        let m = response(
            &q,
            0x1234,
            vec![
                cname("www.example.com.", "edge.example.org.", 60),
                a("edge.example.org.", "93.184.216.34", 86_400),
                a("edge.example.org.", "10.1.2.3", 30),
                a("other.example.", "1.2.3.4", 300),
            ],
        );
        let bytes = m.to_vec().unwrap();
        let deny = answered_addresses(&q, &bytes, PrivateAnswers::Deny).unwrap();
        assert_eq!(
            deny,
            [
                Answered {
                    addr: ip("93.184.216.34"),
                    ttl: 86_400,
                    would_drop: None
                },
                Answered {
                    addr: ip("10.1.2.3"),
                    ttl: 30,
                    would_drop: Some(DropReason::Private)
                },
            ]
        );
        let allow = answered_addresses(&q, &bytes, PrivateAnswers::Allow).unwrap();
        assert!(allow.iter().all(|a| a.would_drop.is_none()));
        let other = query("other.example", RecordType::A);
        assert!(answered_addresses(&other, &bytes, PrivateAnswers::Deny).is_err());
    }

    #[test]
    fn the_workload_s_id_and_question_case_come_back() {
        let q = query("WWW.example.com", RecordType::A);
        let mut m = response(&q, 999, vec![a("www.example.com.", "8.8.8.8", 5)]);
        m.queries_mut()[0].set_name(name("www.EXAMPLE.com."));
        m.set_edns(Edns::new());
        let (f, out) = filter(&q, &m, DENY);
        assert_eq!(out.id(), 0x1234);
        assert_eq!(out.queries(), q.message().queries());
        assert_eq!(out.queries()[0].name().to_ascii(), "WWW.example.com.");
        // The workload asked without EDNS.
        assert!(out.extensions().is_none());
        assert_eq!(f.learned, vec![(ip("8.8.8.8"), 5)]);
    }

    #[test]
    fn a_cname_loop_ends_the_chain() {
        let q = query("a.example", RecordType::A);
        let m = response(
            &q,
            1,
            vec![
                cname("a.example.", "b.example.", 60),
                cname("b.example.", "a.example.", 60),
                a("b.example.", "8.8.4.4", 60),
            ],
        );
        let (f, out) = filter(&q, &m, DENY);
        assert_eq!(f.learned, vec![(ip("8.8.4.4"), 60)]);
        assert_eq!(out.answers().len(), 2);
    }

    #[test]
    fn ttls_are_capped() {
        let q = query("a.example", RecordType::A);
        let mut m = response(
            &q,
            1,
            vec![
                cname("a.example.", "b.example.", 86400),
                a("b.example.", "8.8.4.4", 86400),
                a("b.example.", "8.8.4.5", 10),
            ],
        );
        m.add_name_server(Record::from_rdata(
            name("example."),
            86400,
            RData::NS(hickory_proto::rr::rdata::NS(name("ns.example."))),
        ));
        let opts = FilterOptions {
            max_ttl: Duration::from_secs(60),
            ..DENY
        };
        let (f, out) = filter(&q, &m, opts);
        assert_eq!(f.learned, vec![(ip("8.8.4.4"), 60), (ip("8.8.4.5"), 10)]);
        let ttls: Vec<u32> = out.all_sections().map(|r| r.ttl()).collect();
        assert_eq!(ttls, [60, 60, 10, 60]);
    }

    #[test]
    fn private_answers_are_dropped_unless_allowed() {
        let q = query("a.example", RecordType::A);
        let cases = [
            ("10.1.2.3", DropReason::Private),
            ("172.16.0.1", DropReason::Private),
            ("192.168.1.1", DropReason::Private),
            ("127.0.0.1", DropReason::Loopback),
            ("169.254.169.254", DropReason::LinkLocal),
            ("0.0.0.0", DropReason::Unspecified),
            ("100.64.0.1", DropReason::SharedCgnat),
            ("100.127.255.255", DropReason::SharedCgnat),
            ("::1", DropReason::Loopback),
            ("::", DropReason::Unspecified),
            ("fd00::1", DropReason::Private),
            ("fc00::1", DropReason::Private),
            ("fe80::1", DropReason::LinkLocal),
            ("::ffff:10.0.0.1", DropReason::Private),
            ("::ffff:127.0.0.1", DropReason::Loopback),
            ("::ffff:100.64.1.1", DropReason::SharedCgnat),
        ];
        let public = ["8.8.8.8", "100.128.0.1", "172.32.0.1", "2001:4860::8888"];
        let records = cases
            .iter()
            .map(|(i, _)| *i)
            .chain(public)
            .map(|i| match ip(i) {
                IpAddr::V4(_) => a("a.example.", i, 60),
                IpAddr::V6(_) => aaaa("a.example.", i, 60),
            })
            .collect();
        let m = response(&q, 1, records);
        let (f, out) = filter(&q, &m, DENY);
        let dropped: Vec<(IpAddr, DropReason)> =
            cases.iter().map(|(i, why)| (ip(i), *why)).collect();
        assert_eq!(f.dropped, dropped);
        let learned: Vec<(IpAddr, u32)> = public.iter().map(|i| (ip(i), 60)).collect();
        assert_eq!(f.learned, learned);
        assert_eq!(out.answers().len(), public.len());
        assert_eq!(DropReason::SharedCgnat.to_string(), "cgnat");
        assert_eq!(DropReason::LinkLocal.as_str(), "link_local");

        let allow = FilterOptions {
            private_answers: PrivateAnswers::Allow,
            ..DENY
        };
        let (f, out) = filter(&q, &m, allow);
        assert!(f.dropped.is_empty());
        assert_eq!(f.learned.len(), cases.len() + public.len());
        assert_eq!(out.answers().len(), cases.len() + public.len());
    }

    #[test]
    fn address_hints_and_unlearned_addresses_are_removed() {
        let q = query("svc.example", RecordType::HTTPS);
        let mut m = response(&q, 1, vec![https_with_hints("svc.example.")]);
        m.add_additional(a("svc.example.", "93.184.216.34", 60));
        m.add_additional(https_with_hints("svc.example."));
        m.add_name_server(aaaa("svc.example.", "2001:db8::1", 60));
        let (f, out) = filter(&q, &m, DENY);
        assert!(f.learned.is_empty());
        assert_eq!(out.answers().len(), 1);
        assert!(out.name_servers().is_empty());
        assert_eq!(out.additionals().len(), 1);
        for r in out.answers().iter().chain(out.additionals()) {
            let RData::HTTPS(HTTPS(svcb)) = r.data() else {
                panic!("{r}")
            };
            assert_eq!(
                svcb.svc_params(),
                [
                    (
                        SvcParamKey::Mandatory,
                        SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::Alpn]))
                    ),
                    (
                        SvcParamKey::Alpn,
                        SvcParamValue::Alpn(Alpn(vec!["h2".to_owned()]))
                    ),
                ]
            );
        }
    }

    #[test]
    fn answers_that_do_not_match_are_refused() {
        let q = query("a.example", RecordType::A);
        let bad = |m: &Message| filter_answer(&q, &m.to_vec().unwrap(), DENY).unwrap_err();

        let mut m = response(&q, 1, vec![]);
        m.queries_mut()[0].set_name(name("b.example."));
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let mut m = response(&q, 1, vec![]);
        m.queries_mut()[0].set_query_type(RecordType::AAAA);
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let mut m = response(&q, 1, vec![]);
        m.queries_mut()[0].set_query_class(DNSClass::CH);
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let mut m = response(&q, 1, vec![]);
        m.set_message_type(MessageType::Query);
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let mut m = response(&q, 1, vec![]);
        m.take_queries();
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let mut m = response(&q, 1, vec![]);
        m.set_op_code(OpCode::Notify);
        assert!(matches!(bad(&m), AnswerError::Mismatch(_)));

        let e = filter_answer(&q, &[0; 5], DENY).unwrap_err();
        assert!(matches!(e, AnswerError::Malformed(_)), "{e}");
        let e = filter_answer(&q, &vec![0; MAX_MESSAGE + 1], DENY).unwrap_err();
        assert!(matches!(e, AnswerError::TooLong(_)), "{e}");

        // An error answer is passed on, filtered like any other.
        let mut m = response(&q, 1, vec![cname("a.example.", "b.example.", 9)]);
        m.set_response_code(ResponseCode::NXDomain);
        let (f, out) = filter(&q, &m, DENY);
        assert_eq!(f.rcode, ResponseCode::NXDomain);
        assert_eq!(out.response_code(), ResponseCode::NXDomain);
        assert_eq!(out.answers().len(), 1);
    }

    #[test]
    fn options_of_config() {
        let c = super::super::DnsConfig {
            private_answers: PrivateAnswers::Allow,
            max_ttl: Duration::from_secs(42),
            ..Default::default()
        };
        let o = FilterOptions::of_config(&c);
        assert_eq!(o.private_answers, PrivateAnswers::Allow);
        assert_eq!(o.max_ttl_secs(), 42);
        let huge = FilterOptions {
            max_ttl: Duration::from_secs(u64::MAX),
            ..o
        };
        assert_eq!(huge.max_ttl_secs(), i32::MAX as u32);
    }

    /// Every A/AAAA record of `bytes` (any section) is in `learned`, with
    /// its TTL; no HTTPS/SVCB record carries an address hint.
    fn nothing_unlearned(f: &Filtered) {
        let out = Message::from_vec(&f.bytes).expect("filtered answers parse");
        for r in out.all_sections() {
            match address_of(r) {
                Address::Ip(ip) => assert!(
                    f.learned.contains(&(ip, r.ttl())),
                    "{ip} ttl {} not in {:?}",
                    r.ttl(),
                    f.learned
                ),
                Address::Broken => panic!("{r}"),
                Address::Not => {}
            }
            if let RData::HTTPS(HTTPS(s)) | RData::SVCB(s) = r.data() {
                assert!(s.svc_params().iter().all(|(k, v)| !matches!(
                    k,
                    SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint
                ) && !matches!(
                    v,
                    SvcParamValue::Ipv4Hint(_) | SvcParamValue::Ipv6Hint(_)
                )));
            }
        }
    }

    /// A response with a chain, off-chain records, private addresses and
    /// hints, to mutate.
    fn rich_response(q: &Query) -> Vec<u8> {
        let mut m = response(
            q,
            0x1234,
            vec![
                cname("www.example.com.", "cdn.example.net.", 60),
                a("cdn.example.net.", "93.184.216.34", 300),
                a("cdn.example.net.", "10.0.0.1", 300),
                aaaa("cdn.example.net.", "2001:db8::7", 300),
                a("off.example.", "1.2.3.4", 300),
                https_with_hints("cdn.example.net."),
            ],
        );
        m.add_additional(a("ns.example.", "5.6.7.8", 60));
        m.add_additional(https_with_hints("x.example."));
        m.set_edns(Edns::new());
        m.to_vec().unwrap()
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
            for &(at, b) in edits {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let keep = bytes.len() - cut % bytes.len();
            bytes.truncate(keep.max(1));
            bytes
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes(
                asked in proptest::collection::vec(any::<u8>(), 0..300),
                answer in proptest::collection::vec(any::<u8>(), 0..600),
            ) {
                let q = query("www.example.com", RecordType::A);
                if let Ok(f) = filter_answer(&q, &answer, DENY) {
                    nothing_unlearned(&f);
                }
                if let Ok(q) = parse_query(&asked) {
                    prop_assert_eq!(q.message().queries().len(), 1);
                    if let Ok(f) = filter_answer(&q, &answer, DENY) {
                        nothing_unlearned(&f);
                    }
                    refused(&q);
                    servfail(&q);
                }
            }

            #[test]
            fn mutated_messages(
                edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                cut in 0usize..40,
                allow in any::<bool>(),
                max_ttl in 1u64..100_000,
            ) {
                let q = query("www.example.com", RecordType::A);
                let opts = FilterOptions {
                    private_answers: if allow { PrivateAnswers::Allow } else { PrivateAnswers::Deny },
                    max_ttl: Duration::from_secs(max_ttl),
                };
                let answer = mutate(rich_response(&q), &edits, cut);
                if let Ok(f) = filter_answer(&q, &answer, opts) {
                    nothing_unlearned(&f);
                    prop_assert!(f.learned.iter().all(|(_, ttl)| u64::from(*ttl) <= max_ttl));
                    if !allow {
                        prop_assert!(f.learned.iter().all(|(ip, _)| DropReason::of(*ip).is_none()));
                    }
                }
                let asked = mutate(query_bytes(0x1234, "www.example.com", RecordType::A), &edits, cut);
                if let Ok(q2) = parse_query(&asked)
                    && let Ok(f) = filter_answer(&q2, &answer, opts)
                {
                    nothing_unlearned(&f);
                }
            }
        }
    }

    fn query_with_edns(size: Option<u16>) -> Query {
        let mut m = Message::from_vec(&query_bytes(7, "a.example.", RecordType::A)).unwrap();
        if let Some(size) = size {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        parse_query(&m.to_vec().unwrap()).unwrap()
    }

    #[test]
    fn the_udp_limit_is_the_client_s_edns_size_or_512() {
        assert_eq!(udp_limit(&query_with_edns(None)), 512);
        assert_eq!(udp_limit(&query_with_edns(Some(1232))), 1232);
        assert_eq!(udp_limit(&query_with_edns(Some(100))), 512);
    }

    #[test]
    fn a_truncated_answer_says_so_and_carries_the_question() {
        let q = query_with_edns(Some(1232));
        let m = Message::from_vec(&truncated(&q)).unwrap();
        assert!(m.truncated());
        assert_eq!(m.id(), 7);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(m.queries(), q.message().queries());
        assert!(m.answers().is_empty());
    }
}
