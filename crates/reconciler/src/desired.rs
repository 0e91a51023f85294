//! Desired states decoded in proportion to what changed.
//!
//! The server sends the *full* desired state on every change (about two
//! messages per allocation), and almost all of each message repeats the
//! one before: the same function executor descriptions, the same running
//! allocations, a new clock. The stream therefore hands over raw message
//! bytes ([`RawCodec`]), and [`Decoder`] walks only the top-level fields:
//! each function executor, allocation and function call result whose
//! encoded bytes equal one in the previous message reuses that decoded
//! item (shared, not copied); only new bytes are decoded. A message that
//! differs only in its clock decodes nothing but the clock.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, EncodeBuf};

use crate::pb;

/// A desired state whose items are shared with the messages around it.
#[derive(Default, Clone, serde::Serialize)]
pub struct Desired {
    pub function_executors: Vec<Arc<pb::FunctionExecutorDescription>>,
    pub allocations: Vec<Arc<pb::Allocation>>,
    pub clock: Option<u64>,
    pub function_call_results: Vec<Arc<pb::FunctionCallResult>>,
}

impl std::fmt::Debug for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredExecutorState")
            .field("function_executors", &self.function_executors)
            .field("allocations", &self.allocations)
            .field("clock", &self.clock)
            .field("function_call_results", &self.function_call_results)
            .finish()
    }
}

impl From<pb::DesiredExecutorState> for Desired {
    fn from(d: pb::DesiredExecutorState) -> Self {
        Desired {
            function_executors: d.function_executors.into_iter().map(Arc::new).collect(),
            allocations: d.allocations.into_iter().map(Arc::new).collect(),
            clock: d.clock,
            function_call_results: d.function_call_results.into_iter().map(Arc::new).collect(),
        }
    }
}

/// Items of one kind from the previous message, with their encoded bytes,
/// in message order.
///
/// The server builds each message the same way, so an item usually sits
/// where it sat before, or one place earlier when an item before it left:
/// those are found by comparing bytes at the cursor (a `memcmp`). Anything
/// else is looked up in an index of the previous message, built on the
/// first miss of a message.
struct Seen<T> {
    previous: Vec<(Bytes, Arc<T>)>,
    /// Bytes → position in `previous`, built lazily.
    index: Option<HashMap<Bytes, usize>>,
    /// Where the next item is expected in `previous`.
    cursor: usize,
    current: Vec<(Bytes, Arc<T>)>,
}

impl<T: Message + Default> Seen<T> {
    fn new() -> Self {
        Seen {
            previous: Vec::new(),
            index: None,
            cursor: 0,
            current: Vec::new(),
        }
    }

    /// The item encoded as `bytes`: the previous message's when the bytes
    /// are the same, else freshly decoded. Returns whether it was decoded.
    fn item(&mut self, bytes: Bytes) -> Result<(Arc<T>, bool), prost::DecodeError> {
        let at = [self.cursor, self.cursor + 1]
            .into_iter()
            .find(|k| self.previous.get(*k).is_some_and(|(b, _)| *b == bytes))
            .or_else(|| {
                let previous = &self.previous;
                let index = self.index.get_or_insert_with(|| {
                    previous
                        .iter()
                        .enumerate()
                        .map(|(k, (b, _))| (b.clone(), k))
                        .collect()
                });
                index.get(&bytes).copied()
            });
        // Keys are the kept item's own copy of its bytes: a slice of the
        // message would pin the whole message buffer for as long as the
        // item stays in the desired state.
        let (key, item, fresh) = match at.and_then(|k| self.previous.get(k).map(|e| (k, e))) {
            Some((k, (key, item))) => {
                self.cursor = k + 1;
                (key.clone(), item.clone(), false)
            }
            None => {
                let item = Arc::new(T::decode(bytes.clone())?);
                (Bytes::copy_from_slice(&bytes), item, true)
            }
        };
        self.current.push((key, item.clone()));
        Ok((item, fresh))
    }

    /// Ends a message: its items become the previous ones.
    fn roll(&mut self) {
        // Swapped, not replaced: both lists keep their capacity.
        std::mem::swap(&mut self.previous, &mut self.current);
        self.current.clear();
        self.index = None;
        self.cursor = 0;
    }

    /// Forgets a message that failed half way.
    fn discard(&mut self) {
        self.current.clear();
        self.index = None;
        self.cursor = 0;
    }
}

/// How much of the last message had to be decoded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    pub items: usize,
    pub decoded: usize,
}

