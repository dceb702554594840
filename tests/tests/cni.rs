//! CNI end to end (as root): caisson's runtime (`containerizer::net`) driving the reference
//! plugins from Debian's containernetworking-plugins and our own (`cni-plugins`), and a
//! conformance comparison of the two on the same ADD/CHECK/DEL scenarios, spec 1.0.0 and 0.4.0.
//!
//! Network safety: only netns files this test creates (`caisson-test-*`), `cst*` bridges and
//! 10.232.0.0/16; everything is removed by guards, also when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use caisson_tests::{require_root, require_tool};
use containerizer::net::{Cni, CniOptions, NetError, Netns, NetworkRequest};
use serde_json::{json, Value};

const REFERENCE: &str = "/usr/lib/cni";

/// Our plugin binaries (`{bridge,host-local,loopback}` in `caisson_tests::bin_dir`).
fn our_plugins() -> PathBuf {
    let dir = caisson_tests::bin_dir();
    for p in ["bridge", "host-local", "loopback"] {
        assert!(
            dir.join(p).exists(),
            "{} not built: run `cargo build --workspace` first",
            dir.join(p).display()
        );
    }
    dir
}

fn prerequisites() -> bool {
    require_root()
        && require_tool("busybox")
        && require_tool("nsenter")
        && (Path::new(REFERENCE).join("bridge").exists() || {
            assert!(
                std::env::var_os("CI").is_none(),
                "containernetworking-plugins missing"
            );
            eprintln!("skipping: containernetworking-plugins not installed");
            false
        })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One test's world: config/state/IPAM dirs, its bridge and netns files; removed on drop.
struct World {
    dir: tempfile::TempDir,
    bridge: String,
    netns: Vec<PathBuf>,
}

impl World {
    fn new(bridge: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", bridge]).output();
        World {
            dir: tempfile::tempdir().unwrap(),
            bridge: bridge.into(),
            netns: vec![],
        }
    }

    fn netns(&mut self) -> PathBuf {
        let p = self
            .dir
            .path()
            .join(format!("caisson-test-{}", self.netns.len()));
        Netns::create(&p).unwrap();
        self.netns.push(p.clone());
        p
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Writes `<name>.conflist` with a bridge (+host-local) chain, and a loopback network.
    fn cni(&self, plugins: &Path, version: &str, subnet: &str, extra: &[Value]) -> Cni {
        self.cni_with(plugins, version, &[subnet], extra)
    }

    /// Like [`World::cni`], one address per subnet (e.g. IPv4 + IPv6).
    fn cni_with(&self, plugins: &Path, version: &str, subnets: &[&str], extra: &[Value]) -> Cni {
        let nd = self.dir.path().join("net.d");
        std::fs::create_dir_all(&nd).unwrap();
        let mut chain = vec![json!({
            "type": "bridge", "bridge": self.bridge, "isGateway": true, "hairpinMode": true,
            "ipam": {"type": "host-local", "dataDir": self.ipam_dir(),
                     "ranges": subnets.iter().map(|s| json!([{"subnet": s}])).collect::<Vec<_>>(),
                     "routes": subnets.iter().map(|s| json!({"dst": if s.contains(':') { "::/0" } else { "0.0.0.0/0" }})).collect::<Vec<_>>()}
        })];
        chain.extend(extra.iter().cloned());
        let br = json!({"cniVersion": version, "name": "br", "plugins": chain});
        std::fs::write(nd.join("br.conflist"), br.to_string()).unwrap();
        let lo = json!({"cniVersion": version, "name": "lo", "type": "loopback"});
        std::fs::write(nd.join("lo.conf"), lo.to_string()).unwrap();
        Cni::new(CniOptions {
            config_dir: nd,
            plugin_dirs: vec![plugins.to_path_buf()],
            state_dir: self.dir.path().join("state"),
            timeout: Duration::from_secs(20),
        })
    }

    fn ports_on_bridge(&self) -> usize {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Ports on the bridge once pending deletions are through: our bridge finishes deleting a
    /// veth pair in the background after DEL, and the kernel destroys a deleted namespace's
    /// interfaces asynchronously.
    fn ports_settled(&self) -> usize {
        self.ports_settled_to(0)
    }

    /// Like [`World::ports_settled`], waiting for at most `n` ports.
    fn ports_settled_to(&self, n: usize) -> usize {
        for _ in 0..60 {
            if self.ports_on_bridge() <= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ports_on_bridge()
    }

    fn held_ips(&self) -> usize {
        std::fs::read_dir(self.ipam_dir().join("br"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::IpAddr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for p in &self.netns {
            let _ = containerizer::net::delete_netns(p);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

fn in_ns(ns: &Path, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(args)
        .output()
        .unwrap()
}

fn json_in_ns(ns: &Path, args: &[&str]) -> Value {
    serde_json::from_slice(&in_ns(ns, args).stdout).unwrap_or(Value::Null)
}

/// What can be observed inside a netns: links (name, state), addresses (no link-local), routes.
fn netns_state(ns: &Path) -> Value {
    let links: Vec<Value> = json_in_ns(ns, &["ip", "-j", "link", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            json!([
                l["ifname"],
                l["flags"]
                    .as_array()
                    .is_some_and(|f| f.contains(&json!("UP")))
            ])
        })
        .collect();
    let mut addrs: Vec<Value> = Vec::new();
    for l in json_in_ns(ns, &["ip", "-j", "addr", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        for a in l["addr_info"].as_array().cloned().unwrap_or_default() {
            if a["scope"] != "link" {
                addrs.push(json!([l["ifname"], a["local"], a["prefixlen"]]));
            }
        }
    }
    let routes: Vec<Value> = json_in_ns(ns, &["ip", "-j", "route", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| json!([r["dst"], r["gateway"], r["dev"]]))
        .collect();
    let routes6: Vec<Value> = json_in_ns(ns, &["ip", "-6", "-j", "route", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|r| !r["dst"].as_str().is_some_and(|d| d.starts_with("fe80")))
        .map(|r| json!([r["dst"], r["gateway"], r["dev"], r["protocol"]]))
        .collect();
    json!({"links": links, "addrs": addrs, "routes": routes, "routes6": routes6})
}

/// A result with the parts that legitimately differ (random veth names, MACs) normalised.
fn normalise(r: &containerizer::net::CniResult) -> Value {
    let mut v = serde_json::to_value(r).unwrap();
    for i in v["interfaces"].as_array_mut().into_iter().flatten() {
        if i["name"].as_str().is_some_and(|n| n.starts_with("veth")) {
            i["name"] = json!("veth*");
        }
        i["mac"] = json!(i["mac"].as_str().is_some_and(|m| m.len() == 17));
        i["sandbox"] = json!(i
            .get("sandbox")
            .is_some_and(|s| s.as_str().is_some_and(|s| !s.is_empty())));
    }
    for ip in v["ips"].as_array_mut().into_iter().flatten() {
        // 0.4.0 "version" is optional in our reading; compare addresses, not that field.
        ip.as_object_mut().unwrap().remove("version");
    }
    v
}

/// The scenario both plugin sets go through; returns everything observable.
fn scenario(plugins: &Path, version: &str, bridge: &str, third: u8) -> Value {
    let mut w = World::new(bridge);
    let (subnet, subnet6) = (
        format!("10.232.{third}.0/24"),
        format!("fd00:232:{third}::/64"),
    );
    let cni = w.cni_with(plugins, version, &[&subnet, &subnet6], &[]);
    let (a, b) = (w.netns(), w.netns());
    let rt = rt();
    let mut obs = json!({});
    rt.block_on(async {
        // Two networks on one task (loopback and the bridge), one on the other.
        let nets = [
            NetworkRequest {
                ifname: Some("lo".into()),
                ..NetworkRequest::new("lo")
            },
            NetworkRequest::new("br"),
        ];
        let atts = cni.setup("task-a", &a, &nets).await.unwrap();
        let atts_b = cni
            .setup("task-b", &b, &[NetworkRequest::new("br")])
            .await
            .unwrap();
        obs["result_lo"] = normalise(atts[0].result.as_ref().unwrap());
        obs["result_br"] = normalise(atts[1].result.as_ref().unwrap());
        obs["ns_a"] = netns_state(&a);
        let gw = format!("10.232.{third}.1");
        let ip_b = atts_b[0].ips()[0].to_string();
        let ping = |ns: &Path, ip: &str| {
            in_ns(ns, &["busybox", "ping", "-c", "1", "-W", "2", ip])
                .status
                .success()
        };
        obs["a_to_gw"] = json!(ping(&a, &gw));
        obs["a_to_b"] = json!(ping(&a, &ip_b));
        obs["ports_on_bridge"] = json!(w.ports_on_bridge());
        obs["held_ips"] = json!(w.held_ips());
        let br_addrs: Value = serde_json::from_slice(
            &Command::new("ip")
                .args(["-j", "addr", "show", bridge])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        obs["bridge_has_gw"] = json!(br_addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["local"] == json!(gw)));
        obs["check_a"] = json!(cni
            .check("task-a", "br", "eth0")
            .await
            .map_err(|e| e.to_string()));
        obs["check_lo"] = json!(cni
            .check("task-a", "lo", "lo")
            .await
            .map_err(|e| e.to_string()));
        // Break the task's interface: CHECK must notice.
        in_ns(&a, &["ip", "addr", "flush", "dev", "eth0"]);
        obs["check_broken_fails"] = json!(cni.check("task-a", "br", "eth0").await.is_err());

        cni.teardown("task-a").await.unwrap();
        // Our bridge finishes deleting the veth pair in the background: allow for that.
        for _ in 0..50 {
            if netns_state(&a)["links"]
                .as_array()
                .is_some_and(|l| l.len() == 1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        obs["ns_a_after_del"] = netns_state(&a);
        // DEL after the task's netns is gone, from a "restarted" runtime.
        containerizer::net::delete_netns(&b).unwrap();
        Cni::new(cni.options().clone())
            .teardown("task-b")
            .await
            .unwrap();
        // The kernel destroys a namespace (and its veth ends) asynchronously: give it a moment.
        for _ in 0..50 {
            if w.ports_on_bridge() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        obs["ports_after_del"] = json!(w.ports_on_bridge());
        obs["held_after_del"] = json!(w.held_ips());
        obs["del_again"] = json!(cni.del("task-a", "br", "eth0").await.is_ok());

        // Exhausted range (a /30 has one task address): a clear error, nothing left behind.
        let w2 = World::new(&format!("{bridge}x"));
        let small = w2.cni(plugins, version, &format!("10.232.{}.0/30", third + 1), &[]);
        let mut w2 = w2;
        let (c, d) = (w2.netns(), w2.netns());
        small
            .setup("c", &c, &[NetworkRequest::new("br")])
            .await
            .unwrap();
        let e = small
            .setup("d", &d, &[NetworkRequest::new("br")])
            .await
            .unwrap_err();
        obs["exhausted"] = json!(e.to_string().contains("no IP addresses available"));
        obs["exhausted_ports"] = json!(w2.ports_settled_to(1));
        obs["exhausted_held"] = json!(w2.held_ips());
        small.teardown("c").await.unwrap();
        drop(w2);

        // Incompatible version: spec error code 1.
        let nd = w.dir.path().join("net.d");
        std::fs::write(
            nd.join("bad.conf"),
            r#"{"cniVersion":"9.9.9","name":"bad","type":"loopback"}"#,
        )
        .unwrap();
        let e = cni
            .setup("e", &a, &[NetworkRequest::new("bad")])
            .await
            .unwrap_err();
        obs["bad_version_code"] = json!(match e {
            NetError::Plugin { error, .. } => error.code,
            other => panic!("{other}"),
        });
    });
    obs
}

fn conformance(version: &str, third: u8) {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    let bridge = format!("cstcf{}", version.replace('.', ""));
    let reference = scenario(Path::new(REFERENCE), version, &bridge, third);
    let mine = scenario(&ours, version, &bridge, third);
    // The reference behaviour we rely on, spelled out (so a drift in both is noticed too).
    assert_eq!(reference["a_to_gw"], json!(true), "{reference:#}");
    assert_eq!(reference["a_to_b"], json!(true));
    assert_eq!(reference["ports_on_bridge"], json!(2));
    assert_eq!(reference["ports_after_del"], json!(0));
    assert_eq!(reference["held_after_del"], json!(0));
    assert_eq!(reference["exhausted"], json!(true));
    assert_eq!(reference["check_a"], json!({"Ok": null}));
    assert_eq!(
        reference["result_br"]["ips"].as_array().unwrap().len(),
        2,
        "dual stack"
    );
    assert_eq!(
        reference["ns_a"]["routes6"].as_array().unwrap().len(),
        2,
        "{reference:#}"
    );
    let mut diffs = Vec::new();
    for (k, v) in reference.as_object().unwrap() {
        if mine.get(k) != Some(v) {
            diffs.push(format!(
                "{k}:\n  reference {v}\n  ours      {}",
                mine.get(k).unwrap_or(&Value::Null)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "ours differs from the reference ({version}):\n{}",
        diffs.join("\n")
    );
}

#[test]
fn root_conformance_vs_reference_1_0_0() {
    conformance("1.0.0", 10);
}

#[test]
fn root_conformance_vs_reference_0_4_0() {
    conformance("0.4.0", 20);
}

/// Our plugins speak the protocol to any runtime: raw env + stdin, VERSION, error documents.
#[test]
fn our_plugins_answer_version_and_errors_like_the_reference() {
    let ours = our_plugins();
    for p in ["bridge", "host-local", "loopback"] {
        for dir in [ours.as_path(), Path::new(REFERENCE)] {
            if !dir.join(p).exists() {
                continue;
            }
            let run = |env: &[(&str, &str)], stdin: &str| {
                use std::io::Write;
                let mut c = Command::new(dir.join(p))
                    .env_clear()
                    .envs(env.iter().copied())
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                // A plugin may exit before reading its input.
                let _ = c.stdin.take().unwrap().write_all(stdin.as_bytes());
                let out = c.wait_with_output().unwrap();
                (
                    out.status.code(),
                    serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
                )
            };
            let (code, v) = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
            assert_eq!(code, Some(0), "{p} in {}", dir.display());
            let sv = v["supportedVersions"].as_array().unwrap();
            assert!(
                sv.contains(&json!("0.4.0")) && sv.contains(&json!("1.0.0")),
                "{v}"
            );
            // Missing environment: code 4 and a non-zero exit.
            let (code, v) = run(
                &[("CNI_COMMAND", "ADD")],
                r#"{"cniVersion":"1.0.0","name":"x","type":"t"}"#,
            );
            assert_eq!(code, Some(1), "{p} in {}: {v}", dir.display());
            assert_eq!(v["code"], json!(4), "{p} in {}: {v}", dir.display());
            assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
}

/// Many tasks attaching at once to one network through our plugins: distinct addresses.
#[test]
fn root_our_plugins_concurrent_adds_distinct_ips() {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    let mut w = World::new("cstconc0");
    let cni = w.cni(&ours, "1.0.0", "10.232.30.0/24", &[]);
    let nss: Vec<PathBuf> = (0..10).map(|_| w.netns()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, ns) in nss.iter().enumerate() {
            let (cni, ns) = (cni.clone(), ns.clone());
            tasks.push(tokio::spawn(async move {
                cni.setup(&format!("t{i}"), &ns, &[NetworkRequest::new("br")])
                    .await
                    .unwrap()[0]
                    .ips()[0]
            }));
        }
        let mut ips = Vec::new();
        for t in tasks {
            ips.push(t.await.unwrap());
        }
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 10);
        assert_eq!(w.held_ips(), 10);
        for i in 0..10 {
            cni.teardown(&format!("t{i}")).await.unwrap();
        }
    });
    assert_eq!((w.ports_settled(), w.held_ips()), (0, 0));
}

/// `-p HOSTPORT:CTRPORT` through the runtime's `portMappings` capability, with the reference
/// `portmap` and with ours: a TCP connection to the host's loopback reaches the task; DEL
/// removes the forwarding; ours refuses a host port already forwarded to another task.
#[test]
fn root_port_mapping_reaches_the_task_from_host_loopback() {
    if !prerequisites() || !require_tool("iptables") {
        return;
    }
    let ours = our_plugins();
    port_mapping(Path::new(REFERENCE), "cstpm0", 41, 0);
    port_mapping(&ours, "cstpm1", 42, 1);
}

fn port_mapping(plugins: &Path, bridge: &str, third: u8, n: u16) {
    let mut w = World::new(bridge);
    let extra = [json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true})];
    let cni = w.cni(plugins, "1.0.0", &format!("10.232.{third}.0/24"), &extra);
    let (ns, ns2) = (w.netns(), w.netns());
    // An unusual host port, so no real service on this host is shadowed even briefly.
    let host_port = 39000 + (std::process::id() % 500) as u16 * 2 + n;
    let req = NetworkRequest {
        port_mappings: vec![format!("{host_port}:8080/tcp").parse().unwrap()],
        ..NetworkRequest::new("br")
    };
    let rt = rt();
    struct Teardown<'a>(&'a Cni, &'a tokio::runtime::Runtime);
    impl Drop for Teardown<'_> {
        fn drop(&mut self) {
            let _ = self.1.block_on(self.0.teardown("pm"));
            let _ = self.1.block_on(self.0.teardown("pm2"));
        }
    }
    let _td = Teardown(&cni, &rt);
    rt.block_on(async {
        cni.setup("pm", &ns, std::slice::from_ref(&req))
            .await
            .unwrap()
    });
    if plugins != Path::new(REFERENCE) {
        // The reference portmap does not detect conflicts; ours must, and roll back cleanly.
        let e = rt
            .block_on(cni.setup("pm2", &ns2, std::slice::from_ref(&req)))
            .unwrap_err();
        assert!(
            e.to_string().contains("already forwarded") && e.to_string().contains("portmap"),
            "{e}"
        );
        assert_eq!(w.held_ips(), 1);
    }
    let mut server = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args([
            "busybox",
            "nc",
            "-l",
            "-p",
            "8080",
            "-e",
            "echo",
            "hello-from-task",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut got = String::new();
    for _ in 0..50 {
        use std::io::Read;
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &format!("127.0.0.1:{host_port}").parse().unwrap(),
            Duration::from_millis(500),
        ) {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.read_to_string(&mut got);
            if !got.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(got.trim(), "hello-from-task", "via {}", plugins.display());
    rt.block_on(async { cni.teardown("pm").await.unwrap() });
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&format!("--dport {host_port}")),
        "forwarding left behind by {}",
        plugins.display()
    );
}

/// The launcher half of `root_teardown_after_launcher_kill_9` (runs only when that test starts
/// this test binary with CAISSON_CNI_LAUNCHER set): attaches, then waits to be killed.
#[test]
fn launcher_helper() {
    let Some(dir) = std::env::var_os("CAISSON_CNI_LAUNCHER") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let opts = CniOptions {
        config_dir: dir.join("net.d"),
        plugin_dirs: vec![dir.join("bin"), our_plugins()],
        state_dir: dir.join("state"),
        timeout: Duration::from_secs(60),
    };
    let ns = PathBuf::from(std::env::var("CAISSON_CNI_LAUNCHER_NS").unwrap());
    std::fs::write(dir.join("started"), "").unwrap();
    let _ = rt().block_on(Cni::new(opts).setup("victim", &ns, &[NetworkRequest::new("br")]));
    std::thread::sleep(Duration::from_secs(60));
}

/// kill -9 of the process that runs ADD, once after ADD and once in the middle of a chain (a
/// plugin hangs after the bridge did its work): a fresh runtime tears down from the cache and
/// nothing is left (veth, address, cache entry).
#[test]
fn root_teardown_after_launcher_kill_9() {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    for (k, hang) in [false, true].into_iter().enumerate() {
        let mut w = World::new(&format!("cstkill{k}"));
        let extra = if hang {
            vec![json!({"type": "hang"})]
        } else {
            vec![]
        };
        let cni = w.cni(&ours, "1.0.0", &format!("10.232.{}.0/24", 50 + k), &extra);
        let bin = w.dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = bin.join("hang");
        let pidfile = w.dir.path().join("hang.pid");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\necho $$ > {}\nexec sleep 60\n",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let ns = w.netns();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "launcher_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CAISSON_CNI_LAUNCHER", w.dir.path())
            .env("CAISSON_CNI_LAUNCHER_NS", &ns)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until ADD finished (its result is cached), or, with the hanging plugin, until
        // the bridge has done its part and the chain is stuck in the next plugin.
        let mut ready = false;
        let watcher = Cni::new(cni.options().clone());
        for _ in 0..200 {
            let done = if hang {
                pidfile.exists()
            } else {
                watcher
                    .attachments("victim")
                    .is_ok_and(|a| a.len() == 1 && a[0].result.is_some())
            };
            if done && w.ports_on_bridge() == 1 && w.held_ips() == 1 {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        assert!(ready, "launcher never attached");
        // The hanging plugin runs in its own process group and outlives its launcher: end it.
        if hang {
            for _ in 0..100 {
                if pidfile.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let fresh = Cni::new(CniOptions {
            plugin_dirs: vec![bin.clone(), ours.clone()],
            ..cni.options().clone()
        });
        let atts = fresh.attachments("victim").unwrap();
        assert_eq!(atts.len(), 1);
        assert_eq!(
            atts[0].result.is_none(),
            hang,
            "an unfinished ADD is cached without a result"
        );
        rt().block_on(fresh.teardown("victim")).unwrap();
        for _ in 0..50 {
            if w.ports_on_bridge() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!((w.ports_settled(), w.held_ips()), (0, 0));
        assert!(fresh.attachments("victim").unwrap().is_empty());
    }
}

/// `ipMasq` with our bridge: one masquerade rule for the network's subnet, made by the first
/// ADD, kept by DEL (other tasks of the network use it), removed with the bridge by
/// `network rm`.
#[test]
fn root_our_bridge_ip_masq_rule_is_the_networks() {
    if !prerequisites() || !require_tool("iptables") {
        return;
    }
    let ours = our_plugins();
    let mut w = World::new("cstmasq0");
    let cni = w.cni(&ours, "1.0.0", "10.232.60.0/24", &[]);
    // Turn ipMasq on in the written config.
    let p = w.dir.path().join("net.d/br.conflist");
    let mut conf: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    conf["plugins"][0]["ipMasq"] = json!(true);
    std::fs::write(&p, conf.to_string()).unwrap();
    let rules = || {
        String::from_utf8_lossy(
            &Command::new("iptables")
                .args(["-t", "nat", "-S", "POSTROUTING"])
                .output()
                .unwrap()
                .stdout,
        )
        .lines()
        .filter(|l| l.contains("\"caisson-cni br\""))
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let rt = rt();
    let (a, b) = (w.netns(), w.netns());
    rt.block_on(cni.setup("masq1", &a, &[NetworkRequest::new("br")]))
        .unwrap();
    rt.block_on(cni.setup("masq2", &b, &[NetworkRequest::new("br")]))
        .unwrap();
    let r = rules();
    let t1 = rt.block_on(cni.teardown("masq1"));
    let after_one = rules();
    let t2 = rt.block_on(cni.teardown("masq2"));
    let after_both = rules();
    let removed = cni.remove_network("br", false);
    let after_rm = rules();
    let bridge_left = Path::new("/sys/class/net/cstmasq0").exists();
    t1.unwrap();
    t2.unwrap();
    removed.unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(
        r[0].contains("-s 10.232.60.0/24 ! -d 10.232.60.0/24") && r[0].contains("MASQUERADE"),
        "{r:?}"
    );
    assert_eq!(after_one, r);
    assert_eq!(after_both, r);
    assert!(after_rm.is_empty(), "{after_rm:?}");
    assert!(!bridge_left, "network rm left the bridge");
}

/// Spec 1.1 with our plugins: STATUS answers, GC releases the addresses of attachments that
/// are not valid any more (e.g. leaked by a crash), and keeps the others.
#[test]
fn root_our_plugins_status_and_gc_1_1_0() {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    let mut w = World::new("cstgc0");
    let cni = w.cni(&ours, "1.1.0", "10.232.61.0/24", &[]);
    let (a, b) = (w.netns(), w.netns());
    let rt = rt();
    rt.block_on(async {
        cni.status("br").await.unwrap();
        let keep = cni
            .setup("keep", &a, &[NetworkRequest::new("br")])
            .await
            .unwrap();
        assert_eq!(keep[0].result.as_ref().unwrap().cni_version, "1.1.0");
        cni.setup("leak", &b, &[NetworkRequest::new("br")])
            .await
            .unwrap();
        assert_eq!(w.held_ips(), 2);
        cni.gc("br", Some(&[("keep".to_owned(), "eth0".to_owned())]))
            .await
            .unwrap();
        assert_eq!(w.held_ips(), 1);
        // GC with what the cache knows keeps both (none is leaked from its point of view).
        cni.gc("br", None).await.unwrap();
        assert_eq!(w.held_ips(), 1);
        cni.teardown("keep").await.unwrap();
        cni.teardown("leak").await.unwrap();
        assert_eq!(w.held_ips(), 0);
    });
}

/// A third-party CNI runtime drives our plugins: podman (CNI backend, runc) runs a container on
/// a network made of our bridge + host-local + portmap; the container gets an address, reaches
/// its gateway, and podman's teardown leaves nothing behind. Podman keeps its storage in a
/// temporary directory (vfs driver), so the host's containers are not touched.
#[test]
fn root_podman_drives_our_plugins() {
    if !prerequisites() || !require_tool("podman") || !require_tool("runc") {
        return;
    }
    let ours = our_plugins();
    let w = World::new("cstpod0");
    let d = w.dir.path();
    let nd = d.join("net.d");
    std::fs::create_dir_all(&nd).unwrap();
    let conf = json!({"cniVersion": "1.0.0", "name": "cstnet", "plugins": [
        {"type": "bridge", "bridge": "cstpod0", "isGateway": true,
         "ipam": {"type": "host-local", "dataDir": d.join("ipam"),
                  "ranges": [[{"subnet": "10.232.80.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    std::fs::write(nd.join("cstnet.conflist"), conf.to_string()).unwrap();
    std::fs::write(
        d.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
            ours.display(),
            nd.display()
        ),
    )
    .unwrap();
    // A one-binary image: busybox-static.
    let rootfs = d.join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("busybox")).unwrap();
    for a in ["sh", "ip", "ping", "grep", "tail"] {
        std::os::unix::fs::symlink("busybox", rootfs.join(a)).unwrap();
    }
    let podman = |args: &[&str]| {
        Command::new("podman")
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let tar = d.join("img.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(d.join("rootfs"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let out = podman(&["import", tar.to_str().unwrap(), "localhost/cst-busybox:1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = podman(&[
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--network",
        "cstnet",
        "localhost/cst-busybox:1",
        "sh",
        "-c",
        "ip -4 addr show eth0 | grep inet; ping -c 1 -W 2 10.232.80.1 | grep received",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("inet 10.232.80.") && stdout.contains("1 packets received"),
        "{stdout}"
    );
    assert_eq!((w.ports_settled(), held(&d.join("ipam/cstnet"))), (0, 0));
}

fn held(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .parse::<std::net::IpAddr>()
                        .is_ok()
                })
                .count()
        })
        .unwrap_or(0)
}

/// Copies `from` to `to`, executable, keeping only its first `keep` bytes (all when `None`).
fn install(from: &Path, to: &Path, keep: Option<usize>) {
    use std::os::unix::fs::PermissionsExt;
    let mut b = std::fs::read(from).unwrap();
    if let Some(n) = keep {
        b.truncate(n);
    }
    std::fs::write(to, b).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The runtime runs our own plugin binaries (this build's, by their identity note) in-process:
/// here they are cut down to their first 64 KiB (headers and notes), which could never be
/// exec'd, and still ADD and DEL (with the netns released right after) work, host-local
/// included (our bridge runs it in-process too).
#[test]
fn root_our_plugin_binaries_run_in_process() {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    let mut w = World::new("cstinp0");
    let cut = w.dir.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for p in ["bridge", "host-local", "loopback"] {
        install(&ours.join(p), &cut.join(p), Some(64 * 1024));
        assert!(
            Command::new(cut.join(p)).output().is_err()
                || !Command::new(cut.join(p)).output().unwrap().status.success(),
            "a cut-down {p} must not be executable"
        );
    }
    let cni = w.cni(&cut, "1.0.0", "10.232.70.0/24", &[]);
    let ns = w.netns();
    let rt = rt();
    let atts = rt
        .block_on(cni.setup(
            "inproc",
            &ns,
            &[NetworkRequest::new("br"), NetworkRequest::new("lo")],
        ))
        .unwrap();
    let ip = atts[0].ips()[0].to_string();
    assert!(ip.starts_with("10.232.70."), "{ip}");
    let addrs = json_in_ns(&ns, &["ip", "-j", "-4", "addr", "show", "eth0"]);
    assert!(addrs.to_string().contains(&ip), "{addrs}");
    assert_eq!((w.ports_on_bridge(), w.held_ips()), (1, 1));
    // DEL knowing the netns goes next: the veth goes with the namespace.
    rt.block_on(cni.release("inproc", &ns)).unwrap();
    assert!(!ns.exists(), "netns file left");
    assert_eq!((w.ports_settled(), w.held_ips()), (0, 0));
    assert!(cni.attachments("inproc").unwrap().is_empty());
}

/// Our bridge runs host-local in-process only when the `host-local` on CNI_PATH is ours: any
/// other IPAM binary of that name is exec'd as the spec says, with the full CNI environment
/// (also when the bridge itself runs in-process, where there is no CNI_* environment to
/// inherit).
#[test]
fn root_our_bridge_execs_a_host_local_that_is_not_ours() {
    if !prerequisites() {
        return;
    }
    let ours = our_plugins();
    let mut w = World::new("cstipam0");
    let bin = w.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    install(&ours.join("bridge"), &bin.join("bridge"), None);
    let log = w.dir.path().join("ipam.log");
    std::fs::write(
        bin.join("host-local"),
        format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS\" >> {}\n\
             [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.232.71.77/24\",\"gateway\":\"10.232.71.1\"}}]}}'\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("host-local"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cni = w.cni(&bin, "1.0.0", "10.232.71.0/24", &[]);
    let ns = w.netns();
    let rt = rt();
    let atts = rt
        .block_on(cni.setup("foreignipam", &ns, &[NetworkRequest::new("br")]))
        .unwrap();
    assert_eq!(atts[0].ips()[0].to_string(), "10.232.71.77");
    rt.block_on(cni.teardown("foreignipam")).unwrap();
    let calls = std::fs::read_to_string(&log).unwrap();
    let want = |c: &str| format!("{c} foreignipam eth0 {}", ns.display());
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [want("ADD"), want("DEL")],
        "{calls}"
    );
    assert_eq!(w.ports_settled(), 0);
}
