//! Shared machinery of the heap's crash-model, thread and soak tests.
//!
//! * [`Disk`]: a heap on the simulated disk ([`SimDisk`]), its regions
//!   mapped at a fixed base so absolute pointers survive a reload; created
//!   or reloaded with one call.
//! * [`Engine`]: runs a program of [`Step`]s on one thread against a model
//!   of the committed states. After every step it checks the heap
//!   (`Heap::check`, statistics, roots, every live block's contents and
//!   liveness) against the newest committed state; after every crash and
//!   reload it checks that what came back is one committed state the
//!   durability rules allow (every flush-committed transaction and all
//!   before it; a prefix of the rest; nothing uncommitted).
//! * [`worker`] and [`verify_threads`]: a per-thread workload that keeps its
//!   live blocks in a persistent directory block (rooted at `t{i}`) updated
//!   in the same transaction as the allocations and frees, and the check of
//!   what the heap holds afterwards (in memory, or after a crash and reload).
#![allow(dead_code)]

use rvm_core::testing::{CrashMode, SimDisk};
use rvm_core::{create_log_with, CommitMode, Options, RestoreMode, Rvm, Vfs};
use rvm_heap::{Heap, HeapError, HeapSpec, PersistentHeap};
use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::Path;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Heap region size.
pub const HEAP: u64 = 4 << 20;
/// Log size.
pub const LOG: u64 = 4 << 20;
/// The maximum size of the crash model's heap (it grows from [`HEAP`]).
pub const MAX_HEAP: u64 = 3 * HEAP;

/// A fresh fixed base for one test's heap (distinct per call, since the
/// tests of one binary run in parallel in one address space).
pub fn fresh_base() -> u64 {
    rvm_loader::testing::address_range().at(0)
}

/// Converts errors into messages with context.
pub trait Ctx<T> {
    /// The error as "`what`: error".
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// A pointer from an address the heap handed out (never zero).
pub fn nn(addr: usize) -> NonNull<u8> {
    NonNull::new(addr as *mut u8).expect("heap addresses are never null")
}

/// The splitmix64 finaliser.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The recognisable contents written for `key`: `len` bytes, eight at a
/// time from `mix(key, word index)`.
pub fn pattern(key: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(&mix(key ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// A size from 1 to `max`, log-uniform.
    pub fn size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let lo = 1usize << self.below(bits as u64);
        (lo + self.below(lo as u64) as usize).min(max)
    }
}

/// How a simulated crash treats unsynced writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// Every unsynced write is lost.
    Lose,
    /// A random subset survives; `tear` tears the last one.
    Keep {
        /// Picks the survivors.
        seed: u64,
        /// Tear each file's last unsynced write.
        tear: bool,
    },
}

impl Crash {
    /// The simulated disk's mode.
    pub fn mode(self) -> CrashMode {
        match self {
            Crash::Lose => CrashMode::LoseUnsynced,
            Crash::Keep { seed, tear } => CrashMode::KeepRandomSubset { seed, tear_last: tear },
        }
    }
}

/// A simulated disk holding one heap segment and its log; the heap is
/// created and loaded through the loader at a fixed base, so absolute
/// pointers survive a reload.
#[derive(Clone)]
pub struct Disk {
    /// The disk (crash it with [`SimDisk::crash`]).
    pub disk: SimDisk,
    vfs: Arc<dyn Vfs>,
    spec: HeapSpec,
    opts: Options,
}

impl Disk {
    /// A new, empty disk for a heap of `heap` bytes at a fresh base.
    /// `background` enables the core's background truncation thread (off for
    /// deterministic runs).
    pub fn new(heap: u64, background: bool) -> Disk {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let opts = Options { truncate_threshold: background.then_some(0.5), ..Options::default() };
        Disk { disk, vfs, spec: HeapSpec::fixed(fresh_base(), heap), opts }
    }

    /// [`Disk::new`] for a heap that can grow to `max` bytes.
    pub fn growable(heap: u64, max: u64, background: bool) -> Disk {
        let mut d = Disk::new(heap, background);
        d.spec = d.spec.with_max_len(max);
        d
    }

    /// The heap's spec.
    pub fn spec(&self) -> &HeapSpec {
        &self.spec
    }

    /// Creates (formats) or reopens (recovers and loads) the heap, each in
    /// one call through the loader.
    pub fn open(&self, create: bool) -> Result<(Rvm, PersistentHeap), String> {
        if create {
            create_log_with(self.vfs.as_ref(), Path::new("log"), LOG).ctx("create log")?;
        }
        let rvm = Rvm::open_with(self.vfs.clone(), Path::new("log"), self.opts.clone()).ctx("open log")?;
        let heap = if create {
            PersistentHeap::create(&rvm, "heap", &self.spec).ctx("create heap")?
        } else {
            PersistentHeap::open(&rvm, "heap").ctx("load heap")?
        };
        Ok((rvm, heap))
    }
}

impl Disk {
    /// Offset of the static region in the heap's segment file.
    pub fn static_at(&self) -> usize {
        self.spec.load_map().header_len() as usize
    }

    /// Offset of the heap region in the heap's segment file.
    pub fn heap_at(&self) -> usize {
        self.static_at() + rvm_core::page_size()
    }

