//! The bank every system runs: accounts, transfers, history records, and
//! the interface each system implements.

use anyhow::Result;
use parking_lot::{Mutex, MutexGuard};
use std::path::Path;

/// Accounts in the bank.
pub const ACCOUNTS: u32 = 100_000;
/// Every account's balance when the bank is made.
pub const INITIAL_BALANCE: u64 = 1_000_000;
/// The sum of balances, which no transfer changes.
pub const TOTAL: u64 = ACCOUNTS as u64 * INITIAL_BALANCE;
/// Bytes of one history record.
pub const RECORD_LEN: usize = 32;
/// Most threads a workload runs (each has its own history slot where the
/// system keeps one per thread).
pub const MAX_THREADS: usize = 4;

/// One transfer: `amount` moves from account `from` to account `to`
/// (never the same), and a history record is appended.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub from: u32,
    pub to: u32,
    pub amount: u64,
    /// Who made it and its number (thread in the top byte), for the record.
    pub tag: u64,
}

impl Transfer {
    /// The 32-byte history record: from, to, amount, tag (little endian).
    pub fn record(&self) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        r[0..8].copy_from_slice(&u64::from(self.from).to_le_bytes());
        r[8..16].copy_from_slice(&u64::from(self.to).to_le_bytes());
        r[16..24].copy_from_slice(&self.amount.to_le_bytes());
        r[24..32].copy_from_slice(&self.tag.to_le_bytes());
        r
    }

    /// The balances after it, from the balances before (wrapping, so the
    /// sum of all balances stays the same whatever the amounts).
    pub fn apply(&self, from_balance: u64, to_balance: u64) -> (u64, u64) {
        (from_balance.wrapping_sub(self.amount), to_balance.wrapping_add(self.amount))
    }
}

/// Makes a thread's transfers: uniform accounts, amounts 1-100.
pub struct Teller {
    rng: crate::common::Rng,
    thread: u64,
    made: u64,
}

impl Teller {
    pub fn new(seed: u64, thread: usize) -> Teller {
        Teller { rng: crate::common::Rng::new(seed * 64 + thread as u64 + 1), thread: thread as u64, made: 0 }
    }

    pub fn next(&mut self) -> Transfer {
        let from = self.rng.below(ACCOUNTS as usize) as u32;
        let to = (from + 1 + self.rng.below(ACCOUNTS as usize - 1) as u32) % ACCOUNTS;
        let amount = 1 + self.rng.below(100) as u64;
        self.made += 1;
        Transfer { from, to, amount, tag: (self.thread << 56) | self.made }
    }

    /// The next `n` transfers into `out` (cleared first).
    pub fn fill(&mut self, n: usize, out: &mut Vec<Transfer>) {
        out.clear();
        out.extend((0..n).map(|_| self.next()));
    }

    /// A uniform account, for reads.
    pub fn account(&mut self) -> u32 {
        self.rng.below(ACCOUNTS as usize) as u32
    }
}

/// An open bank in one system. Every method may be called from several
/// threads at once; `thread` (below [`MAX_THREADS`]) tells which.
pub trait Bank: Send + Sync {
    /// Runs `batch` as one transaction and commits it: durably (returns
    /// once the commit survives a crash, and with it every earlier one) if
    /// `durable`, else as the system's non-durable commit (a later durable
    /// commit makes it durable).
    fn transfer(&self, thread: usize, batch: &[Transfer], durable: bool) -> Result<()>;
    /// One balance, read in a read transaction of its own.
    fn balance(&self, account: u32) -> Result<u64>;
    /// The sum of all balances (wrapping), read in one read transaction.
    fn sum(&self) -> Result<u64>;
    /// History records appended so far.
    fn history_len(&self) -> Result<u64>;
    /// Bytes this instance has appended to its log, where the system
    /// reports it (this library).
    fn log_bytes(&self) -> Option<u64> {
        None
    }
    /// What the system's recovery did when this bank was opened, where it
    /// tells (this library).
    fn recovery_note(&self) -> Option<String> {
        None
    }
}

/// The systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// This library: one mapped region (rvm-core).
    Flat,
    /// This library: the typed heap (rvm-collections).
    Heap,
    Sqlite,
    Lmdb,
    Redb,
    /// PMDK's libpmemobj (only when built with it: see `build.rs`).
    Pmem,
}

