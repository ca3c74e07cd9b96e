//! Heap errors.

/// Errors of the heap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeapError {
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
    /// The alignment is not a power of two or exceeds a page.
    #[error("unsupported alignment {align} (a power of two up to {max})")]
    BadAlignment {
        /// Requested alignment.
        align: usize,
        /// Largest supported.
        max: usize,
    },
    /// The block was freed already (committed, or earlier in a transaction
    /// still in flight).
    #[error("double free of {addr:#x}")]
    DoubleFree {
        /// The pointer.
        addr: usize,
    },
    /// The pointer is not one the heap handed out.
    #[error("{addr:#x} is not a block this heap handed out")]
    InvalidPointer {
        /// The pointer.
        addr: usize,
    },
    /// Persistent heap data failed a check.
    #[error("corrupted {what} at {location}")]
    Corrupted {
        /// What is damaged.
        what: String,
        /// Where.
        location: String,
    },
    /// A root name is empty or too long.
    #[error("root name {name:?} is invalid (1 to {max} bytes, no NUL)")]
    BadRootName {
        /// The name.
        name: String,
        /// Maximum length.
        max: usize,
    },
    /// Every root slot is in use.
    #[error("all {slots} root slots are in use")]
    RootsFull {
        /// Number of slots.
        slots: usize,
    },
    /// A region is too small or misplaced for a heap.
    #[error("invalid heap regions: {reason}")]
    BadRegions {
        /// Why.
        reason: String,
    },
    /// An error from the core (I/O, log, transaction).
    #[error(transparent)]
    Core(#[from] rvm_core::Error),
}

impl HeapError {
    pub(crate) fn corrupted(what: impl Into<String>, location: impl Into<String>) -> Self {
        HeapError::Corrupted { what: what.into(), location: location.into() }
    }
}

/// Results of the heap.
pub type Result<T, E = HeapError> = std::result::Result<T, E>;
