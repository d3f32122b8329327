//! Redis Cluster (`REDIS_CLUSTER_NODES`): what the cache needs beyond redis-rs's cluster
//! connection, which routes each command by its keys' slot and follows the cluster through
//! `MOVED`, `ASK` and failovers by itself.
//!
//! - A Lua script runs on one node, so every key it touches must be in one slot: the keys
//!   of one id share the id as hash tag, the keys of one name a hash of it (`redis::Keys`).
//! - Scripts over many ids (fills, invalidations, leases) are cut into one call per slot,
//!   sent concurrently ([`slot_groups`]). `MGET` over many slots is split by redis-rs.
//! - The flush token (replaced on `TRUNCATE`) is checked by every fill, so it is kept once
//!   per slot, under a tag that hashes to that slot ([`slot_tag`]); a truncate replaces all
//!   16,384 copies.
//! - `SCAN` sees one node: a truncate scans each master (found with `CLUSTER SHARDS`).

use std::collections::HashMap;
use std::sync::LazyLock;

use ::redis::Value;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};

use crate::cache::redis::Keys;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16_384;

/// For each slot, the shortest tag (base 36 numbers, in order) that hashes to it.
static SLOT_TAGS: LazyLock<HashMap<Slot, String>> = LazyLock::new(|| {
    let mut tags = HashMap::with_capacity(SLOTS);
    let mut n: u64 = 0;
    while tags.len() < SLOTS {
        let tag = base36(n);
        tags.entry(Slot::for_key(&tag)).or_insert(tag);
        n += 1;
    }
    tags
});

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// A tag that hashes to `slot`.
pub fn slot_tag(slot: Slot) -> &'static str {
    SLOT_TAGS.get(&slot).map_or("", String::as_str)
}

/// One tag per slot.
pub fn slot_tags() -> impl Iterator<Item = &'static str> {
    SLOT_TAGS.values().map(String::as_str)
}

/// A name's hash tag: 64-bit FNV-1a of its bytes, in hex. A name may hold `{` and `}`,
/// which as a tag of their own would split a name's keys across slots.
pub fn name_tag(name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// `0..len` cut into groups whose keys share a slot (`key_of(i)` is any key of item `i`),
/// in first-seen order; with one Redis, one group of all.
pub fn slot_groups(keys: &Keys, len: usize, key_of: impl Fn(usize) -> String) -> Vec<Vec<usize>> {
    if !keys.is_cluster() {
        return vec![(0..len).collect()];
    }
    let mut order: Vec<Slot> = Vec::new();
    let mut groups: HashMap<Slot, Vec<usize>> = HashMap::new();
    for i in 0..len {
        let slot = Slot::for_key(key_of(i));
        groups
            .entry(slot)
            .or_insert_with(|| {
                order.push(slot);
                Vec::new()
            })
            .push(i);
    }
    order
        .into_iter()
        .filter_map(|slot| groups.remove(&slot))
        .collect()
}

/// A shard that serves slots, from a `CLUSTER SHARDS` reply: its slot ranges (the first
/// slot of the first one keys it), and its master's node id if it has a healthy one.
struct Shard {
    first_slot: i64,
    ranges: Vec<(u16, u16)>,
    master: Option<String>,
}

/// The shards of a `CLUSTER SHARDS` reply that serve slots; empty for a reply that is not
/// a list of shards.
fn shards(reply: &Value) -> Vec<Shard> {
    let Value::Array(shards) = reply else {
        return Vec::new();
    };
    let master_of = |nodes: &[Value]| {
        nodes.iter().find_map(|node| {
            let is_master = field(node, "role").is_some_and(|role| is_name(role, "master"));
            let healthy = field(node, "health").is_none_or(|health| is_name(health, "online"));
            match field(node, "id") {
                Some(Value::BulkString(id)) if is_master && healthy => {
                    Some(String::from_utf8_lossy(id).into_owned())
                }
                Some(Value::SimpleString(id)) if is_master && healthy => Some(id.clone()),
                _ => None,
            }
        })
    };
    shards
        .iter()
        .filter_map(|shard| {
            let (first_slot, ranges) = match field(shard, "slots") {
                Some(Value::Array(bounds)) => {
                    let ranges = bounds
                        .chunks(2)
                        .filter_map(|pair| match pair {
                            [low, high] => Some((
                                u16::try_from(as_int(low)?).ok()?,
                                u16::try_from(as_int(high)?).ok()?,
                            )),
                            _ => None,
                        })
                        .collect();
                    (bounds.first().and_then(as_int)?, ranges)
                }
                _ => return None,
            };
            let master = match field(shard, "nodes") {
                Some(Value::Array(nodes)) => master_of(nodes),
                _ => None,
            };
            Some(Shard {
                first_slot,
                ranges,
                master,
            })
        })
        .collect()
}

/// The first slot of each master's ranges, from a `CLUSTER SHARDS` reply: routing a command
/// to that slot's master reaches each master once.
pub fn master_routes(reply: &Value) -> Vec<RoutingInfo> {
    shards(reply)
        .iter()
        .filter_map(|shard| u16::try_from(shard.first_slot).ok())
        .map(|slot| {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                slot,
                SlotAddr::Master,
            )))
        })
        .collect()
}

