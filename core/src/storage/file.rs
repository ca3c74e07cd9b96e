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

/// What identifies `file` across renames: inode and birth time (`None` for
/// block devices, whose nodes are made anew at every boot).
fn file_identity(file: &File, block_device: bool) -> io::Result<Option<DeviceId>> {
    if block_device {
        return Ok(None);
    }
    use rustix::fs::{statx, AtFlags, StatxFlags};
    match statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::INO | StatxFlags::BTIME) {
        Ok(st) => {
            let birth = if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::BTIME) {
                (st.stx_btime.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(u64::from(st.stx_btime.tv_nsec))
            } else {
                0
            };
            Ok(Some(DeviceId { file: st.stx_ino, birth }))
        }
        // No statx (an old kernel, or a sandbox that forbids it): the
        // inode alone, with no birth time (the identity then stays the
        // same whichever way the file is opened later).
        Err(_) => Ok(Some(DeviceId { file: rustix::fs::fstat(file)?.st_ino, birth: 0 })),
    }
}

/// The size of `file`: its length, or for a block device its end (block
/// devices report `st_size` 0).
fn file_len(file: &File, block_device: bool) -> io::Result<u64> {
    if block_device {
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(file.metadata()?.len())
    }
}

/// [`Storage::written_from`] for files: `SEEK_DATA` and `SEEK_HOLE`.
/// Where the file system cannot tell (or for a block device), everything
/// may hold data.
fn written_from(file: &File, block_device: bool, offset: u64) -> io::Result<Option<std::ops::Range<u64>>> {
    use rustix::fs::{seek, SeekFrom};
    let unknown = Ok(Some(offset..u64::MAX));
    if block_device {
        return unknown;
    }
    // The descriptor's offset moves; every read and write here is
    // positioned (`pread`/`pwrite`), so nothing depends on it.
    let start = match seek(file, SeekFrom::Data(offset)) {
        Ok(start) => start,
        // Nothing but holes from `offset` to the end.
        Err(e) if e == rustix::io::Errno::NXIO => return Ok(None),
        Err(_) => return unknown,
    };
    match seek(file, SeekFrom::Hole(start)) {
        Ok(end) if end > start => Ok(Some(start..end)),
        _ => Ok(Some(start..u64::MAX)),
    }
}

fn is_block_device(file: &File) -> bool {
    rustix::fs::fstat(file)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice)
        .unwrap_or(false)
}

/// A file or block device opened for reading only and **not locked**
/// ([`Vfs::open_read_only`]): a view of a device that a program may hold
/// and write at the same time. Every write, `set_len` and owner-mark change
/// fails with [`io::ErrorKind::PermissionDenied`]; `sync` has nothing to do.
#[derive(Debug)]
pub struct ReadOnlyFile {
    file: File,
    path: PathBuf,
    block_device: bool,
}

impl ReadOnlyFile {
    /// Opens `path` with [`open_read_only`] (regular files and block
    /// devices only; never waits, never locks).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = open_read_only(path)?;
        let block_device = is_block_device(&file);
        Ok(ReadOnlyFile { file, path: path.to_path_buf(), block_device })
    }

    fn refuse(&self) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is open read-only", self.path.display()))
    }
}

impl Storage for ReadOnlyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(self.refuse())
    }
    fn len(&self) -> io::Result<u64> {
        file_len(&self.file, self.block_device)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(self.refuse())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn identity(&self) -> io::Result<Option<DeviceId>> {
        file_identity(&self.file, self.block_device)
    }
    fn written_from(&self, offset: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        written_from(&self.file, self.block_device, offset)
    }
    fn set_owner_mark(&self, _mark: Option<&[u8]>) -> io::Result<()> {
        Err(self.refuse())
    }
}

/// How long an open waits for a file's lock before it reports the file
/// in use (see [`FileStorage::open`]).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// A file or block device, locked exclusively (`flock`) while open.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
    /// Its entry in [`HELD`].
    held: (u64, u64),
}

