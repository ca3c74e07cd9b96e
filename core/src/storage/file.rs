//! Real files and block devices.

use super::{DeviceId, OpenMode, Storage, Vfs};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens a file or block device for reading only, without locking it (to
/// inspect a device a program may hold). Anything else is refused at once
/// with [`io::ErrorKind::InvalidInput`]: a FIFO (whose plain `open` would
/// wait for a writer), a character device, a directory.
pub fn open_read_only(path: &Path) -> io::Result<File> {
    use rustix::fs::{FileType, OFlags};
    // Non-blocking, so that a FIFO's open returns (to be refused) instead of
    // waiting for its other end.
    let file = OpenOptions::new().read(true).custom_flags(OFlags::NONBLOCK.bits() as i32).open(path)?;
    let what = match FileType::from_raw_mode(rustix::fs::fstat(&file)?.st_mode) {
        FileType::RegularFile | FileType::BlockDevice => {
            rustix::fs::fcntl_setfl(&file, rustix::fs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
            return Ok(file);
        }
        FileType::Fifo => "a FIFO",
        FileType::CharacterDevice => "a character device",
        FileType::Directory => "a directory",
        FileType::Socket => "a socket",
        _ => "of an unknown type",
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a regular file or block device ({what})")))
}

/// A file or block device, locked exclusively (`flock`) while open.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
}

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
        Ok(FileStorage { file, path: path.to_path_buf(), block_device })
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
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
    fn identity(&self) -> io::Result<Option<DeviceId>> {
        if self.block_device {
            return Ok(None);
        }
        use rustix::fs::{statx, AtFlags, StatxFlags};
        match statx(&self.file, "", AtFlags::EMPTY_PATH, StatxFlags::INO | StatxFlags::BTIME) {
            Ok(st) => {
                let birth = if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::BTIME) {
                    (st.stx_btime.tv_sec as u64)
                        .wrapping_mul(1_000_000_000)
                        .wrapping_add(u64::from(st.stx_btime.tv_nsec))
                } else {
                    0
                };
                Ok(Some(DeviceId { file: st.stx_ino, birth }))
            }
            // No statx (an old kernel, or a sandbox that forbids it): the
            // inode alone, with no birth time (the identity then stays the
            // same whichever way the file is opened later).
            Err(_) => Ok(Some(DeviceId { file: rustix::fs::fstat(&self.file)?.st_ino, birth: 0 })),
        }
    }
    fn is_unlinked(&self) -> io::Result<bool> {
        Ok(!self.block_device && rustix::fs::fstat(&self.file)?.st_nlink == 0)
    }
    fn owner_mark(&self) -> io::Result<Option<Vec<u8>>> {
        if self.block_device {
            return Ok(None);
        }
        let mut buf = vec![0u8; MAX_MARK];
        match rustix::fs::fgetxattr(&self.file, OWNER_XATTR, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
    fn set_owner_mark(&self, mark: Option<&[u8]>) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        let r = match mark {
            Some(m) => rustix::fs::fsetxattr(&self.file, OWNER_XATTR, m, rustix::fs::XattrFlags::empty()),
            None => match rustix::fs::fremovexattr(&self.file, OWNER_XATTR) {
                Err(e) if e == rustix::io::Errno::NODATA => Ok(()),
                r => r,
            },
        };
        match r {
            // A file system without user attributes carries no mark: the
            // cross-log check is off there (documented).
            Err(e) if e == rustix::io::Errno::NOTSUP => Ok(()),
            Err(e) => Err(e.into()),
            // Attributes are metadata: fdatasync may not cover them.
            Ok(()) => rustix::fs::fsync(&self.file).map_err(Into::into),
        }
    }
}

/// The extended attribute holding a segment's owner mark.
const OWNER_XATTR: &str = "user.rvm.log";
/// The longest owner mark read (a log id and a path).
const MAX_MARK: usize = 16 + 4096;

/// Opens real files and block devices.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileVfs;

impl Vfs for FileVfs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(path, mode)?))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        // The new name is durable once its folder is synced.
        let dir = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut src = File::open(from)?;
        let mut dst = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
        io::copy(&mut src, &mut dst)?;
        dst.sync_all()
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
    use rustix::fs::{FileType, Mode, OFlags, CWD};

    #[test]
    fn open_read_only_takes_files_and_refuses_the_rest_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"bytes").unwrap();
        let f = open_read_only(&file).unwrap();
        assert!(!rustix::fs::fcntl_getfl(&f).unwrap().contains(OFlags::NONBLOCK), "left non-blocking");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        for (path, what) in [(&fifo, "(a FIFO)"), (&dir.path().to_path_buf(), "(a directory)")] {
            let e = open_read_only(path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().ends_with(what), "{e}");
        }
        let missing = open_read_only(&dir.path().join("none")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
