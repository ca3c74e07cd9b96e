//! A TPC-A-style bank on the typed layer: branches, accounts and a
//! history, changed by transfers that are durable when reported.
//!
//! ```text
//! cargo run --release --example bank               # in $TMPDIR/rvm-bank
//! cargo run --release --example bank -- ./data 5000  # a folder, and transfers per run
//! ```
//!
//! Each run opens (first: creates) the bank, checks it — the money is all
//! there, the branch totals match their accounts, the history holds one
//! record per transfer — then makes more transfers, each a flush-committed
//! transaction, printing a line every 500. Kill it at any moment (Ctrl-C,
//! `kill -9`) and run it again: every transfer it reported is in the
//! history, and the total is unchanged. No `unsafe`, no `set_range`.

#[path = "common/folder.rs"]
mod folder;
use rvm::collections::{Config, Error, PHeap, PVec, Persist};

const BRANCHES: usize = 10;
const ACCOUNTS: usize = 10_000;
const OPENING_BALANCE: i64 = 1_000;

/// The bank's own counters.
#[derive(Persist, Clone, Copy, Debug)]
#[repr(C)]
struct Bank {
    transfers: u64,
    runs: u64,
}

#[derive(Persist, Clone, Copy, Debug)]
#[repr(C)]
struct Account {
    balance: i64,
    branch: u64,
}

#[derive(Persist, Clone, Copy, Debug)]
#[repr(C)]
struct Transfer {
    seq: u64,
    from: u64,
    to: u64,
    amount: i64,
}

/// What a check of the bank finds.
#[derive(Debug, PartialEq)]
struct Audit {
    transfers: u64,
    history: u64,
    total: i64,
}

/// Checks every invariant; returns the counts.
fn audit(heap: &PHeap) -> Result<Audit, Box<dyn std::error::Error>> {
    heap.read(|r| {
        let bank = r.root::<Bank>("bank")?.ok_or("no bank root")?;
        let accounts = r.root::<PVec<Account>>("accounts")?.ok_or("no accounts")?;
        let branches = r.root::<PVec<i64>>("branches")?.ok_or("no branches")?;
        let history = r.root::<PVec<Transfer>>("history")?.ok_or("no history")?;
        // Damaged data is reported, never a panic: the shapes are checked
        // before indexing, balances are far from overflowing, and sums are
        // in i128.
        if accounts.len() != ACCOUNTS || branches.len() != BRANCHES {
            return Err(format!(
                "{} accounts and {} branches, not {ACCOUNTS} and {BRANCHES}",
                accounts.len(),
                branches.len()
            )
            .into());
        }
        if accounts.iter().any(|a| a.branch >= BRANCHES as u64 || a.balance.unsigned_abs() > (i64::MAX / 4) as u64)
            || branches.iter().any(|b| b.unsigned_abs() > (i64::MAX / 4) as u64)
        {
            return Err("an account or branch holds impossible values".into());
        }
        let total: i128 = accounts.iter().map(|a| i128::from(a.balance)).sum();
        if total != i128::from(OPENING_BALANCE) * ACCOUNTS as i128 {
            return Err(format!("money appeared or vanished: total {total}").into());
        }
        let mut per_branch = [0i128; BRANCHES];
        for a in accounts.iter() {
            per_branch[(a.branch % BRANCHES as u64) as usize] += i128::from(a.balance);
        }
        if !per_branch.iter().copied().eq(branches.iter().map(|&b| i128::from(b))) {
            return Err("a branch total disagrees with its accounts".into());
        }
        if history.len() as u64 != bank.transfers || history.iter().enumerate().any(|(i, t)| t.seq != i as u64) {
            return Err("the history does not hold one record per transfer".into());
        }
        Ok(Audit { transfers: bank.transfers, history: history.len() as u64, total: total as i64 })
    })
}

/// A small deterministic generator (xorshift), seeded per run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let dir = folder::folder(args.next(), "rvm-bank")?;
    let per_run: u64 = args.next().and_then(|a| a.to_str()?.parse().ok()).unwrap_or(2_000);
    let heap = PHeap::open_or_create(&dir, Config::default())?;

    // The first run opens the accounts (one transaction: all or nothing).
    heap.write(|tx| {
        if tx.root::<Bank>("bank")?.is_some() {
            return Ok(());
        }
        let mut accounts = tx.root_or_insert_with("accounts", PVec::<Account>::new)?;
        accounts.extend((0..ACCOUNTS).map(|i| Account { balance: OPENING_BALANCE, branch: (i % BRANCHES) as u64 }))?;
        let mut branches = tx.root_or_insert_with("branches", PVec::<i64>::new)?;
        branches.extend((0..BRANCHES).map(|_| OPENING_BALANCE * (ACCOUNTS / BRANCHES) as i64))?;
        tx.root_or_insert_with("history", PVec::<Transfer>::new)?;
        tx.root_or_insert_with("bank", || Bank { transfers: 0, runs: 0 })?;
        Ok::<_, Error>(())
    })?;

    let before = audit(&heap)?;
    println!(
        "bank in {}: {} transfers so far, total {}, all checks passed",
        dir.display(),
        before.transfers,
        before.total
    );

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ before.transfers.wrapping_add(1));
    for _ in 0..per_run {
        let (from, to) = ((rng.next() % ACCOUNTS as u64) as usize, (rng.next() % ACCOUNTS as u64) as usize);
        let amount = (rng.next() % 100) as i64 + 1;
        // One durable transaction: both balances, both branch totals, the
        // history record and the counter, or none of them.
        let seq = heap.write(|tx| {
            let mut accounts = tx.root_mut::<PVec<Account>>("accounts")?.ok_or(Error::Config("no accounts".into()))?;
            let mut branches = tx.root_mut::<PVec<i64>>("branches")?.ok_or(Error::Config("no branches".into()))?;
            let (fb, tb) = (accounts.as_slice()[from].branch as usize, accounts.as_slice()[to].branch as usize);
            if let Some(mut a) = accounts.get_mut(from)? {
                a.balance -= amount;
            }
            if let Some(mut a) = accounts.get_mut(to)? {
                a.balance += amount;
            }
            if let Some(mut b) = branches.get_mut(fb)? {
                *b -= amount;
            }
            if let Some(mut b) = branches.get_mut(tb)? {
                *b += amount;
            }
            let mut bank = tx.root_mut::<Bank>("bank")?.ok_or(Error::Config("no bank".into()))?;
            let seq = bank.transfers;
            bank.transfers += 1;
            let mut history = tx.root_mut::<PVec<Transfer>>("history")?.ok_or(Error::Config("no history".into()))?;
            history.push(Transfer { seq, from: from as u64, to: to as u64, amount })?;
            Ok::<_, Error>(seq)
        })?;
        if (seq + 1) % 500 == 0 {
            // Durable: the transaction was flush-committed before this line.
            println!("committed transfer {}", seq + 1);
        }
    }
    heap.write(|tx| {
        if let Some(mut bank) = tx.root_mut::<Bank>("bank")? {
            bank.runs += 1;
        }
        Ok::<_, Error>(())
    })?;
    let after = audit(&heap)?;
    println!(
        "done: {} transfers in all ({} this run), total {}, all checks passed",
        after.transfers,
        after.transfers - before.transfers,
        after.total
    );
    heap.close()?;
    Ok(())
}

fn main() {
    // Errors are shown by their `Display` (what went wrong, and where), not `Debug`.
    if let Err(e) = run() {
        eprintln!("bank: error: {e}");
        std::process::exit(1);
    }
}