/// The files (device, inode) this process holds locked through a
/// [`FileStorage`]: opening one again is refused at once, without the
/// wait meant for a lock a child process holds for a moment.
static HELD: parking_lot::Mutex<std::collections::BTreeSet<(u64, u64)>> =
    parking_lot::Mutex::new(std::collections::BTreeSet::new());

/// The (device, inode) of an open file, or for a block device the device
/// it names (whatever node names it); and whether it is a block device.
fn held_id(file: &File) -> io::Result<((u64, u64), bool)> {
    let st = rustix::fs::fstat(file)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice {
        return Ok(((u64::MAX, st.st_rdev), true));
    }
    Ok(((st.st_dev, st.st_ino), false))
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Before the descriptor is closed (the lock released): an open of
        // this file by another thread then waits for the close instead of
        // being refused.
        HELD.lock().remove(&self.held);
    }
}

impl FileStorage {
    /// Opens (and with `mode`, creates with permissions 0600) the file at
    /// `path` and locks it exclusively. Lock conflicts, with another process
    /// or another handle of this one, are [`io::ErrorKind::WouldBlock`]: at
    /// once if a handle of this process holds the file (under any name),
    /// else after a wait of up to 250 ms for a lock held only for a moment
    /// (a child process between `fork` and `exec` holds its parent's
    /// locks).
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
        let (id, block_device) = held_id(&file)?;
        // Held by a handle of this process: no wait (it is not a child's
        // passing copy), and a clear message.
        if HELD.lock().contains(&id) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is held by a handle of this process (an instance using it, or a region or segment \
                     handle kept after its instance was dropped)",
                    path.display()
                ),
            ));
        }
        // A lock held for a moment is waited out: a child process between
        // `fork` and `exec` holds a copy of every descriptor of its parent,
        // and with it the lock of a file the parent had open then (closed
        // at its `exec`: descriptors are close-on-exec). A lock still held
        // after about a quarter of a second is a real user.
        let mut wait = std::time::Duration::from_millis(1);
        let mut waited = std::time::Duration::ZERO;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK && waited < LOCK_PATIENCE => {
                    std::thread::sleep(wait);
                    waited += wait;
                    wait = (wait * 2).min(std::time::Duration::from_millis(32));
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is locked by another process", path.display()),
                    ))
                }
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) => return Err(e.into()),
            }
        }
        HELD.lock().insert(id);
        Ok(FileStorage { file, path: path.to_path_buf(), block_device, held: id })
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
        file_len(&self.file, self.block_device)
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
        if i64::try_from(len).is_err() {
            // `File::set_len` says only "out of range integral type
            // conversion attempted".
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("length {len} is more than a file holds (2^63 - 1 bytes)"),
            ));
        }
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device || len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            // A file system without fallocate: the space is found at write.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
    fn identity(&self) -> io::Result<Option<DeviceId>> {
        file_identity(&self.file, self.block_device)
    }
    fn written_from(&self, offset: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        written_from(&self.file, self.block_device, offset)
    }
    fn is_unlinked(&self) -> io::Result<bool> {
        if self.block_device {
            return Ok(false);
        }
        // statx asking for the link count only: an `fstat` here (which
        // reads every timestamp) made the next fdatasync about 1.5x slower
        // on ext4 (docs/BENCHMARKS.md, log format 2).
        use rustix::fs::{statx, AtFlags, StatxFlags};
        match statx(&self.file, "", AtFlags::EMPTY_PATH, StatxFlags::NLINK) {
            Ok(st) => Ok(st.stx_nlink == 0),
            Err(_) => Ok(rustix::fs::fstat(&self.file)?.st_nlink == 0),
        }
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

/// Syncs the folder holding `path` (`.` for a bare name), making a name
/// made, removed or changed in it durable (`fsync` of the file alone does
/// not). `FileVfs` does this after every create, remove, copy and rename;
/// a program that makes folders for its files calls it for each new one.
pub fn sync_folder_of(path: &Path) -> io::Result<()> {
    File::open(folder_of(path))?.sync_all()
}

/// The folder holding `path`: its parent, or `.` for a bare name.
pub fn folder_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

impl Vfs for FileVfs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let creates = match mode {
            OpenMode::Existing => false,
            OpenMode::CreateNew => true,
            OpenMode::CreateIfMissing => !path.try_exists()?,
        };
        let file = FileStorage::open(path, mode)?;
        if creates {
            // The new name is durable before anything can record it (a
            // log's segment dictionary, a heap folder's files).
            if let Err(e) = sync_folder_of(path) {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        }
        Ok(Arc::new(file))
    }
    fn open_read_only(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(ReadOnlyFile::open(path)?))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        sync_folder_of(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        // The new name is durable once its folder is synced.
        sync_folder_of(to)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut src = File::open(from)?;
        let mut dst = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
        let copied = io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all()).and_then(|()| sync_folder_of(to));
        if copied.is_err() {
            // A partial copy (a full disk) is no copy: not left behind.
            drop(dst);
            let _ = std::fs::remove_file(to);
        }
        copied
    }
    fn canonical_name(&self, path: &Path) -> io::Result<PathBuf> {
        match std::fs::canonicalize(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not created yet: resolve the directory, keep the name.
                let file = path.file_name().ok_or(e)?;
                Ok(std::fs::canonicalize(folder_of(path))?.join(file))
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
    fn a_lock_held_for_a_moment_is_waited_out_and_a_held_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // As a child between fork and exec would: another open file
        // description, not a handle of this process's, holds the lock for
        // 40 ms.
        let holder = std::fs::File::create_new(&path).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        // Timed from before the holder's 40 ms start: at least 40 ms pass.
        let t = std::time::Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(40));
            drop(holder);
        });
        let second = FileStorage::open(&path, OpenMode::Existing).unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(40), "took the lock while it was held");
        release.join().unwrap();
        // Held by this process: refused at once.
        let t = std::time::Instant::now();
        let err = FileStorage::open(&path, OpenMode::Existing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("a handle of this process"), "{err}");
        assert!(t.elapsed() < LOCK_PATIENCE, "waited for its own handle");
        // Through another name of the same file too.
        let link = dir.path().join("link");
        std::fs::hard_link(&path, &link).unwrap();
        assert!(FileStorage::open(&link, OpenMode::Existing).is_err());
        drop(second);
        // Held for good by another open file description: refused once the
        // patience is spent.
        let holder = std::fs::File::open(&path).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let t = std::time::Instant::now();
        let err = FileStorage::open(&path, OpenMode::Existing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(t.elapsed() >= LOCK_PATIENCE, "gave up early");
        // Released: opens again.
        drop(holder);
        FileStorage::open(&link, OpenMode::Existing).unwrap();
    }

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

    #[test]
    fn read_only_handles_coexist_with_the_lock_and_never_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let locked = FileVfs.open(&path, OpenMode::CreateNew).unwrap();
        locked.write_at(b"locked bytes", 0).unwrap();
        let view = FileVfs.open_read_only(&path).unwrap();
        let mut buf = [0u8; 6];
        view.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"locked");
        assert_eq!(view.len().unwrap(), 12);
        assert_eq!(view.identity().unwrap(), locked.identity().unwrap());
        for e in [view.write_at(b"x", 0).unwrap_err(), view.set_len(0).unwrap_err()] {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        assert_eq!(view.set_owner_mark(Some(b"m")).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        view.sync().unwrap();
        // The view holds no lock: a second exclusive open is refused only by the first.
        drop(locked);
        let _again = FileVfs.open(&path, OpenMode::Existing).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"locked bytes");
    }
}
