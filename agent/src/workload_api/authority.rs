//! The `:authority` of a request on the Workload API socket, made one
//! the HTTP/2 server accepts.
//!
//! gRPC's C core (the Python, Ruby, PHP, C++, C# and Objective-C clients)
//! sends the socket's path, or its percent-encoding, as `:authority` on a
//! Unix socket. h2 parses `:authority` as a URI authority (http's
//! `Authority`), and resets a stream whose value does not parse, or is
//! empty, with PROTOCOL_ERROR. On a Unix socket the authority names
//! nothing, so this layer, between the socket and h2, replaces any value
//! h2 would refuse with `localhost` (what grpc-go and tonic send).
//!
//! It reads the client's frames after the connection preface: every
//! header block (HEADERS and its CONTINUATION frames, padding and
//! priority fields taken off) is decoded with the connection's HPACK
//! state (dynamic table, size updates, Huffman strings), the one field
//! changed, and encoded again toward h2 with no dynamic table at all (the
//! first block tells h2's decoder its table is 0 bytes), so the two
//! HPACK contexts can never disagree. Blocks go out as a HEADERS frame
//! and as many CONTINUATION frames as needed, none over the initial
//! SETTINGS_MAX_FRAME_SIZE, with END_STREAM and the priority fields
//! kept. Every other frame passes byte for byte; so does everything the
//! server writes.
//!
//! What the layer cannot rewrite (an HPACK decoding error, a header block
//! over [`MAX_HEADER_BLOCK`] bytes or decoding to over
//! [`MAX_HEADER_LIST`] or sent in over [`MAX_CONTINUATIONS`] CONTINUATION
//! frames, a HEADERS frame over the frame size, a block
//! interrupted by another frame, malformed padding) ends the connection
//! as HTTP/2 says for such connection errors: h2 is handed a header
//! block it cannot decode, answers GOAWAY, and the client's further bytes
//! are not read.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// The initial SETTINGS_MAX_FRAME_SIZE: the server (h2 as tonic sets it
/// up) never raises it, so no client frame may be larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block (its fragments together) the layer reads.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The largest decoded header list (RFC 7541 sizes: name, value and 32
/// bytes a field) the layer passes on; h2 refuses lists over its own,
/// smaller, limit (16 KiB in hyper) itself.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// The most CONTINUATION frames one block may take. h2 counts the frames
/// it is sent, which the layer makes anew, so the layer bounds the
/// client's (a flood of empty ones would otherwise never end a block).
pub const MAX_CONTINUATIONS: usize = 16;
/// SETTINGS_HEADER_TABLE_SIZE as the server announces it: the initial
/// value, which tonic's h2 server never changes.
const TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A priority field's length: stream dependency and weight.
const PRIORITY_LEN: usize = 5;

/// The authority that stands in for one h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";

/// Why the layer ended a connection.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("a header frame of {0} bytes, over the {MAX_FRAME}-byte frame size")]
    FrameTooLarge(usize),
    #[error("a header block in over {MAX_CONTINUATIONS} CONTINUATION frames")]
    TooManyFrames,
    #[error("a header block over {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    #[error("a header list decoding to over {MAX_HEADER_LIST} bytes")]
    ListTooLarge,
    #[error("HPACK decoding: {0}")]
    Hpack(loona_hpack::decoder::DecoderError),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// A frame's header.
#[derive(Debug, Clone, Copy)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.len).expect("a frame is under 16 MiB");
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[self.kind, self.flags]);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// A header block being read: its HEADERS frame's fields and the
/// fragments so far.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
    continuations: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the connection preface.
    Preface,
    /// Frames; `pass` bytes of a payload still to pass unchanged.
    Frames { pass: usize },
    /// Not HTTP/2 with prior knowledge: all passes, for h2 to refuse.
    Transparent,
    /// Refused: nothing more is read.
    Ended,
}

/// The client-to-server byte stream's rewriter, without I/O.
pub struct Rewriter {
    stage: Stage,
    /// Input not yet consumed (a partial frame header or header frame).
    pending: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Whether h2 was told its dynamic table is 0 bytes.
    table_dropped: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(0);
        Self {
            stage: Stage::Preface,
            pending: Vec::new(),
            block: None,
            decoder,
            encoder,
            table_dropped: false,
        }
    }
}

