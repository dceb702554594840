//! Cluster tasks of every kind through a real master and real agents on loopback: Wasm
//! commands (in the agent's shared Wasm host) and wasi:http services (under their own
//! supervisors), which survive `kill -9` of the agent, native tasks on a CNI network with a host port, GPUs placed by free count (the fake
//! NVML of tests/build.rs), and the TLS path (`caisson certs` + mutual TLS).
use caisson_tests::cluster::*;
use caisson_tests::*;
use containerizer::net::{volatile_dir, IPAM_DATA_DIR};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The demo's wasi:http component (component text format, no toolchain needed).
fn http_service() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("agent/src/cluster/demo_http.wat")
}

fn state(t: &serde_json::Value) -> &str {
    t["state"].as_str().unwrap_or("")
}

#[test]
fn root_wasm_tasks_survive_agent_kill9_and_the_service_answers_until_killed() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200", "--lost-ms", "60000"]);
    let wat = c.dir.path().join("sleeper.wat");
    std::fs::write(&wat, sleeper_wat(3, 7)).unwrap();
    let _m = c.master();
    let (_w, seen) = c.watch();
    let mut a1 = c.agent("a1", JOIN);
    c.wait_agents(1);

    let port = free_port();
    let cmd = c.submit(&["--name", "sleeper", wat.to_str().unwrap()]);
    let svc = c.submit(&[
        "--http",
        "-p",
        &format!("{port}:80"),
        http_service().to_str().unwrap(),
    ]);
    let t = c.wait_task(&svc, "service running", Duration::from_secs(60), |t| {
        state(t) == "RUNNING"
    });
    assert_eq!(t["kind"], "TASK_KIND_WASM_HTTP");
    // The supervisor's phase timings came with RUNNING (they used to read as 0 at times).
    assert!(t["timings_us"]["launch_total"].as_u64().unwrap() > 0, "{t}");
    // RUNNING means serving: the first request answers.
    let reply = http_get(port, "/hello").expect("the service answers once RUNNING");
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
    assert!(reply.contains("hello from a Wasm microservice"), "{reply}");
    c.wait_task(&cmd, "command running", Duration::from_secs(30), |t| {
        state(t) == "RUNNING"
    });
    // Both have supervisors of their own: a dead agent does not take them along.
    let procs_before = c.agent_root("a1").join("containers");
    assert!(procs_before.join(&cmd).exists() && procs_before.join(&svc).exists());
    a1.kill9();
    let reply = http_get(port, "/after-kill").expect("the service outlives its agent");
    assert!(reply.contains("hello from a Wasm microservice"), "{reply}");
    // The command ends while the agent is away; the restarted agent re-adopts the service
    // and reports the command's exit from its record.
    std::thread::sleep(Duration::from_millis(3500));
    let _a1 = c.agent("a1", JOIN);
    let t = c.wait_task(&cmd, "command ended", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FAILED", "{t}");
    assert_eq!(t["exit_code"], 7, "{t}");
    assert_eq!(state(&c.task(&svc)), "RUNNING");
    assert!(http_get(port, "/readopted").is_some());

    // Killed through the master: KILLED, and the port is closed.
    let (code, _, err) = c.cli(&["cancel", "-t", "1", &svc]);
    assert_eq!(code, 0, "{err}");
    let t = c.wait_task(&svc, "service killed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "KILLED", "{t}");
    eventually("the port is closed", || http_get(port, "/").is_none());
    c.assert_no_containers("a1");

    // Exactly one terminal state per task reached the watchers.
    std::thread::sleep(Duration::from_millis(300));
    let events = terminal_events(&seen.lock().unwrap());
    for id in [&cmd, &svc] {
        assert_eq!(events.get(id).map(Vec::len), Some(1), "{id}: {events:?}");
    }
}

#[test]
fn root_bad_wasm_module_fails_with_the_engines_message() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(&[]);
    let bad = c.dir.path().join("bad.wat");
    std::fs::write(&bad, "(module (func $x (unknown-instr)))").unwrap();
    let _m = c.master();
    let _a = c.agent("a1", JOIN);
    c.wait_agents(1);
    let id = c.submit(&[bad.to_str().unwrap()]);
    let t = c.wait_task(&id, "failed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FAILED");
    assert_eq!(t["reason"], "launch_failed");
    assert!(t["message"].as_str().unwrap().contains("bad.wat"), "{t}");
    let missing = c.submit(&["/nonexistent/x.wasm"]);
    let t = c.wait_task(&missing, "failed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FAILED");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/x.wasm"),
        "{t}"
    );
    c.assert_no_containers("a1");
}

