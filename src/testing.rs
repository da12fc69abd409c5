//! What the property tests share (compiled for tests only): one fixed
//! configuration, byte-level mutations of valid inputs, and a measure of the
//! largest allocation a piece of code makes.
//!
//! Every property runs a bounded number of cases from a fixed seed, so
//! `cargo test` is deterministic and quick, and writes no failure files into
//! the repository: a failing case is printed, shrunk, by the test itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

/// The seed of every property (any fixed value would do).
const SEED: u64 = 0x00c0_ffee_5eed;

/// `cases` cases from the fixed seed, no failure persistence.
pub(crate) fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(SEED),
        failure_persistence: None,
        ..Config::default()
    }
}

/// One change to a byte string. Positions and lengths are fractions of
/// what there is room for (`u64::MAX` is all of it; see [`fit`]), so they
/// fit whatever length the input has by then.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// Removes a range.
    Delete(u64, u64),
    /// Copies a range to another position.
    Duplicate(u64, u64, u64),
    /// Exchanges two ranges that do not overlap (of any lengths).
    Swap(u64, u64, u64, u64),
    /// Inserts bytes (random ones, or a token of the format).
    Insert(u64, Vec<u8>),
    /// XORs one byte.
    Flip(u64, u8),
    /// Cuts the rest off.
    Truncate(u64),
}

/// `fraction / 2^64` of `room + 1`, rounded down: always in `0..=room`.
pub(crate) fn fit(fraction: u64, room: usize) -> usize {
    (((room as u128 + 1) * fraction as u128) >> 64) as usize
}

/// Up to `max` edits, inserting random bytes or one of `tokens`.
pub(crate) fn edits(
    tokens: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = Vec<Edit>> {
    let insert = prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..8),
        select(tokens).prop_map(|t| t.as_bytes().to_vec()),
    ];
    let edit = prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, n, to)| Edit::Duplicate(a, n, to)),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(a, b, na, nb)| Edit::Swap(a, b, na, nb)),
        (any::<u64>(), insert).prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<u64>(), 1..=255u8).prop_map(|(at, x)| Edit::Flip(at, x)),
        any::<u64>().prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 0..=max)
}

/// `bytes` with `edits` applied in turn.
pub(crate) fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    // A position in 0..=len, and a length that fits from there.
    let at = |f: &u64, len: usize| fit(*f, len);
    let span = at;
    for edit in edits {
        let len = bytes.len();
        match edit {
            Edit::Delete(a, n) => {
                let start = at(a, len);
                let end = start + span(n, len - start);
                bytes.drain(start..end);
            }
            Edit::Duplicate(a, n, to) => {
                let start = at(a, len);
                let copy = bytes[start..start + span(n, len - start)].to_vec();
                let to = at(to, len);
                bytes.splice(to..to, copy);
            }
            Edit::Swap(a, b, na, nb) => {
                let (p, q) = {
                    let (x, y) = (at(a, len), at(b, len));
                    (x.min(y), x.max(y))
                };
                let la = span(na, q - p);
                let lb = span(nb, len - q);
                let mut out = Vec::with_capacity(len);
                out.extend_from_slice(&bytes[..p]);
                out.extend_from_slice(&bytes[q..q + lb]);
                out.extend_from_slice(&bytes[p + la..q]);
                out.extend_from_slice(&bytes[p..p + la]);
                out.extend_from_slice(&bytes[q + lb..]);
                bytes = out;
            }
            Edit::Insert(a, insert) => {
                let to = at(a, len);
                bytes.splice(to..to, insert.iter().copied());
            }
            Edit::Flip(a, x) => {
                if len > 0 {
                    bytes[fit(*a, len - 1)] ^= x;
                }
            }
            Edit::Truncate(a) => bytes.truncate(at(a, len)),
        }
    }
    bytes
}

/// Texts made from `base` by up to `max` edits, as UTF-8 (a cut through a
/// character becomes U+FFFD).
pub(crate) fn mutated_text(
    base: impl Strategy<Value = String>,
    tokens: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = String> {
    (base, edits(tokens, max)).prop_map(|(base, edits)| {
        String::from_utf8_lossy(&apply(base.into_bytes(), &edits)).into_owned()
    })
}

/// Runs `f` and returns, with its result, the size of the largest single
/// allocation (or reallocation) it made on this thread.
pub(crate) fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let outer = LARGEST.with(|l| l.replace(Some(0)));
    let result = f();
    let largest = LARGEST.with(|l| l.replace(outer)).unwrap_or(0);
    if let Some(outer) = outer {
        LARGEST.with(|l| l.set(Some(outer.max(largest))));
    }
    (result, largest)
}

thread_local! {
    /// `Some` while [`largest_allocation`] measures this thread.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown are not measured.
    let _ = LARGEST.try_with(|l| {
        if let Some(largest) = l.get() {
            l.set(Some(largest.max(size)));
        }
    });
}

/// The system allocator, telling [`largest_allocation`] what it is asked
/// for. Only the test binary uses it.
struct Measured;

unsafe impl GlobalAlloc for Measured {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Measured = Measured;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_do_what_they_say() {
        const ALL: u64 = u64::MAX;
        const HALF: u64 = 1 << 63;
        let base = b"0123456789".to_vec();
        let run = |edits: &[Edit]| String::from_utf8(apply(base.clone(), edits)).unwrap();
        assert_eq!(fit(0, 10), 0);
        assert_eq!(fit(ALL, 10), 10);
        assert_eq!(fit(HALF, 9), 5);
        assert_eq!(run(&[]), "0123456789");
        assert_eq!(run(&[Edit::Truncate(HALF)]), "01234");
        assert_eq!(run(&[Edit::Delete(0, HALF)]), "56789");
        assert_eq!(run(&[Edit::Insert(ALL, b"ab".to_vec())]), "0123456789ab");
        assert_eq!(run(&[Edit::Flip(ALL, 1)]), "0123456788");
        assert_eq!(run(&[Edit::Duplicate(HALF, ALL, 0)]), "567890123456789");
        // Ranges [0, 2) and [5, 8) change places.
        assert_eq!(run(&[Edit::Swap(0, HALF, ALL / 3 + 1, HALF)]), "5672340189");
    }

    #[test]
    fn largest_allocation_sees_a_large_one() {
        let (v, largest) = largest_allocation(|| vec![0u8; 3 << 20]);
        assert_eq!(v.len(), 3 << 20);
        assert!(largest >= 3 << 20);
        let ((), small) = largest_allocation(|| ());
        assert_eq!(small, 0);
    }
}
