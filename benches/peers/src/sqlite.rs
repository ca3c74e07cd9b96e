//! SQLite (rusqlite, bundled): `accounts(id INTEGER PRIMARY KEY, balance
//! INTEGER)`, `history(seq INTEGER PRIMARY KEY, rec BLOB)` (32-byte
//! records, rowids in commit order). `journal_mode=WAL`; durable commits
//! with `synchronous=FULL` (the WAL is synced at every commit),
//! non-durable ones with `synchronous=NORMAL` (synced only at
//! checkpoints). The default auto-checkpoint (1,000 pages) stays on. One
//! connection per thread; a transfer batch is a `BEGIN IMMEDIATE`
//! transaction (writers wait on SQLite's lock, `busy_timeout` 60 s) with
//! one `UPDATE` per balance (`balance = balance - ?`, read and written by
//! SQLite) and one `INSERT` per record, all prepared once and cached.

use crate::bank::{Bank, Transfer, ACCOUNTS, INITIAL_BALANCE, MAX_THREADS};
use anyhow::Result;
use parking_lot::Mutex;
use rusqlite::{params, Connection, TransactionBehavior};
use std::path::Path;
use std::time::Duration;

pub struct SqliteBank {
    path: std::path::PathBuf,
    /// One connection per thread (opened at its first use), with the
    /// `synchronous` setting it has (true: FULL).
    conns: Vec<Mutex<Option<(Connection, bool)>>>,
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "SQLite refused WAL mode ({mode})");
    conn.execute_batch("PRAGMA synchronous=FULL")?;
    Ok(conn)
}

impl SqliteBank {
    pub fn open(dir: &Path, create: bool) -> Result<SqliteBank> {
        let path = dir.join("bank.sqlite");
        let mut first = connect(&path)?;
        if create {
            first.execute_batch(
                "CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
                 CREATE TABLE history(seq INTEGER PRIMARY KEY, rec BLOB NOT NULL);",
            )?;
            let tx = first.transaction()?;
            {
                let mut insert = tx.prepare("INSERT INTO accounts(id, balance) VALUES (?1, ?2)")?;
                for a in 0..ACCOUNTS {
                    insert.execute(params![a, INITIAL_BALANCE as i64])?;
                }
            }
            tx.commit()?;
            // Applied to the database file: a reopen replays only later
            // commits.
            first.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        let mut conns = vec![Mutex::new(Some((first, true)))];
        conns.extend((1..MAX_THREADS).map(|_| Mutex::new(None)));
        Ok(SqliteBank { path, conns })
    }

    /// Thread `thread`'s connection and its `synchronous` setting.
    fn conn(&self, thread: usize) -> Result<parking_lot::MappedMutexGuard<'_, (Connection, bool)>> {
        let mut slot = self.conns[thread].lock();
        if slot.is_none() {
            *slot = Some((connect(&self.path)?, true));
        }
        Ok(parking_lot::MutexGuard::map(slot, |c| c.as_mut().expect("opened above")))
    }
}

impl Bank for SqliteBank {
    fn transfer(&self, thread: usize, batch: &[Transfer], durable: bool) -> Result<()> {
        let mut guard = self.conn(thread)?;
        let (conn, synchronous_full) = &mut *guard;
        if *synchronous_full != durable {
            conn.execute_batch(if durable { "PRAGMA synchronous=FULL" } else { "PRAGMA synchronous=NORMAL" })?;
            *synchronous_full = durable;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut debit = tx.prepare_cached("UPDATE accounts SET balance = balance - ?1 WHERE id = ?2")?;
            let mut credit = tx.prepare_cached("UPDATE accounts SET balance = balance + ?1 WHERE id = ?2")?;
            let mut record = tx.prepare_cached("INSERT INTO history(rec) VALUES (?1)")?;
            for t in batch {
                // Balances stay far from i64's limits (amounts 1-100).
                debit.execute(params![t.amount as i64, t.from])?;
                credit.execute(params![t.amount as i64, t.to])?;
                record.execute(params![&t.record()[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn balance(&self, account: u32) -> Result<u64> {
        let guard = self.conn(0)?;
        let mut q = guard.0.prepare_cached("SELECT balance FROM accounts WHERE id = ?1")?;
        Ok(q.query_row([account], |r| r.get::<_, i64>(0))? as u64)
    }

    fn sum(&self) -> Result<u64> {
        let guard = self.conn(0)?;
        let mut q = guard.0.prepare_cached("SELECT balance FROM accounts")?;
        let mut sum = 0u64;
        let mut rows = q.query([])?;
        while let Some(row) = rows.next()? {
            sum = sum.wrapping_add(row.get::<_, i64>(0)? as u64);
        }
        Ok(sum)
    }

    fn history_len(&self) -> Result<u64> {
        let guard = self.conn(0)?;
        Ok(guard.0.query_row("SELECT count(*) FROM history", [], |r| r.get::<_, i64>(0))? as u64)
    }
}
