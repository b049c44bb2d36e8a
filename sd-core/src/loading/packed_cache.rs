//! Packed bf16 weights kept on disk between loads (`SD_WEIGHT_CACHE=DIR`).
//!
//! A bf16 load on the packed kernels spends most of its time making the packed weights: for SD
//! 2.1 about 3.4 GB of fresh memory (page faults, and the kernel zeroing every page), the
//! rounding to bf16 and the Winograd filter transform. The result depends only on the weight
//! files and on how this build packs, so with a cache folder set, the first load of a component
//! writes what it packed to `DIR/<model>-<component>-<key>.sdpack`, and later loads map that
//! file and read the packed weights in place: nothing is packed and no fresh memory is taken;
//! the pages come from the page cache on first use, as torch's mapped weights do.
//!
//! The first load packs straight into the file: each operand's bytes are allocated in the file
//! (`fallocate`, so that a full disk is an error here and not a SIGBUS later) and mapped
//! writable, and the packers fill that map ([`packed::packing_into`]). The packed weights are
//! then page cache from the start and nothing is copied: on a 2-core Zen 4 VM, SD 2.1's first
//! load took 4.0-5.4 s (1.8-2.3 s without the cache), where packing on the heap and copying into
//! the file had taken 6.8-11.6 s. Where the file system cannot allocate (or off Linux), operands
//! are packed on the heap and copied in.
//!
//! The key (hashed into the file name, and kept whole inside the file, where it is checked) is
//! everything the packed bytes depend on: this format, the sd-core version, the packed kernel,
//! whether Winograd is on, and each weight file's path, size, modification time and inode. A
//! file that does not validate is ignored and written again. A file is written without a name
//! (`O_TMPFILE`; elsewhere under a temporary one), flushed to disk and then named, so no reader
//! sees a partial one, a crash leaves no named file that is not whole, and (on Linux) an
//! interrupted load leaves nothing. The bytes of a valid file are trusted as they are: a
//! checksum would read all 3.4 GB at every load, which is what the cache saves. A file that
//! lacks some weights a load packs is removed after that load, so that the next one writes it
//! whole. A cache that cannot be read or written, or that would leave its disk with less than 2
//! GiB free, never fails a load: it is reported on stderr (once per folder) and the weights are
//! packed as without it. Old files are never deleted: the folder can be emptied at any time.
//!
//! File layout: the magic `SDPACK01`; the packed operands, each at a 4 KiB-aligned offset; a
//! JSON index `{"key": .., "entries": {name: [offset, outer, k]}}`; the index's offset and
//! length (u64, little-endian); the magic again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpu::packed::{self, Packed};

const MAGIC: &[u8; 8] = b"SDPACK01";
/// The version of what the files hold, in their key: bump it with any change to the packed
/// layouts (`cpu::packed`), to Winograd's filter transform or to this file's layout (a test pins
/// the first two), so that no file of the old one is read as the new.
const FORMAT: u32 = 1;
/// Offsets of packed operands: whole pages, so each one maps aligned.
const ALIGN: u64 = 4096;
/// Index offset, index length, magic.
const TRAILER: usize = 24;

/// The folder packed bf16 weights are kept in: the one `SD_WEIGHT_CACHE` names where it is set
/// (empty, `0` or `off`: none), else the process' default ([`set_default_cache_dir`]), which is
/// none unless a front end sets one (sd-cli does: [`user_cache_dir`]).
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SD_WEIGHT_CACHE") {
        Some(v) if v.is_empty() || v == "0" || v.eq_ignore_ascii_case("off") => None,
        Some(v) => Some(PathBuf::from(v)),
        None => DEFAULT_DIR.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}

