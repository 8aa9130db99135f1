//! The shipped example configs are accepted as they are; a pair without its shared secret
//! is refused naming the field.

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
fn pair_examples_are_valid() {
    for f in ["pair-a.toml", "pair-b.toml"] {
        let (ok, text) = check(f);
        assert!(ok, "conf/{f} rejected: {text}");
        assert!(text.contains("configuration OK"), "{text}");
    }
}

#[test]
fn pair_without_secret_is_refused_naming_it() {
    let path = std::env::temp_dir().join(format!("resplica-nosecret-{}.toml", std::process::id()));
    std::fs::write(&path, "[[peers]]\nid = \"b\"\naddress = \"127.0.0.1:7391\"\nredis = \"127.0.0.1:6390\"\n")
        .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_resplica"))
        .args(["--config", path.to_str().unwrap_or_default(), "--check"])
        .output()
        .expect("run resplica --check");
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replication.secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
