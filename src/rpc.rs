//! llama.cpp's RPC backend: what a worker (`ggml-rpc-server`, started on
//! another machine) offers, asked over its own protocol before the child
//! starts, so that the plan counts the worker's memory and `doctor` can
//! show how the layers split.
//!
//! The protocol (ggml-rpc, version 7): a request is `command u8 | size u64
//! | data`, a reply `size u64 | data`, little-endian and packed. The first
//! command on a connection must be HELLO. A worker serves one connection at
//! a time, so the query closes its connection before llama-server is
//! started, and a worker a running llama-server holds does not answer.
//!
//! RPC traffic is unauthenticated: whoever reaches a worker's port can
//! make it allocate memory and run graphs. The configuration accepts
//! loopback workers only unless `[llama] rpc_allow_remote` is set.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

/// The protocol major version this client speaks; a worker of another
/// major version cannot work with the llama-server beside it either.
pub const PROTOCOL_MAJOR: u8 = 7;
/// A worker's default port (`ggml-rpc-server -p`).
pub const DEFAULT_PORT: u16 = 50052;
/// How long one worker may take to connect and answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

const CMD_GET_DEVICE_MEMORY: u8 = 11;
const CMD_HELLO: u8 = 14;
const CMD_DEVICE_COUNT: u8 = 15;
/// HELLO carries the client's transport capabilities: all zero asks for
/// plain TCP.
const CONN_CAPS_SIZE: usize = 24;
/// More devices than any worker has: a reply above it is not a worker.
const MAX_DEVICES: u32 = 64;

/// One device a worker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceMemory {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// What a worker said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerFacts {
    /// "7.0.0".
    pub protocol: String,
    pub devices: Vec<DeviceMemory>,
}

impl WorkerFacts {
    pub fn free_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.free_bytes).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.total_bytes).sum()
    }
}

/// A configured worker and what asking it gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RpcWorker {
    /// `host:port`, as llama-server's `--rpc` takes it.
    pub endpoint: String,
    /// `Err` says why the worker could not be asked.
    pub facts: Result<WorkerFacts, String>,
}

/// Asks every configured worker, one after another (each closes its
/// connection before the next is opened).
pub fn query_all(endpoints: &[String]) -> Vec<RpcWorker> {
    endpoints
        .iter()
        .map(|endpoint| RpcWorker {
            endpoint: endpoint.clone(),
            facts: query(endpoint, QUERY_TIMEOUT),
        })
        .collect()
}

/// Connects to a worker, shakes hands and reads each device's memory.
pub fn query(endpoint: &str, timeout: Duration) -> Result<WorkerFacts, String> {
    let addr = endpoint
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {endpoint}: {e}"))?
        .next()
        .ok_or_else(|| format!("{endpoint} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        format!("cannot connect: {e} (is `ggml-rpc-server -H <host> -p <port>` running there?)")
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("cannot set a timeout: {e}"))?;
    let _ = stream.set_nodelay(true);
    abort_on_close(&stream);
    let facts = converse(&mut stream).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "no answer within {} s (a worker serves one client at a time: a running llama-server may hold it)",
            timeout.as_secs()
        ),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            "the worker closed the connection during the handshake (not a ggml RPC server of protocol 7?)"
                .to_string()
        }
        _ => e.to_string(),
    })??;
    Ok(facts)
}

/// Makes closing the connection reset it (`SO_LINGER` 0). A worker busy
/// with another client accepts this connection later and reads the HELLO
/// queued in it; had the connection been closed normally, its reply would
/// go to a closed socket and the SIGPIPE would kill the worker. A reset
/// connection fails its first read, and the worker moves on.
fn abort_on_close(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let reset = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = setsockopt(stream, Linger, &reset) {
        tracing::debug!("cannot set SO_LINGER on the RPC query: {e}");
    }
}

/// The conversation on an open connection: HELLO, DEVICE_COUNT, then
/// GET_DEVICE_MEMORY for each device. The outer error is the transport's,
/// the inner one what the worker's answers mean.
fn converse<S: Read + Write>(stream: &mut S) -> std::io::Result<Result<WorkerFacts, String>> {
    let hello = call(stream, CMD_HELLO, &[0; CONN_CAPS_SIZE])?;
    let (major, minor, patch) = match parse_hello(&hello) {
        Ok(version) => version,
        Err(e) => return Ok(Err(e)),
    };
    if major != PROTOCOL_MAJOR {
        return Ok(Err(format!(
            "the worker speaks RPC protocol {major}.{minor}.{patch}; this llama.cpp speaks {PROTOCOL_MAJOR}.x: run a ggml-rpc-server of the same llama.cpp release"
        )));
    }
    let count = match parse_u32(&call(stream, CMD_DEVICE_COUNT, &[])?) {
        Some(n) if n <= MAX_DEVICES => n,
        _ => return Ok(Err("the worker's device count is not a number".to_string())),
    };
    let mut devices = Vec::with_capacity(count as usize);
    for device in 0..count {
        let reply = call(stream, CMD_GET_DEVICE_MEMORY, &device.to_le_bytes())?;
        match parse_device_memory(&reply) {
            Some(memory) => devices.push(memory),
            None => {
                return Ok(Err(format!(
                    "the worker's memory reply for device {device} is {} bytes, not 16",
                    reply.len()
                )))
            }
        }
    }
    Ok(Ok(WorkerFacts {
        protocol: format!("{major}.{minor}.{patch}"),
        devices,
    }))
}

/// Sends one command and reads its reply's data.
fn call<S: Read + Write>(stream: &mut S, command: u8, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(&encode_request(command, data))?;
    stream.flush()?;
    let mut size = [0u8; 8];
    stream.read_exact(&mut size)?;
    let size = u64::from_le_bytes(size);
    // Every reply this client asks for is a few bytes.
    if size > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the worker announced a reply of {size} bytes to a query of a few"),
        ));
    }
    let mut reply = vec![0u8; size as usize];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

