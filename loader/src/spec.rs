//! The load map's text form, for command lines and small files (what
//! `rvmutl` reads), and its printed form.
//!
//! # Syntax
//!
//! One item per line; `#` starts a comment; blank lines are ignored.
//!
//! ```text
//! # optional settings (defaults: the system page size; one page of header,
//! # grown to hold the region table)
//! page_size = 4096
//! header_len = 16K
//! # regions: name:offset:length:base[:copy[:max]]
//! heap:16K:1G:0x5a00_0000_0000
//! index:0x40004000:64M:0x5a00_4000_0000:on-map
//! ```
//!
//! Numbers are decimal or `0x` hexadecimal, may contain `_`, and may end in
//! a binary unit: `K`, `M`, `G`, `T` (or `KiB`, `MiB`, `GiB`, `TiB`). The copy
//! mode is `on-demand` (default), `on-map` or `no-copy`; `max` is the length
//! the region may grow to in place (default: its length).
//!
//! `Display` for [`LoadMap`] prints this form (parsing it gives the same map);
//! the alternate form (`{:#}`) prints a table for people.

use crate::error::{LoaderError, Result};
use crate::format::{copy_mode_name, LoadMap, RegionSpec, FORMAT_VERSION};
use rvm_core::CopyMode;
use std::fmt;
use std::str::FromStr;

fn spec_err(line: usize, reason: impl Into<String>) -> LoaderError {
    LoaderError::Spec { line, reason: reason.into() }
}

/// Parses a size or address: decimal or `0x` hex, `_` separators, optional
/// binary unit suffix.
pub fn parse_number(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (digits, unit) =
        [("tib", 40), ("gib", 30), ("mib", 20), ("kib", 10), ("t", 40), ("g", 30), ("m", 20), ("k", 10)]
            .iter()
            // No suffix is made of hex digits alone, so hex numbers take units too.
            .find_map(|&(suffix, shift)| lower.strip_suffix(suffix).map(|d| (d, shift)))
            .unwrap_or((lower.as_str(), 0));
    let digits = digits.trim().replace('_', "");
    if digits.is_empty() {
        return Err(format!("{t:?} is not a number"));
    }
    let value = match digits.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16),
        Some(_) => return Err(format!("{t:?} is not a number")),
        None => digits.parse::<u64>(),
    }
    .map_err(|e| format!("{t:?} is not a number ({e})"))?;
    value.checked_mul(1u64 << unit).ok_or_else(|| format!("{t:?} does not fit in 64 bits"))
}

/// Parses a copy mode name: `on-demand`, `on-map` or `no-copy` (also
/// without the dash, and `demand`, `map`, `none`).
pub fn parse_copy_mode(s: &str) -> Option<CopyMode> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on-demand" | "ondemand" | "demand" => Some(CopyMode::OnDemand),
        "on-map" | "onmap" | "map" => Some(CopyMode::OnMap),
        "no-copy" | "nocopy" | "none" => Some(CopyMode::NoCopy),
        _ => None,
    }
}

fn parse_region(s: &str, line: usize) -> Result<RegionSpec> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(4..=6).contains(&parts.len()) {
        return Err(spec_err(line, format!("{s:?}: expected name:offset:length:base[:copy[:max]]")));
    }
    let num = |i: usize, what: &str| parse_number(parts[i]).map_err(|e| spec_err(line, format!("{what}: {e}")));
    let copy = match parts.get(4) {
        Some(c) => parse_copy_mode(c).ok_or_else(|| {
            spec_err(line, format!("copy mode {:?}: expected on-demand, on-map or no-copy", c.trim()))
        })?,
        None => CopyMode::OnDemand,
    };
    let len = num(2, "length")?;
    let max_len = if parts.len() == 6 { num(5, "maximum length")?.max(len) } else { len };
    Ok(RegionSpec {
        name: parts[0].trim().to_owned(),
        offset: num(1, "offset")?,
        len,
        base: num(3, "base")?,
        copy,
        max_len,
    })
}

#[derive(Default)]
struct Builder {
    page_size: Option<u64>,
    header_len: Option<u64>,
    regions: Vec<RegionSpec>,
}

