//! Typed errors, one enum per concern, gathered in [`Error`].

use std::io;
use std::path::PathBuf;

/// Convenient alias for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the core returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device operation failed.
    #[error("I/O error while {op} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing the log", "syncing segment", ...).
        op: &'static str,
        /// The device.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// On-disk data failed a check (magic, version, checksum, bounds).
    #[error("corrupted {what} at {location}")]
    Corrupted {
        /// The structure that is damaged ("log status slot", "log frame").
        what: String,
        /// Where: device and byte offset or log position.
        location: String,
    },
    /// The device is open already, in this process or another.
    #[error("{} is already in use (locked by this or another process)", path.display())]
    Locked {
        /// The device.
        path: PathBuf,
    },
    /// A write or sync failed earlier; the instance refuses further commits
    /// because durability can no longer be promised. Reopen to recover.
    #[error("instance stopped after a failed write or sync ({cause}); reopen it to run recovery")]
    Poisoned {
        /// The first failure.
        cause: String,
    },
    /// The instance was opened by another process: this one is a child
    /// made with `fork` that inherited it. Its log and segment files are
    /// the parent's (a commit, flush or checkpoint here would write into
    /// them behind the parent's back), and the instance's threads did not
    /// survive the fork, so every call that would touch its files or wait
    /// for its threads is refused; dropping the child's handles writes
    /// nothing. Open what the child needs after the parent has closed it,
    /// or in a program started with `exec`.
    #[error("the RVM instance of log {} was opened by process {owner}; a forked child cannot use it", path.display())]
    ForkedChild {
        /// The instance's log.
        path: PathBuf,
        /// The process that opened it.
        owner: u32,
    },
    /// A log-level error.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A mapping error.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A transaction error.
    #[error(transparent)]
    Tx(#[from] TxError),
}

