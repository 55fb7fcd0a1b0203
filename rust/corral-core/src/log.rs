//! The rotating log of a supervised process: its stdout and stderr, appended to one file
//! that rotates by size at line breaks, so no file grows past its limit and no line is
//! split unless it alone is longer than the limit. Written by the supervisor itself, or by
//! the log keeper ([`crate::keeper`]) that holds the output of an agent's instances.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

use crate::error::ProcessError;

/// Where a process's output goes: `path`, rotated to `path.1` .. `path.<keep>` past `max_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The live log file.
    pub path: PathBuf,
    /// Size at which the file rotates (0: never).
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

/// Copies `src` into `log` until end of file.
pub(crate) async fn copy_to_log(
    mut src: impl tokio::io::AsyncRead + Unpin,
    log: Arc<Mutex<RotatingLog>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => log.lock().write(&buf[..n]),
        }
    }
}

/// A log file that rotates by size: `path` -> `path.1` -> ... -> `path.<keep>`.
#[derive(Debug)]
pub struct RotatingLog {
    cfg: LogConfig,
    file: File,
    size: u64,
}

impl RotatingLog {
    /// Opens (appends to) the log file, creating its directory.
    pub fn open(cfg: &LogConfig) -> Result<Self, ProcessError> {
        let err = |source| ProcessError::Log {
            path: cfg.path.clone(),
            source,
        };
        if let Some(dir) = cfg.path.parent() {
            crate::private::create_dir(dir).map_err(err)?;
        }
        let file = crate::private::open_append(&cfg.path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(RotatingLog {
            cfg: cfg.clone(),
            file,
            size,
        })
    }

    /// Appends `data`, rotating whenever the file would pass its size limit; a chunk is split
    /// at its last line break that still fits (or hard, for a line longer than the limit), so
    /// no file grows past `max_bytes`. I/O errors are dropped: a full disk must not stop the
    /// process whose output this is.
    pub fn write(&mut self, mut data: &[u8]) {
        let max = self.cfg.max_bytes;
        while !data.is_empty() {
            let room = max.saturating_sub(self.size);
            if max == 0 || data.len() as u64 <= room {
                self.append(data);
                return;
            }
            let fits = &data[..room as usize];
            let cut = match fits.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if self.size == 0 => fits.len(),
                None => 0,
            };
            self.append(&data[..cut]);
            data = &data[cut..];
            self.rotate();
        }
    }

    fn append(&mut self, data: &[u8]) {
        if self.file.write_all(data).is_ok() {
            self.size += data.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let name = |i: usize| {
            let mut p = self.cfg.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.cfg.keep == 0 {
            let _ = self.file.set_len(0);
        } else {
            let _ = std::fs::remove_file(name(self.cfg.keep));
            for i in (1..self.cfg.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(&self.cfg.path, name(1));
        }
        if let Ok(f) = crate::private::open_append(&self.cfg.path) {
            self.file = f;
        }
        self.size = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            path: dir.path().join("a.log"),
            max_bytes: 10,
            keep: 2,
        };
        let mut log = RotatingLog::open(&cfg).unwrap();
        for chunk in [&b"aaaaaaaa"[..], b"bbbbbbbb", b"cccccccc", b"dddddddd"] {
            log.write(chunk);
        }
        let read = |s: &str| std::fs::read_to_string(dir.path().join(s)).unwrap();
        assert_eq!(read("a.log"), "dddddddd");
        assert_eq!(read("a.log.1"), "cccccccc");
        assert_eq!(read("a.log.2"), "bbbbbbbb");
        assert!(!dir.path().join("a.log.3").exists());
    }

    #[test]
    fn a_large_chunk_splits_at_line_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            path: dir.path().join("b.log"),
            max_bytes: 10,
            keep: 3,
        };
        let mut log = RotatingLog::open(&cfg).unwrap();
        log.write(b"one\ntwo\nthree\nfour-is-long-line\n");
        let read = |s: &str| std::fs::read_to_string(dir.path().join(s)).unwrap();
        assert_eq!(read("b.log.3"), "one\ntwo\n");
        assert_eq!(read("b.log.2"), "three\n");
        assert_eq!(read("b.log.1"), "four-is-lo");
        assert_eq!(read("b.log"), "ng-line\n");
    }
}
