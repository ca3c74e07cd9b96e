//! [`PHeap`]: a log and a heap segment in one folder, opened in one call.

use crate::error::{Error, Result};
use crate::tx::{Checked, ReadTx, WriteTx};
use parking_lot::RwLock;
use rvm_core::{CommitMode, FileVfs, Options, RestoreMode, Rvm, Vfs};
use rvm_heap::{HeapSpec, PersistentHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the log file in a heap's folder.
pub const LOG_FILE: &str = "rvm.log";
/// Name of the heap segment file in a heap's folder.
pub const HEAP_FILE: &str = "heap.seg";
/// Where a heap segment is made before it is complete (then renamed).
const CREATING_FILE: &str = "heap.seg.creating";

/// Held while a heap is made and mapped (see `open_or_create_with`).
static CREATING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

thread_local! {
    /// The heaps (by address) whose closure transaction this thread is
    /// running, innermost last, and whether it is a write.
    static INSIDE: std::cell::RefCell<Vec<(usize, bool)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks this thread as inside a closure transaction of a heap until
/// dropped.
struct Inside(usize);

impl Inside {
    fn enter(heap: usize, write: bool) -> Inside {
        INSIDE.with(|i| i.borrow_mut().push((heap, write)));
        Inside(heap)
    }

    /// Whether this thread runs a closure transaction of `heap`: `None`
    /// if not, else whether one of them writes.
    fn of(heap: usize) -> Option<bool> {
        INSIDE.with(|i| {
            let i = i.borrow();
            let mut mine = i.iter().filter(|(h, _)| *h == heap).peekable();
            mine.peek().is_some().then(|| mine.any(|&(_, write)| write))
        })
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|i| {
            let mut i = i.borrow_mut();
            if let Some(at) = i.iter().rposition(|(h, _)| *h == self.0) {
                i.remove(at);
            }
        });
    }
}

/// What [`PHeap::check`] found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CheckReport {
    /// The allocator's check.
    pub heap: rvm_heap::CheckReport,
    /// The walk from the roots.
    pub reachability: crate::Reachability,
}

impl CheckReport {
    /// Whether every root was walked and found sound and every live block
    /// is reached from one.
    pub fn is_clean(&self) -> bool {
        self.reachability.complete() && self.reachability.unreachable.is_empty()
    }
}

/// How [`PHeap::open_or_create`] makes a new heap (an existing one keeps
/// what it was made with).
///
/// The disk space of the log (`log_len`) and of the heap (`heap_len`, and
/// each growth) is allocated when they are made, so a full disk refuses
/// the creation or the growth with a typed error and never fails a later
/// commit or checkpoint (see [`Options::reserve_segment_space`]).
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of heap (default 64 MiB).
    pub heap_len: u64,
    /// Bytes the heap may grow to in place (default
    /// [`rvm_heap::DEFAULT_MAX_HEAP_LEN`], 64 GiB; at most `heap_len`
    /// means no growth). A picked base has the address range up to it
    /// free, and loading reserves it (no memory or swap).
    pub max_heap_len: u64,
    /// Bytes of log (default 64 MiB).
    pub log_len: u64,
    /// The heap's fixed base address; `None` (the default) picks a free
    /// one at creation and records it in the segment's load map.
    pub base: Option<u64>,
    /// The core's options (log coalescing, checkpoints, salvage...).
    pub options: Options,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heap_len: 64 << 20,
            max_heap_len: rvm_heap::DEFAULT_MAX_HEAP_LEN,
            log_len: 64 << 20,
            base: None,
            options: Options::default(),
        }
    }
}