/// The CNI plugins next to the binary (ours) if built, else the reference ones.
fn plugins() -> Option<String> {
    let ours = caisson_bin().parent().unwrap().to_path_buf();
    if ["bridge", "host-local", "loopback", "portmap"]
        .iter()
        .all(|p| ours.join(p).exists())
    {
        return Some(ours.to_string_lossy().into_owned());
    }
    require_tool("/usr/lib/cni/bridge").then(|| "/usr/lib/cni".to_string())
}

fn del_bridge(name: &str) {
    let _ = std::process::Command::new("ip")
        .args(["link", "del", name])
        .output();
}

#[test]
fn root_native_task_on_a_cni_network_with_a_host_port() {
    if !require_root() || !require_tool("umoci") || !require_tool("iptables") {
        return;
    }
    let Some(plugins) = plugins() else { return };
    let mut c = Cluster::new(&["--heartbeat-ms", "200"]);
    let conf = c.dir.path().join("cni-conf");
    std::fs::create_dir_all(&conf).unwrap();
    let cni = [
        "--cni-config-dir",
        conf.to_str().unwrap(),
        "--cni-plugin-dir",
        plugins.as_str(),
    ];
    c.cleanup_args = cni.iter().map(|s| s.to_string()).collect();
    let (bridge, net, subnet) = ("cstcl61", "clnet61", "10.231.61.0/24");
    del_bridge(bridge);
    let ipam = Path::new(IPAM_DATA_DIR).join(net);
    let _ = std::fs::remove_dir_all(&ipam);
    let mut create = std::process::Command::new(caisson_bin());
    create
        .arg("--root")
        .arg(c.agent_root("a1"))
        .args(cni)
        .args([
            "network", "create", "--subnet", subnet, "--bridge", bridge, net,
        ]);
    run(&mut create).unwrap();
    let image = c.load_busybox("a1");
    let _m = c.master();
    let _a = c.agent_with("a1", JOIN, &cni, &[], &[]);
    c.wait_agents(1);

    let port = free_port();
    let p = format!("{port}:8080");
    let web = [
        image,
        "/bin/busybox",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/etc",
    ];
    let mut args = vec!["--network", net, "-p", &p];
    args.extend(web);
    let first = c.submit(&args);
    let t = c.wait_task(&first, "web running", Duration::from_secs(60), |t| {
        state(t) == "RUNNING"
    });
    for phase in ["rootfs", "namespaces", "exec", "launch_total"] {
        assert!(t["timings_us"][phase].as_u64().unwrap() > 0, "{phase}: {t}");
    }
    let mut body = None;
    eventually("httpd answers on the host port", || {
        body = http_get(port, "/motd");
        body.is_some()
    });
    assert!(body.unwrap().contains("hello from caisson tests"));
    let agents = c.agents();
    assert_eq!(agents[0]["used_ports"], serde_json::json!([port]));

    // The same host port again: it waits in STAGING, saying why (as a Nomad job waits on a
    // port collision), and runs once the port is free. This one with a user namespace: its
    // unprivileged root serves on the network too.
    let mut userns_args = vec!["--userns", "auto"];
    userns_args.extend(&args);
    let second = c.submit(&userns_args);
    let t = c.wait_task(&second, "waiting", Duration::from_secs(10), |t| {
        t["reason"] == "no_resources"
    });
    assert_eq!(state(&t), "STAGING");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains(&format!("host port {port} is in use")),
        "{t}"
    );
    // A network the agent does not have: FAILED with CNI's word for it, nothing made.
    let nonet = c.submit(&["--network", "nosuchnet", image, "true"]);
    let t = c.wait_task(&nonet, "failed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FAILED");
    assert_eq!(t["reason"], "launch_failed");
    assert!(t["message"].as_str().unwrap().contains("nosuchnet"), "{t}");

    c.cli(&["cancel", "-t", "1", &first]);
    let t = c.wait_task(&first, "killed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "KILLED");
    c.wait_task(&second, "second running", Duration::from_secs(30), |t| {
        state(t) == "RUNNING"
    });
    assert_eq!(c.task(&second)["message"], "");
    eventually("the second one answers on the same port", || {
        http_get(port, "/motd").is_some_and(|b| b.contains("hello from caisson tests"))
    });
    let root = c.agent_root("a1");
    let second_pid: u64 = {
        let out = run(std::process::Command::new(caisson_bin())
            .arg("--root")
            .arg(&root)
            .args(["inspect", &second]))
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["state"]["pid"].as_u64().unwrap()
    };
    let uid_map = std::fs::read_to_string(format!("/proc/{second_pid}/uid_map")).unwrap();
    assert!(
        uid_map.split_whitespace().nth(1).is_some_and(|h| h != "0"),
        "not in a user namespace: {uid_map}"
    );
    c.cli(&["cancel", "-t", "1", &second]);
    c.wait_task(&second, "killed", Duration::from_secs(30), terminal);
    c.assert_no_containers("a1");
    assert_eq!(dir_entries(&root.join("userns")), Vec::<String>::new());

    // Nothing left: no pinned netns, no CNI cache, no veth on the bridge, no address held.
    eventually("no netns left", || {
        std::fs::read_dir(volatile_dir(&root).join("netns")).map_or(true, |d| d.count() == 0)
    });
    let cache_files = |dir: &Path| -> usize { walk_files(dir).len() };
    assert_eq!(
        cache_files(&volatile_dir(&root).join("cni")),
        0,
        "CNI cache left"
    );
    eventually("no veth on the bridge", || {
        std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")).map_or(true, |d| d.count() == 0)
    });
    let held: Vec<String> = std::fs::read_dir(&ipam)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(held.is_empty(), "addresses still allocated: {held:?}");
    // The network goes with its bridge and masquerade rule.
    let mut rm = std::process::Command::new(caisson_bin());
    rm.arg("--root")
        .arg(c.agent_root("a1"))
        .args(cni)
        .args(["network", "rm", "-f", net]);
    run(&mut rm).unwrap();
    del_bridge(bridge);
}