/// Each shard's slot ranges (inclusive), from a `CLUSTER SHARDS` reply.
pub fn shard_ranges(reply: &Value) -> Vec<Vec<(u16, u16)>> {
    shards(reply)
        .into_iter()
        .map(|shard| shard.ranges)
        .collect()
}

/// Each shard's first slot and its master's node id, from a `CLUSTER SHARDS` reply, sorted:
/// a different list means a failover (or a resharding). `None` while a shard that serves
/// slots has no healthy master, or for a reply that is not a list of shards.
pub fn masters(reply: &Value) -> Option<Vec<(i64, String)>> {
    let mut masters = shards(reply)
        .into_iter()
        .map(|shard| Some((shard.first_slot, shard.master?)))
        .collect::<Option<Vec<_>>>()?;
    masters.sort();
    (!masters.is_empty()).then_some(masters)
}

/// A `CONFIG GET` reply (a flat name, value list, or a map) as name → value.
pub fn config_values(reply: Value) -> HashMap<String, String> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Array(items) => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    pairs
        .iter()
        .filter_map(|(name, value)| Some((text(name)?, text(value)?)))
        .collect()
}

/// A field of a RESP2 flat key-value array or a RESP3 map.
fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Array(items) => items.chunks(2).find_map(|pair| match pair {
            [key, value] if is_name(key, name) => Some(value),
            _ => None,
        }),
        Value::Map(pairs) => pairs
            .iter()
            .find_map(|(key, value)| is_name(key, name).then_some(value)),
        _ => None,
    }
}

fn is_name(value: &Value, name: &str) -> bool {
    match value {
        Value::BulkString(bytes) => bytes == name.as_bytes(),
        Value::SimpleString(text) => text == name,
        _ => false,
    }
}

fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        assert_eq!(SLOT_TAGS.len(), SLOTS);
        for (slot, tag) in SLOT_TAGS.iter() {
            assert_eq!(Slot::for_key(tag), *slot);
            assert_eq!(Slot::for_key(format!("p:flush:{{{tag}}}")), *slot);
        }
    }

    #[test]
    fn the_keys_of_an_id_or_a_name_share_a_slot_with_their_flush_token() {
        let keys = Keys::new("app:", true);
        let id = crate::items::model::ItemId::new(42).unwrap();
        let slot = Slot::for_key(keys.entry(id));
        for key in [keys.stamp(id), keys.lease(id), keys.flush_for_item(id)] {
            assert_eq!(Slot::for_key(&key), slot, "{key}");
        }
        for name in ["chair", "}{", "{x}", "", "a}b{c"] {
            let slot = Slot::for_key(keys.name_entry(name));
            for key in [
                keys.name_stamp(name),
                keys.name_lease(name),
                keys.flush_for_name(name),
            ] {
                assert_eq!(Slot::for_key(&key), slot, "{name:?}: {key}");
            }
        }
    }

    #[test]
    fn groups_cut_by_slot_and_keep_order() {
        let keys = Keys::new("", true);
        let ids: Vec<_> = (1..=50)
            .map(|n| crate::items::model::ItemId::new(n).unwrap())
            .collect();
        let groups = slot_groups(&keys, ids.len(), |i| keys.entry(ids[i]));
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        for group in &groups {
            let slot = Slot::for_key(keys.entry(ids[group[0]]));
            assert!(
                group
                    .iter()
                    .all(|&i| Slot::for_key(keys.entry(ids[i])) == slot)
            );
        }
        let single = Keys::new("", false);
        assert_eq!(slot_groups(&single, 3, |i| i.to_string()).len(), 1);
    }
}
