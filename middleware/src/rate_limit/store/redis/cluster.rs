//! Which Redis node holds which key: hash slots and the cluster's slot map.

use std::sync::Arc;

use redis::Value;

use super::breaker::Breaker;

/// Hash slots of a Redis Cluster.
pub(super) const SLOTS: usize = 16_384;

/// The hash slot of a key name, as Redis computes it: CRC16 (XMODEM) of
/// the hash tag — the text between the first `{` and the next `}`, when not
/// empty — or else of the whole name, modulo 16 384.
pub(super) fn slot_of(name: &[u8]) -> u16 {
    let tag = name
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(name);
    crc16::State::<crc16::XMODEM>::calculate(tag) % SLOTS as u16
}

/// One Redis server the store sends script calls to, with its own circuit
/// breaker: one failed shard degrades only the keys on it.
pub(super) struct Node {
    /// `host:port`, or `redis` for a single server; the `node` label of
    /// metrics.
    pub(super) label: String,
    /// Where to route calls on a cluster; `None` for a single server or
    /// when every key has one hash tag (then [`slot`](Self::slot) routes).
    pub(super) address: Option<(String, u16)>,
    /// On a cluster where every key has one hash tag
    /// ([`Sharding::Single`](super::Sharding::Single)): that tag's slot,
    /// whose master gets every call, those that declare no key (refunds,
    /// lease returns) included.
    pub(super) slot: Option<u16>,
    pub(super) breaker: Breaker,
}

impl Node {
    pub(super) fn new(label: String, address: Option<(String, u16)>) -> Self {
        Self {
            label,
            address,
            slot: None,
            breaker: Breaker::default(),
        }
    }

    /// A node whose calls go to the master of `slot`.
    pub(super) fn owning(label: String, slot: u16) -> Self {
        Self {
            slot: Some(slot),
            ..Self::new(label, None)
        }
    }
}

/// Where every key goes: the nodes, and for a cluster the owner of each
/// slot.
pub(super) struct Topology {
    pub(super) nodes: Vec<Arc<Node>>,
    /// Per slot, an index into `nodes`, or [`UNASSIGNED`]; empty when there
    /// is one node for everything.
    slots: Vec<u16>,
}

/// A slot no master serves.
const UNASSIGNED: u16 = u16::MAX;

impl Topology {
    /// One node for every key.
    pub(super) fn single(node: Arc<Node>) -> Self {
        Self {
            nodes: vec![node],
            slots: Vec::new(),
        }
    }

    /// Nothing known yet.
    pub(super) fn unknown() -> Self {
        Self {
            nodes: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// Whether the slot map still has to be read.
    pub(super) fn is_unknown(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node of `name`, or `None` when its slot has no master.
    pub(super) fn node_of(&self, name: &str) -> Option<usize> {
        if self.slots.is_empty() {
            return (!self.nodes.is_empty()).then_some(0);
        }
        match self.slots[usize::from(slot_of(name.as_bytes()))] {
            UNASSIGNED => None,
            index => Some(usize::from(index)),
        }
    }

    /// The topology described by a `CLUSTER SLOTS` reply. `node` gives the
    /// node (and its breaker) of an address, so breakers outlive refreshes.
    pub(super) fn from_cluster_slots(
        reply: Value,
        mut node: impl FnMut(&str, u16) -> Arc<Node>,
    ) -> Result<Self, String> {
        let Value::Array(ranges) = reply else {
            return Err(format!("CLUSTER SLOTS: unexpected reply {reply:?}"));
        };
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut slots = vec![UNASSIGNED; SLOTS];
        for range in ranges {
            let Value::Array(fields) = range else {
                return Err("CLUSTER SLOTS: a range is not an array".to_owned());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err("CLUSTER SLOTS: a range lacks start, end or master".to_owned());
            };
            let host = match master.first() {
                Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                Some(Value::SimpleString(host)) => host.clone(),
                _ => return Err("CLUSTER SLOTS: a master has no host".to_owned()),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err("CLUSTER SLOTS: a master has no port".to_owned());
            };
            let port = u16::try_from(*port).map_err(|_| format!("CLUSTER SLOTS: port {port}"))?;
            let label = format!("{host}:{port}");
            let index = match nodes.iter().position(|n| n.label == label) {
                Some(index) => index,
                None => {
                    nodes.push(node(&host, port));
                    nodes.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start), usize::try_from(*end));
            let (Ok(start), Ok(end)) = (start, end) else {
                return Err("CLUSTER SLOTS: a negative slot".to_owned());
            };
            if start > end || end >= SLOTS {
                return Err(format!("CLUSTER SLOTS: slots {start}-{end}"));
            }
            slots[start..=end].fill(index as u16);
        }
        if nodes.is_empty() {
            return Err("CLUSTER SLOTS: no slot is served".to_owned());
        }
        Ok(Self { nodes, slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        // An empty tag is no tag: the whole name is hashed.
        assert_eq!(slot_of(b"foo{}{bar}"), 8363);
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }
}
