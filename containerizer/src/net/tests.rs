//! Unit tests, and root tests against the reference plugins in /usr/lib/cni (own netns files,
//! `cst*` bridges and 10.231.0.0/16 only; everything removed by guards, also on failure).

use super::*;
use std::process::Command as Proc;
use std::sync::atomic::{AtomicU32, Ordering};

#[test]
fn port_mapping_parses_like_podman() {
    let p: PortMapping = "8080:80".parse().unwrap();
    assert_eq!(
        (p.host_port, p.container_port, p.protocol.as_str()),
        (8080, 80, "tcp")
    );
    let p: PortMapping = "127.0.0.1:53:5353/UDP".parse().unwrap();
    assert_eq!(p.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(p.protocol, "udp");
    for bad in ["80", "0:80", "a:80", "80:80/icmp", "x.y:1:2", "1:2:3:4"] {
        assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
    }
    assert_eq!(
        serde_json::to_value("1:2".parse::<PortMapping>().unwrap()).unwrap(),
        json!({"hostPort": 1, "containerPort": 2, "protocol": "tcp"})
    );
}

#[test]
fn stdin_carries_name_version_prev_result_and_only_wanted_capabilities() {
    let net = NetworkConfigList::from_conflist(
        br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},
            {"type":"portmap","capabilities":{"portMappings":true,"bandwidth":false}}]}"#,
        None,
    )
    .unwrap();
    let mut caps = Map::new();
    caps.insert("portMappings".into(), json!([{"hostPort": 1}]));
    caps.insert("bandwidth".into(), json!({}));
    let prev = json!({"cniVersion": "1.0.0"});
    let v: Value =
        serde_json::from_slice(&plugin_stdin(&net, &net.plugins[1], Some(&prev), &caps)).unwrap();
    assert_eq!(v["name"], "n");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["prevResult"], prev);
    assert_eq!(
        v["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 1}]})
    );
    let v: Value =
        serde_json::from_slice(&plugin_stdin(&net, &net.plugins[0], None, &caps)).unwrap();
    assert!(v.get("runtimeConfig").is_none() && v.get("prevResult").is_none());
}

#[test]
fn configs_load_by_name_and_bad_ones_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("10-a.conf"),
        r#"{"cniVersion":"0.4.0","name":"a","type":"bridge"}"#,
    )
    .unwrap();
    std::fs::write(
        d.path().join("20-b.conflist"),
        r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
    )
    .unwrap();
    std::fs::write(d.path().join("30-broken.conflist"), "{not json").unwrap();
    std::fs::write(
        d.path().join("40-evil.conf"),
        r#"{"name":"evil","type":"../../bin/sh"}"#,
    )
    .unwrap();
    let a = config::load(d.path(), "a").unwrap();
    assert_eq!(a.plugin_types(), ["bridge"]);
    assert_eq!(a.cni_version, "0.4.0");
    assert_eq!(
        config::load(d.path(), "b").unwrap().plugin_types(),
        ["bridge", "portmap"]
    );
    let e = config::load(d.path(), "nope").unwrap_err();
    assert!(matches!(e, NetError::UnknownNetwork { .. }), "{e}");
    let e = config::load(d.path(), "30-broken").unwrap_err();
    assert!(e.to_string().contains("30-broken.conflist"), "{e}");
    let e = config::load_all(d.path()).unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    std::fs::remove_file(d.path().join("30-broken.conflist")).unwrap();
    let e = config::load(d.path(), "evil").unwrap_err();
    assert!(e.to_string().contains("invalid plugin type"), "{e}");
}