#[test]
fn root_gpus_are_placed_by_free_count_and_released() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200"]);
    let image = c.load_busybox("g1");
    let _m = c.master();
    let fake = env!("FAKE_NVML_LIB");
    let _a = c.agent_with(
        "g1",
        JOIN,
        &["--nvml-lib", fake],
        &[],
        &[("FAKE_NVML_GPUS", "2")],
    );
    c.wait_agents(1);
    assert_eq!(c.agents()[0]["gpus"].as_array().unwrap().len(), 2);

    let sleep = [image, "sleep", "60"];
    let mut ids = vec![];
    for _ in 0..2 {
        let mut a = vec!["--gpus", "1"];
        a.extend(sleep);
        ids.push(c.submit(&a));
    }
    for id in &ids {
        c.wait_task(id, "running", Duration::from_secs(60), |t| {
            state(t) == "RUNNING"
        });
    }
    assert_eq!(c.agents()[0]["used_gpus"], 2);
    // The agent's allocator gave each its own GPU (the same records `caisson gpus` shows).
    let gpus = |c: &Cluster| -> Vec<serde_json::Value> {
        let out = run(std::process::Command::new(caisson_bin())
            .arg("--root")
            .arg(c.agent_root("g1"))
            .args(["--nvml-lib", fake, "gpus", "--json"])
            .env("FAKE_NVML_GPUS", "2"))
        .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let holders: Vec<String> = gpus(&c)
        .iter()
        .map(|g| g["task"].as_str().unwrap_or("").to_string())
        .collect();
    let mut sorted = holders.clone();
    sorted.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sorted, want);

    // A third waits for a free GPU; more GPUs than any agent has waits with that said.
    let mut a = vec!["--gpus", "1"];
    a.extend(sleep);
    let third = c.submit(&a);
    let t = c.wait_task(&third, "waiting", Duration::from_secs(10), |t| {
        t["reason"] == "no_resources"
    });
    assert_eq!(state(&t), "STAGING");
    assert!(t["message"].as_str().unwrap().contains("GPUs 1"), "{t}");
    let mut a = vec!["--gpus", "3"];
    a.extend(sleep);
    let big = c.submit(&a);
    let t = c.wait_task(&big, "waiting", Duration::from_secs(10), |t| {
        t["reason"] == "no_resources"
    });
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("no agent has 3 GPUs (the most any agent offers: 2)"),
        "{t}"
    );

    // A killed task's GPU goes to the waiting one.
    c.cli(&["cancel", "-t", "0", &ids[0]]);
    c.wait_task(&third, "third running", Duration::from_secs(30), |t| {
        state(t) == "RUNNING"
    });
    for id in [&ids[1], &third, &big] {
        c.cli(&["cancel", "-t", "0", id]);
    }
    c.wait_tasks("all ended", Duration::from_secs(30), terminal);
    assert_eq!(state(&c.task(&big)), "KILLED");
    c.assert_no_containers("g1");
    assert!(
        gpus(&c).iter().all(|g| g["task"].is_null()),
        "GPUs still held: {:?}",
        gpus(&c)
    );
    assert_eq!(c.agents()[0]["used_gpus"], 0);
}

