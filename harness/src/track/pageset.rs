//! [`PageSet`]: pages reported by a mechanism, one bitmap per memslot.

use std::collections::BTreeMap;

/// A set of 4 KiB pages, per memslot, as KVM's bitmaps lay them out (bit `i % 64` of word
/// `i / 64` is page `i` of the slot). `clear` keeps the allocation, so a harvest loop that reuses
/// one set allocates nothing per round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    slots: BTreeMap<u32, Vec<u64>>,
}

impl PageSet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Remove every page, keeping the bitmaps' memory: O(slots), the words are not zeroed
    /// (a shorter bitmap reads as zeros past its end, and the next union into an empty slot is
    /// a plain copy).
    pub fn clear(&mut self) {
        for words in self.slots.values_mut() {
            words.clear();
        }
    }

    fn words_mut(&mut self, slot: u32, page: u64) -> (&mut Vec<u64>, usize) {
        let word = usize::try_from(page / 64).unwrap_or(usize::MAX);
        let words = self.slots.entry(slot).or_default();
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        (words, word)
    }

    /// Add page `page` of `slot`; true if it was not there.
    pub fn insert(&mut self, slot: u32, page: u64) -> bool {
        let (words, word) = self.words_mut(slot, page);
        let bit = 1u64 << (page % 64);
        let new = words[word] & bit == 0;
        words[word] |= bit;
        new
    }

    /// Remove page `page` of `slot`; true if it was there.
    pub fn remove(&mut self, slot: u32, page: u64) -> bool {
        let Some(words) = self.slots.get_mut(&slot) else {
            return false;
        };
        let Some(w) = usize::try_from(page / 64)
            .ok()
            .and_then(|i| words.get_mut(i))
        else {
            return false;
        };
        let bit = 1u64 << (page % 64);
        let had = *w & bit != 0;
        *w &= !bit;
        had
    }

    /// Whether page `page` of `slot` is in the set.
    #[must_use]
    pub fn contains(&self, slot: u32, page: u64) -> bool {
        self.slots
            .get(&slot)
            .and_then(|words| usize::try_from(page / 64).ok().and_then(|i| words.get(i)))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Union KVM bitmap `bitmap` (page 0 of the slot at bit 0) into the set.
    pub fn or_bitmap(&mut self, slot: u32, bitmap: &[u64]) {
        let words = self.slots.entry(slot).or_default();
        if words.is_empty() {
            words.extend_from_slice(bitmap);
            return;
        }
        if words.len() < bitmap.len() {
            words.resize(bitmap.len(), 0);
        }
        for (w, b) in words.iter_mut().zip(bitmap) {
            *w |= b;
        }
    }

    /// Add every page of `other`.
    pub fn union_with(&mut self, other: &Self) {
        for (slot, words) in &other.slots {
            self.or_bitmap(*slot, words);
        }
    }

    /// Remove every page of `other` (set difference).
    pub fn remove_all(&mut self, other: &Self) {
        for (slot, theirs) in &other.slots {
            if let Some(mine) = self.slots.get_mut(slot) {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    *m &= !t;
                }
            }
        }
    }

    /// The bitmap of `slot` (may be shorter than the slot; missing words are zero).
    #[must_use]
    pub fn bitmap(&self, slot: u32) -> &[u64] {
        self.slots.get(&slot).map_or(&[], Vec::as_slice)
    }

    /// Number of pages in the set.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.slots
            .values()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// True when no page is in the set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.values().flatten().all(|w| *w == 0)
    }

    /// Every (slot, page) in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.slots.iter().flat_map(|(slot, words)| {
            words.iter().enumerate().flat_map(move |(i, &w)| {
                BitIter(w).map(move |bit| (*slot, i as u64 * 64 + u64::from(bit)))
            })
        })
    }

    /// Slots that have a bitmap (possibly empty).
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.keys().copied()
    }
}

/// Iterator over the set bits of a word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut s = PageSet::new();
        assert!(s.insert(2, 0));
        assert!(!s.insert(2, 0));
        assert!(s.insert(2, 130));
        assert!(s.insert(1, 63));
        assert_eq!(s.len(), 3);
        assert!(s.contains(2, 130) && !s.contains(2, 129) && !s.contains(3, 0));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![(1, 63), (2, 0), (2, 130)]
        );
        assert!(s.remove(2, 130) && !s.remove(2, 130) && !s.remove(9, 0));
        let mut t = PageSet::new();
        t.or_bitmap(2, &[0b101, 1]);
        s.union_with(&t);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![(1, 63), (2, 0), (2, 2), (2, 64)]
        );
        let mut u = s.clone();
        u.remove_all(&t);
        assert_eq!(u.iter().collect::<Vec<_>>(), vec![(1, 63)]);
        s.clear();
        assert!(s.is_empty());
        assert!(!s.contains(2, 64) && s.iter().next().is_none());
        s.or_bitmap(2, &[0, 0b10]);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![(2, 65)],
            "a union after clear sees no stale bits"
        );
    }
}