#[test]
fn network_create_ls_inspect_rm_and_default() {
    let d = tempfile::tempdir().unwrap();
    let cni = Cni::new(CniOptions {
        config_dir: d.path().join("net.d"),
        state_dir: d.path().join("state"),
        ..CniOptions::default()
    });
    assert!(cni.networks().unwrap().is_empty());
    let def = cni.ensure_default_network().unwrap();
    assert_eq!(def.name, DEFAULT_NETWORK);
    assert_eq!(def.plugin_types(), ["bridge", "portmap"]);
    assert!(d.path().join("net.d/caisson.conflist").exists());
    // Second call reads, does not rewrite.
    assert_eq!(cni.ensure_default_network().unwrap().name, DEFAULT_NETWORK);
    let n = cni.create_network(&NetworkCreate::new("web")).unwrap();
    assert_eq!(
        config::used_subnets(std::slice::from_ref(&n)),
        ["10.89.1.0/24".parse().unwrap()]
    );
    let n2 = cni.create_network(&NetworkCreate::new("db")).unwrap();
    assert_eq!(
        config::used_subnets(&[n2]),
        ["10.89.2.0/24".parse().unwrap()]
    );
    assert!(matches!(
        cni.create_network(&NetworkCreate::new("web")),
        Err(NetError::NetworkExists(_))
    ));
    let mut clash = NetworkCreate::new("clash");
    clash.subnet = Some("10.88.5.0/24".parse().unwrap());
    assert!(cni
        .create_network(&clash)
        .unwrap_err()
        .to_string()
        .contains("overlaps"));
    assert!(cni.create_network(&NetworkCreate::new("a/b")).is_err());
    let names: Vec<String> = cni
        .networks()
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["caisson", "db", "web"]);
    assert_eq!(cni.network("web").unwrap().plugins[0]["bridge"], "cni-web");
    cni.remove_network("web", false).unwrap();
    assert!(matches!(
        cni.network("web"),
        Err(NetError::UnknownNetwork { .. })
    ));
    assert!(matches!(
        cni.remove_network("web", false),
        Err(NetError::UnknownNetwork { .. })
    ));
}

#[test]
fn plugin_error_document_is_surfaced() {
    let e = PluginError::from_output(
        br#"{"cniVersion":"1.0.0","code":11,"msg":"no IP addresses available","details":"range 10.0.0.0/30"}"#,
        b"",
        "exit status: 1",
    );
    assert_eq!(
        e.to_string(),
        "[code 11] no IP addresses available: range 10.0.0.0/30"
    );
    let e = PluginError::from_output(b"", b"panic: boom", "exit status: 2");
    assert!(
        e.to_string().contains("boom") && e.to_string().contains("exit status: 2"),
        "{e}"
    );
}

#[test]
fn volatile_dirs_are_per_store_and_networks_we_write_keep_ipam_there() {
    let a = volatile_dir(Path::new("/var/lib/caisson"));
    assert_eq!(a, volatile_dir(Path::new("/var/lib/caisson")));
    assert_ne!(a, volatile_dir(Path::new("/tmp/other-store")));
    assert!(a.starts_with(RUN_DIR), "{}", a.display());
    let net = config::bridge_conflist(
        &NetworkCreate::new("vol"),
        "10.231.99.0/24".parse().unwrap(),
    )
    .unwrap();
    assert_eq!(net.plugins[0]["ipam"]["dataDir"], json!(IPAM_DATA_DIR));
}

#[test]
fn root_volatile_state_is_on_tmpfs() {
    if !require_root() {
        return;
    }
    volatile::ensure_tmpfs().unwrap();
    let fs = nix::sys::statfs::statfs(RUN_DIR).unwrap();
    assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    // Once, not stacked: the mount table holds at most one mount at RUN_DIR.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(RUN_DIR))
        .count();
    assert!(at <= 1, "{at} mounts at {RUN_DIR}");
}

// ---- root tests with the reference plugins ---------------------------------------------------

pub(crate) fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root, and CI must run it");
    }
    eprintln!("skipping: needs root");
    false
}

const REF: &str = "/usr/lib/cni";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A private network for one test: temp config/state/IPAM dirs, a `cst*` bridge and a
/// 10.231.N.0/24 range, plus netns files; all removed on drop.
struct TestNet {
    dir: tempfile::TempDir,
    cni: Cni,
    name: String,
    bridge: String,
    prefix: String,
    netns: std::sync::Mutex<Vec<PathBuf>>,
}

