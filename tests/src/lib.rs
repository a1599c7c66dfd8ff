//! Helpers for end-to-end tests that start real `nakshatra` processes on
//! 127.0.0.1 (or inside network namespaces the tests create).
//!
//! The tests run the release binary the README's test command builds
//! (`target/release/nakshatra`, with the `fault-injection` feature: some
//! tests start nodes with the hidden `--fault` and `--test-link-delay-ms`
//! flags), or the one named by `NAKSHATRA_BIN`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod attack;
pub mod bench;
pub mod http;
pub mod py;
pub mod relay_attack;
pub mod sim;
pub mod webdriver;

/// The `nakshatra` binary under test.
pub fn nakshatra_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NAKSHATRA_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("release/nakshatra");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p nakshatra --features fault-injection)",
        p.display()
    );
    p
}

/// The test model: `NAKSHATRA_TEST_MODEL` or the fetch script's cache.
pub fn test_model() -> PathBuf {
    if let Ok(p) = std::env::var("NAKSHATRA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "test model missing at {}: run scripts/fetch-test-model.sh",
        p.display()
    );
    p
}

/// A running `nakshatra` process; killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Its `listening on` addresses, once seen.
    pub addrs: Vec<String>,
}

impl Proc {
    /// Starts `nakshatra ARGS` (optionally through a prefix such as
    /// `ip netns exec NS`) with its own data dir.
    pub fn spawn(prefix: &[&str], data_dir: &Path, args: &[&str]) -> Proc {
        let bin = nakshatra_bin();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info,libp2p_kad=error,llama-cpp-2=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn nakshatra");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Proc {
            child,
            lines: rx,
            stderr,
            addrs: Vec::new(),
        }
    }

    /// Starts `nakshatra node join` and waits until it prints its
    /// `listening on` line(s).
    pub fn join(data_dir: &Path, args: &[&str]) -> Proc {
        Self::join_in(&[], data_dir, args)
    }

    /// [`Proc::join`] through a command prefix (e.g. `ip netns exec NS`).
    pub fn join_in(prefix: &[&str], data_dir: &Path, args: &[&str]) -> Proc {
        let mut full = vec!["node", "join"];
        full.extend_from_slice(args);
        let mut p = Proc::spawn(prefix, data_dir, &full);
        p.wait_listening(Duration::from_secs(60));
        p
    }

    /// Waits for the first `listening on` line (and any that follow at
    /// once).
    pub fn wait_listening(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.addrs.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        self.addrs.push(a.trim().to_string());
                    }
                }
                Err(_) => panic!(
                    "no `listening on` line within {within:?}; stderr:\n{}",
                    self.stderr()
                ),
            }
        }
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
            if let Some(a) = line.strip_prefix("listening on ") {
                self.addrs.push(a.trim().to_string());
            }
        }
    }

    /// The first address (`/ip4/.../tcp/.../p2p/<id>`).
    pub fn addr(&self) -> &str {
        &self.addrs[0]
    }

    /// The peer id from its address.
    pub fn peer_id(&self) -> String {
        self.addr()
            .rsplit("/p2p/")
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGKILL (a crash, as far as the swarm can tell).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status (None on timeout).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY-free: use the `kill` command to deliver SIGTERM.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its resident memory now and at its peak (`VmRSS`, `VmHWM` of
    /// `/proc/<pid>/status`), KiB; `None` once it has exited.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resets its peak resident memory (`VmHWM`) to what it holds now
    /// (`5` to `/proc/<pid>/clear_refs`, Linux 4.0+), so that the next
    /// [`Proc::memory_kib`] peak is the peak since this call. False when
    /// the kernel refuses.
    pub fn reset_peak_memory(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").is_ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `nakshatra ARGS` to completion.
pub fn nakshatra(args: &[&str]) -> Output {
    Command::new(nakshatra_bin())
        .args(args)
        .env("RUST_LOG", one_shot_log())
        .stdin(Stdio::null())
        .output()
        .expect("run nakshatra")
}

/// Runs `nakshatra ARGS` to completion with `input` on its standard
/// input (closed after it).
pub fn nakshatra_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(nakshatra_bin())
        .args(args)
        .env("RUST_LOG", one_shot_log())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nakshatra");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait for nakshatra")
}

/// `nakshatra swarm status --json` through `bootstrap` (mDNS off).
pub fn status_json(bootstrap: &str) -> Option<serde_json::Value> {
    status_json_in(&[], bootstrap)
}

/// [`status_json`] run under `prefix` (e.g. a network namespace's
/// `ip netns exec NAME`; empty: here).
pub fn status_json_in(prefix: &[&str], bootstrap: &str) -> Option<serde_json::Value> {
    let o = nakshatra_in(
        prefix,
        &[
            "swarm",
            "status",
            "--no-mdns",
            "--json",
            "--wait",
            "5",
            "--bootstrap",
            bootstrap,
        ],
    );
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Blocks of the first model that have at least one holder.
pub fn covered_blocks(view: &serde_json::Value) -> Vec<usize> {
    covered_in(&view["models"][0])
}

/// Whether `from` announces a measured RTT to `to` (its `next_rtts`, in
/// the first model of a `swarm status --json` view). Until it does, a
/// planner prices that link at the default RTT (50 ms), so a test that
/// needs a chain through that link waits for this.
pub fn link_measured(view: &serde_json::Value, from: &str, to: &str) -> bool {
    view["models"][0]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["peer_id"].as_str() == Some(from))
        .flat_map(|p| p["next_rtts"].as_array().into_iter().flatten())
        .any(|r| r["peer_id"].as_str() == Some(to))
}

/// Holders of block `b` of the first model.
pub fn holders(view: &serde_json::Value, b: usize) -> Vec<String> {
    holders_in(&view["models"][0], b)
}

/// Blocks of one model of a `swarm status --json` view that have a holder.
fn covered_in(model: &serde_json::Value) -> Vec<usize> {
    model["coverage"]
        .as_array()
        .map(|c| {
            c.iter()
                .enumerate()
                .filter(|(_, h)| h.as_array().is_some_and(|h| !h.is_empty()))
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default()
}

/// Holders of block `b` of one model of a `swarm status --json` view.
fn holders_in(model: &serde_json::Value, b: usize) -> Vec<String> {
    model["coverage"][b]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The number after `key` in a line such as the `stats:` line
/// (`decode 47.5 tok/s` → 47.5 for `decode`).
pub fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The stderr line of `o` that starts with `prefix` (e.g. `stats:`).
pub fn stderr_line(o: &Output, prefix: &str) -> Option<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(String::from)
}

/// Polls `f` until it returns `Some` or `within` passes.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A network namespace made for one test, deleted on drop.
pub struct NetNs {
    /// Its name.
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl NetNs {
    /// An empty namespace with `lo` up.
    pub fn new(tag: &str) -> Result<NetNs, String> {
        let name = format!("nk-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Two namespaces joined by a veth pair — two hosts on a private LAN,
    /// `10.77.0.1` and `10.77.0.2`, with multicast (mDNS) between them and
    /// no route to anything else. `Err` says why they cannot be made here
    /// (not root, no `ip`, no netns or veth support).
    pub fn lan_pair(tag: &str) -> Result<(NetNs, NetNs), String> {
        let a = NetNs::new(&format!("{tag}a"))?;
        let b = NetNs::new(&format!("{tag}b"))?;
        ip(&[
            "-n", &a.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns",
            &b.name,
        ])?;
        for (ns, dev, addr) in [(&a, "v0", "10.77.0.1/24"), (&b, "v1", "10.77.0.2/24")] {
            ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", &ns.name, "link", "set", dev, "multicast", "on"])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        Ok((a, b))
    }

    /// The command prefix that runs a program inside.
    pub fn prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Runs `nakshatra ARGS` inside a namespace (`prefix`: [`NetNs::prefix`])
/// to completion.
pub fn nakshatra_in(prefix: &[&str], args: &[&str]) -> Output {
    let Some((first, rest)) = prefix.split_first() else {
        return nakshatra(args);
    };
    Command::new(first)
        .args(rest)
        .arg(nakshatra_bin())
        .args(args)
        .env("RUST_LOG", one_shot_log())
        .stdin(Stdio::null())
        .output()
        .expect("run nakshatra")
}

/// `RUST_LOG` for one-shot commands (`node ask`, `swarm status`): warnings
/// only, unless `NAKSHATRA_TEST_ASK_LOG` says otherwise (to debug a test).
fn one_shot_log() -> String {
    std::env::var("NAKSHATRA_TEST_ASK_LOG")
        .unwrap_or_else(|_| "warn,libp2p_kad=error,llama-cpp-2=error".into())
}

/// Runs `nft -f -` with `rules` inside namespace `ns`.
fn nft(ns: &NetNs, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `nft`: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let o = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// How a home's router maps and filters (nat.md's lab recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// The common home router, cone-like: nftables `masquerade` keeps
    /// the source port when it is free, so one local port maps to one
    /// public port whatever the destination (endpoint-independent
    /// mapping); from the WAN only replies get in (address- and
    /// port-dependent filtering), and a simultaneous open counts as a
    /// reply. Two such homes can punch a hole. (A *full* cone, letting
    /// any WAN host in through a mapping, is publicly reachable over UDP:
    /// AutoNAT confirms it, and the node simply serves as a public one.)
    Cone,
    /// Symmetric: `masquerade random` gives every destination its own
    /// random public port (endpoint-dependent mapping), so the port a
    /// peer observes is not the one used to reach anyone else: no hole
    /// can be punched to or from it, only the relay carries its links.
    Symmetric,
}

/// A small internet with homes behind NAT, all in namespaces made for the
/// test (no packet leaves them):
///
/// ```text
///               ┌─ veth ── (10.99.0.2) router 0 (192.168.50.1) ── veth ── (192.168.50.2) home 0
///  public (br0, 10.99.0.1)
///               └─ veth ── (10.99.0.3) router 1 (192.168.51.1) ── veth ── (192.168.51.2) home 1
/// ```
///
/// Each router forwards and masquerades its home's traffic on its WAN
/// side, as its [`Nat`] kind says, and forwards nothing unsolicited from
/// the WAN to the home (a reply or a simultaneous open gets through:
/// address- and port-dependent filtering, the home router of nat.md).
/// Unsolicited packets to the router itself are dropped, not answered: a
/// reset would end the other side's half of a TCP hole punch. The
/// public side has no route to the LANs. Each router counts the packets
/// its home sends to WAN hosts other than the public one
/// ([`NatLab::packets_to_other_homes`]), and those it lets in from them
/// ([`NatLab::packets_from_other_homes`]): direct traffic between homes.
pub struct NatLab {
    /// The "internet" side: a public host at [`NatLab::PUBLIC_IP`].
    pub public: NetNs,
    /// The NAT routers, one per home.
    pub routers: Vec<NetNs>,
    /// The home hosts, at [`NatLab::home_ip`].
    pub homes: Vec<NetNs>,
}

impl NatLab {
    /// The public host's address.
    pub const PUBLIC_IP: &'static str = "10.99.0.1";

    /// Home `i`'s address on its LAN.
    pub fn home_ip(i: usize) -> String {
        format!("192.168.{}.2", 50 + i)
    }

    /// Router `i`'s WAN address (what the public side sees of home `i`).
    pub fn router_wan_ip(i: usize) -> String {
        format!("10.99.0.{}", 2 + i)
    }

    /// Builds it with `homes` cone-NAT homes (at most 100). `Err` says why
    /// it cannot be made here (not root, no `ip` or `nft`, no netns, veth,
    /// bridge or nftables NAT support).
    pub fn new(tag: &str, homes: usize) -> Result<NatLab, String> {
        NatLab::with_nats(tag, &vec![Nat::Cone; homes])
    }

    /// Builds it with one home per entry of `nats` (at most 100), behind a
    /// router of that kind.
    pub fn with_nats(tag: &str, nats: &[Nat]) -> Result<NatLab, String> {
        let public = NetNs::new(&format!("{tag}p"))?;
        ip(&["-n", &public.name, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &public.name,
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            "br0",
        ])?;
        ip(&["-n", &public.name, "link", "set", "br0", "up"])?;
        let mut lab = NatLab {
            public,
            routers: Vec::new(),
            homes: Vec::new(),
        };
        for (i, nat) in nats.iter().take(100).enumerate() {
            let router = NetNs::new(&format!("{tag}r{i}"))?;
            let home = NetNs::new(&format!("{tag}h{i}"))?;
            let wan_dev = format!("wan{i}");
            ip(&[
                "-n",
                &lab.public.name,
                "link",
                "add",
                &wan_dev,
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                &router.name,
            ])?;
            ip(&[
                "-n",
                &lab.public.name,
                "link",
                "set",
                &wan_dev,
                "master",
                "br0",
            ])?;
            ip(&["-n", &lab.public.name, "link", "set", &wan_dev, "up"])?;
            ip(&[
                "-n",
                &router.name,
                "link",
                "add",
                "lan",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &home.name,
            ])?;
            let wan = format!("{}/24", NatLab::router_wan_ip(i));
            let lan_gw = format!("192.168.{}.1", 50 + i);
            let lan = format!("{lan_gw}/24");
            let host = format!("{}/24", NatLab::home_ip(i));
            for (ns, dev, addr) in [
                (&router, "wan", &wan),
                (&router, "lan", &lan),
                (&home, "eth0", &host),
            ] {
                ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev])?;
                ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
            }
            ip(&["-n", &home.name, "route", "add", "default", "via", &lan_gw])?;
            let o = Command::new("ip")
                .args(["netns", "exec", &router.name, "sysctl", "-qw"])
                .arg("net.ipv4.ip_forward=1")
                .output()
                .map_err(|e| format!("sysctl: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "sysctl ip_forward: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            // The empty prerouting chain makes the kernel reverse-NAT
            // replies; unsolicited WAN traffic is neither forwarded home
            // nor answered.
            let masquerade = match nat {
                Nat::Cone => "masquerade",
                Nat::Symmetric => "masquerade random",
            };
            nft(
                &router,
                &format!(
                    "table ip nat {{\n\
                       chain prerouting {{ type nat hook prerouting priority dstnat; }}\n\
                       chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"wan\" {masquerade}; }}\n\
                     }}\n\
                     table inet filter {{\n\
                       counter to_other_homes {{ }}\n\
                       counter from_other_homes {{ }}\n\
                       chain input {{ type filter hook input priority 0; policy accept;\n\
                         iifname \"wan\" ct state != {{ established, related }} drop; }}\n\
                       chain forward {{ type filter hook forward priority 0; policy accept;\n\
                         iifname \"wan\" ct state != {{ established, related }} drop;\n\
                         oifname \"wan\" ip daddr != {public} counter name \"to_other_homes\";\n\
                         iifname \"wan\" ip saddr != {public} counter name \"from_other_homes\"; }}\n\
                     }}\n",
                    public = NatLab::PUBLIC_IP
                ),
            )?;
            lab.routers.push(router);
            lab.homes.push(home);
        }
        Ok(lab)
    }

    /// Packets home `i` sent through its router to WAN hosts other than
    /// the public one: traffic that went directly to another home.
    pub fn packets_to_other_homes(&self, i: usize) -> u64 {
        self.counter(i, "to_other_homes")
    }

    /// Packets from WAN hosts other than the public one that router `i`
    /// let into its home (replies to a punched hole; unsolicited ones are
    /// dropped before they are counted).
    pub fn packets_from_other_homes(&self, i: usize) -> u64 {
        self.counter(i, "from_other_homes")
    }

    fn counter(&self, i: usize, name: &str) -> u64 {
        let Some(router) = self.routers.get(i) else {
            return 0;
        };
        let o = Command::new("ip")
            .args(["netns", "exec", &router.name, "nft", "list", "counter"])
            .args(["inet", "filter", name])
            .output();
        let Ok(o) = o else { return 0 };
        let out = String::from_utf8_lossy(&o.stdout);
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// The whole model in one process (`nakshatra run`, 1 thread): the
/// reference text the network path must reproduce.
pub fn run_reference(model: &str, extra: &[&str], prompt: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().unwrap_or_default();
    let mut args = vec!["--data-dir", d, "run", "--model", model, "--threads", "1"];
    args.extend_from_slice(extra);
    args.push(prompt);
    let o = nakshatra(&args);
    assert!(
        o.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `nakshatra node ask` through `bootstrap` (mDNS off), with its own data
/// dir.
pub fn node_ask(bootstrap: &str, data_dir: &Path, extra: &[&str], prompt: &str) -> Output {
    let mut args = node_ask_args(bootstrap, data_dir, extra);
    args.push(prompt);
    nakshatra(&args)
}

/// [`node_ask`] with `input` on its standard input and no prompt argument
/// (`extra` says what to do with the input: `-`, `--chat`).
pub fn node_ask_with_input(
    bootstrap: &str,
    data_dir: &Path,
    extra: &[&str],
    input: &str,
) -> Output {
    nakshatra_with_input(&node_ask_args(bootstrap, data_dir, extra), input)
}

/// `--data-dir DIR node ask --no-mdns --bootstrap ADDR EXTRA...`.
fn node_ask_args<'a>(bootstrap: &'a str, data_dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let d = data_dir.to_str().unwrap_or_default();
    let mut args = vec![
        "--data-dir",
        d,
        "node",
        "ask",
        "--no-mdns",
        "--bootstrap",
        bootstrap,
    ];
    args.extend_from_slice(extra);
    args
}

/// A small tmpfs mounted on a fresh temporary directory: a disk that fills
/// up after `mib` MiB. Unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it. `Err` says why it cannot be done here (not root, no
    /// `mount`, no tmpfs).
    pub fn new(mib: u32) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "mount: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// The `node join` flags every test node on loopback shares: listen on
/// 127.0.0.1, mDNS off, one llama thread (nodes share the cores), and
/// `--bootstrap` when given. Callers add the model, layers and limits.
pub fn loopback_args(bootstrap: Option<&str>) -> Vec<&str> {
    let mut v = vec![
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--threads",
        "1",
    ];
    if let Some(b) = bootstrap {
        v.extend_from_slice(&["--bootstrap", b]);
    }
    v
}

/// A number from environment variable `k` (benchmark knobs), else `d`.
pub fn env_num<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The median of `v`; NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Tiny random-weight models of every family (`<arch>.gguf`), written once
/// by `scripts/gen-test-models.sh --cached` into
/// `.cache/test-models/<hash of the generator>/` (the node's tests use the
/// same set).
pub fn family_models() -> PathBuf {
    static DONE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = done.as_ref() {
        return dir.clone();
    }
    let o = gen_models(&["--cached"]);
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(
        dir.join("complete").exists(),
        "no model set in {}",
        dir.display()
    );
    *done = Some(dir.clone());
    dir
}

/// Runs `scripts/gen-test-models.sh ARGS` (which makes the generator's
/// venv first) and checks it succeeded.
pub fn gen_models(args: &[&str]) -> Output {
    let o = Command::new("bash")
        .arg(repo_root().join("scripts/gen-test-models.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/gen-test-models.sh");
    assert!(
        o.status.success(),
        "scripts/gen-test-models.sh {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A generated model split into llama.cpp shards of at most
/// `max_tensors` tensors (`gen-test-models.py --arch ARCH --out PATH
/// --split-max-tensors K`, default seed and layers: the same weights as
/// [`family_models`]'s `<arch>.gguf`), cached next to them in
/// `<family_models()>/sharded-<arch>-k<K>/`. Returns the shards in order
/// (`<arch>-00001-of-0000N.gguf` first).
pub fn sharded_family_model(arch: &str, max_tensors: u32) -> Vec<PathBuf> {
    let base = family_models();
    let dir = base.join(format!("sharded-{arch}-k{max_tensors}"));
    if !dir.join("complete").exists() {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("create the shard dir");
        let out = tmp.join(format!("{arch}.gguf"));
        gen_models(&[
            "--py",
            "--arch",
            arch,
            "--out",
            out.to_str().expect("utf-8 path"),
            "--split-max-tensors",
            &max_tensors.to_string(),
        ]);
        std::fs::write(tmp.join("complete"), b"").expect("write the complete marker");
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read the shard dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    shards.sort();
    shards
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model `id` in a `swarm status --json` view (`None`: not announced).
pub fn model_in_view<'a>(view: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    view["models"]
        .as_array()?
        .iter()
        .find(|m| m["id"].as_str() == Some(id))
}

/// Blocks of model `id` that have at least one holder.
pub fn covered_blocks_of(view: &serde_json::Value, id: &str) -> Vec<usize> {
    model_in_view(view, id).map(covered_in).unwrap_or_default()
}

/// Holders of block `b` of model `id`.
pub fn holders_of(view: &serde_json::Value, id: &str, b: usize) -> Vec<String> {
    model_in_view(view, id)
        .map(|m| holders_in(m, b))
        .unwrap_or_default()
}

/// The model id of `model` (`model inspect --json`).
pub fn inspect_model_id(model: &str) -> String {
    let o = nakshatra(&["model", "inspect", "--json", model]);
    assert!(
        o.status.success(),
        "model inspect {model}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect json");
    v["id"].as_str().expect("an id").to_string()
}
