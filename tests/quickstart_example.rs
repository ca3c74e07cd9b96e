//! The README's main example (`examples/quickstart.rs`), compiled into
//! this test: runs carry the counts on, and a bad folder argument is an
//! error that names it, never files made somewhere else.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[test]
fn runs_carry_the_counts_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    assert_eq!(quickstart::run(&dir).unwrap(), (1, 1000));
    assert_eq!(quickstart::run(&dir).unwrap(), (2, 2000));
}

#[test]
fn a_bad_folder_is_an_error_that_names_it() {
    let e = quickstart::folder::folder(Some("".into()), "rvm-quickstart").unwrap_err();
    assert!(e.contains("empty"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let e = quickstart::run(&file).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
    // A folder holding garbage where the log should be: refused, kept.
    let dir = tmp.path().join("garbage");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("quickstart.log"), vec![0x5a; 100_000]).unwrap();
    let e = quickstart::run(&dir).unwrap_err().to_string();
    assert!(e.contains("not an RVM log"), "{e}");
    assert_eq!(std::fs::read(dir.join("quickstart.log")).unwrap(), vec![0x5a; 100_000]);
}
