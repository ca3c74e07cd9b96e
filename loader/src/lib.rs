//! # rvm-loader: segments loaded at fixed addresses
//!
//! RVM's segment loader, on top of the core's region mapping. A segment
//! carries its own *load map* in its header: which ranges of the segment go
//! at which virtual addresses. [`load_segment`] maps every region at the
//! address recorded there, so absolute pointers stored in recoverable memory
//! stay valid across restarts and crashes.
//!
//! - [`create_segment`] validates a [`LoadMap`] and writes it into a new
//!   segment's header, atomically (one flush-committed transaction).
//! - [`load_segment`] reads and validates the header (untrusted bytes) and
//!   maps every region at its base, all or nothing, giving a
//!   [`LoadedSegment`] whose regions are looked up by name.
//! - [`LoadedSegment::add_region`] grows the map later, through a
//!   transaction; [`LoadedSegment::region_growth`] grows a region in place
//!   (up to the maximum length its entry records, reserved at load).
//! - [`LoadMap::from_spec`] / `Display` read and print the text form
//!   (`name:offset:length:base[:copy]` lines) that `rvmutl` uses;
//!   [`read_load_map`] and [`read_load_map_file`] print a segment's map.
//!
//! The on-disk format, byte by byte, and the address-space rules are in the
//! [`format`](mod@format) module and in section 8, "The loader", of `docs/DESIGN.md`.
//!
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! use rvm_core::{create_log, CommitMode, Options, RestoreMode, Rvm};
//! use rvm_loader::{create_segment, load_segment, LoadMap, RegionSpec};
//!
//! let log = dir.path().join("log");
//! create_log(&log, 1 << 20).unwrap();
//! let rvm = Rvm::open(&log, Options::default()).unwrap();
//! let map = LoadMap::new()
//!     .region(RegionSpec::new("roots", 1 << 16, 1 << 16, 0x5d00_0000_0000))
//!     .region(RegionSpec::new("heap", 1 << 17, 1 << 20, 0x5d00_4000_0000));
//! let path = dir.path().join("seg");
//! create_segment(&rvm, &path, (1 << 17) + (1 << 20), &map).unwrap();
//!
//! let seg = load_segment(&rvm, &path).unwrap();
//! let roots = seg.region("roots").unwrap();
//! let heap = seg.region("heap").unwrap();
//! // Store an absolute pointer into the heap in the first root.
//! let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
//! // SAFETY: this thread alone uses the segment.
//! unsafe { tx.modify_bytes(roots.addr(), &(heap.addr() + 64).to_le_bytes()).unwrap() };
//! tx.commit(CommitMode::Flush).unwrap();
//! drop(seg);
//!
//! // Later (or in another run): the pointer is valid as stored.
//! let seg = load_segment(&rvm, &path).unwrap();
//! let mut word = [0u8; 8];
//! // SAFETY: no other thread stores into the region meanwhile.
//! unsafe { seg.region("roots").unwrap().read(0, &mut word) }.unwrap();
//! assert_eq!(usize::from_le_bytes(word), 0x5d00_4000_0040);
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

mod error;
pub mod format;
mod load;
mod raw;
pub mod spec;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{LoaderError, Result};
pub use format::{encoded_len_from_prefix, LoadMap, RegionSpec};
pub use load::{
    create_segment, load_segment, read_load_map, read_load_map_file, read_load_map_image, LoadedSegment, RegionGrowth,
};
pub use rvm_core::CopyMode;
