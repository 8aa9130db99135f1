//! The shipped example configs: the single-node ones are accepted as they are; the pair
//! examples are refused (naming `peers`) until active-active replication exists, instead of
//! running a "pair" that silently does not replicate.

use std::process::Command;

fn check(file: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_resplica"))
        .args(["--config", &format!("{}/conf/{file}", env!("CARGO_MANIFEST_DIR")), "--check"])
        .output()
        .expect("run resplica --check");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn single_node_examples_are_valid() {
    for f in ["resplica.toml", "single.toml"] {
        let (ok, text) = check(f);
        assert!(ok, "conf/{f} rejected: {text}");
        assert!(text.contains("configuration OK"), "{text}");
    }
}

#[test]
fn pair_examples_are_refused_naming_peers() {
    for f in ["pair-a.toml", "pair-b.toml"] {
        let (ok, text) = check(f);
        assert!(!ok, "conf/{f} accepted although replication does not exist yet");
        assert!(text.contains("`peers`"), "conf/{f}: {text}");
    }
}

#[test]
fn help_explains_both_ways_to_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_resplica")).arg("--help").output().expect("run --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("--config") && text.contains("--listen") && text.contains("--redis"), "{text}");
}

#[test]
fn no_config_and_no_addresses_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_resplica")).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