/// `command u8 | size u64 LE | data`.
pub fn encode_request(command: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + data.len());
    out.push(command);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// HELLO's reply: `major, minor, patch, padding` and the transport caps.
pub fn parse_hello(reply: &[u8]) -> Result<(u8, u8, u8), String> {
    if reply.len() != 4 + CONN_CAPS_SIZE {
        return Err(format!(
            "the worker's HELLO reply is {} bytes, not {} (a protocol older than 7?)",
            reply.len(),
            4 + CONN_CAPS_SIZE
        ));
    }
    Ok((reply[0], reply[1], reply[2]))
}

fn parse_u32(reply: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(reply.try_into().ok()?))
}

/// GET_DEVICE_MEMORY's reply: `free u64, total u64`.
pub fn parse_device_memory(reply: &[u8]) -> Option<DeviceMemory> {
    if reply.len() != 16 {
        return None;
    }
    let (free, total) = reply.split_at(8);
    Some(DeviceMemory {
        free_bytes: u64::from_le_bytes(free.try_into().ok()?),
        total_bytes: u64::from_le_bytes(total.try_into().ok()?),
    })
}

/// Splits `host:port` as llama.cpp does (at the first colon: no IPv6).
pub fn split_endpoint(endpoint: &str) -> Result<(&str, u16), String> {
    let (host, port) = endpoint
        .split_once(':')
        .ok_or_else(|| format!("{endpoint:?} is not host:port (a worker listens on {DEFAULT_PORT} unless told otherwise)"))?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '[') {
        return Err(format!(
            "{endpoint:?} is not host:port (a host name or an IPv4 address; llama.cpp's RPC takes no IPv6)"
        ));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((host, port)),
        _ => Err(format!(
            "{endpoint:?}: the port must be a number from 1 to 65535"
        )),
    }
}

/// `localhost` or a loopback IPv4 address: a worker on this machine.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that plays back scripted replies and keeps what was sent.
    struct Scripted {
        replies: std::io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.replies.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn reply(data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    fn hello(major: u8) -> Vec<u8> {
        let mut data = vec![major, 0, 0, 0];
        data.extend_from_slice(&[0; CONN_CAPS_SIZE]);
        reply(&data)
    }

    #[test]
    fn a_request_is_command_size_and_data() {
        assert_eq!(
            encode_request(11, &3u32.to_le_bytes()),
            vec![11, 4, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]
        );
        assert_eq!(encode_request(15, &[]), vec![15, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_worker_with_two_devices_reports_both() {
        let mut replies = hello(7);
        replies.extend(reply(&2u32.to_le_bytes()));
        for (free, total) in [(3u64 << 30, 8u64 << 30), (1 << 30, 4 << 30)] {
            let mut data = free.to_le_bytes().to_vec();
            data.extend_from_slice(&total.to_le_bytes());
            replies.extend(reply(&data));
        }
        let mut stream = Scripted {
            replies: std::io::Cursor::new(replies),
            sent: Vec::new(),
        };
        let facts = converse(&mut stream).unwrap().unwrap();
        assert_eq!(facts.protocol, "7.0.0");
        assert_eq!(facts.devices.len(), 2);
        assert_eq!(facts.free_bytes(), 4 << 30);
        assert_eq!(facts.total_bytes(), 12 << 30);
        // HELLO with 24 bytes of zero caps, then the count, then device 0 and 1.
        let mut expected = encode_request(CMD_HELLO, &[0; CONN_CAPS_SIZE]);
        expected.extend(encode_request(CMD_DEVICE_COUNT, &[]));
        expected.extend(encode_request(CMD_GET_DEVICE_MEMORY, &0u32.to_le_bytes()));
        expected.extend(encode_request(CMD_GET_DEVICE_MEMORY, &1u32.to_le_bytes()));
        assert_eq!(stream.sent, expected);
    }

    #[test]
    fn another_protocol_version_is_named() {
        let mut stream = Scripted {
            replies: std::io::Cursor::new(hello(6)),
            sent: Vec::new(),
        };
        let why = converse(&mut stream).unwrap().unwrap_err();
        assert!(why.contains("protocol 6.0.0"), "{why}");
        assert!(parse_hello(&[3, 0, 0]).unwrap_err().contains("3 bytes"));
    }

    #[test]
    fn a_worker_that_hangs_up_is_a_transport_error() {
        let mut stream = Scripted {
            replies: std::io::Cursor::new(Vec::new()),
            sent: Vec::new(),
        };
        let err = converse(&mut stream).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(split_endpoint("127.0.0.1:50052"), Ok(("127.0.0.1", 50052)));
        assert_eq!(split_endpoint("studio.local:9"), Ok(("studio.local", 9)));
        assert!(split_endpoint("127.0.0.1").is_err());
        assert!(split_endpoint(":50052").is_err());
        assert!(split_endpoint("host:0").is_err());
        assert!(split_endpoint("host:port").is_err());
        assert!(split_endpoint("[::1]:50052").is_err());
        assert!(is_loopback_host("127.0.0.1") && is_loopback_host("127.3.2.1"));
        assert!(is_loopback_host("LOCALHOST"));
        assert!(!is_loopback_host("192.168.1.20") && !is_loopback_host("studio.local"));
    }

    #[test]
    fn a_closed_port_says_how_to_start_a_worker() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        drop(listener);
        let why = query(&endpoint, Duration::from_millis(500)).unwrap_err();
        assert!(why.contains("ggml-rpc-server"), "{why}");
    }
}
