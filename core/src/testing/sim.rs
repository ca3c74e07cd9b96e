//! The simulated device: [`SimDisk`] and its handles, [`SimFile`].
//!
//! # Model
//!
//! * Each file has a **live image**, which reads, [`Storage::len`] and
//!   writes see, and a **durable image**, which is what a crash leaves
//!   behind.
//! * Every [`Storage::write_at`] is remembered, in order, until the next
//!   [`Storage::sync`] of that file, as a list of **sector writes**: for each
//!   [`SECTOR`]-byte sector the write touches, the sector's index and its
//!   full contents right after the write (the new bytes merged with the live
//!   bytes around them; the last sector of a file may be short).
//! * [`Storage::set_len`] changes the live length only; the durable length
//!   follows it at the next sync. A crash keeps the durable length, extended
//!   (with zeros up to the write) if a surviving sector write lies beyond it.
//! * [`Storage::sync`] makes the live image of that one file durable.
//! * Creating and removing files is durable at once (directory operations
//!   are not modelled).
//! * [`SimDisk::crash`] keeps none or a random subset of each file's unsynced
//!   sector writes, optionally tearing the last one, and invalidates every
//!   handle opened before it.

use crate::storage::{OpenMode, Storage, Vfs};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The granularity, in bytes, at which unsynced writes are recorded and at
/// which a crash keeps, drops or tears them.
pub const SECTOR: usize = 512;

/// The largest file a [`SimDisk`] made by [`SimDisk::new`] holds: 1 GiB.
///
/// Writes and [`Storage::set_len`] calls that would make a file longer fail
/// with [`io::ErrorKind::StorageFull`] (a full disk) instead of exhausting memory.
pub const DEFAULT_MAX_FILE_LEN: u64 = 1 << 30;

/// How [`SimDisk::crash`] treats the writes that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// Every unsynced write is lost: each file reverts to its durable image.
    LoseUnsynced,
    /// Each unsynced sector write of each file is independently kept with
    /// probability 1/2; the kept ones land on the durable image in the order
    /// they were written.
    KeepRandomSubset {
        /// Seed of the deterministic generator that picks the survivors: the
        /// same seed on the same history gives the same images.
        seed: u64,
        /// Whether each file's last unsynced sector write, if it is kept, is
        /// torn: only a random prefix of it (0 to all of its bytes, byte
        /// granular) lands, and the rest of the sector keeps its old durable
        /// bytes.
        tear_last: bool,
    },
}

/// A simulated disk: one crash domain holding several named files.
///
/// Cloning a `SimDisk` gives another handle to the same disk. Open files
/// with the [`Vfs`] implementation; every path is its own canonical name.
///
/// ```
/// # use rvm_core::testing::{SimDisk, CrashMode};
/// # use rvm_core::storage::{OpenMode, Storage, Vfs};
/// # use std::path::Path;
/// let disk = SimDisk::new();
/// let f = disk.open(Path::new("seg"), OpenMode::CreateNew).unwrap();
/// f.write_at(b"durable", 0).unwrap();
/// f.sync().unwrap();
/// f.write_at(b"LOST", 0).unwrap();
/// disk.crash(CrashMode::LoseUnsynced);
/// assert!(f.len().is_err()); // handles opened before a crash are dead
/// assert_eq!(disk.durable_image("seg").unwrap(), b"durable");
/// ```
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

/// A handle to one file of a [`SimDisk`], returned (as an
/// `Arc<dyn Storage>`) by [`Vfs::open`].
///
/// The handle holds the file's exclusive lock until it is dropped or the
/// disk crashes. After a crash every operation on it fails with an
/// [`io::ErrorKind::Other`] error ("device crashed"); after
/// [`SimDisk::remove`] every operation fails with
/// [`io::ErrorKind::NotFound`].
pub struct SimFile {
    state: Arc<Mutex<State>>,
    path: PathBuf,
    /// Unique among all handles ever opened on the disk.
    id: u64,
    /// The disk's crash count when the handle was opened.
    epoch: u64,
    /// Opened by [`Vfs::open_read_only`]: holds no lock, cannot write.
    read_only: bool,
}

/// Everything behind a [`SimDisk`]'s mutex.
struct State {
    /// A `BTreeMap` so that crashes visit files in a deterministic order.
    files: BTreeMap<PathBuf, FileState>,
    /// How many crashes happened; handles from older epochs are dead.
    epoch: u64,
    /// The id of the next handle.
    next_handle: u64,
    /// Storage operations issued so far.
    ops: u64,
    /// Operations with an index at or past this fail.
    fail_at: Option<u64>,
    /// Whether every sync fails.
    fail_syncs: bool,
    /// The largest length a write or `set_len` may give a file.
    max_file_len: u64,
    /// The identity of the next file created.
    next_ino: u64,
}

