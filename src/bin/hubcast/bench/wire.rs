//! The wire protocols the bench speaks: hubcast's JSON lines, NATS's text protocol,
//! Redis's RESP, hubcast over WebSocket (one event per text message), and Socket.IO 4
//! (Engine.IO 4 over WebSocket: `40` to connect, `42["bench",BODY]` per message, ping
//! `2` answered `3`). Each target gets the same body bytes; only the framing differs.
//! WebSocket frames from the bench are masked with a zero key (RFC 6455 lets a client
//! pick any key; a zero one leaves the body bytes as they are).
//!
//! These are small adapters for one workload (one subject, fixed-size messages), not
//! general clients: they frame a publish, recognise a delivery, answer keep-alives and
//! report errors, and that is all.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The subject (NATS), channel (Redis) or event name (hubcast) every message uses.
pub const SUBJECT: &str = "bench";

/// Which server, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    /// `host:port`.
    pub addr: String,
    /// TLS from the first byte (`hubcasts://`, or `--tls`; nats-server needs
    /// `handshake_first` for it).
    pub tls: bool,
    /// The HTTP path to upgrade (WebSocket targets).
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hubcast,
    Nats,
    Redis,
    /// hubcast's `/ws`.
    Ws,
    /// A Socket.IO 4 server.
    SocketIo,
}

impl Kind {
    fn scheme(self) -> &'static str {
        match self {
            Kind::Hubcast => "hubcast",
            Kind::Nats => "nats",
            Kind::Redis => "redis",
            Kind::Ws => "ws",
            Kind::SocketIo => "socketio",
        }
    }

    /// Whether the connection starts with an HTTP upgrade to WebSocket.
    pub fn websocket(self) -> bool {
        matches!(self, Kind::Ws | Kind::SocketIo)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        write!(f, "{}{s}://{}", self.kind.scheme(), self.addr)?;
        if self.kind == Kind::Ws {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

impl Target {
    /// Replaces the port of the address (`-p/--port`).
    pub fn set_port(&mut self, port: u16) {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(host, _)| host);
        self.addr = format!("{host}:{port}");
    }
}

impl FromStr for Target {
    type Err = String;

    /// `hubcast://HOST:PORT` (`hubcasts://` for TLS), `nats://HOST:PORT`,
    /// `redis://HOST:PORT`, or a bare
    /// `HOST:PORT` (a hubcast hub).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, tls, rest) = match text.split_once("://") {
            None => (Kind::Hubcast, false, text),
            Some(("hubcast", rest)) => (Kind::Hubcast, false, rest),
            Some(("hubcasts", rest)) => (Kind::Hubcast, true, rest),
            Some(("nats", rest)) => (Kind::Nats, false, rest),
            Some(("redis", rest)) => (Kind::Redis, false, rest),
            Some(("ws", rest)) => (Kind::Ws, false, rest),
            Some(("wss", rest)) => (Kind::Ws, true, rest),
            Some(("socketio", rest)) => (Kind::SocketIo, false, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "unknown scheme {scheme:?} (use hubcast://, hubcasts://, nats://, redis://, ws://HOST:PORT/ws or socketio://)"
                ))
            }
        };
        let (addr, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        let path = match kind {
            Kind::Ws if path.is_empty() || path == "/" => "/ws".to_owned(),
            Kind::Ws => path.to_owned(),
            Kind::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
            _ => String::new(),
        };
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Target {
                kind,
                addr: addr.to_owned(),
                tls,
                path,
            }),
            _ => Err(format!(
                "{text:?} has no HOST:PORT (example: nats://127.0.0.1:4222)"
            )),
        }
    }
}

/// What a subscriber found at the front of its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A published message; `body` is where its bytes are in the buffer.
    Message { body: Range<usize>, used: usize },
    /// Something else from the server; `reply` is owed back (a NATS `PONG`); `ready`
    /// confirms the subscription handshake.
    Control {
        used: usize,
        reply: Option<&'static [u8]>,
        ready: bool,
    },
    /// The server reported an error.
    Error { text: String, used: usize },
    /// Needs more bytes.
    Incomplete,
    /// Bytes this protocol cannot frame: the stream cannot be followed any further.
    Garbage(String),
}