impl TestNet {
    fn new(version: &str, extra_plugins: &[Value], subnet_len: u8) -> Self {
        // Unique per test process and test: bridge names are global on the host.
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10000;
        let bridge = format!("cstu{pid}x{n}");
        // Distinct per test in this process (n < 10), and spread across processes.
        let third = 100 + ((pid % 15) * 10 + n % 10) % 150;
        let prefix = format!("10.231.{third}");
        let dir = tempfile::tempdir().unwrap();
        let name = format!("t{n}");
        let mut plugins = vec![json!({
            "type": "bridge", "bridge": bridge, "isGateway": true,
            "ipam": {"type": "host-local", "dataDir": dir.path().join("ipam"),
                     "ranges": [[{"subnet": format!("{prefix}.0/{subnet_len}")}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}
        })];
        plugins.extend(extra_plugins.iter().cloned());
        let conf = json!({"cniVersion": version, "name": name, "plugins": plugins});
        std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
        std::fs::write(
            dir.path().join(format!("net.d/{name}.conflist")),
            conf.to_string(),
        )
        .unwrap();
        let cni = Cni::new(CniOptions {
            config_dir: dir.path().join("net.d"),
            plugin_dirs: vec![dir.path().join("bin"), REF.into()],
            state_dir: dir.path().join("state"),
            timeout: Duration::from_secs(10),
        });
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        Self {
            dir,
            cni,
            name,
            bridge,
            prefix,
            netns: Default::default(),
        }
    }

    fn netns(&self) -> PathBuf {
        let mut v = self.netns.lock().unwrap();
        let p = self.dir.path().join(format!("ns/caisson-test-{}", v.len()));
        Netns::create(&p).unwrap();
        v.push(p.clone());
        p
    }

    /// A fake plugin script in the test's own bin dir (searched first).
    fn script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("bin").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn veths_on_bridge(&self) -> usize {
        let out = Proc::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    fn held_ips(&self) -> Vec<String> {
        let d = self.dir.path().join("ipam").join(&self.name);
        std::fs::read_dir(d)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cached(&self) -> usize {
        cache::containers(&self.cni.opts.state_dir)
            .iter()
            .map(|c| cache::list(&self.cni.opts.state_dir, c).unwrap().len())
            .sum()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for p in self.netns.lock().unwrap().iter() {
            let _ = delete_netns(p);
        }
        let _ = Proc::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

fn in_ns(ns: &Path, args: &[&str]) -> std::process::Output {
    Proc::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(args)
        .output()
        .unwrap()
}

fn ping(ns: &Path, ip: &str) -> bool {
    in_ns(ns, &["busybox", "ping", "-c", "1", "-W", "2", ip])
        .status
        .success()
}

async fn add_check_del_scenario(version: &str) {
    let t = TestNet::new(version, &[], 24);
    let (a, b) = (t.netns(), t.netns());
    let atts = t
        .cni
        .setup("ca", &a, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap();
    let rb = t
        .cni
        .add(
            &t.cni.network(&t.name).unwrap(),
            "cb",
            &b,
            "eth0",
            &NetworkRequest::default(),
        )
        .await
        .unwrap();
    let ra = atts[0].result.clone().unwrap();
    assert_eq!(ra.cni_version, version);
    let ip_a = atts[0].ips()[0].to_string();
    let ip_b = rb.task_ips("eth0")[0].address.addr().to_string();
    assert!(
        ip_a.starts_with(&t.prefix) && ip_b.starts_with(&t.prefix),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);
    let gw = ra.ips[0].gateway.unwrap().to_string();
    assert_eq!(gw, format!("{}.1", t.prefix));
    // The address is really on eth0 inside the netns.
    let out = in_ns(&a, &["ip", "-o", "addr", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ip_a));
    assert!(ping(&a, &gw), "task -> gateway");
    assert!(ping(&a, &ip_b), "task -> task");
    assert!(ping(&b, &ip_a), "task -> task");
    t.cni.check("ca", &t.name, "eth0").await.unwrap();
    assert_eq!(t.cni.attachments("ca").unwrap()[0].ips(), atts[0].ips());
    assert_eq!(t.veths_on_bridge(), 2);
    assert_eq!(t.held_ips().len(), 2);

    t.cni.teardown("ca").await.unwrap();
    t.cni.del("cb", &t.name, "eth0").await.unwrap();
    assert_eq!(t.veths_on_bridge(), 0);
    assert!(t.held_ips().is_empty(), "{:?}", t.held_ips());
    assert_eq!(t.cached(), 0);
    // Idempotent.
    t.cni.del("cb", &t.name, "eth0").await.unwrap();
    t.cni.teardown("ca").await.unwrap();
    assert!(matches!(
        t.cni.check("ca", &t.name, "eth0").await,
        Err(NetError::NotAttached { .. })
    ));
}

#[tokio::test]
async fn root_reference_add_check_del_1_0_0() {
    if require_root() {
        add_check_del_scenario("1.0.0").await;
    }
}

#[tokio::test]
async fn root_reference_add_check_del_0_4_0() {
    if require_root() {
        add_check_del_scenario("0.4.0").await;
    }
}

#[tokio::test]
async fn root_del_after_restart_uses_the_cache() {
    if !require_root() {
        return;
    }
    let t = TestNet::new("1.0.0", &[], 24);
    let ns = t.netns();
    t.cni
        .setup("c1", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap();
    // "Restart": a fresh runtime, and the config file is gone meanwhile.
    std::fs::remove_dir_all(t.dir.path().join("net.d")).unwrap();
    let cni2 = Cni::new(t.cni.options().clone());
    assert_eq!(cni2.attachments("c1").unwrap().len(), 1);
    cni2.teardown("c1").await.unwrap();
    assert_eq!(t.veths_on_bridge(), 0);
    assert!(t.held_ips().is_empty());
    assert_eq!(t.cached(), 0);
}

#[tokio::test]
async fn root_bad_inputs_fail_clearly_and_leave_nothing() {
    if !require_root() {
        return;
    }
    let t = TestNet::new("1.0.0", &[json!({"type": "failing"})], 24);
    let ns = t.netns();
    // Unknown network.
    let e = t
        .cni
        .setup("c", &ns, &[NetworkRequest::new("nope")])
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::UnknownNetwork { .. }), "{e}");
    // Chained plugin that fails: its error JSON, network and plugin in the message; the bridge
    // part rolled back.
    t.script(
        "failing",
        r#"[ "$CNI_COMMAND" = DEL ] && exit 0
echo '{"cniVersion":"1.0.0","code":7,"msg":"refused","details":"by test"}'; exit 1"#,
    );
    let e = t
        .cni
        .setup("c", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("network \"{}\"", t.name))
            && msg.contains("plugin \"failing\"")
            && msg.contains("[code 7] refused: by test"),
        "{msg}"
    );
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
    // A plugin that fails DEL as well still leaves no cache entry behind once the others are
    // undone, and one that exits non-zero without JSON shows its stderr.
    t.script("failing", "echo oops >&2; exit 3");
    let e = t
        .cni
        .setup("c", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("oops") && e.to_string().contains("exit status: 3"),
        "{e}"
    );
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
    // Hanging plugin: killed at the timeout, with its children.
    let pidfile = t.dir.path().join("sleep.pid");
    t.script(
        "failing",
        &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
    );
    let cni = Cni::new(CniOptions {
        timeout: Duration::from_millis(700),
        ..t.cni.options().clone()
    });
    let start = std::time::Instant::now();
    let e = cni
        .setup("c", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "plugin child still alive: {stat}"
    );
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
    // Missing plugin binary.
    std::fs::remove_file(t.dir.path().join("bin/failing")).unwrap();
    let e = t
        .cni
        .setup("c", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    assert!(
        matches!(e, NetError::PluginNotFound { .. }) && e.to_string().contains("\"failing\""),
        "{e}"
    );
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
    // Malformed config file for the network.
    std::fs::write(
        t.dir.path().join(format!("net.d/{}.conflist", t.name)),
        "{\"name\":",
    )
    .unwrap();
    let e = t
        .cni
        .setup("c", &ns, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::BadConfig { .. }), "{e}");
}

#[tokio::test]
async fn root_exhausted_range_is_a_clear_error() {
    if !require_root() {
        return;
    }
    // A /30 has one address for tasks besides the gateway.
    let t = TestNet::new("1.0.0", &[], 30);
    let (a, b) = (t.netns(), t.netns());
    t.cni
        .setup("a", &a, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap();
    let e = t
        .cni
        .setup("b", &b, &[NetworkRequest::new(&t.name)])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("bridge") && e.to_string().contains(&t.name),
        "{e}"
    );
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (1, 1, 1)
    );
    t.cni.teardown("a").await.unwrap();
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_concurrent_adds_get_distinct_ips() {
    if !require_root() {
        return;
    }
    let t = std::sync::Arc::new(TestNet::new("1.0.0", &[], 24));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let t = t.clone();
        let ns = t.netns();
        tasks.push(tokio::spawn(async move {
            let a = t
                .cni
                .setup(&format!("c{i}"), &ns, &[NetworkRequest::new(&t.name)])
                .await
                .unwrap();
            a[0].ips()[0]
        }));
    }
    let mut ips = Vec::new();
    for task in tasks {
        ips.push(task.await.unwrap());
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8);
    for i in 0..8 {
        t.cni.teardown(&format!("c{i}")).await.unwrap();
    }
    assert_eq!(
        (t.veths_on_bridge(), t.held_ips().len(), t.cached()),
        (0, 0, 0)
    );
}

#[test]
fn root_netns_create_delete() {
    if !require_root() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("caisson-test-ns");
    let ns = Netns::create(&p).unwrap();
    assert!(crate::sys::netns::is_netns(&p));
    assert!(Netns::create(&p).is_err(), "exists");
    // Not our namespace: loopback there has no address up yet, and our thread did not move.
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = crate::sys::netns::run_in_netns(&p, || {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    })
    .unwrap();
    assert_ne!(own, inside);
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), own);
    ns.delete().unwrap();
    assert!(!p.exists());
    delete_netns(&p).unwrap();
}

#[tokio::test]
async fn status_and_gc_only_for_spec_1_1_networks() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let (nd, bin) = (d.path().join("net.d"), d.path().join("bin"));
    std::fs::create_dir_all(&nd).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let log = d.path().join("log");
    std::fs::write(
        bin.join("rec"),
        format!(
            "#!/bin/sh\nprintf '%s %s ' \"$CNI_COMMAND\" \"${{CNI_CONTAINERID:-none}}\" >> {0}\ncat >> {0}\necho >> {0}\n\
             [ \"$CNI_COMMAND\" = STATUS ] && [ -e {1} ] && {{ echo '{{\"code\":50,\"msg\":\"not ready\"}}'; exit 1; }}\nexit 0\n",
            log.display(),
            d.path().join("broken").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("rec"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        nd.join("new.conf"),
        r#"{"cniVersion":"1.1.0","name":"new","type":"rec"}"#,
    )
    .unwrap();
    std::fs::write(
        nd.join("old.conf"),
        r#"{"cniVersion":"1.0.0","name":"old","type":"rec"}"#,
    )
    .unwrap();
    let cni = Cni::new(CniOptions {
        config_dir: nd,
        plugin_dirs: vec![bin],
        state_dir: d.path().join("state"),
        timeout: Duration::from_secs(5),
    });
    cni.status("old").await.unwrap();
    cni.gc("old", None).await.unwrap();
    assert!(!log.exists(), "no STATUS/GC below 1.1.0");
    cni.status("new").await.unwrap();
    cni.gc("new", Some(&[("c1".to_owned(), "eth0".to_owned())]))
        .await
        .unwrap();
    let l = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = l.lines().collect();
    assert!(lines[0].starts_with("STATUS none {"), "{l}");
    assert!(lines[1].starts_with("GC none {"), "{l}");
    let gc: Value = serde_json::from_str(lines[1].trim_start_matches("GC none ")).unwrap();
    assert_eq!(
        gc["cni.dev/valid-attachments"],
        json!([{"containerID": "c1", "ifname": "eth0"}])
    );
    assert_eq!(gc["name"], "new");
    std::fs::write(d.path().join("broken"), "").unwrap();
    let e = cni.status("new").await.unwrap_err();
    assert!(
        e.to_string().contains("[code 50] not ready") && e.to_string().contains("STATUS"),
        "{e}"
    );
}

#[test]
fn iptables_rules_split_like_the_shell() {
    assert_eq!(
        super::split_rule(
            r#"-s 10.1.0.0/24 ! -d 10.1.0.0/24 -m comment --comment "caisson-cni a b" -j MASQUERADE"#
        ),
        [
            "-s",
            "10.1.0.0/24",
            "!",
            "-d",
            "10.1.0.0/24",
            "-m",
            "comment",
            "--comment",
            "caisson-cni a b",
            "-j",
            "MASQUERADE"
        ]
    );
}
