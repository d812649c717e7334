//! `blob_wire`: the `/kiln/blobs/1` messages and the blob gossip.
//!
//! Input: a selector byte, then
//!
//! * `0`: a request frame as a server reads it (`wire::read_frame` with
//!   `MAX_REQUEST_BYTES`); a `Get`'s range boundaries through
//!   `ranges_from_wire`, which must round-trip exactly when it accepts;
//! * `1`: a response header frame as a requester reads it
//!   (`MAX_RESPONSE_BYTES`);
//! * `2`: a gossiped `Announcement` (canonical encoding), recorded into a
//!   `Providers` index with small bounds, which must hold whatever the
//!   announcements say (two announcements from two peers, the second
//!   repeating the first's CIDs).
//!
//! Frames are written back with `wire::write_frame` and must read back
//! equal.

use std::time::Duration;

use futures::executor::block_on;
use futures::io::Cursor;
use kiln_blobs::announce::{Announcement, Providers};
use kiln_blobs::wire::{self, Request, Response};
use kiln_protocol::encoding;

use super::{Outcome, Target, Verdict, enc, tagged};
use crate::samples as s;

pub static TARGET: Target = Target {
    name: "blob_wire",
    about: "kiln_blobs::wire::read_frame (Request, Response), ranges_from_wire, gossip Announcement + Providers::record",
    max_len: 16 * 1024,
    seeds,
    dict: &[&[0, 0, 0], &[0x01, 0x55, 0x1e, 0x20]],
    run,
};

const MAX_ENTRIES: usize = 64;
const MAX_PER_PEER: usize = 16;

fn run(data: &[u8]) -> Outcome {
    let Some((&sel, body)) = data.split_first() else {
        return Ok(Verdict::Rejected);
    };
    match sel % 3 {
        0 => {
            let Ok(req) = block_on(wire::read_frame::<_, Request>(
                &mut Cursor::new(body),
                wire::MAX_REQUEST_BYTES,
            )) else {
                return Ok(Verdict::Rejected);
            };
            if let Request::Get { ranges, .. } = &req
                && let Some(set) = wire::ranges_from_wire(ranges)
            {
                let back = wire::ranges_to_wire(&set);
                if back != *ranges {
                    return Err(format!(
                        "range boundaries {ranges:?} were accepted but read as {back:?}"
                    ));
                }
            }
            round_trip(&req, wire::MAX_REQUEST_BYTES)
        }
        1 => {
            let Ok(res) = block_on(wire::read_frame::<_, Response>(
                &mut Cursor::new(body),
                wire::MAX_RESPONSE_BYTES,
            )) else {
                return Ok(Verdict::Rejected);
            };
            round_trip(&res, wire::MAX_RESPONSE_BYTES)
        }
        _ => {
            let Ok(a) = encoding::decode::<Announcement>(body) else {
                return Ok(Verdict::Rejected);
            };
            let mut index =
                Providers::with_limits(Duration::from_secs(60), MAX_ENTRIES, MAX_PER_PEER);
            let (p1, p2) = (s::provider(1).peer_id(), s::provider(2).peer_id());
            index.record(p1, &a);
            index.record(p2, &a);
            index.record(p1, &a);
            if index.len() > MAX_ENTRIES {
                return Err(format!(
                    "the providers index holds {} entries, over its bound of {MAX_ENTRIES}",
                    index.len()
                ));
            }
            for (cid, _) in a.have.iter().take(8) {
                let holders = index.providers(cid);
                if holders.len() > 2 {
                    return Err(format!("{} holders from 2 peers", holders.len()));
                }
                let _ = index.sources(cid);
            }
            let mut drop = a.clone();
            drop.have.clear();
            drop.dropped = a.have.iter().map(|(c, _)| *c).collect();
            index.record(p1, &drop);
            index.forget_peer(&p2);
            Ok(Verdict::Accepted)
        }
    }
}

fn round_trip<T>(v: &T, max: usize) -> Outcome
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut out = Cursor::new(Vec::new());
    block_on(wire::write_frame(&mut out, v)).map_err(|e| format!("write_frame: {e}"))?;
    let bytes = out.into_inner();
    let back: T = block_on(wire::read_frame(&mut Cursor::new(&bytes[..]), max))
        .map_err(|e| format!("a frame written from a decoded value does not read: {e}"))?;
    if &back != v {
        return Err(format!("frame round trip changed {v:?} into {back:?}"));
    }
    Ok(Verdict::Accepted)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for r in [
        Request::Get {
            cid: s::cid(1),
            ranges: vec![0, 16, 32, 48, 100],
        },
        Request::Get {
            cid: s::cid(2),
            ranges: wire::ranges_to_wire(&wire::last_chunk()),
        },
        Request::Has {
            cids: vec![s::cid(1), s::cid(2), s::cid(1)],
        },
    ] {
        out.push(tagged(0, &frame(&enc(&r))));
    }
    for r in [
        Response::Found { size: 300_000 },
        Response::NotFound,
        Response::Has {
            sizes: vec![Some(7), None, Some(u64::MAX)],
        },
        Response::Error {
            reason: "ranges must be strictly increasing chunk boundaries".into(),
        },
    ] {
        out.push(tagged(1, &frame(&enc(&r))));
    }
    let a = Announcement {
        have: (0..20u8)
            .map(|i| (s::cid(i), u64::from(i) * 1000))
            .collect(),
        dropped: vec![s::cid(30)],
    };
    out.push(tagged(2, &enc(&a)));
    out
}