/// What a publisher's server said back.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ignore,
    /// Answer with these bytes (a NATS `PONG`).
    Answer(&'static [u8]),
    /// Redis's count of the subscribers a `PUBLISH` reached.
    Receivers(u64),
    Error(String),
}

impl Kind {
    /// What a subscriber sends first; the server answers with a `ready` control.
    pub fn subscribe(self) -> Vec<u8> {
        match self {
            Kind::Ws => ws_frame(b"{\"event\":\"$ping\",\"payload\":null}"),
            Kind::SocketIo => ws_frame(b"40"),
            // In the pool once connected; the `$pong` proves the hub has accepted us.
            Kind::Hubcast => b"{\"event\":\"$ping\",\"payload\":null}\n".to_vec(),
            Kind::Nats => format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"hubcast-bench\"}}\r\nSUB {SUBJECT} 1\r\nPING\r\n"
            )
            .into_bytes(),
            Kind::Redis => resp_command(&["SUBSCRIBE", SUBJECT]),
        }
    }

    /// What a publisher sends first; `None` if it may start publishing at once.
    /// The reply that confirms it is a `ready` [`Inbound::Control`].
    pub fn publisher_hello(self) -> Option<Vec<u8>> {
        match self {
            Kind::Ws => Some(ws_frame(
                b"{\"event\":\"$hello\",\"payload\":{\"echo\":false,\"name\":\"bench\"}}",
            )),
            // The server broadcasts to everyone but the sender.
            Kind::SocketIo => Some(ws_frame(b"40")),
            // No echo: the publisher does not want its own messages back.
            Kind::Hubcast => {
                Some(b"{\"event\":\"$hello\",\"payload\":{\"echo\":false,\"name\":\"bench\"}}\n".to_vec())
            }
            Kind::Nats => Some(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"hubcast-bench\"}\r\nPING\r\n"
                    .to_vec(),
            ),
            Kind::Redis => None,
        }
    }

    /// The bytes before and after a `size`-byte body in a publish.
    pub fn publish_framing(self, size: usize) -> (Vec<u8>, &'static [u8]) {
        match self {
            Kind::Ws => (ws_header(size), b""),
            Kind::SocketIo => {
                let mut head = ws_header(SOCKETIO_EVENT.len() + size + 1);
                head.extend_from_slice(SOCKETIO_EVENT);
                (head, b"]")
            }
            Kind::Hubcast => (Vec::new(), b"\n"),
            Kind::Nats => (format!("PUB {SUBJECT} {size}\r\n").into_bytes(), b"\r\n"),
            Kind::Redis => (
                format!(
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{SUBJECT}\r\n${size}\r\n",
                    SUBJECT.len()
                )
                .into_bytes(),
                b"\r\n",
            ),
        }
    }

    /// Frames the next inbound item at the start of `buf`.
    pub fn inbound(self, buf: &[u8]) -> Inbound {
        match self {
            Kind::Hubcast => hubcast_inbound(buf),
            Kind::Nats => nats_inbound(buf),
            Kind::Redis => redis_inbound(buf),
            Kind::Ws | Kind::SocketIo => websocket_inbound(self, buf),
        }
    }

    /// Frames the next reply to a publisher at the start of `buf`: `Some((used, reply))`.
    pub fn reply(self, buf: &[u8]) -> Result<Option<(usize, Reply)>, String> {
        if self == Kind::Redis {
            if let Some((line, used)) = crlf_line(buf) {
                return Ok(Some((used, redis_reply(line)?)));
            }
            return Ok(None);
        }
        Ok(match self.inbound(buf) {
            Inbound::Incomplete => None,
            Inbound::Garbage(why) => return Err(why),
            Inbound::Error { text, used } => Some((used, Reply::Error(text))),
            Inbound::Control {
                used,
                reply: Some(answer),
                ..
            } => Some((used, Reply::Answer(answer))),
            Inbound::Control { used, .. } | Inbound::Message { used, .. } => {
                Some((used, Reply::Ignore))
            }
        })
    }
}

/// `42["bench",`: a Socket.IO event packet up to its payload.
const SOCKETIO_EVENT: &[u8] = b"42[\"bench\",";

