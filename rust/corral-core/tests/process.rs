//! Real processes and real sockets: spawn, affinity, logs, group signals, probes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use corral_core::probe::{run_check, Check, Health, ProbeKind, ProbeSpec, RunAs};
use corral_core::process::{
    group_alive, group_members, signal_group, Event, LogConfig, ProcessSpec, Supervisor,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn next(rt: &tokio::runtime::Runtime, sup: &Supervisor) -> Event {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), sup.next_event()).await })
        .expect("no event within 10s")
        .unwrap()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[test]
fn affinity_env_cwd_and_log_reach_the_child() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/x.log");
    let spec = ProcessSpec {
        argv: sh("grep Cpus_allowed_list /proc/self/status; echo \"$GREETING\"; pwd; echo err >&2"),
        env: vec![("GREETING".into(), "hello".into())],
        cwd: Some(dir.path().to_path_buf()),
        cpus: vec![0],
        log: Some(LogConfig {
            path: log.clone(),
            max_bytes: 1 << 20,
            keep: 1,
        }),
        ..Default::default()
    };
    let mask = || {
        let st = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        st.lines()
            .find(|l| l.starts_with("Cpus_allowed_list"))
            .unwrap()
            .to_owned()
    };
    let before = mask();
    let child = sup.spawn("x-0", &spec).unwrap();
    assert!(child.start_time > 0);
    assert_eq!(
        mask(),
        before,
        "the spawning thread gets its own CPU mask back"
    );
    let Event::Exited { code, .. } = next(&rt, &sup) else {
        panic!()
    };
    assert_eq!(code, Some(0));
    // The copier may finish a moment after the exit.
    std::thread::sleep(Duration::from_millis(100));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("Cpus_allowed_list:\t0\n"), "{out}");
    assert!(out.contains("hello\n"), "{out}");
    assert!(out.contains(dir.path().to_str().unwrap()), "{out}");
    assert!(out.contains("err\n"), "{out}");
}

#[test]
fn missing_program_is_a_spawn_error() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let spec = ProcessSpec {
        argv: vec!["/nonexistent/corral-test".into()],
        ..Default::default()
    };
    let err = sup.spawn("y", &spec).unwrap_err().to_string();
    assert!(
        err.contains("cannot start /nonexistent/corral-test"),
        "{err}"
    );
}