    /// Changes the durable (and live) image of the heap's segment file with
    /// `f`, as media damage would (call it with the instance closed).
    pub fn damage(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut img = self.disk.durable_image("heap").expect("the heap segment exists");
        f(&mut img);
        self.disk.set_durable_image("heap", img);
    }
}

/// Reads `len` bytes at address `addr` of the heap region.
pub fn read_block(heap: &Heap, addr: usize, len: usize) -> Result<Vec<u8>, String> {
    let region = heap.heap_region();
    let mut buf = vec![0u8; len];
    let off = addr.checked_sub(region.addr()).ok_or_else(|| format!("{addr:#x} is below the heap"))?;
    // SAFETY: nothing stores into the region while the test reads it.
    unsafe { region.read(off, &mut buf) }.ok_or_else(|| format!("{addr:#x}+{len} is outside the heap"))?;
    Ok(buf)
}

/// Describes the first difference between `got` and `want`, if any.
pub fn diff(got: &[u8], want: &[u8]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got[i..].iter().zip(&want[i..]).filter(|(a, b)| a != b).count();
    Some(format!("byte {i} is {:#04x}, expected {:#04x} ({n} bytes differ from there)", got[i], want[i]))
}

// ---------------------------------------------------------------------------
// The single-threaded crash model.
// ---------------------------------------------------------------------------

/// An operation inside a transaction. Selectors (`u16`) pick among the
/// candidates at run time (modulo their number); an operation without
/// candidates is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `malloc` of `size` bytes aligned to `1 << align_log2`, then a write
    /// of a fresh pattern over the whole block.
    Malloc {
        /// Bytes.
        size: usize,
        /// Alignment exponent (0 to 12).
        align_log2: u8,
    },
    /// Frees a committed live block (deferred to commit).
    FreeCommitted(u16),
    /// Frees a block allocated earlier in this transaction.
    FreeOwn(u16),
    /// Frees again a committed block this transaction freed: must be a
    /// double free.
    FreeAgain(u16),
    /// Frees a pointer the heap did not hand out (inside a live block):
    /// must be an invalid pointer.
    FreeBogus(u16),
    /// Writes a pattern over part of a live block (`at` is the start as a
    /// fraction of the block, in 65536ths).
    Write {
        /// Block selector.
        target: u16,
        /// Start, in 65536ths of the block.
        at: u16,
        /// Bytes (clamped to the block).
        len: u32,
        /// Pattern seed.
        seed: u8,
    },
    /// Sets root `r{name % 4}` to a block (or removes it).
    SetRoot {
        /// Root name selector.
        name: u8,
        /// Block selector; `None` removes the root.
        target: Option<u16>,
        /// Type tag.
        tag: u8,
    },
}

/// How a transaction ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Commit with this mode.
    Commit(CommitMode),
    /// Explicit abort.
    Abort,
    /// Dropped without commit.
    Drop,
    /// The disk crashes while the transaction is open; then the heap is
    /// reloaded.
    CrashInside(Crash),
}

/// One step of a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A heap transaction.
    Tx {
        /// Restore mode (else no-restore; a no-restore transaction that
        /// does not commit only writes into its own new blocks).
        restore: bool,
        /// Its operations.
        ops: Vec<Op>,
        /// How it ends.
        end: End,
    },
    /// `rvm.flush()`.
    Flush,
    /// `rvm.truncate()`.
    Truncate,
    /// The generation checkpoint: if one is running, `checkpoint_finish`;
    /// else `steps == 0` runs a whole one (`rvm.checkpoint()`), and `steps >
    /// 0` starts one and sweeps that many pages, leaving the rest of the
    /// sweep to run under the following steps (transactions meet its write
    /// barrier; a crash can hit it mid-sweep).
    Checkpoint {
        /// Pages to sweep now (0: the whole checkpoint).
        steps: u8,
    },
    /// Crash the disk, then reopen and reload.
    Crash(Crash),
    /// Clean shutdown (close), then reopen and reload.
    Restart,
    /// `heap.preallocate(size, count)`.
    Preallocate {
        /// Request size.
        size: usize,
        /// Blocks.
        count: u8,
    },
    /// `heap.grow(heap_len + pages * 4 KiB)`; with `fail`, the `n`-th
    /// storage operation of the growth and every later one fail (the power
    /// goes at that point of the growth protocol), then the disk crashes
    /// and the heap is reloaded: it must come back at its old size or the
    /// new one, never between, with the heap check passing and every
    /// durable commit there.
    Grow {
        /// Pages to grow by (a growth past the maximum must fail with
        /// `GrowthLimit` and change nothing).
        pages: u16,
        /// The storage operation (counted from the growth's start) the
        /// power fails at, and how the crash treats unsynced writes.
        fail: Option<(u16, Crash)>,
    },
    /// Media damage to synced heap metadata: the log is truncated (all
    /// commits reach the segment and are durable) and the instance closed,
    /// then one bit of the heap's metadata in the segment flips (or the
    /// aligned 8 bytes around it are zeroed): the static header, the
    /// counters, the first root slots (used or not), or a live block's
    /// header or tail guard. The reopen must either fail with a typed
    /// corruption error (then the damage is repaired and the heap reopened)
    /// or return every commit intact.
    Damage {
        /// Picks the byte among the metadata bytes.
        sel: u32,
        /// The bit to flip.
        bit: u8,
        /// Zero 8 bytes instead of flipping a bit.
        zero: bool,
    },
}

#[derive(Clone, Debug)]
struct MBlock {
    size: usize,
    data: Rc<Vec<u8>>,
}

/// A committed state of the model.
#[derive(Clone, Debug, Default)]
struct Snap {
    /// Live blocks by user address.
    blocks: BTreeMap<usize, MBlock>,
    /// Roots: name → (address, size, tag).
    roots: BTreeMap<String, (usize, u64, u64)>,
    /// Committed allocations and frees over the heap's lifetime (the
    /// heap's persistent counters).
    allocations: u64,
    frees: u64,
}

/// What a run did (to see that the programs exercise what they should).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Steps run.
    pub steps: u64,
    /// Commits (all modes).
    pub commits: u64,
    /// Aborts (explicit, drop, crash inside).
    pub aborts: u64,
    /// Successful mallocs.
    pub mallocs: u64,
    /// Out-of-memory results.
    pub ooms: u64,
    /// Frees requested (all kinds that succeeded).
    pub frees: u64,
    /// Writes.
    pub writes: u64,
    /// Crash reloads.
    pub crashes: u64,
    /// Crash reloads that came back with fewer than all commits.
    pub lossy_reloads: u64,
    /// Committed transactions lost in those, in total.
    pub lost_commits: u64,
    /// Largest live block count seen.
    pub max_live: u64,
    /// Checkpoints started.
    pub checkpoints: u64,
    /// Media damage refused at load with a corruption error.
    pub damage_refused: u64,
    /// Growths that completed (explicit, or by an allocation).
    pub growths: u64,
    /// Crashes inside a growth that came back at the old size, and at the
    /// new size.
    pub growth_crashes_old: u64,
    /// See `growth_crashes_old`.
    pub growth_crashes_new: u64,
    /// Media damage that changed bytes and still loaded (it must have
    /// changed nothing that counts).
    pub damage_loaded: u64,
}

