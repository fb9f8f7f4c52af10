//! A bare HTTP/2 client, frame by frame: it sends header blocks a library
//! client would never send (any `:authority`, broken HPACK, oversized
//! blocks) and reports exactly what the server answered.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// What the server did with a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The stream ended with these header fields (a trailers-only
    /// response, or the trailers after a body).
    Ended(Vec<(String, String)>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed without a word.
    Closed,
}

impl Answer {
    /// The `grpc-status` the stream ended with.
    pub fn grpc_status(&self) -> Option<&str> {
        match self {
            Answer::Ended(fields) => fields
                .iter()
                .find(|(n, _)| n == "grpc-status")
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// A frame: header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// One connection.
pub struct Conn {
    sock: UnixStream,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Conn {
    /// Connects and sends the preface and empty SETTINGS.
    pub fn open(socket: &Path) -> Self {
        let sock = UnixStream::connect(socket).expect("connect to the socket");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut conn = Self {
            sock,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
        };
        conn.send(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat());
        conn
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // A server that has closed may refuse the rest: what it answered
        // is read next.
        let _ = self.sock.write_all(bytes);
    }

    /// The header block of a gRPC request for `method`, with `authority`
    /// (none: no `:authority` field), through the connection's HPACK
    /// encoder (so later blocks refer to its dynamic table).
    pub fn request_block(&mut self, method: &str, authority: Option<&[u8]>) -> Vec<u8> {
        let path = format!("/SpiffeWorkloadAPI/{method}");
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
        ];
        if let Some(a) = authority {
            fields.push((b":authority", a));
        }
        fields.extend([
            (&b"content-type"[..], &b"application/grpc"[..]),
            (b"te", b"trailers"),
            (b"workload.spiffe.io", b"true"),
        ]);
        self.encoder.encode(fields)
    }

    /// Sends a unary gRPC call on `stream`: its header block, then
    /// `message` as one DATA frame that ends the stream.
    pub fn call(&mut self, stream: u32, block: &[u8], message: &[u8]) {
        let mut body = vec![0];
        body.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
        body.extend(message);
        self.send(
            &[
                frame(HEADERS, END_HEADERS, stream, block),
                frame(DATA, END_STREAM, stream, &body),
            ]
            .concat(),
        );
    }

    /// Reads frames until `stream` ends, is reset, or the connection goes
    /// away; SETTINGS are acknowledged.
    pub fn answer(&mut self, stream: u32) -> Answer {
        loop {
            let Some((kind, flags, id, payload)) = self.read_frame() else {
                return Answer::Closed;
            };
            match kind {
                SETTINGS if flags & ACK == 0 => self.send(&frame(SETTINGS, ACK, 0, &[])),
                HEADERS => {
                    assert_ne!(
                        flags & END_HEADERS,
                        0,
                        "the server splits no blocks this small"
                    );
                    let fields = self
                        .decoder
                        .decode(&payload)
                        .expect("the server's HPACK decodes");
                    if id == stream && flags & END_STREAM != 0 {
                        return Answer::Ended(
                            fields
                                .into_iter()
                                .map(|(n, v)| {
                                    (
                                        String::from_utf8_lossy(&n).into_owned(),
                                        String::from_utf8_lossy(&v).into_owned(),
                                    )
                                })
                                .collect(),
                        );
                    }
                }
                RST_STREAM if id == stream => return Answer::Reset(code(&payload[..4])),
                GOAWAY => return Answer::GoAway(code(&payload[4..8])),
                _ => {}
            }
        }
    }

    fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.sock.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.sock.read_exact(&mut payload).ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    }
}

fn code(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
