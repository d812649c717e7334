//! `rpc_frame`: `/kiln/rpc/1` frames through `kiln_net::RpcCodec`, the
//! libp2p request-response codec every node and the coordinator use (a
//! 4-byte big-endian length, then the canonical encoding).
//!
//! Input: one byte (even: a request, odd: a response), then the stream's
//! bytes. The codec is driven as libp2p drives it, over an in-memory
//! stream, with the production frame limit (`kiln_net::MAX_MESSAGE_BYTES`). A decoded message is
//! written back with the codec and must read back to the same encoding.

use futures::executor::block_on;
use futures::io::Cursor;
use kiln_net::RpcCodec;
use kiln_protocol::encoding;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

use super::{Outcome, Target, Verdict, enc, tagged};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "rpc_frame",
    about: "kiln_net::RpcCodec read_request/read_response over a byte stream (length-prefixed bincode)",
    max_len: 16 * 1024,
    seeds,
    dict: &[&[0, 0, 0], &[0xff, 0xff, 0xff, 0xff], &[0x08, 0, 0, 0]],
    run,
};

/// `NetConfig::default().max_message_bytes`.
const MAX: usize = kiln_net::MAX_MESSAGE_BYTES;

fn protocol() -> StreamProtocol {
    StreamProtocol::new(kiln_net::RPC_PROTOCOL)
}

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, stream)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    let mut codec = RpcCodec::new(MAX);
    let p = protocol();
    if sel % 2 == 0 {
        let Ok(req) = block_on(codec.read_request(&p, &mut Cursor::new(stream))) else {
            return Ok(Verdict::Rejected);
        };
        let mut out = Cursor::new(Vec::new());
        block_on(codec.write_request(&p, &mut out, req.clone()))
            .map_err(|e| format!("a decoded request does not write: {e}"))?;
        let back = block_on(codec.read_request(&p, &mut Cursor::new(out.into_inner())))
            .map_err(|e| format!("a written request does not read back: {e}"))?;
        same(&req, &back)
    } else {
        let Ok(res) = block_on(codec.read_response(&p, &mut Cursor::new(stream))) else {
            return Ok(Verdict::Rejected);
        };
        let mut out = Cursor::new(Vec::new());
        block_on(codec.write_response(&p, &mut out, res.clone()))
            .map_err(|e| format!("a decoded response does not write: {e}"))?;
        let back = block_on(codec.read_response(&p, &mut Cursor::new(out.into_inner())))
            .map_err(|e| format!("a written response does not read back: {e}"))?;
        same(&res, &back)
    }
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> Outcome {
    let (x, y) = (encoding::encode(a), encoding::encode(b));
    match (x, y) {
        (Ok(x), Ok(y)) if x == y => Ok(Verdict::Accepted),
        (Ok(x), Ok(y)) => Err(format!(
            "{}: a message re-framed by the codec reads back different ({} vs {} bytes)",
            super::short_name::<T>(),
            x.len(),
            y.len()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!("cannot encode a decoded message: {e}")),
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = s::net_requests()
        .iter()
        .map(|r| tagged(0, &frame(&enc(r))))
        .collect();
    out.extend(
        s::net_responses()
            .iter()
            .map(|r| tagged(1, &frame(&enc(r)))),
    );
    // A header announcing more than the stream holds, and an empty frame.
    out.push(tagged(0, &[0, 0, 0x10, 0]));
    out.push(tagged(1, &[0, 0, 0, 0]));
    out
}