/// Runs programs against the heap and the model.
pub struct Engine {
    disk: Disk,
    rvm: Option<Rvm>,
    heap: Option<PersistentHeap>,
    /// Committed states: `hist[0]` is known durable, the last is the newest.
    hist: Vec<Snap>,
    serial: u64,
    /// A checkpoint sweep is running.
    sweeping: bool,
    /// The sizes the heap may come back with after a crash (old and new
    /// size of a growth a crash interrupted; else both the current size).
    lens: (u64, u64),
    /// What happened so far.
    pub tally: Tally,
}

impl Engine {
    /// A freshly formatted heap at a fresh base.
    pub fn new() -> Result<Engine, String> {
        let disk = Disk::growable(HEAP, MAX_HEAP, false);
        let (rvm, heap) = disk.open(true)?;
        let e = Engine {
            disk,
            rvm: Some(rvm),
            heap: Some(heap),
            hist: vec![Snap::default()],
            serial: 0,
            sweeping: false,
            lens: (HEAP, HEAP),
            tally: Tally::default(),
        };
        e.check_current()?;
        Ok(e)
    }

    /// Runs `steps`, stopping at the first discrepancy.
    pub fn run(&mut self, steps: &[Step]) -> Result<(), String> {
        for (i, s) in steps.iter().enumerate() {
            self.step(s).map_err(|e| format!("step {i} ({s:?}): {e}"))?;
        }
        Ok(())
    }

    fn heap(&self) -> &Heap {
        self.heap.as_deref().expect("heap loaded")
    }

    fn rvm(&self) -> &Rvm {
        self.rvm.as_ref().expect("instance open")
    }

    /// Everything committed so far is durable.
    fn mark_durable(&mut self) {
        let n = self.hist.len();
        self.hist.drain(..n - 1);
    }

    /// Runs one step and checks the heap afterwards.
    pub fn step(&mut self, step: &Step) -> Result<(), String> {
        self.tally.steps += 1;
        match step {
            Step::Tx { restore, ops, end } => self.tx(*restore, ops, *end)?,
            Step::Flush => {
                self.rvm().flush().ctx("flush")?;
                self.mark_durable();
            }
            Step::Truncate => {
                self.rvm().truncate().ctx("truncate")?;
                self.mark_durable();
            }
            // Not a durability point for the model (it only frees the log of
            // what it wrote); a crash afterwards may still come back with any
            // allowed state, and must come back with one.
            Step::Checkpoint { steps } => {
                let rvm = self.rvm.as_ref().expect("instance open");
                if self.sweeping {
                    rvm.checkpoint_finish().ctx("checkpoint_finish")?;
                    self.sweeping = false;
                } else if *steps == 0 {
                    rvm.checkpoint().ctx("checkpoint")?;
                    self.tally.checkpoints += 1;
                } else if rvm.checkpoint_start().ctx("checkpoint_start")? {
                    rvm.checkpoint_step(*steps as usize).ctx("checkpoint_step")?;
                    self.sweeping = true;
                    self.tally.checkpoints += 1;
                }
            }
            Step::Crash(c) => self.reload(Some(*c))?,
            Step::Restart => self.reload(None)?,
            Step::Preallocate { size, count } => {
                self.heap().preallocate(*size, *count as usize);
            }
            Step::Damage { sel, bit, zero } => self.damage(*sel, *bit, *zero)?,
            Step::Grow { pages, fail } => self.grow(*pages, *fail)?,
        }
        self.check_current()
    }

    /// Storage operations `f` issues on the disk.
    pub fn op_count_of(&mut self, f: impl FnOnce(&mut Engine)) -> u64 {
        let before = self.disk.disk.op_count();
        f(self);
        self.disk.disk.op_count() - before
    }

    /// The heap's size.
    pub fn heap_len(&self) -> u64 {
        self.heap().heap_len()
    }

    /// A growth that returned Ok committed with flush: it and every commit
    /// before it are durable.
    fn grew(&mut self, len: u64) {
        self.mark_durable();
        self.lens = (len, len);
        self.tally.growths += 1;
    }

    /// [`Step::Grow`].
    fn grow(&mut self, pages: u16, fail: Option<(u16, Crash)>) -> Result<(), String> {
        let old = self.heap().heap_len();
        let target = old + (u64::from(pages) + 1) * 4096;
        if let Some((n, _)) = fail {
            self.disk.disk.fail_after(u64::from(n));
        }
        let r = self.heap().grow(target);
        self.disk.disk.clear_faults();
        match (r, fail) {
            (Ok(len), _) => {
                ensure!(len == target, "grow({target}) gave {len}");
                ensure!(self.heap().heap_len() == len, "heap_len {} after growing to {len}", self.heap().heap_len());
                self.grew(len);
            }
            (Err(HeapError::GrowthLimit { max, .. }), _) if target > MAX_HEAP => {
                ensure!(max == MAX_HEAP, "GrowthLimit names {max} as the maximum");
                ensure!(self.heap().heap_len() == old, "a refused growth changed the size");
            }
            (Err(e), None) => return Err(format!("grow to {target}: {e}")),
            (Err(_), Some(_)) => {
                // The power failed inside the growth: old or new size.
                self.lens = (old, target);
            }
        }
        if let Some((_, c)) = fail {
            self.reload(Some(c))?;
            let len = self.heap().heap_len();
            if len == old && target > old {
                self.tally.growth_crashes_old += 1;
            } else {
                self.tally.growth_crashes_new += 1;
            }
        }
        Ok(())
    }

