//! This library's two banks. Everything specific to rvm's API is here, so
//! that a change of that API touches this file only.
//!
//! - [`FlatBank`] (rvm-core): one segment mapped as one region. Offsets
//!   0, 64, 128, 192: each thread's count of history records (u64);
//!   `ACCOUNTS_AT`: the balances (u64 each); `RINGS_AT`: one history ring
//!   per thread, `RING_RECORDS` records of 32 bytes each. A transfer
//!   declares (`set_range`) the two balances, its history slot and its
//!   thread's count: 8 + 8 + 32 + 8 = 56 bytes. Concurrent transfers are
//!   kept apart by the application's locks, as RVM asks: 4096 lock stripes
//!   over the accounts, taken in order and held until the commit returns;
//!   each thread writes only its own ring and count.
//! - [`HeapBank`] (rvm-collections, the typed layer): a `PHeap` with roots
//!   `accounts` (`PVec<u64>`), `history` (`PVec<[u8; 32]>`, a ring of
//!   `RING_RECORDS` records) and `next` (`u64`, records so far). Writes
//!   through `PHeap::write` / `write_no_flush`, so writers are serialised
//!   by the heap's writer lock (as in LMDB and redb).
//!
//! Both: a 256 MiB log, `Options::default()` (coalescing, background
//! checkpoint at half the log), regions mapped copy-on-demand (the
//! default). Durable = `CommitMode::Flush` (one `fdatasync` of the log per
//! log write; concurrent flushers share one, group commit); non-durable =
//! `CommitMode::NoFlush`.

use crate::bank::{Bank, Stripes, Transfer, ACCOUNTS, INITIAL_BALANCE, MAX_THREADS, RECORD_LEN};
use anyhow::{anyhow, Context, Result};
use parking_lot::Mutex;
use rvm_collections::{Config, PHeap, PVec};
use rvm_core::{CommitMode, MapSpec, Options, ProgressHook, RecoveryPhase, Region, RestoreMode, Rvm};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of log for either bank.
const LOG_LEN: u64 = 256 << 20;
/// Records in a history ring.
const RING_RECORDS: usize = 1 << 18;
const ACCOUNTS_AT: usize = 4096;
const RINGS_AT: usize = (ACCOUNTS_AT + ACCOUNTS as usize * 8).next_multiple_of(4096);
const REGION_LEN: usize = RINGS_AT + MAX_THREADS * RING_RECORDS * RECORD_LEN;

fn commit_mode(durable: bool) -> CommitMode {
    if durable {
        CommitMode::Flush
    } else {
        CommitMode::NoFlush
    }
}

/// The bank in one region (see the module's notes).
pub struct FlatBank {
    // Dropped before the instance.
    region: Region,
    rvm: Rvm,
    stripes: Stripes,
    /// What recovery did at open (see `Bank::recovery_note`).
    note: Option<String>,
}

impl FlatBank {
    pub fn create(dir: &Path) -> Result<FlatBank> {
        rvm_core::create_log(dir.join("rvm.log"), LOG_LEN)?;
        let rvm = Rvm::open(dir.join("rvm.log"), Options::default())?;
        let segment = rvm.create_segment(dir.join("bank.seg"), REGION_LEN as u64)?;
        let region = rvm.map(&segment, MapSpec::new(0, REGION_LEN))?;
        let bank = FlatBank { region, rvm, stripes: Stripes::new(), note: None };
        let mut tx = bank.rvm.begin(RestoreMode::NoRestore)?;
        let accounts = bank.region.addr() + ACCOUNTS_AT;
        // SAFETY: the balances lie in the region; nothing else uses the
        // bank while it is made.
        unsafe {
            tx.set_range(accounts, ACCOUNTS as usize * 8)?;
            for a in 0..ACCOUNTS as usize {
                (accounts as *mut u64).add(a).write(INITIAL_BALANCE);
            }
        }
        tx.commit(CommitMode::Flush)?;
        // Applied to the segment: a reopen replays only later commits.
        bank.rvm.truncate()?;
        Ok(bank)
    }

