//! The folder argument the examples share.

use std::ffi::OsString;
use std::path::PathBuf;

/// `arg` as the folder to keep the files in, or `$TMPDIR/<default>` without
/// one. An empty argument (an unset shell variable, say) is an error: it
/// would put the files in the current folder.
pub fn folder(arg: Option<OsString>, default: &str) -> Result<PathBuf, String> {
    match arg {
        None => Ok(std::env::temp_dir().join(default)),
        Some(a) if a.is_empty() => Err("the folder argument is empty (give a folder, or none for the default)".into()),
        Some(a) => Ok(PathBuf::from(a)),
    }
}
