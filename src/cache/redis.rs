//! Redis specifics: key names, the entry encoding, and the Lua fill script.
//!
//! ## Entries
//! `{prefix}item:{id}` holds what a hit needs and nothing to decode:
//! `I<version> <fresh_until_ms> <item JSON>` or `N <fresh_until_ms>` (a cached "not found").
//! The key itself lives `CACHE_STALE_SECS` longer than the freshness, so that the entry can
//! be served `STALE` while Postgres is down.
//!
//! ## Write stamps
//! `{prefix}stamp:{id}` holds a random token that every write of the id replaces (after its
//! commit, together with deleting the entry). A reader notes the stamp before it reads
//! Postgres and fills only if the stamp is unchanged; see [`FILL_SCRIPT`] and
//! `docs/cache-design.md`.

use ::redis::cluster_routing::Slot;
use bytes::Bytes;

use crate::cache::cluster;
use crate::items::model::{ItemId, ItemJson};

/// The fill, atomic in Redis: store the entry only if no write has stamped the id since
/// the reader noted its stamp (before reading Postgres).
///
/// A write replaces the stamp and deletes the entry *after* its commit, so an unchanged
/// stamp at fill time proves that no write was acknowledged between the reader's note and
/// its fill, and a write that committed before the note is in what the reader read.
/// The interleaving it defeats (the classic cache-aside race):
///
/// ```text
///   reader                               writer
///   MGET item:7 stamp:7 flush
///                       -> miss, s1 (the stamp noted with the lookup)
///   SELECT ... v3
///                                        UPDATE ... v4; COMMIT
///                                        SET stamp:7 s2; DEL item:7
///   FILL item:7 v3 if stamp:7 == s1  -> refused: the stamp is s2
/// ```
///
/// Without the check the reader would store v3 after the writer's delete, and every read
/// would return v3 until the TTL ran out. Stamps are random, not counters, so a stamp that
/// expired and was written again can never look unchanged (no ABA).
///
/// A `TRUNCATE` (seen through the change feed) replaces the key space's flush token, which
/// every reader notes with its stamps: a reader that noted the token before the truncate
/// cannot fill either.
///
/// The fill also releases the reader's lease on each id (`cache::lease`) if it still holds
/// it, whether it filled or not: other instances waiting for this fill then see either the
/// entry or no lease, and stop waiting.
///
/// KEYS: the flush token, then entry, stamp, lease triples. ARGV: for each triple the noted
/// stamp ("" for none), noted flush token, value, ttl_ms, and lease token ("" for none).
/// Returns 1 (filled) or 0 for each triple.
pub const FILL_SCRIPT: &str = r"
local flush = redis.call('GET', KEYS[1]) or ''
local filled = {}
for i = 2, #KEYS, 3 do
  local a = (i - 2) / 3 * 5
  if flush == ARGV[a + 2] and (redis.call('GET', KEYS[i + 1]) or '') == ARGV[a + 1] then
    redis.call('SET', KEYS[i], ARGV[a + 3], 'PX', ARGV[a + 4])
    filled[#filled + 1] = 1
  else
    filled[#filled + 1] = 0
  end
  if ARGV[a + 5] ~= '' and redis.call('GET', KEYS[i + 2]) == ARGV[a + 5] then
    redis.call('DEL', KEYS[i + 2])
  end
end
return filled
";

/// Writes' invalidations, atomic in Redis: for each id the entry gone (so the next read
/// goes to Postgres) and a new stamp (so in-flight readers cannot fill) — unless the stamp
/// already carries this write's tag.
///
/// A write's stamp is `t<txid>:<lsn>:<random>`: tagged with the id of its transaction, and
/// the WAL position of its commit (for replicas, `db::replicas`). The API invalidates right
/// after its commit, and the change feed sees the same change a moment later: finding the
/// stamp tagged with the change's transaction, it knows an invalidation after that commit
/// has landed, and leaves alone the entry that a reader may have filled since (without the
/// tag, every API write would cost a second miss). An eviction (no tag) always applies,
/// and keeps the `t<txid>:<lsn>:` of the stamp it replaces: it changes no data, so the last
/// write's position still bounds which replica may answer.
///
/// An invalidation also drops the id's lease (`cache::lease`): the holder's load began
/// before this write, so its fill will be refused, and readers waiting for it would wait
/// for nothing.
///
/// The `DEL`s come before the `SET`: at `maxmemory` under `noeviction` Redis refuses a
/// script whose first write would grow memory, but lets a script that has begun writing
/// finish, so the stamps still change when memory is full.
///
/// KEYS: entry, stamp, lease triples. ARGV: stamp ttl_ms, then for each triple its tag
/// (`t<txid>`, or "" for an eviction) and its new stamp (for an eviction, the random part
/// only). Returns how many ids were invalidated.
pub const INVALIDATE_SCRIPT: &str = r"
local n = 0
for i = 1, #KEYS, 3 do
  local a = (i - 1) / 3 * 2
  local tag = ARGV[a + 2]
  local current = redis.call('GET', KEYS[i + 1]) or ''
  local stamp = ARGV[a + 3]
  if tag == '' then
    stamp = (string.match(current, '^(t%d+:%x+:)') or 'e:') .. stamp
  end
  if tag == '' or string.sub(current, 1, #tag + 1) ~= tag .. ':' then
    redis.call('DEL', KEYS[i], KEYS[i + 2])
    redis.call('SET', KEYS[i + 1], stamp, 'PX', ARGV[1])
    n = n + 1
  end
end
return n
";

/// A truncate's new flush token. `DEL` first, for the reason given at
/// [`INVALIDATE_SCRIPT`]: a plain `SET` is refused at `maxmemory` under `noeviction`, and the
/// change feed would stop at the truncate until Redis had room.
///
/// KEYS: the flush token. ARGV: the new token.
pub const FLUSH_SCRIPT: &str = r"
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// Key names under `CACHE_KEY_PREFIX`.
///
/// With Redis Cluster (`cluster`), every key of one id carries the id as its hash tag
/// (`item:{42}`, `stamp:{42}`, `lease:{42}`), and every key of one name a hash of the name
/// (`name:{<hash>}<name>`), so that the keys a script touches together sit in one slot; the
/// flush token is kept once per slot (`flush:{<tag>}`, see `cache::cluster`), so that each
/// fill can check its slot's copy. With one Redis the names are unchanged from before the
/// cluster existed (no tags, one flush token).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    cluster: bool,
}

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            cluster,
        }
    }

    /// Whether the keys are laid out for Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    fn of_id(&self, kind: &str, id: ItemId) -> String {
        if self.cluster {
            format!("{}{kind}:{{{id}}}", self.prefix)
        } else {
            format!("{}{kind}:{id}", self.prefix)
        }
    }

    fn of_name(&self, kind: &str, name: &str) -> String {
        if self.cluster {
            format!(
                "{}{kind}:{{{}}}{name}",
                self.prefix,
                cluster::name_tag(name)
            )
        } else {
            format!("{}{kind}:{name}", self.prefix)
        }
    }

    pub fn entry(&self, id: ItemId) -> String {
        self.of_id("item", id)
    }

    pub fn stamp(&self, id: ItemId) -> String {
        self.of_id("stamp", id)
    }

    /// The fleet-wide lease on loading `id` (`cache::lease`).
    pub fn lease(&self, id: ItemId) -> String {
        self.of_id("lease", id)
    }

    /// A name's lease key. Name lookups take no lease (their loads are coalesced per
    /// instance only); the key exists so that names and items share the fill and
    /// invalidation scripts, and is never set.
    pub fn name_lease(&self, name: &str) -> String {
        self.of_name("nlease", name)
    }

    /// A name's cached lookup: the ids of its first page.
    pub fn name_entry(&self, name: &str) -> String {
        self.of_name("name", name)
    }

    /// A name's write stamp: replaced by every write that moves an item into or out of the
    /// name's result.
    pub fn name_stamp(&self, name: &str) -> String {
        self.of_name("nstamp", name)
    }

    /// The flush token a reader of `id` notes and its fill checks: the key space's one, or
    /// with a cluster the copy in `id`'s slot.
    pub fn flush_for_item(&self, id: ItemId) -> String {
        if self.cluster {
            self.flush_in(Slot::for_key(id.to_string()))
        } else {
            self.flush()
        }
    }

    /// [`Keys::flush_for_item`] for a name's lookup.
    pub fn flush_for_name(&self, name: &str) -> String {
        if self.cluster {
            self.flush_in(Slot::for_key(cluster::name_tag(name)))
        } else {
            self.flush()
        }
    }

    fn flush_in(&self, slot: Slot) -> String {
        format!("{}flush:{{{}}}", self.prefix, cluster::slot_tag(slot))
    }

    /// Every copy of the flush token: one, or with a cluster one per slot.
    pub fn flush_keys(&self) -> Vec<String> {
        if self.cluster {
            cluster::slot_tags()
                .map(|tag| format!("{}flush:{{{tag}}}", self.prefix))
                .collect()
        } else {
            vec![self.flush()]
        }
    }

    /// The key space's flush token (one Redis), replaced when the table is truncated.
    fn flush(&self) -> String {
        format!("{}flush", self.prefix)
    }

    /// `SCAN MATCH` patterns for every entry key, items' and names' (the prefix's glob
    /// characters escaped).
    pub fn entry_patterns(&self) -> [String; 2] {
        let mut prefix = String::with_capacity(self.prefix.len() + 8);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                prefix.push('\\');
            }
            prefix.push(c);
        }
        [format!("{prefix}item:*"), format!("{prefix}name:*")]
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Item(ItemJson),
    NotFound,
}

