//! Size-limited volumes: a filesystem image of a fixed size, loop-mounted at a directory,
//! so that a write past the size fails at once with `ENOSPC` and nothing outside grows.
//!
//! The image is an ext4 file made by `mkfs.ext4` (no reserved blocks, its root owned by
//! the volume's user); it is attached to a free loop device with autoclear, so the device
//! frees itself when the mount goes, and mounted `nosuid,nodev`. All of it needs root
//! ([`loop_support`] says what is missing).
//!
//! ```no_run
//! use std::path::Path;
//! use corral_core::volume;
//!
//! if volume::loop_support().is_ok() {
//!     let image = Path::new("/var/lib/app/data.img");
//!     if !image.exists() {
//!         volume::create_image(image, 64 << 20, None).unwrap();
//!     }
//!     volume::mount_image(image, Path::new("/var/lib/app/data")).unwrap();
//!     assert_eq!(volume::mounted_image(Path::new("/var/lib/app/data")).as_deref(), Some(image));
//!     volume::unmount(Path::new("/var/lib/app/data")).unwrap();
//! }
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::sys;

const LOOP_CONTROL: &str = "/dev/loop-control";
const SBIN: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// Whether this process can make and mount volumes here: `Err` says why not (not root, no
/// loop device, no `mkfs.ext4`, no ext4 in the kernel).
pub fn loop_support() -> Result<(), String> {
    let uid = sys::geteuid();
    if uid != 0 {
        return Err(format!(
            "loop-mounting an image needs root (running as uid {uid})"
        ));
    }
    if !Path::new(LOOP_CONTROL).exists() {
        return Err(format!(
            "no loop device ({LOOP_CONTROL} is missing; load the loop module)"
        ));
    }
    if tool("mkfs.ext4").is_none() {
        return Err("mkfs.ext4 is not installed (Debian's e2fsprogs package has it)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.split_whitespace().any(|w| w == "ext4") {
        return Err("the kernel has no ext4 filesystem".into());
    }
    Ok(())
}

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(name: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let program = tool(name).ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{name} is not installed"))
    })?;
    let out = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
    // e2fsck exits 1 when it fixed something: the filesystem is sound then.
    if out.status.success() || (name == "e2fsck" && out.status.code() == Some(1)) {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(io::Error::other(format!(
        "{name} failed ({}): {}",
        out.status,
        said.trim()
    )))
}

/// Makes a new image of `size` bytes at `image` (0600, sparse: it takes space as it fills)
/// holding an empty ext4 filesystem whose root belongs to `owner` (uid, gid; default the
/// caller). Refuses an existing file; removes what it made when `mkfs.ext4` fails.
pub fn create_image(image: &Path, size: u64, owner: Option<(u32, u32)>) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)?;
    let made = file.set_len(size).and_then(|()| {
        drop(file);
        let opts = match owner {
            Some((uid, gid)) => format!("root_owner={uid}:{gid},nodiscard"),
            None => "nodiscard".to_string(),
        };
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-L", "corral", "-E", &opts]
                .map(std::ffi::OsStr::new)
                .into_iter()
                .chain([image.as_os_str()])
                .collect::<Vec<_>>(),
        )
    });
    if made.is_err() {
        let _ = std::fs::remove_file(image);
    }
    made
}

/// Grows an unmounted image to `size` bytes (checked with `e2fsck`, then `resize2fs`).
/// Shrinking is refused (`InvalidInput`): the data might not fit.
pub fn grow_image(image: &Path, size: u64) -> io::Result<()> {
    let now = std::fs::metadata(image)?.len();
    if size < now {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {now} bytes; shrinking it to {size} is not done",
                image.display()
            ),
        ));
    }
    if size == now {
        return Ok(());
    }
    OpenOptions::new().write(true).open(image)?.set_len(size)?;
    let img = image.as_os_str();
    run(
        "e2fsck",
        &["-f", "-p"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([img])
            .collect::<Vec<_>>(),
    )?;
    run("resize2fs", &[img])
}

/// Attaches `image` to a free loop device and mounts it at `target` (an existing
/// directory), `nosuid,nodev`; returns the device. Nothing stays attached when the mount
/// fails.
pub fn mount_image(image: &Path, target: &Path) -> io::Result<PathBuf> {
    let ctl = File::open(LOOP_CONTROL)?;
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)?;
    let mut last = io::Error::other("no free loop device");
    for _ in 0..16 {
        let n = sys::loop_get_free(ctl.as_raw_fd())?;
        let device = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).write(true).open(&device) {
            Ok(f) => f,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match sys::loop_bind(dev.as_raw_fd(), backing.as_raw_fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last = e; // another process took it between the two calls
                continue;
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = sys::mount_block(&device, target, "ext4") {
            sys::loop_clear(dev.as_raw_fd());
            return Err(io::Error::new(
                e.kind(),
                format!("mounting {} at {}: {e}", image.display(), target.display()),
            ));
        }
        return Ok(device);
    }
    Err(last)
}

/// Unmounts `target`; when it is busy (a process still holds a file in it), detaches it
/// lazily and returns `true`: it goes once the last holder closes.
pub fn unmount(target: &Path) -> io::Result<bool> {
    match sys::unmount(target, false) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            sys::unmount(target, true).map(|()| true)
        }
        Err(e) => Err(e),
    }
}

/// Every loop-backed mount of this mount namespace: (mount point, image).
pub fn loop_mounts() -> Vec<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(point), Some(source)) = (fields.get(4), fields.get(dash + 2)) else {
            continue;
        };
        let Some(name) = source.strip_prefix("/dev/") else {
            continue;
        };
        if !name.starts_with("loop") {
            continue;
        }
        let backing = format!("/sys/block/{name}/loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(backing) {
            out.push((
                PathBuf::from(unescape(point)),
                PathBuf::from(file.trim_end_matches('\n')),
            ));
        }
    }
    out
}

/// The image mounted at `target`, if a loop-backed mount is there.
pub fn mounted_image(target: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(target).ok()?;
    loop_mounts()
        .into_iter()
        .rev()
        .find(|(p, _)| *p == target)
        .map(|(_, image)| image)
}

/// `/proc/self/mountinfo` writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
    }

    /// Unmounts and removes the test's directory however the test ends.
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = unmount(&self.0.join("mnt"));
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn an_image_fills_to_enospc_and_comes_back_mounted() {
        if loop_support().is_err() {
            eprintln!("skipped: {:?}", loop_support());
            return;
        }
        let dir = std::env::temp_dir().join(format!("corral-volume-test-{}", std::process::id()));
        let _cleanup = Cleanup(dir.clone());
        std::fs::create_dir_all(dir.join("mnt")).unwrap();
        let image = dir.join("v.img");
        let mnt = dir.join("mnt");
        create_image(&image, 4 << 20, None).unwrap();
        assert!(
            create_image(&image, 4 << 20, None).is_err(),
            "an existing image is refused"
        );
        mount_image(&image, &mnt).unwrap();
        assert_eq!(mounted_image(&mnt), Some(image.clone()));
        let err = std::fs::write(mnt.join("big"), vec![0u8; 8 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        std::fs::remove_file(mnt.join("big")).unwrap();
        std::fs::write(mnt.join("kept"), b"data").unwrap();
        assert!(!unmount(&mnt).unwrap());
        assert_eq!(mounted_image(&mnt), None);
        grow_image(&image, 8 << 20).unwrap();
        assert!(grow_image(&image, 4 << 20).is_err(), "shrinking is refused");
        mount_image(&image, &mnt).unwrap();
        assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), b"data");
        assert!(!unmount(&mnt).unwrap());
    }
}
