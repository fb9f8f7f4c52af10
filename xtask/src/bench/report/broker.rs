//! The credential broker's section of the report.

use std::fmt::Write;

use super::super::broker::{self, BrokerBench, Cpu, Flood, Timed};
use super::{
    BROKER_TITLE, latency, median, percentile, signed_latency, signed_size, size, thousands, yes_no,
};

/// The target (issue 18): added latency at p50 on a reused
/// connection, nanoseconds.
const TARGET_REUSED_P50_ADDED: i64 = 1_000_000;

/// The two ways, as the tables name them.
const WAYS: [&str; 2] = ["direct", "through the broker"];

pub fn section(out: &mut String, b: &BrokerBench, alone: Option<&str>) {
    let s = &b.sizes;
    let _ = write!(out, "{BROKER_TITLE}\n\n");
    if let Some(when) = alone {
        let _ = write!(out, "> {when}\n\n");
    }
    let [direct, named] = b.served;
    let _ = write!(
        out,
        "HTTPS requests through the credential broker beside the same requests straight to \
         the same upstream, from the same workload cgroup, interleaved in one run ({rounds} \
         rounds, the two ways' order turning each round). The upstream is `idgate-bench-api` \
         (release build: hyper and rustls, HTTP/1.1 and HTTP/2 by ALPN, a test CA of its own, \
         2 threads) on port 443 of two loopback addresses: the one {dnsmasq} gives for \
         `{name}`, and one no name has. An agent of its own runs the DNS path and the broker \
         (`[egress]`, the upstream's CA in `extra_roots`, an audit log of every record); its \
         workload cgroup's identity has a credential rule for `{name}` (header `{header}` \
         from a secret file of mode 0600) and a CIDR rule allowing TCP to the other address, \
         port 443. The client is `idgate-bench-http` (release build: hyper and rustls on one \
         thread), in that cgroup both ways:\n\n\
         - **direct**: to the other address, naming `{name}` in TLS, trusting the upstream's \
         CA and sending the key itself;\n\
         - **through the broker**: `{name}` looked up through the agent (the kernel sends the \
         workload's DNS to it), then a connect to its address, port 443, which the kernel \
         sends to the broker; the client trusts the agent's egress bundle and sends a \
         placeholder key, which the broker replaces with the secret. The broker terminates \
         TLS with a certificate from its egress CA and sends the request on over its own \
         pooled connection to the upstream (the upstream counted {n_h2} HTTP/2 and {n_h1} \
         HTTP/1.1 connections from it over the section, for {n_req} requests; direct: {d_h2} \
         HTTP/2 and {d_h1} HTTP/1.1 connections, {d_req} requests).\n\n\
         The client never resumes a TLS session (each new connection is a full handshake, as \
         a new `curl` makes), sets `TCP_NODELAY`, and checks every status (200, or the run \
         fails). CPU is `utime + stime` of each process (`/proc/PID/stat`, all threads, in \
         ticks of 10 ms) read just before and just after a run's timed part, while the \
         client waits; summed over the rounds. {others} Load average (1, 5, 15 min) at the \
         section's start: {load0}; at its end: {load1}.\n",
        rounds = s.rounds,
        dnsmasq = b.dnsmasq,
        name = broker::NAME,
        header = broker::HEADER,
        n_h2 = thousands(named.h2 as usize),
        n_h1 = thousands(named.http1 as usize),
        n_req = thousands(named.requests as usize),
        d_h2 = thousands(direct.h2 as usize),
        d_h1 = thousands(direct.http1 as usize),
        d_req = thousands(direct.requests as usize),
        others = if alone.is_some() {
            "No other agent ran during it."
        } else {
            "The agents of the sections above still run (idle) during this one."
        },
        load0 = b.load.0,
        load1 = b.load.1,
    );
    latency_table(out, b);
    cpu_table(out, b);
    streams(out, b);
    throughput(out, b);
    memory(out, b);
}