impl Builder {
    fn item(&mut self, raw: &str, line: usize) -> Result<()> {
        let item = raw.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            return Ok(());
        }
        if let Some((key, value)) = item.split_once('=') {
            let v = parse_number(value).map_err(|e| spec_err(line, e))?;
            let slot = match key.trim().to_ascii_lowercase().replace('-', "_").as_str() {
                "page_size" => &mut self.page_size,
                "header_len" => &mut self.header_len,
                k => return Err(spec_err(line, format!("unknown setting {k:?} (expected page_size or header_len)"))),
            };
            if slot.replace(v).is_some() {
                return Err(spec_err(line, format!("{} is set twice", key.trim())));
            }
            return Ok(());
        }
        self.regions.push(parse_region(item, line)?);
        Ok(())
    }

    fn build(self) -> Result<LoadMap> {
        let mut map = LoadMap::with_page_size(self.page_size.unwrap_or(rvm_core::page_size() as u64));
        for r in self.regions {
            map.push(r);
        }
        if let Some(h) = self.header_len {
            map = map.with_header_len(h);
        }
        map.validate()?;
        Ok(map)
    }
}

impl LoadMap {
    /// Parses and validates a load map in the text form (see the
    /// [module docs](crate::spec)). Syntax errors are
    /// [`LoaderError::Spec`] with the line number; rule violations
    /// [`LoaderError::InvalidMap`].
    ///
    /// ```
    /// let map = rvm_loader::LoadMap::from_spec(
    ///     "page_size = 4096\n\
    ///      heap:4K:1M:0x5a00_0000_0000   # the heap\n\
    ///      log:0x101000:64K:0x5a00_4000_0000:on-map\n",
    /// )
    /// .unwrap();
    /// assert_eq!(map.get("log").unwrap().len, 65536);
    /// assert_eq!(rvm_loader::LoadMap::from_spec(&map.to_string()).unwrap(), map);
    /// ```
    pub fn from_spec(text: &str) -> Result<LoadMap> {
        let mut b = Builder::default();
        for (i, line) in text.lines().enumerate() {
            b.item(line, i + 1)?;
        }
        b.build()
    }

    /// Parses and validates a load map given as separate items, such as
    /// command-line arguments: each is a region (`name:offset:length:base[:copy]`)
    /// or a setting (`page_size=N`, `header_len=N`). Errors give the item's
    /// position (from 1) as the line.
    pub fn from_region_specs<I, S>(items: I) -> Result<LoadMap>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut b = Builder::default();
        for (i, item) in items.into_iter().enumerate() {
            b.item(item.as_ref(), i + 1)?;
        }
        b.build()
    }
}

impl FromStr for LoadMap {
    type Err = LoaderError;
    fn from_str(s: &str) -> Result<Self> {
        LoadMap::from_spec(s)
    }
}

impl FromStr for RegionSpec {
    type Err = LoaderError;
    /// Parses `name:offset:length:base[:copy]` (not validated: see
    /// [`LoadMap::validate`]).
    fn from_str(s: &str) -> Result<Self> {
        parse_region(s.trim(), 1)
    }
}

impl fmt::Display for RegionSpec {
    /// `name:offset:length:base:copy[:max]`, numbers in hex (the maximum
    /// only for a region that can grow).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:#x}:{:#x}:{:#x}:{}", self.name, self.offset, self.len, self.base, copy_mode_name(self.copy))?;
        if self.max_len > self.len {
            write!(f, ":{:#x}", self.max_len)?;
        }
        Ok(())
    }
}

