//! Devices held in memory: [`MemVfs`].

use super::{OpenMode, Storage, Vfs};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Files held in memory, for work that must not touch the disk: inspection
/// tools build a recovered image of a segment in memory and open it here
/// (`rvmutl heap check` loads a heap this way, writing nothing to the real
/// files).
///
/// Each path is its own canonical name. Devices are locked exclusively
/// while a handle from [`Vfs::open`] lives, as the [`Vfs`] contract asks;
/// [`Vfs::open_read_only`] gives unlocked handles that cannot write. Writes
/// and syncs only change memory: nothing here is durable, and there is no
/// crash model (that is `rvm_core::testing::SimDisk`, with the `testing`
/// feature). A device grows at most to [`MemVfs::max_len`] bytes.
///
/// ```
/// use rvm_core::storage::{MemVfs, OpenMode, Vfs};
/// use std::path::Path;
/// let vfs = MemVfs::new();
/// vfs.insert("seg", b"bytes".to_vec());
/// let dev = vfs.open(Path::new("seg"), OpenMode::Existing).unwrap();
/// dev.write_at(b"B", 0).unwrap();
/// assert_eq!(vfs.image("seg").unwrap(), b"Bytes");
/// assert!(vfs.open(Path::new("seg"), OpenMode::Existing).is_err()); // locked
/// ```
#[derive(Clone, Default)]
pub struct MemVfs {
    files: Arc<Mutex<HashMap<PathBuf, Arc<MemFile>>>>,
    max_len: Option<u64>,
}

/// One file: its bytes and whether a read-write handle holds it.
#[derive(Default)]
struct MemFile {
    bytes: Mutex<Vec<u8>>,
    locked: AtomicBool,
}

/// A handle on a [`MemVfs`] file.
struct MemHandle {
    file: Arc<MemFile>,
    path: PathBuf,
    writable: bool,
    max_len: u64,
}

/// The default largest device: 1 TiB (a bound on what a hostile offset can
/// make a write allocate; the memory must be there anyway).
const DEFAULT_MAX_LEN: u64 = 1 << 40;

impl MemVfs {
    /// An empty set of files.
    pub fn new() -> Self {
        MemVfs::default()
    }

    /// The same, with devices limited to `max_len` bytes: writes and
    /// `set_len` beyond it fail with [`io::ErrorKind::InvalidInput`].
    pub fn with_max_len(max_len: u64) -> Self {
        MemVfs { max_len: Some(max_len), ..MemVfs::default() }
    }

    /// The largest device this set holds.
    pub fn max_len(&self) -> u64 {
        self.max_len.unwrap_or(DEFAULT_MAX_LEN)
    }

    /// Creates or replaces the file at `path` with `bytes`.
    pub fn insert(&self, path: impl AsRef<Path>, bytes: Vec<u8>) {
        let file = MemFile { bytes: Mutex::new(bytes), locked: AtomicBool::new(false) };
        self.files.lock().insert(path.as_ref().to_path_buf(), Arc::new(file));
    }

    /// A copy of the bytes of the file at `path`.
    pub fn image(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.files.lock().get(path.as_ref()).map(|f| f.bytes.lock().clone())
    }
}

impl fmt::Debug for MemVfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<PathBuf> = self.files.lock().keys().cloned().collect();
        f.debug_struct("MemVfs").field("files", &names).finish_non_exhaustive()
    }
}

impl fmt::Debug for MemHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemHandle").field("path", &self.path).field("writable", &self.writable).finish()
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist (in memory)", path.display()))
}

impl Vfs for MemVfs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let mut files = self.files.lock();
        let file = match (files.get(path), mode) {
            (Some(_), OpenMode::CreateNew) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())))
            }
            (Some(f), _) => Arc::clone(f),
            (None, OpenMode::Existing) => return Err(not_found(path)),
            (None, _) => Arc::clone(files.entry(path.to_path_buf()).or_default()),
        };
        if file.locked.swap(true, Ordering::AcqRel) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another user", path.display()),
            ));
        }
        Ok(Arc::new(MemHandle { file, path: path.to_path_buf(), writable: true, max_len: self.max_len() }))
    }

    fn open_read_only(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        let file = self.files.lock().get(path).cloned().ok_or_else(|| not_found(path))?;
        Ok(Arc::new(MemHandle { file, path: path.to_path_buf(), writable: false, max_len: self.max_len() }))
    }

    fn canonical_name(&self, path: &Path) -> io::Result<PathBuf> {
        Ok(path.to_path_buf())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files.lock().remove(path).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let bytes = self.image(from).ok_or_else(|| not_found(from))?;
        let mut files = self.files.lock();
        if files.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", to.display())));
        }
        files.insert(to.to_path_buf(), Arc::new(MemFile { bytes: Mutex::new(bytes), locked: AtomicBool::new(false) }));
        Ok(())
    }
}

