//! The executor state's wire form shared by reports and `/state`: the
//! state hash as the server and the reference compute it, one worker's
//! encoded state, and the cache of the last hash. Knows nothing of the
//! agent's state.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb;

/// Hex SHA-256 of the deterministic encoding of `state` without its
/// `state_hash` and `server_clock`: the same bytes a report is built from
/// (every field but the worker states in prost's order, then each worker
/// state), so it equals the hash reports carry.
pub fn state_hash(state: &pb::ExecutorState) -> String {
    let mut base = state.clone();
    base.state_hash = None;
    base.server_clock = None;
    let fes = std::mem::take(&mut base.function_executor_states);
    let mut body = base.encode_to_vec();
    for fe in &fes {
        let description = fe
            .description
            .as_ref()
            .map(Message::encode_to_vec)
            .unwrap_or_default();
        encode_fe_state(
            &description,
            fe.status,
            fe.termination_reason,
            &fe.allocation_ids_caused_termination,
            &mut body,
        );
    }
    hex::encode(Sha256::digest(&body))
}

/// Appends one `function_executor_states` entry (field 9) of an
/// `ExecutorState`, its description given already encoded: descriptions
/// are immutable per worker, so each is encoded once, when it arrives.
pub(crate) fn encode_fe_state(
    description: &[u8],
    status: Option<i32>,
    termination_reason: Option<i32>,
    blamed: &[String],
    out: &mut Vec<u8>,
) {
    use prost::encoding::{
        WireType, encode_key, encode_varint, encoded_len_varint, int32, key_len, string,
    };
    let description_len =
        key_len(1) + encoded_len_varint(description.len() as u64) + description.len();
    let len = description_len
        + status.map_or(0, |v| int32::encoded_len(2, &v))
        + termination_reason.map_or(0, |v| int32::encoded_len(3, &v))
        + string::encoded_len_repeated(4, blamed);
    encode_key(9, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(description.len() as u64, out);
    out.extend_from_slice(description);
    if let Some(v) = status {
        int32::encode(2, &v, out);
    }
    if let Some(v) = termination_reason {
        int32::encode(3, &v, out);
    }
    string::encode_repeated(4, blamed, out);
}

/// The hash of the last state body, kept so an unchanged state (most
/// reports: only results or the clock differ) is compared, not rehashed.
#[derive(Default)]
pub(crate) struct HashCache {
    body: Vec<u8>,
    hash: String,
}

impl HashCache {
    pub(crate) fn hash_of(&mut self, body: &[u8]) -> String {
        if body != self.body.as_slice() || self.hash.is_empty() {
            self.hash = hex::encode(Sha256::digest(body));
            self.body = body.to_vec();
        }
        self.hash.clone()
    }
}
