//! `kv`: a command-line key-value store on a persistent ordered map
//! ([`rvm::collections::PBTreeMap`]).
//!
//! ```text
//! cargo run --release --example kv -- put apple red      # store (or replace)
//! cargo run --release --example kv -- get apple          # prints "red"
//! cargo run --release --example kv -- scan a..b          # keys in [a, b), in order
//! cargo run --release --example kv -- scan ..=apple      # also a.., ..b, .., a..=b
//! cargo run --release --example kv -- del apple
//! cargo run --release --example kv -- --dir ./data get apple
//! ```
//!
//! The store lives in `$TMPDIR/rvm-kv` unless `--dir` names another folder.
//! Keys are byte strings of at most 32 bytes, values at most 127 bytes
//! (longer ones are refused, nothing is cut); keys sort by their bytes.
//! Every `put` and `del` is one flush-committed transaction: once the
//! command returns, the change survives a crash.
//!
//! Exit codes: 0 done, 1 key not found (`get`, `del`), 2 usage error (bad
//! arguments, a key or value too long), 3 the store could not be opened
//! or changed.

#[path = "common/folder.rs"]
mod folder;
use rvm::collections::btree_map::PKey;
use rvm::collections::{Config, Error, PBTreeMap, PHeap, Persist};
use std::cmp::Ordering;
use std::io::Write;
use std::ops::Bound;
use std::path::PathBuf;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 32;
/// Longest value, in bytes.
pub const MAX_VALUE: usize = 127;

/// A key: up to [`MAX_KEY`] bytes, length-prefixed.
#[derive(Persist, Clone, Copy)]
#[repr(C)]
pub struct Key {
    len: u8,
    bytes: [u8; MAX_KEY],
}

/// A value: up to [`MAX_VALUE`] bytes, length-prefixed.
#[derive(Persist, Clone, Copy)]
#[repr(C)]
pub struct Value {
    len: u8,
    bytes: [u8; MAX_VALUE],
}

impl Key {
    fn new(s: &str) -> Option<Key> {
        let b = s.as_bytes();
        let mut k = Key { len: u8::try_from(b.len()).ok()?, bytes: [0; MAX_KEY] };
        k.bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(k)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_KEY)]
    }
}

impl Value {
    fn new(s: &str) -> Option<Value> {
        let b = s.as_bytes();
        let mut v = Value { len: u8::try_from(b.len()).ok()?, bytes: [0; MAX_VALUE] };
        v.bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(v)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_VALUE)]
    }
}

/// Byte order of the key's bytes (a prefix sorts first): fixed forever,
/// as a stored map needs.
impl PKey for Key {
    fn cmp_key(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

/// The map's type, and its root's name.
type Store = PBTreeMap<Key, Value>;
const ROOT: &str = "kv";

const USAGE: &str = "usage: kv [--dir DIR] put KEY VALUE | get KEY | del KEY | scan [A]..[B] | scan [A]..=B";

/// What a command line asks for.
enum Command {
    Put(Key, Value),
    Get(Key),
    Del(Key),
    Scan(Bound<Key>, Bound<Key>),
}

fn key(s: &str) -> Result<Key, String> {
    Key::new(s).ok_or_else(|| format!("key {s:?} is {} bytes long; at most {MAX_KEY} are allowed", s.len()))
}

fn parse(args: &[String]) -> Result<(PathBuf, Command), String> {
    let mut args = args;
    let mut dir = folder::folder(None, "rvm-kv")?;
    if args.first().map(String::as_str) == Some("--dir") {
        dir = folder::folder(Some(args.get(1).ok_or("--dir needs a folder")?.into()), "rvm-kv")?;
        args = &args[2..];
    }
    let cmd = match args {
        [c, k, v] if c == "put" => {
            let value = Value::new(v)
                .ok_or_else(|| format!("value is {} bytes long; at most {MAX_VALUE} are allowed", v.len()))?;
            Command::Put(key(k)?, value)
        }
        [c, k] if c == "get" => Command::Get(key(k)?),
        [c, k] if c == "del" => Command::Del(key(k)?),
        [c, r] if c == "scan" => {
            let (a, b, inclusive) = if let Some((a, b)) = r.split_once("..=") {
                (a, b, true)
            } else if let Some((a, b)) = r.split_once("..") {
                (a, b, false)
            } else {
                return Err(format!("scan needs a range such as a..b, a.., ..b or a..=b, not {r:?}"));
            };
            let start = if a.is_empty() { Bound::Unbounded } else { Bound::Included(key(a)?) };
            let end = match (b.is_empty(), inclusive) {
                (true, false) => Bound::Unbounded,
                (true, true) => return Err("a..= needs an end key".into()),
                (false, true) => Bound::Included(key(b)?),
                (false, false) => Bound::Excluded(key(b)?),
            };
            Command::Scan(start, end)
        }
        _ => return Err(USAGE.into()),
    };
    Ok((dir, cmd))
}

/// Runs one command line (without the program name), writing results to
/// `out` and messages to `err`; returns the exit code.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let (dir, cmd) = match parse(args) {
        Ok(x) => x,
        Err(msg) => {
            let _ = writeln!(err, "kv: {msg}");
            return 2;
        }
    };
    match execute(&dir, cmd, out) {
        Ok(true) => 0,
        Ok(false) => {
            let _ = writeln!(err, "kv: not found");
            1
        }
        // A reader that stops early (`kv scan .. | head`) is not an error.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            let _ = writeln!(err, "kv: {} ({})", e, dir.display());
            3
        }
    }
}

/// Runs `cmd` on the store in `dir`; `false` if its key was not found.
fn execute(dir: &std::path::Path, cmd: Command, out: &mut dyn Write) -> Result<bool, Error> {
    let heap = PHeap::open_or_create(dir, Config::default())?;
    let found = match cmd {
        Command::Put(k, v) => heap.write(|tx| tx.root_or_insert_with(ROOT, Store::new)?.insert(k, v).map(|_| true))?,
        Command::Del(k) => heap.write(|tx| match tx.root_mut::<Store>(ROOT)? {
            Some(mut m) => Ok::<_, Error>(m.remove(&k)?.is_some()),
            None => Ok(false),
        })?,
        Command::Get(k) => heap.read(|r| -> Result<bool, Error> {
            let Some(v) = r.root::<Store>(ROOT)?.and_then(|m| m.get(&k)) else { return Ok(false) };
            print_line(out, v.as_bytes())?;
            Ok(true)
        })?,
        Command::Scan(a, b) => heap.read(|r| -> Result<bool, Error> {
            if let Some(m) = r.root::<Store>(ROOT)? {
                for (k, v) in m.range((a, b)) {
                    let mut line = k.as_bytes().to_vec();
                    line.push(b'\t');
                    line.extend_from_slice(v.as_bytes());
                    print_line(out, &line)?;
                }
            }
            Ok(true)
        })?,
    };
    heap.close()?;
    Ok(found)
}

fn print_line(out: &mut dyn Write, bytes: &[u8]) -> Result<(), Error> {
    out.write_all(bytes).and_then(|()| out.write_all(b"\n")).map_err(|source| Error::Io {
        op: "writing",
        path: "stdout".into(),
        source,
    })
}

fn main() {
    let args: Vec<String> = std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let code = run(&args, &mut std::io::stdout().lock(), &mut std::io::stderr().lock());
    std::process::exit(code);
}