impl Rewriter {
    /// Takes `input`, the next bytes from the client, and appends what
    /// h2 is to read to `out`. After an error, `out` ends with the block
    /// that makes h2 close the connection, and further input is ignored.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(input);
        let result = self.consume(&pending, out);
        match result {
            Ok(used) => {
                pending.drain(..used);
                self.pending = pending;
            }
            Err(_) => {
                self.stage = Stage::Ended;
                self.block = None;
                // An indexed field of index 0: a decoding error for any
                // HPACK decoder (RFC 7541 section 6.1), which h2 answers
                // with GOAWAY.
                Head {
                    len: 1,
                    kind: HEADERS,
                    flags: END_HEADERS,
                    stream: 1,
                }
                .write(out);
                out.push(0x80);
            }
        }
        result.map(|_| ())
    }

    /// Consumes what it can of `input`: how many bytes.
    fn consume(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Refused> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.stage {
                Stage::Ended => return Ok(input.len()),
                Stage::Transparent => {
                    out.extend_from_slice(rest);
                    return Ok(input.len());
                }
                Stage::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    if rest[..n] != PREFACE[..n] {
                        self.stage = Stage::Transparent;
                    } else if n < PREFACE.len() {
                        return Ok(at);
                    } else {
                        out.extend_from_slice(PREFACE);
                        at += n;
                        self.stage = Stage::Frames { pass: 0 };
                    }
                }
                Stage::Frames { pass } if pass > 0 => {
                    let n = pass.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    self.stage = Stage::Frames { pass: pass - n };
                    if n == rest.len() {
                        return Ok(at);
                    }
                }
                Stage::Frames { .. } => {
                    if rest.len() < FRAME_HEADER {
                        return Ok(at);
                    }
                    let head = Head::parse(rest);
                    let in_block = self.block.as_ref().map(|b| b.stream);
                    if in_block.is_some_and(|s| head.kind != CONTINUATION || head.stream != s) {
                        return Err(Refused::Malformed(
                            "a header block interrupted by another frame",
                        ));
                    }
                    if head.kind != HEADERS && head.kind != CONTINUATION {
                        out.extend_from_slice(&rest[..FRAME_HEADER]);
                        at += FRAME_HEADER;
                        self.stage = Stage::Frames { pass: head.len };
                        continue;
                    }
                    if head.len > MAX_FRAME {
                        return Err(Refused::FrameTooLarge(head.len));
                    }
                    if rest.len() < FRAME_HEADER + head.len {
                        return Ok(at);
                    }
                    self.header_frame(head, &rest[FRAME_HEADER..FRAME_HEADER + head.len], out)?;
                    at += FRAME_HEADER + head.len;
                }
            }
        }
    }

    /// A HEADERS or CONTINUATION frame's payload.
    fn header_frame(
        &mut self,
        head: Head,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Refused> {
        if head.kind == HEADERS {
            if head.stream == 0 {
                return Err(Refused::Malformed("HEADERS on stream 0"));
            }
            let mut p = payload;
            let mut pad = 0;
            if head.flags & PADDED != 0 {
                let (&n, tail) = p
                    .split_first()
                    .ok_or(Refused::Malformed("PADDED without a pad length"))?;
                pad = usize::from(n);
                p = tail;
            }
            let mut priority = None;
            if head.flags & PRIORITY != 0 {
                let (field, tail) = p
                    .split_first_chunk::<PRIORITY_LEN>()
                    .ok_or(Refused::Malformed("PRIORITY without its fields"))?;
                priority = Some(*field);
                p = tail;
            }
            let end = p
                .len()
                .checked_sub(pad)
                .ok_or(Refused::Malformed("padding longer than the payload"))?;
            let fragment = &p[..end];
            self.block = Some(Block {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
                continuations: 0,
            });
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or(Refused::Malformed("CONTINUATION outside a header block"))?;
            block.fragment.extend_from_slice(payload);
            block.continuations += 1;
            if block.continuations > MAX_CONTINUATIONS {
                return Err(Refused::TooManyFrames);
            }
        }
        let block = self.block.as_ref().expect("a block is being read");
        if block.fragment.len() > MAX_HEADER_BLOCK {
            return Err(Refused::BlockTooLarge);
        }
        if head.flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a block is being read");
            self.rewrite(block, out)?;
        }
        Ok(())
    }

    /// Decodes a whole block, fixes its `:authority`, and writes it out.
    fn rewrite(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Refused> {
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(Refused::Hpack)?;
        if size > MAX_HEADER_LIST {
            return Err(Refused::ListTooLarge);
        }
        fix_authority(&mut fields);
        let mut encoded = Vec::new();
        if !self.table_dropped {
            // A dynamic table size update to 0 (RFC 7541 section 6.3).
            encoded.push(0x20);
            self.table_dropped = true;
        }
        self.encoder
            .encode_into(
                fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())),
                &mut encoded,
            )
            .expect("writing to a Vec");
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// Replaces every `:authority` h2 would refuse (by the parser h2 uses)
/// with `localhost`. Whether it is missing, repeated or misplaced is left
/// for h2 to judge.
fn fix_authority(fields: &mut [(Vec<u8>, Vec<u8>)]) {
    for (name, value) in fields {
        if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
            *value = LOCALHOST.to_vec();
        }
    }
}