/// The master's answer to an agent-service `Session` call over TLS whose stream sends nothing,
/// from a tonic client of the test's own (not the agent's code), with or without the agent's
/// client certificate.
fn agent_session_status(certs: &Path, port: u16, with_cert: bool) -> tonic::Status {
    use caisson_proto::agent_service_client::AgentServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("127.0.0.1");
    if with_cert {
        tls = tls.identity(Identity::from_pem(read("agent.pem"), read("agent-key.pem")));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let mut req = tonic::Request::new(tokio_stream::empty());
        req.metadata_mut().insert(
            caisson_proto::AUTH_HEADER,
            format!("Bearer {JOIN}").parse().unwrap(),
        );
        AgentServiceClient::new(channel)
            .session(req)
            .await
            .expect_err("a session without Register must fail")
    })
}

#[test]
fn mutual_tls_with_caisson_certs() {
    let mut c = Cluster::new(&[]);
    let certs = c.dir.path().join("certs");
    run(std::process::Command::new(caisson_bin())
        .args(["certs", "--dir"])
        .arg(&certs))
    .unwrap();
    c.master_args.extend([
        "--tls-dir".to_string(),
        certs.to_string_lossy().into_owned(),
    ]);
    c.tls_dir = Some(certs.clone());
    let _m = c.master();
    // An agent with the CA and its certificate joins over https.
    let _a = c.agent_with(
        "a1",
        JOIN,
        &[],
        &["--tls-dir", certs.to_str().unwrap()],
        &[],
    );
    c.wait_agents(1);
    // An agent without a client certificate is refused (only the CA to check the master).
    let nocert = c.dir.path().join("nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(certs.join("ca.pem"), nocert.join("ca.pem")).unwrap();
    let mut bad = c.agent_with(
        "a2",
        JOIN,
        &[],
        &["--tls-dir", nocert.to_str().unwrap()],
        &[],
    );
    let status = bad.0.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    bad.0
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("client certificate"), "{err}");
    assert_eq!(c.agents().len(), 1);
    // The master refuses it too, not only our agent (which refuses to start without
    // agent.pem): a plain gRPC client over TLS without a client certificate gets
    // UNAUTHENTICATED; with the agent certificate the same call passes that check and fails
    // later (its stream ends without a Register message).
    let refused = agent_session_status(&certs, c.port, false);
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );
    let admitted = agent_session_status(&certs, c.port, true);
    assert_eq!(
        admitted.code(),
        tonic::Code::FailedPrecondition,
        "{admitted:?}"
    );
    // Users over TLS; plaintext to the TLS port gets nothing.
    let out = std::process::Command::new(caisson_bin())
        .args([
            "agents",
            "--master",
            &format!("http://127.0.0.1:{}", c.port),
            "--token",
            API,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

const BENCH_PHASES: &[&str] = &[
    "submit",
    "agent",
    "launch",
    "to_running",
    "to_terminal",
    "total",
];

/// `caisson bench launch --master`: the report's structure and sanity, never timings.
fn check_bench(r: &serde_json::Value, count: usize) {
    assert_eq!(r["count"], count, "{r}");
    assert_eq!(r["ok"], count, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["exit_codes"]["0"], count, "{r}");
    assert!(r["master"].as_str().unwrap().starts_with("http://"), "{r}");
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, BENCH_PHASES);
    for p in phases {
        assert_eq!(p["n"], count, "{p}");
        let v = |k: &str| p[k].as_f64().unwrap();
        let seq = [
            v("min_us"),
            v("p50_us"),
            v("p90_us"),
            v("p99_us"),
            v("max_us"),
        ];
        assert!(seq.windows(2).all(|w| w[0] <= w[1]), "unordered: {p}");
    }
    let p50 = |name: &str| {
        phases.iter().find(|p| p["name"] == name).unwrap()["p50_us"]
            .as_f64()
            .unwrap()
    };
    // Parts inside wholes: the agent's launch inside its own span, RUNNING before the end.
    assert!(p50("launch") <= p50("agent") + 1.0, "{r}");
    assert!(p50("to_running") > 0.0 && p50("to_terminal") > 0.0, "{r}");
}

#[test]
fn root_bench_launch_through_the_master() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&[]);
    c.load_busybox("b1");
    let _m = c.master();
    let _a = c.agent("b1", JOIN);
    c.wait_agents(1);
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/hello.wat");
    let bench = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(caisson_bin())
            .args([
                "bench",
                "launch",
                "--json",
                "--master",
                &c.url(),
                "--token",
                API,
            ])
            .args(["-n", "6", "-c", "3", "--warmup", "1"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = bench(&["--kind", "wasm", "--module", hello.to_str().unwrap()]);
    check_bench(&r, 6);
    assert_eq!(r["kind"], "wasm");
    let r = bench(&[
        "--kind",
        "native",
        "--image",
        "localhost/oci:latest",
        "--",
        "/bin/true",
    ]);
    check_bench(&r, 6);
    // Warmup and timed tasks all went through the master, and all ended.
    let tasks = c.tasks();
    assert_eq!(tasks.len(), 14);
    assert!(tasks.iter().all(|t| t["state"] == "FINISHED"), "{tasks:?}");
    c.assert_no_containers("b1");
}

/// Supervisors (sandboxes' included) whose command line names `root`.
fn shims_of(root: &Path) -> Vec<String> {
    let root_s = root.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("caisson-shim") && c.contains(root_s))
        .collect()
}

