//! The load map and its on-disk encoding.
//!
//! # Layout
//!
//! The load map sits at byte 0 of the segment, in the *header area*
//! `[0, header_len)`, which no region may overlap. All integers are
//! little-endian; offsets are in bytes.
//!
//! Fixed header (64 bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `b"RVMLMAP\0"` ([`MAGIC`]) |
//! | 8 | 4 | format version, `u32` = 1 ([`FORMAT_VERSION`]) |
//! | 12 | 4 | header flags, `u32`; reserved, must be 0 |
//! | 16 | 4 | page size, `u32`: a power of two in [`MIN_PAGE_SIZE`]`..=`[`MAX_PAGE_SIZE`] |
//! | 20 | 4 | region count, `u32`, at most [`MAX_REGIONS`] |
//! | 24 | 8 | header length, `u64`: bytes reserved for the header at the start of the segment |
//! | 32 | 4 | region entry length, `u32` = 80 ([`ENTRY_LEN`]) |
//! | 36 | 24 | reserved, must be 0 |
//! | 60 | 4 | CRC32C of bytes `[0, 60)` followed by the region table |
//!
//! Region table: `count` entries of 80 bytes from byte 64; entry `i` starts
//! at `64 + 80 * i`:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 48 | name: 1 to 48 bytes of `[A-Za-z0-9_.-]`, padded with NUL bytes |
//! | 48 | 8 | segment offset, `u64` |
//! | 56 | 8 | length, `u64` |
//! | 64 | 8 | base address, `u64` |
//! | 72 | 4 | flags, `u32`: bits 0-1 the copy mode (0 on demand, 1 on map, 2 no copy); other bits 0 |
//! | 76 | 4 | maximum length in pages, `u32`: 0, or more than the length in pages (see below) |
//!
//! The maximum length lets a region grow in place
//! ([`crate::RegionGrowth::grow`]): loading reserves the address
//! range `[base, base + max)` (no access, no memory or swap accounted), and
//! no other region may use the segment range `[offset, offset + max)` or the
//! address range `[base, base + max)`. 0 means the region does not grow (its
//! maximum is its length). Older readers refuse a non-zero value (the field
//! was reserved), so a map with a growable region is never misread.
//!
//! Bytes from the end of the table to `header_len` are not part of the
//! encoding (they are zero at creation and hold later entries).
//!
//! # Rules
//!
//! A map is valid when: the page size is a power of two in range; the header
//! length is a non-zero multiple of the page size, at most
//! [`MAX_HEADER_LEN`], and holds the table; every region has a valid, unique
//! name, a non-zero length, and offset, length and base that are multiples of
//! the page size; no region overlaps the header area or another region in
//! the segment; no two regions overlap in memory; every region lies in the
//! user half of the address space (`[MIN_BASE, USER_ADDRESS_LIMIT)`). For
//! the overlap and address rules a region spans its maximum length, which is
//! a page multiple, at least its length, at most [`MAX_REGION_LEN`] and at
//! most `u32::MAX` pages. On a
//! device, every region and the header area also lie inside the device.

use crate::error::{LoaderError, Result};
use rvm_core::CopyMode;

/// The first eight bytes of every load-map header.
pub const MAGIC: [u8; 8] = *b"RVMLMAP\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the fixed part of the header; the region table follows it.
pub const FIXED_HEADER_LEN: usize = 64;
/// Length of one region table entry.
pub const ENTRY_LEN: usize = 80;
/// Length of the name field of a region entry (the longest name).
pub const NAME_LEN: usize = 48;
/// The most regions one load map holds.
pub const MAX_REGIONS: usize = 1024;
/// The smallest page size a load map may declare.
pub const MIN_PAGE_SIZE: u64 = 4096;
/// The largest page size a load map may declare (2 MiB, a huge page).
pub const MAX_PAGE_SIZE: u64 = 2 << 20;
/// The largest header area (4 MiB).
pub const MAX_HEADER_LEN: u64 = 4 << 20;
/// The lowest base address a region may have (Linux's default
/// `vm.mmap_min_addr`).
pub const MIN_BASE: u64 = 0x1_0000;
/// The largest maximum length of a region (1 TiB): a hostile header cannot
/// make a load reserve more address space than this per region.
pub const MAX_REGION_LEN: u64 = 1 << 40;
/// The end of the user half of the address space on every 64-bit Linux
/// target (47 bits); no region may reach past it.
pub const USER_ADDRESS_LIMIT: u64 = 1 << 47;

