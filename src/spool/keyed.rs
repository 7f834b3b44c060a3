//! A table by queue key for the local store's per-message state (the index's summaries, the
//! journal's record locations): a vector sorted by key instead of a hash map, as a million entries
//! are kept. A hash map spends about twice its entries' size in buckets kept free; here an entry
//! costs its key and value. Queue IDs sort in arrival order, so new messages are appended; a
//! removed entry leaves a vacant slot until half the slots are vacant, then the table is
//! compacted in one pass.

use super::envelope::QueueKey as Key;

/// Hashing for maps by queue key (a restart fills maps of a million keys): SplitMix64's
/// finalizer, a bijection that spreads every bit of the key over the hash, where SipHash's
/// protection against chosen keys buys nothing (the keys are the store's own). A bare
/// multiplication would not do: a key's low bits are an ID counter, mostly zero, and the table
/// picks buckets by the hash's low bits.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl KeyHasher {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = Self::mix(self.0 ^ u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = Self::mix(self.0 ^ key);
    }
}

/// A hash map by queue key with [`KeyHasher`].
pub type KeyMap<V> = std::collections::HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;
/// A hash set of queue keys with [`KeyHasher`].
pub type KeySet = std::collections::HashSet<Key, std::hash::BuildHasherDefault<KeyHasher>>;

/// A value that can mark its slot vacant (a removed entry, until the next compaction).
pub trait Slot {
    const VACANT: Self;
    fn is_vacant(&self) -> bool;
}

#[derive(Debug)]
pub struct Keyed<V> {
    items: Vec<(Key, V)>,
    vacant: usize,
}

impl<V> Default for Keyed<V> {
    fn default() -> Self {
        Keyed { items: Vec::new(), vacant: 0 }
    }
}

impl<V: Slot> Keyed<V> {
    /// A table of `items`, which need not be sorted; of entries with the same key the last wins.
    pub fn from_unsorted(mut items: Vec<(Key, V)>) -> Keyed<V> {
        // Stable: equal keys keep their order, so the last one given is the last of its run.
        items.sort_by_key(|(k, _)| *k);
        let mut kept: Vec<(Key, V)> = Vec::with_capacity(items.len());
        for (key, value) in items {
            match kept.last_mut() {
                Some((last, slot)) if *last == key => *slot = value,
                _ => kept.push((key, value)),
            }
        }
        kept.retain(|(_, v)| !v.is_vacant());
        kept.shrink_to_fit();
        Keyed { items: kept, vacant: 0 }
    }

    fn find(&self, key: Key) -> Result<usize, usize> {
        self.items.binary_search_by_key(&key, |(k, _)| *k)
    }

    pub fn len(&self) -> usize {
        self.items.len() - self.vacant
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &Key) -> Option<&V> {
        let at = self.find(*key).ok()?;
        self.items.get(at).map(|(_, v)| v).filter(|v| !v.is_vacant())
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut V> {
        let at = self.find(*key).ok()?;
        self.items.get_mut(at).map(|(_, v)| v).filter(|v| !v.is_vacant())
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// Sets the key's value; returns the one it replaces.
    pub fn insert(&mut self, key: Key, value: V) -> Option<V> {
        if self.items.last().is_none_or(|(last, _)| *last < key) {
            self.items.push((key, value));
            return None;
        }
        match self.find(key) {
            Ok(at) => {
                let old = std::mem::replace(&mut self.items[at].1, value);
                if old.is_vacant() {
                    self.vacant -= 1;
                    return None;
                }
                Some(old)
            }
            Err(at) => {
                self.items.insert(at, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &Key) -> Option<V> {
        let at = self.find(*key).ok()?;
        if self.items[at].1.is_vacant() {
            return None;
        }
        let old = std::mem::replace(&mut self.items[at].1, V::VACANT);
        self.vacant += 1;
        if self.vacant > 1024 && self.vacant * 2 > self.items.len() {
            self.compact();
        }
        Some(old)
    }

    fn compact(&mut self) {
        self.items.retain(|(_, v)| !v.is_vacant());
        self.vacant = 0;
        if self.items.capacity() > 4 * self.items.len().max(1024) {
            self.items.shrink_to(2 * self.items.len());
        }
    }

    /// The vacant slots in use, for tests.
    #[cfg(test)]
    pub fn vacant(&self) -> usize {
        self.vacant
    }

    /// The slots in use, for tests.
    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.items.len()
    }

    pub fn last_key(&self) -> Option<Key> {
        self.items.iter().rev().find(|(_, v)| !v.is_vacant()).map(|(k, _)| *k)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Key, &V)> {
        self.items.iter().filter(|(_, v)| !v.is_vacant()).map(|(k, v)| (*k, v))
    }

    /// The entries after `after` (all when None), in key order.
    pub fn after(&self, after: Option<Key>) -> impl Iterator<Item = (Key, &V)> {
        let start = after.map_or(0, |a| self.items.partition_point(|(k, _)| *k <= a));
        self.items[start..].iter().filter(|(_, v)| !v.is_vacant()).map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Slot for u32 {
        const VACANT: u32 = u32::MAX;
        fn is_vacant(&self) -> bool {
            *self == u32::MAX
        }
    }

    #[test]
    fn keeps_key_order_whatever_the_order_of_inserts() {
        let mut table = Keyed::default();
        for key in [5u64, 1, 9, 3, 7] {
            assert_eq!(table.insert(key, key as u32), None);
        }
        assert_eq!(table.iter().map(|(k, _)| k).collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
        assert_eq!(table.insert(3, 30), Some(3));
        assert_eq!(table.get(&3), Some(&30));
        assert_eq!(table.after(Some(3)).map(|(k, _)| k).collect::<Vec<_>>(), [5, 7, 9]);
        assert_eq!(table.after(Some(4)).map(|(k, _)| k).collect::<Vec<_>>(), [5, 7, 9]);
    }

    #[test]
    fn removed_slots_are_reused_and_compacted() {
        let mut table = Keyed::default();
        for key in 0..4096u64 {
            table.insert(key, 1);
        }
        assert_eq!(table.remove(&7), Some(1));
        assert_eq!(table.remove(&7), None, "removed once");
        assert!(!table.contains_key(&7));
        assert_eq!(table.insert(7, 2), None, "a vacant slot is not a value");
        assert_eq!(table.len(), 4096);
        for key in 0..3000u64 {
            table.remove(&key);
        }
        assert_eq!(table.len(), 1096);
        assert!(table.vacant() < table.slots(), "compacted: {} of {}", table.vacant(), table.slots());
        assert_eq!(table.last_key(), Some(4095));
        assert_eq!(table.iter().next().map(|(k, _)| k), Some(3000));
    }

    /// Keys whose low bits are all zero (an ID counter at 0) still spread over the buckets.
    #[test]
    fn key_hashes_spread_keys_with_zero_low_bits() {
        use std::hash::BuildHasher;
        let build = std::hash::BuildHasherDefault::<KeyHasher>::default();
        let buckets: std::collections::HashSet<u64> = (0..4096u64).map(|k| build.hash_one(k << 12) & 4095).collect();
        assert!(buckets.len() > 2048, "{} of 4096 buckets used", buckets.len());
    }

    #[test]
    fn from_unsorted_keeps_the_last_value_of_a_key() {
        let table = Keyed::from_unsorted(vec![(4, 1), (2, 1), (4, 2), (3, u32::MAX), (2, 5)]);
        assert_eq!(table.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(), [(2, 5), (4, 2)]);
        assert_eq!(table.len(), 2);
    }
}
