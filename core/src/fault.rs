//! Page-fault machinery: one process-wide `SIGSEGV` handler that hands
//! faults in registered address ranges to their owner.
//!
//! The pieces, each usable on its own:
//!
//! - [`install`]: installs the handler once per process (`SA_SIGINFO`,
//!   `SA_ONSTACK`), remembering the action that was there before. A fault
//!   that no registered range claims, or that its hook refuses, goes to that
//!   earlier action: a function is called (with the arguments its flags ask
//!   for); the default or "ignore" resets `SIGSEGV` to the default action and
//!   returns, so the instruction faults again and the process dies with
//!   `SIGSEGV` exactly as it would have without us. (Rust's own handler,
//!   which reports stack overflows, is such an earlier action.)
//! - [`register`]: a lock-free table of `[start, end)` ranges, each with a
//!   [`FaultHook`]. The handler finds the range of a fault address by a scan
//!   of atomics; a [`Registration`] removes its range when dropped, after
//!   waiting for handlers still inside its hook.
//! - [`FaultHook::on_fault`]: runs inside the signal handler. It may only
//!   do async-signal-safe things: atomics, plain memory copies, system
//!   calls (`mprotect`, `mmap`, `write`), never a lock or an allocation.
//!
//! Tracked transactions ([`crate::tracked`]) register one hook per tracked
//! region. Another user (lazy "instant restart" pages brought up to date
//! on first touch) registers its own hook for `PROT_NONE` pages and reads
//! [`Access`] to tell loads from stores.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// What the faulting instruction did, where the CPU reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// A load (or an instruction fetch).
    Read,
    /// A store.
    Write,
    /// Not known on this target.
    Unknown,
}

/// A hook's answer to a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// The cause is gone (the page is accessible now): retry the instruction.
    Handled,
    /// Not this hook's business: the earlier action gets the fault.
    NotOurs,
    /// A fault this hook must not resolve (a store by a thread without the
    /// transaction, resources used up): the message goes to standard error
    /// and the earlier action gets the fault (by default the process dies
    /// with `SIGSEGV`).
    Fatal(&'static str),
}

/// The owner of a registered range.
pub(crate) trait FaultHook: Send + Sync {
    /// Resolves a fault at `addr` inside the hook's range. Runs in the
    /// signal handler, on the faulting thread: async-signal-safe code only
    /// (no lock, no allocation, no panic).
    fn on_fault(&self, addr: usize, access: Access) -> Resolution;
}

/// Ranges registered at once at most.
const SLOTS: usize = 256;

struct Slot {
    /// Taken by a registration (set by `register`, cleared when it ends).
    taken: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    /// The hook (a leaked `Box<Arc<dyn FaultHook>>`); null when the slot is
    /// not live.
    hook: AtomicPtr<Arc<dyn FaultHook>>,
    /// Handlers running this slot's hook right now.
    users: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    taken: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    hook: AtomicPtr::new(std::ptr::null_mut()),
    users: AtomicUsize::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The action `SIGSEGV` had before [`install`].
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Faults a hook turned away as fatal (for tests and statistics; the
/// process usually dies right after).
pub(crate) static FATAL_FAULTS: AtomicUsize = AtomicUsize::new(0);

/// Errors of the fault machinery.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub(crate) enum FaultError {
    /// `sigaction` failed.
    #[error("installing the SIGSEGV handler failed: {0}")]
    Install(String),
    /// Every slot of the range table is taken.
    #[error("too many tracked ranges registered at once (at most {limit})")]
    TableFull {
        /// The table's size.
        limit: usize,
    },
}

/// Installs the handler (once per process; later calls return the first
/// call's result).
pub(crate) fn install() -> Result<(), FaultError> {
    static INSTALLED: OnceLock<Result<(), FaultError>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is a valid value (no handler, empty
            // mask); every field we rely on is then set explicitly.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = handler as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: sa_mask is a valid sigset_t owned by `new`.
            unsafe { libc::sigemptyset(&mut new.sa_mask) };
            // SAFETY: as above: a valid, zeroed sigaction to receive the old one.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid sigaction values; `handler`
            // has the SA_SIGINFO signature.
            let rc = unsafe { libc::sigaction(libc::SIGSEGV, &new, &mut old) };
            if rc != 0 {
                return Err(FaultError::Install(std::io::Error::last_os_error().to_string()));
            }
            // Only this closure sets PREVIOUS, and it runs once.
            let _ = PREVIOUS.set(old);
            Ok(())
        })
        .clone()
}

