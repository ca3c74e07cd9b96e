//! The loader's typed errors.

use std::io;
use std::path::PathBuf;

/// Convenient alias for results of this crate.
pub type Result<T> = std::result::Result<T, LoaderError>;

/// Every error the loader returns.
///
/// Errors about a header read from a segment (untrusted bytes) are
/// [`NotALoadMap`](LoaderError::NotALoadMap),
/// [`UnsupportedVersion`](LoaderError::UnsupportedVersion) and
/// [`Corrupted`](LoaderError::Corrupted); errors about a load map the caller
/// built are [`InvalidMap`](LoaderError::InvalidMap) and
/// [`Spec`](LoaderError::Spec).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoaderError {
    /// The segment's header does not start with the load-map magic. An
    /// all-zero header is what a crash between creating the segment file and
    /// committing its load map leaves behind.
    #[error("{location}: no load map (magic {found:02x?}){}", if *found == [0; 8] {
        "; the header is blank: the segment's creation did not complete, or it was not made by the loader"
    } else { "" })]
    NotALoadMap {
        /// Where the header was read (segment path, or "header offset 0").
        location: String,
        /// The eight bytes found where the magic belongs.
        found: [u8; 8],
    },
    /// The header was written by an unsupported format version.
    #[error("{location}: load map format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Where the header was read.
        location: String,
        /// Version found on disk.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A load map read from a segment failed a check (checksum, reserved
    /// bytes, a field out of range, regions overlapping or outside the
    /// device, ...).
    #[error("corrupted load map: {what} (at {location})")]
    Corrupted {
        /// What is wrong.
        what: String,
        /// Where: segment path, header byte offset, region table entry and
        /// region name when known.
        location: String,
    },
    /// A load map given by the caller (to create a segment or add a region)
    /// breaks a rule.
    #[error("invalid load map{}: {reason}", region.as_ref().map(|r| format!(" (region `{r}`)")).unwrap_or_default())]
    InvalidMap {
        /// The region at fault, if the problem is about one.
        region: Option<String>,
        /// Which rule it breaks.
        reason: String,
    },
    /// The load map's page size does not suit this system: regions must be
    /// aligned to the system page size to be mapped.
    #[error("load map page size {map:#x} is not a multiple of this system's page size {system:#x}")]
    PageSize {
        /// The load map's page size.
        map: u64,
        /// The system's page size.
        system: usize,
    },
    /// The segment is loaded already by this instance (or a range of it is
    /// mapped directly through the core). A second process gets
    /// `LoaderError::Core(rvm_core::Error::Locked { .. })` instead.
    #[error("segment {} is already loaded (or part of it is mapped) in this instance", path.display())]
    AlreadyLoaded {
        /// The segment.
        path: PathBuf,
    },
    /// A region could not be mapped at its base address; nothing of the
    /// segment stays mapped.
    #[error("region `{region}` of {} could not be mapped at {base:#x}: {source}", path.display())]
    MapRegion {
        /// The segment.
        path: PathBuf,
        /// The region's name.
        region: String,
        /// Its base address.
        base: u64,
        /// The core's reason (typically `MapError::AddressInUse`).
        #[source]
        source: rvm_core::Error,
    },
    /// A transaction is still open on a region being unloaded.
    #[error("region `{region}` has {count} uncommitted transaction(s); commit or abort them before unloading")]
    Busy {
        /// The region's name (`"(header)"` for the header area).
        region: String,
        /// Uncommitted transactions with ranges in it.
        count: usize,
    },
    /// A line of a load-map text spec could not be parsed.
    #[error("load map spec, line {line}: {reason}")]
    Spec {
        /// Line number, starting at 1 (the position, for a list of
        /// command-line specs).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a segment file directly failed.
    #[error("I/O error while {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An error from the core (opening, locking, mapping, committing).
    #[error(transparent)]
    Core(#[from] rvm_core::Error),
}

impl LoaderError {
    /// Prefixes the location of a header error with the segment it was read
    /// from.
    pub(crate) fn in_segment(self, path: &std::path::Path) -> Self {
        let at = |location: String| format!("segment {}, {location}", path.display());
        match self {
            LoaderError::NotALoadMap { location, found } => LoaderError::NotALoadMap { location: at(location), found },
            LoaderError::UnsupportedVersion { location, found, supported } => {
                LoaderError::UnsupportedVersion { location: at(location), found, supported }
            }
            LoaderError::Corrupted { what, location } => LoaderError::Corrupted { what, location: at(location) },
            other => other,
        }
    }
}
