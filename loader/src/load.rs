//! Creating segments with a load map, loading them, and loaded segments.

use crate::error::{LoaderError, Result};
use crate::format::{encoded_len_from_prefix, LoadMap, RegionSpec, FIXED_HEADER_LEN};
use crate::raw::{self, HeaderArea};
use rvm_core::{CopyMode, MapError, MapSpec, Region, RegionClaim, Rvm, Segment};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Held by every loader call that maps a segment's header. A header is
/// mapped briefly to read the load map, and for good at the end of a load;
/// without this, two concurrent loads of one segment could each find the
/// other's mapping in the way and both fail with `AlreadyLoaded`. Loads are
/// rare and short (copy-on-demand maps in microseconds), so one lock for
/// the process is enough.
static HEADER_MAPS: Mutex<()> = Mutex::new(());

fn header_maps() -> MutexGuard<'static, ()> {
    // Nothing it guards can be left half-done by a panic.
    HEADER_MAPS.lock().unwrap_or_else(|e| e.into_inner())
}

fn system_page_size() -> u64 {
    rvm_core::page_size() as u64
}

fn check_page_size(map: &LoadMap) -> Result<()> {
    let sys = system_page_size();
    if !map.page_size().is_multiple_of(sys) {
        return Err(LoaderError::PageSize { map: map.page_size(), system: rvm_core::page_size() });
    }
    Ok(())
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| LoaderError::InvalidMap {
        region: None,
        reason: format!("{what} {v:#x} does not fit this system"),
    })
}

fn is_already_mapped(e: &rvm_core::Error) -> bool {
    matches!(e, rvm_core::Error::Map(MapError::AlreadyMapped { .. }))
}

/// Maps the header area `[0, len)` anywhere (the kernel picks an address
/// clear of everything already mapped, including the segment's regions).
fn map_header(rvm: &Rvm, seg: &Segment, len: u64, copy: CopyMode) -> Result<HeaderArea> {
    let spec = MapSpec::new(0, to_usize(len, "header length")?).copy(copy);
    match rvm.map(seg, spec) {
        Ok(r) => Ok(HeaderArea(r.claim()?)),
        Err(e) if is_already_mapped(&e) => Err(LoaderError::AlreadyLoaded { path: seg.name().to_path_buf() }),
        Err(e) => Err(e.into()),
    }
}

fn short_device(path: &Path, len: u64, need: u64) -> LoaderError {
    LoaderError::Corrupted {
        what: format!("the device is {len:#x} bytes long; its load map needs {need:#x}"),
        location: format!("segment {}", path.display()),
    }
}

/// Reads and decodes the load map of an open segment through the core (so
/// it sees the committed image), checking it against the device length.
/// Maps the header area only while reading.
fn read_header(rvm: &Rvm, seg: &Segment) -> Result<LoadMap> {
    let path = seg.name();
    let ps = system_page_size();
    let dev = seg.len();
    if dev < ps {
        return Err(short_device(path, dev, ps));
    }
    let probe = map_header(rvm, seg, ps, CopyMode::OnDemand)?;
    let mut prefix = [0u8; FIXED_HEADER_LEN];
    let read = probe.read(0, &mut prefix);
    let need = read
        .ok_or_else(|| short_device(path, dev, FIXED_HEADER_LEN as u64))
        .and_then(|()| encoded_len_from_prefix(&prefix).map_err(|e| e.in_segment(path)));
    let need = match need {
        Ok(n) => n,
        Err(e) => {
            let _ = rvm.unmap_claimed(probe.0);
            return Err(e);
        }
    };
    // `need` is bounded by the region count limit (at most 80 KiB).
    let mut bytes = vec![0u8; need];
    let result = if need as u64 <= ps {
        let r = probe.read(0, &mut bytes);
        rvm.unmap_claimed(probe.0)?;
        r
    } else {
        rvm.unmap_claimed(probe.0)?;
        let len = (need as u64).div_ceil(ps) * ps;
        if len > dev {
            return Err(short_device(path, dev, len));
        }
        let whole = map_header(rvm, seg, len, CopyMode::OnDemand)?;
        let r = whole.read(0, &mut bytes);
        rvm.unmap_claimed(whole.0)?;
        r
    };
    result.ok_or_else(|| short_device(path, dev, need as u64))?;
    let map = LoadMap::decode(&bytes).map_err(|e| e.in_segment(path))?;
    map.check(Some(dev)).map_err(|p| map.corrupted(p).in_segment(path))?;
    Ok(map)
}