/// A typed persistent heap: the log and the heap segment of one folder,
/// with closure transactions ([`PHeap::write`], [`PHeap::read`]) over typed
/// roots.
///
/// Writers are serialised (one write transaction at a time, as in LMDB and
/// redb); readers run together but not during a write: a reader never sees
/// a half-made change and no safe call can race with a store. The price:
/// a long write holds readers off. The folder is opened exclusively (its
/// log and segment are locked against other processes).
///
/// A child made with `fork` inherits the heap but may only read it: its
/// writes, flushes and close fail with the core's `Error::ForkedChild`
/// (at once, even if another thread of the parent was inside a write at
/// the fork), and dropping it writes nothing. A read or check in such a
/// child waits forever if a parent thread held the writer lock at the
/// fork: fork from a thread that knows no write is running.
///
/// ```
/// use rvm_collections::{Config, PHeap, Persist};
///
/// #[derive(Persist, Clone, Copy, Debug, PartialEq)]
/// #[repr(C)]
/// struct Counter {
///     runs: u64,
///     total: u64,
/// }
///
/// # let dir = tempfile::tempdir().unwrap();
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// heap.write(|tx| {
///     let mut c = tx.root_or_insert_with("counter", || Counter { runs: 0, total: 0 })?;
///     c.runs += 1;
///     c.total += 10;
///     Ok::<_, rvm_collections::Error>(())
/// })?;
/// drop(heap);
///
/// // Another run (or after a crash): the committed counter is there.
/// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
/// let c = heap.read(|r| r.root::<Counter>("counter").map(|c| c.copied()))?;
/// assert_eq!(c, Some(Counter { runs: 1, total: 10 }));
/// # Ok::<(), rvm_collections::Error>(())
/// ```
pub struct PHeap {
    lock: RwLock<()>,
    /// Roots whose value passed its check (the cache of `tx::Checked`).
    checked: Checked,
    // Dropped before `rvm`: the heap unloads its segment first.
    heap: PersistentHeap,
    // Dropped after `heap`: holds its range while it is closed.
    _reserve: ReserveOnDrop,
    rvm: Rvm,
    dir: PathBuf,
}

/// The folder, the heap's base address and the log (not the allocator's
/// and the instance's bookkeeping; [`PHeap::stats`] has the figures).
/// Takes no lock, so it prints inside a transaction too.
impl std::fmt::Debug for PHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PHeap")
            .field("dir", &self.dir)
            .field("base", &format_args!("{:#x}", self.base()))
            .field("rvm", &self.rvm)
            .finish_non_exhaustive()
    }
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io { op, path: path.to_path_buf(), source }
}

impl PHeap {
    /// Opens the heap in folder `dir`, creating the folder, the log and the
    /// heap segment first if they do not exist (with `config`; on create
    /// the base address is picked among free addresses unless
    /// `config.base` fixes it). Recovery runs at every open.
    ///
    /// A crash while the heap segment is being made leaves a
    /// `heap.seg.creating` file, which the next call removes before it
    /// makes the heap again: the heap appears (as `heap.seg`) only once it
    /// is complete and durable. Likewise a log left unfinished by a crash
    /// in its creation (its superblock, written last, still zeros) in a
    /// folder without a heap file is made again.
    pub fn open_or_create(dir: impl AsRef<Path>, config: Config) -> Result<PHeap> {
        let dir = dir.as_ref();
        make_folder_durably(dir)?;
        // The files' names are made durable by `FileVfs` (it syncs the
        // folder after each create and rename).
        PHeap::open_or_create_with(Arc::new(FileVfs), dir, config)
    }

