//! README's first example, as a new user copies it into a program that
//! depends on the facade crate `rvm` alone: it must compile with the
//! imports it shows (`#[derive(Persist)]` names the typed layer through
//! `rvm::collections` there; it used to name `rvm_collections`, which
//! such a program does not have) and run as it reads. Keep the body of
//! `readme_example` the same as README.md's first code block.

#[cfg(test)]
use rvm::collections::{Config, PBTreeMap, PHeap, PString, PVec, Persist};

/// README's first example, run in `dir`.
#[cfg(test)]
fn readme_example(dir: &std::path::Path) -> Result<rvm::collections::CheckReport, rvm::collections::Error> {
    #[derive(Persist, Clone, Copy)]
    #[repr(C)] // a stable layout: the heap outlives the program
    struct Totals {
        deposits: u64,
        withdrawals: u64,
    }

    let heap = PHeap::open_or_create(dir, Config::default())?; // log + heap in one folder
    heap.write(|tx| {
        // commits on Ok, undoes on Err or panic
        let mut t = tx.root_or_insert_with("totals", || Totals { deposits: 0, withdrawals: 0 })?;
        t.deposits += 100; // plain stores, logged at commit
        Ok::<_, rvm::collections::Error>(())
    })?;
    let t = heap.read(|r| r.root::<Totals>("totals").map(|t| t.copied()))?;
    let _ = t.map(|t| (t.deposits, t.withdrawals));

    #[derive(Persist)]
    #[repr(C)]
    struct Customer {
        name: PString,
        orders: PVec<u64>,
    } // values that own blocks nest freely

    heap.write(|tx| {
        let mut customers = tx.root_or_insert_with("customers", PBTreeMap::<u64, Customer>::new)?;
        customers.insert_owned(7, Customer { name: PString::new(), orders: PVec::new() })?;
        let mut c = customers.get_mut(&7)?.unwrap(); // a guard: changes are declared for you
        c.field_mut(|c| &c.name).push_str("Ada")?;
        c.field_mut(|c| &c.orders).push(1001)?;
        Ok::<_, rvm::collections::Error>(())
    })?;
    let report = heap.check()?; // walks every root: nothing leaked
    Ok(report)
}

#[cfg(test)]
/// The example runs, and runs again on its own folder (a second run
/// finds the first one's data: the totals grow, the customer is
/// replaced by an equal one), the check clean each time.
#[test]
fn the_readme_example_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    assert!(readme_example(dir.path()).unwrap().is_clean());
    assert!(readme_example(dir.path()).unwrap().is_clean());
    let heap = PHeap::open_or_create(dir.path(), Config::default()).unwrap();
    heap.read(|r| {
        // The derived structs are local to `readme_example`: read the
        // customers map through its element types' twins.
        #[derive(Persist)]
        #[repr(C)]
        struct Customer {
            name: PString,
            orders: PVec<u64>,
        }
        let c = r.root::<PBTreeMap<u64, Customer>>("customers").unwrap().unwrap();
        let seven = c.get(&7).unwrap();
        assert_eq!((c.len(), seven.name.as_str(), seven.orders.to_vec()), (1, "Ada", vec![1001]));
        #[derive(Persist, Clone, Copy)]
        #[repr(C)]
        struct Totals {
            deposits: u64,
            withdrawals: u64,
        }
        let t = r.root::<Totals>("totals").unwrap().unwrap();
        assert_eq!((t.deposits, t.withdrawals), (200, 0));
    });
}