/// A decoded entry: the value, until when it is fresh (Unix ms), and how long the load
/// that filled it took (ms; early refresh scales with it, `cache::refresh`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Cached,
    pub fresh_until_ms: i64,
    pub load_ms: u32,
}

impl Entry {
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        now_ms < self.fresh_until_ms
    }

    pub fn encode(&self) -> Vec<u8> {
        match &self.value {
            Cached::Item(item) => {
                let mut out = Vec::with_capacity(item.json.len() + 32);
                out.extend_from_slice(
                    format!(
                        "I{} {}/{} ",
                        item.version, self.fresh_until_ms, self.load_ms
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(&item.json);
                out
            }
            Cached::NotFound => format!("N {}", self.fresh_until_ms).into_bytes(),
        }
    }

    /// Reads the header and slices the JSON out of `raw` without copying it. Anything that
    /// does not parse (another program's key, an older format) is treated as a miss.
    pub fn decode(raw: Bytes) -> Option<Entry> {
        let (&tag, rest) = raw.split_first()?;
        match tag {
            b'N' => Some(Entry {
                value: Cached::NotFound,
                fresh_until_ms: parse_i64(rest.strip_prefix(b" ")?)?,
                load_ms: 0,
            }),
            b'I' => {
                let version_end = rest.iter().position(|&b| b == b' ')?;
                let version = parse_i64(&rest[..version_end])?;
                let after_version = &rest[version_end + 1..];
                let fresh_end = after_version.iter().position(|&b| b == b' ')?;
                // `<fresh_until_ms>/<load_ms>`; entries written before the load time was
                // kept have no `/` (no early refresh for them).
                let freshness = &after_version[..fresh_end];
                let (fresh_until_ms, load_ms) = match freshness.iter().position(|&b| b == b'/') {
                    Some(slash) => (
                        parse_i64(&freshness[..slash])?,
                        u32::try_from(parse_i64(&freshness[slash + 1..])?).ok()?,
                    ),
                    None => (parse_i64(freshness)?, 0),
                };
                let json_start = 1 + version_end + 1 + fresh_end + 1;
                Some(Entry {
                    value: Cached::Item(ItemJson {
                        version,
                        json: raw.slice(json_start..),
                    }),
                    fresh_until_ms,
                    load_ms,
                })
            }
            _ => None,
        }
    }
}

/// A name's cached lookup: the ids of its first page (up to one more than a page, which
/// tells whether another page follows), and until when it is fresh (Unix ms).
/// Encoded `L<fresh_until_ms> <id>,<id>,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub ids: Vec<ItemId>,
    pub fresh_until_ms: i64,
}

