//! The `kv` example (`examples/kv.rs`), run as a command line would run it:
//! each call opens the store, runs one command and closes it; exit codes
//! and output are checked. The example's source is compiled into this
//! test, so no separate build step is needed.

#[allow(dead_code)]
#[path = "../examples/kv.rs"]
mod kv;

/// Runs `kv --dir DIR args...`: (exit code, stdout, stderr).
fn kv(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--dir".to_string(), dir.display().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = kv::run(&all, &mut out, &mut err);
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

#[test]
fn put_get_scan_del_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    assert_eq!(kv(&dir, &["get", "apple"]).0, 1, "empty store: not found");
    for (k, v) in [("banana", "yellow"), ("apple", "red"), ("cherry", "dark red"), ("apricot", "orange")] {
        assert_eq!(kv(&dir, &["put", k, v]), (0, String::new(), String::new()));
    }
    assert_eq!(kv(&dir, &["get", "apple"]), (0, "red\n".into(), String::new()));
    assert_eq!(kv(&dir, &["put", "apple", "green"]).0, 0);
    assert_eq!(kv(&dir, &["get", "apple"]).1, "green\n");
    assert_eq!(kv(&dir, &["scan", "a..b"]).1, "apple\tgreen\napricot\torange\n");
    assert_eq!(kv(&dir, &["scan", "apricot..=banana"]).1, "apricot\torange\nbanana\tyellow\n");
    assert_eq!(kv(&dir, &["scan", "b.."]).1, "banana\tyellow\ncherry\tdark red\n");
    assert_eq!(kv(&dir, &["scan", ".."]).1.lines().count(), 4);
    assert_eq!(kv(&dir, &["del", "apple"]).0, 0);
    assert_eq!(kv(&dir, &["del", "apple"]).0, 1);
    let (code, out, err) = kv(&dir, &["get", "apple"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("not found"), "{err}");
    assert_eq!(kv(&dir, &["scan", "..c"]).1, "apricot\torange\nbanana\tyellow\n");
}

#[test]
fn usage_errors_and_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    for args in [&[][..], &["put", "k"], &["get"], &["frob", "k"], &["scan", "ab"], &["scan", "a..="]] {
        let (code, _, err) = kv(&dir, args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.starts_with("kv: "), "{err}");
    }
    // An empty folder (an unset shell variable) is refused, not the
    // current folder.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = kv::run(&["--dir".into(), String::new(), "get".into(), "k".into()], &mut out, &mut err);
    assert_eq!(code, 2);
    assert!(String::from_utf8(err).unwrap().contains("empty"));
    let long_key = "k".repeat(kv::MAX_KEY + 1);
    let (code, _, err) = kv(&dir, &["put", &long_key, "v"]);
    assert_eq!(code, 2);
    assert!(err.contains("at most 32"), "{err}");
    let long_value = "v".repeat(kv::MAX_VALUE + 1);
    assert_eq!(kv(&dir, &["put", "k", &long_value]).0, 2);
    // The longest ones fit, and come back whole.
    let key = "k".repeat(kv::MAX_KEY);
    let value = "v".repeat(kv::MAX_VALUE);
    assert_eq!(kv(&dir, &["put", &key, &value]).0, 0);
    assert_eq!(kv(&dir, &["get", &key]).1, format!("{value}\n"));
    // A prefix sorts first; the empty key is a key.
    assert_eq!(kv(&dir, &["put", "kk", "2"]).0, 0);
    assert_eq!(kv(&dir, &["put", "", "empty"]).0, 0);
    let scan = kv(&dir, &["scan", ".."]).1;
    assert_eq!(scan.lines().map(|l| l.split('\t').next().unwrap().len()).collect::<Vec<_>>(), [0, 2, kv::MAX_KEY]);
}

/// A writer whose reader went away after `room` bytes (`kv scan .. | head -1`).
struct ClosedPipe {
    room: usize,
}

impl std::io::Write for ClosedPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_reader_that_stops_early_is_not_an_error_and_the_store_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    for i in 0..50 {
        assert_eq!(kv(&dir, &["put", &format!("k{i:02}"), "v"]).0, 0);
    }
    let args: Vec<String> = ["--dir", dir.to_str().unwrap(), "scan", ".."].iter().map(|s| s.to_string()).collect();
    let (mut out, mut err) = (ClosedPipe { room: 10 }, Vec::new());
    assert_eq!(kv::run(&args, &mut out, &mut err), 0);
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    assert_eq!(kv(&dir, &["scan", ".."]).1.lines().count(), 50);
}
