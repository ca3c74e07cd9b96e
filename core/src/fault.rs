//! Page-fault machinery: one process-wide `SIGSEGV` handler that hands
//! faults in registered address ranges to their owner.
//!
//! The pieces, each usable on its own:
//!
//! - [`install`]: installs the handler once per process (`SA_SIGINFO`,
//!   `SA_ONSTACK`), remembering the action that was there before, and maps
//!   the stacks hooks run on (a thread's alternate signal stack is too
//!   small for their work: [`on_hook_stack`]). A fault
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
    /// signal handler, on the faulting thread (on a hook stack of 256 KiB,
    /// not the small alternate signal stack): async-signal-safe code only
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

/// Stacks the hooks run on, at most this many at once (a fault finding
/// none free yields until one is).
const HOOK_STACKS: usize = 16;
/// Bytes of each hook stack (address space; pages are taken as used).
const HOOK_STACK_BYTES: usize = 256 << 10;
/// An inaccessible gap below each hook stack, so that an overflow faults
/// instead of running into the next one.
const HOOK_STACK_GUARD: usize = 64 << 10;

/// Where the hook stacks are (0 until [`install`] made them).
static HOOK_STACK_BASE: AtomicUsize = AtomicUsize::new(0);
/// Which hook stacks a handler is using.
static HOOK_STACK_BUSY: [AtomicBool; HOOK_STACKS] = [const { AtomicBool::new(false) }; HOOK_STACKS];
/// Which hook stacks are accessible yet (each is made so the first time a
/// handler takes it).
static HOOK_STACK_READY: [AtomicBool; HOOK_STACKS] = [const { AtomicBool::new(false) }; HOOK_STACKS];

/// Reserves the hook stacks: one inaccessible anonymous mapping, each
/// stack above a guard gap that stays so. The first stack is made readable
/// and writable here (so that installing fails where no stack can be had),
/// each other one the first time a handler takes it ([`on_hook_stack`]):
/// one `mprotect` (and split of the mapping) per stack a process uses, not
/// sixteen before the first page an instant open brings in.
///
/// Why: the handler is installed `SA_ONSTACK` (so that a stack overflow
/// still reaches Rust's handler, which reports it), and a thread's
/// alternate signal stack is small (Rust gives its threads 8 KiB, of which
/// the kernel's signal frame takes about 3 KiB with AVX-512 state). A hook
/// does real work (instant recovery builds pages: reads, applies logged
/// ranges, maps): run on that stack it overflowed it in unoptimized
/// builds. So the handler runs each hook on one of these stacks instead.
fn map_hook_stacks() -> Result<usize, FaultError> {
    let each = HOOK_STACK_GUARD + HOOK_STACK_BYTES;
    // SAFETY: a fresh anonymous private mapping at an address the kernel
    // picks; it overlaps nothing of ours.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HOOK_STACKS * each,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(FaultError::Install(format!("mapping the hooks' stacks: {}", std::io::Error::last_os_error())));
    }
    if !make_hook_stack(hook_stack(base as usize, 0)) {
        let e = std::io::Error::last_os_error();
        // SAFETY: the mapping made above, used by no one.
        unsafe { libc::munmap(base, HOOK_STACKS * each) };
        return Err(FaultError::Install(format!("mapping the hooks' stacks: {e}")));
    }
    HOOK_STACK_READY[0].store(true, Ordering::Release);
    Ok(base as usize)
}

/// Where hook stack `k` of the stacks reserved at `base` starts.
fn hook_stack(base: usize, k: usize) -> usize {
    base + k * (HOOK_STACK_GUARD + HOOK_STACK_BYTES) + HOOK_STACK_GUARD
}

/// Makes the hook stack at `stack` (from [`hook_stack`]) readable and
/// writable; false if the system refused (errno says why).
fn make_hook_stack(stack: usize) -> bool {
    // SAFETY: the range is one stack inside the hook stacks' mapping,
    // which is never unmapped once installed and holds nothing else; its
    // caller owns it (at install, or by its busy flag) and it is not in
    // use. mprotect(2) is a plain system call, safe in a signal handler.
    unsafe { libc::mprotect(stack as *mut libc::c_void, HOOK_STACK_BYTES, libc::PROT_READ | libc::PROT_WRITE) == 0 }
}

