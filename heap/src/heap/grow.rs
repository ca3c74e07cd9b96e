//! Growing the heap in place (`docs/DESIGN.md`, "Heap growth").
//!
//! The heap region is the last region of its segment and its load-map
//! entry records a maximum length, whose address space the loader reserved
//! at load. A growth extends the segment file, maps the new pages in place
//! (nothing moves: every pointer handed out stays valid), and commits in one
//! flush transaction the new load map, the new heap length in the heap
//! header, and the new free space (the last free block extended, or a new
//! free block). The heap lock is held from the writing of the heap's part
//! to the commit, so no other commit changes the heap's tail meanwhile;
//! readers take no lock and go on.

use super::*;
use rvm_loader::RegionGrowth;
use std::sync::atomic::Ordering;

/// One gibibyte.
const GIB: u64 = 1 << 30;

/// The maximum size [`crate::HeapSpec::growable`] gives a heap: 64 GiB
/// (address space is reserved for it at load, without memory or swap).
pub const DEFAULT_MAX_HEAP_LEN: u64 = 64 * GIB;

/// How a heap grows when an allocation finds no room (set with
/// [`Heap::set_growth_policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrowthPolicy {
    /// Never by itself: an allocation that finds no room fails with
    /// [`HeapError::OutOfMemory`]; [`Heap::grow`] still grows the heap.
    Manual,
    /// By the heap's current size (doubling it), but by at least `min_step`
    /// and at most `max_step` bytes at a time, and always by enough for the
    /// request; never past the heap's maximum.
    Doubling {
        /// The smallest growth.
        min_step: u64,
        /// The largest growth (unless a single request needs more).
        max_step: u64,
    },
}

impl Default for GrowthPolicy {
    /// Doubling by 1 MiB to 1 GiB at a time.
    fn default() -> Self {
        GrowthPolicy::Doubling { min_step: 1 << 20, max_step: GIB }
    }
}

impl GrowthPolicy {
    /// The length to grow a heap of `len` bytes (maximum `max`) to, for a
    /// request that needs `need` free bytes; `None` if the policy does not
    /// grow or the heap cannot.
    pub fn target(&self, len: u64, need: u64, max: u64) -> Option<u64> {
        let GrowthPolicy::Doubling { min_step, max_step } = *self else { return None };
        let step = len.clamp(min_step, max_step.max(min_step)).max(need);
        let target = len.saturating_add(step).min(max);
        (target > len).then_some(target)
    }
}

