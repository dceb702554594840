//! `caisson run --network NAME[,NAME2] -p HOST:CTR`: real containers on real CNI networks, with
//! our plugins and with the reference plugins; nothing left behind (netns, cache, veths, IPs,
//! port forwards), also when the launcher is killed.
use caisson_tests::*;
use containerizer::net::{volatile_dir, IPAM_DATA_DIR};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REFERENCE: &str = "/usr/lib/cni";
/// How `caisson load` names the test layout.
const IMAGE: &str = "localhost/oci:latest";

fn our_plugins() -> PathBuf {
    let dir = caisson_bin().parent().unwrap().to_path_buf();
    for p in ["bridge", "host-local", "loopback", "portmap"] {
        assert!(dir.join(p).exists(), "{} not built", dir.join(p).display());
    }
    dir
}

/// A caisson root with the busybox test image loaded and a private CNI config dir.
struct Env {
    c: Caisson,
    conf: tempfile::TempDir,
    plugins: String,
    networks: std::cell::RefCell<Vec<String>>,
    /// The bridges of `networks`: a stale one (a crashed earlier run) is deleted before its
    /// network is created, and each is deleted again when the Env goes.
    bridges: std::cell::RefCell<Vec<String>>,
    _tmp: tempfile::TempDir,
}

impl Env {
    fn new(plugins: &Path) -> Option<Env> {
        if !require_root() || !require_tool("umoci") || !require_tool("iptables") {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layout = busybox_layout(tmp.path(), "latest").unwrap();
        let c = Caisson::new();
        let (code, _, err) = c.run(&["load", "-i", &format!("{}:latest", layout.display())]);
        assert_eq!(code, 0, "{err}");
        Some(Env {
            c,
            conf: tempfile::tempdir().unwrap(),
            plugins: plugins.to_str().unwrap().to_string(),
            networks: Default::default(),
            bridges: Default::default(),
            _tmp: tmp,
        })
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec![
            "--cni-config-dir",
            self.conf.path().to_str().unwrap(),
            "--cni-plugin-dir",
            &self.plugins,
        ];
        all.extend_from_slice(args);
        self.c.run(&all)
    }

    fn cmd(&self) -> std::process::Command {
        let mut c = self.c.cmd();
        c.arg("--cni-config-dir")
            .arg(self.conf.path())
            .arg("--cni-plugin-dir")
            .arg(&self.plugins);
        c
    }

    fn create(&self, name: &str, subnet: &str, bridge: &str) {
        del_bridge(bridge);
        self.bridges.borrow_mut().push(bridge.to_string());
        let (code, _, err) = self.run(&[
            "network", "create", "--subnet", subnet, "--bridge", bridge, name,
        ]);
        assert_eq!(code, 0, "{err}");
        self.networks.borrow_mut().push(name.to_string());
    }

    /// Nothing of any task's networking is left: no pinned netns, no cached attachment, no
    /// port on the bridge.
    fn assert_clean(&self, bridges: &[&str]) {
        let root = self.c.root.path();
        let netns: Vec<_> = std::fs::read_dir(volatile_dir(root).join("netns"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(netns.is_empty(), "netns left: {netns:?}");
        let gates = walk_files(&volatile_dir(root).join("gates"));
        assert!(gates.is_empty(), "network gates left: {gates:?}");
        let cache: Vec<_> = walk_files(&volatile_dir(root).join("cni"));
        assert!(cache.is_empty(), "CNI cache left: {cache:?}");
        let roots: Vec<_> = std::fs::read_dir(root.join("rootfs"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(roots.is_empty(), "root filesystems left: {roots:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let prefix = format!(" {}/", root.display());
        let left: Vec<_> = mounts.lines().filter(|l| l.contains(&prefix)).collect();
        assert!(left.is_empty(), "mounts left: {left:?}");
        // Our bridge plugin deletes the veth pair in the background (the kernel's unregister
        // waits for an RCU grace period): give it a moment.
        for b in bridges {
            let ports = || -> Vec<_> {
                std::fs::read_dir(format!("/sys/class/net/{b}/brif"))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default()
            };
            let t0 = Instant::now();
            while !ports().is_empty() && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(ports().is_empty(), "veths left on {b}: {:?}", ports());
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-f", "--all"]);
        // network rm also removes the bridge and the network's masquerade rule.
        for name in self.networks.borrow().iter() {
            let _ = self.run(&["network", "rm", "-f", name]);
        }
        for bridge in self.bridges.borrow().iter() {
            del_bridge(bridge);
        }
    }
}

fn del_bridge(name: &str) {
    let _ = std::process::Command::new("ip")
        .args(["link", "del", name])
        .output();
}

fn named_network(plugins: &Path, tag: &str, octet: u8) {
    let Some(env) = Env::new(plugins) else { return };
    let bridge = format!("cst{tag}{octet}");
    let net = format!("runnet{tag}");
    // host-local's data dir for the networks caisson creates.
    let ipam = Path::new(IPAM_DATA_DIR);
    let _ = std::fs::remove_dir_all(ipam.join(&net));
    env.create(&net, &format!("10.231.{octet}.0/24"), &bridge);
    for round in 0..2 {
        let (code, out, err) = env.run(&[
            "run",
            "--rm",
            "--hostname",
            "web1",
            "--network",
            &net,
            IMAGE,
            "/bin/busybox",
            "sh",
            "-c",
            &format!(
                "busybox ip -4 addr show eth0 && cat /etc/hosts && busybox ping -c1 -W2 10.231.{octet}.1"
            ),
        ]);
        assert_eq!(code, 0, "round {round}: {out}{err}");
        let prefix = format!("inet 10.231.{octet}.");
        let at = out
            .find(&prefix)
            .unwrap_or_else(|| panic!("no address: {out}"));
        let ip: String = out[at + 5..].chars().take_while(|c| *c != '/').collect();
        assert!(out.contains(&format!("{ip}\tweb1")), "/etc/hosts: {out}");
        assert!(
            out.contains("1 packets received"),
            "gateway unreachable: {out}"
        );
        env.assert_clean(&[&bridge]);
        // host-local released the address.
        let held: Vec<_> = std::fs::read_dir(ipam.join(&net))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        assert!(held.is_empty(), "addresses still allocated: {held:?}");
    }
}

#[test]
fn run_on_a_named_network_with_our_plugins() {
    named_network(&our_plugins(), "o", 41);
}

#[test]
fn run_on_a_named_network_with_the_reference_plugins() {
    if !require_tool("/usr/lib/cni/bridge") {
        return;
    }
    named_network(Path::new(REFERENCE), "r", 42);
}

#[test]
fn published_port_reaches_the_task_and_two_networks_show_in_inspect() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let (b1, b2) = ("cstp43", "cstp44");
    env.create("front", "10.231.43.0/24", b1);
    env.create("back", "10.231.44.0/24", b2);
    let port = free_port();
    let (code, out, err) = env.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "front,back",
        "-p",
        &format!("{port}:8080"),
        IMAGE,
        "/bin/busybox",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/etc",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let mut body = None;
    eventually("httpd answers on the published port", || {
        body = http_get(port, "/motd");
        body.is_some()
    });
    assert!(
        body.unwrap().contains("hello from caisson tests"),
        "wrong answer"
    );
    let (code, out, _) = env.run(&["inspect", "web"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nets = v[0]["networks"].as_array().unwrap();
    assert_eq!(nets.len(), 2, "{out}");
    assert_eq!(nets[0]["network"], "front");
    assert_eq!(nets[0]["interface"], "eth0");
    assert!(nets[0]["ips"][0]["address"]
        .as_str()
        .unwrap()
        .starts_with("10.231.43."));
    assert_eq!(nets[0]["ips"][0]["gateway"], "10.231.43.1");
    assert_eq!(nets[1]["network"], "back");
    assert_eq!(nets[1]["interface"], "eth1");
    assert!(v[0]["state"]["timings"]["network_us"].as_u64().unwrap() > 0);
    // The same host port again: refused, and nothing of the second task is left.
    let (code, _, err) = env.run(&[
        "run",
        "--rm",
        "--network",
        "front",
        "-p",
        &format!("{port}:8080"),
        IMAGE,
        "/bin/true",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("portmap"), "{err}");
    let (_, out, _) = env.run(&["ps", "-aq"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    // Removing the task releases everything, the forward included.
    let (code, _, err) = env.run(&["rm", "-f", &id]);
    assert_eq!(code, 0, "{err}");
    env.assert_clean(&[b1, b2]);
    assert!(http_get(port, "/motd").is_none(), "port still forwarded");
}

#[test]
fn the_supervisor_releases_the_network_after_the_launcher_is_killed() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let bridge = "cstk45";
    env.create("killnet", "10.231.45.0/24", bridge);
    let mut launcher = env
        .cmd()
        .args([
            "run",
            "--rm",
            "--name",
            "victim",
            "--network",
            "killnet",
            IMAGE,
            "sleep",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let netns = volatile_dir(env.c.root.path()).join("netns");
    eventually("the task is running", || {
        let (_, out, _) = env.run(&["ps", "-q"]);
        !out.trim().is_empty()
    });
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    // The task runs on; when it ends its supervisor removes it and releases its network.
    eventually("the task is gone and its network released", || {
        let (_, out, _) = env.run(&["ps", "-aq"]);
        out.trim().is_empty() && std::fs::read_dir(&netns).map_or(true, |mut d| d.next().is_none())
    });
    env.assert_clean(&[bridge]);
}

#[test]
fn bad_networks_fail_cleanly() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let root = env.c.root.path().to_path_buf();
    let nothing_left = |what: &str| {
        let (_, out, _) = env.run(&["ps", "-aq"]);
        assert!(out.trim().is_empty(), "{what}: task left: {out}");
        let roots: Vec<_> = std::fs::read_dir(root.join("rootfs"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(roots.is_empty(), "{what}: rootfs left: {roots:?}");
        env.assert_clean(&[]);
    };
    let (code, _, err) = env.run(&["run", "--rm", "--network", "nosuchnet", IMAGE, "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("nosuchnet"), "{err}");
    nothing_left("unknown network");

    // A configuration whose plugin does not exist.
    std::fs::write(
        env.conf.path().join("50-broken.conflist"),
        r#"{"cniVersion":"1.0.0","name":"broken","plugins":[{"type":"nosuchplugin"}]}"#,
    )
    .unwrap();
    let (code, _, err) = env.run(&["run", "--rm", "--network", "broken", IMAGE, "true"]);
    assert_eq!(code, 125);
    assert!(
        err.contains("nosuchplugin") && err.contains("broken"),
        "{err}"
    );
    nothing_left("missing plugin");

    let (code, _, err) = env.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-p",
        "1:2",
        IMAGE,
        "true",
    ]);
    assert_eq!(code, 125);
    assert!(err.contains("-p"), "{err}");
    nothing_left("ports without a network");
}

#[test]
fn a_launch_killed_during_add_fails_at_the_network_gate_and_rm_releases_it() {
    use std::os::unix::fs::PermissionsExt;
    let Some(mut env) = Env::new(&our_plugins()) else {
        return;
    };
    // A plugin that hangs in ADD, so that the launcher can be killed in the middle of it.
    let bin = tempfile::tempdir().unwrap();
    let plugin = bin.path().join("hangadd");
    let pid_file = bin.path().join("pid");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = ADD ]; then echo $$ > {}; exec sleep 30; fi\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.plugins = format!("{}:{}", bin.path().display(), env.plugins);
    std::fs::write(
        env.conf.path().join("10-hang.conflist"),
        r#"{"cniVersion":"1.0.0","name":"hang","plugins":[{"type":"hangadd"}]}"#,
    )
    .unwrap();
    let mut launcher = env
        .cmd()
        .args(["run", "--rm", "--network", "hang", IMAGE, "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let root = env.c.root.path().to_path_buf();
    // The ADD is under way (its cache entry exists) and the supervisor waits at the network
    // gate (it removes the FIFO once it has opened it).
    eventually("the supervisor waits for the ADD", || {
        walk_files(&volatile_dir(&root).join("cni")).len() == 1
            && env.run(&["ps", "-aq"]).1.trim().len() == 12
            && walk_files(&volatile_dir(&root).join("gates")).is_empty()
    });
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    // The plugin dies with the launcher (it must not finish its ADD after rm's DEL).
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    eventually("the plugin is killed with the launcher", || {
        std::fs::read_to_string(proc_dir.join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    let netns: Vec<_> = std::fs::read_dir(volatile_dir(&root).join("netns"))
        .unwrap()
        .collect();
    assert_eq!(netns.len(), 1, "the half-made launch holds a namespace");
    // The task's setup went on during the ADD; its supervisor, waiting at the network gate,
    // sees the launcher go, stops the task before it ever ran and says why.
    eventually("the task is reported failed", || {
        let (_, out, _) = env.run(&["ps", "-a", "--json"]);
        out.contains("failed")
    });
    let (_, out, _) = env.run(&["ps", "-aq"]);
    let id = out.trim().to_string();
    let (code, out, err) = env.run(&["inspect", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("before the task's network was ready"),
        "the reason is kept: {out}"
    );
    let roots: Vec<_> = std::fs::read_dir(root.join("rootfs")).unwrap().collect();
    assert_eq!(roots.len(), 1, "its root filesystem is kept until rm");
    // rm removes it and releases its network (from the cache ADD left).
    let (code, _, err) = env.run(&["rm", "-a"]);
    assert_eq!(code, 0, "{err}");
    env.assert_clean(&[]);
}

#[test]
fn rm_sweeps_what_a_killed_supervisor_left_in_the_trash() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let trash = c.root.path().join("trash");
    for (name, age) in [("old.0", "2 minutes ago"), ("fresh.0", "now")] {
        std::fs::create_dir_all(trash.join(name).join("sub")).unwrap();
        std::fs::write(trash.join(name).join("sub/f"), "x").unwrap();
        let st = std::process::Command::new("touch")
            .args(["-d", age])
            .arg(trash.join(name))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let (code, _, err) = c.run(&["rm", "-a"]);
    assert_eq!(code, 0, "{err}");
    assert!(!trash.join("old.0").exists(), "old trash entry kept");
    assert!(
        trash.join("fresh.0").exists(),
        "a deletion in progress was touched"
    );
}

/// The addresses host-local holds for `net` (a network caisson created).
fn held_ips(net: &str) -> Vec<String> {
    std::fs::read_dir(Path::new(IPAM_DATA_DIR).join(net))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// When a task exits, its supervisor releases its network itself (CNI DEL from the attachment
/// cache, then the netns): no second program. Here the `caisson` that launched the task is gone
/// before the task ends, so an exit command (`caisson cleanup`) could not even start.
#[test]
fn the_supervisor_releases_the_network_itself_when_the_task_exits() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let (bridge, net) = ("csts46", "selfnet");
    let _ = std::fs::remove_dir_all(Path::new(IPAM_DATA_DIR).join(net));
    env.create(net, "10.231.46.0/24", bridge);
    // A caisson (and its supervisor) of its own, next to the real one, that we can remove.
    let target = caisson_bin().parent().unwrap().to_path_buf();
    let bin = tempfile::tempdir_in(&target).unwrap();
    for b in ["caisson", "caisson-shim"] {
        std::fs::hard_link(target.join(b), bin.path().join(b)).unwrap();
    }
    let own = bin.path().join("caisson");
    let out = std::process::Command::new(&own)
        .arg("--root")
        .arg(env.c.root.path())
        .arg("--cni-config-dir")
        .arg(env.conf.path())
        .arg("--cni-plugin-dir")
        .arg(&env.plugins)
        .args(["run", "-d", "--network", net, IMAGE, "sleep", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::remove_file(&own).unwrap();
    assert_eq!(held_ips(net).len(), 1, "the task holds an address");
    let root = env.c.root.path().to_path_buf();
    eventually("the task exited and its network is released", || {
        let (_, out, _) = env.run(&["inspect", &id]);
        let exited = out.contains("\"exited\"");
        let netns_left =
            std::fs::read_dir(volatile_dir(&root).join("netns")).map_or(0, |d| d.count());
        exited && netns_left == 0 && walk_files(&volatile_dir(&root).join("cni")).is_empty()
    });
    assert!(
        held_ips(net).is_empty(),
        "address kept: {:?}",
        held_ips(net)
    );
    let (code, _, err) = env.run(&["rm", &id]);
    assert_eq!(code, 0, "{err}");
    env.assert_clean(&[bridge]);
}

/// A supervisor killed -9 never gets to release its task's network: `rm` does it, from the
/// attachment cache (DEL, netns), and the address is free again.
#[test]
fn rm_releases_the_network_of_a_task_whose_supervisor_was_killed() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let (bridge, net) = ("cstk47", "killsup");
    let _ = std::fs::remove_dir_all(Path::new(IPAM_DATA_DIR).join(net));
    env.create(net, "10.231.47.0/24", bridge);
    // A run that fails after its network was attached (which overlaps the root filesystem's
    // preparation): the attachment is undone.
    let (code, _, err) = env.run(&[
        "run",
        "--rm",
        "--network",
        net,
        "localhost/nosuch:1",
        "true",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(
        held_ips(net).is_empty(),
        "address kept: {:?}",
        held_ips(net)
    );
    env.assert_clean(&[bridge]);
    let (code, out, err) = env.run(&["run", "-d", "--network", net, IMAGE, "sleep", "30"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let (_, out, _) = env.run(&["inspect", &id]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shim = v[0]["state"]["shim_pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no shim_pid: {out}"));
    let st = std::process::Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    eventually("the supervisor is gone", || {
        !Path::new(&format!("/proc/{shim}")).exists()
    });
    assert_eq!(held_ips(net).len(), 1, "nobody released the address yet");
    let (code, _, err) = env.run(&["rm", "-f", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        held_ips(net).is_empty(),
        "address kept: {:?}",
        held_ips(net)
    );
    env.assert_clean(&[bridge]);
}

/// `bench launch --network`: every task is attached while it is set up (the network gate, as
/// `caisson run` does), the report has the network phases, and a failing network is counted
/// as each task's error with nothing left behind.
#[test]
fn bench_launch_on_a_network_gates_each_task_and_leaves_nothing() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let (bridge, net) = ("cstbench60", "benchnet");
    let _ = std::fs::remove_dir_all(Path::new(IPAM_DATA_DIR).join(net));
    env.create(net, "10.231.60.0/24", bridge);
    let bench = |network: &str| -> serde_json::Value {
        let (_, out, err) = env.run(&[
            "bench",
            "launch",
            "--kind",
            "native",
            "--image",
            IMAGE,
            "-n",
            "4",
            "-c",
            "2",
            "--warmup",
            "0",
            "--network",
            network,
            "--json",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            // The address is there when the task runs: the gate held its exec until the ADD.
            "busybox ip -4 addr show eth0 | grep -q 'inet 10.231.60.'",
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"))
    };
    let r = bench(net);
    assert_eq!(r["ok"], 4, "{r}");
    let names: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(&names[..3], ["rootfs", "network", "network_wait"], "{r}");
    let phase = |n: &str| {
        r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .unwrap()["min_us"]
            .as_f64()
            .unwrap()
    };
    assert!(phase("network") > 0.0, "the ADD's time is reported: {r}");
    env.assert_clean(&[bridge]);

    // A network whose plugin does not exist: every task fails with the plugin named.
    std::fs::write(
        env.conf.path().join("50-broken.conflist"),
        r#"{"cniVersion":"1.0.0","name":"broken","plugins":[{"type":"nosuchplugin"}]}"#,
    )
    .unwrap();
    let r = bench("broken");
    assert_eq!(r["ok"], 0, "{r}");
    assert_eq!(r["errors"], 4, "{r}");
    assert!(
        r["error_messages"][0]
            .as_str()
            .unwrap()
            .contains("nosuchplugin"),
        "{r}"
    );
    env.assert_clean(&[bridge]);
}

/// A task with a user namespace on a CNI network (`--userns=auto --network NET -p`): born in
/// the prepared namespace, its root (unprivileged on the host) serves port 80 through the
/// published port, sees its own interfaces in /sys, and nothing is left after it.
#[test]
fn userns_task_on_a_network_serves_its_published_port() {
    let Some(env) = Env::new(&our_plugins()) else {
        return;
    };
    let bridge = "cstu46";
    env.create("unet", "10.231.48.0/24", bridge);
    let port = free_port();
    let (code, out, err) = env.run(&[
        "run",
        "-d",
        "--userns=auto",
        "--network",
        "unet",
        "-p",
        &format!("{port}:80"),
        IMAGE,
        "/bin/busybox",
        "sh",
        "-c",
        "cat /proc/self/uid_map > /etc/motd; ls /sys/class/net >> /etc/motd; \
         exec /bin/busybox httpd -f -p 80 -h /etc",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let mut body = None;
    eventually("httpd answers on the published port", || {
        body = http_get(port, "/motd");
        body.is_some()
    });
    let body = body.unwrap();
    let map: Vec<u64> = body
        .lines()
        .find_map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            (v.len() == 3).then_some(v)
        })
        .unwrap_or_else(|| panic!("no uid map in {body}"));
    assert_eq!((map[0], map[2]), (0, 65536), "{body}");
    assert!(map[1] > 0, "root inside is not the host's root: {body}");
    // Its own sysfs: its interfaces, none of the host's.
    let ifaces: Vec<&str> = body
        .lines()
        .filter(|l| !l.contains(' ') && !l.is_empty())
        .collect();
    assert!(ifaces.contains(&"eth0") && ifaces.contains(&"lo"), "{body}");
    assert!(
        !ifaces.contains(&bridge),
        "the host's interfaces show: {body}"
    );
    let (code, _, err) = env.run(&["rm", "-f", &id]);
    assert_eq!(code, 0, "{err}");
    env.assert_clean(&[bridge]);
    let claims = std::fs::read_dir(env.c.root.path().join("userns"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(claims, 0, "user namespace slot still claimed");
}
