//! User namespaces (`--userns=auto[:size=N]`, `--uidmap`, `--gidmap`): the task's root is root
//! inside and an unprivileged host id outside; the image's layers are seen through idmapped
//! mounts and never changed; auto slots are exclusive and come back once their task is gone;
//! bad maps are refused before anything is made. Real containers, as root.
use std::path::Path;

use caisson_tests::*;

const IMAGE: &str = "localhost/oci:latest";

/// The first line of a map (`/proc/PID/uid_map` text) as (inside, outside, count).
fn map_line(text: &str) -> (u64, u64, u64) {
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(v.len(), 3, "map {text:?}");
    (v[0], v[1], v[2])
}

/// The real, effective, saved and fs ids of a host process, from its status (`Uid:`/`Gid:`).
fn host_ids(pid: u64, key: &str) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"));
    line[key.len()..]
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

fn task_pid(c: &Caisson, id: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["inspect", id])).unwrap();
    v[0]["state"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {v}"))
}

fn detached(c: &Caisson, opts: &[&str], script: &str) -> String {
    let mut args = vec!["run", "-d"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
    let id = c.ok(&args).trim().to_string();
    let sandbox = c.root.path().join("containers").join(&id).join("sandbox");
    eventually("the task to start", || sandbox.join("up").exists());
    id
}

fn claims(root: &Path) -> Vec<String> {
    dir_entries(&root.join("userns"))
}

/// The host's `--userns=auto` uid range start (podman's `containers` entry or our default).
fn auto_start() -> u64 {
    std::fs::read_to_string("/etc/subuid")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut it = l.split(':');
                (it.next()? == "containers").then(|| it.next()?.parse().ok())?
            })
        })
        .unwrap_or(0x7000_0000)
}

