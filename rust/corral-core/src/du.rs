//! Disk usage of a volume, measured as `du -sx` does, and safe on a hostile tree.
//!
//! The walk never follows a symbolic link (a link is counted as the inode it is), stays on
//! the filesystem of its root, and counts a file with several hard links once. Every
//! directory is opened relative to its parent's open handle with `O_NOFOLLOW`, so a
//! directory swapped for a link (to `/`, say) while the walk runs is refused, not entered;
//! files removed mid-walk are skipped. Its cost is bounded by `max_entries`: a tree larger
//! than that is reported `truncated`, with what was counted so far. The root's subdirectories
//! are walked on several threads (the stat calls are the cost).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// What a walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Allocated bytes (512-byte blocks, as `du` counts), every inode once.
    pub bytes: u64,
    /// Distinct inodes (files, directories, links, the root included).
    pub inodes: u64,
    /// Entries that could not be read (no permission) or that changed under the walk.
    pub skipped: u64,
    /// Directories not entered because they are on another filesystem.
    pub other_filesystems: u64,
    /// Whether the walk stopped at `max_entries` (the figures are then a lower bound).
    pub truncated: bool,
}

fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
}

/// The handle's own path: names under it resolve against the open directory itself, not
/// against whatever its old path names now.
fn under(dir: &File, name: &std::ffi::OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if !name.is_empty() {
        p.push(name);
    }
    p
}

/// One thread's walk. Files with several links are kept apart in `linked` (inode -> bytes)
/// and counted once when the threads' findings are put together.
struct Walk<'a> {
    dev: u64,
    linked: HashMap<(u64, u64), u64>,
    usage: DiskUsage,
    entries: &'a AtomicU64,
    max_entries: u64,
    /// Entries this thread took from `entries` and has not used yet (taken 1024 at a time:
    /// one shared counter touched per entry costs more than the walk on two cores).
    budget: u64,
}

impl<'a> Walk<'a> {
    fn new(dev: u64, entries: &'a AtomicU64, max_entries: u64) -> Self {
        Walk {
            dev,
            linked: HashMap::new(),
            usage: DiskUsage::default(),
            entries,
            max_entries,
            budget: 0,
        }
    }

    /// Whether one more entry may be looked at.
    fn take(&mut self) -> bool {
        if self.budget == 0 {
            let got = self.entries.fetch_add(1024, Ordering::Relaxed);
            if got >= self.max_entries {
                return false;
            }
            self.budget = (self.max_entries - got).min(1024);
        }
        self.budget -= 1;
        true
    }

    fn count(&mut self, meta: &fs::Metadata) {
        if meta.nlink() > 1 && !meta.is_dir() {
            self.linked
                .insert((meta.dev(), meta.ino()), meta.blocks() * 512);
            return;
        }
        self.usage.bytes += meta.blocks() * 512;
        self.usage.inodes += 1;
    }

    /// Counts what `dir` holds; its subdirectories are walked at once (`into` is None) or
    /// handed back, opened and counted, for other threads to walk.
    fn dir(&mut self, dir: &File, depth: u32, mut into: Option<&mut Vec<File>>) {
        let Ok(entries) = fs::read_dir(under(dir, std::ffi::OsStr::new(""))) else {
            self.usage.skipped += 1;
            return;
        };
        for entry in entries {
            if !self.take() {
                self.usage.truncated = true;
                return;
            }
            let Ok(entry) = entry else {
                self.usage.skipped += 1;
                continue;
            };
            // fstatat(AT_SYMLINK_NOFOLLOW) on the open directory: a link is not followed.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // removed mid-walk
                Err(_) => {
                    self.usage.skipped += 1;
                    continue;
                }
            };
            if !meta.is_dir() {
                self.count(&meta);
                continue;
            }
            if meta.dev() != self.dev {
                self.usage.other_filesystems += 1;
                continue;
            }
            if depth >= 4096 {
                self.usage.skipped += 1;
                continue;
            }
            match open_dir(&under(dir, &entry.file_name())) {
                Ok(child) => match child.metadata() {
                    // Still the directory that was looked at, not a link put in its place.
                    Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {
                        self.count(&m);
                        match into.as_deref_mut() {
                            Some(queue) => queue.push(child),
                            None => self.dir(&child, depth + 1, None),
                        }
                    }
                    _ => self.usage.skipped += 1,
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => self.usage.skipped += 1,
            }
        }
    }