// Field offsets in the fixed header.
const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_PAGE_SIZE: usize = 16;
const OFF_COUNT: usize = 20;
const OFF_HEADER_LEN: usize = 24;
const OFF_ENTRY_LEN: usize = 32;
const OFF_RESERVED: usize = 36;
const OFF_CRC: usize = 60;
// Field offsets in a region entry.
const E_OFFSET: usize = 48;
const E_LEN: usize = 56;
const E_BASE: usize = 64;
const E_FLAGS: usize = 72;
const E_MAX_PAGES: usize = 76;
const COPY_MASK: u32 = 0b11;

/// One region of a load map: `len` bytes of the segment from `offset`,
/// mapped at address `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Name to look the region up by: 1 to [`NAME_LEN`] bytes of ASCII
    /// letters, digits, `_`, `-` and `.`.
    pub name: String,
    /// Offset in the segment (page multiple, at or after the header area).
    pub offset: u64,
    /// Length in bytes (page multiple, not zero).
    pub len: u64,
    /// Virtual address the region is mapped at (page multiple).
    pub base: u64,
    /// How the region's contents come into memory when it is loaded.
    pub copy: CopyMode,
    /// The length the region may grow to in place (page multiple, at least
    /// `len`; equal to `len` for a region that does not grow). Loading
    /// reserves the address space up to it.
    pub max_len: u64,
}

impl RegionSpec {
    /// A region mapped copy-on-demand.
    pub fn new(name: impl Into<String>, offset: u64, len: u64, base: u64) -> Self {
        RegionSpec { name: name.into(), offset, len, base, copy: CopyMode::OnDemand, max_len: len }
    }

    /// Lets the region grow in place up to `max_len` bytes (see
    /// [`RegionSpec::max_len`](RegionSpec#structfield.max_len)); a value
    /// below the length means the length.
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.max_len = max_len.max(self.len);
        self
    }

    /// The maximum length, never below the length.
    pub fn span(&self) -> u64 {
        self.max_len.max(self.len)
    }

    /// Chooses the copy mode.
    pub fn copy(mut self, copy: CopyMode) -> Self {
        self.copy = copy;
        self
    }
}

/// A load map: the page size, the size of the header area, and the regions
/// to map at fixed addresses.
///
/// Build one with [`LoadMap::new`] and [`LoadMap::region`], parse one from
/// text with [`LoadMap::from_spec`], or read one from a segment with
/// [`LoadMap::decode`] or [`crate::read_load_map`].
///
/// ```
/// use rvm_loader::{LoadMap, RegionSpec};
/// let map = LoadMap::with_page_size(4096)
///     .region(RegionSpec::new("heap", 4096, 1 << 20, 0x5a00_0000_0000))
///     .region(RegionSpec::new("index", 4096 + (1 << 20), 1 << 16, 0x5a00_4000_0000));
/// map.validate().unwrap();
/// let bytes = map.encode();
/// assert_eq!(LoadMap::decode(&bytes).unwrap(), map);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadMap {
    page_size: u64,
    header_len: u64,
    regions: Vec<RegionSpec>,
}

impl Default for LoadMap {
    fn default() -> Self {
        LoadMap::new()
    }
}

/// A rule a map breaks: which region (index), where in the header, why.
pub(crate) struct Problem {
    pub region: Option<usize>,
    pub at: usize,
    pub reason: String,
}

impl Problem {
    fn header(at: usize, reason: impl Into<String>) -> Self {
        Problem { region: None, at, reason: reason.into() }
    }
    fn region(i: usize, field: usize, reason: impl Into<String>) -> Self {
        Problem { region: Some(i), at: entry_at(i) + field, reason: reason.into() }
    }
}

fn entry_at(i: usize) -> usize {
    FIXED_HEADER_LEN + i * ENTRY_LEN
}