    pub fn open(dir: &Path) -> Result<FlatBank> {
        let start = Instant::now();
        // When recovery's phases last reported (their ends), for the note.
        let phases = Arc::new(Mutex::new([None::<Duration>; 2]));
        let seen = phases.clone();
        let hook = ProgressHook::new(move |p| {
            seen.lock()[usize::from(p.phase == RecoveryPhase::Replay)] = Some(start.elapsed());
        });
        let rvm = Rvm::open(
            dir.join("rvm.log"),
            Options { recovery_progress: Some(hook), instant_recovery: instant(), ..Options::default() },
        )?;
        let opened = start.elapsed();
        let segment = rvm.open_segment(dir.join("bank.seg"))?;
        let region = rvm.map(&segment, MapSpec::new(0, REGION_LEN))?;
        let mapped = start.elapsed();
        let r = rvm.recovery_report();
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        // The last progress report of each phase (today's replay reports
        // each full 16 MiB chunk and nothing at its end, so a smaller
        // replay reports nothing).
        let [verified, replayed] = *phases.lock();
        let mut note = format!(
            "recovery: {} log transactions, {:.1} MB of log, {:.1} MB written to the segment",
            r.transactions,
            r.log_bytes as f64 / 1e6,
            r.segment_bytes_written as f64 / 1e6,
        );
        for (what, at) in [("verify's last report", verified), ("replay's last report", replayed)] {
            if let Some(at) = at {
                note += &format!(", {what} at {}", ms(at));
            }
        }
        note += &format!(", Rvm::open returned at {}, region mapped at {}", ms(opened), ms(mapped));
        Ok(FlatBank { region, rvm, stripes: Stripes::new(), note: Some(note) })
    }

    fn account_addr(&self, account: u32) -> usize {
        self.region.addr() + ACCOUNTS_AT + account as usize * 8
    }

    fn count_addr(&self, thread: usize) -> usize {
        self.region.addr() + thread * 64
    }

    fn slot_addr(&self, thread: usize, n: u64) -> usize {
        self.region.addr() + RINGS_AT + (thread * RING_RECORDS + (n as usize % RING_RECORDS)) * RECORD_LEN
    }
}

impl Bank for FlatBank {
    fn transfer(&self, thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        if thread >= MAX_THREADS {
            return Err(anyhow!("thread {thread} has no history ring"));
        }
        let _locks = self.stripes.batch(batch);
        let mut tx = self.rvm.begin(RestoreMode::NoRestore)?;
        // SAFETY: every address lies in the mapped region; the stripe
        // locks held until after the commit keep other threads off these
        // balances, and only this thread (one transfer at a time per
        // thread number) writes its ring and count.
        unsafe {
            let count = self.count_addr(thread) as *mut u64;
            let n = count.read();
            for (i, t) in batch.iter().enumerate() {
                let (from, to) = (self.account_addr(t.from), self.account_addr(t.to));
                tx.set_range(from, 8)?;
                tx.set_range(to, 8)?;
                let (f, d) = t.apply((from as *const u64).read(), (to as *const u64).read());
                (from as *mut u64).write(f);
                (to as *mut u64).write(d);
                tx.modify_bytes(self.slot_addr(thread, n + i as u64), &t.record())?;
            }
            tx.set_range(count as usize, 8)?;
            count.write(n + batch.len() as u64);
        }
        tx.commit(commit_mode(durable))?;
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        let _lock = self.stripes.one(account);
        // SAFETY: in the region; the stripe lock keeps writers off.
        Ok(unsafe { (self.account_addr(account) as *const u64).read() })
    }

    fn sum(&self) -> Result<u64> {
        let _all = self.stripes.all();
        let accounts = (self.region.addr() + ACCOUNTS_AT) as *const u64;
        // SAFETY: the balances lie in the region; every stripe is held.
        Ok((0..ACCOUNTS as usize).map(|a| unsafe { accounts.add(a).read() }).fold(0u64, u64::wrapping_add))
    }

    fn history_len(&self) -> Result<u64> {
        let _all = self.stripes.all();
        // SAFETY: the counts lie in the region; with every stripe held no
        // transfer is in flight.
        Ok((0..MAX_THREADS).map(|t| unsafe { (self.count_addr(t) as *const u64).read() }).sum())
    }

    fn log_bytes(&self) -> Option<u64> {
        Some(self.rvm.stats().log_bytes_written)
    }