static DEFAULT_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Sets the folder [`cache_dir`] gives where `SD_WEIGHT_CACHE` is not set.
pub fn set_default_cache_dir(dir: Option<PathBuf>) {
    *DEFAULT_DIR.lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// `$XDG_CACHE_HOME/sd-rs/packed`, else `~/.cache/sd-rs/packed` (`None` without a home).
pub fn user_cache_dir() -> Option<PathBuf> {
    Some(super::sd_rs_cache_dir()?.join("packed"))
}

#[derive(Serialize, Deserialize)]
pub(super) struct Index {
    key: String,
    /// Operand name -> (byte offset, outer, k).
    entries: HashMap<String, (u64, usize, usize)>,
}

/// The cache file of one component while it is being built.
pub(super) enum PackedCache {
    /// A valid file for this key: operands are read in place. `missing` counts the weights the
    /// build asked for that it lacks.
    Reading { map: Arc<memmap2::Mmap>, index: Index, path: PathBuf, missing: usize },
    /// No valid file yet: operands are packed into (or copied into) a new file, named `path` by
    /// [`PackedCache::finish`].
    Writing(Writer),
}

pub(super) struct Writer {
    path: PathBuf,
    /// The file's temporary name; `None` where it has none until it is complete (`O_TMPFILE`).
    tmp: Option<PathBuf>,
    file: File,
    /// The end of what is allocated or written so far.
    pos: u64,
    index: Index,
    /// Where each region handed out for packing starts in the file, by its address.
    regions: HashMap<usize, u64>,
    /// Set once the file system refused a region: the rest is packed on the heap and copied.
    no_regions: bool,
    /// The free space the file must leave on its file system ([`min_free`]).
    min_free: u64,
    /// The first write error; the file is then dropped at the end.
    failed: Option<std::io::Error>,
}

impl PackedCache {
    /// The cache file in `dir` for the component in `component_dir` made of `weight_files`:
    /// read where a valid one exists, else started. `None` (said on stderr) where the folder or
    /// the weight files cannot be read or the file cannot be created.
    pub(super) fn open(dir: &Path, component_dir: &Path, weight_files: &[PathBuf]) -> Option<Self> {
        let key = match cache_key(weight_files) {
            Ok(key) => key,
            Err(e) => return warn(dir, &format!("cannot read the weight files' metadata: {e}")),
        };
        let path = dir.join(file_name(component_dir, &key));
        match read_index(&path, &key) {
            Ok(Some((map, index))) => {
                return Some(PackedCache::Reading { map, index, path, missing: 0 });
            }
            Ok(None) => {}
            Err(why) => {
                eprintln!("sd-core: ignoring {}: {why}; packing the weights again", path.display())
            }
        }
        let tmp = path.with_extension(format!("sdpack.tmp{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(dir) {
            return warn(dir, &format!("cannot create it: {e}"));
        }
        let file = create_unnamed(dir, &tmp).and_then(|(mut file, tmp)| {
            if let Err(e) = file.write_all(MAGIC) {
                if let Some(tmp) = &tmp {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
            Ok((file, tmp))
        });
        match file {
            Ok((file, tmp)) => Some(PackedCache::Writing(Writer {
                path,
                tmp,
                file,
                pos: MAGIC.len() as u64,
                index: Index { key, entries: HashMap::new() },
                regions: HashMap::new(),
                no_regions: !packs_in_place(),
                min_free: min_free(),
                failed: None,
            })),
            Err(e) => warn(dir, &format!("cannot write in it: {e}")),
        }
    }

    /// Operand `name` (`outer` by `k`), if this is a file being read that holds it.
    fn get(&self, name: &str, outer: usize, k: usize) -> Option<Packed> {
        let PackedCache::Reading { map, index, .. } = self else { return None };
        let &(offset, o, kk) = index.entries.get(name)?;
        if (o, kk) != (outer, k) {
            return None;
        }
        Packed::mapped(map, usize::try_from(offset).ok()?, outer, k)
    }

    /// Records operand `name`, if this is a file being written: where it was packed in the file,
    /// or else copied in.
    fn put(&mut self, name: &str, operand: &Packed) {
        let PackedCache::Writing(w) = self else { return };
        if w.failed.is_some() {
            return;
        }
        let bytes = operand.as_bytes();
        let offset = match w.regions.remove(&(bytes.as_ptr() as usize)) {
            Some(offset) => offset,
            None => {
                let offset = w.pos.next_multiple_of(ALIGN);
                let written =
                    w.check_room(bytes.len()).and_then(|_| write_at(&mut w.file, offset, bytes));
                if let Err(e) = written {
                    w.failed = Some(e);
                    return;
                }
                w.pos = offset + bytes.len() as u64;
                offset
            }
        };
        w.index.entries.insert(name.to_string(), (offset, operand.outer, operand.k));
    }

    /// Ends the build: a file being written gets its index and its name where the build
    /// succeeded (`built`) and every write did; otherwise the temporary file is removed. A file
    /// read that lacked weights (written by a build that packed other layers) is removed, so
    /// that the next load writes a whole one.
    pub(super) fn finish(self, built: bool) {
        let mut w = match self {
            PackedCache::Writing(w) => w,
            PackedCache::Reading { path, missing, .. } => {
                if missing > 0 {
                    eprintln!(
                        "sd-core: {} lacks {missing} packed weights (they were packed again); \
                         removing it so that the next load writes a whole one",
                        path.display()
                    );
                    let _ = std::fs::remove_file(&path);
                }
                return;
            }
        };
        let result = match w.failed.take() {
            Some(e) => Err(e),
            None if !built || w.index.entries.is_empty() => Ok(false),
            None => w.write_index().and_then(|_| w.flush_and_name()).map(|_| true),
        };
        match result {
            Ok(true) => {}
            Ok(false) => w.remove(),
            Err(e) => {
                w.remove();
                eprintln!("sd-core: could not write {}: {e}", w.path.display());
            }
        }
    }
}

impl Writer {
    /// `bytes` of the file, allocated and mapped writable, for one operand to be packed into;
    /// `None` (the operand is then packed on the heap and copied in by [`PackedCache::put`])
    /// where the file system cannot allocate.
    fn region(&mut self, bytes: usize) -> Option<packed::Region> {
        if self.no_regions || self.failed.is_some() {
            return None;
        }
        if let Err(e) = self.check_room(bytes) {
            self.failed = Some(e);
            return None;
        }
        let offset = self.pos.next_multiple_of(ALIGN);
        match map_region(&self.file, offset, bytes) {
            Ok(region) => {
                self.pos = offset + bytes as u64;
                self.regions.insert(region.ptr as usize, offset);
                Some(region)
            }
            // No room (disk or quota): copying would fail the same way.
            Err(e) if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) => {
                self.failed = Some(e);
                None
            }
            Err(_) => {
                self.no_regions = true;
                None
            }
        }
    }

    /// An error where writing `bytes` more would leave less than `min_free` free: the cache
    /// gives up rather than fill the disk.
    fn check_room(&self, bytes: usize) -> std::io::Result<()> {
        match free_space(&self.file) {
            Some(free) if free < self.min_free.saturating_add(bytes as u64) => {
                Err(std::io::Error::other(format!(
                    "the disk would be left with less than {} MiB free",
                    self.min_free >> 20
                )))
            }
            _ => Ok(()),
        }
    }

    /// Writes the index and trailer.
    fn write_index(&mut self) -> std::io::Result<()> {
        let mut tail = serde_json::to_vec(&self.index).map_err(std::io::Error::other)?;
        let len = tail.len() as u64;
        tail.extend(self.pos.to_le_bytes());
        tail.extend(len.to_le_bytes());
        tail.extend(MAGIC);
        write_at(&mut self.file, self.pos, &tail)
    }

    /// Flushes the file to disk, then gives it its name: the packed bytes must be on disk before
    /// the name is, or a crash could leave a named file of zeros.
    fn flush_and_name(&self) -> std::io::Result<()> {
        self.file.sync_all()?;
        match &self.tmp {
            Some(tmp) => std::fs::rename(tmp, &self.path)?,
            None => link_unnamed(&self.file, &self.path)?,
        }
        if let Some(dir) = self.path.parent() {
            // The name itself, on disk (where the platform lets a folder be opened).
            let _ = File::open(dir).and_then(|dir| dir.sync_all());
        }
        Ok(())
    }

    /// Drops the file: an unnamed one goes with its descriptor.
    fn remove(&self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A new file for a writer to fill: on Linux an unnamed one in `dir` (`O_TMPFILE`), which
/// vanishes if the process dies before naming it (an interrupted first load leaves no gigabytes
/// behind); else, or where the file system has no unnamed files, `tmp` (returned).
fn create_unnamed(dir: &Path, tmp: &Path) -> std::io::Result<(File, Option<PathBuf>)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let unnamed =
            File::options().read(true).write(true).custom_flags(libc::O_TMPFILE).open(dir);
        if let Ok(file) = unnamed {
            return Ok((file, None));
        }
    }
    let file = File::options().read(true).write(true).create(true).truncate(true).open(tmp)?;
    Ok((file, Some(tmp.to_path_buf())))
}

/// Gives the unnamed `file` the name `path`, replacing a file there.
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, path: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let target = CString::new(path.as_os_str().as_bytes())?;
    let link = || {
        // Safety: both are NUL-terminated paths that outlive the call.
        let done = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                source.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if done == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match link() {
        // A stale or broken file of that name (a valid one would have been read, not written),
        // or one another process wrote meanwhile from the same weights: either may go.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            link()
        }
        done => done,
    }
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_: &File, _: &Path) -> std::io::Result<()> {
    unreachable!("unnamed files are only made on Linux")
}

/// Whether a writer asks for regions to pack into (else it packs on the heap and copies, as
/// where the file system cannot allocate).
fn packs_in_place() -> bool {
    #[cfg(test)]
    if tests::COPY_ONLY.with(|c| c.get()) {
        return false;
    }
    true
}

/// The free space a cache file must leave on its file system: 2 GiB.
fn min_free() -> u64 {
    #[cfg(test)]
    if let Some(min_free) = tests::MIN_FREE.with(|m| m.get()) {
        return min_free;
    }
    2 << 30
}

/// The bytes free to unprivileged users on `file`'s file system, where the platform says.
#[cfg(unix)]
fn free_space(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // Safety: `stat` is written by the call where it returns 0.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u64 on Linux).
    #[allow(clippy::useless_conversion)]
    let (blocks, block_size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(block_size))
}

#[cfg(not(unix))]
fn free_space(_: &File) -> Option<u64> {
    None
}

fn write_at(file: &mut File, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}

/// `len` bytes of `file` at `offset` (page-aligned), allocated on disk and mapped writable.
/// Allocating first matters: a write through a map to a block the file system cannot allocate
/// (a full disk) is a SIGBUS, not an error.
fn map_region(file: &File, offset: u64, len: usize) -> std::io::Result<packed::Region> {
    allocate(file, offset, len as u64)?;
    // The file is this writer's own temporary file, which nothing else truncates (the packers
    // are what writes the map); the map lives as long as the operand packed into it.
    let map = memmap2::MmapOptions::new().offset(offset).len(len).map_raw(file)?;
    let ptr = map.as_mut_ptr();
    Ok(packed::Region { owner: Arc::new(map), ptr, len })
}

#[cfg(target_os = "linux")]
fn allocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (offset, len) = (offset as libc::off_t, len as libc::off_t);
    // Safety: a plain system call on an open descriptor; mode 0 allocates and extends the file.
    match unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn allocate(_: &File, _: u64, _: u64) -> std::io::Result<()> {
    Err(ErrorKind::Unsupported.into())
}

/// Says once per folder and process (not once per component) why the cache is not used.
fn warn(dir: &Path, why: &str) -> Option<PackedCache> {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned.iter().any(|d| d == dir) {
        warned.push(dir.to_path_buf());
        eprintln!("sd-core: weight cache {}: {why}; loading without it", dir.display());
    }
    None
}

/// What the packed bytes depend on, in words.
fn cache_key(weight_files: &[PathBuf]) -> std::io::Result<String> {
    let kernel = packed::kernel().map_or("none", |k| k.name());
    let mut key = format!(
        "sdpack {FORMAT}, sd-core {}, kernel {kernel}, winograd {}",
        env!("CARGO_PKG_VERSION"),
        crate::nn::winograd::enabled()
    );
    for path in weight_files {
        let meta = std::fs::metadata(path)?;
        let path = std::fs::canonicalize(path)?;
        key += &format!("; {} {} bytes, {}", path.display(), meta.len(), file_identity(&meta));
    }
    Ok(key)
}

/// A file's modification time and inode: a file rewritten, or replaced by another of the same
/// size, changes one of them.
#[cfg(unix)]
fn file_identity(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("mtime {}.{:09}, inode {}", meta.mtime(), meta.mtime_nsec(), meta.ino())
}

#[cfg(not(unix))]
fn file_identity(meta: &std::fs::Metadata) -> String {
    format!("modified {:?}", meta.modified().ok())
}

/// `<model>-<component>-<16 hex digits of the key's hash>.sdpack`, the folder names reduced to
/// characters any file system takes.
fn file_name(component_dir: &Path, key: &str) -> String {
    let name_of = |p: Option<&Path>| {
        let name = p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
            .collect::<String>()
    };
    let hash = Sha256::digest(key.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{hex}.sdpack", name_of(component_dir.parent()), name_of(Some(component_dir)))
}

/// The map and index of the cache file at `path`: `Ok(None)` where there is none, `Err` (why)
/// where it does not validate for `key`.
fn read_index(path: &Path, key: &str) -> Result<Option<(Arc<memmap2::Mmap>, Index)>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        // No file there, or a folder that is not one (said when the file cannot be written).
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            return Ok(None)
        }
        Err(e) => return Err(e.to_string()),
    };
    // Safety: the map is read-only; cache files are only ever renamed into place, never written
    // again, so nothing truncates one while it is mapped (unless someone does so by hand).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let len = map.len();
    if len < MAGIC.len() + TRAILER || &map[..8] != MAGIC || &map[len - 8..] != MAGIC {
        return Err("not a packed-weight file, or a truncated one".into());
    }
    let word = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().unwrap());
    let (offset, size) = (word(len - TRAILER), word(len - TRAILER + 8));
    let index_end = offset.checked_add(size).filter(|&end| end == (len - TRAILER) as u64);
    let Some(index_end) = index_end else { return Err("its index is out of bounds".into()) };
    let index: Index = serde_json::from_slice(&map[offset as usize..index_end as usize])
        .map_err(|e| format!("its index does not parse: {e}"))?;
    if index.key != key {
        return Err("it was written for other weights or settings (its key differs)".into());
    }
    for (name, &(at, outer, k)) in &index.entries {
        let end = at.checked_add(2 * packed::packed_len(outer, k) as u64);
        if !at.is_multiple_of(ALIGN) || end.is_none_or(|end| end > offset) {
            return Err(format!("entry `{name}` is out of bounds"));
        }
    }
    Ok(Some((Arc::new(map), index)))
}