#[test]
fn signal_reaches_the_whole_group() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    // The shell starts a grandchild in the same group; both must die from one signal.
    let spec = ProcessSpec {
        argv: sh("sleep 30 & wait"),
        ..Default::default()
    };
    let child = sup.spawn("g", &spec).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while group_members(child.pid).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "grandchild never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(signal_group(child.pid, libc::SIGTERM).unwrap());
    let Event::Exited { signal, .. } = next(&rt, &sup) else {
        panic!()
    };
    assert_eq!(signal, Some(libc::SIGTERM));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while group_alive(child.pid) {
        assert!(std::time::Instant::now() < deadline, "group still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!signal_group(child.pid, libc::SIGTERM).unwrap());
}

/// A tiny HTTP server whose status can be changed while it runs.
fn http_server(status: Arc<AtomicU16>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let code = status.load(Ordering::SeqCst);
            let _ = write!(s, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}

/// A TCP check against a listener, a closed port, a name, and a listener whose accept queue
/// is full (the handshake never completes: the check waits on the runtime until its timeout).
#[test]
fn tcp_checks_connect_refuse_and_time_out() {
    let rt = runtime();
    let t = Duration::from_secs(2);
    let tcp = |host: &str, port: u16| Check::Tcp {
        host: host.into(),
        port,
    };
    let open = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = open.local_addr().unwrap().port();
    for _ in 0..3 {
        assert_eq!(
            rt.block_on(run_check(&tcp("127.0.0.1", port), t)),
            Ok(format!("connected to 127.0.0.1:{port}"))
        );
    }
    assert!(rt.block_on(run_check(&tcp("localhost", port), t)).is_ok());
    if let Ok(v6) = TcpListener::bind("[::1]:0") {
        let p6 = v6.local_addr().unwrap().port();
        assert!(rt.block_on(run_check(&tcp("::1", p6), t)).is_ok());
    }
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = rt
        .block_on(run_check(&tcp("127.0.0.1", closed), t))
        .unwrap_err();
    assert!(err.contains("refused"), "{err}");

    // Backlog 0 holds one connection; SYNs past it are dropped, so later connects hang.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    full.listen(0).unwrap();
    let fport = full.local_addr().unwrap().as_socket().unwrap().port();
    // The checks' own connections fill the queue (closed on our side, never accepted).
    let short = Duration::from_millis(300);
    let timed_out = (0..4)
        .find_map(|_| {
            rt.block_on(run_check(&tcp("127.0.0.1", fport), short))
                .err()
        })
        .expect("a full accept queue ends in a timeout");
    assert!(timed_out.contains("timed out"), "{timed_out}");
}

#[test]
fn checks_follow_their_definitions() {
    let rt = runtime();
    let status = Arc::new(AtomicU16::new(204));
    let port = http_server(status.clone());
    let http = Check::Http {
        host: "127.0.0.1".into(),
        port,
        path: "/health".into(),
    };
    let t = Duration::from_secs(2);
    assert_eq!(rt.block_on(run_check(&http, t)), Ok("HTTP 204".into()));
    status.store(302, Ordering::SeqCst);
    assert!(
        rt.block_on(run_check(&http, t)).is_ok(),
        "3xx counts as success"
    );
    status.store(503, Ordering::SeqCst);
    assert_eq!(rt.block_on(run_check(&http, t)), Err("HTTP 503".into()));
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(rt
        .block_on(run_check(
            &Check::Tcp {
                host: "127.0.0.1".into(),
                port: closed
            },
            t
        ))
        .is_err());
    let exec = |s: &str| Check::Exec {
        argv: sh(s),
        env: vec![],
        run_as: RunAs::default(),
    };
    assert!(rt.block_on(run_check(&exec("exit 0"), t)).is_ok());
    assert_eq!(
        rt.block_on(run_check(&exec("exit 2"), t)),
        Err("exit status: 2".into())
    );
    let slow = rt.block_on(run_check(&exec("sleep 5"), Duration::from_millis(100)));
    assert_eq!(slow, Err("timed out after 100ms".into()));
}

#[test]
fn readiness_reports_changes_and_liveness_its_failure() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let status = Arc::new(AtomicU16::new(200));
    let port = http_server(status.clone());
    let probe = |threshold_ok, threshold_fail| ProbeSpec {
        check: Check::Http {
            host: "127.0.0.1".into(),
            port,
            path: "/".into(),
        },
        initial_delay: Duration::ZERO,
        period: Duration::from_millis(20),
        timeout: Duration::from_secs(1),
        success_threshold: threshold_ok,
        failure_threshold: threshold_fail,
    };
    let health = Health {
        startup: Some(probe(1, 3)),
        readiness: Some(probe(2, 2)),
        liveness: Some(probe(1, 5)),
    };
    sup.start_health("api-0", health);
    let mut seen = vec![];
    let mut expect = |rt: &tokio::runtime::Runtime, kind, ok| {
        let Event::Probe { id, result } = next(rt, &sup) else {
            panic!()
        };
        assert_eq!(
            (id.as_str(), result.kind, result.ok),
            ("api-0", kind, ok),
            "{result:?}"
        );
        seen.push(result);
    };
    expect(&rt, ProbeKind::Startup, true);
    expect(&rt, ProbeKind::Readiness, true);
    status.store(500, Ordering::SeqCst);
    // Readiness (threshold 2) goes down before liveness (threshold 5) fails.
    expect(&rt, ProbeKind::Readiness, false);
    expect(&rt, ProbeKind::Liveness, false);
    assert_eq!(seen[3].message, "HTTP 500");
    assert!(sup.stop_health("api-0"));
    assert!(!sup.stop_health("api-0"));
}

#[test]
fn failing_startup_ends_the_probes() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = ProbeSpec {
        check: Check::Tcp {
            host: "127.0.0.1".into(),
            port: closed,
        },
        initial_delay: Duration::ZERO,
        period: Duration::from_millis(10),
        timeout: Duration::from_millis(500),
        success_threshold: 1,
        failure_threshold: 3,
    };
    sup.start_health(
        "w",
        Health {
            startup: Some(spec.clone()),
            readiness: Some(spec),
            liveness: None,
        },
    );
    let Event::Probe { result, .. } = next(&rt, &sup) else {
        panic!()
    };
    assert_eq!((result.kind, result.ok), (ProbeKind::Startup, false));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        sup.drain(10).is_empty(),
        "readiness must not run after a failed startup"
    );
}