impl MemHandle {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is open read-only", self.path.display())))
        }
    }

    fn check_len(&self, end: Option<u64>) -> io::Result<usize> {
        match end {
            Some(end) if end <= self.max_len => usize::try_from(end).map_err(|_| too_large(&self.path)),
            _ => Err(too_large(&self.path)),
        }
    }
}

fn too_large(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{} would grow beyond its limit (in memory)", path.display()))
}

impl Storage for MemHandle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.file.bytes.lock();
        let start = usize::try_from(offset).ok().filter(|&s| s <= bytes.len());
        match start.and_then(|s| s.checked_add(buf.len()).filter(|&e| e <= bytes.len()).map(|e| (s, e))) {
            Some((s, e)) => {
                buf.copy_from_slice(&bytes[s..e]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read past the end of {}", self.path.display()),
            )),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let start = self.check_len(Some(offset))?;
        let end = self.check_len(offset.checked_add(buf.len() as u64))?;
        let mut bytes = self.file.bytes.lock();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.bytes.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let len = self.check_len(Some(len))?;
        self.file.bytes.lock().resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for MemHandle {
    fn drop(&mut self) {
        if self.writable {
            self.file.locked.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lock_read_write_and_refuse_what_they_must() {
        let vfs = MemVfs::with_max_len(1 << 16);
        let p = Path::new("f");
        assert_eq!(vfs.open(p, OpenMode::Existing).unwrap_err().kind(), io::ErrorKind::NotFound);
        let f = vfs.open(p, OpenMode::CreateNew).unwrap();
        assert_eq!(vfs.open(p, OpenMode::CreateIfMissing).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        f.write_at(b"abc", 10).unwrap();
        assert_eq!(f.len().unwrap(), 13);
        let mut buf = [9u8; 4];
        f.read_at(&mut buf, 9).unwrap();
        assert_eq!(&buf, b"\0abc");
        assert_eq!(f.read_at(&mut buf, 12).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(f.read_at(&mut buf, u64::MAX).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(f.write_at(b"x", 1 << 16).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(f.write_at(b"x", u64::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(f.set_len(1 << 17).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A read-only view sees the bytes, writes nothing and takes no lock.
        let view = vfs.open_read_only(p).unwrap();
        view.read_at(&mut buf[..3], 10).unwrap();
        assert_eq!(&buf[..3], b"abc");
        assert_eq!(view.write_at(b"x", 0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(view.set_len(0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        drop(f);
        let g = vfs.open(p, OpenMode::Existing).unwrap();
        g.set_len(2).unwrap();
        drop(view);
        assert_eq!(vfs.image(p).unwrap(), [0, 0]);
        vfs.copy(p, Path::new("g")).unwrap();
        assert_eq!(vfs.copy(p, Path::new("g")).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        vfs.remove(Path::new("g")).unwrap();
        assert!(vfs.image("g").is_none());
    }

    #[test]
    fn a_log_and_an_instance_run_in_memory() {
        use crate::{CommitMode, MapSpec, Options, RestoreMode, Rvm};
        let vfs = MemVfs::new();
        crate::create_log_with(&vfs, Path::new("log"), 256 << 10).unwrap();
        vfs.insert("seg", vec![0u8; 8192]);
        let rvm = Rvm::open_with(Arc::new(vfs.clone()), Path::new("log"), Options::default()).unwrap();
        let seg = rvm.open_segment("seg").unwrap();
        let r = rvm.map(&seg, MapSpec::new(0, 4096)).unwrap();
        let mut tx = rvm.begin(RestoreMode::NoRestore).unwrap();
        // SAFETY: single-threaded test; nothing else touches the region.
        unsafe { tx.modify_bytes(r.addr() + 5, b"kept").unwrap() };
        tx.commit(CommitMode::Flush).unwrap();
        rvm.truncate().unwrap();
        drop(r);
        rvm.close().unwrap();
        assert_eq!(&vfs.image("seg").unwrap()[5..9], b"kept");
    }
}