    fn recovery_note(&self) -> Option<String> {
        self.note.clone()
    }
}

/// The bank in the typed heap (see the module's notes).
pub struct HeapBank {
    heap: PHeap,
}

type History = PVec<[u8; RECORD_LEN]>;

/// `RVM_PEERS_INSTANT=1`: reopens use instant recovery
/// (`Options::instant_recovery`).
pub fn instant() -> bool {
    std::env::var("RVM_PEERS_INSTANT").is_ok_and(|v| v == "1")
}

fn heap_config() -> Config {
    Config { heap_len: 64 << 20, log_len: LOG_LEN, ..Config::default() }
}

fn missing(root: &str) -> rvm_collections::Error {
    rvm_collections::Error::Config(format!("the bank has no root {root:?}"))
}

impl HeapBank {
    pub fn create(dir: &Path) -> Result<HeapBank> {
        let heap = PHeap::open_or_create(dir, heap_config())?;
        heap.write(|tx| {
            let mut accounts = tx.root_or_insert_with("accounts", PVec::<u64>::new)?;
            accounts.extend(std::iter::repeat_n(INITIAL_BALANCE, ACCOUNTS as usize))?;
            drop(accounts);
            let mut history = tx.root_or_insert_with("history", History::new)?;
            history.extend(std::iter::repeat_n([0u8; RECORD_LEN], RING_RECORDS))?;
            drop(history);
            tx.root_or_insert_with("next", || 0u64)?;
            Ok::<_, rvm_collections::Error>(())
        })?;
        heap.rvm().truncate()?;
        Ok(HeapBank { heap })
    }

    pub fn open(dir: &Path) -> Result<HeapBank> {
        let mut config = heap_config();
        config.options.instant_recovery = instant();
        Ok(HeapBank { heap: PHeap::open_or_create(dir, config)? })
    }
}

impl Bank for HeapBank {
    fn transfer(&self, _thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        let work = |tx: &mut rvm_collections::WriteTx<'_>| {
            let mut accounts = tx.root_mut::<PVec<u64>>("accounts")?.ok_or_else(|| missing("accounts"))?;
            for t in batch {
                let balance = |a: u32| accounts.get(a as usize).copied().ok_or_else(|| missing("account"));
                let (f, d) = t.apply(balance(t.from)?, balance(t.to)?);
                *accounts.get_mut(t.from as usize)?.ok_or_else(|| missing("account"))? = f;
                *accounts.get_mut(t.to as usize)?.ok_or_else(|| missing("account"))? = d;
            }
            drop(accounts);
            let mut next = tx.root_mut::<u64>("next")?.ok_or_else(|| missing("next"))?;
            let n = *next;
            *next += batch.len() as u64;
            drop(next);
            let mut history = tx.root_mut::<History>("history")?.ok_or_else(|| missing("history"))?;
            for (i, t) in batch.iter().enumerate() {
                history.set((n as usize + i) % RING_RECORDS, t.record())?;
            }
            Ok::<_, rvm_collections::Error>(())
        };
        if durable {
            self.heap.write(work)?
        } else {
            self.heap.write_no_flush(work)?
        }
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        self.heap
            .read(|r| r.root::<PVec<u64>>("accounts").map(|v| v.and_then(|v| v.get(account as usize).copied())))?
            .context("no such account")
    }

    fn sum(&self) -> Result<u64> {
        self.heap
            .read(|r| {
                r.root::<PVec<u64>>("accounts").map(|v| v.map(|v| v.iter().fold(0u64, |s, b| s.wrapping_add(*b))))
            })?
            .context("no accounts")
    }

    fn history_len(&self) -> Result<u64> {
        self.heap.read(|r| r.root::<u64>("next").map(|n| n.copied()))?.context("no history count")
    }

    fn log_bytes(&self) -> Option<u64> {
        Some(self.heap.rvm().stats().log_bytes_written)
    }

    fn recovery_note(&self) -> Option<String> {
        let r = self.heap.rvm().recovery_report();
        Some(format!(
            "recovery: {} log transactions, {:.1} MB of log, {:.1} MB written to the segments",
            r.transactions,
            r.log_bytes as f64 / 1e6,
            r.segment_bytes_written as f64 / 1e6
        ))
    }
}