/// One file.
#[derive(Default)]
struct FileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Change>,
    /// How many sector writes `unsynced` holds.
    unsynced_sectors: usize,
    /// The id of the handle holding the lock.
    lock: Option<u64>,
    /// The file's identity (an inode number): kept by [`SimDisk::rename`],
    /// new for every file created.
    ino: u64,
    /// The owner mark (an extended attribute), durable when set.
    mark: Option<Vec<u8>>,
}

/// An unsynced change to a file.
enum Change {
    /// A run of consecutive sector writes: `data` is the new contents of the
    /// sectors from the one at `offset` (a multiple of [`SECTOR`]) on, split
    /// into sectors at crash time.
    Write { offset: usize, data: Vec<u8> },
    /// A `set_len`: replayed at sync, ignored by a crash.
    SetLen(usize),
}

/// The splitmix64 generator: tiny, deterministic, good enough for picking
/// survivors.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A fair coin.
    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }

    /// A number in `0..=max`.
    fn up_to(&mut self, max: usize) -> usize {
        // `max` is at most SECTOR, so the modulo bias is negligible and the
        // result fits back into usize.
        (self.next() % (max as u64 + 1)) as usize
    }
}

fn crashed() -> io::Error {
    io::Error::other("device crashed")
}

fn injected() -> io::Error {
    io::Error::other("injected I/O error")
}

fn too_large(what: &str, end: Option<u64>, max: u64) -> io::Error {
    match end {
        // The disk is full: a real one says so with ENOSPC.
        Some(end) => io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{what} would make the file {end} bytes long; the simulated disk holds at most {max}"),
        ),
        None => io::Error::new(io::ErrorKind::InvalidInput, format!("{what} reaches past the largest possible offset")),
    }
}

/// Grows `v` with zeros to `len` bytes, reporting allocation failure as an
/// error.
fn grow(v: &mut Vec<u8>, len: usize) -> io::Result<()> {
    if len > v.len() {
        v.try_reserve(len - v.len()).map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?;
        v.resize(len, 0);
    }
    Ok(())
}

/// Copies `bytes` into `img` at `at`, extending `img` with zeros as needed.
fn apply(img: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let end = at + bytes.len();
    if end > img.len() {
        img.resize(end, 0);
    }
    img[at..end].copy_from_slice(bytes);
}

impl FileState {
    fn with_image(bytes: Vec<u8>) -> Self {
        FileState { live: bytes.clone(), durable: bytes, ..FileState::default() }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the simulated file");
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.live.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, buf: &[u8], offset: u64, max: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(buf.len() as u64);
        let (start, end) = match end {
            Some(e) if e <= max => match (usize::try_from(offset), usize::try_from(e)) {
                (Ok(s), Ok(e)) => (s, e),
                _ => return Err(too_large("write", Some(e), max)),
            },
            _ => return Err(too_large("write", end, max)),
        };
        // Reserve the record first so a failed allocation changes nothing.
        let sec_start = start - start % SECTOR;
        let sec_end = end.div_ceil(SECTOR).saturating_mul(SECTOR).min(end.max(self.live.len()));
        let mut data = Vec::new();
        data.try_reserve_exact(sec_end - sec_start)
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?;
        grow(&mut self.live, end)?;
        self.live[start..end].copy_from_slice(buf);
        data.extend_from_slice(&self.live[sec_start..sec_end]);
        self.unsynced_sectors += data.len().div_ceil(SECTOR);
        self.unsynced.push(Change::Write { offset: sec_start, data });
        Ok(())
    }

    fn set_len(&mut self, len: u64, max: u64) -> io::Result<()> {
        let n = match usize::try_from(len) {
            Ok(n) if len <= max => n,
            _ => return Err(too_large("set_len", Some(len), max)),
        };
        if n > self.live.len() {
            grow(&mut self.live, n)?;
        } else {
            self.live.truncate(n);
        }
        self.unsynced.push(Change::SetLen(n));
        Ok(())
    }

    /// Makes the live image durable by replaying the unsynced changes onto
    /// the durable image (cheaper than copying the whole image when the
    /// file is large and the changes small).
    fn sync(&mut self) {
        for change in self.unsynced.drain(..) {
            match change {
                Change::Write { offset, data } => apply(&mut self.durable, offset, &data),
                Change::SetLen(n) => self.durable.resize(n, 0),
            }
        }
        self.unsynced_sectors = 0;
        debug_assert!(self.durable.len() == self.live.len());
    }