/// Dead: gone, or a zombie waiting for PID 1 to reap it (which may take a while here).
fn dead(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            == Some("Z")
    })
}

#[test]
fn an_exec_probe_leaves_nothing_of_it_behind() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    for (script, ok) in [
        ("sleep 300 & echo $! > {f}; exit 0", true),
        ("sleep 300 & echo $! > {f}; exit 3", false),
    ] {
        let f = dir.path().join(format!("pid-{ok}"));
        let check = Check::Exec {
            argv: sh(&script.replace("{f}", f.to_str().unwrap())),
            env: vec![],
            run_as: RunAs::default(),
        };
        let res = rt.block_on(run_check(&check, Duration::from_secs(5)));
        assert_eq!(res.is_ok(), ok, "{res:?}");
        let pid: u32 = std::fs::read_to_string(&f).unwrap().trim().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !dead(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            dead(pid),
            "the probe's background sleep {pid} outlived it (ok={ok})"
        );
    }
}

#[test]
fn output_goes_through_the_keeper_and_survives_its_supervisor() {
    use corral_core::keeper::{listen, LogKeeper};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("keeper.sock");
    let keeper = LogKeeper::serve(listen(&sock).unwrap()).unwrap();
    let log = dir.path().join("printer.log");
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    sup.log_via_keeper(&sock).unwrap();
    let spec = ProcessSpec {
        argv: sh(
            "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line $i; done; sleep 0.3; echo last",
        ),
        log: Some(LogConfig {
            path: log.clone(),
            max_bytes: 0,
            keep: 0,
        }),
        ..Default::default()
    };
    let child = sup.spawn("printer-0", &spec).unwrap();
    // The supervisor and its runtime go away at once, as an agent killed with -9 would: the
    // output still has its reader, in the keeper.
    drop(sup);
    drop(rt);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while keeper.active() > 0 || keeper.handed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pipe never closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 301, "not one line lost");
    assert_eq!(lines[299], "line 300");
    assert_eq!(lines[300], "last", "written after its supervisor was gone");
    assert!(child.pid > 0);
}

#[test]
fn an_adopted_process_reports_its_exit_through_a_pidfd() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let mut other = std::process::Command::new("sleep")
        .arg("0.2")
        .spawn()
        .unwrap();
    assert!(sup.adopt("elsewhere-0", other.id()).unwrap());
    let reaper = std::thread::spawn(move || other.wait().unwrap());
    match next(&rt, &sup) {
        Event::Exited {
            id, code, signal, ..
        } => {
            assert_eq!(id, "elsewhere-0");
            assert_eq!(
                (code, signal),
                (None, None),
                "only the parent reads the status"
            );
        }
        e @ Event::Probe { .. } => panic!("{e:?}"),
    }
    reaper.join().unwrap();
    assert!(
        !sup.adopt("gone-0", u32::MAX >> 2).unwrap(),
        "no such process"
    );
}