    /// [`Step::Damage`].
    fn damage(&mut self, sel: u32, bit: u8, zero: bool) -> Result<(), String> {
        self.sweeping = false;
        let heap = self.heap.take().expect("heap loaded");
        let (heap_addr, slots) = (heap.heap_region().addr(), heap.root_slots());
        heap.close().ctx("close before damage")?;
        let rvm = self.rvm.take().expect("instance open");
        rvm.truncate().ctx("truncate before damage")?;
        rvm.close().ctx("close before damage")?;
        self.mark_durable();
        // The metadata bytes, as ranges of segment offsets.
        let (s, h) = (self.disk.static_at(), self.disk.heap_at());
        let mut ranges = vec![(s, 128 + 64 * slots.min(6))];
        for (&a, b) in &self.hist[0].blocks {
            let off = h + (a - 16 - heap_addr);
            ranges.push((off, 16));
            ranges.push((off + 16 + b.size, 8));
        }
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let mut k = sel as usize % total;
        let at = ranges
            .iter()
            .find_map(|&(start, len)| {
                if k < len {
                    Some(start + k)
                } else {
                    k -= len;
                    None
                }
            })
            .expect("k < total");
        let pristine = self.disk.disk.durable_image("heap").expect("the heap segment");
        self.disk.damage(|img| {
            if zero {
                img[at & !7..(at & !7) + 8].fill(0);
            } else {
                img[at] ^= 1 << (bit % 8);
            }
        });
        let changed = self.disk.disk.durable_image("heap").expect("the heap segment") != pristine;
        let rvm = Rvm::open_with(self.disk.vfs.clone(), Path::new("log"), self.disk.opts.clone()).ctx("open log")?;
        match PersistentHeap::open(&rvm, "heap") {
            Ok(heap) => {
                // Ok means everything: the heap is exactly the newest state.
                self.rvm = Some(rvm);
                self.heap = Some(heap);
                self.check_current().map_err(|e| {
                    format!("damage at segment offset {at:#x} (changed: {changed}) loaded a different heap: {e}")
                })?;
                if changed {
                    self.tally.damage_loaded += 1;
                }
            }
            Err(e) => {
                ensure!(changed, "an undamaged heap failed to load: {e}");
                ensure!(
                    e.is_corruption(),
                    "damage at segment offset {at:#x} gave an error that is not a corruption: {e}"
                );
                drop(rvm);
                self.tally.damage_refused += 1;
                // The user restores from a copy: the heap comes back whole.
                self.disk.disk.set_durable_image("heap", pristine);
                let (rvm, heap) = self.disk.open(false)?;
                self.rvm = Some(rvm);
                self.heap = Some(heap);
            }
        }
        Ok(())
    }

