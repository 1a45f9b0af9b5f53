//! A small Redis client for the quotas frontends share ([`super::global`]): RESP2 over one
//! multiplexed TCP connection, scripts run by SHA (`EVALSHA`, then `EVAL` when the server
//! does not know it), and a bound on every call, so a Redis that is down, slow or gone
//! costs a request at most the timeout and never a hang.
//!
//! ```text
//!  call() ──frame──> channel ──> connection task ──write──> Redis
//!    │                              │ pending: FIFO of (deadline, reply sender)
//!    └── reply (or error) <──────── └─ each reply read answers the oldest pending call
//!  a write or read error, a reply that misses its deadline, a reply nobody asked for
//!      ──> the connection is dropped, every pending call fails, and calls fail at once
//!          (no connect attempt) for a backoff of 100 ms doubling to 2 s; the first call
//!          after it connects again
//! ```
//!
//! Redis answers in order on a connection, so one connection carries every concurrent
//! call (pipelined); there is no pool to size. No authentication or TLS yet.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Calls waiting for the connection task at most; past it calls fail at once.
const QUEUE: usize = 4096;
/// The first backoff after a failure; doubled on each failure in a row.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The largest bulk string or array a reply may hold (a bound against a confused peer).
const MAX_LEN: usize = 64 << 20;
/// How deeply arrays may nest in a reply.
const MAX_DEPTH: usize = 8;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`: the server refused the command.
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Nil,
    /// `*2\r\n...`
    Array(Vec<Value>),
}

/// Why a call got no usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// No connection: connecting failed or timed out.
    #[error("connecting to Redis at {address}: {reason}")]
    Connect { address: String, reason: String },
    /// No reply within the call's timeout.
    #[error("Redis at {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    /// The connection broke (write or read error, end of stream, bad reply).
    #[error("the connection to Redis at {address} broke: {reason}")]
    Broken { address: String, reason: String },
    /// A recent failure; calls fail at once until the backoff ends.
    #[error("Redis at {address} is backing off after a failure: {reason}")]
    Down { address: String, reason: String },
    /// The server answered with an error.
    #[error("Redis refused the command: {0}")]
    Server(String),
    /// The reply had an unexpected shape.
    #[error("unexpected reply from Redis: {0}")]
    Reply(String),
    /// Too many calls in flight, or the client is gone.
    #[error("the Redis client is overloaded or stopped")]
    Overloaded,
}

/// A command as RESP2 puts it on the wire: an array of bulk strings.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `buf`: `Ok(None)` while it is incomplete, else the
/// reply and the bytes it took.
///
/// # Errors
///
/// When `buf` does not start with a valid RESP2 reply.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, String> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Value, usize)>, String> {
    let Some(rest) = buf.get(at..) else {
        return Ok(None);
    };
    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
        if rest.len() > MAX_LEN {
            return Err("a reply line without its end".into());
        }
        return Ok(None);
    };
    let Some((&kind, line)) = rest[..end].split_first() else {
        return Err("an empty reply line".into());
    };
    let line = std::str::from_utf8(line).map_err(|_| "a reply line that is not UTF-8")?;
    let next = at + end + 2;
    let number = || -> Result<i64, String> {
        line.parse::<i64>()
            .map_err(|_| format!("{line:?} is not a number"))
    };
    let length = |n: i64| -> Result<Option<usize>, String> {
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(format!("a negative length {n}")),
            n if n as u64 > MAX_LEN as u64 => Err(format!("a length of {n} bytes")),
            n => Ok(Some(n as usize)),
        }
    };
    match kind {
        b'+' => Ok(Some((Value::Simple(line.to_string()), next))),
        b'-' => Ok(Some((Value::Error(line.to_string()), next))),
        b':' => Ok(Some((Value::Integer(number()?), next))),
        b'$' => {
            let Some(len) = length(number()?)? else {
                return Ok(Some((Value::Nil, next)));
            };
            let Some(body) = buf.get(next..next + len + 2) else {
                return Ok(None);
            };
            if &body[len..] != b"\r\n" {
                return Err("a bulk string without its end".into());
            }
            Ok(Some((Value::Bulk(body[..len].to_vec()), next + len + 2)))
        }
        b'*' => {
            let Some(count) = length(number()?)? else {
                return Ok(Some((Value::Nil, next)));
            };
            if depth >= MAX_DEPTH {
                return Err("arrays nested too deeply".into());
            }
            let mut items = Vec::with_capacity(count.min(64));
            let mut at = next;
            for _ in 0..count {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(items), at)))
        }
        other => Err(format!("an unknown reply type {:?}", other as char)),
    }
}

struct Call {
    frame: Vec<u8>,
    reply: oneshot::Sender<Result<Value, RedisError>>,
}

/// A Redis client over one multiplexed connection (see the module docs). Cheap to share;
/// its connection task starts on the first call and ends when the client is dropped.
#[derive(Debug)]
pub struct Redis {
    address: String,
    timeout: Duration,
    calls: OnceLock<mpsc::Sender<Call>>,
}

impl Redis {
    /// A client of the Redis at `address` (`host:port`) whose calls each take at most
    /// `timeout`, connecting included. Connects on the first call.
    pub fn new(address: impl Into<String>, timeout: Duration) -> Self {
        Self {
            address: address.into(),
            timeout,
            calls: OnceLock::new(),
        }
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends one command and waits for its reply, at most the timeout. An error reply is
    /// `Ok(Value::Error)`: the connection is fine, the command was not.
    ///
    /// # Errors
    ///
    /// When there is no reply in time or the connection fails.
    pub async fn call<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Value, RedisError> {
        let calls = self.calls.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(self.address.clone(), self.timeout, rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        calls
            .try_send(Call {
                frame: encode(args),
                reply,
            })
            .map_err(|_| RedisError::Overloaded)?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RedisError::Overloaded),
            Err(_) => Err(RedisError::Timeout {
                address: self.address.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

struct Connection {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: BytesMut,
}

type Reply = oneshot::Sender<Result<Value, RedisError>>;

/// What the connection task keeps.
struct Task {
    address: String,
    timeout: Duration,
    conn: Option<Connection>,
    /// Calls sent and not yet answered, oldest first, with their deadlines.
    pending: VecDeque<(Instant, Reply)>,
    backoff: Duration,
    /// Until when calls fail at once, and why.
    down: Option<(Instant, String)>,
}

impl Task {
    /// Drops the connection, fails every pending call with `error` and backs off.
    fn broken(&mut self, error: RedisError) {
        self.conn = None;
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        self.down = Some((Instant::now() + self.backoff, error.to_string()));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Sends `call`, connecting first if needed.
    async fn send(&mut self, call: Call) {
        let now = Instant::now();
        if let Some((until, reason)) = &self.down
            && now < *until
        {
            let _ = call.reply.send(Err(RedisError::Down {
                address: self.address.clone(),
                reason: reason.clone(),
            }));
            return;
        }
        if self.conn.is_none() {
            match connect(&self.address, self.timeout).await {
                Ok(c) => self.conn = Some(c),
                Err(reason) => {
                    let error = RedisError::Connect {
                        address: self.address.clone(),
                        reason,
                    };
                    let _ = call.reply.send(Err(error.clone()));
                    self.broken(error);
                    return;
                }
            }
        }
        let Some(c) = self.conn.as_mut() else { return };
        match tokio::time::timeout(self.timeout, c.write.write_all(&call.frame)).await {
            Ok(Ok(())) => self.pending.push_back((now + self.timeout, call.reply)),
            result => {
                let reason = match result {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("a write took longer than {:?}", self.timeout),
                };
                let error = RedisError::Broken {
                    address: self.address.clone(),
                    reason,
                };
                let _ = call.reply.send(Err(error.clone()));
                self.broken(error);
            }
        }
    }

    /// Handles what a read brought: answers the pending calls its replies complete.
    fn received(&mut self, read: std::io::Result<usize>) {
        let failure = match read {
            Ok(0) => Some("the server closed the connection".to_string()),
            Ok(_) => match answer(&mut self.conn, &mut self.pending) {
                Ok(true) => {
                    self.backoff = MIN_BACKOFF;
                    self.down = None;
                    None
                }
                Ok(false) => None,
                Err(reason) => Some(reason),
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = failure {
            let address = self.address.clone();
            self.broken(RedisError::Broken { address, reason });
        }
    }
}

/// The connection task: owns the socket, matches replies to calls in order; ends when the
/// client is dropped.
async fn run(address: String, timeout: Duration, mut calls: mpsc::Receiver<Call>) {
    let mut task = Task {
        address,
        timeout,
        conn: None,
        pending: VecDeque::new(),
        backoff: MIN_BACKOFF,
        down: None,
    };
    loop {
        let deadline = task.pending.front().map(|p| p.0);
        tokio::select! {
            call = calls.recv() => match call {
                Some(call) => task.send(call).await,
                None => return,
            },
            read = read_more(&mut task.conn) => task.received(read),
            () = sleep_until(deadline) => {
                // The oldest call got no reply in time: whatever holds the connection up
                // would hold up every later call too.
                let address = task.address.clone();
                task.broken(RedisError::Timeout { address, timeout });
            }
        }
    }
}

async fn connect(address: &str, timeout: Duration) -> Result<Connection, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            Ok(Connection {
                read,
                write,
                buf: BytesMut::with_capacity(4096),
            })
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// Reads from the connection; never completes without one.
async fn read_more(conn: &mut Option<Connection>) -> std::io::Result<usize> {
    match conn {
        Some(c) => c.read.read_buf(&mut c.buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Answers pending calls with every complete reply buffered; whether any was answered.
fn answer(
    conn: &mut Option<Connection>,
    pending: &mut VecDeque<(Instant, Reply)>,
) -> Result<bool, String> {
    let Some(c) = conn.as_mut() else {
        return Ok(false);
    };
    let mut answered = false;
    while let Some((value, used)) = parse(&c.buf)? {
        c.buf.advance(used);
        let Some((_, reply)) = pending.pop_front() else {
            return Err("a reply to no command".into());
        };
        // The caller may have given up; the reply still keeps the stream in step.
        let _ = reply.send(Ok(value));
        answered = true;
    }
    Ok(answered)
}

/// A Lua script run by its SHA-1 (`EVALSHA`), sent whole (`EVAL`) when the server does
/// not have it cached (after a restart or `SCRIPT FLUSH`); `EVAL` caches it again.
#[derive(Debug)]
pub struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    /// The script `source`.
    pub fn new(source: &'static str) -> Self {
        let sha = sha1(source.as_bytes())
            .iter()
            .fold(String::with_capacity(40), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
        Self { source, sha }
    }

    /// The hex SHA-1 Redis knows the script by.
    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// Runs the script with `keys` and `args`.
    ///
    /// # Errors
    ///
    /// A call's error, or the script's error reply as [`RedisError::Server`].
    pub async fn run(
        &self,
        redis: &Redis,
        keys: &[&str],
        args: &[String],
    ) -> Result<Value, RedisError> {
        let numkeys = keys.len().to_string();
        let command = |verb: &'static str, body: &str| -> Vec<Vec<u8>> {
            let mut c: Vec<Vec<u8>> = vec![verb.into(), body.into(), numkeys.clone().into()];
            c.extend(keys.iter().map(|k| k.as_bytes().to_vec()));
            c.extend(args.iter().map(|a| a.as_bytes().to_vec()));
            c
        };
        let reply = match redis.call(&command("EVALSHA", &self.sha)).await? {
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                redis.call(&command("EVAL", self.source)).await?
            }
            other => other,
        };
        match reply {
            Value::Error(e) => Err(RedisError::Server(e)),
            other => Ok(other),
        }
    }
}

/// SHA-1 (FIPS 180-4), for script digests only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut message = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&["GET", "a/b"]),
            b"*2\r\n$3\r\nGET\r\n$3\r\na/b\r\n".to_vec()
        );
        assert_eq!(encode::<&str>(&[]), b"*0\r\n".to_vec());
    }

    #[test]
    fn every_reply_type_parses_and_reports_its_length() {
        let cases: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Value::Simple("OK".into())),
            (
                b"-NOSCRIPT No matching script\r\n",
                Value::Error("NOSCRIPT No matching script".into()),
            ),
            (b":-42\r\n", Value::Integer(-42)),
            (b"$5\r\nhe\r\no\r\n", Value::Bulk(b"he\r\no".to_vec())),
            (b"$0\r\n\r\n", Value::Bulk(Vec::new())),
            (b"$-1\r\n", Value::Nil),
            (b"*-1\r\n", Value::Nil),
            (
                b"*3\r\n:1\r\n$-1\r\n*1\r\n+x\r\n",
                Value::Array(vec![
                    Value::Integer(1),
                    Value::Nil,
                    Value::Array(vec![Value::Simple("x".into())]),
                ]),
            ),
        ];
        for (wire, want) in cases {
            let mut buf = wire.to_vec();
            buf.extend_from_slice(b"+next\r\n");
            assert_eq!(
                parse(&buf),
                Ok(Some((want.clone(), wire.len()))),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn an_incomplete_reply_waits_for_more_at_every_cut() {
        let wire = b"*2\r\n$5\r\nhello\r\n:7\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(wire).expect("valid").is_some());
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b"\r\n",
            b":12a\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"*99999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sha1_matches_the_standard_vectors() {
        let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            hex(sha1(&[b'a'; 1000])),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    /// A server that answers each command with `reply`, or never when `None`.
    async fn fake_server(reply: Option<&'static [u8]>) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        match socket.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        // One reply per complete command (the fake reads arrays only).
                        while let Ok(Some((_, used))) = parse(&buf) {
                            buf.advance(used);
                            if let Some(reply) = reply {
                                let _ = socket.write_all(reply).await;
                            }
                        }
                    }
                });
            }
        });
        (address, task)
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_connection_and_get_their_replies() {
        let (address, server) = fake_server(Some(b"+PONG\r\n")).await;
        let redis = Redis::new(address, Duration::from_secs(2));
        let calls = (0..50).map(|_| redis.call(&["PING"]));
        for reply in futures::future::join_all(calls).await {
            assert_eq!(reply, Ok(Value::Simple("PONG".into())));
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once_then_backs_off() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let redis = Redis::new(format!("127.0.0.1:{port}"), Duration::from_millis(50));
        let started = std::time::Instant::now();
        let first = redis.call(&["PING"]).await;
        assert!(
            matches!(first, Err(RedisError::Connect { .. })),
            "{first:?}"
        );
        let second = redis.call(&["PING"]).await;
        assert!(matches!(second, Err(RedisError::Down { .. })), "{second:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_the_client_reconnects() {
        let (silent, server) = fake_server(None).await;
        let redis = Redis::new(silent, Duration::from_millis(50));
        let started = std::time::Instant::now();
        let err = redis.call(&["PING"]).await.expect_err("no reply");
        assert!(matches!(err, RedisError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(400));
        server.abort();
        // After the backoff, the next call connects again (here: nobody listens now, or
        // the aborted server's port is refused).
        tokio::time::sleep(MIN_BACKOFF + Duration::from_millis(20)).await;
        let err = redis.call(&["PING"]).await.expect_err("gone");
        assert!(
            matches!(err, RedisError::Connect { .. } | RedisError::Timeout { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_script_is_sent_whole() {
        // The fake answers NOSCRIPT to everything: run() retries with EVAL once and
        // reports the server's error.
        let (address, server) = fake_server(Some(b"-NOSCRIPT No matching script\r\n")).await;
        let redis = Redis::new(address, Duration::from_secs(2));
        let script = Script::new("return 1");
        assert_eq!(script.sha(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        let err = script.run(&redis, &["k"], &[]).await.expect_err("error");
        assert!(
            matches!(err, RedisError::Server(ref e) if e.starts_with("NOSCRIPT")),
            "{err:?}"
        );
        server.abort();
    }
}
