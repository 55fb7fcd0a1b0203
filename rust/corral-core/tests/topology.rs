//! Topology discovery against fake sysfs trees (fakes: this machine has none of these layouts).

mod common;
use common::fixture;

#[test]
fn ryzen_7800x3d() {
    let t = fixture("ryzen-7800x3d");
    assert_eq!(t.cpus().len(), 16);
    assert_eq!(t.cores().len(), 8);
    assert_eq!(t.numa_nodes().len(), 1);
    assert_eq!(t.numa_nodes()[0].memory_mb, 32768);
    assert_eq!(t.l3_domains().len(), 1);
    assert_eq!(t.l3_domains()[0].size_kb, 96 * 1024);
    assert_eq!(t.siblings(3), vec![3, 11]);
    assert_eq!(t.threads_per_core(), 2);
}

#[test]
fn ryzen_7950x3d_has_two_cache_domains() {
    let t = fixture("ryzen-7950x3d");
    assert_eq!(t.cpus().len(), 32);
    assert_eq!(t.cores().len(), 16);
    let sizes: Vec<u64> = t.l3_domains().iter().map(|d| d.size_kb / 1024).collect();
    assert_eq!(sizes, vec![96, 32]);
    assert_eq!(
        t.l3_domains()[0].cpus,
        [(0..8).collect::<Vec<u32>>(), (16..24).collect()].concat()
    );
    assert_eq!(t.cpu(20).unwrap().l3, 0);
    assert_eq!(t.cpu(9).unwrap().l3, 1);
}

#[test]
fn dual_socket() {
    let t = fixture("dual-socket");
    assert_eq!(t.packages(), &[0, 1]);
    assert_eq!(t.numa_nodes().len(), 2);
    assert_eq!(t.l3_domains().len(), 4);
    assert_eq!(
        t.numa_nodes()[1].cpus,
        [(8..16).collect::<Vec<u32>>(), (24..32).collect()].concat()
    );
    assert!(t.l3_domains().iter().all(|d| d.cpus.len() == 8));
    assert_eq!(t.l3_domains()[2].numa_node, 1);
}

#[test]
fn no_smt() {
    let t = fixture("no-smt");
    assert_eq!(t.cpus(), &[0, 1, 2, 3]);
    assert_eq!(t.threads_per_core(), 1);
    assert_eq!(t.siblings(2), vec![2]);
    assert!(t.siblings(99).is_empty());
}

#[test]
fn cpuset_narrows_allowed_cpus() {
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sysfs/no-smt");
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&src, dir.path());
    std::fs::create_dir_all(dir.path().join("fs/cgroup")).unwrap();
    std::fs::write(dir.path().join("fs/cgroup/cpuset.cpus.effective"), "1-2\n").unwrap();
    let t = corral_core::topology::Topology::from_sysfs(dir.path()).unwrap();
    assert_eq!(t.cpus(), &[1, 2]);
    assert_eq!(t.online(), &[0, 1, 2, 3]);
}

#[test]
fn missing_tree_is_a_clear_error() {
    let e = corral_core::topology::Topology::from_sysfs("/nonexistent/sys").unwrap_err();
    assert!(
        e.to_string()
            .contains("/nonexistent/sys/devices/system/cpu"),
        "{e}"
    );
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
