//! Write-protect tracking by the kernel: `userfaultfd` in asynchronous
//! write-protect mode and the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! A range registered here is write-protected page by page (no `mprotect`,
//! no VMA split). The first store to a protected page takes an ordinary
//! page fault that the kernel resolves by itself (no signal, no thread
//! switch): it makes the page writable and remembers it as *written*.
//! [`Uffd::written`] lists the written pages of a range in one system call,
//! and protects them again in the same call when asked. Stores by the
//! kernel on the process's behalf (`read(2)` into the range) are caught the
//! same way.
//!
//! What the kernel does not say is *who* wrote: any thread's store is
//! resolved silently. `crate::tracked` documents what follows from that.
//!
//! The unsafe fence for these system calls: every `unsafe` block of this
//! feature is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Why write-protect tracking cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("write-protect tracking (userfaultfd asynchronous write-protect, PAGEMAP_SCAN) is not available: {0}")]
pub(crate) struct Unavailable(pub String);

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
mod sys {
    /// `_IOC` with the generic encoding (x86-64, arm64, riscv64).
    const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    #[repr(C)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    pub struct PmScanArg {
        pub size: u64,
        pub flags: u64,
        pub start: u64,
        pub end: u64,
        pub walk_end: u64,
        pub vec: u64,
        pub vec_len: u64,
        pub max_pages: u64,
        pub category_inverted: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }

    pub const UFFD_API: u64 = 0xAA;
    pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 2;
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
    pub const UFFDIO_API: u64 = ioc(READ | WRITE, 0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
    pub const UFFDIO_REGISTER: u64 = ioc(READ | WRITE, 0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
    pub const UFFDIO_UNREGISTER: u64 = ioc(READ, 0xAA, 0x01, std::mem::size_of::<UffdioRange>());
    pub const UFFDIO_WRITEPROTECT: u64 = ioc(READ | WRITE, 0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());
    pub const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0xAA, 0x00, 0);
    pub const PAGEMAP_SCAN: u64 = ioc(READ | WRITE, b'f' as u64, 16, std::mem::size_of::<PmScanArg>());
    pub const PM_SCAN_WP_MATCHING: u64 = 1;
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 2;
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PAGE_IS_FILE: u64 = 1 << 2;
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;
    pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
    pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
}

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
use sys::*;

/// A `userfaultfd` in asynchronous write-protect mode, with the process's
/// `/proc/self/pagemap` for scans. Belongs to the process that opened it:
/// after `fork` every call in the child fails (the child's mappings are not
/// registered, and these descriptors still name the parent's memory).
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
    pagemap: OwnedFd,
    pid: u32,
}

/// Result entries per `PAGEMAP_SCAN` call (the scan resumes where a full
/// vector stopped).
const SCAN_VEC: usize = 256;