#[test]
fn root_agent_warm_sandboxes_take_tasks_of_their_image() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&[]);
    let img = tempfile::tempdir().unwrap();
    let layout = busybox_layout(img.path(), "latest").unwrap();
    c.load_image("a1", &layout);
    let image = "localhost/oci:latest";
    let root = c.agent_root("a1");

    // A `wasi/wasm` image (its tasks are Wasm tasks) in the same store.
    let w = LayoutWriter::new(&img.path().join("wasmimg")).unwrap();
    let desc = w
        .wasi_image("/app/hello.wasm", b"\0asm\x01\0\0\0", &[])
        .unwrap();
    w.index(vec![desc], "latest", false).unwrap();
    c.load_image("a1", &w.dir);

    // Refused before the agent does anything: a bad count, a Wasm image.
    for (arg, why) in [
        (format!("{image}=0"), "the count must be 1 to 64"),
        ("localhost/wasmimg:latest".to_string(), "a Wasm image"),
    ] {
        let mut agent = std::process::Command::new(caisson_bin())
            .arg("--root")
            .arg(&root)
            .args(["agent", "--master", &c.url(), "--token", JOIN])
            .args(["--warm-sandboxes", &arg])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // An agent that accepted the flag would run on: give up on it after a while.
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(st) = agent.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = agent.kill();
                let _ = agent.wait();
                panic!("the agent started with --warm-sandboxes {arg}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        agent
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "{arg}: {err}");
        assert!(err.contains(why), "{arg}: {err}");
    }

    let _m = c.master();
    let mut a = c.agent_with(
        "a1",
        JOIN,
        &[],
        &["--warm-sandboxes", &format!("{image}=1")],
        &[],
    );
    c.wait_agents(1);
    eventually("a sandbox is made", || {
        dir_entries(&root.join("sandboxes")).len() == 1
    });
    // A task of the image takes the sandbox once it is ready (one is made again after each):
    // its command, environment and exit code are its own.
    let mut warm = None;
    for _ in 0..40 {
        let id = c.submit(&[
            "-e",
            "CODE=3",
            image,
            "/bin/sh",
            "-c",
            "test \"$(hostname)\" != '' && exit $CODE",
        ]);
        let t = c.wait_task(&id, "ended", Duration::from_secs(30), terminal);
        assert_eq!(state(&t), "FAILED", "{t}");
        assert_eq!(t["exit_code"], 3, "{t}");
        if t["warm_sandbox"] == true {
            // Only the handover is timed: no namespaces made, no root prepared.
            assert_eq!(t["timings_us"]["namespaces"], 0, "{t}");
            assert_eq!(t["timings_us"]["rootfs"], 0, "{t}");
            warm = Some(t);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(warm.is_some(), "no task took the warm sandbox");
    // A task that does not fit one (a CPU limit) launches cold.
    let cold = c.submit(&["--cpus", "0.5", image, "/bin/true"]);
    let t = c.wait_task(&cold, "ended", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FINISHED", "{t}");
    assert_eq!(t["warm_sandbox"], false, "{t}");
    assert!(t["timings_us"]["namespaces"].as_u64().unwrap() > 0, "{t}");
    c.assert_no_containers("a1");

    // The agent killed: its sandboxes go (their supervisors see EOF), nothing is left.
    a.kill9();
    eventually("the sandboxes are torn down", || {
        dir_entries(&root.join("sandboxes")).is_empty()
            && dir_entries(&root.join("rootfs")).is_empty()
            && shims_of(&root).is_empty()
    });
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "{mounts}");
}