/// A header block as a HEADERS frame and its CONTINUATION frames.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let first_room = MAX_FRAME - block.priority.map_or(0, |_| PRIORITY_LEN);
    let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    Head {
        len: priority.len() + first.len(),
        kind: HEADERS,
        flags,
        stream: block.stream,
    }
    .write(out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        Head {
            len: chunk.len(),
            kind: CONTINUATION,
            flags: if rest.is_empty() { END_HEADERS } else { 0 },
            stream: block.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

/// A stream whose reads go through a [`Rewriter`]; writes pass unchanged.
pub struct Rewriting<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read, from `sent` on.
    out: Vec<u8>,
    sent: usize,
}

impl<S> Rewriting<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            out: Vec::new(),
            sent: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewriting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.sent < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.sent);
                buf.put_slice(&this.out[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.out.len() {
                    this.out.clear();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.stage == Stage::Ended {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.rewriter.feed(read.filled(), &mut this.out) {
                tracing::info!(error = %e, "Workload API: closing a connection");
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewriting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Head {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    /// A header block as h2 sees it: stream, END_STREAM, priority, and
    /// its fragments or fields.
    type Seen<T> = (u32, bool, Option<Vec<u8>>, T);

    /// The frames in `bytes` (after the preface): header, payload.
    fn frames(mut bytes: &[u8]) -> Vec<(Head, Vec<u8>)> {
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let head = Head::parse(bytes);
            all.push((head, bytes[FRAME_HEADER..FRAME_HEADER + head.len].to_vec()));
            bytes = &bytes[FRAME_HEADER + head.len..];
        }
        all
    }

    /// h2's side: decodes the header blocks of `bytes` (after the
    /// preface), checking the framing: per block, its stream, END_STREAM,
    /// priority and fields.
    fn blocks(bytes: &[u8]) -> Vec<Seen<Fields>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut out = Vec::new();
        let mut current: Option<Seen<Vec<u8>>> = None;
        for (head, payload) in frames(bytes) {
            assert!(head.len <= MAX_FRAME);
            match head.kind {
                HEADERS => {
                    assert!(current.is_none());
                    assert_eq!(head.flags & PADDED, 0, "padding is taken off");
                    let (priority, fragment) = if head.flags & PRIORITY != 0 {
                        (Some(payload[..5].to_vec()), payload[5..].to_vec())
                    } else {
                        (None, payload)
                    };
                    current = Some((
                        head.stream,
                        head.flags & END_STREAM != 0,
                        priority,
                        fragment,
                    ));
                }
                CONTINUATION => {
                    let c = current.as_mut().expect("CONTINUATION in a block");
                    assert_eq!(c.0, head.stream);
                    c.3.extend_from_slice(&payload);
                }
                _ => assert!(current.is_none()),
            }
            if matches!(head.kind, HEADERS | CONTINUATION) && head.flags & END_HEADERS != 0 {
                let (stream, end, priority, fragment) = current.take().unwrap();
                out.push((stream, end, priority, decoder.decode(&fragment).unwrap()));
            }
        }
        assert!(current.is_none());
        out
    }

    fn request(authority: Option<&str>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/SpiffeWorkloadAPI/FetchJWTSVID".to_vec(),
            ),
        ];
        if let Some(a) = authority {
            fields.push((b":authority".to_vec(), a.as_bytes().to_vec()));
        }
        fields.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        fields.push((b"workload.spiffe.io".to_vec(), b"true".to_vec()));
        fields
    }

    fn encode(encoder: &mut loona_hpack::Encoder, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    fn run(input: &[u8]) -> (Vec<u8>, Result<(), Refused>) {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        let result = r.feed(input, &mut out);
        (out, result)
    }

    #[test]
    fn an_authority_h2_refuses_becomes_localhost_and_the_rest_is_kept() {
        for (sent, expect) in [
            (Some("/run/idgate/workload.sock"), Some("localhost")),
            (Some("%2Frun%2Fidgate%2Fworkload.sock"), Some("localhost")),
            (Some(""), Some("localhost")),
            (Some("localhost"), Some("localhost")),
            (Some("example.org:8080"), Some("example.org:8080")),
            (None, None),
        ] {
            let mut encoder = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
            let block = encode(&mut encoder, &request(sent));
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
            // The same request again: now from the client's dynamic table.
            let again = encode(&mut encoder, &request(sent));
            assert!(again.len() < block.len());
            input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &again));
            // Byte by byte, as a slow client would send it.
            let mut r = Rewriter::default();
            let mut out = Vec::new();
            for b in &input {
                r.feed(std::slice::from_ref(b), &mut out).unwrap();
            }
            assert_eq!(&out[..PREFACE.len()], PREFACE);
            let decoded = blocks(&out[PREFACE.len()..]);
            let mut want = request(expect);
            // The position of the authority is kept.
            if sent.is_some() {
                want = request(sent);
                want[3].1 = expect.unwrap().as_bytes().to_vec();
            }
            assert_eq!(decoded.len(), 2, "{sent:?}");
            assert_eq!(decoded[0], (1, false, None, want.clone()), "{sent:?}");
            assert_eq!(decoded[1], (3, true, None, want), "{sent:?}");
            // Other frames pass unchanged.
            let all = frames(&out[PREFACE.len()..]);
            assert_eq!(all[0].0.kind, 0x4);
            assert_eq!(all[2].1, [0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn padding_priority_continuation_and_huffman_are_read() {
        // RFC 7541 C.4.1: a request with Huffman-coded strings.
        let huffman = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
        let mut payload = vec![3u8]; // pad length
        payload.extend([0x80, 0, 0, 1, 200]); // priority: exclusive on 1
        payload.extend(&huffman[..4]);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, 0, 5, &huffman[4..10]));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &huffman[10..]));
        let (out, result) = run(&input);
        result.unwrap();
        let decoded = blocks(&out[PREFACE.len()..]);
        assert_eq!(
            decoded,
            [(
                5,
                true,
                Some(vec![0x80, 0, 0, 1, 200]),
                vec![
                    (b":method".to_vec(), b"GET".to_vec()),
                    (b":scheme".to_vec(), b"http".to_vec()),
                    (b":path".to_vec(), b"/".to_vec()),
                    (b":authority".to_vec(), b"www.example.com".to_vec()),
                ]
            )]
        );
    }

    #[test]
    fn a_large_block_is_split_into_frames_h2_accepts() {
        let mut fields = request(Some("/run/x.sock"));
        fields.push((b"x-big".to_vec(), vec![b'a'; 30_000]));
        let mut encoder = loona_hpack::Encoder::new();
        let block = encode(&mut encoder, &fields);
        let mut input = PREFACE.to_vec();
        for (i, chunk) in block.chunks(10_000).enumerate() {
            let last = (i + 1) * 10_000 >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk));
        }
        let (out, result) = run(&input);
        result.unwrap();
        let all = frames(&out[PREFACE.len()..]);
        assert_eq!(all.len(), 2);
        let decoded = blocks(&out[PREFACE.len()..]);
        fields[3].1 = b"localhost".to_vec();
        assert_eq!(decoded[0].3, fields);
    }

    #[test]
    fn what_cannot_be_rewritten_ends_the_connection_with_an_undecodable_block() {
        let poison = frame(HEADERS, END_HEADERS, 1, &[0x80]);
        let mut encoder = loona_hpack::Encoder::new();
        let good = encode(&mut encoder, &request(Some("a")));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // An integer of too many octets; an index past the tables.
            (
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                ),
                "HPACK decoding",
            ),
            (
                frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]),
                "HPACK decoding",
            ),
            // A dynamic table size update to 4097, over SETTINGS.
            (
                frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe2, 0x1f, 0x82]),
                "HPACK decoding: Dynamic table size",
            ),
            (
                [frame(HEADERS, 0, 1, &good), frame(0x0, 0, 1, &[])].concat(),
                "malformed frame: a header block interrupted by another frame",
            ),
            (
                [frame(HEADERS, 0, 1, &good), frame(CONTINUATION, 0, 3, &[])].concat(),
                "malformed frame: a header block interrupted",
            ),
            (
                frame(CONTINUATION, END_HEADERS, 1, &good),
                "malformed frame: CONTINUATION outside a header block",
            ),
            (
                frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82]),
                "malformed frame: padding longer than the payload",
            ),
            (
                frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
                "malformed frame: PRIORITY without its fields",
            ),
            (
                frame(HEADERS, END_HEADERS, 0, &good),
                "malformed frame: HEADERS on stream 0",
            ),
            (
                [0, 0x40, 1, HEADERS, 0, 0, 0, 0, 1].to_vec(),
                "a header frame of 16385 bytes",
            ),
        ];
        for (frames, why) in cases {
            let mut input = PREFACE.to_vec();
            input.extend(&frames);
            input.extend(frame(0x6, 0, 0, &[0; 8])); // PING after: not read
            let (out, result) = run(&input);
            let e = result.unwrap_err().to_string();
            assert!(e.starts_with(why), "{e} (expected {why})");
            assert!(out.ends_with(&poison), "{out:?}");
        }
    }

    #[test]
    fn block_and_list_limits_hold() {
        // Over 64 KiB of fragments: refused before the end.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0; 16_000]));
        for _ in 0..4 {
            input.extend(frame(CONTINUATION, 0, 1, &[0; 16_000]));
        }
        assert_eq!(run(&input).1, Err(Refused::BlockTooLarge));
        // A flood of empty CONTINUATION frames.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..=MAX_CONTINUATIONS {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        assert_eq!(run(&input).1, Err(Refused::TooManyFrames));
        // An HPACK bomb: one 4 KiB table entry indexed 5,000 times.
        let mut block = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e];
        block.extend([b'y'; 4000]);
        block.extend([0x80 | 62; 13_000]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..16_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[16_000..]));
        assert_eq!(run(&input).1, Err(Refused::ListTooLarge));
    }

    #[test]
    fn not_http2_passes_for_h2_to_refuse() {
        let (out, result) = run(b"GET / HTTP/1.1\r\n\r\n");
        result.unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            (
                proptest::string::string_regex("[a-z][a-z0-9-]{0,20}").unwrap(),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(n, v)| (n.into_bytes(), v))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Any bytes after the preface, in any chunks: no panic, and
            /// what comes out is frames h2 can read.
            #[test]
            fn arbitrary_bytes_never_panic(
                body in proptest::collection::vec(any::<u8>(), 0..40_000),
                cut in 1usize..5000,
            ) {
                let mut r = Rewriter::default();
                let mut out = Vec::new();
                let input = [PREFACE, &body].concat();
                for chunk in input.chunks(cut) {
                    let _ = r.feed(chunk, &mut out);
                }
            }

            /// Arbitrary header frames, some well formed: no panic.
            #[test]
            fn arbitrary_header_frames_never_panic(
                frames in proptest::collection::vec(
                    (prop_oneof![Just(HEADERS), Just(CONTINUATION), Just(0u8)],
                     any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..200)),
                    0..20),
            ) {
                let mut input = PREFACE.to_vec();
                for (kind, flags, stream, payload) in frames {
                    input.extend(frame(kind, flags, stream, &payload));
                }
                let _ = run(&input);
            }

            /// Valid header blocks through the client's dynamic table, in
            /// frames of any size: they round-trip with only `:authority`
            /// changed.
            #[test]
            fn valid_blocks_round_trip(
                requests in proptest::collection::vec(
                    (proptest::option::of("[ -~]{0,40}"),
                     proptest::collection::vec(field(), 0..12),
                     1usize..3000,
                     any::<bool>()),
                    1..6),
            ) {
                let mut encoder = loona_hpack::Encoder::new();
                let mut input = PREFACE.to_vec();
                let mut want = Vec::new();
                for (i, (authority, extra, size, end)) in requests.into_iter().enumerate() {
                    let stream = 2 * i as u32 + 1;
                    let mut fields = request(authority.as_deref());
                    fields.extend(extra);
                    let block = encode(&mut encoder, &fields);
                    // Within the CONTINUATION frames a block may take.
                    let size = size.max(block.len().div_ceil(MAX_CONTINUATIONS + 1));
                    let chunks: Vec<&[u8]> = if block.is_empty() { vec![&[]] } else { block.chunks(size).collect() };
                    for (j, chunk) in chunks.iter().enumerate() {
                        let mut flags = if j + 1 == chunks.len() { END_HEADERS } else { 0 };
                        if j == 0 && end { flags |= END_STREAM; }
                        input.extend(frame(if j == 0 { HEADERS } else { CONTINUATION }, flags, stream, chunk));
                    }
                    if authority
                        .as_ref()
                        .is_some_and(|a| http::uri::Authority::try_from(a.as_str()).is_err())
                    {
                        fields[3].1 = b"localhost".to_vec();
                    }
                    want.push((stream, end, None, fields));
                }
                let (out, result) = run(&input);
                prop_assert_eq!(result, Ok(()));
                prop_assert_eq!(blocks(&out[PREFACE.len()..]), want);
            }
        }
    }
}