    /// The durable image after a crash that keeps a random subset of the
    /// unsynced sector writes.
    fn survivors(&self, rng: &mut SplitMix64, tear_last: bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        let last = self.unsynced.iter().rposition(|c| matches!(c, Change::Write { .. }));
        for (i, change) in self.unsynced.iter().enumerate() {
            let Change::Write { offset, data } = change else { continue };
            let sectors = data.len().div_ceil(SECTOR);
            for (j, sector) in data.chunks(SECTOR).enumerate() {
                if !rng.coin() {
                    continue;
                }
                let landed = if tear_last && last == Some(i) && j + 1 == sectors {
                    &sector[..rng.up_to(sector.len())]
                } else {
                    sector
                };
                apply(&mut img, offset + j * SECTOR, landed);
            }
        }
        img
    }

    /// Replaces both images with `img` and forgets the unsynced changes.
    fn reset(&mut self, img: Vec<u8>) {
        self.live = img.clone();
        self.durable = img;
        self.unsynced.clear();
        self.unsynced_sectors = 0;
    }
}

impl SimDisk {
    /// An empty disk whose files may grow to [`DEFAULT_MAX_FILE_LEN`] bytes.
    pub fn new() -> Self {
        Self::with_max_file_len(DEFAULT_MAX_FILE_LEN)
    }

    /// An empty disk whose files may grow to `max` bytes: longer writes and
    /// [`Storage::set_len`] calls fail with [`io::ErrorKind::InvalidInput`].
    pub fn with_max_file_len(max: u64) -> Self {
        SimDisk {
            state: Arc::new(Mutex::new(State {
                files: BTreeMap::new(),
                epoch: 0,
                next_handle: 0,
                ops: 0,
                fail_at: None,
                fail_syncs: false,
                max_file_len: max,
                next_ino: 0,
            })),
        }
    }

    /// Simulates a power failure and restart.
    ///
    /// Each file's durable image becomes what `mode` leaves of its unsynced
    /// writes, its live image becomes equal to it, and its unsynced list is
    /// emptied. Every handle opened before the crash becomes dead (each later
    /// operation on it fails with "device crashed") and no longer holds its
    /// file's lock, so the files can be reopened at once. Injected faults
    /// ([`fail_after`](Self::fail_after), [`fail_syncs`](Self::fail_syncs))
    /// stay in force until [`clear_faults`](Self::clear_faults).
    pub fn crash(&self, mode: CrashMode) {
        let mut st = self.state.lock();
        st.epoch = st.epoch.wrapping_add(1);
        let mut rng = match mode {
            CrashMode::LoseUnsynced => None,
            CrashMode::KeepRandomSubset { seed, tear_last } => Some((SplitMix64(seed), tear_last)),
        };
        for file in st.files.values_mut() {
            let img = match &mut rng {
                None => file.durable.clone(),
                Some((rng, tear_last)) => file.survivors(rng, *tear_last),
            };
            file.reset(img);
            file.lock = None;
        }
    }

    /// Makes the `n`-th storage operation from now (counting
    /// `read_at`, `write_at`, `len`, `set_len` and `sync` on any file of the
    /// disk, through any handle; `n == 0` is the very next one) and every
    /// later one fail with an [`io::ErrorKind::Other`] error ("injected I/O
    /// error"), without effect, until [`clear_faults`](Self::clear_faults).
    pub fn fail_after(&self, n: u64) {
        let mut st = self.state.lock();
        st.fail_at = Some(st.ops.saturating_add(n));
    }

    /// While `on`, every sync fails with an [`io::ErrorKind::Other`] error
    /// and makes nothing durable.
    pub fn fail_syncs(&self, on: bool) {
        self.state.lock().fail_syncs = on;
    }

    /// Cancels [`fail_after`](Self::fail_after) and
    /// [`fail_syncs`](Self::fail_syncs).
    pub fn clear_faults(&self) {
        let mut st = self.state.lock();
        st.fail_at = None;
        st.fail_syncs = false;
    }

    /// How many storage operations have been issued on the disk so far
    /// (including those that failed), in the sense of
    /// [`fail_after`](Self::fail_after).
    pub fn op_count(&self) -> u64 {
        self.state.lock().ops
    }

    /// The durable image of `path` (what a crash that loses every unsynced
    /// write would leave), or `None` if there is no such file.
    pub fn durable_image(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.state.lock().files.get(path.as_ref()).map(|f| f.durable.clone())
    }

    /// The live image of `path` (what reads see), or `None` if there is no
    /// such file.
    pub fn live_image(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.state.lock().files.get(path.as_ref()).map(|f| f.live.clone())
    }

    /// The names of the disk's files, sorted.
    pub fn file_names(&self) -> Vec<PathBuf> {
        self.state.lock().files.keys().cloned().collect()
    }

    /// How many sector writes of `path` are not synced yet (0 if there is no
    /// such file). A write touching `k` sectors counts `k`.
    pub fn unsynced_writes(&self, path: impl AsRef<Path>) -> usize {
        self.state.lock().files.get(path.as_ref()).map_or(0, |f| f.unsynced_sectors)
    }

