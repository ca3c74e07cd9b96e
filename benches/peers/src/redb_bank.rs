//! redb: tables `accounts` (u64 → u64) and `history` (u64 → [u8; 32]).
//! Durable commits with `Durability::Immediate` (redb's default: 1-phase
//! commit with checksums, one `fsync` per commit), non-durable ones with
//! `Durability::None` (made durable by the next immediate commit). Default
//! builder (quick-repair off: a reopen after a crash repairs the database
//! by walking it). Writers are serialised by `begin_write`.

use crate::bank::{Bank, Transfer, ACCOUNTS, INITIAL_BALANCE, RECORD_LEN};
use anyhow::{Context, Result};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const ACCOUNTS_TABLE: TableDefinition<u64, u64> = TableDefinition::new("accounts");
const HISTORY_TABLE: TableDefinition<u64, [u8; RECORD_LEN]> = TableDefinition::new("history");

pub struct RedbBank {
    db: Database,
    /// Next history key (used inside write transactions only, which redb
    /// serialises).
    next: AtomicU64,
}

impl RedbBank {
    pub fn open(dir: &Path, create: bool) -> Result<RedbBank> {
        let db = Database::create(dir.join("bank.redb"))?;
        let wtxn = db.begin_write()?;
        let next = {
            let mut accounts = wtxn.open_table(ACCOUNTS_TABLE)?;
            if create {
                for a in 0..u64::from(ACCOUNTS) {
                    accounts.insert(a, INITIAL_BALANCE)?;
                }
            }
            let history = wtxn.open_table(HISTORY_TABLE)?;
            let last = history.last()?.map_or(0, |(k, _)| k.value() + 1);
            last
        };
        wtxn.commit()?;
        Ok(RedbBank { db, next: AtomicU64::new(next) })
    }
}

impl Bank for RedbBank {
    fn transfer(&self, _thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        let mut wtxn = self.db.begin_write()?;
        wtxn.set_durability(if durable { Durability::Immediate } else { Durability::None })?;
        {
            let mut accounts = wtxn.open_table(ACCOUNTS_TABLE)?;
            let mut history = wtxn.open_table(HISTORY_TABLE)?;
            for t in batch {
                let (from, to) = (u64::from(t.from), u64::from(t.to));
                let f = accounts.get(from)?.context("no such account")?.value();
                let d = accounts.get(to)?.context("no such account")?.value();
                let (f, d) = t.apply(f, d);
                accounts.insert(from, f)?;
                accounts.insert(to, d)?;
                history.insert(self.next.fetch_add(1, Ordering::Relaxed), t.record())?;
            }
        }
        wtxn.commit()?;
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        let rtxn = self.db.begin_read()?;
        let accounts = rtxn.open_table(ACCOUNTS_TABLE)?;
        let balance = accounts.get(u64::from(account))?.context("no such account")?.value();
        Ok(balance)
    }

    fn sum(&self) -> Result<u64> {
        let rtxn = self.db.begin_read()?;
        let accounts = rtxn.open_table(ACCOUNTS_TABLE)?;
        let mut sum = 0u64;
        for item in accounts.iter()? {
            sum = sum.wrapping_add(item?.1.value());
        }
        Ok(sum)
    }

    fn history_len(&self) -> Result<u64> {
        let rtxn = self.db.begin_read()?;
        Ok(rtxn.open_table(HISTORY_TABLE)?.len()?)
    }
}
