//! PMDK's libpmemobj (1.12, the C library through a few `extern "C"`
//! declarations): the bank in the pool's root object, laid out as
//! [`crate::rvm::FlatBank`]'s region (each thread's count of history
//! records at 0, 64, 128, 192; the balances; one history ring per thread),
//! changed in libpmemobj transactions (`pmemobj_tx_begin`, an undo-log
//! snapshot per range with `pmemobj_tx_add_range_direct`, `_commit`,
//! `_end`). Concurrent transfers are kept apart by the same 4096 lock
//! stripes, as libpmemobj leaves isolation to the application.
//!
//! Durability: the pool is a file on this disk, not persistent memory, so
//! libpmemobj makes every commit durable with `msync` (several per
//! transaction: the undo log, the data, the log's reset); it has no
//! non-durable commit. The crash workload's writer (200,000 commits) runs
//! with `PMEM_IS_PMEM_FORCE=1`, which makes libpmemobj flush CPU caches
//! instead of calling `msync` (its commits then survive a killed process,
//! not a power loss); its last, durable commit also `fsync`s the pool file.
//! Recovery (`pmemobj_open`) rolls back at most one unfinished transaction
//! per lane: it does not depend on how much was committed before.

use crate::bank::{Bank, Stripes, Transfer, ACCOUNTS, INITIAL_BALANCE, MAX_THREADS, RECORD_LEN};
use anyhow::{anyhow, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[repr(C)]
#[derive(Clone, Copy)]
struct PmemOid {
    pool_uuid_lo: u64,
    off: u64,
}

#[repr(C)]
struct PmemObjPool {
    _opaque: [u8; 0],
}

/// `TX_PARAM_NONE`: ends `pmemobj_tx_begin`'s parameter list.
const TX_PARAM_NONE: c_int = 0;
/// `TX_STAGE_WORK`: the transaction is open.
const TX_STAGE_WORK: c_int = 1;
/// Linux's `ECANCELED`: why a transaction is aborted.
const ECANCELED: c_int = 125;

#[link(name = "pmemobj")]
extern "C" {
    fn pmemobj_create(path: *const c_char, layout: *const c_char, poolsize: usize, mode: u32) -> *mut PmemObjPool;
    fn pmemobj_open(path: *const c_char, layout: *const c_char) -> *mut PmemObjPool;
    fn pmemobj_close(pop: *mut PmemObjPool);
    fn pmemobj_root(pop: *mut PmemObjPool, size: usize) -> PmemOid;
    fn pmemobj_direct(oid: PmemOid) -> *mut c_void;
    fn pmemobj_tx_begin(pop: *mut PmemObjPool, env: *mut c_void, ...) -> c_int;
    fn pmemobj_tx_add_range_direct(ptr: *const c_void, size: usize) -> c_int;
    fn pmemobj_tx_commit();
    fn pmemobj_tx_abort(errnum: c_int);
    fn pmemobj_tx_end() -> c_int;
    fn pmemobj_tx_stage() -> c_int;
    fn pmemobj_errormsg() -> *const c_char;
}

const LAYOUT: &CStr = c"rvm-peers-bank";
const RING_RECORDS: usize = 1 << 18;
const ACCOUNTS_AT: usize = 4096;
const RINGS_AT: usize = (ACCOUNTS_AT + ACCOUNTS as usize * 8).next_multiple_of(4096);
const ROOT_LEN: usize = RINGS_AT + MAX_THREADS * RING_RECORDS * RECORD_LEN;
/// The pool: the root object and room for the lanes' undo logs.
const POOL_LEN: usize = ROOT_LEN + (64 << 20);

fn last_error(what: &str) -> anyhow::Error {
    // SAFETY: pmemobj_errormsg returns a thread-local NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(pmemobj_errormsg()) };
    anyhow!("{what}: {}", msg.to_string_lossy())
}

pub struct PmemBank {
    pop: *mut PmemObjPool,
    root: *mut u8,
    stripes: Stripes,
    /// Opened with `PMEM_IS_PMEM_FORCE=1`: a durable commit also syncs the
    /// pool file.
    forced: Option<std::fs::File>,
}

// SAFETY: libpmemobj's pool handle may be used from any thread (each
// thread's transaction takes its own lane); the root object's bytes are
// only touched under the stripe locks (see `transfer`).
unsafe impl Send for PmemBank {}
// SAFETY: as above.
unsafe impl Sync for PmemBank {}

impl PmemBank {
    pub fn open(dir: &Path, create: bool) -> Result<PmemBank> {
        let path = dir.join("bank.pmemobj");
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: both strings are NUL-terminated and outlive the calls.
        let pop = unsafe {
            if create {
                pmemobj_create(c_path.as_ptr(), LAYOUT.as_ptr(), POOL_LEN, 0o600)
            } else {
                pmemobj_open(c_path.as_ptr(), LAYOUT.as_ptr())
            }
        };
        if pop.is_null() {
            return Err(last_error("opening the pool"));
        }
        // SAFETY: `pop` is an open pool; the root object is made (zeroed,
        // durably) on first use and its address stays valid until close.
        let root = unsafe { pmemobj_direct(pmemobj_root(pop, ROOT_LEN)) } as *mut u8;
        if root.is_null() {
            // SAFETY: `pop` is open and not used again.
            unsafe { pmemobj_close(pop) };
            return Err(last_error("the root object"));
        }
        let forced = match std::env::var_os("PMEM_IS_PMEM_FORCE").is_some_and(|v| v == "1") {
            true => Some(std::fs::File::open(&path)?),
            false => None,
        };
        let bank = PmemBank { pop, root, stripes: Stripes::new(), forced };
        if create {
            bank.in_tx(|| {
                let accounts = bank.account_ptr(0);
                add_range(accounts.cast(), ACCOUNTS as usize * 8)?;
                for a in 0..ACCOUNTS as usize {
                    // SAFETY: the balances lie in the root object; nothing
                    // else uses the bank while it is made.
                    unsafe { accounts.add(a).write(INITIAL_BALANCE) };
                }
                Ok(())
            })?;
        }
        Ok(bank)
    }

    fn account_ptr(&self, account: u32) -> *mut u64 {
        // SAFETY: inside the root object (account < ACCOUNTS).
        unsafe { self.root.add(ACCOUNTS_AT + account as usize * 8).cast() }
    }

    fn count_ptr(&self, thread: usize) -> *mut u64 {
        // SAFETY: inside the root object's first page (thread < MAX_THREADS).
        unsafe { self.root.add(thread * 64).cast() }
    }

    fn slot_ptr(&self, thread: usize, n: u64) -> *mut u8 {
        // SAFETY: inside the thread's ring of the root object.
        unsafe { self.root.add(RINGS_AT + (thread * RING_RECORDS + (n as usize % RING_RECORDS)) * RECORD_LEN) }
    }

    /// Runs `body` in one libpmemobj transaction: committed if it returns
    /// Ok, aborted (its snapshots put back) if not.
    fn in_tx(&self, body: impl FnOnce() -> Result<()>) -> Result<()> {
        // SAFETY: `pop` is open; a null jmp_buf makes failures return
        // error codes instead of jumping.
        if unsafe { pmemobj_tx_begin(self.pop, std::ptr::null_mut(), TX_PARAM_NONE) } != 0 {
            return Err(last_error("pmemobj_tx_begin"));
        }
        let r = body();
        // SAFETY: a transaction of this thread is open (begun above); the
        // stage tells whether a failed call already aborted it.
        unsafe {
            if pmemobj_tx_stage() == TX_STAGE_WORK {
                match r {
                    Ok(()) => pmemobj_tx_commit(),
                    Err(_) => pmemobj_tx_abort(ECANCELED),
                }
            }
            let end = pmemobj_tx_end();
            r?;
            if end != 0 {
                return Err(last_error("libpmemobj transaction failed"));
            }
        }
        Ok(())
    }
}

/// Snapshots `[ptr, +len)` into the open transaction's undo log.
fn add_range(ptr: *const c_void, len: usize) -> Result<()> {
    // SAFETY: called inside `in_tx`'s transaction with a range of the pool.
    match unsafe { pmemobj_tx_add_range_direct(ptr, len) } {
        0 => Ok(()),
        _ => Err(last_error("pmemobj_tx_add_range_direct")),
    }
}

impl Drop for PmemBank {
    fn drop(&mut self) {
        // SAFETY: the pool is open and not used after this.
        unsafe { pmemobj_close(self.pop) };
    }
}

impl Bank for PmemBank {
    fn transfer(&self, thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        if thread >= MAX_THREADS {
            return Err(anyhow!("thread {thread} has no history ring"));
        }
        let _locks = self.stripes.batch(batch);
        self.in_tx(|| {
            let count = self.count_ptr(thread);
            add_range(count.cast(), 8)?;
            // SAFETY: the stripe locks keep other threads off these
            // balances; only this thread writes its ring and count; every
            // pointer lies in the root object.
            unsafe {
                let n = count.read();
                for (i, t) in batch.iter().enumerate() {
                    let (from, to) = (self.account_ptr(t.from), self.account_ptr(t.to));
                    add_range(from.cast(), 8)?;
                    add_range(to.cast(), 8)?;
                    let (f, d) = t.apply(from.read(), to.read());
                    from.write(f);
                    to.write(d);
                    let slot = self.slot_ptr(thread, n + i as u64);
                    add_range(slot.cast(), RECORD_LEN)?;
                    std::ptr::copy_nonoverlapping(t.record().as_ptr(), slot, RECORD_LEN);
                }
                count.write(n + batch.len() as u64);
            }
            Ok(())
        })?;
        if durable {
            if let Some(f) = &self.forced {
                f.sync_data()?;
            }
        }
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        let _lock = self.stripes.one(account);
        // SAFETY: in the root object; the stripe lock keeps writers off.
        Ok(unsafe { self.account_ptr(account).read() })
    }

    fn sum(&self) -> Result<u64> {
        let _all = self.stripes.all();
        // SAFETY: the balances lie in the root object; every stripe is held.
        Ok((0..ACCOUNTS).map(|a| unsafe { self.account_ptr(a).read() }).fold(0u64, u64::wrapping_add))
    }

    fn history_len(&self) -> Result<u64> {
        let _all = self.stripes.all();
        // SAFETY: in the root object; no transfer is in flight.
        Ok((0..MAX_THREADS).map(|t| unsafe { self.count_ptr(t).read() }).sum())
    }
}