impl fmt::Display for LoadMap {
    /// The text form (parsable by [`LoadMap::from_spec`]); with `{:#}`, a
    /// table for people.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.regions().len();
        if f.alternate() {
            writeln!(
                f,
                "load map (format {FORMAT_VERSION}): page size {:#x}, header {:#x} bytes, {n} region(s), room for {}",
                self.page_size(),
                self.header_len(),
                self.capacity()
            )?;
            let rows: Vec<[String; 6]> = self
                .regions()
                .iter()
                .map(|r| {
                    [
                        r.name.clone(),
                        format!("[{:#x}, {:#x})", r.offset, r.offset.saturating_add(r.len)),
                        format!("{:#x}", r.len),
                        format!("[{:#x}, {:#x})", r.base, r.base.saturating_add(r.len)),
                        copy_mode_name(r.copy).to_owned(),
                        if r.max_len > r.len { format!("{:#x}", r.base.saturating_add(r.max_len)) } else { "-".into() },
                    ]
                })
                .collect();
            let head = ["name", "segment range", "length", "address range", "copy", "reserved to"].map(String::from);
            let mut width = head.clone().map(|h| h.len());
            for row in &rows {
                for (w, c) in width.iter_mut().zip(row) {
                    *w = (*w).max(c.len());
                }
            }
            for row in std::iter::once(&head).chain(&rows) {
                let cells: Vec<String> = row.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
                writeln!(f, "  {}", cells.join("  ").trim_end())?;
            }
            return Ok(());
        }
        writeln!(f, "# rvm load map (format {FORMAT_VERSION}): {n} region(s), room for {}", self.capacity())?;
        writeln!(f, "page_size = {:#x}", self.page_size())?;
        writeln!(f, "header_len = {:#x}", self.header_len())?;
        writeln!(f, "# name:offset:length:base:copy[:max]")?;
        for r in self.regions() {
            writeln!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number("4096"), Ok(4096));
        assert_eq!(parse_number("0x1000"), Ok(4096));
        assert_eq!(parse_number("0x5a00_0000_0000"), Ok(0x5a00_0000_0000));
        assert_eq!(parse_number("4K"), Ok(4096));
        assert_eq!(parse_number("1GiB"), Ok(1 << 30));
        assert_eq!(parse_number(" 2m "), Ok(2 << 20));
        assert_eq!(parse_number("0x10k"), Ok(16 << 10));
        assert!(parse_number("").is_err());
        assert!(parse_number("0x").is_err());
        assert!(parse_number("K").is_err());
        assert!(parse_number("12q").is_err());
        assert!(parse_number("-1").is_err());
        assert!(parse_number("16777216T").is_err());
        assert!(parse_number("99999999999999999999").is_err());
    }

    #[test]
    fn spec_round_trips_through_display() {
        let m = LoadMap::from_spec(
            "page_size=4096\nheader_len=8K\na:8K:4K:0x10000000\nb:12K:8K:0x20000000:on-map\nc:20K:4K:0x30000000:none\n",
        )
        .unwrap();
        assert_eq!(m.header_len(), 8192);
        assert_eq!(m.regions().len(), 3);
        assert_eq!(m.get("c").unwrap().copy, CopyMode::NoCopy);
        assert_eq!(LoadMap::from_spec(&m.to_string()).unwrap(), m);
        let table = format!("{m:#}");
        assert!(table.contains("[0x20000000, 0x20002000)"), "{table}");
        let args = ["page_size=4096", "a:8K:4K:0x10000000"];
        let m2 = LoadMap::from_region_specs(args).unwrap();
        assert_eq!(m2.header_len(), 4096);
    }

    #[test]
    fn spec_errors_name_the_line() {
        let e = LoadMap::from_spec("page_size=4096\n\na:8K:4K\n").unwrap_err();
        assert!(matches!(e, LoaderError::Spec { line: 3, .. }), "{e}");
        let e = LoadMap::from_spec("a:8K:4K:0x10000000:sometimes").unwrap_err();
        assert!(matches!(e, LoaderError::Spec { line: 1, .. }), "{e}");
        let e = LoadMap::from_spec("colour = 3").unwrap_err();
        assert!(matches!(e, LoaderError::Spec { line: 1, .. }), "{e}");
        let e = LoadMap::from_spec("page_size=4096\npage_size=8192").unwrap_err();
        assert!(matches!(e, LoaderError::Spec { line: 2, .. }), "{e}");
        let e = LoadMap::from_spec("page_size=4096\na:0:4K:0x10000000").unwrap_err();
        assert!(matches!(e, LoaderError::InvalidMap { .. }), "{e}");
    }
}