/// Errors about the log as a whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogError {
    /// The requested log size is too small or not representable.
    #[error("log size {requested} is invalid: {reason}")]
    BadSize {
        /// Requested size in bytes.
        requested: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The device is not an RVM log (wrong magic).
    #[error("{} is not an RVM log (bad magic)", path.display())]
    NotALog {
        /// The device.
        path: PathBuf,
    },
    /// The log was written by an unsupported format version.
    #[error("log format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found on disk.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// One commit needs more log space than the log has.
    #[error("a transaction needs {needed} bytes of log but the log holds only {capacity}")]
    TransactionTooLarge {
        /// Bytes the transaction needs.
        needed: u64,
        /// Capacity of the log's record area.
        capacity: u64,
    },
    /// The log's segment dictionary has no room for another segment: the
    /// segments this instance has open fill it.
    /// [`crate::Rvm::close_segment`] and [`crate::Rvm::delete_segment`]
    /// remove a segment's entry.
    #[error(
        "the log's segment dictionary is full ({limit} bytes): close segments no longer in use (Rvm::close_segment or delete_segment remove their entries)"
    )]
    SegmentDictionaryFull {
        /// Size limit of the dictionary.
        limit: usize,
    },
    /// The log holds records for bytes past the end of a segment: the
    /// segment file was truncated (or replaced by a shorter one) by someone
    /// else. The log itself is intact; nothing was written.
    #[error(
        "segment {} is {len} bytes but the log holds records up to byte {needed}: it was truncated or replaced \
         behind the log's back; restore it (or extend it) and open again",
        path.display()
    )]
    SegmentTooShort {
        /// The segment.
        path: PathBuf,
        /// End of the furthest record.
        needed: u64,
        /// The segment's length now.
        len: u64,
    },
    /// The file under a segment's recorded name is not the file the log
    /// recorded (swapped, replaced or restored from a copy). Nothing was
    /// written to it. If the file is the right one (moved or restored on
    /// purpose), accept it with [`crate::Options::accept_segment`].
    #[error(
        "segment {} is not the file this log recorded ({recorded}; found {found}); refusing to apply its records \
         to another file (accept it with Options::accept_segment if it was restored or moved on purpose)",
        path.display()
    )]
    SegmentReplaced {
        /// The segment's recorded name.
        path: PathBuf,
        /// The identity the log recorded.
        recorded: crate::storage::DeviceId,
        /// The identity of the file found there.
        found: crate::storage::DeviceId,
    },
    /// Another log may hold unapplied records for this segment: opening it
    /// through this one would show stale bytes, and that log's recovery
    /// would later overwrite this one's commits. Open it through that log
    /// (its recovery applies the records) and close it there
    /// ([`crate::Rvm::close_segment`]) first.
    #[error(
        "segment {} has unapplied records in another log ({}): open it through that log and close it there \
         (Rvm::close_segment) before using it with this one",
        path.display(),
        other_log.display()
    )]
    SegmentInOtherLog {
        /// The segment.
        path: PathBuf,
        /// The log that holds records for it.
        other_log: PathBuf,
    },
    /// The segment a log record names is marked by another log file with
    /// this log's identity (the same log id): one of the two logs is a
    /// copy of the other, as after a data directory was copied. Recovering
    /// through this log would write its records into that log's segment
    /// (the file its dictionary names), and a copied segment beside this
    /// log would show the state before them; nothing was written. Open
    /// the log the mark names; or, to recover this copy into its own
    /// segments, give each one's new path with `Options::accept_segment`
    /// (`rvmutl recover --accept-segment RECORDED=COPY`).
    #[error(
        "segment {} belongs to the log at {}, another file with this log's identity: one log is a copy of the \
         other; recovering here would write this log's records into that log's segment, so nothing was written; \
         open that log, or name this copy's own segment with Options::accept_segment (rvmutl recover \
         --accept-segment RECORDED=COPY)",
        path.display(),
        owner_log.display()
    )]
    SegmentOfCopiedLog {
        /// The segment the log's dictionary names.
        path: PathBuf,
        /// The log its owner mark names.
        owner_log: PathBuf,
    },
    /// The segment's owner mark names a log that is gone (deleted, or
    /// replaced by another log at its path) and that may have held
    /// commits not yet applied to the segment: no log can recover them
    /// now, so the segment is refused rather than shown without them. If
    /// that log was emptied before it went (closed with
    /// [`crate::Rvm::close_segment`], or truncated), or to go on without
    /// its commits, accept the segment:
    /// `Options::accept_segment(path, path)`.
    #[error(
        "segment {} was last used through the log {}, which is gone (deleted or replaced): commits it had not yet \
         applied to the segment are lost with it; to use the segment as it stands, accept it \
         (Options::accept_segment with its path twice)",
        path.display(),
        owner_log.display()
    )]
    SegmentLogGone {
        /// The segment.
        path: PathBuf,
        /// The log its owner mark names.
        owner_log: PathBuf,
    },
    /// The log file lost its last name while open (deleted or renamed over):
    /// commits written to it could never be recovered, so the commit fails
    /// and the instance stops.
    #[error("log {} was deleted or replaced while open; commits can no longer be made durable", path.display())]
    LogUnlinked {
        /// The log's path.
        path: PathBuf,
    },
    /// A read-only view of a log ([`crate::log::inspect::segment_snapshot`])
    /// found the log's head moved (by a truncation, checkpoint or reopen
    /// finishing) during each of its attempts to read a consistent state.
    /// Nothing is wrong with the log; try again.
    #[error(
        "log {} changed under each of {attempts} attempts to read a consistent view (a truncation or checkpoint \
         kept finishing); try again",
        path.display()
    )]
    ViewUnstable {
        /// The log.
        path: PathBuf,
        /// Attempts made.
        attempts: u32,
    },
    /// The log names a segment that cannot be opened during recovery.
    #[error("the log holds records for segment {} which cannot be opened: {reason}", path.display())]
    MissingSegment {
        /// The segment's recorded name.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}

/// Errors about mapping segments and regions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapError {
    /// Address, offset or length is not a multiple of the page size.
    #[error("{what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    NotPageAligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The page size.
        page_size: usize,
    },
    /// Zero-length regions cannot be mapped.
    #[error("a region must not be empty")]
    EmptyRegion,
    /// The region extends past the end of the segment device.
    #[error("region [{offset:#x}, +{len:#x}) lies outside segment {} of {segment_len:#x} bytes", segment.display())]
    OutsideSegment {
        /// The segment.
        segment: PathBuf,
        /// Region offset.
        offset: u64,
        /// Region length.
        len: u64,
        /// Segment length.
        segment_len: u64,
    },
    /// The requested address range is already in use by some mapping.
    #[error("address range [{addr:#x}, +{len:#x}) is already in use")]
    AddressInUse {
        /// Requested address.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// A region cannot grow past the address space it reserved.
    #[error("region at {addr:#x} cannot grow to {len:#x} bytes: it reserved {capacity:#x}")]
    BeyondReservation {
        /// The region's address.
        addr: usize,
        /// The length asked for.
        len: usize,
        /// Its length plus its reservation.
        capacity: usize,
    },
    /// The address range does not fit in the user address space.
    #[error("address range [{addr:#x}, +{len:#x}) is not a valid user address range")]
    BadAddress {
        /// Requested address.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// Part of this segment range is mapped already (a region is mapped at most once).
    #[error("segment {} range [{offset:#x}, +{len:#x}) overlaps a region that is already mapped", segment.display())]
    AlreadyMapped {
        /// The segment.
        segment: PathBuf,
        /// Region offset.
        offset: u64,
        /// Region length.
        len: u64,
    },
    /// A segment with mapped regions cannot be closed.
    #[error("segment {} has {regions} region(s) mapped; unmap them before closing it", segment.display())]
    SegmentInUse {
        /// The segment.
        segment: PathBuf,
        /// Regions mapped.
        regions: usize,
    },
    /// The segment was closed ([`crate::Rvm::close_segment`]).
    #[error("segment {} is closed", segment.display())]
    SegmentClosed {
        /// The segment.
        segment: PathBuf,
    },
    /// The segment or region handle belongs to another instance (another
    /// log): its commits would go to that instance's log.
    #[error("segment {} belongs to another RVM instance (opened through another log or handle)", segment.display())]
    ForeignSegment {
        /// The segment.
        segment: PathBuf,
    },
    /// The region is claimed by a component that relies on it (a loaded
    /// segment, a heap); only that component may unmap it.
    #[error("region at {addr:#x} is owned by a loaded segment or heap; unload it there")]
    Claimed {
        /// Region address.
        addr: usize,
    },
    /// Unmap was asked while transactions on the region are uncommitted.
    #[error("region at {addr:#x} has {count} uncommitted transaction(s)")]
    Busy {
        /// Region address.
        addr: usize,
        /// Uncommitted transactions.
        count: usize,
    },
    /// No region is mapped at this address.
    #[error("no region is mapped at {addr:#x}")]
    NotMapped {
        /// The address.
        addr: usize,
    },
    /// [`crate::TrackingMethod::WriteProtect`] is not available here (a
    /// kernel older than 6.7, `userfaultfd` not permitted, another
    /// platform): track with [`crate::TrackingMethod::Fault`] instead.
    #[error("{reason}")]
    TrackingUnavailable {
        /// The system's answer.
        reason: String,
    },
    /// A tracked region ([`crate::Rvm::track`]) cannot grow: tracking
    /// covers the length it had when tracked.
    #[error("the region at {addr:#x} is tracked and cannot grow")]
    TrackedGrowth {
        /// Region address.
        addr: usize,
    },
    /// The system refused the mapping.
    #[error("mmap failed for [{addr:#x}, +{len:#x}): {errno}")]
    System {
        /// Requested address (0 = anywhere).
        addr: usize,
        /// Length.
        len: usize,
        /// The system's error.
        errno: String,
    },
}

/// Errors about transactions.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxError {
    /// `set_range` or `modify_bytes` named memory outside every mapped region.
    #[error("range [{addr:#x}, +{len:#x}) is not inside one mapped region")]
    RangeNotMapped {
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// This thread already has a transaction open on this instance (or
    /// leaked one with `mem::forget`, which leaves it open for good: drop
    /// or end transactions instead).
    #[error(
        "nested transactions are not supported: this thread already has one open on this instance \
         (a transaction leaked with mem::forget stays open for good)"
    )]
    Nested,
    /// An ordinary transaction declared a range in a tracked region
    /// ([`crate::Rvm::track`]): its pages change only in tracked
    /// transactions ([`crate::Rvm::begin_tracked`]).
    #[error("[{addr:#x}, +{len:#x}) is in a tracked region: change it in a tracked transaction (begin_tracked)")]
    TrackedRegion {
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
    },
    /// Stores into a write-protect-tracked region
    /// ([`crate::TrackingMethod::WriteProtect`]) were made outside any
    /// tracked transaction (found at the next `begin_tracked`). They were
    /// undone (the pages hold their committed image again) and are not
    /// logged; the transaction did not begin.
    #[error(
        "{pages} page(s) of write-protect-tracked regions (first at {addr:#x}) were stored into outside a tracked \
         transaction; the stores were undone"
    )]
    StoresOutsideTransaction {
        /// The first such page.
        addr: usize,
        /// How many pages.
        pages: usize,
    },
    /// The kernel's write-protect tracking failed for this process (for
    /// example in a child forked from the process that tracks the region:
    /// tracking does not cross `fork`).
    #[error("write-protect tracking failed: {what}")]
    TrackingFailed {
        /// What failed.
        what: String,
    },
    /// A tracked transaction changed more pages than the twin pool holds
    /// ([`crate::Options::tracked_pool_pages`]); it was rolled back.
    #[error("a tracked transaction changed {needed} pages but the twin pool holds {pool_pages}; it was rolled back")]
    TwinPoolExhausted {
        /// The pool's size in pages.
        pool_pages: usize,
        /// Pages the transaction changed.
        needed: usize,
    },
    /// The undeclared-store detector ([`crate::Options::verify_stores`])
    /// found bytes changed outside every declared range: a store a
    /// `set_range` should have announced (it would be lost in a crash, or
    /// kept only if a checkpoint swept the page).
    #[error(
        "undeclared store: {len} byte(s) at {addr:#x} in the region at {region:#x} changed outside every declared \
         range ({runs} such run(s) on that page); declare them with set_range before storing"
    )]
    UndeclaredStore {
        /// Address of the first undeclared changed byte.
        addr: usize,
        /// Length of its run.
        len: usize,
        /// Start address of the region.
        region: usize,
        /// Undeclared runs on that page.
        runs: usize,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::WouldBlock {
            return Error::Locked { path: path.into() };
        }
        Error::Io { op, path: path.into(), source }
    }

    pub(crate) fn corrupted(what: impl Into<String>, location: impl Into<String>) -> Self {
        Error::Corrupted { what: what.into(), location: location.into() }
    }
}