/// Creates a segment file of `len` bytes at `path` whose header holds `map`.
///
/// The map is validated first ([`LoadMap::validate_for_device`]; its page
/// size must also suit this system). Then the core creates the file (sized
/// and synced), the header area is mapped, and the encoded map is written
/// into it by one transaction committed with flush; the log is then
/// truncated so the header is in the segment file itself. When this returns
/// `Ok` the segment is created: its header is durable.
///
/// A crash before the commit leaves a segment whose header is blank (all
/// zeros): [`load_segment`] rejects it with [`LoaderError::NotALoadMap`],
/// saying creation did not complete. A crash after it leaves the complete
/// map (recovery replays the commit). Never a half-written map. If creation
/// fails after the file was made, the file is deleted again
/// ([`Rvm::delete_segment`]; should that fail too, the file stays, blank,
/// and must be removed before trying again).
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let log = dir.path().join("log");
/// # rvm_core::create_log(&log, 1 << 20).unwrap();
/// use rvm_loader::{create_segment, load_segment, LoadMap, RegionSpec};
/// let rvm = rvm_core::Rvm::open(&log, rvm_core::Options::default()).unwrap();
/// let map = LoadMap::new().region(RegionSpec::new("heap", 1 << 16, 1 << 20, 0x5c00_0000_0000));
/// create_segment(&rvm, dir.path().join("seg"), (1 << 16) + (1 << 20), &map).unwrap();
/// let seg = load_segment(&rvm, dir.path().join("seg")).unwrap();
/// let heap = seg.region("heap").unwrap();
/// assert_eq!(heap.addr(), 0x5c00_0000_0000);
/// assert_eq!(heap.len(), 1 << 20);
/// ```
pub fn create_segment(rvm: &Rvm, path: impl AsRef<Path>, len: u64, map: &LoadMap) -> Result<()> {
    map.validate_for_device(len)?;
    check_page_size(map)?;
    let _one = header_maps();
    let seg = rvm.create_segment(path.as_ref(), len)?;
    let written = (|| {
        // The new file is all zeros: nothing needs reading.
        let mut header = map_header(rvm, &seg, map.header_len(), CopyMode::NoCopy)?;
        let written = raw::commit_header(rvm, &mut header, &map.encode());
        let unmapped = rvm.unmap_claimed(header.0);
        written?;
        unmapped?;
        rvm.truncate()?;
        Ok(())
    })();
    if written.is_err() {
        // No half-made segment is left behind (best effort: should the
        // deletion fail too, the error below is still the one reported,
        // and the file's blank header says what it is).
        let _ = rvm.delete_segment(seg);
    }
    written
}