#[test]
fn a_setsid_grandchild_is_found_by_its_inherited_marker() {
    let marker = format!("CORRAL_TEST_MARK={}", std::process::id());
    let mut sh = std::process::Command::new("sh")
        .args(["-c", "setsid sleep 30 & echo $!; wait"])
        .env("CORRAL_TEST_MARK", std::process::id().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sh.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let daemon: u32 = line.trim().parse().unwrap();
    // The daemon may be between fork and exec for a moment (its environ unreadable then).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut found = corral_core::process::find_by_env(&marker);
    while !(found.contains(&daemon) && found.contains(&sh.id()))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        found = corral_core::process::find_by_env(&marker);
    }
    assert!(
        found.contains(&daemon) && found.contains(&sh.id()),
        "{found:?}"
    );
    assert!(corral_core::process::kill_pid(daemon, libc::SIGKILL));
    sh.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while corral_core::process::find_by_env(&marker).contains(&daemon) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cgroup_kill_uses_cgroup_kill_on_v2_and_the_pid_list_on_v1() {
    // A fake cgroupfs (this machine has v1): v2 is a directory with a cgroup.kill file.
    use corral_core::cgroup::Cgroups;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").unwrap();
    std::fs::write(root.path().join("cgroup.subtree_control"), "memory").unwrap();
    let cg = Cgroups::detect(root.path(), "corral/test");
    let v2 = root.path().join("v2-instance");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("cgroup.kill"), "").unwrap();
    assert_eq!(cg.kill(&v2).unwrap(), 0);
    assert_eq!(
        std::fs::read_to_string(v2.join("cgroup.kill")).unwrap(),
        "1"
    );
    // v1: no cgroup.kill; every pid listed gets SIGKILL.
    let mut victim = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let v1 = root.path().join("v1-instance");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("cgroup.procs"), format!("{}\n", victim.id())).unwrap();
    assert_eq!(cg.kill(&v1).unwrap(), 1);
    let status = victim.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
}

#[test]
fn group_usage_counts_the_live_processes_of_each_tree() {
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    let spec = ProcessSpec {
        argv: sh("sleep 30 & sleep 30 & exec sleep 30"),
        ..Default::default()
    };
    let child = sup.spawn("u-0", &spec).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut usage = corral_core::process::group_usage(&[child.pid, u32::MAX >> 2]);
    while usage[0].processes < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        usage = corral_core::process::group_usage(&[child.pid, u32::MAX >> 2]);
    }
    assert_eq!(usage[0].processes, 3, "the leader and its two children");
    assert_eq!(usage[1].processes, 0);
    assert!(usage[0].rss_bytes > 0 && usage[0].open_fds >= 3);
    assert_eq!(
        usage[1],
        corral_core::process::GroupUsage::default(),
        "no such process"
    );
    // Past USAGE_CHUNK leaders the trees are read on several threads: every answer still
    // sits at its leader's index.
    let mut many = vec![u32::MAX >> 2; corral_core::process::USAGE_CHUNK * 2 + 3];
    let last = many.len() - 1;
    many[last] = child.pid;
    many[70] = child.pid;
    let spread = corral_core::process::group_usage(&many);
    assert_eq!(spread.len(), many.len());
    for (i, u) in spread.iter().enumerate() {
        let want = if i == 70 || i == last { 3 } else { 0 };
        assert_eq!(u.processes, want, "leader {i}");
    }
    signal_group(child.pid, libc::SIGKILL).unwrap();
}

#[test]
fn a_keeper_that_is_gone_is_dropped_and_output_goes_through_the_supervisor() {
    use corral_core::keeper::listen;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("keeper.sock");
    // A keeper that took the connection and then died: its listener is closed unserved, so
    // the pending connection is reset and the hand-over fails.
    let listener = listen(&sock).unwrap();
    let rt = runtime();
    let sup = Supervisor::new(rt.handle().clone());
    sup.log_via_keeper(&sock).unwrap();
    drop(listener);
    assert_eq!(sup.keeper_lost(), None);
    let log = dir.path().join("printer.log");
    let spec = ProcessSpec {
        argv: sh("echo first; echo second"),
        log: Some(LogConfig {
            path: log.clone(),
            max_bytes: 0,
            keep: 0,
        }),
        ..Default::default()
    };
    sup.spawn("printer-0", &spec)
        .expect("a spawn works without the keeper");
    let why = sup
        .keeper_lost()
        .expect("the supervisor says why it let the keeper go");
    assert!(why.contains("keeper.sock"), "{why}");
    match next(&rt, &sup) {
        Event::Exited { code, .. } => {
            assert_eq!(code, Some(0), "its own child: the status is known");
        }
        e @ Event::Probe { .. } => panic!("{e:?}"),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "no output in the log");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Dropped on purpose, too (the agent saw the keeper die): the reason given first stays.
    sup.drop_keeper("again");
    assert_eq!(sup.keeper_lost(), Some(why));
}
