//! A set of CPU ids as a bitmap: the currency of the resource ledgers.

/// A set of logical CPU ids.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct CpuSet {
    words: Vec<u64>,
}

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `cpu` is in the set.
    #[inline]
    pub fn contains(&self, cpu: u32) -> bool {
        self.words
            .get(cpu as usize / 64)
            .is_some_and(|w| w >> (cpu % 64) & 1 == 1)
    }

    /// Adds `cpu`.
    pub fn insert(&mut self, cpu: u32) {
        let i = cpu as usize / 64;
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        self.words[i] |= 1 << (cpu % 64);
    }

    /// Removes `cpu`.
    pub fn remove(&mut self, cpu: u32) {
        if let Some(w) = self.words.get_mut(cpu as usize / 64) {
            *w &= !(1 << (cpu % 64));
        }
    }

    /// Number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Size of the intersection, without building it.
    #[inline]
    pub fn count_and(&self, other: &CpuSet) -> usize {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & b).count_ones() as usize)
            .sum()
    }

    /// The intersection.
    #[must_use]
    pub fn and(&self, other: &CpuSet) -> CpuSet {
        CpuSet {
            words: self
                .words
                .iter()
                .zip(&other.words)
                .map(|(a, b)| a & b)
                .collect(),
        }
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.words
            .iter()
            .enumerate()
            .all(|(i, w)| w & !other.words.get(i).copied().unwrap_or(0) == 0)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 64 + b)
            })
        })
    }

    /// The CPUs as a sorted vector.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = CpuSet::new();
        for c in iter {
            s.insert(c);
        }
        s
    }
}

impl<'a> FromIterator<&'a u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = &'a u32>>(iter: I) -> Self {
        iter.into_iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops() {
        let a: CpuSet = [0u32, 5, 64, 130].iter().collect();
        let b: CpuSet = [5u32, 130, 7].iter().collect();
        assert_eq!(a.len(), 4);
        assert_eq!(a.count_and(&b), 2);
        assert_eq!(a.and(&b).to_vec(), vec![5, 130]);
        assert!(a.and(&b).is_subset(&a));
        assert!(!a.is_subset(&b));
        let mut c = a.clone();
        c.remove(64);
        assert!(!c.contains(64));
        assert!(c.contains(130));
    }
}