/// A registered range; dropping it unregisters the range.
pub(crate) struct Registration {
    slot: usize,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &TABLE[self.slot];
        f.debug_struct("Registration")
            .field("start", &s.start.load(Ordering::Relaxed))
            .field("end", &s.end.load(Ordering::Relaxed))
            .finish()
    }
}

/// Registers `[start, end)` with `hook` (installing the handler first).
/// Ranges must not overlap (regions never do).
pub(crate) fn register(start: usize, end: usize, hook: Arc<dyn FaultHook>) -> Result<Registration, FaultError> {
    install()?;
    for (i, s) in TABLE.iter().enumerate() {
        if s.taken.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            s.start.store(start, Ordering::SeqCst);
            s.end.store(end, Ordering::SeqCst);
            s.hook.store(Box::into_raw(Box::new(hook)), Ordering::SeqCst);
            return Ok(Registration { slot: i });
        }
    }
    Err(FaultError::TableFull { limit: SLOTS })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        let hook = s.hook.swap(std::ptr::null_mut(), Ordering::SeqCst);
        // A handler that counted itself in before the swap may still run
        // the hook; one that counts itself in after it sees null.
        while s.users.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        s.start.store(0, Ordering::SeqCst);
        s.end.store(0, Ordering::SeqCst);
        if !hook.is_null() {
            // SAFETY: the pointer came from Box::into_raw in `register`, was
            // taken out of the slot by the swap above (so no one frees it
            // twice), and no handler uses it any more (users is zero and new
            // handlers see null).
            drop(unsafe { Box::from_raw(hook) });
        }
        s.taken.store(false, Ordering::Release);
    }
}

/// Finds the slot holding `addr` and runs its hook.
fn dispatch(addr: usize, access: Access) -> Resolution {
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        if addr < start || addr >= s.end.load(Ordering::Acquire) {
            continue;
        }
        s.users.fetch_add(1, Ordering::SeqCst);
        let hook = s.hook.load(Ordering::SeqCst);
        let still = s.start.load(Ordering::SeqCst) == start;
        let r = if hook.is_null() || !still {
            Resolution::NotOurs
        } else {
            // SAFETY: the hook is live: `users` counts us in, and
            // unregistering waits for it to drop to zero before freeing.
            unsafe { (*hook).on_fault(addr, access) }
        };
        s.users.fetch_sub(1, Ordering::SeqCst);
        if r != Resolution::NotOurs {
            return r;
        }
    }
    Resolution::NotOurs
}

/// The access a fault made, from the machine context.
fn access_of(ctx: *mut libc::c_void) -> Access {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        if ctx.is_null() {
            return Access::Unknown;
        }
        // SAFETY: for an SA_SIGINFO handler the third argument points to the
        // interrupted thread's ucontext_t, valid during the handler.
        let err = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_ERR as usize] };
        // Bit 1 of the page-fault error code: the access was a write.
        if err & 2 != 0 {
            Access::Write
        } else {
            Access::Read
        }
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        let _ = ctx;
        Access::Unknown
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    match dispatch(addr, access_of(ctx)) {
        Resolution::Handled => {}
        Resolution::NotOurs => chain(sig, info, ctx),
        Resolution::Fatal(msg) => {
            FATAL_FAULTS.fetch_add(1, Ordering::Relaxed);
            report(msg, addr);
            chain(sig, info, ctx);
        }
    }
}

