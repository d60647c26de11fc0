//! A raw client of the status-kanban socket: frames by hand, for protocol and abuse tests.
use super::Runtime;
use aion::transport::codec::{encode_into, FrameDecoder};
use aion::transport::proto::MAGIC;
use aion::transport::{ClientMsg, Hello, ServerMsg};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub fn hello(service: &str, instance: u32, version: u16) -> ClientMsg {
    ClientMsg::Hello(Hello { magic: MAGIC, version, service: service.into(), instance, window: 8, seed: false, pid: 0 })
}

/// Sends `msgs`, then reads until the runtime closes; returns every decoded message.
pub fn converse(rt: &Runtime, raw: &[u8]) -> Vec<ServerMsg> {
    let mut s = UnixStream::connect(rt.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(raw).expect("write");
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => dec.push(&buf[..n]),
        }
        while let Ok(Some(m)) = dec.decode::<ServerMsg>() {
            out.push(m);
        }
    }
    out
}

pub fn frames(msgs: &[ClientMsg]) -> Vec<u8> {
    let mut v = Vec::new();
    for m in msgs {
        encode_into(m, &mut v).expect("encode");
    }
    v
}

pub fn error_reason(msgs: &[ServerMsg]) -> String {
    match msgs.last() {
        Some(ServerMsg::Error { reason }) => reason.clone(),
        other => panic!("expected an Error message, got {other:?}"),
    }
}
