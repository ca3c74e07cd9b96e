//! `kill -9` while several threads fill a heap that grows in place (real
//! files). The heap starts at 256 KiB and grows in small steps, so growths
//! run all the time and the kills land before, inside and after them.
//!
//! The test re-runs this test binary as a child (`RVM_GROWTH_CHILD` names
//! the work folder). Each of the child's threads keeps a directory block
//! (rooted at `t{i}`: a count, then (pointer, size, key) per block) that it
//! updates in the same transaction as each allocation, and fills each block
//! with a pattern of its key; every eighth commit flushes, and after it
//! returns the thread records its count in a side file with its own fsync.
//! After each kill the parent recovers and checks: the heap check passes,
//! the loader's map and the heap agree on the size, no directory lost a
//! flush-committed entry, and every block named holds its pattern. The next
//! round continues on the same files. `RVM_KILL9_ROUNDS` sets the rounds
//! (default 6).

use rvm::heap::{GrowthPolicy, HeapSpec, PersistentHeap};
use rvm::{create_log, CommitMode, Options, RestoreMode, Rvm};
use std::alloc::Layout;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::time::Duration;

const CHILD_ENV: &str = "RVM_GROWTH_CHILD";
const THREADS: usize = 4;
/// Entries of a directory.
const CAP: usize = 2048;
const DIR_BYTES: usize = 8 + CAP * 24;
const INITIAL: u64 = 256 << 10;
const MAX: u64 = 512 << 20;
/// A fixed base of its own (the child maps it in its own process).
const BASE: u64 = 0x5f40_0000_0000;

fn pattern(key: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (8 * (i % 8))) as u8 ^ (i / 8) as u8).collect()
}

fn opts() -> Options {
    Options { truncate_threshold: Some(0.5), ..Options::default() }
}

/// Reads thread `i`'s directory: (address, entries).
fn read_dir(heap: &PersistentHeap, i: usize) -> (usize, Vec<(u64, u64, u64)>) {
    let root = heap.root(&format!("t{i}")).expect("directory root");
    let addr = root.ptr.as_ptr() as usize;
    // SAFETY: a live rooted block of DIR_BYTES; nothing writes it now.
    let b = unsafe { std::slice::from_raw_parts(addr as *const u8, DIR_BYTES) };
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let n = word(0) as usize;
    assert!(n <= CAP, "directory {i} claims {n} entries");
    (addr, (0..n).map(|k| (word(8 + 24 * k), word(16 + 24 * k), word(24 + 24 * k))).collect())
}

fn child(dir: &Path) {
    let rvm = Rvm::open(dir.join("log"), opts()).unwrap();
    let heap = PersistentHeap::open(&rvm, dir.join("heap")).unwrap();
    heap.set_growth_policy(GrowthPolicy::Doubling { min_step: 64 << 10, max_step: 256 << 10 });
    std::thread::scope(|s| {
        for i in 0..THREADS {
            let heap = &heap;
            s.spawn(move || {
                let (dir_addr, mut entries) = read_dir(heap, i);
                let mut serial = entries.last().map_or(0, |e| e.2 & 0xffff_ffff) + 1;
                loop {
                    let mut tx = heap.begin(RestoreMode::Restore).unwrap();
                    let size = 64 + (serial as usize * 7919) % 6000;
                    let key = (i as u64) << 32 | serial;
                    let p = tx.malloc(Layout::from_size_align(size, 16).unwrap()).unwrap();
                    // SAFETY: the new block is this transaction's alone.
                    unsafe { tx.write(p, &pattern(key, size)).unwrap() };
                    let k = if entries.len() < CAP {
                        entries.push((0, 0, 0));
                        entries.len() - 1
                    } else {
                        // Full: replace the oldest in turn (freed in the same transaction).
                        let k = (serial as usize) % CAP;
                        tx.free(NonNull::new(entries[k].0 as *mut u8).unwrap()).unwrap();
                        k
                    };
                    entries[k] = (p.as_ptr() as u64, size as u64, key);
                    let mut b = (entries.len() as u64).to_le_bytes().to_vec();
                    let at = 8 + 24 * k;
                    let dir_ptr = NonNull::new(dir_addr as *mut u8).unwrap();
                    // SAFETY: the directory is this thread's alone.
                    unsafe {
                        tx.write(dir_ptr, &b).unwrap();
                        b.clear();
                        for w in [entries[k].0, entries[k].1, entries[k].2] {
                            b.extend_from_slice(&w.to_le_bytes());
                        }
                        tx.write(NonNull::new((dir_addr + at) as *mut u8).unwrap(), &b).unwrap();
                    }
                    let flush = serial % 8 == 0;
                    tx.commit(if flush { CommitMode::Flush } else { CommitMode::NoFlush }).unwrap();
                    if flush {
                        // Written aside and renamed: a kill leaves the old
                        // bound or the new one, never an empty file.
                        let tmp = dir.join(format!("durable.{i}.tmp"));
                        let f = std::fs::File::create(&tmp).unwrap();
                        std::io::Write::write_all(&mut &f, &serial.to_le_bytes()).unwrap();
                        f.sync_all().unwrap();
                        std::fs::rename(&tmp, dir.join(format!("durable.{i}"))).unwrap();
                    }
                    serial += 1;
                }
            });
        }
    });
}

