//! Segments of an instance: opening (with the dictionary entry and the
//! owner mark made durable first), and mapping regions.

use super::Inner;
use crate::error::{Error, LogError, MapError, Result};
use crate::log::{self, format};
use crate::mem::{self, Mapping};
use crate::segment::{grow_mapping, CopyMode, MapSpec, Placement, Region, RegionInner, Segment, SegmentInner};
use crate::storage::{OpenMode, Vfs};
use crate::track::RegionTrack;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

impl Inner {
    pub(super) fn open_segment(&self, path: &Path, create: Option<u64>) -> Result<Segment> {
        if create.is_some() {
            // A new dictionary entry: written after instant recovery's
            // status (see below).
            self.wait_status_durable()?;
        }
        loop {
            if let Some(seg) = self.open_segment_once(path, create)? {
                return Ok(seg);
            }
            if self.status_durable() {
                // A full dictionary while instant recovery applies the
                // log: its entries go once the apply is durable.
                self.wait_recovered()?;
            } else {
                self.wait_status_durable()?;
            }
        }
    }

    /// [`Inner::open_segment`]; `None` if the segment needs a dictionary
    /// entry written while instant recovery's status (§3.4 step 4), which
    /// is written without the status lock so that opening a recorded
    /// segment need not wait for it, is not yet durable: the caller waits
    /// for it and tries again. Also `None` if the entry does not fit while
    /// instant recovery still applies the log (entries of segments not
    /// open can go only once it is done): the caller waits for that.
    fn open_segment_once(&self, path: &Path, create: Option<u64>) -> Result<Option<Segment>> {
        let name = self.vfs.canonical_name(path).map_err(|e| Error::io("resolving segment path", path, e))?;
        let mut st = self.status.lock();
        if let Some(seg) = st.segments.values().find(|s| s.name == name) {
            if create.is_some() {
                return Err(Error::io(
                    "creating segment",
                    path,
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            return Ok(Some(Segment(seg.clone())));
        }
        let mode = if create.is_some() { OpenMode::CreateNew } else { OpenMode::Existing };
        // Instant recovery may still hold the segment open (and locked).
        let held = self.instant.as_ref().filter(|_| create.is_none()).and_then(|i| i.device(&name));
        let dev = match held {
            Some(dev) => dev,
            None => self.vfs.open(&name, mode).map_err(|e| Error::io("opening segment", &name, e))?,
        };
        let opened = (|| {
            if let Some(len) = create {
                dev.set_len(len).map_err(|e| Error::io("sizing segment", &name, e))?;
                if self.opts.reserve_segment_space {
                    dev.allocate(0, len).map_err(|e| Error::io("allocating segment space", &name, e))?;
                }
                dev.sync().map_err(|e| Error::io("syncing segment", &name, e))?;
            }
            let len = dev.len().map_err(|e| Error::io("sizing segment", &name, e))?;
            let device = dev.identity().map_err(|e| Error::io("identifying segment", &name, e))?;
            self.claim_segment(dev.as_ref(), &name)?;
            let known = st.status.segments.iter().find(|e| e.name == name).cloned();
            let id = known.as_ref().map_or(st.status.next_segment_id, |e| e.id);
            let same = |e: &format::SegmentEntry| match (e.device, device) {
                (Some(a), Some(b)) => a.same_file(&b),
                (a, b) => a == b,
            };
            if known.as_ref().is_none_or(|e| !same(e)) {
                if !self.status_durable() {
                    return Ok(None);
                }
                // The dictionary entry (new, or naming the file now under
                // that name: the log holds no records for it, since
                // recovery emptied it and this instance has not opened
                // it) is durable before any record can name the id.
                let mut next = st.status.clone();
                next.seq += 1;
                if known.is_none() {
                    next.next_segment_id =
                        id.checked_add(1).ok_or(LogError::SegmentDictionaryFull { limit: format::DICT_LIMIT })?;
                }
                next.segments.retain(|e| e.id != id);
                next.segments.push(format::SegmentEntry { id, name: name.clone(), device });
                let full = format::Status::dict_len(&next.segments) > format::DICT_LIMIT;
                if full && self.recovering() {
                    return Ok(None);
                }
                if full && self.recovery_done() {
                    // Full: entries of segments this instance does not have
                    // open go (no live record names them: recovery applied
                    // every earlier record, and this instance writes records
                    // only for segments it has open; ids are never reused).
                    // They stayed for segments opened by earlier instances
                    // and never closed ([`crate::Rvm::close_segment`] removes
                    // its entry).
                    next.segments.retain(|e| e.id == id || st.segments.contains_key(&e.id));
                }
                next.synced_end = self.synced_end();
                log::write_status(&self.ring, &next)?;
                st.status = next;
            }
            Ok(Some((id, len)))
        })();
        let (id, len) = match opened {
            Ok(Some(v)) => v,
            Ok(None) => {
                if create.is_some() {
                    // Made here and named by nothing yet: removed, so that
                    // the retry creates it again.
                    drop(dev);
                    let _ = self.vfs.remove(&name);
                }
                return Ok(None);
            }
            Err(e) => {
                if create.is_some() {
                    // No record names the new file: remove it, so that a
                    // retry can create it (best effort; the error stands).
                    drop(dev);
                    let _ = self.vfs.remove(&name);
                }
                return Err(e);
            }
        };
        let seg = Arc::new(SegmentInner {
            id,
            instance: self.id,
            name,
            dev,
            len: AtomicU64::new(len),
            mapped: Mutex::new(Vec::new()),
            mapped_end: AtomicU64::new(0),
            resize: Mutex::new(()),
            last_tx: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        st.segments.insert(id, seg.clone());
        Ok(Some(Segment(seg)))
    }

    /// Marks the segment as this log's (its unapplied records live here),
    /// refusing one whose mark names another log that may still hold
    /// records for it. The mark is durable before the segment can be
    /// changed through this log.
    fn claim_segment(&self, dev: &dyn crate::storage::Storage, name: &Path) -> Result<()> {
        let mark = dev.owner_mark().map_err(|e| Error::io("reading the segment's owner mark", name, e))?;
        let theirs = mark.as_deref().and_then(OwnerMark::decode);
        // The canonical path, so that a process with another working
        // directory finds this log from the mark.
        let log = self.vfs.canonical_name(&self.ring.path).unwrap_or_else(|_| self.ring.path.clone());
        if theirs.as_ref().is_some_and(|m| m.log_id == self.log_id && m.log == log) {
            return Ok(());
        }
        if let Some(other) = theirs.filter(|m| m.log_id != self.log_id) {
            // An earlier log at this log's own path (we hold its lock now)
            // was replaced by this one.
            let other_log =
                if other.log == log { OtherLog::Gone } else { other_log_holds(self.vfs.as_ref(), &other, name)? };
            match other_log {
                OtherLog::MayHold => {
                    return Err(LogError::SegmentInOtherLog { path: name.to_path_buf(), other_log: other.log }.into())
                }
                OtherLog::Gone if !self.accepted(name) => {
                    return Err(LogError::SegmentLogGone { path: name.to_path_buf(), owner_log: other.log }.into())
                }
                OtherLog::Gone | OtherLog::HoldsNothing => {}
            }
        }
        let ours = OwnerMark { log_id: self.log_id, log }.encode();
        dev.set_owner_mark(Some(&ours)).map_err(|e| Error::io("writing the segment's owner mark", name, e))
    }

    /// Whether `Options::accept_segment` names the segment `name` (a
    /// canonical name) as where an accepted segment is now.
    fn accepted(&self, name: &Path) -> bool {
        self.opts
            .accepted_segments
            .iter()
            .any(|(_, now)| now == name || self.vfs.canonical_name(now).is_ok_and(|c| c == name))
    }

    /// Refuses a segment handle of another instance: its commits would go
    /// to that instance's log.
    pub(super) fn check_own(&self, seg: &SegmentInner) -> Result<()> {
        if seg.instance != self.id {
            return Err(MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        Ok(())
    }

    pub(super) fn map(&self, segment: &Segment, spec: MapSpec) -> Result<Region> {
        let ps = mem::page_size();
        let seg = &segment.0;
        self.check_own(seg)?;
        if spec.len == 0 {
            return Err(MapError::EmptyRegion.into());
        }
        if !spec.offset.is_multiple_of(ps as u64) {
            return Err(MapError::NotPageAligned { what: "segment offset", value: spec.offset, page_size: ps }.into());
        }
        if !spec.len.is_multiple_of(ps) {
            return Err(
                MapError::NotPageAligned { what: "region length", value: spec.len as u64, page_size: ps }.into()
            );
        }
        if let Placement::Fixed(a) = spec.placement {
            if a % ps != 0 {
                return Err(MapError::NotPageAligned { what: "address", value: a as u64, page_size: ps }.into());
            }
        }
        // A reservation no address space holds (its page round-up would
        // overflow) is refused here, before the segment range is claimed.
        if spec.reserve > spec.len && spec.reserve.checked_next_multiple_of(ps).is_none_or(|r| r > isize::MAX as usize)
        {
            let addr = match spec.placement {
                Placement::Fixed(a) => a,
                _ => 0,
            };
            return Err(MapError::BadAddress { addr, len: spec.reserve }.into());
        }
        let end = spec.offset.checked_add(spec.len as u64).filter(|&e| e <= seg.len()).ok_or_else(|| {
            MapError::OutsideSegment {
                segment: seg.name.clone(),
                offset: spec.offset,
                len: spec.len as u64,
                segment_len: seg.len(),
            }
        })?;
        // Claim the segment range (a range is mapped at most once).
        {
            let mut mapped = seg.mapped.lock();
            if seg.closed.load(Ordering::Acquire) {
                return Err(MapError::SegmentClosed { segment: seg.name.clone() }.into());
            }
            if mapped.iter().any(|&(s, e)| spec.offset < e && s < end) {
                return Err(MapError::AlreadyMapped {
                    segment: seg.name.clone(),
                    offset: spec.offset,
                    len: spec.len as u64,
                }
                .into());
            }
            mapped.push((spec.offset, end));
            seg.mapped_end.fetch_max(end, Ordering::AcqRel);
        }
        let unclaim = || seg.mapped.lock().retain(|&(s, _)| s != spec.offset);
        let result = self.map_claimed(seg, spec);
        if result.is_err() {
            unclaim();
        }
        result
    }

    fn map_claimed(&self, seg: &Arc<SegmentInner>, spec: MapSpec) -> Result<Region> {
        // The segment must show its committed image: if committed changes to
        // it are not yet applied (the range was mapped, changed and unmapped
        // before), apply the log first.
        if seg.last_tx.load(Ordering::Acquire) > 0 {
            self.replay_all()?;
        }
        // Hold truncation off while the contents are read in.
        let _t = self.truncation.lock();
        let copy = match (spec.copy, seg.dev.raw_fd()) {
            (CopyMode::OnDemand, Some(_)) => CopyMode::OnDemand,
            (CopyMode::OnDemand, None) => CopyMode::OnMap,
            (c, _) => c,
        };
        // Instant recovery: a region copied at map time needs its pages up
        // to date first (an on-demand one gets them on first touch, below).
        if copy != CopyMode::OnDemand {
            self.settle_segment(seg)?;
        }
        let mapping = if spec.reserve > spec.len {
            // Reserve the whole span, then map the region's start into it.
            let m = Mapping::reserve(spec.placement, spec.reserve.next_multiple_of(mem::page_size()))?;
            crate::segment::grow_mapping(seg, &m, copy, spec.offset, spec.len)?;
            m
        } else {
            match copy {
                CopyMode::OnDemand => {
                    let fd = seg.dev.raw_fd().ok_or(MapError::System {
                        addr: 0,
                        len: spec.len,
                        errno: "device has no file descriptor".into(),
                    })?;
                    Mapping::file_private(spec.placement, fd, spec.offset, spec.len)?
                }
                CopyMode::OnMap => {
                    let m = Mapping::anonymous_populated(spec.placement, spec.len)?;
                    m.fill(0, spec.len, |dst| {
                        for (i, chunk) in dst.chunks_mut(8 << 20).enumerate() {
                            seg.dev.read_at(chunk, spec.offset + (i * (8 << 20)) as u64)?;
                        }
                        Ok(())
                    })
                    .map_err(|e| Error::io("reading segment", &seg.name, e))?;
                    m
                }
                CopyMode::NoCopy => Mapping::anonymous(spec.placement, spec.len)?,
            }
        };
        let lazy = match copy {
            CopyMode::OnDemand => self.instant_protect(seg, mapping.addr(), spec.len, spec.offset)?,
            _ => None,
        };
        let has_lazy = lazy.is_some();
        let track = RegionTrack::new(mapping.span());
        let region = Arc::new(RegionInner {
            lazy: Mutex::new(lazy),
            tracked: Default::default(),
            shadow: Default::default(),
            mapping,
            segment: seg.clone(),
            offset: spec.offset,
            active_txs: AtomicUsize::new(0),
            copy,
            track,
            claimed: AtomicBool::new(false),
        });
        self.regions.write().insert(region.clone());
        if has_lazy {
            self.instant_register(&region);
        }
        Ok(Region(region))
    }
}

/// A segment's owner mark: the log that may hold unapplied records for it
/// (its id and path). Stored as an extended attribute on segment files:
/// log id u128 (16 bytes), then the log's canonical path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OwnerMark {
    pub log_id: u128,
    pub log: PathBuf,
}

impl OwnerMark {
    pub(super) fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut b = self.log_id.to_le_bytes().to_vec();
        b.extend_from_slice(self.log.as_os_str().as_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<OwnerMark> {
        use std::os::unix::ffi::OsStrExt;
        let id: [u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(OwnerMark { log_id: u128::from_le_bytes(id), log: PathBuf::from(std::ffi::OsStr::from_bytes(&b[16..])) })
    }
}

/// What the log a foreign owner mark names means for the segment `name`.
enum OtherLog {
    /// It is open elsewhere (locked), its status cannot be read, or its
    /// live records name the segment.
    MayHold,
    /// It is there and holds nothing for the segment: the mark is stale.
    HoldsNothing,
    /// It is gone (no file, not a log, or another log now at its path):
    /// whatever it held for the segment is lost with it.
    Gone,
}

fn other_log_holds(vfs: &dyn Vfs, mark: &OwnerMark, name: &Path) -> Result<OtherLog> {
    let log = match crate::log::inspect::LogInspector::open(vfs, &mark.log) {
        Ok(log) => log,
        Err(Error::Locked { .. }) => return Ok(OtherLog::MayHold),
        Err(_) => return Ok(OtherLog::Gone),
    };
    if log.superblock().log_id != mark.log_id {
        return Ok(OtherLog::Gone);
    }
    let Ok(status) = log.status() else { return Ok(OtherLog::MayHold) };
    let Some(id) = status.segments.iter().find(|e| e.name == name).map(|e| e.id) else {
        return Ok(OtherLog::HoldsNothing);
    };
    let mut names_it = false;
    log.walk(|f| {
        if let crate::log::inspect::FrameBody::Range { segment, .. } = f.body {
            names_it |= segment == id;
        }
    })?;
    Ok(if names_it { OtherLog::MayHold } else { OtherLog::HoldsNothing })
}

impl super::Rvm {
    /// Extends the segment's device to `new_len` bytes (a no-op if it is
    /// that long already; segments never shrink here): the new bytes read
    /// as zeros, their disk blocks are allocated where the device supports
    /// it ([`Storage::allocate`](crate::storage::Storage::allocate): a full disk is reported now, as an I/O
    /// error of kind [`std::io::ErrorKind::StorageFull`], not at a later
    /// write; unless [`Options::reserve_segment_space`](crate::Options::reserve_segment_space)
    /// is off), and the new length is synced before this returns. A crash
    /// leaves the old or the new length; nothing in the segment refers to
    /// the new bytes until the caller commits something that does. A
    /// handle kept after [`crate::Rvm::close_segment`] or
    /// [`crate::Rvm::delete_segment`] is refused
    /// ([`crate::MapError::SegmentClosed`]), the file untouched.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// rvm.extend_segment(&seg, 3 * 4096).unwrap();
    /// assert_eq!(seg.len(), 3 * 4096);
    /// assert_eq!(std::fs::metadata(dir.path().join("seg")).unwrap().len(), 3 * 4096);
    /// ```
    pub fn extend_segment(&self, segment: &Segment, new_len: u64) -> crate::Result<()> {
        self.inner.check_process()?;
        let seg = &segment.0;
        if seg.instance != self.inner.id {
            return Err(crate::MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        let _serial = seg.resize.lock();
        // A handle kept after `close_segment` (or `delete_segment`) names a
        // file the instance no longer has open: not one to change.
        if seg.closed.load(Ordering::Acquire) {
            return Err(crate::MapError::SegmentClosed { segment: seg.name.clone() }.into());
        }
        let old = seg.len();
        if new_len <= old {
            return Ok(());
        }
        let fail = |op, e| crate::Error::io(op, &seg.name, e);
        seg.dev.set_len(new_len).map_err(|e| fail("extending segment", e))?;
        let reserve = self.inner.opts.reserve_segment_space;
        if let Err(e) = if reserve { seg.dev.allocate(old, new_len - old) } else { Ok(()) } {
            // Give the space back (best effort): the caller sees the old size.
            let _ = seg.dev.set_len(old);
            return Err(fail("allocating segment space", e));
        }
        seg.dev.sync().map_err(|e| fail("syncing segment", e))?;
        seg.len.store(new_len, Ordering::Release);
        Ok(())
    }

    /// Grows a region in place to `new_len` bytes (a page multiple; a no-op
    /// if it is that long already): the segment bytes that follow it are
    /// mapped at the addresses that follow it, inside the address space it
    /// reserved when it was mapped ([`MapSpec::reserve`]; past it:
    /// [`crate::MapError::BeyondReservation`]). The segment must hold them
    /// ([`crate::Rvm::extend_segment`] first), and no other region may map
    /// them. Nothing moves: addresses in the region stay valid, and other
    /// threads may read and run transactions in the region meanwhile.
    ///
    /// ```
    /// # use rvm_core::*;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # create_log(dir.path().join("log"), 1 << 20).unwrap();
    /// let rvm = Rvm::open(dir.path().join("log"), Options::default()).unwrap();
    /// let seg = rvm.create_segment(dir.path().join("seg"), 4096).unwrap();
    /// let region = rvm.map(&seg, MapSpec::new(0, 4096).reserve(1 << 20)).unwrap();
    /// let start = region.addr();
    /// rvm.extend_segment(&seg, 2 * 4096).unwrap();
    /// rvm.grow_region(&region, 2 * 4096).unwrap();
    /// assert_eq!((region.addr(), region.len(), region.capacity()), (start, 2 * 4096, 1 << 20));
    /// let mut tx = rvm.begin(RestoreMode::Restore).unwrap();
    /// // SAFETY: this thread alone uses the region.
    /// unsafe { tx.modify_bytes(start + 4096, b"grown").unwrap() };
    /// tx.commit(CommitMode::Flush).unwrap();
    /// ```
    pub fn grow_region(&self, region: &Region, new_len: usize) -> crate::Result<()> {
        self.inner.check_process()?;
        let r = &region.0;
        let seg = &r.segment;
        if seg.instance != self.inner.id {
            return Err(crate::MapError::ForeignSegment { segment: seg.name.clone() }.into());
        }
        let ps = crate::mem::page_size();
        if !new_len.is_multiple_of(ps) {
            return Err(crate::MapError::NotPageAligned {
                what: "region length",
                value: new_len as u64,
                page_size: ps,
            }
            .into());
        }
        if new_len <= r.mapping.len() {
            return Ok(());
        }
        if r.tracked.get().is_some() {
            // Its tracking (read-only pages and a fault hook, or kernel
            // write-protect and shadows) covers the length it had.
            return Err(crate::MapError::TrackedGrowth { addr: r.addr() }.into());
        }
        if new_len > r.mapping.span() {
            return Err(crate::MapError::BeyondReservation {
                addr: r.addr(),
                len: new_len,
                capacity: r.mapping.span(),
            }
            .into());
        }
        let end = r.offset.checked_add(new_len as u64).filter(|&e| e <= seg.len()).ok_or_else(|| {
            crate::MapError::OutsideSegment {
                segment: seg.name.clone(),
                offset: r.offset,
                len: new_len as u64,
                segment_len: seg.len(),
            }
        })?;
        let old_end = r.offset + r.mapping.len() as u64;
        // Instant recovery: the new range shows the segment's pages up to
        // date (and the region's own get their normal protection back).
        self.inner.settle_segment(seg)?;
        // Unapplied log records for the new range exist only if it was
        // mapped before in this instance: the segment must show them first.
        if seg.mapped_end.load(Ordering::Acquire) > old_end && seg.last_tx.load(Ordering::Acquire) > 0 {
            self.inner.replay_all()?;
        }
        // Truncation held off while the contents are read in; taken before
        // the segment's range list, in the order a region dropped under a
        // truncation takes them.
        let _t = self.inner.truncation.lock();
        let mut mapped = seg.mapped.lock();
        if mapped.iter().any(|&(s, e)| s != r.offset && old_end < e && s < end) {
            return Err(crate::MapError::AlreadyMapped {
                segment: seg.name.clone(),
                offset: old_end,
                len: end - old_end,
            }
            .into());
        }
        grow_mapping(seg, &r.mapping, r.copy, r.offset, new_len)?;
        for m in mapped.iter_mut().filter(|m| m.0 == r.offset) {
            m.1 = end;
        }
        seg.mapped_end.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }
}