    fn add(&mut self, other: Walk<'_>) {
        let (u, o) = (&mut self.usage, other.usage);
        u.bytes += o.bytes;
        u.inodes += o.inodes;
        u.skipped += o.skipped;
        u.other_filesystems += o.other_filesystems;
        u.truncated |= o.truncated;
        self.linked.extend(other.linked);
    }
}

/// Measures the tree at `root` (see the module docs). `root` itself must be a directory,
/// not a link to one. The root's subdirectories are shared out among up to `threads`
/// threads (each takes the next one left when it is done with its last).
pub fn disk_usage(root: &Path, max_entries: u64) -> io::Result<DiskUsage> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    disk_usage_with(root, max_entries, threads)
}

/// [`disk_usage`] with the number of threads given.
pub fn disk_usage_with(root: &Path, max_entries: u64, threads: usize) -> io::Result<DiskUsage> {
    if fs::symlink_metadata(root).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; a volume is measured only as a directory",
                root.display()
            ),
        ));
    }
    // O_NOFOLLOW as well: a link put in its place after that look is refused too.
    let dir =
        open_dir(root).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
    let meta = dir.metadata()?;
    let entries = AtomicU64::new(0);
    let mut walk = Walk::new(meta.dev(), &entries, max_entries);
    walk.count(&meta);
    let mut queue = Vec::new();
    walk.dir(&dir, 0, Some(&mut queue));
    let n = threads.clamp(1, queue.len().max(1));
    let queue = Mutex::new(queue);
    let found: Vec<Walk<'_>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut w = Walk::new(meta.dev(), &entries, max_entries);
                    loop {
                        let next = queue.lock().pop();
                        let Some(d) = next else { break };
                        w.dir(&d, 1, None);
                    }
                    w
                })
            })
            .collect();
        workers.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for w in found {
        walk.add(w);
    }
    walk.usage.bytes += walk.linked.values().sum::<u64>();
    walk.usage.inodes += walk.linked.len() as u64;
    Ok(walk.usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "corral-du-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("a/b")).unwrap();
        d
    }

    #[test]
    fn hard_links_count_once_and_links_are_not_followed() {
        let d = tree();
        fs::write(d.join("a/big"), vec![7u8; 64 * 1024]).unwrap();
        let one = disk_usage(&d, u64::MAX).unwrap();
        fs::hard_link(d.join("a/big"), d.join("a/b/again")).unwrap();
        symlink("/", d.join("a/root")).unwrap();
        symlink("../..", d.join("a/b/up")).unwrap();
        symlink("loop", d.join("loop")).unwrap();
        let two = disk_usage(&d, u64::MAX).unwrap();
        assert!(one.bytes >= 64 * 1024, "{one:?}");
        // The second name and the links add inodes (links are inodes) but not the file again.
        assert_eq!(two.inodes, one.inodes + 3, "{two:?}");
        assert!(two.bytes < one.bytes + 64 * 1024, "{one:?} {two:?}");
        assert_eq!(two.skipped, 0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_root_that_is_a_link_is_refused_and_the_walk_is_bounded() {
        let d = tree();
        for i in 0..50 {
            fs::write(d.join(format!("a/f{i}")), b"x").unwrap();
        }
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        symlink(&d, &link).unwrap();
        let err = disk_usage(&link, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let cut = disk_usage(&d, 10).unwrap();
        assert!(cut.truncated && cut.inodes <= 11, "{cut:?}");
        assert!(!disk_usage(&d, u64::MAX).unwrap().truncated);
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