    /// Deletes `path` (durably), returning whether it existed. Handles still
    /// open on it fail every later operation with
    /// [`io::ErrorKind::NotFound`].
    pub fn remove(&self, path: impl AsRef<Path>) -> bool {
        self.state.lock().files.remove(path.as_ref()).is_some()
    }

    /// Renames `from` to `to` (replacing any file there), keeping the file's
    /// identity, as `rename(2)` does; false if `from` does not exist. Open
    /// handles on either file are dead afterwards.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> bool {
        let mut st = self.state.lock();
        let Some(mut file) = st.files.remove(from.as_ref()) else { return false };
        file.lock = None;
        st.files.insert(to.as_ref().to_path_buf(), file);
        true
    }

    /// Sets both images of `path` to `bytes` and forgets its unsynced
    /// writes, creating the file if needed; for corruption tests. An open
    /// handle on the file stays usable and sees the new contents.
    pub fn set_durable_image(&self, path: impl AsRef<Path>, bytes: impl Into<Vec<u8>>) {
        let bytes = bytes.into();
        let mut st = self.state.lock();
        match st.files.get_mut(path.as_ref()) {
            Some(file) => file.reset(bytes),
            None => {
                let ino = st.new_ino();
                st.files.insert(path.as_ref().to_path_buf(), FileState { ino, ..FileState::with_image(bytes) });
            }
        }
    }
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.lock();
        f.debug_struct("SimDisk")
            .field("files", &st.files.keys().collect::<Vec<_>>())
            .field("crashes", &st.epoch)
            .field("ops", &st.ops)
            .finish_non_exhaustive()
    }
}

impl Vfs for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let exists = st.files.contains_key(path);
        match mode {
            OpenMode::Existing if !exists => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist on the simulated disk", path.display()),
                ))
            }
            OpenMode::CreateNew if exists => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists on the simulated disk", path.display()),
                ))
            }
            _ => {}
        }
        if !exists {
            let ino = st.new_ino();
            st.files.insert(path.to_path_buf(), FileState { ino, ..FileState::default() });
        }
        let file = st.files.get_mut(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if file.lock.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another user", path.display()),
            ));
        }
        let id = st.next_handle;
        st.next_handle = st.next_handle.wrapping_add(1);
        file.lock = Some(id);
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            path: path.to_path_buf(),
            id,
            epoch: st.epoch,
            read_only: false,
        }))
    }

    fn open_read_only(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        let mut st = self.state.lock();
        if !st.files.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist on the simulated disk", path.display()),
            ));
        }
        let id = st.next_handle;
        st.next_handle = st.next_handle.wrapping_add(1);
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            path: path.to_path_buf(),
            id,
            epoch: st.epoch,
            read_only: true,
        }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        if SimDisk::remove(self, path) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist on the simulated disk", path.display()),
            ))
        }
    }
    fn canonical_name(&self, path: &Path) -> io::Result<PathBuf> {
        Ok(path.to_path_buf())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if SimDisk::rename(self, from, to) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} does not exist on the simulated disk", from.display()),
            ))
        }
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.state.lock().files.contains_key(path))
    }
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        if st.files.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", to.display())));
        }
        let image = st.files.get(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?.live.clone();
        let ino = st.new_ino();
        st.files.insert(to.to_path_buf(), FileState { ino, ..FileState::with_image(image) });
        Ok(())
    }
}

impl State {
    fn new_ino(&mut self) -> u64 {
        self.next_ino += 1;
        self.next_ino
    }
}

impl SimFile {
    /// The path this handle was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one storage operation: counts it, applies injected faults and
    /// the dead-handle checks, then runs `f` on the file.
    fn op<R>(&self, is_sync: bool, f: impl FnOnce(&mut FileState, u64) -> io::Result<R>) -> io::Result<R> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let index = st.ops;
        st.ops = st.ops.saturating_add(1);
        if st.epoch != self.epoch {
            return Err(crashed());
        }
        if st.fail_at.is_some_and(|at| index >= at) {
            return Err(injected());
        }
        if is_sync && st.fail_syncs {
            return Err(io::Error::other("injected sync failure"));
        }
        let max = st.max_file_len;
        let read_only = self.read_only;
        let file = st.files.get_mut(&self.path).filter(|f| read_only || f.lock == Some(self.id)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} was removed from the simulated disk", self.path.display()),
            )
        })?;
        f(file, max)
    }
}

impl SimFile {
    /// Refuses writes through a read-only handle.
    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is open read-only", self.path.display())))
        } else {
            Ok(())
        }
    }
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile").field("path", &self.path).field("handle", &self.id).finish_non_exhaustive()
    }
}

