//! LMDB (heed): databases `accounts` (u64 big-endian key, u64 balance) and
//! `history` (u64 big-endian sequence, 32-byte record), in one 1 GiB map.
//! Default environment flags, so a commit writes its pages, `fdatasync`s
//! the data file, writes the meta page and syncs again (no `NO_SYNC`, no
//! `NO_META_SYNC`). Non-durable commits (the reopen workload's) set
//! `NO_SYNC` at run time (`mdb_env_set_flags`); the next durable commit
//! clears it and syncs, which makes them durable too. Writers are
//! serialised by LMDB's writer lock; a transfer reads both balances and
//! puts the new ones, then puts the record.

use crate::bank::{Bank, Transfer, ACCOUNTS, INITIAL_BALANCE};
use anyhow::{Context, Result};
use heed::byteorder::BigEndian;
use heed::types::{Bytes, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, FlagSetMode};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

type Accounts = Database<U64<BigEndian>, U64<BigEndian>>;
type History = Database<U64<BigEndian>, Bytes>;

pub struct LmdbBank {
    env: Env,
    accounts: Accounts,
    history: History,
    /// Next history key (used inside write transactions only, which LMDB
    /// serialises).
    next: AtomicU64,
    /// Whether `NO_SYNC` is set now.
    no_sync: Mutex<bool>,
}

impl LmdbBank {
    pub fn open(dir: &Path, create: bool) -> Result<LmdbBank> {
        let path = dir.join("lmdb");
        std::fs::create_dir_all(&path)?;
        // SAFETY: the folder is this bank's alone, opened once in this
        // process at a time, and never with unsafe flags here.
        let env = unsafe { EnvOpenOptions::new().map_size(1 << 30).max_dbs(2).open(&path)? };
        let mut wtxn = env.write_txn()?;
        let accounts: Accounts = env.create_database(&mut wtxn, Some("accounts"))?;
        let history: History = env.create_database(&mut wtxn, Some("history"))?;
        if create {
            for a in 0..u64::from(ACCOUNTS) {
                accounts.put(&mut wtxn, &a, &INITIAL_BALANCE)?;
            }
        }
        let next = history.last(&wtxn)?.map_or(0, |(k, _)| k + 1);
        wtxn.commit()?;
        Ok(LmdbBank { env, accounts, history, next: AtomicU64::new(next), no_sync: Mutex::new(false) })
    }
}

impl Bank for LmdbBank {
    fn transfer(&self, _thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        {
            let mut no_sync = self.no_sync.lock();
            if *no_sync == durable {
                let mode = if durable { FlagSetMode::Disable } else { FlagSetMode::Enable };
                // SAFETY: calls are serialised by the mutex; NO_SYNC only
                // delays durability to the next durable commit, which is
                // what a non-durable commit means here.
                unsafe { self.env.set_flags(EnvFlags::NO_SYNC, mode)? };
                *no_sync = !durable;
            }
        }
        let mut wtxn = self.env.write_txn()?;
        for t in batch {
            let (from, to) = (u64::from(t.from), u64::from(t.to));
            let f = self.accounts.get(&wtxn, &from)?.context("no such account")?;
            let d = self.accounts.get(&wtxn, &to)?.context("no such account")?;
            let (f, d) = t.apply(f, d);
            self.accounts.put(&mut wtxn, &from, &f)?;
            self.accounts.put(&mut wtxn, &to, &d)?;
            let key = self.next.fetch_add(1, Ordering::Relaxed);
            self.history.put(&mut wtxn, &key, &t.record())?;
        }
        wtxn.commit()?;
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        let rtxn = self.env.read_txn()?;
        self.accounts.get(&rtxn, &u64::from(account))?.context("no such account")
    }

    fn sum(&self) -> Result<u64> {
        let rtxn = self.env.read_txn()?;
        let mut sum = 0u64;
        for item in self.accounts.iter(&rtxn)? {
            sum = sum.wrapping_add(item?.1);
        }
        Ok(sum)
    }

    fn history_len(&self) -> Result<u64> {
        let rtxn = self.env.read_txn()?;
        Ok(self.history.len(&rtxn)?)
    }
}