impl NameEntry {
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        now_ms < self.fresh_until_ms
    }

    pub fn encode(&self) -> Vec<u8> {
        let ids: Vec<String> = self.ids.iter().map(ItemId::to_string).collect();
        format!("L{} {}", self.fresh_until_ms, ids.join(",")).into_bytes()
    }

    /// Anything that does not parse is treated as a miss.
    pub fn decode(raw: &[u8]) -> Option<NameEntry> {
        let rest = std::str::from_utf8(raw.strip_prefix(b"L")?).ok()?;
        let (fresh, ids) = rest.split_once(' ')?;
        let ids = if ids.is_empty() {
            Vec::new()
        } else {
            ids.split(',')
                .map(|id| id.parse().ok().and_then(ItemId::new))
                .collect::<Option<Vec<_>>>()?
        };
        Some(NameEntry {
            ids,
            fresh_until_ms: fresh.parse().ok()?,
        })
    }
}

fn parse_i64(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_without_touching_the_json() {
        let json = Bytes::from_static(br#"{"id":7,"name":"a b c"}"#);
        let entry = Entry {
            value: Cached::Item(ItemJson {
                version: 12,
                json: json.clone(),
            }),
            fresh_until_ms: 1_764_000_000_123,
            load_ms: 17,
        };
        let decoded = Entry::decode(Bytes::from(entry.encode()));
        assert_eq!(decoded, Some(entry));
        let before_load_times = Entry::decode(Bytes::from_static(b"I12 99 {}"));
        assert_eq!(
            before_load_times.map(|e| (e.fresh_until_ms, e.load_ms)),
            Some((99, 0))
        );
        let not_found = Entry {
            value: Cached::NotFound,
            fresh_until_ms: 5,
            load_ms: 0,
        };
        assert_eq!(
            Entry::decode(Bytes::from(not_found.encode())),
            Some(not_found)
        );
    }

    #[test]
    fn the_entry_patterns_match_the_prefix_literally() {
        assert_eq!(
            Keys::new("app:", false).entry_patterns(),
            ["app:item:*".to_owned(), "app:name:*".to_owned()]
        );
        assert_eq!(
            Keys::new("a*b?[c]:", false).entry_patterns()[0],
            "a\\*b\\?\\[c\\]:item:*"
        );
    }

    #[test]
    fn name_entries_round_trip() {
        for ids in [vec![], vec![3], vec![3, 9, 12]] {
            let entry = NameEntry {
                ids: ids.into_iter().filter_map(ItemId::new).collect(),
                fresh_until_ms: 1_764_000_000_123,
            };
            assert_eq!(NameEntry::decode(&entry.encode()), Some(entry));
        }
        for raw in [
            &b""[..],
            b"L",
            b"L5",
            b"L5 x",
            b"L5 1,,2",
            b"Lx 1",
            b"I1 2 {}",
        ] {
            assert_eq!(NameEntry::decode(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn foreign_values_decode_as_misses() {
        for raw in [
            &b""[..],
            b"X",
            b"I12",
            b"I12 x {}",
            b"I12 5/x {}",
            b"N",
            b"Nx",
        ] {
            assert_eq!(Entry::decode(Bytes::copy_from_slice(raw)), None, "{raw:?}");
        }
    }
}
