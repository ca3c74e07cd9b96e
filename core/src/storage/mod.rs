//! The one storage abstraction every byte of I/O goes through.
//!
//! A [`Storage`] is a random-access device: a file, a block device, or (with
//! the `testing` feature) the simulated device (`rvm_core::testing`) that models
//! crashes. A [`Vfs`] opens devices by path, so recovery can reopen the
//! segments a log names.

use std::fmt::Debug;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

mod file;
pub use crate::log::format::DeviceId;
mod mem;
pub use file::{folder_of, open_read_only, sync_folder_of, FileStorage, FileVfs, ReadOnlyFile};
pub use mem::MemVfs;

/// A random-access device with explicit durability.
///
/// Writes become durable only after [`Storage::sync`] returns `Ok`; a crash
/// may lose any unsynced write and may tear the last sector written.
/// Implementations hold an exclusive lock on the device for as long as the
/// value lives (see [`Vfs::open`]).
pub trait Storage: Send + Sync + Debug {
    /// Fills `buf` from `offset`. Reading past the end is an
    /// [`io::ErrorKind::UnexpectedEof`] error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the device if it is a file.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The device's size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Grows or shrinks the device (files only; block devices refuse).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every earlier write durable (`fdatasync` for files).
    fn sync(&self) -> io::Result<()>;

    /// Allocates the device's blocks for `[offset, offset + len)` (inside
    /// its length), so that writing them later cannot fail for want of
    /// space: a full disk is an error of kind
    /// [`io::ErrorKind::StorageFull`] now. The default does nothing (for
    /// devices that have their space already).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// The first stretch at or after `offset` that may hold written
    /// bytes, or `None` if everything from `offset` on reads as zeros
    /// because it was never written (a hole of a sparse file). Bytes
    /// between the stretches read as zeros. A reader looking for data past
    /// the end of a log skips holes this way instead of reading them (each
    /// 4 KiB of a hole read costs the kernel a zeroed page). The default
    /// (for devices that cannot tell): everything may hold data.
    fn written_from(&self, offset: u64) -> io::Result<Option<std::ops::Range<u64>>> {
        Ok(Some(offset..u64::MAX))
    }
    /// The file descriptor behind the device, if there is one: it lets a
    /// region be mapped copy-on-demand (a private file mapping). Devices
    /// without one are mapped by copying at map time.
    fn raw_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Whether the device is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// What identifies this file across renames (inode and birth time), so
    /// a log can tell that the file under a recorded name was replaced.
    /// `None` (the default) where there is no stable identity, as for block
    /// devices, whose device nodes are made anew at every boot.
    fn identity(&self) -> io::Result<Option<DeviceId>> {
        Ok(None)
    }
    /// Whether the file has lost its last name (it was unlinked or renamed
    /// over while open): writes to it then reach no file anyone can open.
    fn is_unlinked(&self) -> io::Result<bool> {
        Ok(false)
    }
    /// The owner mark: which log may hold unapplied records for this
    /// segment (an extended attribute on files). `None` if there is none
    /// or the device cannot carry one.
    fn owner_mark(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Sets (or, with `None`, removes) the owner mark durably. Devices that
    /// cannot carry one ignore it (the default).
    fn set_owner_mark(&self, mark: Option<&[u8]>) -> io::Result<()> {
        let _ = mark;
        Ok(())
    }
}

/// Whether [`Vfs::open`] may create the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// The device must exist.
    Existing,
    /// Create the device (an empty file, mode 0600) if it does not exist.
    CreateIfMissing,
    /// Create the device; it is an error if it exists.
    CreateNew,
}

/// Opens devices by path; one `Vfs` is one crash domain.
pub trait Vfs: Send + Sync + Debug {
    /// Opens `path` and takes an exclusive lock on it for the life of the
    /// returned handle. A device that is already open (in this process or
    /// another) is an [`io::ErrorKind::WouldBlock`] error. A file this call
    /// creates has a durable name when it returns (a crash does not take
    /// the name away; its contents are durable as far as synced).
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>>;
    /// Opens the existing device at `path` for reading only, **without**
    /// taking the lock: a view of a device that another handle (in this
    /// process or another) may hold and write meanwhile, as inspection tools
    /// use it ([`crate::log::inspect::LogInspector::open_shared`]). Writes
    /// through the handle fail with [`io::ErrorKind::PermissionDenied`].
    /// The default refuses ([`io::ErrorKind::Unsupported`]).
    fn open_read_only(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("cannot open {} read-only", path.display())))
    }
    /// Canonical name of `path`, the form recorded in a log's segment
    /// dictionary (absolute for files). Works for paths that do not exist
    /// yet (the name a create would use).
    fn canonical_name(&self, path: &Path) -> io::Result<std::path::PathBuf>;
    /// Removes the device at `path` durably (used to take back a segment
    /// file whose creation failed half-way, and by
    /// [`crate::Rvm::delete_segment`]). The default refuses
    /// ([`io::ErrorKind::Unsupported`]).
    fn remove(&self, path: &Path) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("cannot remove {}", path.display())))
    }
    /// Copies the whole device at `from` to a new file `to` and syncs it
    /// and its name (used to keep a damaged log before a salvage rewrites it). The
    /// default refuses ([`io::ErrorKind::Unsupported`]).
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _ = to;
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("cannot copy {}", from.display())))
    }
    /// Renames `from` to `to` durably (replacing a file there), keeping the
    /// file's identity. The default refuses ([`io::ErrorKind::Unsupported`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _ = to;
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("cannot rename {}", from.display())))
    }
    /// Whether a device exists at `path` (the default opens it: a locked
    /// device exists).
    fn exists(&self, path: &Path) -> io::Result<bool> {
        match self.open(path, OpenMode::Existing) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