    fn tx(&mut self, restore: bool, ops: &[Op], end: End) -> Result<(), String> {
        let heap = self.heap.as_ref().expect("heap loaded");
        let cur = self.hist.last().expect("a committed state");
        let mut work = cur.clone();
        let mut pending: BTreeSet<usize> = BTreeSet::new();
        let mut own: BTreeMap<usize, MBlock> = BTreeMap::new();
        let commits = matches!(end, End::Commit(_));
        let mode = if restore { RestoreMode::Restore } else { RestoreMode::NoRestore };
        let mut grown = None;
        let mut tx = heap.begin(mode).ctx("begin")?;
        for (i, op) in ops.iter().enumerate() {
            let at = |e: String| format!("op {i} ({op:?}): {e}");
            match *op {
                Op::Malloc { size, align_log2 } => {
                    let align = 1usize << align_log2.min(12);
                    let layout = Layout::from_size_align(size, align).expect("valid layout");
                    let before = heap.heap_len();
                    let got = tx.malloc(layout);
                    if heap.heap_len() != before {
                        // The allocation grew the heap: a flush commit.
                        ensure!(heap.heap_len() > before, "the heap shrank");
                        grown = Some(heap.heap_len());
                    }
                    let region = (heap.heap_region().addr(), heap.heap_len() as usize);
                    match got {
                        Ok(p) => {
                            let addr = p.as_ptr() as usize;
                            ensure!(
                                addr.is_multiple_of(align),
                                "{}",
                                at(format!("{addr:#x} is not aligned to {align}"))
                            );
                            ensure!(
                                addr >= region.0 + 16 && addr + size + 8 <= region.0 + region.1,
                                "{}",
                                at(format!("{addr:#x}+{size} is outside the heap region"))
                            );
                            let (lo, hi) = (addr - 16, addr + size + 8);
                            for (&b, mb) in work.blocks.iter().chain(own.iter()) {
                                ensure!(
                                    hi <= b - 16 || b + mb.size + 8 <= lo,
                                    "{}",
                                    at(format!("new block {addr:#x}+{size} overlaps live block {b:#x}+{}", mb.size))
                                );
                            }
                            self.serial += 1;
                            let data = pattern(self.serial << 8, size);
                            // SAFETY: the block was just handed to this
                            // transaction; this test is its only user.
                            unsafe { tx.tx().modify_bytes(addr, &data) }.ctx("fill new block").map_err(at)?;
                            own.insert(addr, MBlock { size, data: Rc::new(data) });
                            self.tally.mallocs += 1;
                        }
                        Err(HeapError::OutOfMemory { largest, .. }) => {
                            let need = rvm_heap::layout::block_size_for(size).unwrap_or(u64::MAX);
                            ensure!(
                                largest < need + 2 * align as u64 + 64,
                                "{}",
                                at(format!("out of memory although the largest free block is {largest} bytes"))
                            );
                            self.tally.ooms += 1;
                        }
                        Err(e) => return Err(at(format!("malloc: {e}"))),
                    }
                }
                Op::FreeCommitted(sel) => {
                    let cands: Vec<usize> = work.blocks.keys().copied().filter(|a| !pending.contains(a)).collect();
                    if let Some(&a) = pick(&cands, sel) {
                        tx.free(nn(a)).ctx("free of a committed block").map_err(at)?;
                        pending.insert(a);
                        self.tally.frees += 1;
                    }
                }
                Op::FreeOwn(sel) => {
                    let cands: Vec<usize> = own.keys().copied().collect();
                    if let Some(&a) = pick(&cands, sel) {
                        tx.free(nn(a)).ctx("free of an own block").map_err(at)?;
                        own.remove(&a);
                        self.tally.frees += 1;
                    }
                }
                Op::FreeAgain(sel) => {
                    let cands: Vec<usize> = pending.iter().copied().collect();
                    if let Some(&a) = pick(&cands, sel) {
                        match tx.free(nn(a)) {
                            Err(HeapError::DoubleFree { .. }) => {}
                            other => return Err(at(format!("second free gave {other:?}, not a double free"))),
                        }
                    }
                }
                Op::FreeBogus(sel) => {
                    let cands: Vec<(usize, usize)> = work.blocks.iter().map(|(&a, b)| (a, b.size)).collect();
                    if let Some(&(a, size)) = pick(&cands, sel) {
                        let bogus = if size >= 48 && sel % 2 == 0 { a + 16 } else { a + 1 };
                        match tx.free(nn(bogus)) {
                            Err(HeapError::InvalidPointer { .. }) => {}
                            other => {
                                return Err(at(format!("free of {bogus:#x} gave {other:?}, not an invalid pointer")))
                            }
                        }
                    }
                }
                Op::Write { target, at: start, len, seed } => {
                    // A no-restore transaction that will not commit must
                    // not leave uncommitted bytes in committed blocks.
                    let mut cands: Vec<(usize, bool)> = own.keys().map(|&a| (a, true)).collect();
                    if restore || commits {
                        cands.extend(work.blocks.keys().map(|&a| (a, false)));
                    }
                    if let Some(&(a, is_own)) = pick(&cands, target) {
                        let block = if is_own { own.get_mut(&a) } else { work.blocks.get_mut(&a) }.expect("candidate");
                        let from = start as usize * block.size / 65536;
                        let n = (len as usize).clamp(1, block.size - from);
                        self.serial += 1;
                        let data = pattern(self.serial << 8 | seed as u64, n);
                        // SAFETY: the block is live and this single-threaded
                        // test's transaction is the only one using it.
                        unsafe { tx.tx().modify_bytes(a + from, &data) }.ctx("write").map_err(at)?;
                        Rc::make_mut(&mut block.data)[from..from + n].copy_from_slice(&data);
                        self.tally.writes += 1;
                    }
                }
                Op::SetRoot { name, target, tag } => {
                    let name = format!("r{}", name % 4);
                    let cands: Vec<(usize, usize)> = work
                        .blocks
                        .iter()
                        .filter(|(a, _)| !pending.contains(a))
                        .chain(own.iter())
                        .map(|(&a, b)| (a, b.size))
                        .collect();
                    match target.and_then(|t| pick(&cands, t)) {
                        Some(&(a, size)) => {
                            tx.set_root(&name, Some((nn(a), size as u64, tag as u64))).ctx("set root").map_err(at)?;
                            work.roots.insert(name, (a, size as u64, tag as u64));
                        }
                        None => {
                            tx.set_root(&name, None).ctx("remove root").map_err(at)?;
                            work.roots.remove(&name);
                        }
                    }
                }
            }
        }
        if let Some(len) = grown {
            // Every commit before the growth's is durable (the transaction
            // itself is not committed yet).
            let n = self.hist.len();
            self.hist.drain(..n - 1);
            self.lens = (len, len);
            self.tally.growths += 1;
        }
        match end {
            End::Commit(m) => {
                tx.commit(m).ctx("commit")?;
                for a in &pending {
                    work.blocks.remove(a);
                }
                work.allocations += own.len() as u64;
                work.frees += pending.len() as u64;
                work.blocks.extend(own);
                self.tally.max_live = self.tally.max_live.max(work.blocks.len() as u64);
                self.tally.commits += 1;
                self.hist.push(work);
                if m == CommitMode::Flush {
                    self.mark_durable();
                }
            }
            End::Abort => {
                tx.abort();
                self.tally.aborts += 1;
            }
            End::Drop => {
                drop(tx);
                self.tally.aborts += 1;
            }
            End::CrashInside(c) => {
                self.disk.disk.crash(c.mode());
                drop(tx);
                self.tally.aborts += 1;
                self.reload(Some(c))?;
            }
        }
        Ok(())
    }

    /// Shuts down (crashing the disk first, if `crash`), reopens, and
    /// checks the reloaded heap is one of the allowed committed states.
    fn reload(&mut self, crash: Option<Crash>) -> Result<(), String> {
        self.sweeping = false;
        drop(self.heap.take());
        let rvm = self.rvm.take().expect("instance open");
        match crash {
            // Crash before the last handle goes: dropping the instance
            // flushes, which must find the devices dead.
            Some(c) => {
                self.disk.disk.crash(c.mode());
                drop(rvm);
            }
            None => rvm.close().ctx("close")?,
        }
        let (rvm, heap) = self.disk.open(false)?;
        heap.check().ctx("heap check after reload")?;
        let len = heap.heap_len();
        ensure!(
            len == self.lens.0 || len == self.lens.1,
            "the heap came back with {len} bytes; only {} or {} are allowed",
            self.lens.0,
            self.lens.1
        );
        ensure!(
            heap.heap_region().len() as u64 == len,
            "the loader mapped {} bytes of a {len}-byte heap",
            heap.heap_region().len()
        );
        self.lens = (len, len);
        let n = self.hist.len();
        let lowest = if crash.is_some() { 0 } else { n - 1 };
        let mut why = Vec::new();
        let mut found = None;
        for k in (lowest..n).rev() {
            match matches(&heap, &self.hist[k]) {
                Ok(()) => {
                    found = Some(k);
                    break;
                }
                Err(e) => why.push(format!("  {} commits lost: {e}", n - 1 - k)),
            }
        }
        let Some(k) = found else {
            return Err(format!(
                "the reloaded heap matches no allowed committed state ({} candidates, newest first):\n{}",
                n - lowest,
                why.join("\n")
            ));
        };
        if crash.is_some() {
            self.tally.crashes += 1;
            if k + 1 < n {
                self.tally.lossy_reloads += 1;
                self.tally.lost_commits += (n - 1 - k) as u64;
            }
        }
        let snap = self.hist.swap_remove(k);
        self.hist = vec![snap];
        self.rvm = Some(rvm);
        self.heap = Some(heap);
        Ok(())
    }