/// Takes a free stack that is accessible (its flag in `busy` set): the
/// first free one, made accessible by `make(k)` if it is not yet (and
/// marked so in `ready`). A stack `make` fails for (no memory) is left free
/// and the search goes on past it, to stacks made before; `None` if no
/// free stack could be had. Async-signal-safe if `make` is.
fn claim_stack(busy: &[AtomicBool], ready: &[AtomicBool], mut make: impl FnMut(usize) -> bool) -> Option<usize> {
    for (k, b) in busy.iter().enumerate() {
        if b.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            continue;
        }
        // The busy flag orders this after the last user's release of the
        // stack (and so after the `mprotect` that made it ready): a stale
        // `false` only repeats the `mprotect`, which is harmless.
        if ready[k].load(Ordering::Acquire) || make(k) {
            ready[k].store(true, Ordering::Release);
            return Some(k);
        }
        b.store(false, Ordering::Release);
    }
    None
}

/// Runs `f` (a hook) on a free hook stack, waiting for one if all are in
/// use; a panic in `f` becomes a fatal fault (the stack switch must not be
/// unwound through, and a panic in a signal handler has nowhere to go).
fn on_hook_stack(f: impl FnOnce() -> Resolution) -> Resolution {
    let call = move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or(Resolution::Fatal("a page-fault hook panicked"))
    };
    let base = HOOK_STACK_BASE.load(Ordering::Acquire);
    if base == 0 {
        return call();
    }
    let k = loop {
        if let Some(k) = claim_stack(&HOOK_STACK_BUSY, &HOOK_STACK_READY, |k| make_hook_stack(hook_stack(base, k))) {
            break k;
        }
        // SAFETY: sched_yield(2) is async-signal-safe and takes nothing.
        unsafe { libc::sched_yield() };
    };
    let stack = hook_stack(base, k);
    let r = psm::psm_stack_manipulation! {
        yes {
            // SAFETY: `[stack, stack + HOOK_STACK_BYTES)` is readable and
            // writable memory of ours, page-aligned (so aligned for any
            // target's stack), its size a multiple of the page size, used by
            // this handler alone (its busy flag); `call` does not unwind
            // (it catches panics).
            unsafe { psm::on_stack(stack as *mut u8, HOOK_STACK_BYTES, call) }
        }
        no {
            {
                let _ = stack;
                call()
            }
        }
    };
    HOOK_STACK_BUSY[k].store(false, Ordering::Release);
    r
}

/// Installs the handler (once per process; later calls return the first
/// call's result).
pub(crate) fn install() -> Result<(), FaultError> {
    static INSTALLED: OnceLock<Result<(), FaultError>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            HOOK_STACK_BASE.store(map_hook_stacks()?, Ordering::Release);
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
            let hook = unsafe { &*hook };
            on_hook_stack(|| hook.on_fault(addr, access))
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
    // The handler's system calls (a hook stack's `mprotect`, the hooks'
    // own) must not change what the interrupted code sees in errno.
    let saved = errno();
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let r = dispatch(addr, access_of(ctx));
    set_errno(saved);
    match r {
        Resolution::Handled => {}
        Resolution::NotOurs => chain(sig, info, ctx),
        Resolution::Fatal(msg) => {
            FATAL_FAULTS.fetch_add(1, Ordering::Relaxed);
            report(msg, addr);
            set_errno(saved);
            chain(sig, info, ctx);
        }
    }
    set_errno(saved);
}