fn latency_table(out: &mut String, b: &BrokerBench) {
    let s = &b.sizes;
    let _ = write!(
        out,
        "\n### Request latency\n\n\
         `GET /small` (a 79-byte JSON body) one after another, each timed by the client from \
         its send to its body's end; on a new connection, from before the TCP connect (then \
         TLS, the request, and the close). At most {req} requests per run on one connection \
         (after {wr} untimed ones on it), {new} per new-connection run (after {wn} untimed), \
         or {secs} s. Percentiles over every request of all rounds.\n\n\
         | requests | n each way | direct p50 | direct p99 | broker p50 | broker p99 | added p50 | added p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        req = thousands(s.requests as usize),
        wr = broker::WARMUP_REUSED,
        new = thousands(s.new_requests as usize),
        wn = broker::WARMUP_NEW,
        secs = s.seconds,
    );
    let mut reused_h1_added = None;
    for kind in &b.latency {
        let [d, t] = [0, 1].map(|k| Timed::pooled(&kind.runs[k]));
        let added = |p: f64| percentile(&t.ns, p) as i64 - percentile(&d.ns, p) as i64;
        let _ = writeln!(
            out,
            "| {name} | {n} | {d50} | {d99} | {t50} | {t99} | {a50} | {a99} |",
            name = kind.name,
            n = thousands(d.ns.len().min(t.ns.len())),
            d50 = latency(percentile(&d.ns, 0.5)),
            d99 = latency(percentile(&d.ns, 0.99)),
            t50 = latency(percentile(&t.ns, 0.5)),
            t99 = latency(percentile(&t.ns, 0.99)),
            a50 = signed_latency(added(0.5)),
            a99 = signed_latency(added(0.99)),
        );
        if reused_h1_added.is_none() {
            let per_round: Vec<String> = kind.runs[0]
                .iter()
                .zip(&kind.runs[1])
                .map(|(d, t)| {
                    signed_latency(percentile(&t.ns, 0.5) as i64 - percentile(&d.ns, 0.5) as i64)
                })
                .collect();
            reused_h1_added = Some((added(0.5), per_round));
        }
    }
    if let Some((added, rounds)) = reused_h1_added {
        let _ = write!(
            out,
            "\nThe issue's target (issue 18): at most {target} added at p50 on a reused \
             connection. HTTP/1.1 on one connection: {added} (each round's: {rounds}); met: \
             {met}.\n",
            target = latency(TARGET_REUSED_P50_ADDED as u64),
            added = signed_latency(added),
            rounds = rounds.join(", "),
            met = yes_no(added <= TARGET_REUSED_P50_ADDED),
        );
    }
}

fn cpu_table(out: &mut String, b: &BrokerBench) {
    let _ = write!(
        out,
        "\n### CPU per 1,000 requests\n\n\
         Over the latency runs above (one request at a time), per 1,000 timed requests: \
         the agent (the broker, its DNS path, its audit log), the client and the upstream, \
         and the three together.\n\n\
         | requests | way | agent | client | upstream | all three |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for kind in &b.latency {
        for (k, way) in WAYS.iter().enumerate() {
            let t = Timed::pooled(&kind.runs[k]);
            let per = |s: f64| cpu_ms(s * 1_000.0 / t.ns.len().max(1) as f64);
            let c = t.cpu;
            let _ = writeln!(
                out,
                "| {name} | {way} | {a} | {cl} | {u} | {all} |",
                name = kind.name,
                a = per(c.agent),
                cl = per(c.client),
                u = per(c.upstream),
                all = per(c.agent + c.client + c.upstream),
            );
        }
    }
}

fn streams(out: &mut String, b: &BrokerBench) {
    let s = &b.sizes;
    let _ = write!(
        out,
        "\n### A stream at the rate an LLM API sends\n\n\
         {streams} streams at once, each on a connection of its own (opened, and used for one \
         request, before the clock): `GET /stream`, server-sent events over HTTP/1.1 \
         (chunked), {chunks} events {interval} ms apart, each stamped by the upstream with \
         `CLOCK_MONOTONIC` when it sends it. For every event, its arrival at the client less \
         that stamp (the same clock): the time the event spends in the upstream's TLS, the \
         network path and the client's TLS, and through the broker in its two TLS \
         connections and its proxying too. CPU: over the whole of each run, per stream.\n\n\
         | way | events | p50 | p99 | max | agent CPU per stream | client | upstream |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        streams = s.streams,
        chunks = broker::CHUNKS,
        interval = broker::CHUNK_INTERVAL.as_millis(),
    );
    let pooled = [0, 1].map(|k| Timed::pooled(&b.streams[k]));
    for (t, way) in pooled.iter().zip(WAYS) {
        let n_streams = (b.streams[0].len() * s.streams).max(1) as f64;
        let per = |x: f64| cpu_ms(x / n_streams);
        let _ = writeln!(
            out,
            "| {way} | {n} | {p50} | {p99} | {max} | {a} | {c} | {u} |",
            n = thousands(t.ns.len()),
            p50 = latency(percentile(&t.ns, 0.5)),
            p99 = latency(percentile(&t.ns, 0.99)),
            max = latency(t.ns.iter().copied().max().unwrap_or(0)),
            a = per(t.cpu.agent),
            c = per(t.cpu.client),
            u = per(t.cpu.upstream),
        );
    }
    let added = |p: f64| percentile(&pooled[1].ns, p) as i64 - percentile(&pooled[0].ns, p) as i64;
    let _ = write!(
        out,
        "\nAdded per event by the broker: {p50} at p50, {p99} at p99.\n",
        p50 = signed_latency(added(0.5)),
        p99 = signed_latency(added(0.99)),
    );
}