    /// Checks the heap against the newest committed state.
    pub fn check_current(&self) -> Result<(), String> {
        let heap = self.heap();
        let snap = self.hist.last().expect("a committed state");
        let report = heap.check().ctx("heap check")?;
        let st = heap.stats();
        let live = snap.blocks.len() as u64;
        ensure!(report.allocated == live, "check found {} allocated blocks, model has {live}", report.allocated);
        ensure!(st.live_blocks == live, "stats say {} live blocks, model has {live}", st.live_blocks);
        ensure!(
            st.allocations == snap.allocations && st.frees == snap.frees,
            "stats count {} allocations and {} frees, model {} and {}",
            st.allocations,
            st.frees,
            snap.allocations,
            snap.frees
        );
        ensure!(
            st.heap_bytes == heap.heap_region().len() as u64,
            "heap_bytes {} is not the region size",
            st.heap_bytes
        );
        ensure!(
            st.free_bytes + st.bytes_in_use == st.heap_bytes,
            "free {} + in use {} != heap {} with no transaction open",
            st.free_bytes,
            st.bytes_in_use,
            st.heap_bytes
        );
        ensure!(
            report.free_bytes == st.free_bytes,
            "check found {} free bytes, stats {}",
            report.free_bytes,
            st.free_bytes
        );
        ensure!(st.largest_free <= st.free_bytes, "largest free {} > free bytes {}", st.largest_free, st.free_bytes);
        ensure!(
            st.live_per_class.iter().sum::<u64>() == live,
            "per-class counts {:?} do not sum to {live}",
            st.live_per_class
        );
        matches(heap, snap)
    }
}

fn pick<T>(cands: &[T], sel: u16) -> Option<&T> {
    (!cands.is_empty()).then(|| &cands[sel as usize % cands.len()])
}

/// Whether the heap holds exactly the committed state `snap`: live block
/// count, roots, every block's contents, and every block live (a free of
/// it is accepted, in a transaction that is then dropped).
fn matches(heap: &Heap, snap: &Snap) -> Result<(), String> {
    let st = heap.stats();
    ensure!(st.live_blocks == snap.blocks.len() as u64, "{} live blocks, model {}", st.live_blocks, snap.blocks.len());
    ensure!(
        (st.allocations, st.frees) == (snap.allocations, snap.frees),
        "counters say {} allocations and {} frees, model {} and {}",
        st.allocations,
        st.frees,
        snap.allocations,
        snap.frees
    );
    let roots: BTreeMap<String, (usize, u64, u64)> =
        heap.roots().into_iter().map(|r| (r.name, (r.ptr.as_ptr() as usize, r.size, r.type_tag))).collect();
    ensure!(roots == snap.roots, "roots {roots:x?}, model {:x?}", snap.roots);
    for (&a, b) in &snap.blocks {
        let got = read_block(heap, a, b.size)?;
        if let Some(d) = diff(&got, &b.data) {
            return Err(format!("block {a:#x} ({} bytes): {d}", b.size));
        }
    }
    let mut tx = heap.begin(RestoreMode::Restore).ctx("begin liveness probe")?;
    for &a in snap.blocks.keys() {
        tx.free(nn(a)).map_err(|e| format!("block {a:#x} is not live: {e}"))?;
    }
    drop(tx);
    Ok(())
}

/// A random program of `n` steps (for the soak; the proptest has its own
/// strategies with the same shape).
pub fn random_program(rng: &mut Rng, n: usize, crash_weight: u64) -> Vec<Step> {
    (0..n).map(|_| random_step(rng, crash_weight)).collect()
}

fn random_crash(rng: &mut Rng) -> Crash {
    match rng.below(6) {
        0 | 1 => Crash::Lose,
        2 => Crash::Keep { seed: rng.next(), tear: false },
        _ => Crash::Keep { seed: rng.next(), tear: true },
    }
}

fn random_step(rng: &mut Rng, crash_weight: u64) -> Step {
    let r = rng.below(21 + crash_weight);
    match r {
        0 => Step::Flush,
        1 => Step::Truncate,
        2 => Step::Restart,
        3 => Step::Preallocate { size: rng.size(512), count: rng.below(16) as u8 },
        20 if rng.chance(1, 3) => {
            Step::Damage { sel: rng.next() as u32, bit: rng.below(8) as u8, zero: rng.chance(1, 4) }
        }
        20 => Step::Checkpoint { steps: if rng.chance(1, 2) { 0 } else { 1 + rng.below(8) as u8 } },
        4..=19 => {
            let ops = (0..rng.below(9)).map(|_| random_op(rng)).collect();
            let end = match rng.below(16) {
                0..=3 => End::Commit(CommitMode::Flush),
                4..=10 => End::Commit(CommitMode::NoFlush),
                11 | 12 => End::Abort,
                13 | 14 => End::Drop,
                _ if crash_weight > 0 => End::CrashInside(random_crash(rng)),
                _ => End::Abort,
            };
            Step::Tx { restore: rng.chance(3, 4), ops, end }
        }
        _ => Step::Crash(random_crash(rng)),
    }
}