    /// [`PHeap::open_or_create`] on any [`Vfs`], such as the simulated disk
    /// (`rvm_core::testing::SimDisk`, feature `testing`): `dir` only
    /// prefixes the two file names there, and crashes at any point can be
    /// tested on typed data.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHeap};
    /// use rvm_core::testing::{CrashMode, SimDisk};
    /// use std::sync::Arc;
    ///
    /// let disk = SimDisk::new();
    /// let config = Config { heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
    /// let heap = PHeap::open_or_create_with(Arc::new(disk.clone()), "db".as_ref(), config.clone())?;
    /// heap.write(|tx| tx.root_or_insert_with("n", || 1u64).map(|_| ()))?; // durable
    /// heap.write_no_flush(|tx| tx.root_mut::<u64>("n").map(|n| *n.unwrap() += 1))?; // not yet
    /// disk.crash(CrashMode::LoseUnsynced);
    /// drop(heap);
    /// let heap = PHeap::open_or_create_with(Arc::new(disk.clone()), "db".as_ref(), config)?;
    /// assert_eq!(heap.read(|r| r.root::<u64>("n").map(|n| n.copied()))?, Some(1));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn open_or_create_with(vfs: Arc<dyn Vfs>, dir: &Path, config: Config) -> Result<PHeap> {
        if config.heap_len == 0 || !config.heap_len.is_multiple_of(4096) {
            return Err(Error::Config(format!("heap_len {} is not a non-zero multiple of 4096", config.heap_len)));
        }
        let log = dir.join(LOG_FILE);
        let path = dir.join(HEAP_FILE);
        remove_unfinished_log(vfs.as_ref(), dir)?;
        let heap_existed = vfs.exists(&path).map_err(io("looking for the heap", &path))?;
        if heap_existed {
            refuse_cut_heap_file(vfs.as_ref(), &path)?;
        }
        let made_log = match rvm_core::create_log_with(vfs.as_ref(), &log, config.log_len) {
            Ok(()) => true,
            Err(rvm_core::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e.into()),
        };
        // A log made here beside an existing heap file (its own log lost)
        // is removed again if the heap file is refused before it was
        // opened through it (`SegmentLogGone`, damage): it holds nothing,
        // and a refusal leaves the folder as it found it.
        let refused = |e: Error| {
            if made_log && heap_existed {
                let _ = vfs.remove(&log);
            }
            e
        };
        let rvm = Rvm::open_with(vfs.clone(), &log, config.options.clone()).map_err(|e| refused(e.into()))?;
        let (heap, reserve) = {
            // Heaps made in this process at once must not pick the same
            // free range (a pick is free until the heap maps it).
            let _one = CREATING.lock();
            if !vfs.exists(&path).map_err(io("looking for the heap", &path))? {
                create_heap(&rvm, vfs.as_ref(), dir, &config)?;
            }
            // A range this process held for the heap while it was closed
            // is released just before the heap maps it again.
            let map = match rvm_loader::read_load_map(&rvm, &path) {
                Ok(map) => map,
                Err(e) => {
                    drop(rvm);
                    return Err(refused(e.into()));
                }
            };
            if let (Some(lo), Some(hi)) = (
                map.regions().iter().map(|r| r.base).min(),
                map.regions().iter().map(|r| r.base.saturating_add(r.span())).max(),
            ) {
                crate::raw::release_claimed(lo as usize, (hi - lo) as usize);
            }
            let heap = PersistentHeap::open(&rvm, &path)?;
            // The whole range the heap may grow into, reserved by its
            // mapping while it is open.
            let (start, end) = (heap.static_region().addr(), heap.heap_region().addr() + heap.heap_region().capacity());
            crate::raw::claim_range(start, end - start);
            (heap, ReserveOnDrop { start, len: end - start })
        };
        Ok(PHeap {
            lock: RwLock::new(()),
            checked: Checked::default(),
            heap,
            _reserve: reserve,
            rvm,
            dir: dir.to_path_buf(),
        })
    }

    /// The folder the heap lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The heap's fixed base address.
    pub fn base(&self) -> usize {
        self.heap.static_region().addr()
    }

    /// Statistics of the underlying heap.
    pub fn stats(&self) -> rvm_heap::HeapStats {
        self.heap.stats()
    }

    /// Checks the heap: the allocator's structures
    /// ([`rvm_heap::Heap::check`]: every block, the counters, the root
    /// slots), then every root by its type's stored shape (each pointer a
    /// live block of the right size, owned once; see [`crate::shape`]),
    /// and lists the live blocks no root reaches. The typed API cannot
    /// leave such blocks (a value that owns blocks is always stored,
    /// dropped or freed at commit); the raw API can. `rvmutl heap check`
    /// runs the same walk.
    ///
    /// ```
    /// use rvm_collections::{Config, Error, PHeap, PString, PVec};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let heap = PHeap::open_or_create(dir.path(), Config::default())?;
    /// heap.write(|tx| {
    ///     let mut names = tx.root_or_insert_with("names", PVec::<PString>::new)?;
    ///     names.push(tx.new_string("ada")?)?;
    ///     let _dropped = tx.new_string("freed at once")?;
    ///     std::mem::forget(tx.new_string("freed at commit")?);
    ///     Ok::<_, Error>(())
    /// })?;
    /// let report = heap.check()?;
    /// assert!(report.is_clean(), "{report:?}");
    /// # Ok::<(), Error>(())
    /// ```
    pub fn check(&self) -> Result<CheckReport> {
        let nested = Inside::of(self.id());
        if nested == Some(true) {
            return Err(Error::NestedTransaction);
        }
        // Inside a read of this thread: taken again even if a writer waits.
        let _reader = if nested.is_some() { self.lock.read_recursive() } else { self.lock.read() };
        let heap = self.heap.check()?;
        let reachability = crate::shape::reachability(&self.heap)?;
        Ok(CheckReport { heap, reachability })
    }

    /// The underlying heap, for its raw API.
    ///
    /// # Safety
    ///
    /// The raw API frees blocks and changes roots outside this type's
    /// writer lock: while the returned reference is used to change the heap
    /// (begin a transaction, free, set or create roots), no typed
    /// transaction ([`PHeap::write`], [`PHeap::read`]) may run. Bytes it
    /// writes into a typed root or a block one owns count as damage: the
    /// typed layer refuses what its checks see (pointers, lengths,
    /// capacities, see [`crate::shape`]), but a value they cannot
    /// check (an invalid `bool` or `char`) must not be written. So that
    /// they see such bytes, calling this turns off for good the cache that
    /// otherwise runs a root's check once per open heap (at its first
    /// borrow, not at every transaction): every later borrow checks again.
    pub unsafe fn raw_heap(&self) -> &rvm_heap::Heap {
        // From now on every borrow of a root checks its value again.
        self.checked.disable();
        &self.heap
    }

    /// The underlying instance.
    pub fn rvm(&self) -> &Rvm {
        &self.rvm
    }

    /// Runs `f` in a write transaction and commits it, durably (flush),
    /// if `f` returns `Ok`; aborts it (every change undone) if `f` returns
    /// `Err` or panics (the panic then continues). Returns `f`'s value.
    ///
    /// References into the heap that `f` gets live only as long as the
    /// transaction: they cannot leave the closure.
    ///
    /// Writes from several threads share syncs (group commit): a write
    /// releases the writer lock once it has committed in memory and then
    /// waits for the disk, so the next writer runs meanwhile and one sync
    /// serves every writer waiting. Readers and later writers may thus see
    /// a write before it is durable; the log is in commit order, so
    /// nothing written after it is durable without it, and a crash before
    /// its sync loses it only together with every later write.
    pub fn write<R, E: From<Error>>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, E>) -> Result<R, E> {
        self.write_with(CommitMode::Flush, f)
    }

    /// [`PHeap::write`], committed without waiting for durability (a later
    /// flushing write, [`PHeap::flush`] or a clean close makes it durable;
    /// a crash before may lose it, never part of it).
    pub fn write_no_flush<R, E: From<Error>>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, E>) -> Result<R, E> {
        self.write_with(CommitMode::NoFlush, f)
    }

    fn write_with<R, E: From<Error>>(
        &self,
        mode: CommitMode,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        // Inside a write or read of this heap on this thread, the lock
        // below would wait for this thread forever.
        if Inside::of(self.id()).is_some() {
            return Err(E::from(Error::NestedTransaction));
        }
        // In a forked child, before the lock: a thread of the parent that
        // held it at the fork holds it in the child for good.
        self.rvm.check_process().map_err(|e| E::from(e.into()))?;
        let writer = self.lock.write();
        let inside = Inside::enter(self.id(), true);
        let htx = self.heap.begin(RestoreMode::Restore).map_err(|e| E::from(e.into()))?;
        let mut tx = WriteTx::new(&self.heap, htx, &self.checked);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut tx))) {
            Ok(Ok(value)) => {
                tx.commit(CommitMode::NoFlush).map_err(E::from)?;
                // Group commit: the next writer runs while this one waits
                // for the disk, and one sync serves every writer waiting
                // (the log is written in commit order, so a later write is
                // never durable without this one).
                drop(inside);
                drop(writer);
                if mode == CommitMode::Flush {
                    self.rvm.flush().map_err(|e| E::from(e.into()))?;
                }
                Ok(value)
            }
            // Dropping the transaction aborts it: restore-mode undo puts
            // back every byte, the heap forgets its allocations and frees.
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                drop(tx);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Runs `f` with read access to the heap. Readers run concurrently with
    /// each other, never with a write transaction.
    ///
    /// A reference into the heap cannot leave the closure (after it, a
    /// writer could change or free what it points at):
    ///
    /// ```compile_fail
    /// # use rvm_collections::{Config, PHeap};
    /// # fn f(heap: &PHeap) {
    /// let escaped: Option<&u64> = heap.read(|r| r.root::<u64>("n").unwrap());
    /// # }
    /// ```
    ///
    /// Nor can a guard leave a write transaction:
    ///
    /// ```compile_fail
    /// # use rvm_collections::{Config, Error, PHeap};
    /// # fn f(heap: &PHeap) {
    /// let escaped = heap.write(|tx| Ok::<_, Error>(tx.root_mut::<u64>("n")?));
    /// # }
    /// ```
    ///
    /// A read inside a read of the same heap on the same thread is fine.
    ///
    /// # Panics
    ///
    /// Inside a write transaction of the same heap on the same thread
    /// (read through the [`WriteTx`] there: [`WriteTx::root`]): the read
    /// would wait for the write, which waits for it. (`write` and `check`
    /// return [`Error::NestedTransaction`] in that case.)
    pub fn read<R>(&self, f: impl FnOnce(&ReadTx<'_>) -> R) -> R {
        let nested = Inside::of(self.id());
        assert!(
            nested != Some(true),
            "PHeap::read inside a write transaction of the same heap on the same thread would wait for itself: \
             read through the WriteTx instead"
        );
        // A nested read takes the lock again even if a writer waits (which
        // waits for the outer read).
        let _reader = if nested.is_some() { self.lock.read_recursive() } else { self.lock.read() };
        let _inside = Inside::enter(self.id(), false);
        f(&ReadTx::new(&self.heap, &self.checked))
    }

    /// This heap's identity for [`Inside`].
    fn id(&self) -> usize {
        self as *const PHeap as usize
    }

    /// Makes every earlier commit durable.
    pub fn flush(&self) -> Result<()> {
        Ok(self.rvm.flush()?)
    }

    /// Closes the heap, reporting errors that dropping would swallow.
    ///
    /// A close first applies the whole log to the heap file and detaches
    /// the file from the log (`Rvm::close_segment`), so that afterwards
    /// the heap file alone holds every commit: the folder may be moved,
    /// copied or backed up as it stands, and a lost log loses nothing. (Dropping a `PHeap` without `close` leaves the log as
    /// it is; the next open recovers from it, in the same folder.)
    pub fn close(self) -> Result<()> {
        let PHeap { heap, rvm, _reserve, dir, .. } = self;
        heap.close()?;
        drop(_reserve);
        // Closing the segment in the log applies every record for it,
        // drops it from the log's dictionary and clears its owner mark:
        // the heap file stands alone.
        let seg = rvm.open_segment(dir.join(HEAP_FILE))?;
        rvm.close_segment(seg)?;
        rvm.close()?;
        Ok(())
    }
}

/// Reserves a closed heap's address range (see `raw::reserve_claimed`)
/// once the heap has unmapped it.
#[derive(Debug)]
struct ReserveOnDrop {
    start: usize,
    len: usize,
}

impl Drop for ReserveOnDrop {
    fn drop(&mut self) {
        crate::raw::reserve_claimed(self.start, self.len);
    }
}

/// Removes the log of `dir` if a process killed while making it (the
/// first open of the folder) left it unfinished, so that the open makes
/// it again instead of refusing the folder for good.
///
/// A log's superblock is written last (`create_log_with`, which sizes
/// the file first): an empty file, or one whose first block is all
/// zeros, was never a log and holds no commit. It is taken for an
/// unfinished creation only if the heap file was not made yet either (it
/// is made after the log is complete): `heap.seg` and `heap.seg.creating`
/// both absent. Anything else (another file's bytes, damage to a log that
/// has a heap) is left for `Rvm::open` to refuse, untouched.
fn remove_unfinished_log(vfs: &dyn Vfs, dir: &Path) -> Result<()> {
    let log = dir.join(LOG_FILE);
    for path in [log.clone(), dir.join(HEAP_FILE), dir.join(CREATING_FILE)] {
        let exists = vfs.exists(&path).map_err(io("looking for the heap's files", &path))?;
        if exists != (path == log) {
            return Ok(());
        }
    }
    // Held (locked) while deciding and removing: a log another process
    // has open is left alone (`Rvm::open` then reports it locked).
    let dev = match vfs.open(&log, rvm_core::OpenMode::Existing) {
        Ok(dev) => dev,
        Err(_) => return Ok(()),
    };
    let block = rvm_core::log::format::BLOCK;
    let unfinished = match dev.len() {
        Ok(0) => true,
        Ok(len) if len < block => false,
        Ok(_) => {
            let mut first = vec![0u8; block as usize];
            dev.read_at(&mut first, 0).is_ok() && first.iter().all(|&b| b == 0)
        }
        Err(_) => false,
    };
    if unfinished {
        vfs.remove(&log).map_err(io("removing an unfinished log", &log))?;
    }
    Ok(())
}

/// Refuses an existing heap file cut shorter than its own load map says, or whose
/// header's magic or version is not the loader's, before recovery writes
/// anything (the loader would refuse it only after recovery applied the
/// log to it).
///
/// A header that decodes and passes its checksum is judged by its file's
/// length: a valid header, old or new, always fits its file (a growth
/// extends and syncs the file before it commits the longer map, DESIGN
/// 8.5), so one that does not was cut behind the library's back. The
/// magic and version are the same in every header ever written to a
/// `heap.seg` (it gets that name only once its header is durable), so no
/// torn write and no record in the log can make them right: other bytes
/// there are damage. Any other fault of the header (a checksum, which a
/// torn write that the log redoes can spoil) is left to recovery and the
/// loader.
fn refuse_cut_heap_file(vfs: &dyn Vfs, path: &Path) -> Result<()> {
    /// Enough for a heap's header (two regions: a few hundred bytes); a
    /// longer one is not judged here (the image ends inside it).
    const HEADER_READ: u64 = 4096;
    // Any trouble reading is left to the open that follows to report.
    let Ok(dev) = vfs.open(path, rvm_core::OpenMode::Existing) else { return Ok(()) };
    let Ok(len) = dev.len() else { return Ok(()) };
    let mut image = vec![0u8; len.min(HEADER_READ) as usize];
    if dev.read_at(&mut image, 0).is_err() {
        return Ok(());
    }
    drop(dev);
    match rvm_loader::read_load_map_image(path, &image, u64::MAX) {
        Ok(_) => {}
        Err(e @ (rvm_loader::LoaderError::NotALoadMap { .. } | rvm_loader::LoaderError::UnsupportedVersion { .. })) => {
            return Err(e.into())
        }
        Err(_) => return Ok(()),
    }
    rvm_loader::read_load_map_image(path, &image, len)?;
    Ok(())
}

/// Makes a heap segment under a temporary name, applies and forgets it in
/// the log, then renames it into place: a crash leaves no half-made
/// `heap.seg`.
fn create_heap(rvm: &Rvm, vfs: &dyn Vfs, dir: &Path, config: &Config) -> Result<()> {
    create_heap_picking(rvm, vfs, dir, config, &mut |span| {
        crate::raw::free_address_range(span, 1 << 21).map(|a| a as u64)
    })
}

/// [`create_heap`], with `pick(span)` choosing a base address where
/// `config` names none.
fn create_heap_picking(
    rvm: &Rvm,
    vfs: &dyn Vfs,
    dir: &Path,
    config: &Config,
    pick: &mut dyn FnMut(usize) -> std::io::Result<u64>,
) -> Result<()> {
    let creating = dir.join(CREATING_FILE);
    match vfs.remove(&creating) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing an unfinished heap", &creating)(e)),
    }
    let probe = HeapSpec::new(0, config.heap_len).with_max_len(config.max_heap_len);
    // The address space the heap spans at its maximum.
    let span = usize::try_from(probe.heap_base().saturating_add(probe.max_len()))
        .ok()
        .filter(|_| probe.max_len() <= rvm_loader::format::MAX_REGION_LEN)
        .ok_or_else(|| {
            Error::Config(format!(
                "a heap of {} bytes growing to {} bytes does not fit the address space (at most {} bytes)",
                config.heap_len,
                config.max_heap_len,
                rvm_loader::format::MAX_REGION_LEN
            ))
        })?;
    let mut tries = 0;
    loop {
        let base = match config.base {
            Some(b) => b,
            None => pick(span).map_err(io("picking a base address", dir))?,
        };
        let spec = HeapSpec::new(base, config.heap_len).with_max_len(config.max_heap_len);
        match PersistentHeap::create(rvm, &creating, &spec) {
            Ok(heap) => {
                heap.close()?;
                break;
            }
            // Another thread mapped the range meanwhile: pick again.
            // (The failed create deleted the segment it made.)
            Err(e) if config.base.is_none() && tries < 8 && is_address_in_use(&e) => tries += 1,
            Err(e) => return Err(e.into()),
        }
    }
    let seg = rvm.open_segment(&creating)?;
    rvm.close_segment(seg)?;
    let target = dir.join(HEAP_FILE);
    vfs.rename(&creating, &target).map_err(io("renaming the new heap", &target))
}