impl Storage for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.op(false, |file, _| file.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        self.op(false, |file, max| file.write(buf, offset, max))
    }

    fn len(&self) -> io::Result<u64> {
        self.op(false, |file, _| Ok(file.live.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.op(false, |file, max| file.set_len(len, max))
    }

    fn sync(&self) -> io::Result<()> {
        if self.read_only {
            // Nothing was written through this handle.
            return Ok(());
        }
        self.op(true, |file, _| {
            file.sync();
            Ok(())
        })
    }

    fn identity(&self) -> io::Result<Option<crate::storage::DeviceId>> {
        self.op(false, |file, _| Ok(Some(crate::storage::DeviceId { file: file.ino, birth: 0 })))
    }

    fn owner_mark(&self) -> io::Result<Option<Vec<u8>>> {
        self.op(false, |file, _| Ok(file.mark.clone()))
    }

    fn set_owner_mark(&self, mark: Option<&[u8]>) -> io::Result<()> {
        self.writable()?;
        self.op(true, |file, _| {
            file.mark = mark.map(<[u8]>::to_vec);
            Ok(())
        })
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        if let Some(file) = st.files.get_mut(&self.path) {
            if file.lock == Some(self.id) {
                file.lock = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> &Path {
        Path::new(name)
    }

    fn open(disk: &SimDisk, name: &str) -> Arc<dyn Storage> {
        disk.open(p(name), OpenMode::CreateIfMissing).unwrap()
    }

    fn read_all(f: &dyn Storage) -> Vec<u8> {
        let mut buf = vec![0; f.len().unwrap() as usize];
        f.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn send_sync_clone() {
        fn check<T: Send + Sync + Clone + fmt::Debug>() {}
        fn check_file<T: Send + Sync + fmt::Debug>() {}
        check::<SimDisk>();
        check_file::<SimFile>();
    }

    #[test]
    fn reads_and_writes() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        assert_eq!(f.len().unwrap(), 0);
        assert!(f.is_empty().unwrap());
        f.write_at(b"hello", 3).unwrap();
        assert_eq!(read_all(&*f), b"\0\0\0hello");
        let mut buf = [0u8; 4];
        f.read_at(&mut buf, 4).unwrap();
        assert_eq!(&buf, b"ello");
        assert_eq!(f.read_at(&mut buf, 5).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(f.read_at(&mut buf, u64::MAX).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Empty reads and writes succeed anywhere and change nothing.
        f.read_at(&mut [], u64::MAX).unwrap();
        f.write_at(&[], u64::MAX).unwrap();
        assert_eq!(f.len().unwrap(), 8);
        assert!(f.raw_fd().is_none());
        assert_eq!(disk.canonical_name(p("x/../y")).unwrap(), p("x/../y"));
        assert_eq!(disk.file_names(), vec![PathBuf::from("a")]);
    }

    #[test]
    fn huge_offsets_are_errors() {
        let disk = SimDisk::with_max_file_len(4096);
        let f = open(&disk, "a");
        let refused = [io::ErrorKind::InvalidInput, io::ErrorKind::StorageFull];
        for off in [u64::MAX, u64::MAX - 1, u64::MAX - 3, 1 << 63, 4093] {
            assert!(refused.contains(&f.write_at(b"abcd", off).unwrap_err().kind()), "{off}");
        }
        assert!(refused.contains(&f.set_len(u64::MAX).unwrap_err().kind()));
        assert_eq!(f.set_len(4097).unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert_eq!(f.len().unwrap(), 0);
        assert_eq!(disk.unsynced_writes("a"), 0);
        f.write_at(b"abcd", 4092).unwrap();
        f.set_len(4096).unwrap();
        assert_eq!(f.len().unwrap(), 4096);
    }

    #[test]
    fn sync_makes_durable() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        let g = open(&disk, "b");
        f.write_at(&[1; 1000], 0).unwrap();
        g.write_at(&[2; 10], 0).unwrap();
        assert_eq!(disk.unsynced_writes("a"), 2);
        assert_eq!(disk.durable_image("a").unwrap(), b"");
        assert_eq!(disk.live_image("a").unwrap(), vec![1; 1000]);
        f.sync().unwrap();
        assert_eq!(disk.unsynced_writes("a"), 0);
        assert_eq!(disk.durable_image("a").unwrap(), vec![1; 1000]);
        // Syncing one file leaves the others alone.
        assert_eq!(disk.unsynced_writes("b"), 1);
        assert_eq!(disk.durable_image("b").unwrap(), b"");
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(disk.durable_image("a").unwrap(), vec![1; 1000]);
        assert_eq!(disk.durable_image("b").unwrap(), b"");
    }

    #[test]
    fn sync_replay_matches_live_image() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        let mut rng = SplitMix64(7);
        for round in 0..50 {
            for _ in 0..(rng.next() % 8) {
                let off = rng.next() % 5000;
                match rng.next() % 5 {
                    0 => f.set_len(rng.next() % 6000).unwrap(),
                    _ => {
                        let len = (rng.next() % 1500) as usize;
                        let byte = rng.next() as u8;
                        f.write_at(&vec![byte; len], off).unwrap();
                    }
                }
            }
            f.sync().unwrap();
            assert_eq!(disk.durable_image("a"), disk.live_image("a"), "round {round}");
        }
    }

    #[test]
    fn lose_unsynced_drops_unsynced_writes() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(&[1; 600], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 2000], 100).unwrap();
        f.set_len(5000).unwrap();
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(disk.durable_image("a").unwrap(), vec![1; 600]);
        assert_eq!(disk.live_image("a").unwrap(), vec![1; 600]);
        assert_eq!(disk.unsynced_writes("a"), 0);
        let f = disk.open(p("a"), OpenMode::Existing).unwrap();
        assert_eq!(read_all(&*f), vec![1; 600]);
    }

    #[test]
    fn partial_sector_writes_record_whole_sectors() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(&[b'a'; 700], 0).unwrap();
        f.write_at(b"b", 5).unwrap();
        f.write_at(b"cc", 511).unwrap();
        assert_eq!(disk.unsynced_writes("a"), 2 + 1 + 2);
        let st = disk.state.lock();
        let file = &st.files[p("a")];
        let recs: Vec<(usize, Vec<u8>)> = file
            .unsynced
            .iter()
            .map(|c| match c {
                Change::Write { offset, data } => (*offset, data.clone()),
                Change::SetLen(_) => panic!("no set_len issued"),
            })
            .collect();
        assert_eq!(recs[0], (0, vec![b'a'; 700]));
        let mut s0 = vec![b'a'; 512];
        s0[5] = b'b';
        assert_eq!(recs[1], (0, s0.clone()));
        s0[511] = b'c';
        let mut both = s0;
        both.extend_from_slice(b"c");
        both.extend_from_slice(&[b'a'; 700 - 513]);
        assert_eq!(recs[2], (0, both));
    }

    /// Per-sector reference model of `KeepRandomSubset`, to check that
    /// splitting writes into sectors at crash time is equivalent.
    struct Reference {
        live: Vec<u8>,
        durable: Vec<u8>,
        sectors: Vec<(usize, Vec<u8>)>,
    }

    impl Reference {
        fn write(&mut self, buf: &[u8], off: usize) {
            let end = off + buf.len();
            if end > self.live.len() {
                self.live.resize(end, 0);
            }
            self.live[off..end].copy_from_slice(buf);
            for s in off / SECTOR..end.div_ceil(SECTOR) {
                let e = ((s + 1) * SECTOR).min(self.live.len());
                self.sectors.push((s, self.live[s * SECTOR..e].to_vec()));
            }
        }

        fn crash(&self, seed: u64, tear_last: bool) -> Vec<u8> {
            let mut rng = SplitMix64(seed);
            let mut img = self.durable.clone();
            let n = self.sectors.len();
            for (i, (s, data)) in self.sectors.iter().enumerate() {
                if !rng.coin() {
                    continue;
                }
                let k = if tear_last && i + 1 == n { rng.up_to(data.len()) } else { data.len() };
                if k > 0 {
                    let at = s * SECTOR;
                    if at + k > img.len() {
                        img.resize(at + k, 0);
                    }
                    img[at..at + k].copy_from_slice(&data[..k]);
                }
            }
            img
        }
    }

    #[test]
    fn random_subset_equals_per_sector_recording() {
        for seed in 0..40u64 {
            let disk = SimDisk::new();
            let f = open(&disk, "a");
            let mut reference = Reference { live: Vec::new(), durable: Vec::new(), sectors: Vec::new() };
            f.write_at(&[9; 1500], 0).unwrap();
            f.sync().unwrap();
            reference.write(&[9; 1500], 0);
            reference.durable = reference.live.clone();
            reference.sectors.clear();
            let mut rng = SplitMix64(seed ^ 0xABCD);
            for i in 0..12 {
                let off = (rng.next() % 4000) as usize;
                let len = 1 + (rng.next() % 1300) as usize;
                let buf = vec![i as u8 + 10; len];
                f.write_at(&buf, off as u64).unwrap();
                reference.write(&buf, off);
            }
            assert_eq!(disk.unsynced_writes("a"), reference.sectors.len());
            let tear = seed % 2 == 0;
            disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: tear });
            assert_eq!(disk.durable_image("a").unwrap(), reference.crash(seed, tear), "seed {seed}");
            assert_eq!(disk.live_image("a"), disk.durable_image("a"));
            assert_eq!(disk.unsynced_writes("a"), 0);
        }
    }

    #[test]
    fn random_subset_keeps_a_subset_and_tears_the_last_sector() {
        const N: usize = 16;
        let old = vec![0xEEu8; N * SECTOR];
        let new_sector = |i: usize| -> Vec<u8> { (0..SECTOR).map(|b| (i * 7 + b % 251 + 1) as u8).collect() };
        let mut kept_counts = Vec::new();
        let mut saw_torn = false;
        for seed in 0..64 {
            let disk = SimDisk::new();
            disk.set_durable_image("a", old.clone());
            let f = open(&disk, "a");
            for i in 0..N {
                f.write_at(&new_sector(i), (i * SECTOR) as u64).unwrap();
            }
            disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: true });
            let img = disk.durable_image("a").unwrap();
            assert_eq!(img.len(), N * SECTOR);
            let mut kept = 0;
            for i in 0..N {
                let got = &img[i * SECTOR..(i + 1) * SECTOR];
                let new = new_sector(i);
                if i + 1 < N {
                    if got == new.as_slice() {
                        kept += 1;
                    } else {
                        assert_eq!(got, &old[..SECTOR], "seed {seed} sector {i}");
                    }
                } else {
                    // The torn sector: a prefix of new bytes, then old ones.
                    let k = got.iter().zip(&new).take_while(|(a, b)| a == b).count();
                    assert!(got[k..].iter().all(|&b| b == 0xEE), "seed {seed}");
                    saw_torn |= k > 0 && k < SECTOR;
                }
            }
            kept_counts.push(kept);
            // Same seed, same history: same result.
            let again = SimDisk::new();
            again.set_durable_image("a", old.clone());
            let g = open(&again, "a");
            for i in 0..N {
                g.write_at(&new_sector(i), (i * SECTOR) as u64).unwrap();
            }
            again.crash(CrashMode::KeepRandomSubset { seed, tear_last: true });
            assert_eq!(again.durable_image("a").unwrap(), img);
        }
        assert!(saw_torn);
        assert!(kept_counts.iter().any(|&k| k > 0 && k < N - 1));
        let total: usize = kept_counts.iter().sum();
        let expected = 64 * (N - 1) / 2;
        assert!(total > expected * 3 / 4 && total < expected * 5 / 4, "{total} of {}", 64 * (N - 1));
    }

    #[test]
    fn kept_write_past_durable_end_extends_with_zeros() {
        // Find a seed that keeps the only sector write and does not tear it.
        let seed = (0..).find(|&s| SplitMix64(s).coin()).unwrap();
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(b"xyz", 1030).unwrap();
        disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: false });
        let mut expect = vec![0u8; 1033];
        expect[1030..].copy_from_slice(b"xyz");
        assert_eq!(disk.durable_image("a").unwrap(), expect);
    }

    #[test]
    fn set_len_is_durable_only_after_sync() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(&[3; 2048], 0).unwrap();
        f.sync().unwrap();
        // Shrinking is lost in a crash...
        f.set_len(100).unwrap();
        assert_eq!(f.len().unwrap(), 100);
        assert_eq!(disk.durable_image("a").unwrap().len(), 2048);
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(disk.live_image("a").unwrap(), vec![3; 2048]);
        // ...and so is growing, even when writes are kept.
        let f = open(&disk, "a");
        f.set_len(10_000).unwrap();
        f.write_at(&[4; 10], 0).unwrap();
        let seed = (0..).find(|&s| SplitMix64(s).coin()).unwrap();
        disk.crash(CrashMode::KeepRandomSubset { seed, tear_last: false });
        let img = disk.durable_image("a").unwrap();
        assert_eq!(img.len(), 2048);
        assert_eq!(&img[..10], &[4; 10]);
        // A synced set_len sticks, and zero-fills what it uncovers.
        let f = open(&disk, "a");
        f.set_len(10).unwrap();
        f.set_len(20).unwrap();
        f.sync().unwrap();
        disk.crash(CrashMode::LoseUnsynced);
        let mut expect = vec![4u8; 10];
        expect.resize(20, 0);
        assert_eq!(disk.durable_image("a").unwrap(), expect);
    }

    #[test]
    fn stale_handles_fail_after_a_crash() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(b"abc", 0).unwrap();
        f.sync().unwrap();
        disk.crash(CrashMode::LoseUnsynced);
        let mut buf = [0u8; 1];
        let errs = [
            f.read_at(&mut buf, 0).unwrap_err(),
            f.write_at(b"x", 0).unwrap_err(),
            f.len().unwrap_err(),
            f.set_len(0).unwrap_err(),
            f.sync().unwrap_err(),
        ];
        for e in errs {
            assert_eq!(e.kind(), io::ErrorKind::Other);
            assert_eq!(e.to_string(), "device crashed");
        }
        // The lock died with the crash: reopen while the old handle lives.
        let g = disk.open(p("a"), OpenMode::Existing).unwrap();
        assert_eq!(read_all(&*g), b"abc");
        // Dropping the stale handle does not release the new handle's lock.
        drop(f);
        assert_eq!(disk.open(p("a"), OpenMode::Existing).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(g);
        disk.open(p("a"), OpenMode::Existing).unwrap();
    }

    #[test]
    fn locks_and_open_modes() {
        let disk = SimDisk::new();
        assert_eq!(disk.open(p("a"), OpenMode::Existing).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(disk.file_names().is_empty());
        let f = disk.open(p("a"), OpenMode::CreateNew).unwrap();
        assert_eq!(disk.open(p("a"), OpenMode::CreateNew).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        for mode in [OpenMode::Existing, OpenMode::CreateIfMissing] {
            assert_eq!(disk.open(p("a"), mode).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        }
        // Other files are independent.
        let g = disk.open(p("b"), OpenMode::CreateIfMissing).unwrap();
        drop(f);
        let f = disk.open(p("a"), OpenMode::Existing).unwrap();
        // A clone of the disk is the same disk.
        let clone = disk.clone();
        assert_eq!(clone.open(p("b"), OpenMode::Existing).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(g);
        clone.open(p("b"), OpenMode::Existing).unwrap();
        drop(f);
    }

    #[test]
    fn removed_files() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(b"abc", 0).unwrap();
        assert!(disk.remove("a"));
        assert!(!disk.remove("a"));
        assert_eq!(f.len().unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(disk.durable_image("a").is_none());
        // A new file of the same name is not reachable through the old handle.
        let g = disk.open(p("a"), OpenMode::CreateNew).unwrap();
        assert_eq!(f.len().unwrap_err().kind(), io::ErrorKind::NotFound);
        drop(f);
        assert_eq!(disk.open(p("a"), OpenMode::Existing).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(g.len().unwrap(), 0);
    }

    #[test]
    fn set_durable_image_replaces_both_images() {
        let disk = SimDisk::new();
        disk.set_durable_image("new", b"fresh".as_slice());
        assert_eq!(disk.live_image("new").unwrap(), b"fresh");
        let f = open(&disk, "a");
        f.write_at(b"unsynced", 0).unwrap();
        disk.set_durable_image("a", vec![7; 4]);
        assert_eq!(disk.unsynced_writes("a"), 0);
        assert_eq!(read_all(&*f), vec![7; 4]);
        disk.crash(CrashMode::KeepRandomSubset { seed: 1, tear_last: true });
        assert_eq!(disk.durable_image("a").unwrap(), vec![7; 4]);
    }

    #[test]
    fn fail_after_counts_operations() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        let g = open(&disk, "b");
        f.write_at(b"abc", 0).unwrap();
        assert_eq!(disk.op_count(), 1);
        disk.fail_after(0);
        let e = f.len().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other);
        assert_eq!(e.to_string(), "injected I/O error");
        assert_eq!(disk.op_count(), 2);
        disk.clear_faults();

        disk.fail_after(3);
        let mut buf = [0u8; 3];
        f.read_at(&mut buf, 0).unwrap(); // 0
        g.write_at(b"x", 0).unwrap(); // 1
        f.sync().unwrap(); // 2
        assert_eq!(g.set_len(0).unwrap_err().to_string(), "injected I/O error"); // 3
        assert!(f.write_at(b"zzz", 0).is_err());
        assert!(g.sync().is_err());
        // Failed operations have no effect.
        assert_eq!(disk.live_image("a").unwrap(), b"abc");
        assert_eq!(disk.live_image("b").unwrap(), b"x");
        assert_eq!(disk.op_count(), 8);
        disk.clear_faults();
        g.sync().unwrap();
        assert_eq!(disk.durable_image("b").unwrap(), b"x");
    }

    #[test]
    fn fail_syncs_makes_nothing_durable() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        f.write_at(b"abc", 0).unwrap();
        disk.fail_syncs(true);
        assert_eq!(f.sync().unwrap_err().kind(), io::ErrorKind::Other);
        // Other operations still work.
        f.write_at(b"d", 3).unwrap();
        assert_eq!(disk.durable_image("a").unwrap(), b"");
        assert_eq!(disk.unsynced_writes("a"), 2);
        disk.fail_syncs(false);
        f.sync().unwrap();
        assert_eq!(disk.durable_image("a").unwrap(), b"abcd");
    }

    #[test]
    fn large_sequential_writes_are_cheap() {
        let disk = SimDisk::new();
        let f = open(&disk, "a");
        let chunk = vec![0x5A; 1 << 16];
        for i in 0..320u64 {
            f.write_at(&chunk, i << 16).unwrap();
            if i % 16 == 15 {
                f.sync().unwrap();
            }
        }
        assert_eq!(f.len().unwrap(), 320 << 16);
        assert_eq!(disk.unsynced_writes("a"), 0);
        disk.crash(CrashMode::KeepRandomSubset { seed: 3, tear_last: true });
        assert_eq!(disk.durable_image("a").unwrap().len(), 320 << 16);
    }
}