/// The header of a final, masked (zero key) text frame of `len` bytes.
pub fn ws_header(len: usize) -> Vec<u8> {
    let mut head = vec![0x81];
    match len {
        0..=125 => head.push(0x80 | len as u8),
        126..=65535 => {
            head.push(0x80 | 126);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head.push(0x80 | 127);
            head.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    head.extend_from_slice(&[0; 4]);
    head
}

/// A final, masked (zero key) text frame.
pub fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = ws_header(payload.len());
    frame.extend_from_slice(payload);
    frame
}

/// One frame from a WebSocket server (unmasked), read as hubcast events or Socket.IO
/// packets.
fn websocket_inbound(kind: Kind, buf: &[u8]) -> Inbound {
    if buf.len() < 2 {
        return Inbound::Incomplete;
    }
    let opcode = buf[0] & 0x0F;
    let (len, start) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        126 | 127 => return Inbound::Incomplete,
        n => (usize::from(n), 2),
    };
    if buf[1] & 0x80 != 0 {
        return Inbound::Garbage("the server sent a masked frame".into());
    }
    if buf.len() < start + len {
        return Inbound::Incomplete;
    }
    let used = start + len;
    let payload = &buf[start..used];
    let control = |reply, ready| Inbound::Control { used, reply, ready };
    match opcode {
        // A ping: a pong with the same (empty, from hubcast) body.
        0x9 if len == 0 => return control(Some(&[0x8A, 0x80, 0, 0, 0, 0][..]), false),
        0x9 => return Inbound::Garbage("a ping with a body (not expected here)".into()),
        0xA => return control(None, false),
        0x8 => {
            return Inbound::Error {
                text: format!("the server closed the WebSocket: {}", lossy(payload)),
                used,
            }
        }
        0x1 => {}
        other => return Inbound::Garbage(format!("unexpected WebSocket opcode {other}")),
    }
    if kind == Kind::Ws {
        return match hubcast_inbound_line(payload) {
            Inbound::Message { body, .. } => Inbound::Message {
                body: start + body.start..start + body.end,
                used,
            },
            Inbound::Control { reply, ready, .. } => Inbound::Control { used, reply, ready },
            Inbound::Error { text, .. } => Inbound::Error { text, used },
            other => other,
        };
    }
    // Engine.IO packets: 0 open, 2 ping, 4 message (Socket.IO: 40 connect, 42 event,
    // 44 connect error).
    if let Some(rest) = payload.strip_prefix(SOCKETIO_EVENT) {
        return match rest.strip_suffix(b"]") {
            Some(_) => Inbound::Message {
                body: start + SOCKETIO_EVENT.len()..used - 1,
                used,
            },
            None => Inbound::Garbage(format!("bad Socket.IO event {:?}", lossy(payload))),
        };
    }
    match payload {
        b"2" => control(Some(&[0x81, 0x81, 0, 0, 0, 0, b'3'][..]), false),
        _ if payload.starts_with(b"40") => control(None, true),
        _ if payload.starts_with(b"44") || payload.starts_with(b"1") => Inbound::Error {
            text: format!("Socket.IO: {}", lossy(payload)),
            used,
        },
        _ => control(None, false),
    }
}

fn hubcast_inbound(buf: &[u8]) -> Inbound {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return Inbound::Incomplete;
    };
    match hubcast_inbound_line(&buf[..end]) {
        Inbound::Message { body, .. } => Inbound::Message {
            body,
            used: end + 1,
        },
        Inbound::Control { reply, ready, .. } => Inbound::Control {
            used: end + 1,
            reply,
            ready,
        },
        Inbound::Error { text, .. } => Inbound::Error {
            text,
            used: end + 1,
        },
        other => other,
    }
}

/// One hubcast line (without its newline); `used` is left 0 for the caller to set.
fn hubcast_inbound_line(line: &[u8]) -> Inbound {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let used = 0;
    if line.starts_with(b"{\"event\":\"$error\"") {
        return Inbound::Error {
            text: String::from_utf8_lossy(line).into_owned(),
            used,
        };
    }
    if line.starts_with(b"{\"event\":\"$") {
        let ready = line.starts_with(b"{\"event\":\"$pong\"")
            || line.starts_with(b"{\"event\":\"$welcome\"");
        return Inbound::Control {
            used,
            reply: None,
            ready,
        };
    }
    Inbound::Message {
        body: 0..line.len(),
        used,
    }
}