thread_local! {
    /// The cache of the component [`super::build_component`] is building on this thread.
    static CACHE: RefCell<Option<PackedCache>> = const { RefCell::new(None) };
}

/// Runs `f` with `cache` as this thread's cache, and hands the cache back.
pub(super) fn with_cache<R>(
    cache: Option<PackedCache>,
    f: impl FnOnce() -> R,
) -> (R, Option<PackedCache>) {
    struct Restore(Option<PackedCache>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CACHE.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let restore = Restore(CACHE.with(|c| std::mem::replace(&mut *c.borrow_mut(), cache)));
    let result = f();
    let cache = CACHE.with(|c| c.borrow_mut().take());
    drop(restore);
    (result, cache)
}

/// How a layer packs a weight: `operands` of `outer` by `k`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PackedForm {
    pub operands: usize,
    pub outer: usize,
    pub k: usize,
}

/// The packed operands of the loader's weight `name` (full name) in `form`, read in place from
/// the cache of the component being built on this thread, where it holds them.
pub(crate) fn cached_operands(name: &str, form: PackedForm) -> Option<Vec<Packed>> {
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        let cache = cache.as_mut()?;
        let found: Option<Vec<Packed>> = (0..form.operands)
            .map(|j| cache.get(&operand_name(name, form.operands, j), form.outer, form.k))
            .collect();
        if let (None, PackedCache::Reading { missing, .. }) = (&found, cache) {
            *missing += 1;
        }
        found
    })
}