fn io_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
impl Uffd {
    /// Opens one: the `userfaultfd` system call for user-mode faults only
    /// (allowed to unprivileged processes), else `/dev/userfaultfd`; then
    /// asks for asynchronous write-protect with unpopulated pages protected
    /// too.
    pub(crate) fn open() -> Result<Uffd, Unavailable> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes a flags word and returns a new
        // descriptor or -1; no memory is passed.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) } as libc::c_int;
        let mut why = String::new();
        if raw < 0 {
            why = io_err("userfaultfd(UFFD_USER_MODE_ONLY)").to_string();
            // SAFETY: a NUL-terminated path; open(2) returns a descriptor or -1.
            let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if dev < 0 {
                return Err(Unavailable(format!("{why}; {}", io_err("open /dev/userfaultfd"))));
            }
            // SAFETY: `dev` was just opened and is owned here alone.
            let dev = unsafe { OwnedFd::from_raw_fd(dev) };
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags
            // as its argument and returns the descriptor or -1.
            raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if raw < 0 {
                return Err(Unavailable(format!("{why}; {}", io_err("USERFAULTFD_IOC_NEW"))));
            }
        }
        // SAFETY: `raw` is a descriptor just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api =
            UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(Unavailable(io_err("UFFDIO_API (asynchronous write-protect needs Linux 6.7+)").to_string()));
        }
        // SAFETY: a NUL-terminated path; open(2) returns a descriptor or -1.
        let pm = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if pm < 0 {
            return Err(Unavailable(io_err("open /proc/self/pagemap").to_string()));
        }
        // SAFETY: `pm` was just opened and is owned here alone.
        let pagemap = unsafe { OwnedFd::from_raw_fd(pm) };
        let _ = why;
        Ok(Uffd { fd, pagemap, pid: std::process::id() })
    }

    /// Whether the calling process opened this one (not a forked child).
    pub(crate) fn owned_here(&self) -> bool {
        std::process::id() == self.pid
    }

    fn check_process(&self) -> io::Result<()> {
        if self.owned_here() {
            Ok(())
        } else {
            Err(io::Error::other("write-protect tracking belongs to the parent process: a forked child cannot use it"))
        }
    }

    /// Registers `[addr, addr + len)` for write-protect tracking and
    /// protects every page of it (present or not).
    ///
    /// # Safety
    ///
    /// The range must be a page-aligned private mapping the caller owns
    /// for as long as it stays registered (unmapping it unregisters it).
    pub(crate) unsafe fn register(&self, addr: usize, len: usize) -> io::Result<()> {
        self.check_process()?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr as u64, len: len as u64 },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register; the
        // range is ours per the contract.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(io_err("UFFDIO_REGISTER"));
        }
        // SAFETY: per the contract.
        if let Err(e) = unsafe { self.protect(addr, len) } {
            self.unregister(addr, len);
            return Err(e);
        }
        Ok(())
    }

    /// Ends tracking of a registered range (its pages stay as they are).
    pub(crate) fn unregister(&self, addr: usize, len: usize) {
        if self.check_process().is_err() {
            return;
        }
        let mut range = UffdioRange { start: addr as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads a uffdio_range; unregistering
        // changes no memory. A failure (range already unmapped) is harmless.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
    }

    /// Write-protects `[addr, addr + len)` again (its pages stop counting as
    /// written).
    ///
    /// # Safety
    ///
    /// The range must lie inside a registered range.
    pub(crate) unsafe fn protect(&self, addr: usize, len: usize) -> io::Result<()> {
        // SAFETY: per the contract.
        unsafe { self.set_protection(addr, len, UFFDIO_WRITEPROTECT_MODE_WP) }
    }

    /// Lifts the write protection of `[addr, addr + len)`: its present
    /// pages count as written (the next scan lists them) without a store.
    ///
    /// # Safety
    ///
    /// The range must lie inside a registered range.
    pub(crate) unsafe fn unprotect(&self, addr: usize, len: usize) -> io::Result<()> {
        // SAFETY: per the contract.
        unsafe { self.set_protection(addr, len, 0) }
    }

    /// # Safety
    ///
    /// As for [`Uffd::protect`].
    unsafe fn set_protection(&self, addr: usize, len: usize, mode: u64) -> io::Result<()> {
        self.check_process()?;
        let mut wp = UffdioWriteprotect { range: UffdioRange { start: addr as u64, len: len as u64 }, mode };
        // SAFETY: UFFDIO_WRITEPROTECT reads a uffdio_writeprotect; it only
        // changes page protections inside the registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } != 0 {
            return Err(io_err("UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }

    /// Appends the addresses of the written pages of the registered range
    /// `[addr, addr + len)` to `out`, in order; with `reprotect`, the same
    /// call protects them again. Fails (`EPERM`) if the range is not
    /// registered in asynchronous mode, e.g. in a forked child.
    pub(crate) fn written(&self, addr: usize, len: usize, reprotect: bool, out: &mut Vec<usize>) -> io::Result<()> {
        self.check_process()?;
        #[cfg(test)]
        if testing::scan_fails() {
            return Err(io::Error::other("injected PAGEMAP_SCAN failure"));
        }
        let flags = PM_SCAN_CHECK_WPASYNC | if reprotect { PM_SCAN_WP_MATCHING } else { 0 };
        scan(self.pagemap.as_raw_fd(), addr, len, flags, (0, PAGE_IS_WRITTEN, 0), PAGE_IS_WRITTEN, out)
    }
}

/// One `PAGEMAP_SCAN` over `[addr, addr + len)` (resumed until the range is
/// walked), appending each matching page's address to `out`.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
fn scan(
    pagemap: libc::c_int,
    addr: usize,
    len: usize,
    flags: u64,
    (inverted, mask, anyof): (u64, u64, u64),
    ret: u64,
    out: &mut Vec<usize>,
) -> io::Result<()> {
    let ps = crate::mem::page_size();
    let mut vec = [PageRegion::default(); SCAN_VEC];
    let end = (addr + len) as u64;
    let mut start = addr as u64;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: SCAN_VEC as u64,
            category_inverted: inverted,
            category_mask: mask,
            category_anyof_mask: anyof,
            return_mask: ret,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // page_region entries to `vec`, which has that many; with
        // PM_SCAN_WP_MATCHING it only write-protects pages of registered
        // ranges. It changes no memory contents.
        let n = unsafe { libc::ioctl(pagemap, PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(io_err("PAGEMAP_SCAN"));
        }
        for r in &vec[..n as usize] {
            out.extend((r.start as usize..r.end as usize).step_by(ps));
        }
        if arg.walk_end <= start {
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        start = arg.walk_end;
    }
    Ok(())
}

/// The pages of `[addr, addr + len)` that hold private (anonymous) memory:
/// present or swapped, not the page cache's, not the shared zero page. In
/// a private file mapping, the pages written since it was mapped.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
pub(crate) fn private_pages(addr: usize, len: usize, out: &mut Vec<usize>) -> io::Result<()> {
    // SAFETY: a NUL-terminated path; open(2) returns a descriptor or -1.
    let pm = unsafe { libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if pm < 0 {
        return Err(io_err("open /proc/self/pagemap"));
    }
    // SAFETY: `pm` was just opened and is owned here alone.
    let pm = unsafe { OwnedFd::from_raw_fd(pm) };
    let not = PAGE_IS_FILE | PAGE_IS_PFNZERO;
    scan(pm.as_raw_fd(), addr, len, 0, (not, not, PAGE_IS_PRESENT | PAGE_IS_SWAPPED), PAGE_IS_PRESENT, out)
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))))]
impl Uffd {
    pub(crate) fn open() -> Result<Uffd, Unavailable> {
        Err(Unavailable("not built for this platform".into()))
    }
    pub(crate) unsafe fn register(&self, _addr: usize, _len: usize) -> io::Result<()> {
        Err(io::Error::other("unsupported"))
    }
    pub(crate) fn unregister(&self, _addr: usize, _len: usize) {}
    pub(crate) unsafe fn protect(&self, _addr: usize, _len: usize) -> io::Result<()> {
        Err(io::Error::other("unsupported"))
    }
    pub(crate) unsafe fn unprotect(&self, _addr: usize, _len: usize) -> io::Result<()> {
        Err(io::Error::other("unsupported"))
    }
    pub(crate) fn owned_here(&self) -> bool {
        true
    }
    pub(crate) fn written(&self, _a: usize, _l: usize, _r: bool, _o: &mut Vec<usize>) -> io::Result<()> {
        Err(io::Error::other("unsupported"))
    }
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))))]
pub(crate) fn private_pages(_addr: usize, _len: usize, _out: &mut Vec<usize>) -> io::Result<()> {
    Err(io::Error::other("unsupported"))
}

/// Failure injection for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::Cell;

    thread_local! {
        static SCANS_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// On this thread, `Uffd::written` succeeds `n` more times, then
    /// fails (`None`: never).
    pub(crate) fn fail_scans_after(n: Option<usize>) {
        SCANS_LEFT.with(|c| c.set(n));
    }

    pub(super) fn scan_fails() -> bool {
        SCANS_LEFT.with(|c| match c.get() {
            Some(0) => true,
            Some(n) => {
                c.set(Some(n - 1));
                false
            }
            None => false,
        })
    }
}