fn random_op(rng: &mut Rng) -> Op {
    let sel = rng.next() as u16;
    match rng.below(16) {
        0..=5 => Op::Malloc {
            size: rng.size(65536),
            align_log2: if rng.chance(2, 3) { rng.below(5) as u8 } else { 5 + rng.below(8) as u8 },
        },
        6..=8 => Op::FreeCommitted(sel),
        9 => Op::FreeOwn(sel),
        10 => Op::FreeAgain(sel),
        11 => Op::FreeBogus(sel),
        12..=14 => {
            Op::Write { target: sel, at: rng.next() as u16, len: rng.size(65536) as u32, seed: rng.next() as u8 }
        }
        _ => Op::SetRoot {
            name: rng.next() as u8,
            target: rng.chance(4, 5).then(|| rng.next() as u16),
            tag: rng.next() as u8,
        },
    }
}

// ---------------------------------------------------------------------------
// Threads with persistent per-thread directories.
// ---------------------------------------------------------------------------

/// A live block of a thread, as its directory records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// User address.
    pub ptr: u64,
    /// Bytes.
    pub size: u64,
    /// Pattern key of its contents.
    pub key: u64,
}

/// Entries a directory holds.
pub const DIR_CAP: usize = 24;
/// Bytes of a directory block: a count, then (ptr, size, key) per entry.
pub const DIR_BYTES: usize = 8 + DIR_CAP * 24;
/// Type tag of directory roots.
pub const DIR_TAG: u64 = 0xd1d1;

/// The root naming thread `i`'s directory.
pub fn dir_name(i: usize) -> String {
    format!("t{i}")
}

fn encode_dir(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + entries.len() * 24);
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.ptr.to_le_bytes());
        b.extend_from_slice(&e.size.to_le_bytes());
        b.extend_from_slice(&e.key.to_le_bytes());
    }
    b
}

/// Creates (or finds) the directories of threads `0..n`; returns their
/// addresses.
pub fn make_dirs(heap: &Heap, n: usize) -> Result<Vec<usize>, String> {
    (0..n)
        .map(|i| {
            heap.root_or_create(&dir_name(i), DIR_BYTES, 8, DIR_TAG, |_| {})
                .map(|r| r.ptr.as_ptr() as usize)
                .ctx("create directory")
        })
        .collect()
}

/// Reads thread `i`'s directory through its root.
pub fn read_dir(heap: &Heap, i: usize) -> Result<(usize, Vec<Entry>), String> {
    let root = heap.root(&dir_name(i)).ok_or_else(|| format!("root {} is missing", dir_name(i)))?;
    ensure!(
        root.size == DIR_BYTES as u64 && root.type_tag == DIR_TAG,
        "root {} has the wrong size or tag",
        dir_name(i)
    );
    let addr = root.ptr.as_ptr() as usize;
    let b = read_block(heap, addr, DIR_BYTES)?;
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let n = word(0) as usize;
    ensure!(n <= DIR_CAP, "directory {} holds {n} entries", dir_name(i));
    let entries =
        (0..n).map(|j| Entry { ptr: word(8 + j * 24), size: word(16 + j * 24), key: word(24 + j * 24) }).collect();
    Ok((addr, entries))
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerCfg {
    /// Thread number (its directory is `t{id}`).
    pub id: usize,
    /// Random seed.
    pub seed: u64,
    /// Stop after this many transactions.
    pub iters: u64,
    /// Largest block.
    pub max_size: usize,
    /// Also allocate, write and free a scratch block inside some
    /// transactions (a free of a block allocated in the same transaction).
    pub scratch: bool,
}

/// What a worker did.
#[derive(Clone, Debug)]
pub struct ThreadLog {
    /// Thread number.
    pub id: usize,
    /// Directory states: `history[0]` is durable, each later one is a
    /// transaction that committed (the last may be one whose commit
    /// reported an error, which may or may not have taken effect).
    pub history: Vec<Vec<Entry>>,
    /// Whether the last history entry is such an uncertain commit.
    pub uncertain_last: bool,
    /// The error that stopped it (I/O or a stopped instance: expected after
    /// a crash).
    pub error: Option<String>,
    /// An error that is a test failure in any case.
    pub fatal: Option<String>,
    /// Transactions committed and ended without commit.
    pub commits: u64,
    /// Transactions aborted or dropped.
    pub aborts: u64,
}

fn expected_after_crash(e: &HeapError) -> bool {
    matches!(e, HeapError::Core(rvm_core::Error::Io { .. } | rvm_core::Error::Poisoned { .. }))
}

/// A thread's workload: transactions that allocate a few blocks (writing a
/// thread-specific pattern), sometimes free some of the thread's own
/// committed blocks, record the live set in the thread's directory, and
/// commit (either mode) or abort (explicitly or by drop). Stops on `stop`,
/// after `cfg.iters` transactions, or at the first error.
pub fn worker(heap: &Heap, cfg: &WorkerCfg, dir: usize, initial: Vec<Entry>, stop: &AtomicBool) -> ThreadLog {
    let mut log = ThreadLog {
        id: cfg.id,
        history: vec![initial.clone()],
        uncertain_last: false,
        error: None,
        fatal: None,
        commits: 0,
        aborts: 0,
    };
    let mut rng = Rng(cfg.seed);
    let mut live = initial;
    let mut serial = 0u64;
    for _ in 0..cfg.iters {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let end = rng.below(20);
        let commit = match end {
            0..=4 => Some(CommitMode::Flush),
            5..=14 => Some(CommitMode::NoFlush),
            _ => None,
        };
        // No-restore only for transactions that commit (an abort would
        // leave the directory's uncommitted bytes in memory).
        let mode = if commit.is_some() && rng.chance(1, 3) { RestoreMode::NoRestore } else { RestoreMode::Restore };
        let mut tx = match heap.begin(mode) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("thread {}: begin: {e}", cfg.id);
                if expected_after_crash(&e) {
                    log.error = Some(msg);
                } else {
                    log.fatal = Some(msg);
                }
                break;
            }
        };
        let r: Result<Vec<Entry>, String> = (|| {
            let mut next = live.clone();
            // Free some of this thread's committed blocks.
            let frees = if next.len() + 4 > DIR_CAP { 1 + rng.below(4) } else { rng.below(3) };
            for _ in 0..frees {
                if next.is_empty() {
                    break;
                }
                let e = next.swap_remove(rng.below(next.len() as u64) as usize);
                tx.free(nn(e.ptr as usize)).ctx("free of an own committed block")?;
            }
            for _ in 0..rng.below(4) {
                if next.len() >= DIR_CAP {
                    break;
                }
                let size = if rng.chance(1, 3) { 1 + rng.below(96) as usize } else { rng.size(cfg.max_size) };
                let align = 1usize << if rng.chance(3, 4) { rng.below(5) } else { rng.below(13) };
                let p = match tx.malloc(Layout::from_size_align(size, align).expect("valid layout")) {
                    Ok(p) => p.as_ptr() as usize,
                    Err(HeapError::OutOfMemory { .. }) => continue,
                    Err(e) => return Err(format!("malloc: {e}")),
                };
                ensure!(p % align == 0, "{p:#x} not aligned to {align}");
                serial += 1;
                let key = (cfg.id as u64) << 56 | serial;
                // SAFETY: the block was just handed to this transaction and
                // this thread is its only user.
                unsafe { tx.tx().modify_bytes(p, &pattern(key, size)) }.ctx("fill")?;
                next.push(Entry { ptr: p as u64, size: size as u64, key });
            }
            if cfg.scratch && rng.chance(1, 3) {
                // Small sizes, so other threads often ask for the same size
                // class: the block must not reach them before this
                // transaction ends (its abort would restore the old bytes
                // over theirs).
                let size = 1 + rng.below(96) as usize;
                if let Ok(p) = tx.malloc(Layout::from_size_align(size, 16).expect("valid layout")) {
                    // SAFETY: as above, the block is this transaction's.
                    unsafe { tx.tx().modify_bytes(p.as_ptr() as usize, &pattern(u64::MAX - serial, size)) }
                        .ctx("scratch")?;
                    tx.free(p).ctx("free of a scratch block")?;
                    // Widen the window in which another thread could get it.
                    std::thread::yield_now();
                }
            }
            // SAFETY: the directory belongs to this thread alone.
            unsafe { tx.tx().modify_bytes(dir, &encode_dir(&next)) }.ctx("directory")?;
            Ok(next)
        })();
        let next = match r {
            Ok(n) => n,
            Err(e) => {
                log.fatal = Some(format!("thread {}: {e}", cfg.id));
                break;
            }
        };
        match commit {
            Some(m) => match tx.commit(m) {
                Ok(()) => {
                    log.commits += 1;
                    live = next.clone();
                    if m == CommitMode::Flush {
                        log.history.clear();
                    }
                    log.history.push(next);
                }
                Err(e) => {
                    let msg = format!("thread {}: commit: {e}", cfg.id);
                    if expected_after_crash(&e) {
                        log.error = Some(msg);
                    } else {
                        log.fatal = Some(msg);
                    }
                    // The core may have committed it (a flush failing after
                    // the commit): it may or may not be there.
                    log.history.push(next);
                    log.uncertain_last = true;
                    break;
                }
            },
            None if end.is_multiple_of(2) => {
                tx.abort();
                log.aborts += 1;
            }
            None => {
                drop(tx);
                log.aborts += 1;
            }
        }
    }
    log
}

