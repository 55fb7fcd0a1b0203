//! Log-line readiness (`Check::Log`): read from an offset, across a rotation, latched once
//! matched.

use std::io::Write;

use corral_core::probe::{run_check, Check, LogWatch};

#[test]
fn a_log_watch_reads_from_its_offset_follows_rotation_and_latches() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("db-0.log");
    std::fs::write(&log, "ready to accept connections (an earlier run)\n").unwrap();
    let w = LogWatch::new(&log, r"ready to accept conn\w+", None).unwrap();
    assert!(w.poll().is_err(), "what was there before is not read");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    write!(f, "starting\nready to acc").unwrap();
    assert!(w.poll().is_err(), "half a line is not the line");
    // Rotated: the old file renamed, a new one begun.
    std::fs::rename(&log, dir.path().join("db-0.log.1")).unwrap();
    std::fs::write(
        &log,
        "LOG: database system is ready to accept connections\r\n",
    )
    .unwrap();
    let m = w.poll().unwrap();
    assert!(
        m.contains("database system is ready to accept connections"),
        "{m}"
    );
    std::fs::write(&log, "").unwrap();
    assert_eq!(w.poll().unwrap(), m, "once matched, it stays matched");
    let err = LogWatch::new(&log, "(unclosed", None).unwrap_err();
    assert!(err.contains("unclosed"), "{err}");
}

#[test]
fn a_log_check_runs_as_any_check_and_a_missing_file_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("later.log");
    let check = Check::Log(std::sync::Arc::new(
        LogWatch::new(&log, "^listening on", Some(0)).unwrap(),
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let timeout = std::time::Duration::from_secs(1);
    let not_yet = rt.block_on(run_check(&check, timeout)).unwrap_err();
    assert!(
        not_yet.contains("no log line matching /^listening on/"),
        "{not_yet}"
    );
    std::fs::write(&log, "booting\nlistening on 127.0.0.1:5432\n").unwrap();
    assert!(rt.block_on(run_check(&check, timeout)).is_ok());
}