#[test]
fn root_userns_auto_is_root_inside_and_unprivileged_outside() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    // Inside: root, owning its root filesystem, sandbox and /etc files; what it writes is its.
    let out = c.ok(&[
        "run",
        "--rm",
        "--userns=auto",
        IMAGE,
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u; id -g; echo w > /new; echo s > /mnt/sandbox/s; \
         ls -lnd / /bin/busybox /etc/motd /mnt/sandbox /etc/hosts /new /mnt/sandbox/s",
    ]);
    let mut lines = out.lines();
    let (inside, outside, count) = map_line(lines.next().unwrap());
    assert_eq!((inside, count), (0, 65536), "{out}");
    assert!(outside >= auto_start() && outside > 0, "{out}");
    assert_eq!(lines.next(), Some("0"), "{out}");
    assert_eq!(lines.next(), Some("0"), "{out}");
    let owners: Vec<(String, String)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].to_string(), f[3].to_string())
        })
        .collect();
    assert_eq!(owners.len(), 7, "{out}");
    assert!(
        owners.iter().all(|o| o == &("0".into(), "0".into())),
        "{out}"
    );
    // The slot came back with the task's removal.
    assert!(claims(root).is_empty(), "{:?}", claims(root));
    // Its network namespace is its own: its root binds a low port (and lo is up).
    let out = c.ok(&[
        "run",
        "--rm",
        "--userns=auto",
        IMAGE,
        "sh",
        "-c",
        "nc -l -p 80 -e true & for i in 1 2 3 4 5 6 7 8 9 10; do \
         netstat -ltn | grep -q ':80 ' && break; sleep 0.2; done; netstat -ltn; kill %1",
    ]);
    assert!(
        out.lines()
            .any(|l| l.contains(":80 ") && l.contains("LISTEN")),
        "{out}"
    );

    // Outside: two tasks at once get disjoint ranges; each init runs as its range's first id.
    let a = detached(&c, &["--userns=auto"], "touch /mnt/sandbox/up; sleep 60");
    let b = detached(&c, &["--userns=auto"], "touch /mnt/sandbox/up; sleep 60");
    let (pa, pb) = (task_pid(&c, &a), task_pid(&c, &b));
    let (ua, ub) = (host_ids(pa, "Uid:"), host_ids(pb, "Uid:"));
    assert_eq!(ua, vec![outside; 4], "the first slot is free again");
    assert_eq!(host_ids(pa, "Gid:")[0], ua[0]);
    assert!(
        ub[0] >= auto_start() && ub[0].abs_diff(ua[0]) >= 65536,
        "{ua:?} {ub:?}"
    );
    assert_eq!(claims(root).len(), 2);
    // Its sandbox files are the task root's host id on the host.
    use std::os::unix::fs::MetadataExt;
    let up = root.join("containers").join(&a).join("sandbox/up");
    assert_eq!(std::fs::metadata(&up).unwrap().uid() as u64, ua[0]);

    // What only the host's root may read stays unreadable to the task's root.
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("secret"), "s3cret\n").unwrap();
    std::fs::set_permissions(
        vol.path().join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let v = format!("{}:/v", vol.path().display());
    let (code, out, err) = c.run(&["run", "--rm", "-v", &v, IMAGE, "cat", "/v/secret"]);
    assert_eq!((code, out.as_str()), (0, "s3cret\n"), "{err}");
    let (code, out, err) = c.run(&[
        "run",
        "--rm",
        "--userns=auto",
        "-v",
        &v,
        IMAGE,
        "cat",
        "/v/secret",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("Permission denied"), "{err}");

    c.ok(&["rm", "-f", &a, &b]);
    assert!(claims(root).is_empty(), "{:?}", claims(root));
    assert!(dir_entries(&root.join("containers")).is_empty());
    assert!(dir_entries(&root.join("rootfs")).is_empty());
}

#[test]
fn root_uidmap_and_gidmap_shift_the_task_and_its_writes_not_the_image() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    // --gidmap defaults to --uidmap; a size limits the map.
    let out = c.ok(&[
        "run",
        "--rm",
        "--uidmap",
        "0:300000:5000",
        IMAGE,
        "cat",
        "/proc/self/uid_map",
        "/proc/self/gid_map",
    ]);
    let lines: Vec<_> = out.lines().map(map_line).collect();
    assert_eq!(lines, vec![(0, 300000, 5000), (0, 300000, 5000)], "{out}");

    let maps = ["--uidmap", "0:300000:5000", "--gidmap", "0:400000:5000"];
    // A user inside maps to its host id; writes land in the upper dir shifted.
    let mut opts = maps.to_vec();
    opts.extend(["-u", "1000:1000"]);
    opts.extend([IMAGE, "sh", "-c", "id; sleep 60"]);
    let mut args = vec!["run", "-d"];
    args.extend(&opts);
    let user = c.ok(&args).trim().to_string();
    let writer = detached(
        &c,
        &maps,
        "mkdir /d && echo x > /d/f && echo y >> /etc/motd && touch /mnt/sandbox/up; sleep 60",
    );
    let mut id_out = String::new();
    eventually("the task's id output", || {
        id_out = c.ok(&["logs", &user]);
        id_out.contains("uid=")
    });
    assert!(id_out.starts_with("uid=1000 gid=1000"), "{id_out}");
    let pid = task_pid(&c, &user);
    // The init is the shell (pid 1 inside); its child sleeps.
    assert_eq!(host_ids(pid, "Uid:"), vec![301000; 4]);
    assert_eq!(host_ids(pid, "Gid:"), vec![401000; 4]);

    use std::os::unix::fs::MetadataExt;
    let upper = root.join("rootfs").join(&writer).join("upper");
    for p in ["d", "d/f", "etc/motd"] {
        let m = std::fs::metadata(upper.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (300000, 400000), "{p}");
    }
    // The image's layer is the same for everyone: owned by 0 on disk, unchanged.
    let layer = c.layer_dir(IMAGE, 0);
    let m = std::fs::metadata(layer.join("etc/motd")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 0));
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/motd")).unwrap(),
        "hello from caisson tests\n"
    );
    // A task without a namespace sees the image as it is.
    let out = c.ok(&["run", "--rm", IMAGE, "ls", "-ln", "/etc/motd"]);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!((f[2], f[3]), ("0", "0"), "{out}");
    // No --userns=auto claim for explicit maps.
    assert!(claims(root).is_empty());
    c.ok(&["rm", "-f", &user, &writer]);
    assert!(dir_entries(&root.join("rootfs")).is_empty());
}