/// The systems this build runs.
#[cfg(pmemobj)]
pub const SYSTEMS: &[System] = &[System::Flat, System::Heap, System::Sqlite, System::Lmdb, System::Redb, System::Pmem];
/// The systems this build runs (libpmemobj was not found at build time).
#[cfg(not(pmemobj))]
pub const SYSTEMS: &[System] = &[System::Flat, System::Heap, System::Sqlite, System::Lmdb, System::Redb];

impl System {
    /// Short name (command line, file names).
    pub fn key(self) -> &'static str {
        match self {
            System::Flat => "rvm-flat",
            System::Heap => "rvm-heap",
            System::Sqlite => "sqlite",
            System::Lmdb => "lmdb",
            System::Redb => "redb",
            System::Pmem => "pmemobj",
        }
    }

    /// Name in tables and the plot.
    pub fn label(self) -> &'static str {
        match self {
            System::Flat => "rvm (region)",
            System::Heap => "rvm (PHeap)",
            System::Sqlite => "SQLite (WAL)",
            System::Lmdb => "LMDB",
            System::Redb => "redb",
            System::Pmem => "PMDK (libpmemobj)",
        }
    }

    pub fn from_key(key: &str) -> Option<System> {
        SYSTEMS.iter().copied().find(|s| s.key() == key)
    }

    /// Makes a new bank in the empty folder `dir`: every account at
    /// [`INITIAL_BALANCE`], durable, and applied to the system's main files
    /// (so that a later reopen replays only what comes after).
    pub fn create(self, dir: &Path) -> Result<Box<dyn Bank>> {
        std::fs::create_dir_all(dir)?;
        Ok(match self {
            System::Flat => Box::new(crate::rvm::FlatBank::create(dir)?),
            System::Heap => Box::new(crate::rvm::HeapBank::create(dir)?),
            System::Sqlite => Box::new(crate::sqlite::SqliteBank::open(dir, true)?),
            System::Lmdb => Box::new(crate::lmdb::LmdbBank::open(dir, true)?),
            System::Redb => Box::new(crate::redb_bank::RedbBank::open(dir, true)?),
            System::Pmem => pmem(dir, true)?,
        })
    }

    /// Opens the bank in `dir` (after a crash: recovers it).
    pub fn open(self, dir: &Path) -> Result<Box<dyn Bank>> {
        Ok(match self {
            System::Flat => Box::new(crate::rvm::FlatBank::open(dir)?),
            System::Heap => Box::new(crate::rvm::HeapBank::open(dir)?),
            System::Sqlite => Box::new(crate::sqlite::SqliteBank::open(dir, false)?),
            System::Lmdb => Box::new(crate::lmdb::LmdbBank::open(dir, false)?),
            System::Redb => Box::new(crate::redb_bank::RedbBank::open(dir, false)?),
            System::Pmem => pmem(dir, false)?,
        })
    }
}

#[cfg(pmemobj)]
fn pmem(dir: &Path, create: bool) -> Result<Box<dyn Bank>> {
    Ok(Box::new(crate::pmemobj::PmemBank::open(dir, create)?))
}

#[cfg(not(pmemobj))]
fn pmem(_dir: &Path, _create: bool) -> Result<Box<dyn Bank>> {
    anyhow::bail!("built without libpmemobj (apt-get install libpmemobj-dev)")
}

/// Lock stripes over the accounts, for the banks that leave isolation to
/// the application (this library's region, libpmemobj): a transfer holds
/// the stripes of its accounts, taken in stripe order, until its commit
/// returns.
pub struct Stripes(Vec<Mutex<()>>);

impl Stripes {
    const N: usize = 4096;

    pub fn new() -> Stripes {
        Stripes((0..Self::N).map(|_| Mutex::new(())).collect())
    }

    /// The stripes of every account in `batch`.
    pub fn batch(&self, batch: &[Transfer]) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> =
            batch.iter().flat_map(|t| [t.from as usize % Self::N, t.to as usize % Self::N]).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|s| self.0[s].lock()).collect()
    }

    /// The stripe of one account.
    pub fn one(&self, account: u32) -> MutexGuard<'_, ()> {
        self.0[account as usize % Self::N].lock()
    }

    /// Every stripe (no transfer in flight while they are held).
    pub fn all(&self) -> Vec<MutexGuard<'_, ()>> {
        self.0.iter().map(|s| s.lock()).collect()
    }
}