/// Loads a segment: opens it (locking it against other processes), reads
/// and validates its load map, and maps every region at its base address
/// with its copy mode. The header area stays mapped (anywhere) while the
/// segment is loaded.
///
/// All or nothing: if a region cannot be mapped (its addresses are in use,
/// say), every region mapped so far is unmapped and the error names the
/// region and the reason ([`LoaderError::MapRegion`]). A damaged header is
/// [`LoaderError::Corrupted`] (or [`NotALoadMap`](LoaderError::NotALoadMap),
/// [`UnsupportedVersion`](LoaderError::UnsupportedVersion)); a segment
/// loaded already by this instance is [`LoaderError::AlreadyLoaded`]; one
/// open in another process is `LoaderError::Core(rvm_core::Error::Locked { .. })`.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let log = dir.path().join("log");
/// # rvm_core::create_log(&log, 1 << 20).unwrap();
/// use rvm_core::{MapSpec, Rvm};
/// use rvm_loader::{create_segment, load_segment, LoadMap, LoaderError, RegionSpec};
/// let rvm = Rvm::open(&log, rvm_core::Options::default()).unwrap();
/// let (a, b) = (0x5d40_0000_0000u64, 0x5d40_4000_0000u64);
/// let map = LoadMap::new()
///     .region(RegionSpec::new("a", 1 << 16, 1 << 16, a))
///     .region(RegionSpec::new("b", 1 << 17, 1 << 16, b));
/// let path = dir.path().join("seg");
/// create_segment(&rvm, &path, 3 << 16, &map).unwrap();
///
/// // Something else occupies region `b`'s addresses: nothing is loaded.
/// let other = rvm.create_segment(dir.path().join("other"), 1 << 16).unwrap();
/// let occupant = rvm.map(&other, MapSpec::new(0, 1 << 16).at(b as usize)).unwrap();
/// match load_segment(&rvm, &path) {
///     Err(LoaderError::MapRegion { region, .. }) => assert_eq!(region, "b"),
///     other => panic!("{other:?}"),
/// }
/// assert!(rvm.region_at(a as usize).is_none()); // `a` was unmapped again
///
/// rvm.unmap(occupant).unwrap();
/// let seg = load_segment(&rvm, &path).unwrap();
/// assert!(matches!(load_segment(&rvm, &path), Err(LoaderError::AlreadyLoaded { .. })));
/// assert_eq!(seg.region("b").unwrap().addr() as u64, b);
/// ```
pub fn load_segment(rvm: &Rvm, path: impl AsRef<Path>) -> Result<LoadedSegment> {
    let _one = header_maps();
    let segment = rvm.open_segment(path.as_ref())?;
    let map = read_header(rvm, &segment)?;
    check_page_size(&map)?;
    let mut loaded = LoadedSegment {
        rvm: rvm.clone(),
        segment,
        map: Arc::new(Mutex::new(LoadMap::new())),
        header: None,
        regions: Vec::with_capacity(map.regions().len()),
        names: Vec::with_capacity(map.regions().len()),
        by_name: HashMap::with_capacity(map.regions().len()),
    };
    for spec in map.regions() {
        // On error, dropping `loaded` unmaps what was mapped.
        let region = loaded.map_region(spec)?.claim()?;
        loaded.by_name.insert(spec.name.clone(), loaded.regions.len());
        loaded.names.push(spec.name.clone());
        loaded.regions.push(region);
    }
    // The header last, so the kernel places it clear of the regions.
    loaded.header = Some(map_header(rvm, &loaded.segment, map.header_len(), CopyMode::OnDemand)?);
    *loaded.map.lock().unwrap_or_else(|e| e.into_inner()) = map;
    Ok(loaded)
}

/// Reads a segment's load map through `rvm` (after recovery, so it shows
/// the committed map) without loading the segment. Opens the segment (it
/// stays open, and locked, in `rvm`). For a segment this instance has
/// loaded, use [`LoadedSegment::load_map`].
pub fn read_load_map(rvm: &Rvm, path: impl AsRef<Path>) -> Result<LoadMap> {
    let _one = header_maps();
    let segment = rvm.open_segment(path.as_ref())?;
    read_header(rvm, &segment)
}

/// Reads a segment's load map straight from the file, without a log and
/// without locking it (for inspection tools). It shows the header as the
/// file holds it: a change committed to a log and not yet truncated is not
/// there; [`read_load_map`] shows the recovered state. Only a regular file
/// or a block device is read: anything else (a FIFO, say) is refused at
/// once with [`LoaderError::Io`], never waited for.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let log = dir.path().join("log");
/// # rvm_core::create_log(&log, 1 << 20).unwrap();
/// # let rvm = rvm_core::Rvm::open(&log, rvm_core::Options::default()).unwrap();
/// use rvm_loader::{create_segment, read_load_map_file, LoadMap, RegionSpec};
/// let map = LoadMap::new().region(RegionSpec::new("heap", 1 << 16, 1 << 16, 0x5d80_0000_0000));
/// create_segment(&rvm, dir.path().join("seg"), 1 << 17, &map).unwrap();
/// assert_eq!(read_load_map_file(dir.path().join("seg")).unwrap(), map);
/// // A file that is not a segment made by the loader:
/// assert!(read_load_map_file(&log).is_err());
/// ```
pub fn read_load_map_file(path: impl AsRef<Path>) -> Result<LoadMap> {
    use std::os::unix::fs::FileExt;
    let path = path.as_ref();
    let io = |op: &'static str| move |source| LoaderError::Io { op, path: path.to_path_buf(), source };
    let mut file = rvm_core::storage::open_read_only(path).map_err(io("opening segment"))?;
    // Seeking to the end sizes block devices too (their metadata says 0).
    let dev = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io("sizing segment"))?;
    read_map_with(path, dev, |buf, at| file.read_exact_at(buf, at).map_err(io("reading segment header")))
}