/// Whether a core error says the disk is full.
fn disk_full(e: &rvm_core::Error) -> bool {
    matches!(e, rvm_core::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

/// Gives a growth's failure its typed meaning.
fn growth_error(e: HeapError, requested: u64) -> HeapError {
    let core = match &e {
        HeapError::Core(c) | HeapError::Loader(rvm_loader::LoaderError::Core(c)) => c,
        _ => return e,
    };
    if let rvm_core::Error::Map(rvm_core::MapError::BeyondReservation { addr, len, capacity }) = core {
        return HeapError::AddressRangeTaken { requested, addr: addr + capacity, len: len - capacity };
    }
    if disk_full(core) {
        let source = match e {
            HeapError::Core(c) | HeapError::Loader(rvm_loader::LoaderError::Core(c)) => c,
            _ => unreachable!("matched above"),
        };
        return HeapError::DiskFull { requested, source };
    }
    e
}

impl Heap {
    /// The heap region's size in bytes (it grows with [`Heap::grow`] and,
    /// by the [`GrowthPolicy`], when an allocation finds no room).
    pub fn heap_len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// The size the heap may grow to: the maximum length of the heap
    /// region in its segment's load map (its size, for a heap that cannot
    /// grow).
    pub fn max_len(&self) -> u64 {
        self.max.load(Ordering::Acquire).max(self.heap_len())
    }

    /// The growth policy (default [`GrowthPolicy::default`]).
    pub fn growth_policy(&self) -> GrowthPolicy {
        *self.policy.lock()
    }

    /// Sets the growth policy (for this load of the heap; it is not
    /// stored).
    pub fn set_growth_policy(&self, policy: GrowthPolicy) {
        *self.policy.lock() = policy;
    }

    /// Changes the heap's maximum size (recorded in its segment's load map,
    /// durable when this returns). It must not be below the heap's size,
    /// and the address range up to it must not overlap another region of
    /// the segment's map. In this process the heap keeps the address space
    /// it reserved at load: a larger maximum is reserved from the next load
    /// on (until then a growth past the old reservation reports
    /// [`HeapError::AddressRangeTaken`]). The calling thread must not have a
    /// transaction open on the instance.
    pub fn set_max_len(&self, max_len: u64) -> Result<()> {
        let growth = self.growth.as_ref().ok_or(HeapError::NotGrowable)?;
        let _serial = self.policy.lock();
        let max_len = self.max_as_set(growth, max_len);
        growth.set_max_len(max_len)?;
        self.max.store(max_len, Ordering::Release);
        Ok(())
    }

    /// Whether [`Heap::grow`] to `new_len` would pass the maximum once
    /// [`Heap::set_max_len`] set it to `max_len`: the error the growth
    /// would return ([`HeapError::GrowthLimit`], or
    /// [`HeapError::NotGrowable`]), with nothing changed. For a caller
    /// that changes both and wants a refused growth to leave the maximum
    /// as it was.
    pub fn check_growth(&self, new_len: u64, max_len: u64) -> Result<()> {
        let growth = self.growth.as_ref().ok_or(HeapError::NotGrowable)?;
        growth_limit(growth.page_size(), self.heap_len(), new_len, max_len)
    }

    /// [`Heap::check_growth`] for a heap segment that is not loaded, from
    /// its load map `map` (as recovery would leave it): `max_len` is the
    /// maximum to be set, `None` for the one the map records; a maximum the
    /// load map's rules refuse is an error too ([`HeapError::Loader`]). For
    /// a tool that refuses a growth before it opens the log.
    pub fn check_growth_of(map: &rvm_loader::LoadMap, new_len: u64, max_len: Option<u64>) -> Result<()> {
        let heap = map.get(crate::HEAP_REGION).ok_or(HeapError::NotGrowable)?;
        if let Some(max) = max_len {
            // The maximum as `set_max_len` would record it, against the
            // map's rules (the region limit, other regions' addresses).
            map.with_max_len(crate::HEAP_REGION, max_as_set_in(map.page_size(), heap.len, max))?;
        }
        growth_limit(map.page_size(), heap.len, new_len, max_len.unwrap_or(heap.span()))
    }

    /// The maximum [`Heap::set_max_len`] records for `max_len`: a page
    /// multiple, not below the heap's size.
    fn max_as_set(&self, growth: &RegionGrowth, max_len: u64) -> u64 {
        max_as_set_in(growth.page_size(), self.heap_len(), max_len)
    }

    /// Lets the heap grow through `growth` (its heap region's handle).
    pub(crate) fn set_growth(&mut self, growth: RegionGrowth) {
        self.max.store(growth.spec().map_or(0, |s| s.span()), Ordering::Release);
        self.growth = Some(growth);
    }

    /// Grows the heap to `new_len` bytes (rounded up to the load map's
    /// page size) and returns its new size; a heap that large already is
    /// left alone. Durable when this returns: the segment file, its load
    /// map, the heap region and the heap's free space all have the new
    /// size, and a crash at any point leaves the old size or the new one.
    /// No pointer moves, and other threads go on reading and running
    /// transactions meanwhile (commits wait for the final commit only).
    ///
    /// Errors leave the heap at its old size, usable:
    /// [`HeapError::GrowthLimit`] past [`Heap::max_len`],
    /// [`HeapError::DiskFull`], [`HeapError::AddressRangeTaken`],
    /// [`HeapError::NotGrowable`]. The calling thread must not have a
    /// transaction open on the instance.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use rvm_core::{create_log, Options, Rvm};
    /// use rvm_heap::{HeapSpec, PersistentHeap};
    /// create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let spec = HeapSpec::fixed(0x5b48_0000_0000, 1 << 20).with_max_len(1 << 30);
    /// let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &spec).unwrap();
    /// assert_eq!(heap.grow(4 << 20).unwrap(), 4 << 20);
    /// assert_eq!(heap.stats().heap_bytes, 4 << 20);
    /// assert!(heap.grow(2 << 30).is_err()); // past the maximum
    /// heap.check().unwrap();
    /// ```
    pub fn grow(&self, new_len: u64) -> Result<u64> {
        let _serial = self.policy.lock();
        self.grow_locked(new_len)
    }

    /// Called by an allocation that found no room after seeing the heap at
    /// `seen` bytes: grows the heap by the policy so that `need` more bytes
    /// fit. `Ok(true)` if the heap is larger now (by this call or another
    /// thread's), `Ok(false)` if it cannot or may not grow.
    pub(super) fn grow_for(&self, need: u64, seen: u64) -> Result<bool> {
        if self.growth.is_none() || self.heap_region.is_tracked() {
            return Ok(false);
        }
        let policy = self.policy.lock();
        if self.heap_len() != seen {
            return Ok(true);
        }
        let Some(target) = policy.target(seen, need, self.max_len()) else { return Ok(false) };
        // The allocating thread has a transaction open, and a thread runs
        // one transaction at a time: the growth commits from a helper.
        let grown = std::thread::scope(|s| s.spawn(|| self.grow_locked(target)).join());
        match grown {
            Ok(Ok(len)) => Ok(len > seen),
            Ok(Err(e)) => Err(e),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// [`Heap::grow`] with the policy lock held.
    fn grow_locked(&self, new_len: u64) -> Result<u64> {
        let growth = self.growth.as_ref().ok_or(HeapError::NotGrowable)?;
        if self.heap_region.is_tracked() {
            // Growth writes the header and the new free block with
            // declared ranges, which a tracked region refuses, and new pages
            // would be mapped writable (untracked).
            return Err(HeapError::TrackedGrowth);
        }
        let old = self.heap_len();
        let max = self.max_len();
        let requested = new_len;
        let new_len = grown_len(growth, new_len);
        if new_len <= old {
            return Ok(old);
        }
        if new_len > max {
            return Err(HeapError::GrowthLimit { requested, max });
        }
        let nonce = self.header.nonce;
        // The heap lock, taken inside the growth's transaction and held
        // until its commit, with the tail free block it extends (if any).
        let mut held = None;
        let grown = growth.grow(new_len, |tx| -> Result<()> {
            let st = self.state.lock();
            let header = StaticHeader { heap_len: new_len, ..self.header };
            raw::store(tx, self.static_region.addr(), &header.encode())?;
            let tail = st.committed_free.last_key_value().map(|(&f, &fs)| (f, fs)).filter(|&(f, fs)| f + fs == old);
            let at = tail.map_or(old, |(f, _)| f);
            let free = BlockHeader { size: new_len - at, allocated: false, slack: 0 };
            raw::store(tx, self.base() + at as usize, &free.encode(nonce, at))?;
            held = Some((st, tail));
            Ok(())
        });
        match grown {
            Err(e) => Err(growth_error(e, new_len)),
            Ok(false) => Ok(self.heap_len()),
            Ok(true) => {
                let Some((mut st, tail)) = held else {
                    unreachable!("a growth that committed ran its transaction body")
                };
                match tail {
                    Some((f, _)) => {
                        st.committed_free.insert(f, new_len - f);
                    }
                    None => {
                        st.committed_free.insert(old, new_len - old);
                    }
                }
                self.len.store(new_len, Ordering::Release);
                st.avail.merge(old, new_len - old);
                st.avail.set_bin_limit(super::bin_limit(new_len));
                Ok(new_len)
            }
        }
    }
}

/// The size a growth to `new_len` gives the heap: rounded up to the load
/// map's page size.
fn grown_len(growth: &RegionGrowth, new_len: u64) -> u64 {
    grown_len_in(growth.page_size(), new_len)
}

/// `new_len` rounded up as a growth rounds it, for load-map pages of
/// `page` bytes.
fn grown_len_in(page: u64, new_len: u64) -> u64 {
    new_len.checked_next_multiple_of(page.max(HDR)).unwrap_or(u64::MAX)
}

/// The maximum [`Heap::set_max_len`] records for `max_len`, for a heap of
/// `heap_len` bytes whose load map has `page`-byte pages.
fn max_as_set_in(page: u64, heap_len: u64, max_len: u64) -> u64 {
    max_len.checked_next_multiple_of(page).unwrap_or(u64::MAX).max(heap_len)
}

/// The limit [`Heap::grow`] keeps to, on numbers alone: a heap of
/// `heap_len` bytes whose load map has `page`-byte pages, grown to
/// `new_len` under the maximum `max_len` as [`Heap::set_max_len`] records
/// it (a page multiple, not below the heap's size).
fn growth_limit(page: u64, heap_len: u64, new_len: u64, max_len: u64) -> Result<()> {
    let max = max_as_set_in(page, heap_len, max_len);
    match grown_len_in(page, new_len) {
        len if len > max && len > heap_len => Err(HeapError::GrowthLimit { requested: new_len, max }),
        _ => Ok(()),
    }
}
