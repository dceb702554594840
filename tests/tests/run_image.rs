//! `caisson run IMAGE`: images from the store (pulled on demand) become overlay roots; the
//! image's config drives the process; nothing is left behind.
use caisson_tests::*;
use std::fs;

fn mounts_under(p: &std::path::Path) -> usize {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(p.to_str().unwrap()))
        .count()
}

#[test]
fn run_image_uses_config_pulls_on_demand_and_cleans_up() {
    if !require_root()
        || !["umoci", "skopeo", "docker-registry"]
            .iter()
            .all(|t| require_tool(t))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    // An image whose config sets Entrypoint, Cmd, Env and WorkingDir.
    run(std::process::Command::new("umoci").args([
        "config",
        "--image",
        &format!("{}:latest", layout.display()),
        "--config.entrypoint",
        "/bin/sh",
        "--config.entrypoint",
        "-c",
        "--config.cmd",
        "echo \"$GREETING from $(pwd)\"; exit 7",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/etc",
    ]))
    .unwrap();
    let reg = Registry::start().unwrap();
    reg.push(
        &format!("oci:{}:latest", layout.display()),
        "t/run:1",
        "v2s2",
        None,
    )
    .unwrap();
    let image = format!("{}/t/run:1", reg.addr);
    let c = Caisson::new();

    // Not in the store yet: pulled first, then run with the image's entrypoint + cmd.
    let (code, out, err) = c.run(&["run", "--rm", &image]);
    assert_eq!(code, 7, "{out}{err}");
    assert_eq!(out, "hello from /etc\n");
    assert_eq!(c.images_json().len(), 1, "pulled on demand");

    // Arguments replace CMD, not ENTRYPOINT; -e and -w override.
    let (code, out, _) = c.run(&[
        "run",
        "--rm",
        "-e",
        "GREETING=hi",
        "-w",
        "/bin",
        &image,
        "echo \"$GREETING in $(pwd)\"",
    ]);
    assert_eq!((code, out.as_str()), (0, "hi in /bin\n"));
    // --entrypoint replaces ENTRYPOINT (and CMD).
    let (code, out, _) = c.run(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/cat",
        &image,
        "/etc/motd",
    ]);
    assert_eq!((code, out.as_str()), (0, "hello from caisson tests\n"));

    // Writes go to the container's upper layer, never to the image.
    let (code, _, err) = c.run(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "echo x > /etc/motd",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = c.run(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/cat",
        &image,
        "/etc/motd",
    ]);
    assert_eq!(out, "hello from caisson tests\n");

    // A detached container keeps the image in use; rm -f releases it and its overlay.
    let (code, id, err) = c.run(&[
        "run",
        "-d",
        "--name",
        "keeper",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "while true; do sleep 1; done",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    assert!(
        mounts_under(c.root.path()) >= 1,
        "overlay mounted while it runs"
    );
    let (code, _, err) = c.run(&["rmi", &image]);
    assert_eq!(code, 1);
    assert!(err.contains("in use") && err.contains(&id), "{err}");
    c.ok(&["rm", "-f", "keeper"]);

    // Unknown images: a clear error, exit 125, nothing left.
    let (code, _, err) = c.run(&["run", "--rm", &format!("{}/t/nope:1", reg.addr), "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("not found"), "{err}");
    let (code, _, _) = c.run(&["run", "--rm", &image, "--bad-arg"]);
    assert_eq!(code, 2, "sh exits 2 on a bad option");
    let (code, _, _) = c.run(&["run", "--rm", "--entrypoint", "/nonexistent", &image]);
    assert_eq!(code, 127);

    // Nothing left behind: no overlay mounts, no rootfs dirs, no containers.
    assert_eq!(mounts_under(c.root.path()), 0, "leaked mounts");
    let left: Vec<_> = fs::read_dir(c.root.path().join("rootfs"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "leaked rootfs dirs: {left:?}");
    assert_eq!(c.ok(&["ps", "-a", "-q"]).trim(), "");
    c.ok(&["rmi", &image]);
    assert_eq!(c.layer_count(), 0);
}

/// Records cut short (a host crash: they are not fsynced) or damaged: the task still shows in
/// `ps -a` as lost with what was wrong, and `rm` removes all it held (processes, cgroup,
/// overlay root, directories, name); before, such a task vanished from every verb and leaked.
#[test]
fn root_tasks_with_unreadable_records_are_listed_and_removed() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    let image = "localhost/oci:latest";
    let running = c
        .ok(&["run", "-d", "--name", "dmg-run", image, "sleep", "100"])
        .trim()
        .to_string();
    let (code, _, err) = c.run(&["run", "--name", "dmg-ended", image, "true"]);
    assert_eq!(code, 0, "{err}");
    let ended = c.ok(&["ps", "-a", "-q", "--no-trunc"]);
    let ended = ended
        .lines()
        .find(|id| *id != running)
        .expect("the ended task's id")
        .to_string();
    let st: serde_json::Value =
        serde_json::from_str(&c.ok(&["inspect", &running])).expect("inspect json");
    let pid = st[0]["state"]["pid"].as_i64().expect("pid") as i32;
    let cgroups: Vec<String> = st[0]["state"]["cgroup_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(!cgroups.is_empty());
    let dir = |id: &str| root.join("containers").join(id);
    // The running task's config cut short, the ended task's state emptied.
    let cfg = fs::read(dir(&running).join("config.json")).unwrap();
    fs::write(dir(&running).join("config.json"), &cfg[..cfg.len() / 2]).unwrap();
    fs::write(dir(&ended).join("state.json"), b"").unwrap();

    let ps = c.ok(&["ps", "-a"]);
    for id in [&running, &ended] {
        let line = ps
            .lines()
            .find(|l| l.starts_with(&id[..12]))
            .unwrap_or_else(|| panic!("{id} not listed:\n{ps}"));
        assert!(line.contains("Lost (record unreadable)"), "{line}");
    }
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["inspect", "dmg-ended"])).unwrap();
    assert_eq!(v[0]["state"]["status"], "lost");
    assert_eq!(v[0]["state"]["reason"], "record unreadable");
    let error = v[0]["state"]["error"].as_str().unwrap();
    assert!(error.starts_with("state.json: "), "{error}");
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["inspect", &running])).unwrap();
    let error = v[0]["state"]["error"].as_str().unwrap();
    assert!(error.starts_with("config.json: "), "{error}");

    c.ok(&["rm", &running, "dmg-ended"]);
    assert_eq!(c.ok(&["ps", "-a", "-q"]), "");
    for id in [&running, &ended] {
        assert!(!dir(id).exists(), "{id}'s directory left");
        assert!(!root.join("rootfs").join(id).exists(), "{id}'s root left");
    }
    assert_eq!(
        mounts_under(root),
        0,
        "mounts left under {}",
        root.display()
    );
    eventually("the running task's processes and cgroups gone", || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z"))
            && cgroups.iter().all(|p| !std::path::Path::new(p).exists())
    });
    assert!(dir_entries(&root.join("names")).is_empty());
    // Their names are free again.
    let (code, _, err) = c.run(&["run", "--rm", "--name", "dmg-run", image, "true"]);
    assert_eq!(code, 0, "{err}");

    // Name entries that hold their name for nobody: emptied by a crash before this boot, or
    // naming a task that never came (a launcher killed half-way) long ago, give way; a young
    // one may be a launch in progress and keeps its name.
    let entry = |name: &str, held: &str, age: Option<std::time::SystemTime>| {
        let p = root.join("names").join(name);
        fs::write(&p, held).unwrap();
        if let Some(t) = age {
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    };
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    entry("crashed", "", Some(std::time::UNIX_EPOCH));
    entry("half-way", &"e".repeat(64), Some(long_ago));
    entry("young", "", None);
    for name in ["crashed", "half-way"] {
        let (code, _, err) = c.run(&["run", "--rm", "--name", name, image, "true"]);
        assert_eq!(code, 0, "{name}: {err}");
    }
    let (code, _, err) = c.run(&["run", "--rm", "--name", "young", image, "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("young"), "{err}");
    assert_eq!(dir_entries(&root.join("names")), ["young"]);
}