/// Bytes the encoding of a map with `count` regions takes.
pub(crate) fn table_end(count: usize) -> usize {
    FIXED_HEADER_LEN + count * ENTRY_LEN
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

fn copy_code(c: CopyMode) -> u32 {
    match c {
        CopyMode::OnDemand => 0,
        CopyMode::OnMap => 1,
        CopyMode::NoCopy => 2,
    }
}

/// The name of a copy mode in load-map text (`on-demand`, `on-map`,
/// `no-copy`).
pub fn copy_mode_name(c: CopyMode) -> &'static str {
    match c {
        CopyMode::OnDemand => "on-demand",
        CopyMode::OnMap => "on-map",
        CopyMode::NoCopy => "no-copy",
    }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the region name is empty".into());
    }
    if name.len() > NAME_LEN {
        return Err(format!("the region name is {} bytes long; at most {NAME_LEN} are allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!(
            "the region name {name:?} contains {c:?}; only ASCII letters, digits, `_`, `-` and `.` are allowed"
        ));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn corrupted(at: usize, what: impl Into<String>) -> LoaderError {
    LoaderError::Corrupted { what: what.into(), location: format!("header offset {at}") }
}

/// Checks the fixed header's magic, version, entry length and region count,
/// and returns how many bytes from the start of the segment the whole
/// encoding takes (fixed header plus region table), so that a reader knows
/// how much to read before calling [`LoadMap::decode`]. Needs at least
/// [`FIXED_HEADER_LEN`] bytes. Nothing else is checked (the checksum needs the
/// table).
pub fn encoded_len_from_prefix(prefix: &[u8]) -> Result<usize> {
    if prefix.len() < FIXED_HEADER_LEN {
        return Err(corrupted(
            0,
            format!("header truncated: {} bytes, the fixed header needs {FIXED_HEADER_LEN}", prefix.len()),
        ));
    }
    let mut found = [0u8; 8];
    found.copy_from_slice(&prefix[..8]);
    if found != MAGIC {
        return Err(LoaderError::NotALoadMap { location: "header offset 0".into(), found });
    }
    let version = u32_at(prefix, OFF_VERSION);
    if version != FORMAT_VERSION {
        return Err(LoaderError::UnsupportedVersion {
            location: format!("header offset {OFF_VERSION}"),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let entry_len = u32_at(prefix, OFF_ENTRY_LEN);
    if entry_len as usize != ENTRY_LEN {
        return Err(corrupted(
            OFF_ENTRY_LEN,
            format!("region entry length is {entry_len}; format {FORMAT_VERSION} uses {ENTRY_LEN}"),
        ));
    }
    let count = u32_at(prefix, OFF_COUNT);
    if count as usize > MAX_REGIONS {
        return Err(corrupted(OFF_COUNT, format!("region count {count} exceeds the limit of {MAX_REGIONS}")));
    }
    Ok(table_end(count as usize))
}

/// Recomputes the checksum field of a header in place, over the encoding
/// its region count implies. Returns false (and changes nothing) when the
/// bytes are too short for that encoding or the count is over the limit.
/// Test support: lets fuzzing and property tests reach the checks behind
/// the checksum.
#[cfg(feature = "testing")]
pub(crate) fn reseal(bytes: &mut [u8]) -> bool {
    if bytes.len() < FIXED_HEADER_LEN {
        return false;
    }
    let count = u32_at(bytes, OFF_COUNT) as usize;
    if count > MAX_REGIONS || bytes.len() < table_end(count) {
        return false;
    }
    let crc = crc_of(&bytes[..table_end(count)]);
    bytes[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    true
}

fn crc_of(bytes: &[u8]) -> u32 {
    // bytes is the whole encoding; the CRC field itself is skipped.
    crc32c::crc32c_append(crc32c::crc32c(&bytes[..OFF_CRC]), &bytes[FIXED_HEADER_LEN..])
}

impl LoadMap {
    /// An empty map with the system page size and a header area of one page
    /// (room for 50 regions with 4 KiB pages; [`LoadMap::region`] grows it
    /// when more are added).
    pub fn new() -> Self {
        LoadMap::with_page_size(rvm_core::page_size() as u64)
    }

    /// An empty map with this page size and a header area of one page. The
    /// page size must be a power of two from [`MIN_PAGE_SIZE`] to
    /// [`MAX_PAGE_SIZE`] (checked by [`LoadMap::validate`]); every offset,
    /// length and base must be a multiple of it. To load on this system it
    /// must also be a multiple of the system page size.
    pub fn with_page_size(page_size: u64) -> Self {
        LoadMap { page_size, header_len: page_size, regions: Vec::new() }
    }

    /// Adds a region (builder form of [`LoadMap::push`]).
    pub fn region(mut self, spec: RegionSpec) -> Self {
        self.push(spec);
        self
    }

    /// Adds a region, growing the header area (to a multiple of the page
    /// size) if the region table would not fit in it. Nothing is checked
    /// until [`LoadMap::validate`].
    pub fn push(&mut self, spec: RegionSpec) {
        self.regions.push(spec);
        let need = round_up(table_end(self.regions.len()) as u64, self.page_size.max(1));
        self.header_len = self.header_len.max(need);
    }

    /// Sets the length of the header area: the bytes reserved for the load
    /// map at the start of the segment (a multiple of the page size). A
    /// larger area leaves room to add regions later with
    /// [`crate::LoadedSegment::add_region`].
    pub fn with_header_len(mut self, header_len: u64) -> Self {
        self.header_len = header_len;
        self
    }

    /// The page size every offset, length and base is a multiple of.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The length of the header area at the start of the segment.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// The regions, in table order.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }

    /// The region called `name`.
    pub fn get(&self, name: &str) -> Option<&RegionSpec> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// How many regions the header area can hold.
    pub fn capacity(&self) -> usize {
        let fit = (self.header_len.saturating_sub(FIXED_HEADER_LEN as u64) / ENTRY_LEN as u64) as usize;
        fit.min(MAX_REGIONS)
    }

    /// A copy of the map with region `name` allowed to grow to `max_len`
    /// bytes ([`RegionSpec::max_len`](RegionSpec#structfield.max_len)),
    /// checked against every rule of the format: an error for a region
    /// that is not there, a maximum below its length, or one the rules
    /// refuse (past [`MAX_REGION_LEN`], not a page multiple, overlapping
    /// another region's addresses).
    ///
    /// ```
    /// use rvm_loader::{LoadMap, RegionSpec};
    /// let map = LoadMap::new().region(RegionSpec::new("heap", 4096, 4096, 0x5b00_0000_0000));
    /// assert_eq!(map.with_max_len("heap", 1 << 20).unwrap().get("heap").unwrap().max_len, 1 << 20);
    /// assert!(map.with_max_len("heap", 2 << 40).is_err()); // past the largest region
    /// assert!(map.with_max_len("other", 1 << 20).is_err());
    /// ```
    pub fn with_max_len(&self, name: &str, max_len: u64) -> Result<LoadMap> {
        let mut map = self.clone();
        let Some(r) = map.regions.iter_mut().find(|r| r.name == name) else {
            return Err(LoaderError::InvalidMap { region: None, reason: format!("no region named {name:?}") });
        };
        if max_len < r.len {
            return Err(LoaderError::InvalidMap {
                region: Some(r.name.clone()),
                reason: format!("maximum {max_len:#x} is below the length {:#x}", r.len),
            });
        }
        r.max_len = max_len;
        map.validate()?;
        Ok(map)
    }

    /// The smallest device that holds the header area and every region.
    pub fn min_device_len(&self) -> u64 {
        self.regions.iter().map(|r| r.offset.saturating_add(r.len)).fold(self.header_len, u64::max)
    }

    /// Checks every rule of the format (see the [module docs](crate::format)),
    /// without a device.
    pub fn validate(&self) -> Result<()> {
        self.check(None).map_err(|p| self.invalid(p))
    }

    /// [`LoadMap::validate`], and checks that the header area and every
    /// region lie inside a device of `device_len` bytes.
    pub fn validate_for_device(&self, device_len: u64) -> Result<()> {
        self.check(Some(device_len)).map_err(|p| self.invalid(p))
    }

    fn invalid(&self, p: Problem) -> LoaderError {
        LoaderError::InvalidMap {
            region: p.region.and_then(|i| self.regions.get(i)).map(|r| r.name.clone()),
            reason: p.reason,
        }
    }

    /// The same check, reported as corruption of an on-disk header.
    pub(crate) fn corrupted(&self, p: Problem) -> LoaderError {
        let location = match p.region.and_then(|i| self.regions.get(i).map(|r| (i, r))) {
            Some((i, r)) => format!("header offset {} (region table entry {i}, `{}`)", p.at, r.name),
            None => format!("header offset {}", p.at),
        };
        LoaderError::Corrupted { what: p.reason, location }
    }

    pub(crate) fn check(&self, device_len: Option<u64>) -> std::result::Result<(), Problem> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(Problem::header(
                OFF_PAGE_SIZE,
                format!("page size {ps:#x} is not a power of two from {MIN_PAGE_SIZE:#x} to {MAX_PAGE_SIZE:#x}"),
            ));
        }
        let hl = self.header_len;
        if hl == 0 || !hl.is_multiple_of(ps) || hl > MAX_HEADER_LEN {
            return Err(Problem::header(
                OFF_HEADER_LEN,
                format!("header length {hl:#x} is not a non-zero multiple of the page size {ps:#x} of at most {MAX_HEADER_LEN:#x}"),
            ));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(Problem::header(
                OFF_COUNT,
                format!("{} regions exceed the limit of {MAX_REGIONS}", self.regions.len()),
            ));
        }
        let need = table_end(self.regions.len()) as u64;
        if need > hl {
            return Err(Problem::header(
                OFF_HEADER_LEN,
                format!("header length {hl:#x} cannot hold {} regions ({need:#x} bytes)", self.regions.len()),
            ));
        }
        if let Some(dev) = device_len {
            if hl > dev {
                return Err(Problem::header(
                    OFF_HEADER_LEN,
                    format!("header length {hl:#x} exceeds the device length {dev:#x}"),
                ));
            }
        }
        for (i, r) in self.regions.iter().enumerate() {
            check_name(&r.name).map_err(|e| Problem::region(i, 0, e))?;
            if r.len == 0 {
                return Err(Problem::region(i, E_LEN, "the region is empty"));
            }
            for (what, v, field) in
                [("segment offset", r.offset, E_OFFSET), ("length", r.len, E_LEN), ("base address", r.base, E_BASE)]
            {
                if v % ps != 0 {
                    return Err(Problem::region(
                        i,
                        field,
                        format!("{what} {v:#x} is not a multiple of the page size {ps:#x}"),
                    ));
                }
            }
            if r.offset < hl {
                return Err(Problem::region(
                    i,
                    E_OFFSET,
                    format!("segment offset {:#x} lies inside the header area [0, {hl:#x})", r.offset),
                ));
            }
            let Some(end) = r.offset.checked_add(r.len) else {
                return Err(Problem::region(
                    i,
                    E_LEN,
                    format!("segment range {:#x} + {:#x} overflows", r.offset, r.len),
                ));
            };
            if let Some(dev) = device_len {
                if end > dev {
                    return Err(Problem::region(
                        i,
                        E_LEN,
                        format!(
                            "segment range [{:#x}, {end:#x}) extends past the end of the device ({dev:#x} bytes)",
                            r.offset
                        ),
                    ));
                }
            }
            let max = r.span();
            if max > r.len && (!max.is_multiple_of(ps) || max > MAX_REGION_LEN || max / ps > u64::from(u32::MAX)) {
                return Err(Problem::region(
                    i,
                    E_MAX_PAGES,
                    format!(
                        "maximum length {max:#x} is not a page multiple of at most {MAX_REGION_LEN:#x} bytes and {:#x} pages",
                        u32::MAX
                    ),
                ));
            }
            if r.offset.checked_add(max).is_none() {
                return Err(Problem::region(
                    i,
                    E_MAX_PAGES,
                    format!("segment range {:#x} + maximum {max:#x} overflows", r.offset),
                ));
            }
            let in_user_half = r.base >= MIN_BASE && r.base.checked_add(max).is_some_and(|e| e <= USER_ADDRESS_LIMIT);
            if !in_user_half {
                return Err(Problem::region(
                    i,
                    E_BASE,
                    format!(
                        "address range {:#x} + {:#x} is outside the user half of the address space [{MIN_BASE:#x}, {USER_ADDRESS_LIMIT:#x})",
                        r.base, max
                    ),
                ));
            }
            if usize::try_from(max).is_err() || usize::try_from(r.base).is_err() {
                return Err(Problem::region(i, E_LEN, "the region does not fit this system's address space"));
            }
        }
        // Names unique; no overlaps in the segment or in memory. Regions are
        // at most MAX_REGIONS, so sorting index lists is cheap.
        let mut by_name: Vec<usize> = (0..self.regions.len()).collect();
        by_name.sort_by(|&a, &b| self.regions[a].name.cmp(&self.regions[b].name).then(a.cmp(&b)));
        for w in by_name.windows(2) {
            if self.regions[w[0]].name == self.regions[w[1]].name {
                return Err(Problem::region(w[1], 0, format!("the name `{}` is used twice", self.regions[w[1]].name)));
            }
        }
        for (key, what, field) in [(0usize, "segment", E_OFFSET), (1, "memory", E_BASE)] {
            let start = |i: usize| if key == 0 { self.regions[i].offset } else { self.regions[i].base };
            let mut order: Vec<usize> = (0..self.regions.len()).collect();
            order.sort_by_key(|&i| (start(i), i));
            for w in order.windows(2) {
                let (a, b) = (w[0], w[1]);
                // Ends do not overflow: checked above for both keys.
                if start(b) < start(a) + self.regions[a].span() {
                    let later = a.max(b);
                    return Err(Problem::region(
                        later,
                        field,
                        format!("regions `{}` and `{}` overlap in {what}", self.regions[a].name, self.regions[b].name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The length of [`LoadMap::encode`]'s output: the fixed header and the
    /// region table.
    pub fn encoded_len(&self) -> usize {
        table_end(self.regions.len())
    }

    /// Encodes the map (fixed header and region table, with its checksum).
    ///
    /// The output is canonical: [`LoadMap::decode`] accepts exactly the
    /// encodings of valid maps, and decoding then encoding gives the same
    /// bytes. Encoding an invalid map gives bytes that `decode` rejects; a
    /// name longer than [`NAME_LEN`] bytes is cut, a page size above
    /// `u32::MAX` saturates.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.encoded_len()];
        b[..8].copy_from_slice(&MAGIC);
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let ps = u32::try_from(self.page_size).unwrap_or(u32::MAX);
        b[OFF_PAGE_SIZE..OFF_PAGE_SIZE + 4].copy_from_slice(&ps.to_le_bytes());
        let count = u32::try_from(self.regions.len()).unwrap_or(u32::MAX);
        b[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&count.to_le_bytes());
        b[OFF_HEADER_LEN..OFF_HEADER_LEN + 8].copy_from_slice(&self.header_len.to_le_bytes());
        b[OFF_ENTRY_LEN..OFF_ENTRY_LEN + 4].copy_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
        for (i, r) in self.regions.iter().enumerate() {
            let e = &mut b[entry_at(i)..entry_at(i) + ENTRY_LEN];
            let name = r.name.as_bytes();
            let n = name.len().min(NAME_LEN);
            e[..n].copy_from_slice(&name[..n]);
            e[E_OFFSET..E_OFFSET + 8].copy_from_slice(&r.offset.to_le_bytes());
            e[E_LEN..E_LEN + 8].copy_from_slice(&r.len.to_le_bytes());
            e[E_BASE..E_BASE + 8].copy_from_slice(&r.base.to_le_bytes());
            e[E_FLAGS..E_FLAGS + 4].copy_from_slice(&copy_code(r.copy).to_le_bytes());
            if r.max_len > r.len {
                let pages = u32::try_from(r.max_len / self.page_size.max(1)).unwrap_or(u32::MAX);
                e[E_MAX_PAGES..E_MAX_PAGES + 4].copy_from_slice(&pages.to_le_bytes());
            }
        }
        let crc = crc_of(&b);
        b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header: `bytes` starts at byte 0 of the
    /// segment and holds at least the fixed header and the region table
    /// (see [`encoded_len_from_prefix`]); bytes after the table are ignored.
    ///
    /// The bytes are untrusted: every field is checked before it is used,
    /// nothing is allocated beyond the table's bounded size, and any input
    /// gives either a valid map or an error (never a panic). The device
    /// length is not known here; [`LoadMap::validate_for_device`] checks it.
    pub fn decode(bytes: &[u8]) -> Result<LoadMap> {
        let end = encoded_len_from_prefix(bytes)?;
        if bytes.len() < end {
            return Err(corrupted(
                FIXED_HEADER_LEN,
                format!("region table truncated: the header needs {end} bytes, {} are available", bytes.len()),
            ));
        }
        let b = &bytes[..end];
        let stored = u32_at(b, OFF_CRC);
        let actual = crc_of(b);
        if stored != actual {
            return Err(corrupted(
                OFF_CRC,
                format!("checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"),
            ));
        }
        let flags = u32_at(b, OFF_FLAGS);
        if flags != 0 {
            return Err(corrupted(OFF_FLAGS, format!("unknown header flags {flags:#x}")));
        }
        if let Some(i) = b[OFF_RESERVED..OFF_CRC].iter().position(|&x| x != 0) {
            return Err(corrupted(OFF_RESERVED + i, "reserved header byte is not zero"));
        }
        let count = u32_at(b, OFF_COUNT) as usize;
        let mut regions = Vec::with_capacity(count);
        for i in 0..count {
            let at = entry_at(i);
            let e = &b[at..at + ENTRY_LEN];
            let raw = &e[..NAME_LEN];
            let name_len = raw.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
            if let Some(j) = raw[name_len..].iter().position(|&c| c != 0) {
                return Err(corrupted(
                    at + name_len + j,
                    format!("region table entry {i}: name has bytes after its NUL padding"),
                ));
            }
            let name = std::str::from_utf8(&raw[..name_len])
                .map_err(|_| corrupted(at, format!("region table entry {i}: name is not UTF-8")))?;
            check_name(name).map_err(|e| corrupted(at, format!("region table entry {i}: {e}")))?;
            let flags = u32_at(e, E_FLAGS);
            let copy = match flags {
                0 => CopyMode::OnDemand,
                1 => CopyMode::OnMap,
                2 => CopyMode::NoCopy,
                f if f & !COPY_MASK == 0 => {
                    return Err(corrupted(at + E_FLAGS, format!("region `{name}`: unknown copy mode {f}")));
                }
                f => return Err(corrupted(at + E_FLAGS, format!("region `{name}`: unknown flags {f:#x}"))),
            };
            let len = u64_at(e, E_LEN);
            let max_pages = u64::from(u32_at(e, E_MAX_PAGES));
            let page_size = u64::from(u32_at(b, OFF_PAGE_SIZE));
            let max_len = match max_pages.checked_mul(page_size) {
                Some(0) => len,
                // A maximum not above the length would not encode back to
                // the same bytes.
                Some(m) if m > len => m,
                _ => {
                    return Err(corrupted(
                        at + E_MAX_PAGES,
                        format!("region `{name}`: maximum of {max_pages} pages is not above its length {len:#x}"),
                    ))
                }
            };
            regions.push(RegionSpec {
                name: name.to_owned(),
                offset: u64_at(e, E_OFFSET),
                len,
                base: u64_at(e, E_BASE),
                copy,
                max_len,
            });
        }
        let map =
            LoadMap { page_size: u64::from(u32_at(b, OFF_PAGE_SIZE)), header_len: u64_at(b, OFF_HEADER_LEN), regions };
        map.check(None).map_err(|p| map.corrupted(p))?;
        Ok(map)
    }

    /// The map with one more region, keeping the header length (used when a
    /// region is added to a loaded segment, whose header area is fixed).
    pub(crate) fn with_added(&self, spec: RegionSpec) -> LoadMap {
        let mut m = self.clone();
        m.regions.push(spec);
        m
    }

    /// The map with region `i` at length `len` (used when a region grows).
    pub(crate) fn with_len(&self, i: usize, len: u64) -> LoadMap {
        let mut m = self.clone();
        if let Some(r) = m.regions.get_mut(i) {
            r.len = len;
            r.max_len = r.max_len.max(len);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LoadMap {
        LoadMap::with_page_size(4096)
            .region(RegionSpec::new("a", 4096, 8192, 0x5a00_0000_0000))
            .region(RegionSpec::new("b.c-d_e", 3 * 4096, 4096, 0x1_0000).copy(CopyMode::OnMap))
            .region(RegionSpec::new("z", 1 << 30, 1 << 20, 0x7000_0000_0000).copy(CopyMode::NoCopy))
    }

    #[test]
    fn offsets_are_as_documented() {
        let b = sample().encode();
        assert_eq!(&b[..8], b"RVMLMAP\0");
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(u32_at(&b, 16), 4096);
        assert_eq!(u32_at(&b, 20), 3);
        assert_eq!(u64_at(&b, 24), 4096);
        assert_eq!(u32_at(&b, 32), 80);
        assert_eq!(b.len(), 64 + 3 * 80);
        let e1 = 64 + 80;
        assert_eq!(&b[e1..e1 + 7], b"b.c-d_e");
        assert_eq!(b[e1 + 7], 0);
        assert_eq!(u64_at(&b, e1 + 48), 3 * 4096);
        assert_eq!(u64_at(&b, e1 + 56), 4096);
        assert_eq!(u64_at(&b, e1 + 64), 0x1_0000);
        assert_eq!(u32_at(&b, e1 + 72), 1);
        let mut crc_input = b[..60].to_vec();
        crc_input.extend_from_slice(&b[64..]);
        assert_eq!(u32_at(&b, 60), crc32c::crc32c(&crc_input));
    }

    #[test]
    fn round_trip() {
        let m = sample();
        m.validate().unwrap();
        let b = m.encode();
        assert_eq!(LoadMap::decode(&b).unwrap(), m);
        // Trailing bytes (the rest of the header area) are ignored.
        let mut padded = b.clone();
        padded.extend_from_slice(&[0xAA; 100]);
        assert_eq!(LoadMap::decode(&padded).unwrap(), m);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(LoadMap::decode(&b[..n]).is_err(), "prefix of {n} bytes accepted");
        }
    }

    #[test]
    fn blank_header_says_creation_did_not_complete() {
        let e = LoadMap::decode(&[0u8; 4096]).unwrap_err();
        assert!(matches!(e, LoaderError::NotALoadMap { found, .. } if found == [0; 8]), "{e}");
        assert!(e.to_string().contains("did not complete"), "{e}");
    }

    #[test]
    fn rules() {
        let base = || LoadMap::with_page_size(4096);
        let bad = |m: LoadMap, needle: &str| {
            let e = m.validate().unwrap_err();
            assert!(matches!(e, LoaderError::InvalidMap { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        };
        bad(base().region(RegionSpec::new("a", 0, 4096, 0x10_0000)), "inside the header area");
        bad(base().region(RegionSpec::new("a", 4096, 100, 0x10_0000)), "not a multiple");
        bad(base().region(RegionSpec::new("a", 4096, 0, 0x10_0000)), "empty");
        bad(base().region(RegionSpec::new("a", 4096, 4096, 0x1000)), "user half");
        bad(base().region(RegionSpec::new("a", 4096, 8192, USER_ADDRESS_LIMIT - 4096)), "user half");
        bad(base().region(RegionSpec::new("a", 4096, 4096, u64::MAX - 4095)), "user half");
        bad(base().region(RegionSpec::new("a:b", 4096, 4096, 0x10_0000)), "contains ':'");
        bad(base().region(RegionSpec::new("", 4096, 4096, 0x10_0000)), "empty");
        bad(base().region(RegionSpec::new("x".repeat(49), 4096, 4096, 0x10_0000)), "49 bytes");
        bad(
            base()
                .region(RegionSpec::new("a", 4096, 8192, 0x10_0000))
                .region(RegionSpec::new("b", 8192, 4096, 0x20_0000)),
            "overlap in segment",
        );
        bad(
            base()
                .region(RegionSpec::new("a", 4096, 8192, 0x10_0000))
                .region(RegionSpec::new("b", 16384, 4096, 0x10_1000)),
            "overlap in memory",
        );
        bad(
            base()
                .region(RegionSpec::new("a", 4096, 4096, 0x10_0000))
                .region(RegionSpec::new("a", 16384, 4096, 0x20_0000)),
            "used twice",
        );
        bad(LoadMap::with_page_size(3000), "power of two");
        bad(LoadMap::with_page_size(4096).with_header_len(0), "header length");
        bad(LoadMap::with_page_size(4096).with_header_len(MAX_HEADER_LEN + 4096), "header length");
        let ok = base().region(RegionSpec::new("a", 4096, 4096, 0x10_0000));
        ok.validate().unwrap();
        assert!(ok.validate_for_device(8192).is_ok());
        assert!(ok.validate_for_device(4096).unwrap_err().to_string().contains("past the end of the device"));
    }

    #[test]
    fn header_grows_with_regions() {
        let mut m = LoadMap::with_page_size(4096);
        assert_eq!(m.capacity(), 50);
        for i in 0..51u64 {
            m.push(RegionSpec::new(format!("r{i}"), (i + 2) * 4096, 4096, 0x10_0000 + i * 4096));
        }
        assert_eq!(m.header_len(), 8192);
        assert_eq!(m.capacity(), 101);
        m.validate().unwrap();
    }
}