fn throughput(out: &mut String, b: &BrokerBench) {
    let s = &b.sizes;
    let _ = write!(
        out,
        "\n### Throughput, unthrottled\n\n\
         Requests back to back on every connection at once for {secs} s (the connections \
         opened, and used once, before the clock), HTTP/1.1: `GET /small` on {small} \
         connections, and `GET /bytes` of {body} on {large}. Medians over the rounds; CPU \
         in cores busy over the run (seconds of CPU per second). No target: the client, the \
         upstream and the agent share the machine's cores, and through the broker TLS is \
         done twice.\n\n\
         | run | way | rate | agent CPU | client CPU | upstream CPU |\n\
         |---|---|---:|---:|---:|---:|\n",
        secs = s.flood_seconds,
        small = s.flood_connections,
        body = size(s.body_bytes),
        large = s.body_connections,
    );
    for (name, runs, unit) in [
        ("small requests", &b.small, Unit::Requests),
        ("large bodies", &b.large, Unit::Bytes),
    ] {
        let rates: [f64; 2] =
            [0, 1].map(|k| median(&runs[k].iter().map(|f| unit.rate(f)).collect::<Vec<_>>()));
        for (k, way) in WAYS.iter().enumerate() {
            let busy = |pick: fn(&Cpu) -> f64| {
                median(
                    &runs[k]
                        .iter()
                        .map(|f| pick(&f.cpu) / f.seconds)
                        .collect::<Vec<_>>(),
                )
            };
            let _ = writeln!(
                out,
                "| {name} | {way} | {rate} | {a:.2} | {c:.2} | {u:.2} |",
                rate = unit.show(rates[k]),
                a = busy(|c| c.agent),
                c = busy(|c| c.client),
                u = busy(|c| c.upstream),
            );
        }
        let _ = writeln!(
            out,
            "| {name} | broker ÷ direct | {:.2} | | | |",
            rates[1] / rates[0]
        );
    }
}

/// What a throughput run's rate counts.
#[derive(Clone, Copy)]
enum Unit {
    Requests,
    Bytes,
}

impl Unit {
    fn rate(self, f: &Flood) -> f64 {
        match self {
            Unit::Requests => f.requests as f64 / f.seconds,
            Unit::Bytes => f.bytes as f64 / f.seconds,
        }
    }

    fn show(self, rate: f64) -> String {
        match self {
            Unit::Requests => format!("{} requests/s", thousands(rate.round() as usize)),
            Unit::Bytes => format!("{:.0} MB/s", rate / 1e6),
        }
    }
}

fn memory(out: &mut String, b: &BrokerBench) {
    let s = &b.sizes;
    let per: Vec<f64> = b
        .held
        .iter()
        .map(|h| (h.open_kib as f64 - h.before_kib as f64) * 1024.0 / h.connections.max(1) as f64)
        .collect();
    let kept: Vec<f64> = b
        .held
        .iter()
        .map(|h| h.after_kib as f64 - h.before_kib as f64)
        .collect();
    let rounds: Vec<String> = per.iter().map(|p| format!("{:.0}", p / 1024.0)).collect();
    let _ = write!(
        out,
        "\n### Memory per open connection\n\n\
         At the start of each round, the client opens {n} connections through the broker, one \
         after another, makes one request on each, and keeps them open, idle: the agent's \
         VmRSS (`/proc/PID/status`) before the client starts, with all of them open, and \
         after the client has closed them. Per connection: (open − before) ÷ {n}. In the \
         first round, when the agent had served only the readiness probes: {first}; the \
         median of all rounds: {median} (each round's, KiB: {rounds}; a later round can reuse \
         memory the earlier ones freed, which the allocator keeps). After they closed, VmRSS \
         was {kept} from the figure before, at the median. The agent's VmRSS when it was \
         ready: {start}.\n",
        n = s.connections,
        first = size(per.first().copied().unwrap_or(0.0).max(0.0) as u64),
        median = size(median(&per).max(0.0) as u64),
        rounds = rounds.join(", "),
        kept = signed_size(median(&kept) as i64),
        start = size(b.agent_start_kib * 1024),
    );
}

/// Milliseconds of CPU.
fn cpu_ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1e3)
}