/// Writes `rvm: <msg> (address 0x...)` to standard error, without
/// allocating.
fn report(msg: &str, addr: usize) {
    let mut buf = [0u8; 40];
    let head = b" (address 0x";
    buf[..head.len()].copy_from_slice(head);
    let mut n = head.len();
    for shift in (0..16).rev() {
        let d = (addr >> (shift * 4)) & 0xf;
        buf[n] = b"0123456789abcdef"[d];
        n += 1;
    }
    buf[n] = b')';
    buf[n + 1] = b'\n';
    n += 2;
    for part in [b"rvm: ".as_slice(), msg.as_bytes(), &buf[..n]] {
        // SAFETY: write(2) is async-signal-safe; the buffers are valid for
        // their lengths. A short or failed write only loses the message.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

/// Passes the fault to the action installed before ours.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    let action = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // The default action: reset it and return; the instruction faults
        // again and the kernel kills the process with SIGSEGV. (Ignoring a
        // fault would loop forever, so "ignore" is treated the same.)
        // SAFETY: a zeroed sigaction with SIG_DFL is valid; sigaction(2) is
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
        }
        return;
    }
    let flags = prev.map_or(0, |p| p.sa_flags);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the earlier handler was installed with SA_SIGINFO, so it
        // has this signature; we pass the kernel's arguments through.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
}

/// The calling thread's kernel id (`gettid`), async-signal-safe.
pub(crate) fn thread_id() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Makes `[addr, addr + len)` readable, and writable if `write` (a raw
/// `mprotect`, async-signal-safe). Returns whether it worked.
///
/// # Safety
///
/// The range must be a page-aligned part of a mapping the caller owns;
/// removing write access must not break a live `&mut` into it.
pub(crate) unsafe fn protect(addr: usize, len: usize, write: bool) -> bool {
    let prot = if write { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: per the contract.
    unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) == 0 }
}

/// What [`replace_page`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replaced {
    /// The filled page is in place.
    Yes,
    /// `fill` refused: nothing changed.
    FillFailed,
    /// No fresh page could be made or moved (no memory, or the process's
    /// mapping limit): nothing changed.
    NoResources,
}

/// Replaces the page at `addr` (`len` bytes, page-aligned) of a mapping
/// with fresh private anonymous memory, read and write, that `fill` fills
/// first. The filled page is moved over the old one with one `mremap`
/// (`MREMAP_FIXED`), under the kernel's lock of the address space: another
/// thread sees the old page or the filled one, never a partly filled one.
/// Async-signal-safe (`mmap`, `mremap`, `munmap`; `fill` must be too).
///
/// # Safety
///
/// The range must be a page of a mapping the caller owns, with no Rust
/// reference into it (an inaccessible page); its contents are discarded.
pub(crate) unsafe fn replace_page(addr: usize, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> Replaced {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping wherever the kernel puts it replaces
    // nothing; mmap(2) is a plain system call (async-signal-safe).
    let fresh = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if fresh == libc::MAP_FAILED {
        return Replaced::NoResources;
    }
    // SAFETY: `fresh` is `len` bytes of memory just mapped read and write,
    // known to this thread alone.
    let buf = unsafe { std::slice::from_raw_parts_mut(fresh.cast::<u8>(), len) };
    if !fill(buf) {
        // SAFETY: our own mapping, no longer referred to.
        unsafe { libc::munmap(fresh, len) };
        return Replaced::FillFailed;
    }
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: moves our fresh page onto `addr`, replacing only the caller's
    // page there (the contract); the kernel checks the mapping limit before
    // it unmaps anything.
    let got = unsafe { libc::mremap(fresh, len, len, flags, addr as *mut libc::c_void) };
    if got == libc::MAP_FAILED {
        // SAFETY: on failure the fresh page is still ours, at `fresh`.
        unsafe { libc::munmap(fresh, len) };
        return Replaced::NoResources;
    }
    Replaced::Yes
}
