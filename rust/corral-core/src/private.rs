//! Owner-only files: every file and directory corral writes is created readable by its
//! owner alone (0600 / 0700), whatever the umask, and opened without following a symlink in
//! its last component, so a link planted in a state directory cannot redirect a write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and any missing parents with mode 0700 (parents that exist are left alone).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // The umask may have taken bits from the mode, never added any; set it exactly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Opens `path` for appending, creating it with mode 0600; a symlink there is refused
/// (ELOOP), and a file of ours that others could read is made 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    owner_only(&file)?;
    Ok(file)
}

/// Creates `path` anew (it must not exist: no symlink is followed) with mode 0600, for
/// writing.
pub fn create_new(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    owner_only(&file)?;
    Ok(file)
}

/// Sets `path`'s mode exactly (a socket just bound, say: its mode came from the umask).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn owner_only(file: &File) -> io::Result<()> {
    let md = file.metadata()?;
    if md.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Why `path` (not followed if a link) must not be trusted: another owner, a link, or
/// writable by others. `None` when it is a file or directory of this user that only this
/// user can write.
pub fn untrusted(path: &Path) -> io::Result<Option<String>> {
    let md = std::fs::symlink_metadata(path)?;
    let me = crate::sys::geteuid();
    Ok(if md.file_type().is_symlink() {
        Some("it is a symbolic link".to_owned())
    } else if md.uid() != me {
        Some(format!("it is owned by uid {}, not {me}", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "others can write it (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_owner_only_and_links_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        create_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        let f = d.join("x.log");
        drop(open_append(&f).unwrap());
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_append(&f).unwrap());
        assert_eq!(
            std::fs::metadata(&f).unwrap().mode() & 0o777,
            0o600,
            "widened modes are narrowed"
        );
        let target = dir.path().join("target");
        std::fs::write(&target, "").unwrap();
        let link = d.join("planted.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            open_append(&link).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        assert!(create_new(&link).is_err());
        assert!(untrusted(&link).unwrap().unwrap().contains("symbolic link"));
        assert!(untrusted(&f).unwrap().is_none());
    }
}