/// Decodes successive desired-state messages of one stream.
pub struct Decoder {
    fes: Seen<pb::FunctionExecutorDescription>,
    allocations: Seen<pb::Allocation>,
    results: Seen<pb::FunctionCallResult>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            fes: Seen::new(),
            allocations: Seen::new(),
            results: Seen::new(),
        }
    }
}

impl Decoder {
    /// Decodes `raw`, one encoded `DesiredExecutorState`, with the same
    /// result as `pb::DesiredExecutorState::decode`: a message the walk
    /// finds malformed is handed to prost whole, for its verdict.
    pub fn decode(&mut self, raw: Bytes) -> Result<(Desired, DecodeStats), prost::DecodeError> {
        match self.walk(raw.clone()) {
            Some(done) => {
                self.fes.roll();
                self.allocations.roll();
                self.results.roll();
                Ok(done)
            }
            None => {
                self.fes.discard();
                self.allocations.discard();
                self.results.discard();
                let whole = pb::DesiredExecutorState::decode(raw)?;
                let items = whole.function_executors.len()
                    + whole.allocations.len()
                    + whole.function_call_results.len();
                Ok((
                    whole.into(),
                    DecodeStats {
                        items,
                        decoded: items,
                    },
                ))
            }
        }
    }

    /// `None` when the message is malformed.
    fn walk(&mut self, mut buf: Bytes) -> Option<(Desired, DecodeStats)> {
        let mut out = Desired::default();
        let mut stats = DecodeStats::default();
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf).ok()?;
            let counted = |stats: &mut DecodeStats, fresh: bool| {
                stats.items += 1;
                stats.decoded += usize::from(fresh);
            };
            match (tag, wire_type) {
                (1, WireType::LengthDelimited) => {
                    let (item, fresh) = self.fes.item(field_bytes(&mut buf)?).ok()?;
                    counted(&mut stats, fresh);
                    out.function_executors.push(item);
                }
                (2, WireType::LengthDelimited) => {
                    let (item, fresh) = self.allocations.item(field_bytes(&mut buf)?).ok()?;
                    counted(&mut stats, fresh);
                    out.allocations.push(item);
                }
                (3, WireType::Varint) => out.clock = Some(decode_varint(&mut buf).ok()?),
                (4, WireType::LengthDelimited) => {
                    let (item, fresh) = self.results.item(field_bytes(&mut buf)?).ok()?;
                    counted(&mut stats, fresh);
                    out.function_call_results.push(item);
                }
                (1..=4, _) => return None,
                (tag, wire_type) => {
                    skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?
                }
            }
        }
        Some((out, stats))
    }
}

/// The bytes of one length-delimited field, shared with `buf`.
fn field_bytes(buf: &mut Bytes) -> Option<Bytes> {
    let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
    (len <= buf.remaining()).then(|| buf.split_to(len))
}

/// A gRPC codec that sends prost messages and receives raw message bytes.
#[derive(Debug)]
pub struct RawCodec<E>(std::marker::PhantomData<E>);

impl<E> Default for RawCodec<E> {
    fn default() -> Self {
        RawCodec(std::marker::PhantomData)
    }
}