#[test]
fn kill_9_while_threads_grow_a_heap() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let rounds: u64 = std::env::var("RVM_KILL9_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let dir = tempfile::tempdir().unwrap();
    create_log(dir.path().join("log"), 8 << 20).unwrap();
    {
        let rvm = Rvm::open(dir.path().join("log"), opts()).unwrap();
        let spec = HeapSpec::fixed(BASE, INITIAL).with_max_len(MAX);
        let heap = PersistentHeap::create(&rvm, dir.path().join("heap"), &spec).unwrap();
        for i in 0..THREADS {
            heap.root_or_create(&format!("t{i}"), DIR_BYTES, 8, 0xd1, |_| {}).unwrap();
        }
        heap.close().unwrap();
        rvm.close().unwrap();
    }
    let mut last_len = INITIAL;
    let mut growths = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["kill_9_while_threads_grow_a_heap", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env_remove("RUST_TEST_THREADS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 97 * (round % 4)));
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the child ended by itself ({status}): {}", String::from_utf8_lossy(&out.stderr));
        }
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(9));

        let rvm = Rvm::open(dir.path().join("log"), opts()).unwrap();
        let heap = PersistentHeap::open(&rvm, dir.path().join("heap")).unwrap();
        heap.check().unwrap();
        let len = heap.heap_len();
        assert_eq!(heap.segment().load_map().get(rvm::heap::HEAP_REGION).unwrap().len, len);
        assert!(len >= last_len, "the heap shrank from {last_len} to {len}");
        growths += u64::from(len > last_len);
        eprintln!("round {round}: the heap has {len} bytes");
        last_len = len;
        for i in 0..THREADS {
            let (_, entries) = read_dir(&heap, i);
            let durable = std::fs::read(dir.path().join(format!("durable.{i}")))
                .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
                .unwrap_or(0);
            let newest = entries.iter().map(|e| e.2 & 0xffff_ffff).max().unwrap_or(0);
            assert!(newest >= durable, "thread {i}: entry {durable} was flush-committed, the newest is {newest}");
            for &(ptr, size, key) in &entries {
                assert!(heap.live_block_len(NonNull::new(ptr as *mut u8).unwrap()).is_some_and(|l| l >= size));
                // SAFETY: a live block of at least `size` bytes (checked).
                let got = unsafe { std::slice::from_raw_parts(ptr as *const u8, size as usize) };
                assert!(got == pattern(key, size as usize).as_slice(), "thread {i}: block {key:#x} damaged");
            }
        }
        heap.close().unwrap();
        rvm.close().unwrap();
    }
    assert!(growths > 0, "the heap never grew");
}
