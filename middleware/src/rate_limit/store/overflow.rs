//! The memory store's overflow: where keys beyond its budget of exact
//! entries are decided, in memory fixed at start-up.
//!
//! A count-min sketch of GCRA states: `ROWS` rows of `width` cells, each
//! cell a theoretical arrival time (nanoseconds). A key maps to one cell per
//! row; its state is the *smallest* of its cells (the count-min estimate),
//! and a charge raises each of its cells to the new state (conservative
//! update). Every cell of a key is at least the state an exact bucket would
//! have after the requests the sketch admitted for that key: a cell only
//! ever rises, and when the key is charged it rises to a state computed
//! from the smallest cell, itself at least the exact state. So the sketch
//! admits a request only if that exact bucket would: other keys in the same
//! cells can only make it deny early, never admit more. Nothing is ever evicted, so no
//! pressure frees a key into a fresh bucket; a cell whose time has passed
//! is simply a full bucket again.

use std::hash::{BuildHasher, Hash, Hasher};

use crate::rate_limit::key::Key;
use crate::rate_limit::policy::PolicyName;

/// Rows of the sketch: each key has this many cells.
pub(crate) const ROWS: usize = 4;

/// Bytes per cell.
pub(crate) const CELL_BYTES: usize = 8;

/// The cells; callers hold them under one lock, so a decision reads and
/// raises a key's cells as one step.
pub(crate) struct Sketch {
    cells: Box<[u64]>,
    /// `width - 1` (the width is a power of two).
    mask: u64,
    /// Seeded per store, so nobody can compute colliding keys offline.
    hasher: foldhash::fast::RandomState,
}

/// A key's cells, one per row.
pub(crate) type Cells = [usize; ROWS];

impl Sketch {
    /// A sketch of `width` cells per row (rounded up to a power of two, at
    /// least 64): `ROWS × width × 8` bytes, allocated now.
    pub(crate) fn new(width: usize) -> Self {
        let width = width.max(64).next_power_of_two();
        Self {
            cells: vec![0; ROWS * width].into_boxed_slice(),
            mask: width as u64 - 1,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Its memory, in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.cells.len() * CELL_BYTES
    }

    /// Where `(policy, key)` lives: one cell per row, from two halves of
    /// one hash (double hashing).
    pub(crate) fn cells(&self, policy: PolicyName, key: &Key) -> Cells {
        let mut hasher = self.hasher.build_hasher();
        policy.id().hash(&mut hasher);
        key.hash(&mut hasher);
        let hash = hasher.finish();
        let (a, b) = (hash & 0xffff_ffff, (hash >> 32) | 1);
        let width = self.mask + 1;
        std::array::from_fn(|row| {
            (row as u64 * width + (a.wrapping_add(row as u64 * b) & self.mask)) as usize
        })
    }

    /// The key's state: the smallest of its cells (`None`: empty).
    pub(crate) fn state(&self, cells: &Cells) -> Option<u64> {
        let tat = cells.iter().map(|&c| self.cells[c]).min().unwrap_or(0);
        (tat > 0).then_some(tat)
    }

    /// Charges the key: each of its cells rises to `tat` (never falls).
    pub(crate) fn raise(&mut self, cells: &Cells, tat: u64) {
        for &c in cells {
            self.cells[c] = self.cells[c].max(tat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_one_per_row_and_stable() {
        let sketch = Sketch::new(100);
        assert_eq!(sketch.bytes(), ROWS * 128 * CELL_BYTES);
        let key = Key::from("k");
        let cells = sketch.cells(PolicyName::new("ip"), &key);
        assert_eq!(cells, sketch.cells(PolicyName::new("ip"), &key));
        for (row, cell) in cells.iter().enumerate() {
            assert_eq!(cell / 128, row);
        }
    }

    #[test]
    fn a_raise_never_lowers_a_cell() {
        let mut sketch = Sketch::new(64);
        let cells = sketch.cells(PolicyName::new("ip"), &Key::from("k"));
        sketch.raise(&cells, 100);
        sketch.raise(&cells, 50);
        assert_eq!(sketch.state(&cells), Some(100));
        // Another key sharing one cell raises only that one.
        let mut other = cells;
        other[1..].iter_mut().for_each(|c| *c ^= 1);
        sketch.raise(&other, 500);
        assert_eq!(sketch.state(&cells), Some(100));
        assert_eq!(sketch.state(&other), Some(500));
    }
}