fn nats_inbound(buf: &[u8]) -> Inbound {
    let Some((line, used)) = crlf_line(buf) else {
        return Inbound::Incomplete;
    };
    if let Some(args) = line.strip_prefix(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let Some(len) = args
            .rsplit(|&b| b == b' ')
            .next()
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
        else {
            return Inbound::Garbage(format!("bad NATS MSG line {:?}", lossy(line)));
        };
        if buf.len() < used + len + 2 {
            return Inbound::Incomplete;
        }
        if &buf[used + len..used + len + 2] != b"\r\n" {
            return Inbound::Garbage("a NATS message is not followed by CRLF".into());
        }
        return Inbound::Message {
            body: used..used + len,
            used: used + len + 2,
        };
    }
    let control = |reply, ready| Inbound::Control { used, reply, ready };
    match line {
        b"PING" => control(Some(b"PONG\r\n".as_slice()), false),
        b"PONG" => control(None, true),
        b"+OK" => control(None, false),
        _ if line.starts_with(b"INFO ") => control(None, false),
        _ if line.starts_with(b"-ERR") => Inbound::Error {
            text: lossy(line),
            used,
        },
        _ => Inbound::Garbage(format!("unexpected NATS line {:?}", lossy(line))),
    }
}

/// A subscriber sees arrays: `message <channel> <body>` and `subscribe <channel> <n>`.
fn redis_inbound(buf: &[u8]) -> Inbound {
    let Some((head, mut pos)) = crlf_line(buf) else {
        return Inbound::Incomplete;
    };
    if head.first() == Some(&b'-') {
        return Inbound::Error {
            text: lossy(head),
            used: pos,
        };
    }
    let Some(count) = head.strip_prefix(b"*").and_then(parse_usize) else {
        return Inbound::Garbage(format!("unexpected Redis reply {:?}", lossy(head)));
    };
    let mut items = [0..0, 0..0, 0..0];
    for index in 0..count {
        let Some((line, after)) = crlf_line(&buf[pos..]) else {
            return Inbound::Incomplete;
        };
        let item = match line.first() {
            Some(b'$') => {
                let Some(len) = parse_usize(&line[1..]) else {
                    return Inbound::Garbage(format!("bad Redis length {:?}", lossy(line)));
                };
                let start = pos + after;
                if buf.len() < start + len + 2 {
                    return Inbound::Incomplete;
                }
                pos = start + len + 2;
                start..start + len
            }
            Some(b':') => {
                let start = pos + 1;
                pos += after;
                start..start + line.len() - 1
            }
            _ => return Inbound::Garbage(format!("unexpected Redis item {:?}", lossy(line))),
        };
        if let Some(slot) = items.get_mut(index) {
            *slot = item;
        }
    }
    match &buf[items[0].clone()] {
        b"message" if count == 3 => Inbound::Message {
            body: items[2].clone(),
            used: pos,
        },
        kind => Inbound::Control {
            used: pos,
            reply: None,
            ready: kind == b"subscribe",
        },
    }
}

fn redis_reply(line: &[u8]) -> Result<Reply, String> {
    match line.first() {
        Some(b':') => parse_usize(&line[1..])
            .map(|n| Reply::Receivers(n as u64))
            .ok_or_else(|| format!("bad Redis integer {:?}", lossy(line))),
        Some(b'-') => Ok(Reply::Error(lossy(line))),
        Some(b'+') => Ok(Reply::Ignore),
        _ => Err(format!("unexpected Redis reply {:?}", lossy(line))),
    }
}