/// Checks a heap against the threads' logs: the heap check passes; each
/// thread's directory equals one of its allowed states (its newest, if
/// `exact`; else any from its last flush commit on); each listed block is
/// live with its pattern intact; and the heap's live blocks are exactly the
/// directories and their entries. Returns each thread's state found.
pub fn verify_threads(heap: &Heap, logs: &[ThreadLog], exact: bool) -> Result<Vec<Vec<Entry>>, String> {
    heap.check().ctx("heap check")?;
    let mut found = Vec::new();
    let mut total = logs.len() as u64;
    let mut tx = heap.begin(RestoreMode::Restore).ctx("begin liveness probe")?;
    for log in logs {
        let (_, entries) = read_dir(heap, log.id)?;
        let n = log.history.len();
        let ok =
            if exact && !log.uncertain_last { log.history[n - 1] == entries } else { log.history.contains(&entries) };
        ensure!(
            ok,
            "thread {}: directory {:x?} is none of the {} allowed states (newest {:x?})",
            log.id,
            entries,
            n,
            log.history[n - 1]
        );
        for e in &entries {
            let got = read_block(heap, e.ptr as usize, e.size as usize)?;
            if let Some(d) = diff(&got, &pattern(e.key, e.size as usize)) {
                return Err(format!("thread {}: block {:#x} ({} bytes): {d}", log.id, e.ptr, e.size));
            }
            tx.free(nn(e.ptr as usize))
                .map_err(|err| format!("thread {}: block {:#x} is not live: {err}", log.id, e.ptr))?;
        }
        total += entries.len() as u64;
        found.push(entries);
    }
    drop(tx);
    let st = heap.stats();
    ensure!(st.live_blocks == total, "{} live blocks, the directories account for {total}", st.live_blocks);
    Ok(found)
}

/// Runs `threads` workers (directories `t0`..) on `heap` for up to `iters`
/// transactions each; `during` runs on the calling thread meanwhile (to
/// crash the disk under them, say).
pub fn run_workers(
    heap: &Heap,
    threads: usize,
    iters: u64,
    seed: u64,
    stop: &AtomicBool,
    during: impl FnOnce(),
) -> Vec<ThreadLog> {
    let dirs = make_dirs(heap, threads).expect("directories");
    let initial: Vec<_> = (0..threads).map(|i| read_dir(heap, i).expect("directory").1).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let cfg =
                    WorkerCfg { id: i, seed: seed ^ ((i as u64 + 1) * 0x9e37), iters, max_size: 8192, scratch: true };
                let (dir, init) = (dirs[i], initial[i].clone());
                s.spawn(move || worker(heap, &cfg, dir, init, stop))
            })
            .collect();
        during();
        handles.into_iter().map(|h| h.join().expect("worker thread")).collect()
    })
}
