//! `caisson network ls|inspect|create|rm` on a private config dir.
use caisson_tests::*;

#[test]
fn network_create_ls_inspect_rm() {
    let c = Caisson::new();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().to_str().unwrap();
    let net = |args: &[&str]| {
        let mut all = vec!["--cni-config-dir", conf, "network"];
        all.extend_from_slice(args);
        c.run(&all)
    };
    let (code, out, err) = net(&["create", "--subnet", "10.231.9.0/24", "clinet"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "clinet");
    let (code, out, _) = net(&["ls", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "clinet");
    let (_, out, _) = net(&["inspect", "clinet"]);
    assert!(out.contains("10.231.9.0/24"), "{out}");
    assert!(
        out.contains("\"bridge\"") && out.contains("portmap"),
        "{out}"
    );
    // Duplicate name and bad subnet: clear errors.
    let (code, _, err) = net(&["create", "clinet"]);
    assert_eq!(code, 125);
    assert!(err.contains("clinet"), "{err}");
    let (code, _, err) = net(&["create", "--subnet", "10.999.0.0/24", "bad"]);
    assert_eq!(code, 125);
    assert!(err.contains("subnet"), "{err}");
    assert_eq!(net(&["rm", "clinet"]).0, 0);
    let (code, _, err) = net(&["inspect", "clinet"]);
    assert_eq!(code, 125);
    assert!(err.contains("not found"), "{err}");
}