/// The line before the first CRLF, and how many bytes it took with its CRLF.
fn crlf_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = memchr::memmem::find(buf, b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn parse_usize(digits: &[u8]) -> Option<usize> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A RESP command: an array of bulk strings.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        let nats: Target = "nats://127.0.0.1:4222".parse().unwrap();
        assert_eq!(nats.kind, Kind::Nats);
        assert_eq!(nats.to_string(), "nats://127.0.0.1:4222");
        assert_eq!(
            "127.0.0.1:3000".parse::<Target>().unwrap().kind,
            Kind::Hubcast
        );
        assert!("http://x:1".parse::<Target>().is_err());
        assert!("redis://localhost".parse::<Target>().is_err());
    }

    /// Every protocol frames its own publish as a delivery of the same body, and waits
    /// for more bytes at every cut short of the whole message.
    #[test]
    fn each_protocol_frames_a_delivery_and_waits_when_cut() {
        let body = b"{\"event\":\"bench\",\"payload\":12}";
        assert_eq!(body.len(), 30);
        let ws = |payload: &[u8]| [&[0x81, payload.len() as u8][..], payload].concat();
        let deliveries: [(Kind, Vec<u8>); 5] = [
            (Kind::Ws, ws(body)),
            (
                Kind::SocketIo,
                ws(&[&b"42[\"bench\","[..], body, b"]"].concat()),
            ),
            (Kind::Hubcast, [&body[..], b"\n"].concat()),
            (
                Kind::Nats,
                [&b"MSG bench 1 30\r\n"[..], body, b"\r\n"].concat(),
            ),
            (
                Kind::Redis,
                [
                    &b"*3\r\n$7\r\nmessage\r\n$5\r\nbench\r\n$30\r\n"[..],
                    body,
                    b"\r\n",
                ]
                .concat(),
            ),
        ];
        for (kind, wire) in deliveries {
            match kind.inbound(&wire) {
                Inbound::Message { body: range, used } => {
                    assert_eq!(&wire[range], body, "{kind:?}");
                    assert_eq!(used, wire.len(), "{kind:?}");
                }
                other => panic!("{kind:?}: {other:?}"),
            }
            for cut in 0..wire.len() {
                assert_eq!(
                    kind.inbound(&wire[..cut]),
                    Inbound::Incomplete,
                    "{kind:?} at {cut}"
                );
            }
        }
    }

    #[test]
    fn handshakes_keepalives_and_errors_are_recognised() {
        let ready = |kind: Kind, wire: &[u8]| matches!(kind.inbound(wire), Inbound::Control { ready: true, used, .. } if used == wire.len());
        assert!(ready(
            Kind::Hubcast,
            b"{\"event\":\"$pong\",\"payload\":null}\n"
        ));
        assert!(ready(Kind::Nats, b"PONG\r\n"));
        assert!(ready(
            Kind::Redis,
            b"*3\r\n$9\r\nsubscribe\r\n$5\r\nbench\r\n:1\r\n"
        ));
        assert_eq!(
            Kind::Nats.reply(b"PING\r\n"),
            Ok(Some((6, Reply::Answer(b"PONG\r\n"))))
        );
        assert_eq!(
            Kind::Redis.reply(b":10\r\n"),
            Ok(Some((5, Reply::Receivers(10))))
        );
        assert!(matches!(
            Kind::Hubcast.inbound(b"{\"event\":\"$error\",\"payload\":{}}\n"),
            Inbound::Error { .. }
        ));
        assert!(matches!(
            Kind::Nats.inbound(b"HELLO\r\n"),
            Inbound::Garbage(_)
        ));
    }

    #[test]
    fn websocket_publishes_are_masked_frames_with_the_body_as_is() {
        let body = [b'x'; 300];
        let (head, tail) = Kind::Ws.publish_framing(body.len());
        assert_eq!(head, [0x81, 0x80 | 126, 1, 44, 0, 0, 0, 0]);
        assert!(tail.is_empty());
        let (head, tail) = Kind::SocketIo.publish_framing(3);
        assert_eq!(&head[..2], &[0x81, 0x80 | 15]);
        assert_eq!(&head[6..], b"42[\"bench\",");
        assert_eq!(tail, b"]");
        // Engine.IO's ping is answered with a pong packet; hubcast's ping frame with a
        // pong frame.
        assert!(matches!(
            Kind::SocketIo.inbound(&[0x81, 1, b'2']),
            Inbound::Control { reply: Some(r), .. } if r == [0x81, 0x81, 0, 0, 0, 0, b'3']
        ));
        assert!(matches!(
            Kind::Ws.inbound(&[0x89, 0]),
            Inbound::Control { reply: Some(r), .. } if r == [0x8A, 0x80, 0, 0, 0, 0]
        ));
        assert!(matches!(
            Kind::SocketIo.inbound(&[0x81, 4, b'4', b'0', b'{', b'}']),
            Inbound::Control { ready: true, .. }
        ));
    }

    #[test]
    fn redis_publish_framing_is_resp() {
        let (head, tail) = Kind::Redis.publish_framing(3);
        let wire = [&head[..], b"abc", tail].concat();
        assert_eq!(
            wire,
            resp_command(&["PUBLISH", SUBJECT, "abc"]),
            "{}",
            lossy(&wire)
        );
    }
}
