//! Real files and block devices.

use super::{OpenMode, Storage, Vfs};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A file or block device, locked exclusively (`flock`) while open.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
    /// The same file opened again with `O_DIRECT`, on first use (`None` if
    /// the file system refuses it).
    direct: OnceLock<Option<File>>,
    /// Set once a direct write was refused: page writes go through the
    /// page cache from then on.
    direct_refused: AtomicBool,
}

/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest
/// logical block size of common devices).
const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    /// Opens (and with `mode`, creates with permissions 0600) the file at
    /// `path` and locks it exclusively. Lock conflicts, with another process
    /// or another handle of this one, are [`io::ErrorKind::WouldBlock`].
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(0o600);
        match mode {
            OpenMode::Existing => {}
            OpenMode::CreateIfMissing => {
                opts.create(true);
            }
            OpenMode::CreateNew => {
                opts.create_new(true);
            }
        }
        let file = opts.open(path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is locked by another user", path.display()),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let block_device = rustix::fs::fstat(&file)
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice)
            .unwrap_or(false);
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            block_device,
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        })
    }

    /// The `O_DIRECT` handle, opened through `/proc/self/fd` so it is the
    /// same file even if the path was renamed meanwhile. It needs no lock of
    /// its own: it lives and dies with this locked handle.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let fd = rustix::fd::AsRawFd::as_raw_fd(&self.file);
                OpenOptions::new()
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(format!("/proc/self/fd/{fd}"))
                    .ok()
            })
            .as_ref()
    }

    /// The path this device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            // Block devices report st_size 0; their end is their size.
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            if self.len()? >= len {
                return Ok(());
            }
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("block device {} cannot grow", self.path.display()),
            ));
        }
        self.file.set_len(len)
    }
    fn write_pages_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        if aligned && !self.direct_refused.load(Ordering::Relaxed) {
            if let Some(direct) = self.direct_file() {
                match direct.write_all_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    // Refused (an alignment the device does not accept, a
                    // file system without direct I/O): the buffered write
                    // below redoes all of it.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        // One inode: this flushes what either handle wrote.
        self.file.sync_data()
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}

/// Opens real files and block devices.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileVfs;

impl Vfs for FileVfs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(path, mode)?))
    }
    fn canonical_name(&self, path: &Path) -> io::Result<PathBuf> {
        match std::fs::canonicalize(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not created yet: resolve the directory, keep the name.
                let file = path.file_name().ok_or(e)?;
                let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                Ok(std::fs::canonicalize(dir)?.join(file))
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page writes land whether the direct path takes them (aligned
    /// memory, offset and length) or falls back to the page cache.
    #[test]
    fn page_writes_read_back_aligned_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStorage::open(&dir.path().join("seg"), OpenMode::CreateNew).unwrap();
        f.set_len(8 * DIRECT_ALIGN as u64).unwrap();
        // An aligned buffer: a page-aligned slice of a larger allocation.
        let mut backing = vec![0u8; 4 * DIRECT_ALIGN];
        let skip = backing.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut backing[skip..skip + 2 * DIRECT_ALIGN];
        aligned.fill(0xab);
        f.write_pages_at(aligned, DIRECT_ALIGN as u64).unwrap();
        if f.direct_file().is_some() {
            // The file system takes O_DIRECT: an aligned write must use it.
            assert!(!f.direct_refused.load(Ordering::Relaxed), "aligned direct write refused");
        }
        // Unaligned length and offset: the buffered path.
        f.write_pages_at(&[0xcd; 100], 5 * DIRECT_ALIGN as u64 + 3).unwrap();
        f.sync().unwrap();
        let mut all = vec![0u8; 8 * DIRECT_ALIGN];
        f.read_at(&mut all, 0).unwrap();
        assert!(all[..DIRECT_ALIGN].iter().all(|&b| b == 0));
        assert!(all[DIRECT_ALIGN..3 * DIRECT_ALIGN].iter().all(|&b| b == 0xab));
        let at = 5 * DIRECT_ALIGN + 3;
        assert!(all[at..at + 100].iter().all(|&b| b == 0xcd));
        assert!(all[at + 100..].iter().all(|&b| b == 0));
        // A buffered write after a direct one to the same range is seen.
        f.write_at(&[0x11; 8], DIRECT_ALIGN as u64).unwrap();
        let mut head = [0u8; 16];
        f.read_at(&mut head, DIRECT_ALIGN as u64).unwrap();
        assert_eq!(
            head,
            [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab]
        );
    }
}