/// Reads a segment's load map from an image of the segment's first bytes
/// (`image` holds bytes `[0, image.len())` of a segment of `device_len`
/// bytes), with the checks of [`read_load_map_file`]; `path` names the
/// segment in errors. Inspection tools use it on a segment's header as
/// recovery would leave it, built in memory
/// (`rvm_core::log::inspect::segment_snapshot`). An image shorter than the
/// header is [`LoaderError::Io`] (`UnexpectedEof`).
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let log = dir.path().join("log");
/// # rvm_core::create_log(&log, 1 << 20).unwrap();
/// # let rvm = rvm_core::Rvm::open(&log, rvm_core::Options::default()).unwrap();
/// use rvm_loader::{create_segment, read_load_map_image, LoadMap, RegionSpec};
/// let map = LoadMap::new().region(RegionSpec::new("heap", 1 << 16, 1 << 16, 0x5d90_0000_0000));
/// let seg = dir.path().join("seg");
/// create_segment(&rvm, &seg, 1 << 17, &map).unwrap();
/// let bytes = std::fs::read(&seg).unwrap();
/// assert_eq!(read_load_map_image(&seg, &bytes[..8192], 1 << 17).unwrap(), map);
/// ```
pub fn read_load_map_image(path: impl AsRef<Path>, image: &[u8], device_len: u64) -> Result<LoadMap> {
    let path = path.as_ref();
    read_map_with(path, device_len, |buf, at| {
        let start = usize::try_from(at).ok().filter(|&s| s <= image.len());
        match start.and_then(|s| image.get(s..s + buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(LoaderError::Io {
                op: "reading segment header",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the image ends inside the header"),
            }),
        }
    })
}

/// The header checks of [`read_load_map_file`], reading through `read`.
fn read_map_with(path: &Path, dev: u64, mut read: impl FnMut(&mut [u8], u64) -> Result<()>) -> Result<LoadMap> {
    let mut prefix = [0u8; FIXED_HEADER_LEN];
    if dev < FIXED_HEADER_LEN as u64 {
        return Err(short_device(path, dev, FIXED_HEADER_LEN as u64));
    }
    read(&mut prefix, 0)?;
    let need = encoded_len_from_prefix(&prefix).map_err(|e| e.in_segment(path))?;
    if need as u64 > dev {
        return Err(short_device(path, dev, need as u64));
    }
    // Bounded by the region count limit (at most 80 KiB).
    let mut bytes = vec![0u8; need];
    read(&mut bytes, 0)?;
    let map = LoadMap::decode(&bytes).map_err(|e| e.in_segment(path))?;
    map.check(Some(dev)).map_err(|p| map.corrupted(p).in_segment(path))?;
    Ok(map)
}

/// A loaded segment: its load map and its regions, mapped at their bases.
///
/// Look regions up by name with [`LoadedSegment::region`]. Dropping the
/// value unloads the segment (unmapping every region; a region with an
/// uncommitted transaction stays mapped until the transaction ends and the
/// instance is dropped); [`LoadedSegment::unload`] does it with error
/// reporting. Pointers into the regions dangle once the segment is unloaded.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let log = dir.path().join("log");
/// # rvm_core::create_log(&log, 1 << 20).unwrap();
/// # let rvm = rvm_core::Rvm::open(&log, rvm_core::Options::default()).unwrap();
/// use rvm_core::{CommitMode, RestoreMode};
/// use rvm_loader::{create_segment, load_segment, LoadMap, RegionSpec};
/// let base = 0x5c00_4000_0000u64;
/// let map = LoadMap::new().region(RegionSpec::new("data", 1 << 16, 1 << 16, base));
/// create_segment(&rvm, dir.path().join("seg"), 1 << 17, &map).unwrap();
/// let seg = load_segment(&rvm, dir.path().join("seg")).unwrap();
/// let data = seg.region("data").unwrap();
/// // Store an absolute pointer to the region's second word in its first.
/// let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
/// // SAFETY: nothing else uses the region while the transaction runs.
/// unsafe { tx.modify_bytes(data.addr(), &(data.addr() + 8).to_le_bytes()).unwrap() };
/// tx.commit(CommitMode::Flush).unwrap();
/// // SAFETY: the first word is mapped and no transaction is writing it.
/// let p = unsafe { data.as_ptr().cast::<usize>().read() };
/// assert_eq!(p, base as usize + 8);
/// ```
#[derive(Debug)]
pub struct LoadedSegment {
    rvm: Rvm,
    segment: Segment,
    /// The map as committed; shared with [`RegionGrowth`] handles. Its lock
    /// is held while the header is rewritten (that serializes the writers).
    map: Arc<Mutex<LoadMap>>,
    header: Option<HeaderArea>,
    /// In load-map order.
    /// The regions, claimed: only this value unmaps them.
    regions: Vec<RegionClaim>,
    /// The regions' names, in load-map order.
    names: Vec<String>,
    by_name: HashMap<String, usize>,
}

impl LoadedSegment {
    /// The region called `name` (its `addr()`, `as_ptr()` and `len()` give
    /// the memory), or `None` if the map has no such region or the segment
    /// was unloaded.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.by_name.get(name).and_then(|&i| self.regions.get(i)).map(RegionClaim::region)
    }

    /// Every region with its name, in load-map order.
    pub fn regions(&self) -> impl Iterator<Item = (&str, &Region)> + '_ {
        self.names.iter().map(String::as_str).zip(self.regions.iter().map(RegionClaim::region))
    }

    /// The load map the segment was loaded with (including regions added
    /// and grown since).
    pub fn load_map(&self) -> LoadMap {
        self.lock_map().clone()
    }

    fn lock_map(&self) -> MutexGuard<'_, LoadMap> {
        // Nothing it guards is left half-changed by a panic: the map is
        // replaced whole after its commit.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that grows region `name` in place
    /// ([`RegionGrowth::grow`]), usable from any thread while the segment
    /// is loaded. `None` if the map has no such region.
    pub fn region_growth(&self, name: &str) -> Option<RegionGrowth> {
        let (index, page_size) = {
            let map = self.lock_map();
            (map.regions().iter().position(|r| r.name == name)?, map.page_size())
        };
        Some(RegionGrowth {
            page_size,
            rvm: self.rvm.clone(),
            segment: self.segment.clone(),
            region: self.region(name)?.clone(),
            header: self.header.as_ref()?.region().clone(),
            map: self.map.clone(),
            index,
        })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    /// The segment's canonical path.
    pub fn path(&self) -> &Path {
        self.segment.name()
    }

    /// The instance the segment is loaded in.
    pub fn rvm(&self) -> &Rvm {
        &self.rvm
    }

    /// Whether the segment is still loaded (false after [`LoadedSegment::unload`]).
    pub fn is_loaded(&self) -> bool {
        self.header.is_some()
    }

    /// Adds a region to the segment's load map and maps it.
    ///
    /// The region is checked against the rules of the format with the
    /// existing regions and the device, and must fit in the header area
    /// (see [`LoadMap::capacity`]); then it is mapped at its base (a conflict
    /// is [`LoaderError::MapRegion`] and changes nothing); then the new map
    /// is written into the header by one transaction committed with flush.
    /// If that fails the region is unmapped again and the map is unchanged.
    /// The calling thread must not have a transaction open on this instance.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let log = dir.path().join("log");
    /// # rvm_core::create_log(&log, 1 << 20).unwrap();
    /// # let rvm = rvm_core::Rvm::open(&log, rvm_core::Options::default()).unwrap();
    /// use rvm_loader::{create_segment, load_segment, LoadMap, RegionSpec};
    /// let map = LoadMap::new().region(RegionSpec::new("first", 1 << 16, 1 << 16, 0x5dc0_0000_0000));
    /// let path = dir.path().join("seg");
    /// create_segment(&rvm, &path, 1 << 20, &map).unwrap();
    /// let mut seg = load_segment(&rvm, &path).unwrap();
    /// let more = seg.add_region(RegionSpec::new("more", 1 << 17, 1 << 16, 0x5dc0_4000_0000)).unwrap();
    /// assert_eq!(more.addr(), 0x5dc0_4000_0000);
    /// drop(seg);
    /// // The next load maps it too.
    /// let seg = load_segment(&rvm, &path).unwrap();
    /// assert_eq!(seg.load_map().regions().len(), 2);
    /// ```
    pub fn add_region(&mut self, spec: RegionSpec) -> Result<&Region> {
        let path = self.path().to_path_buf();
        let Some(mut header) = self.header.take() else {
            return Err(LoaderError::InvalidMap {
                region: Some(spec.name),
                reason: format!("segment {} is not loaded", path.display()),
            });
        };
        let result = self.add_region_with(&mut header, spec);
        self.header = Some(header);
        let i = result?;
        Ok(self.regions[i].region())
    }

    fn add_region_with(&mut self, header: &mut HeaderArea, spec: RegionSpec) -> Result<usize> {
        let shared = self.map.clone();
        let mut current = shared.lock().unwrap_or_else(|e| e.into_inner());
        let map = current.with_added(spec.clone());
        map.validate_for_device(self.segment.len())?;
        let region = self.map_region(&spec)?.claim()?;
        if let Err(e) = raw::commit_header(&self.rvm, header, &map.encode()) {
            let _ = self.rvm.unmap_claimed(region);
            return Err(e);
        }
        *current = map;
        self.by_name.insert(spec.name.clone(), self.regions.len());
        self.names.push(spec.name);
        self.regions.push(region);
        Ok(self.regions.len() - 1)
    }

    fn map_region(&self, spec: &RegionSpec) -> Result<Region> {
        let fail = |source: rvm_core::Error| {
            if is_already_mapped(&source) {
                LoaderError::AlreadyLoaded { path: self.path().to_path_buf() }
            } else {
                LoaderError::MapRegion {
                    path: self.path().to_path_buf(),
                    region: spec.name.clone(),
                    base: spec.base,
                    source,
                }
            }
        };
        let len = to_usize(spec.len, "region length")?;
        let base = to_usize(spec.base, "base address")?;
        let reserve = to_usize(spec.span(), "maximum length")?;
        let map = MapSpec::new(spec.offset, len).at(base).copy(spec.copy);
        match self.rvm.map(&self.segment, map.reserve(reserve)) {
            // Something occupies the room to grow: load the region at its
            // size all the same (a growth then reports the range taken).
            Err(rvm_core::Error::Map(MapError::AddressInUse { .. })) if reserve > len => {
                self.rvm.map(&self.segment, map).map_err(fail)
            }
            r => r.map_err(fail),
        }
    }

    /// Unloads the segment: unmaps every region and the header area.
    ///
    /// Refused, with nothing unmapped, while a transaction with ranges in
    /// one of the regions is uncommitted ([`LoaderError::Busy`]). After
    /// success the value is empty ([`LoadedSegment::is_loaded`] is false,
    /// [`LoadedSegment::region`] finds nothing) and the segment can be
    /// loaded again; it stays open (and locked) in the instance. A
    /// [`Region`] handle cloned from a region keeps that memory mapped
    /// until it is dropped: meanwhile a new load of the segment fails with
    /// [`LoaderError::AlreadyLoaded`].
    pub fn unload(&mut self) -> Result<()> {
        for (name, r) in self.regions() {
            let count = r.active_transactions();
            if count > 0 {
                return Err(LoaderError::Busy { region: name.to_owned(), count });
            }
        }
        if let Some(h) = &self.header {
            let count = h.region().active_transactions();
            if count > 0 {
                return Err(LoaderError::Busy { region: "(header)".into(), count });
            }
        }
        let mut first_error = None;
        for r in self.release() {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Unmaps everything, the regions newest first and the header area
    /// last (while the header area is mapped, the segment counts as loaded:
    /// a concurrent [`load_segment`] fails at once); returns each unmap's
    /// result.
    fn release(&mut self) -> Vec<rvm_core::Result<()>> {
        let mut results = Vec::with_capacity(self.regions.len() + 1);
        while let Some(r) = self.regions.pop() {
            results.push(self.rvm.unmap_claimed(r));
        }
        self.by_name.clear();
        self.names.clear();
        if let Some(h) = self.header.take() {
            results.push(self.rvm.unmap_claimed(h.0));
        }
        results
    }
}

impl Drop for LoadedSegment {
    fn drop(&mut self) {
        // Errors (a region with an uncommitted transaction) leave that region
        // to the instance, which unmaps it when it is dropped.
        let _ = self.release();
    }
}

/// Grows one region of a loaded segment in place (from
/// [`LoadedSegment::region_growth`]): cheap to clone, `Send` and `Sync`.
#[derive(Clone, Debug)]
pub struct RegionGrowth {
    rvm: Rvm,
    segment: Segment,
    region: Region,
    /// The header area (a clone of the loaded segment's claimed one).
    header: Region,
    map: Arc<Mutex<LoadMap>>,
    index: usize,
    page_size: u64,
}

impl RegionGrowth {
    /// The load map's page size: lengths are multiples of it.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The region's entry in the load map as committed (its length is the
    /// committed length, its maximum how far it may grow).
    pub fn spec(&self) -> Option<RegionSpec> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).regions().get(self.index).cloned()
    }

    /// Changes the region's maximum length in the load map (a page
    /// multiple, not below its length; the rules of the format with the
    /// other regions apply), in one transaction committed with flush. The
    /// address space reserved in this process stays as it was: the new
    /// maximum is reserved from the next load on. The calling thread must
    /// not have a transaction open on the instance.
    pub fn set_max_len(&self, max_len: u64) -> Result<()> {
        let mut current = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(name) = current.regions().get(self.index).map(|r| r.name.clone()) else {
            return Err(LoaderError::InvalidMap { region: None, reason: "the region is no longer in the map".into() });
        };
        let map = current.with_max_len(&name, max_len)?;
        map.validate_for_device(self.segment.len())?;
        let mut tx = self.rvm.begin(rvm_core::RestoreMode::Restore)?;
        raw::store_header(&mut tx, &self.header, &map.encode())?;
        tx.commit(rvm_core::CommitMode::Flush)?;
        *current = map;
        Ok(())
    }

    /// Grows the region to `new_len` bytes (a multiple of the map's page
    /// size, at most its maximum length), together with whatever `more`
    /// writes into the same transaction (the state of the data structure
    /// that lives in the region, such as a heap's free space):
    ///
    /// 1. the segment file is extended to hold the new length, its space
    ///    allocated and its length synced
    ///    ([`rvm_core::Rvm::extend_segment`]);
    /// 2. the region's new pages are mapped in place, inside the address
    ///    space reserved at load ([`rvm_core::Rvm::grow_region`]);
    /// 3. one restore-mode transaction writes the new load map into the
    ///    header, runs `more`, and commits with flush.
    ///
    /// A crash before step 3's commit is durable leaves the old map (and
    /// whatever `more` changed, old too): the segment file is longer than
    /// the map needs, which is allowed. After it, the new map and `more`'s
    /// changes, together. If `more` fails, the transaction aborts and the
    /// map is unchanged (the file and the mapping stay larger: both are
    /// invisible to the next load, and the next growth reuses them).
    ///
    /// Growths of one segment are serialized; `more` runs with the map's
    /// lock held. Returns `Ok(false)` (and runs nothing) if the region is
    /// that long already. The calling thread must not have a transaction
    /// open on the instance.
    pub fn grow<E: From<LoaderError>>(
        &self,
        new_len: u64,
        more: impl FnOnce(&mut rvm_core::Transaction<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        let mut current = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(spec) = current.regions().get(self.index).cloned() else {
            return Err(
                LoaderError::InvalidMap { region: None, reason: "the region is no longer in the map".into() }.into()
            );
        };
        if new_len <= spec.len {
            return Ok(false);
        }
        let bad = |reason: String| LoaderError::InvalidMap { region: Some(spec.name.clone()), reason };
        if new_len > spec.span() {
            return Err(bad(format!("cannot grow to {new_len:#x} bytes: its maximum is {:#x}", spec.span())).into());
        }
        let map = current.with_len(self.index, new_len);
        let seg_end = spec.offset + new_len;
        map.validate_for_device(seg_end.max(self.segment.len())).map_err(|e| E::from(e))?;
        self.rvm.extend_segment(&self.segment, seg_end).map_err(|e| E::from(e.into()))?;
        let len = to_usize(new_len, "region length").map_err(E::from)?;
        self.rvm.grow_region(&self.region, len).map_err(|e| E::from(e.into()))?;
        let mut tx = self.rvm.begin(rvm_core::RestoreMode::Restore).map_err(|e| E::from(e.into()))?;
        raw::store_header(&mut tx, &self.header, &map.encode()).map_err(E::from)?;
        more(&mut tx)?;
        tx.commit(rvm_core::CommitMode::Flush).map_err(|e| E::from(e.into()))?;
        *current = map;
        Ok(true)
    }
}