#[test]
fn root_userns_bad_input_is_refused_and_leaves_nothing() {
    let Some((c, work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    let wat = work.path().join("m.wat");
    std::fs::write(&wat, r#"(module (func (export "_start")))"#).unwrap();
    let rootfs = work.path().join("plain");
    std::fs::create_dir_all(&rootfs).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--userns=bogus", IMAGE], "expected host, auto"),
        (
            vec!["--userns=auto:size=0", IMAGE],
            "size must be 1 to 65536",
        ),
        (
            vec!["--userns=auto:size=70000", IMAGE],
            "size must be 1 to 65536",
        ),
        (
            vec!["--uidmap", "1:300000:10", IMAGE],
            "must map the container's uid 0",
        ),
        (vec!["--uidmap", "0:300000", IMAGE], "CONTAINER:HOST:SIZE"),
        (
            vec!["--uidmap", "0:300000:10", "--uidmap", "5:400000:10", IMAGE],
            "overlapping",
        ),
        (
            vec!["--uidmap", "0:300000:10", "--gidmap", "1:300000:10", IMAGE],
            "container's gid 0",
        ),
        (vec!["--uidmap", "0:4294967290:10", IMAGE], "largest id"),
        (
            vec!["--userns=auto", "--uidmap", "0:1:1", IMAGE],
            "picks its own maps",
        ),
        (vec!["--gidmap", "0:1:1", IMAGE], "--gidmap needs --uidmap"),
        (
            vec!["--userns=host", "--uidmap", "0:300000:10", IMAGE],
            "contradict",
        ),
        (
            vec!["--userns=auto", "--rootfs", rootfs.to_str().unwrap()],
            "need an image",
        ),
        (
            vec!["--userns=auto", wat.to_str().unwrap()],
            "does not apply to Wasm tasks",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["run", "--rm"];
        all.extend(&args);
        if !args.last().unwrap().ends_with(".wat") {
            all.push("true");
        }
        let (code, out, err) = c.run(&all);
        assert_eq!(code, 125, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    // A failed launch after the claim (command not found) gives its slot back.
    let (code, _, err) = c.run(&["run", "--rm", "--userns=auto", IMAGE, "nosuch"]);
    assert_eq!(code, 127, "{err}");
    assert!(claims(root).is_empty(), "{:?}", claims(root));
    assert!(dir_entries(&root.join("containers")).is_empty());
    assert!(dir_entries(&root.join("rootfs")).is_empty());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "{mounts}");
}

/// Through a master and an agent (`caisson submit --userns`): the task's root is root inside
/// and the agent's slot's first id outside; the slot is the agent's until the task is removed;
/// the master refuses what the agent could not run before anything is placed.
#[test]
fn root_userns_tasks_through_the_master() {
    use caisson_tests::cluster::*;
    use std::time::Duration;
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&[]);
    c.load_busybox("a1");
    let root = c.agent_root("a1");
    let _m = c.master();
    let _a = c.agent("a1", JOIN);
    c.wait_agents(1);

    // Refused with InvalidArgument, nothing placed.
    for (args, want) in [
        (vec!["--userns", "bogus", IMAGE], "expected host, auto"),
        (vec!["--userns", "auto:size=0", IMAGE], "size must be 1 to"),
        (vec!["--userns", "auto", "/x/m.wasm"], "for native tasks"),
    ] {
        let mut all = vec!["submit"];
        all.extend(&args);
        let (code, out, err) = c.cli(&all);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            err.contains("InvalidArgument") && err.contains(want),
            "{args:?}: want {want:?} in {err}"
        );
    }
    assert!(c.tasks().is_empty(), "{:?}", c.tasks());

    // Inside: uid and gid 0, mapped from a range that is not the host's root.
    let check = "read a b n < /proc/self/uid_map; [ \"$a $n\" = '0 65536' ] || exit 2; \
                 [ \"$b\" -ge 65536 ] || exit 3; [ \"$(id -u):$(id -g)\" = 0:0 ] || exit 4; \
                 touch /mnt/sandbox/up && exit 42";
    let id = c.submit(&["--userns", "auto", IMAGE, "sh", "-c", check]);
    let t = c.wait_task(&id, "ended", Duration::from_secs(60), terminal);
    assert_eq!(
        (t["state"].as_str(), t["exit_code"].as_i64()),
        (Some("FAILED"), Some(42)),
        "{t}"
    );
    assert_eq!(t["userns"], "auto", "{t}");
    // The agent removes the ended task, and its slot with it.
    c.assert_no_containers("a1");
    assert!(claims(&root).is_empty(), "{:?}", claims(&root));

    // Outside: the running init's host ids are its slot's first; `cancel` ends it and frees it.
    let id = c.submit(&[
        "--userns",
        "auto:size=1000",
        IMAGE,
        "sh",
        "-c",
        "touch /mnt/sandbox/up; sleep 60",
    ]);
    let up = root.join("containers").join(&id).join("sandbox/up");
    eventually("the task to start", || up.exists());
    assert_eq!(claims(&root).len(), 1);
    let v: serde_json::Value = serde_json::from_slice(
        &run(std::process::Command::new(caisson_bin())
            .arg("--root")
            .arg(&root)
            .args(["inspect", &id]))
        .unwrap()
        .stdout,
    )
    .unwrap();
    let pid = v[0]["state"]["pid"].as_u64().unwrap();
    let map = map_line(&std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap());
    assert_eq!((map.0, map.2), (0, 1000), "{map:?}");
    assert!(map.1 >= auto_start(), "{map:?}");
    assert_eq!(host_ids(pid, "Uid:"), vec![map.1; 4]);
    let (code, _, err) = c.cli(&["cancel", &id]);
    assert_eq!(code, 0, "{err}");
    let t = c.wait_task(&id, "killed", Duration::from_secs(30), terminal);
    assert_eq!(t["state"], "KILLED", "{t}");
    c.assert_no_containers("a1");
    assert!(claims(&root).is_empty(), "{:?}", claims(&root));
    assert!(dir_entries(&root.join("rootfs")).is_empty());
}
