//! Tests against the real testbed: slurmctld, slurmd on several nodes, munged and sshd in
//! network namespaces. One testbed serves the whole test binary; it is torn down when the
//! binary exits, also after failures.

mod faults;
mod fixture;
mod hostile_args;
mod slurm;
mod sshmode;
mod transfer;

/// `testbed status` shows every node and its SLURM state; `testbed down` is safe when
/// nothing is up, and twice in a row.
#[test]
fn testbed_status_and_a_safe_down() {
    fixture::testbed();
    let _shared = fixture::shared();
    let out = fixture::run_ok(&["testbed", "status"]);
    let s = fixture::text(&out.stdout);
    for node in ["login", "node1", "node2", "node3"] {
        assert!(s.contains(node), "status lacks {node}:\n{s}");
    }
    assert!(s.contains("idle") || s.contains("alloc") || s.contains("mix"), "no SLURM state:\n{s}");
    // A testbed that was never brought up: its own names, nothing to remove.
    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["testbed", "down"])
            .envs([("TB_RT", "/tmp/daphne-testbed-never"), ("TB_PREFIX", "dtn-"), ("TB_NET", "10.81.0"), ("TB_BRIDGE", "dtnbr0")])
            .current_dir(fixture::root())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", fixture::text(&out.stderr));
    }
}
