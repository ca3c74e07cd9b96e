//! Errors of the typed layer.

use std::path::PathBuf;

/// Everything the typed layer returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the heap (allocation, damage, ...).
    #[error(transparent)]
    Heap(#[from] rvm_heap::HeapError),
    /// An error of the core (log, recovery, I/O).
    #[error(transparent)]
    Core(#[from] rvm_core::Error),
    /// An error of the loader (the heap segment's load map).
    #[error(transparent)]
    Loader(#[from] rvm_loader::LoaderError),
    /// The root exists with another type: opening it as this one would
    /// reinterpret its bytes.
    #[error(
        "root {name:?} holds another type ({found_size} bytes, layout {found:#018x}); asked for {expected_size} \
         bytes, layout {expected:#018x}"
    )]
    RootType {
        /// The root.
        name: String,
        /// Size of the type asked for.
        expected_size: u64,
        /// Its layout fingerprint.
        expected: u64,
        /// Size recorded with the root.
        found_size: u64,
        /// Fingerprint recorded with the root.
        found: u64,
    },
    /// The root's block is not a live block of the heap (damaged heap, or a
    /// root set by the raw API to memory it does not own).
    #[error("root {name:?} does not point at a live heap block of at least {size} bytes")]
    RootNotLive {
        /// The root.
        name: String,
        /// Bytes the type needs.
        size: u64,
    },
    /// A value read from the heap holds a pointer that is not sound (not a
    /// live block, too small, misaligned, a length past its capacity):
    /// damaged data, refused before it is used.
    #[error("root {name:?} holds a damaged value (a pointer or length that does not match the heap)")]
    Damaged {
        /// The root.
        name: String,
    },
    /// The root is borrowed already in this transaction (mutably, or
    /// shared while a mutable borrow is asked for).
    #[error("root {name:?} is already borrowed in this transaction")]
    RootBorrowed {
        /// The root.
        name: String,
    },
    /// Root names starting with `rvm:` are kept for the typed layer's own
    /// roots (the shape table, [`crate::shape::SHAPES_ROOT`]).
    #[error("root name {name:?} is reserved (names starting with \"rvm:\" are the library's)")]
    ReservedName {
        /// The name asked for.
        name: String,
    },
    /// An [`crate::Owned`] value of another heap (or transaction) was given
    /// to store: its blocks belong to that heap. It is dropped (freed in
    /// its own transaction).
    #[error("a value owned by another heap's transaction cannot be stored in this one")]
    ForeignValue,
    /// A file or folder operation of [`crate::PHeap::open_or_create`] failed.
    #[error("I/O error while {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A write transaction ([`crate::PHeap::write`]) or a check
    /// ([`crate::PHeap::check`]) was started inside a closure transaction
    /// of the same heap on the same thread (a write inside a write or a
    /// read, a check inside a write): it would wait for the outer one,
    /// which waits for it. Change the heap through the outer transaction's
    /// [`crate::WriteTx`] instead.
    #[error("a transaction of this heap is already running on this thread (a write inside a write or a read, or a check inside a write, would wait for itself)")]
    NestedTransaction,
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