fn is_address_in_use(e: &rvm_heap::HeapError) -> bool {
    matches!(e, rvm_heap::HeapError::Loader(rvm_loader::LoaderError::MapRegion { .. }))
}

/// Creates `dir` and any missing parents, each created folder's name made
/// durable (its parent synced): a folder a power cut could take away would
/// take the heap's commits with it. An existing folder is left as it is.
fn make_folder_durably(dir: &Path) -> Result<()> {
    // An empty path names the current folder, as it does for the files.
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).collect();
    std::fs::create_dir_all(dir).map_err(io("creating the folder", dir))?;
    for made in missing.iter().rev() {
        rvm_core::storage::sync_folder_of(made).map_err(io("syncing the folder of", made))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvm_core::testing::SimDisk;
    use std::sync::Arc;

    /// An address range mapped (inaccessible) by this test, as another
    /// thread could map the range a pick offered before the heap does.
    struct Taken(*mut std::ffi::c_void, usize);

    impl Taken {
        fn new(len: usize) -> Taken {
            use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
            // SAFETY: a fresh anonymous PROT_NONE mapping where the kernel
            // puts it; nothing else uses it.
            let p = unsafe {
                mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::empty(), MapFlags::PRIVATE | MapFlags::NORESERVE)
            }
            .unwrap();
            Taken(p, len)
        }
    }

    impl Drop for Taken {
        fn drop(&mut self) {
            // SAFETY: the mapping `new` made, which nothing refers to.
            unsafe { rustix::mm::munmap(self.0, self.1) }.unwrap();
        }
    }

    /// A picked range mapped by someone else before the heap maps it: the
    /// create fails with the address in use, deletes the segment it made
    /// (PHeap no longer does), and the next pick makes the heap; the log
    /// needs nothing of the failed try. Picks that stay taken end in the
    /// error, with no unfinished segment left.
    #[test]
    fn a_taken_range_is_picked_again() {
        let disk = SimDisk::new();
        let vfs: Arc<dyn Vfs> = Arc::new(disk.clone());
        let dir = Path::new("db");
        let config = Config { heap_len: 1 << 20, max_heap_len: 1 << 20, log_len: 1 << 20, ..Config::default() };
        rvm_core::create_log_with(vfs.as_ref(), &dir.join(LOG_FILE), config.log_len).unwrap();
        let rvm = Rvm::open_with(vfs.clone(), &dir.join(LOG_FILE), config.options.clone()).unwrap();
        let mut taken = None;
        let mut picks = 0;
        create_heap_picking(&rvm, vfs.as_ref(), dir, &config, &mut |span| {
            picks += 1;
            if picks == 1 {
                let t = taken.insert(Taken::new(span + (2 << 20)));
                return Ok((t.0 as u64).next_multiple_of(1 << 21));
            }
            crate::raw::free_address_range(span, 1 << 21).map(|a| a as u64)
        })
        .unwrap();
        assert_eq!(picks, 2, "the taken range was not picked again");
        assert!(!vfs.exists(&dir.join(CREATING_FILE)).unwrap());
        assert!(vfs.exists(&dir.join(HEAP_FILE)).unwrap());
        drop(rvm);
        drop(taken);
        let heap = PHeap::open_or_create_with(vfs.clone(), dir, config.clone()).unwrap();
        heap.write(|tx| tx.root_or_insert_with("n", || 7u64).map(|_| ())).unwrap();
        assert_eq!(heap.read(|r| r.root::<u64>("n").map(|n| n.copied())).unwrap(), Some(7));
        drop(heap);

        // Always taken: the error after the last try, and no segment left.
        let dir = Path::new("db2");
        rvm_core::create_log_with(vfs.as_ref(), &dir.join(LOG_FILE), config.log_len).unwrap();
        let rvm = Rvm::open_with(vfs.clone(), &dir.join(LOG_FILE), config.options.clone()).unwrap();
        let t = Taken::new(4 << 20);
        let at = (t.0 as u64).next_multiple_of(1 << 21);
        let mut picks = 0;
        let e = create_heap_picking(&rvm, vfs.as_ref(), dir, &config, &mut |_| {
            picks += 1;
            Ok(at)
        })
        .unwrap_err();
        assert!(matches!(&e, Error::Heap(h) if is_address_in_use(h)), "{e:?}");
        assert_eq!(picks, 9);
        assert!(!vfs.exists(&dir.join(CREATING_FILE)).unwrap());
        drop(rvm);
        let rvm = Rvm::open_with(vfs.clone(), &dir.join(LOG_FILE), config.options.clone()).unwrap();
        assert_eq!(rvm.recovery_report().transactions, 0);
    }
}