/// The calling thread's errno (async-signal-safe).
pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // valid for the thread's life.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's errno (async-signal-safe).
pub(crate) fn set_errno(v: i32) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = v };
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
    if flags & libc::SA_RESETHAND != 0 {
        // The kernel would have put the default action back as it entered
        // that handler (a crash reporter that reports and returns relies
        // on it): do so, or the fault comes back to us and to it forever.
        // SAFETY: as above.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGSEGV, &dfl, std::ptr::null_mut());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook that needs far more stack than an alternate signal stack
    /// holds, then makes its page accessible.
    struct Deep {
        page: usize,
        len: usize,
    }

    impl FaultHook for Deep {
        fn on_fault(&self, addr: usize, _access: Access) -> Resolution {
            let mut buf = [0u8; 64 << 10];
            std::hint::black_box(&mut buf);
            buf[addr % buf.len()] = 1;
            std::hint::black_box(&buf);
            // SAFETY: the page this test mapped and registered.
            if unsafe { protect(self.page, self.len, true) } {
                Resolution::Handled
            } else {
                Resolution::Fatal("mprotect failed")
            }
        }
    }

    /// A hook that leaves errno changed (a failed system call, as a hook
    /// stack's `mprotect` refused for want of memory), then makes its page
    /// accessible.
    struct SetsErrno {
        page: usize,
        len: usize,
    }

    impl FaultHook for SetsErrno {
        fn on_fault(&self, _addr: usize, _access: Access) -> Resolution {
            set_errno(libc::ENOMEM);
            // SAFETY: the page this test mapped and registered.
            if unsafe { protect(self.page, self.len, true) } {
                Resolution::Handled
            } else {
                Resolution::Fatal("mprotect failed")
            }
        }
    }

    /// The interrupted code's errno is the same after a fault the handler
    /// resolved, whatever system calls failed inside it (a hook stack made
    /// accessible at its first use ran its `mprotect` outside any hook's
    /// own errno care).
    #[test]
    fn the_handler_keeps_the_interrupted_errno() {
        let len = crate::mem::page_size();
        // SAFETY: a fresh anonymous mapping, inaccessible.
        let page = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(page, libc::MAP_FAILED);
        let page = page as usize;
        let reg = register(page, page + len, Arc::new(SetsErrno { page, len })).unwrap();
        // SAFETY: the thread's errno slot; volatile so that neither access
        // moves across the faulting load.
        let slot = unsafe { libc::__errno_location() };
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(slot, libc::EAGAIN) };
        // SAFETY: the page is mapped; the hook makes it readable.
        let v = unsafe { std::ptr::read_volatile((page + 8) as *const u8) };
        // SAFETY: as above.
        let after = unsafe { std::ptr::read_volatile(slot) };
        assert_eq!(v, 0);
        assert_eq!(after, libc::EAGAIN, "the fault handler changed errno");
        drop(reg);
        // SAFETY: the mapping made above; nothing refers to it now.
        unsafe { libc::munmap(page as *mut libc::c_void, len) };
    }

    /// A free stack that cannot be made accessible is skipped, not waited
    /// on: a later one made accessible before is taken (the scan used to
    /// start again at the first free stack, the failing one, until a stack
    /// below it came free); the failing one is left free and unready.
    #[test]
    fn a_stack_that_cannot_be_made_is_passed_over() {
        let flags = |v: [bool; 4]| v.map(AtomicBool::new);
        let (busy, ready) = (flags([true, false, false, false]), flags([true, false, true, false]));
        let mut tried = Vec::new();
        let got = claim_stack(&busy, &ready, |k| {
            tried.push(k);
            false
        });
        assert_eq!(got, Some(2));
        assert_eq!(tried, [1]);
        let now = |v: &[AtomicBool; 4]| v.each_ref().map(|b| b.load(Ordering::Relaxed));
        assert_eq!(now(&busy), [true, false, true, false]);
        assert_eq!(now(&ready), [true, false, true, false]);
        // None free that can be made: none taken, each failing one left free.
        assert_eq!(claim_stack(&busy, &ready, |_| false), None);
        assert_eq!(now(&busy), [true, false, true, false]);
        // Made at its first use, ready from then on.
        assert_eq!(claim_stack(&busy, &ready, |k| k == 1), Some(1));
        assert_eq!(now(&ready), [true, true, true, false]);
    }

    /// A hook runs on a hook stack, not on the faulting thread's small
    /// alternate signal stack (where the handler is entered): a hook using
    /// 64 KiB of stack on a thread whose alternate stack is 16 KiB brings
    /// its page in. (On the alternate stack this overflowed: instant
    /// recovery's page builder did, in a debug build.)
    #[test]
    fn a_hook_needing_more_stack_than_the_alternate_stack_runs() {
        std::thread::spawn(|| {
            let len = crate::mem::page_size();
            // A small alternate stack for this thread, as Rust gives its
            // threads one of 8 KiB.
            let mut alt = vec![0u8; 16 << 10];
            // SAFETY: a zeroed stack_t is valid; then filled in.
            let mut ss: libc::stack_t = unsafe { std::mem::zeroed() };
            ss.ss_sp = alt.as_mut_ptr().cast();
            ss.ss_size = alt.len();
            // SAFETY: `alt` outlives the thread's use of it (it is dropped
            // after the alternate stack is disabled below).
            assert_eq!(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) }, 0);
            // SAFETY: a fresh anonymous mapping, inaccessible.
            let page = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            assert_ne!(page, libc::MAP_FAILED);
            let page = page as usize;
            let reg = register(page, page + len, Arc::new(Deep { page, len })).unwrap();
            // SAFETY: the page is mapped; the hook makes it readable.
            let v = unsafe { std::ptr::read_volatile((page + 8) as *const u8) };
            assert_eq!(v, 0);
            drop(reg);
            // SAFETY: the mapping made above; nothing refers to it now.
            unsafe { libc::munmap(page as *mut libc::c_void, len) };
            ss.ss_flags = libc::SS_DISABLE;
            // SAFETY: disables this thread's alternate stack.
            assert_eq!(unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) }, 0);
            drop(alt);
        })
        .join()
        .unwrap();
    }
}