/// The cache's name for operand `j` of the `count` of weight `name`.
fn operand_name(name: &str, count: usize, j: usize) -> String {
    if count == 1 {
        name.to_string()
    } else {
        format!("{name}#{j}")
    }
}

/// `pack()`'s operands, also written to the cache being written on this thread (if any) as
/// those of the loader's weight `name`; with no name (a weight made in code, such as a fused
/// LoRA), only `pack()`.
pub(crate) fn pack_into_cache<const N: usize>(
    name: Option<&str>,
    pack: impl FnOnce() -> [Packed; N],
) -> [Packed; N] {
    let writing = CACHE.with(|c| matches!(&*c.borrow(), Some(PackedCache::Writing(_))));
    let Some(name) = name.filter(|_| writing) else { return pack() };
    let region = |bytes| {
        CACHE.with(|c| match c.borrow_mut().as_mut() {
            Some(PackedCache::Writing(w)) => w.region(bytes),
            _ => None,
        })
    };
    let packed = packed::packing_into(region, pack);
    CACHE.with(|c| {
        if let Some(cache) = c.borrow_mut().as_mut() {
            for (j, p) in packed.iter().enumerate() {
                cache.put(&operand_name(name, N, j), p);
            }
        }
    });
    packed
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::cpu::test_values::values;
    use crate::loading::{build_component_cached, WeightStore};
    use crate::nn::{conv2d, linear, Conv2dConfig};

    thread_local! {
        /// [`min_free`] for the caches this test thread writes.
        pub(super) static MIN_FREE: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
        /// Caches written on this test thread copy the packed operands in ([`packs_in_place`]).
        pub(super) static COPY_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Writes (by rename, as a new file) a weight file with a linear layer `lin` (`[64, 96]`), a
    /// 3x3 stride-1 convolution `conv` (`[40, 24, 3, 3]`, Winograd's) and a stride-2 one `down`
    /// (`[16, 24, 3, 3]`, im2col's), their values drawn from `seed`, stored as `dtype` (f32
    /// weights are packed from the map, others from tensors).
    fn weight_file(dir: &Path, seed: u32, dtype: DType) -> PathBuf {
        let t = |dims: &[usize], s| {
            let v = values(dims.iter().product(), seed * 10 + s);
            Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
        };
        let tensors = [
            ("lin.weight", t(&[64, 96], 1)),
            ("lin.bias", t(&[64], 2)),
            ("conv.weight", t(&[40, 24, 3, 3], 3)),
            ("conv.bias", t(&[40], 4)),
            ("down.weight", t(&[16, 24, 3, 3], 5)),
            ("down.bias", t(&[16], 6)),
        ];
        let (tmp, path) = (dir.join("new.safetensors"), dir.join("model.safetensors"));
        candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    type Layers = (crate::nn::Linear, crate::nn::Conv2d, crate::nn::Conv2d);

    /// The three layers built in bf16 (through the cache in `cache`, if any).
    fn layers(weights: &Path, cache: Option<&Path>) -> Layers {
        let store = WeightStore::open(&[weights.to_path_buf()]).unwrap();
        let build = |vb: VarBuilder| {
            let (same, down) =
                (Conv2dConfig { padding: 1, stride: 1 }, Conv2dConfig { padding: 1, stride: 2 });
            Ok((
                linear(96, 64, vb.pp("lin"))?,
                conv2d(24, 40, 3, same, vb.pp("conv"))?,
                conv2d(24, 16, 3, down, vb.pp("down"))?,
            ))
        };
        let dir = weights.parent().unwrap();
        build_component_cached(dir, store, DType::BF16, &Device::Cpu, cache, build).unwrap()
    }

    /// The layers run on fixed inputs: their outputs, flattened.
    fn run((lin, conv, down): &Layers) -> Vec<f32> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(3 * 96, 7), (3, 96), &dev).unwrap();
        let img = Tensor::from_vec(values(2 * 24 * 8 * 8, 8), (2, 24, 8, 8), &dev).unwrap();
        let outs = [lin.forward(&x), conv.forward(&img), down.forward(&img)];
        outs.iter()
            .flat_map(|o| o.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    fn outputs(weights: &Path, cache: Option<&Path>) -> Vec<f32> {
        run(&layers(weights, cache))
    }

    fn cache_files(cache: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(cache).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    /// A weight file (seed 1, stored as `stored`) in a folder of its own, an empty cache folder,
    /// and the layers' outputs without a cache.
    fn fixture(stored: DType) -> (tempfile::TempDir, tempfile::TempDir, PathBuf, Vec<f32>) {
        let (models, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let weights = weight_file(models.path(), 1, stored);
        let reference = outputs(&weights, None);
        (models, cache, weights, reference)
    }

    fn packed_kernels() -> bool {
        if !packed::available() {
            eprintln!("skipped: the packed bf16 GEMM needs AMX or AVX512_BF16");
        }
        packed::available()
    }

    /// The first load writes one file of the component's packed weights and gives the same
    /// layers as a load without the cache; the next loads read that file in place (changing
    /// its bytes changes the layers) and do not write it again. Weights stored as f32 (packed
    /// from the map) and as f16 (packed from tensors) alike.
    #[test]
    fn later_loads_read_the_packed_weights_in_place() {
        if !packed_kernels() {
            return;
        }
        for stored in [DType::F32, DType::F16] {
            later_loads_read_in_place(stored);
        }
        // Written by copying (where the file system cannot allocate): the same file.
        COPY_ONLY.with(|c| c.set(true));
        later_loads_read_in_place(DType::F16);
        COPY_ONLY.with(|c| c.set(false));
    }

    fn later_loads_read_in_place(stored: DType) {
        let (models, cache, weights, reference) = fixture(stored);

        assert_eq!(outputs(&weights, Some(cache.path())), reference);
        let files = cache_files(cache.path());
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        let model = models.path().parent().unwrap().file_name().unwrap().to_string_lossy();
        assert!(name.starts_with(&format!("{model}-")) && name.ends_with(".sdpack"), "{name}");
        let written = std::fs::metadata(&files[0]).unwrap().modified().unwrap();

        assert_eq!(outputs(&weights, Some(cache.path())), reference);
        assert_eq!(cache_files(cache.path()), files);
        assert_eq!(std::fs::metadata(&files[0]).unwrap().modified().unwrap(), written);

        // The first packed operand starts at 4 KiB: make it all ones (bf16 0x3f80).
        let mut bytes = std::fs::read(&files[0]).unwrap();
        for pair in bytes[4096..8192].chunks_mut(2) {
            pair.copy_from_slice(&[0x80, 0x3f]);
        }
        std::fs::write(&files[0], &bytes).unwrap();
        assert_ne!(outputs(&weights, Some(cache.path())), reference, "{stored:?}");
    }

    /// The load that writes the file packs into it (the file's pages are its weights), and it
    /// leaves nothing but the finished file: no temporary file after a build, and nothing at all
    /// after a build that fails or a disk too full to take the file.
    #[test]
    fn the_first_load_packs_into_the_file_and_leaves_nothing_else() {
        if !packed_kernels() {
            return;
        }
        let (_models, cache, weights, reference) = fixture(DType::F16);

        let first = layers(&weights, Some(cache.path()));
        assert_eq!(run(&first), reference);
        let files = cache_files(cache.path());
        assert_eq!(files.len(), 1, "{files:?}");
        if cfg!(target_os = "linux") {
            // Rewrite the first operand in place: the first load's own layers see it.
            let mut file = File::options().write(true).open(&files[0]).unwrap();
            write_at(&mut file, ALIGN, &[0x3f; ALIGN as usize]).unwrap();
            assert_ne!(run(&first), reference, "the first load's weights are the file's pages");
        }
        drop(first);
        std::fs::remove_file(&files[0]).unwrap();

        let store = WeightStore::open(std::slice::from_ref(&weights)).unwrap();
        let failing = |vb: VarBuilder| {
            linear(96, 64, vb.pp("lin"))?;
            Err::<(), _>(candle_core::Error::Msg("a later layer fails".into()))
        };
        let dir = weights.parent().unwrap();
        let built = build_component_cached(
            dir,
            store,
            DType::BF16,
            &Device::Cpu,
            Some(cache.path()),
            failing,
        );
        assert!(built.is_err());
        assert_eq!(cache_files(cache.path()), Vec::<PathBuf>::new(), "a failed build");

        MIN_FREE.with(|m| m.set(Some(u64::MAX / 2)));
        assert_eq!(outputs(&weights, Some(cache.path())), reference);
        MIN_FREE.with(|m| m.set(None));
        assert_eq!(cache_files(cache.path()), Vec::<PathBuf>::new(), "a disk too full");
        assert_eq!(outputs(&weights, Some(cache.path())), reference);
        assert_eq!(cache_files(cache.path()).len(), 1, "with room, the file is written");
    }

    /// What the files hold: the packed layouts and Winograd's filter transform, pinned by a
    /// hash. If this fails, the layout changed: bump `FORMAT` (old files must not be read as the
    /// new layout), then update the hash.
    #[test]
    fn the_packed_layouts_are_the_ones_the_format_names() {
        let w = values(40 * 70, 3);
        let mut hash = Sha256::new();
        hash.update(Packed::a_from_rows(&w, 40, 70).as_bytes());
        hash.update(Packed::b_from_transposed(&w, 40, 70).as_bytes());
        let filters = crate::nn::winograd::PackedFilters::new(&values(40 * 24 * 9, 4), 40, 24);
        for u in filters.into_operands() {
            hash.update(u.as_bytes());
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (FORMAT, hex.as_str()),
            (1, "7497992598b43987ba60b474352348fcdf6b30bb8c4a92e06989c7ad4f33ea66"),
            "the packed layout changed: bump FORMAT, then update this hash"
        );
    }

    /// New weights (another file under the same name) get a file of their own; a truncated
    /// or foreign file is ignored and written again; a file that lacks weights is removed after
    /// use, and written whole at the next load; an unusable cache folder only costs the cache.
    /// The layers are right in every case.
    #[test]
    fn stale_broken_or_unwritable_caches_load_the_weights_as_without_one() {
        if !packed_kernels() {
            return;
        }
        let (models, cache, weights, first) = fixture(DType::F32);
        assert_eq!(outputs(&weights, Some(cache.path())), first);

        let weights = weight_file(models.path(), 2, DType::F32);
        let second = outputs(&weights, None);
        assert_ne!(second, first);
        assert_eq!(outputs(&weights, Some(cache.path())), second);
        let files = cache_files(cache.path());
        assert_eq!(files.len(), 2, "{files:?}");

        for broken in [&b"SDPACK01 and then nothing"[..], &b"not a cache file at all"[..]] {
            for file in &files {
                std::fs::write(file, broken).unwrap();
            }
            assert_eq!(outputs(&weights, Some(cache.path())), second);
            let sizes: Vec<u64> =
                files.iter().map(|f| std::fs::metadata(f).unwrap().len()).collect();
            assert!(
                sizes.iter().any(|&s| s > 8192),
                "the current file is written again: {sizes:?}"
            );
            assert_eq!(outputs(&weights, Some(cache.path())), second);
        }

        // A file that lacks weights: written by a build of fewer layers from the same weights.
        let fresh = tempfile::tempdir().unwrap();
        let store = WeightStore::open(std::slice::from_ref(&weights)).unwrap();
        let dir = weights.parent().unwrap();
        let only_lin = |vb: VarBuilder| linear(96, 64, vb.pp("lin"));
        build_component_cached(dir, store, DType::BF16, &Device::Cpu, Some(fresh.path()), only_lin)
            .unwrap();
        let partial = cache_files(fresh.path());
        assert_eq!(partial.len(), 1);
        let partial_size = std::fs::metadata(&partial[0]).unwrap().len();
        assert_eq!(outputs(&weights, Some(fresh.path())), second);
        assert!(cache_files(fresh.path()).is_empty(), "the partial file is removed");
        assert_eq!(outputs(&weights, Some(fresh.path())), second);
        assert_eq!(cache_files(fresh.path()), partial, "the next load writes a whole one");
        assert!(std::fs::metadata(&partial[0]).unwrap().len() > partial_size);

        // A folder that cannot be made (under a plain file).
        let blocked = cache.path().join("plain-file");
        std::fs::write(&blocked, b"").unwrap();
        assert_eq!(outputs(&weights, Some(&blocked.join("cache"))), second);
    }
}