impl<E: Message + Send + 'static> Codec for RawCodec<E> {
    type Encode = E;
    type Decode = Bytes;
    type Encoder = RawCodec<E>;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec(std::marker::PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl<E: Message> tonic::codec::Encoder for RawCodec<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

/// A gRPC codec for messages encoded ahead of the call (reports), whose
/// answers are taken as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl tonic::codec::Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(buf, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing_support::alloc;

    fn fe(id: &str) -> pb::FunctionExecutorDescription {
        pb::FunctionExecutorDescription {
            id: Some(id.into()),
            max_concurrency: Some(2),
            ..Default::default()
        }
    }

    fn message(allocs: &[&str], clock: u64) -> pb::DesiredExecutorState {
        pb::DesiredExecutorState {
            function_executors: vec![fe("fe"), fe("fe2")],
            allocations: allocs.iter().map(|a| alloc(a)).collect(),
            clock: Some(clock),
            function_call_results: vec![pb::FunctionCallResult {
                function_call_id: Some("c".into()),
                ..Default::default()
            }],
        }
    }

    fn same(d: &Desired, m: &pb::DesiredExecutorState) -> bool {
        d.clock == m.clock
            && d.function_executors
                .iter()
                .map(|x| &**x)
                .eq(m.function_executors.iter())
            && d.allocations.iter().map(|x| &**x).eq(m.allocations.iter())
            && d.function_call_results
                .iter()
                .map(|x| &**x)
                .eq(m.function_call_results.iter())
    }

    #[test]
    fn decodes_only_what_changed() {
        let mut d = Decoder::default();
        let m1 = message(&["a", "b"], 1);
        let (x, s) = d.decode(m1.encode_to_vec().into()).expect("decode");
        assert!(same(&x, &m1));
        assert_eq!(
            s,
            DecodeStats {
                items: 5,
                decoded: 5
            }
        );
        // Only the clock changed: nothing is decoded again, items are shared.
        let m2 = message(&["a", "b"], 2);
        let (y, s) = d.decode(m2.encode_to_vec().into()).expect("decode");
        assert!(same(&y, &m2));
        assert_eq!(
            s,
            DecodeStats {
                items: 5,
                decoded: 0
            }
        );
        assert!(Arc::ptr_eq(&x.allocations[0], &y.allocations[0]));
        // One allocation replaced: one item decoded.
        let m3 = message(&["b", "c"], 3);
        let (z, s) = d.decode(m3.encode_to_vec().into()).expect("decode");
        assert!(same(&z, &m3));
        assert_eq!(
            s,
            DecodeStats {
                items: 5,
                decoded: 1
            }
        );
        // "a" was dropped in m3: seeing it again decodes it again.
        let m4 = message(&["a"], 4);
        let (_, s) = d.decode(m4.encode_to_vec().into()).expect("decode");
        assert_eq!(
            s,
            DecodeStats {
                items: 4,
                decoded: 1
            }
        );
    }

    #[test]
    fn items_are_found_wherever_they_moved() {
        let mut d = Decoder::default();
        let decoded = |d: &mut Decoder, allocs: &[&str], clock| {
            let m = message(allocs, clock);
            let (x, s) = d.decode(m.encode_to_vec().into()).expect("decode");
            assert!(same(&x, &m), "{allocs:?}");
            s.decoded
        };
        assert_eq!(decoded(&mut d, &["a", "b", "c", "d"], 1), 7);
        // One left from the middle, one arrived at the end.
        assert_eq!(decoded(&mut d, &["a", "c", "d", "e"], 2), 1);
        // All reordered: found through the index, none decoded.
        assert_eq!(decoded(&mut d, &["e", "d", "c", "a"], 3), 0);
        // Several left at once.
        assert_eq!(decoded(&mut d, &["a"], 4), 0);
    }

    #[test]
    fn duplicates_and_unknown_fields_decode_like_prost() {
        let m = message(&["a", "a"], 7);
        let mut bytes = m.encode_to_vec();
        // An unknown field 9 (varint) and a second clock: the last one wins.
        bytes.extend([9 << 3, 5, 3 << 3, 8]);
        let expected = pb::DesiredExecutorState::decode(bytes.as_slice()).expect("prost");
        let (x, s) = Decoder::default().decode(bytes.into()).expect("decode");
        assert!(same(&x, &expected));
        assert_eq!(x.clock, Some(8));
        assert!(s.decoded <= 5, "{s:?}");
    }

    #[test]
    fn a_known_field_with_the_wrong_wire_type_is_refused_like_prost() {
        for tag in 1u8..=4 {
            for wire_type in [0u8, 1, 2, 5] {
                let raw = [tag << 3 | wire_type, 1, 0, 0, 0, 0, 0, 0, 0];
                let ours = Decoder::default().decode(Bytes::copy_from_slice(&raw));
                let theirs = pb::DesiredExecutorState::decode(raw.as_slice());
                assert_eq!(
                    ours.is_ok(),
                    theirs.is_ok(),
                    "field {tag} wire type {wire_type}"
                );
            }
        }
    }

    #[test]
    fn hostile_bytes_fail_like_prost_and_never_panic() {
        let good = message(&["a", "b", "c"], 3).encode_to_vec();
        let mut d = Decoder::default();
        for cut in 0..good.len() {
            let raw = &good[..cut];
            let ours = d.decode(Bytes::copy_from_slice(raw));
            let theirs = pb::DesiredExecutorState::decode(raw);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "prefix of {cut} bytes");
            if let (Ok((x, _)), Ok(m)) = (ours, theirs) {
                assert!(same(&x, &m), "prefix of {cut} bytes");
            }
        }
        let mut noise = good.clone();
        for i in 0..noise.len() {
            noise[i] ^= 0x5a;
            let ours = d.decode(Bytes::copy_from_slice(&noise));
            let theirs = pb::DesiredExecutorState::decode(noise.as_slice());
            assert_eq!(ours.is_ok(), theirs.is_ok(), "flipped byte {i}");
            if let (Ok((x, _)), Ok(m)) = (ours, theirs) {
                assert!(same(&x, &m), "flipped byte {i}");
            }
            noise[i] ^= 0x5a;
        }
    }
}
