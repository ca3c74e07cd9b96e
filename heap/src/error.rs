//! Heap errors.

/// Errors of the heap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeapError {
    /// [`crate::TrackedAlloc`] needs a tracked heap ([`crate::Heap::track`]).
    #[error("the heap region is not tracked (Heap::track): TrackedAlloc cannot find its stores")]
    NotTracked,
    /// No free block can hold the request.
    #[error("out of memory: no free block for {size} bytes aligned to {align} (largest free block {largest} bytes)")]
    OutOfMemory {
        /// Requested size.
        size: usize,
        /// Requested alignment.
        align: usize,
        /// Largest free block at the time.
        largest: u64,
    },
    /// A size and alignment that make no layout (alignment not a power of
    /// two, or the size overflows when rounded up to it).
    #[error("invalid layout: {size} bytes aligned to {align}")]
    BadLayout {
        /// Requested size.
        size: usize,
        /// Requested alignment.
        align: usize,
    },
    /// The block was freed already: by a committed transaction, or earlier
    /// in a transaction still in flight (this one or another). A pointer to
    /// a block another transaction allocated and has not committed yet is
    /// reported the same way (it lies in free space as far as the committed
    /// heap is concerned).
    #[error("double free of {addr:#x}")]
    DoubleFree {
        /// The pointer.
        addr: usize,
    },
    /// The pointer is not one the heap handed out (not the start of a live
    /// block's data).
    #[error("{addr:#x} is not a block this heap handed out")]
    InvalidPointer {
        /// The pointer.
        addr: usize,
    },
    /// Persistent heap data failed a check: the heap is not used.
    #[error("corrupted {what} at {location}")]
    Corrupted {
        /// What is damaged.
        what: String,
        /// Where.
        location: String,
    },
    /// The static region holds a heap of another format version (an older
    /// one is not read: its layout differs).
    #[error("heap format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A root name is empty, too long, or holds a NUL byte.
    #[error("root name {name:?} ({len} bytes) is invalid (1 to {max} bytes, no NUL)")]
    BadRootName {
        /// The name, or its first 64 bytes and "…" if it is longer (a
        /// message stays short whatever the caller passed).
        name: String,
        /// The name's length in bytes.
        len: usize,
        /// Maximum length.
        max: usize,
    },
    /// A root exists already with another size or type tag than asked for.
    #[error("root {name:?} exists with size {size} and type tag {type_tag:#x} (asked for size {want_size} and type tag {want_tag:#x})")]
    RootMismatch {
        /// The name.
        name: String,
        /// Its size.
        size: u64,
        /// Its type tag.
        type_tag: u64,
        /// The size asked for.
        want_size: u64,
        /// The type tag asked for.
        want_tag: u64,
    },
    /// A root to be created exists already (another transaction created it
    /// first).
    #[error("root {name:?} exists already")]
    RootExists {
        /// The name.
        name: String,
    },
    /// A root's size exceeds the bytes its block was allocated with.
    #[error("root {name:?} of {size} bytes does not fit its block ({capacity} bytes)")]
    RootTooLarge {
        /// The name.
        name: String,
        /// The size given.
        size: u64,
        /// The block's bytes.
        capacity: u64,
    },
    /// Every root slot is in use.
    #[error("all {slots} root slots are in use")]
    RootsFull {
        /// Number of slots.
        slots: usize,
    },
    /// A region is too small or misplaced for a heap, or the segment lacks
    /// the heap's regions.
    #[error("invalid heap regions: {reason}")]
    BadRegions {
        /// Why.
        reason: String,
    },
    /// A heap value of this process already uses one of the regions (or
    /// the static and heap regions are one region): two heaps on the same
    /// memory would hand out the same blocks. Drop the other heap first.
    #[error("a heap already uses the region at {addr:#x} in this process (drop that heap first)")]
    RegionInUse {
        /// The region's address.
        addr: usize,
    },
    /// A growth would take the heap past its maximum size (the one its
    /// segment's load map records, [`crate::Heap::max_len`]). The heap is
    /// unchanged.
    #[error("the heap cannot grow to {requested} bytes: its maximum is {max} bytes")]
    GrowthLimit {
        /// The size asked for.
        requested: u64,
        /// The heap's maximum size.
        max: u64,
    },
    /// The disk has no room for the heap's growth (the segment file could not
    /// be extended and its space allocated). The heap is unchanged and usable
    /// at its old size.
    #[error("no disk space to grow the heap to {requested} bytes: {source}")]
    DiskFull {
        /// The size asked for.
        requested: u64,
        /// The system's report.
        #[source]
        source: rvm_core::Error,
    },
    /// The address range the heap would grow into is taken by another
    /// mapping (it was not free when the heap was loaded, so it could not be
    /// reserved). The heap is unchanged and usable at its old size; it can
    /// grow after a reload with the range free.
    #[error("the heap cannot grow to {requested} bytes: the address range [{addr:#x}, +{len:#x}) after it is taken by another mapping")]
    AddressRangeTaken {
        /// The size asked for.
        requested: u64,
        /// Start of the range the growth needs.
        addr: usize,
        /// Its length.
        len: usize,
    },
    /// The heap cannot grow: it was not loaded from a segment whose load
    /// map lets its heap region grow (a heap on regions the caller mapped,
    /// or one created without a maximum size).
    #[error("this heap cannot grow (it is not loaded from a segment with a maximum heap size)")]
    NotGrowable,
    /// A tracked heap ([`crate::Heap::track`]) does not grow (yet): its
    /// allocations fail with out-of-memory when it is full.
    #[error("a tracked heap cannot grow (this release grows only heaps changed with declared ranges)")]
    TrackedGrowth,
    /// An error from the loader (creating or loading the heap's segment).
    #[error(transparent)]
    Loader(#[from] rvm_loader::LoaderError),
    /// An error from the core (I/O, log, transaction).
    #[error(transparent)]
    Core(#[from] rvm_core::Error),
}

impl HeapError {
    pub(crate) fn corrupted(what: impl Into<String>, location: impl Into<String>) -> Self {
        HeapError::Corrupted { what: what.into(), location: location.into() }
    }

    /// Whether this reports damaged persistent data (of the heap, the
    /// segment's load map, or the log).
    pub fn is_corruption(&self) -> bool {
        use rvm_loader::LoaderError as L;
        match self {
            HeapError::Corrupted { .. } | HeapError::UnsupportedVersion { .. } => true,
            HeapError::Loader(L::Corrupted { .. } | L::NotALoadMap { .. } | L::UnsupportedVersion { .. }) => true,
            HeapError::Loader(L::Core(e)) | HeapError::Core(e) => is_core_corruption(e),
            _ => false,
        }
    }
}

fn is_core_corruption(e: &rvm_core::Error) -> bool {
    use rvm_core::LogError as L;
    matches!(
        e,
        rvm_core::Error::Corrupted { .. } | rvm_core::Error::Log(L::NotALog { .. } | L::UnsupportedVersion { .. })
    )
}

/// Results of the heap.
pub type Result<T, E = HeapError> = std::result::Result<T, E>;
