//! Network namespaces for the multi-host tests: hosts in namespaces of their own, joined by veth
//! pairs to a bridge in a switch namespace, with real multicast across it. Every namespace is
//! created by the test and deleted when its [`Lab`] is dropped (also on panic).

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_LAB: AtomicU64 = AtomicU64::new(0);

/// Why this machine cannot run namespace tests, if it cannot: not root, or `ip`/`nft` missing.
pub(crate) fn missing_prerequisite(member_binary: &Path) -> Option<String> {
    if !member_binary.exists() {
        return Some("gkm-member is not built (cargo build -p gkm-member)".into());
    }
    if !rustix::process::geteuid().is_root() {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` not found (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

/// Runs a command and panics with its output if it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `nft -f -` inside a namespace with `rules`.
pub(crate) fn nft(ns: &str, rules: &str) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host on the bridge: its namespace, addresses and interface index.
pub(crate) struct Host {
    pub(crate) ns: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) ifindex: u32,
}

impl Host {
    /// `program` run inside this host's namespace.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }
}

/// Host `n`'s IPv6 address on the bridge.
pub(crate) fn v6_address(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, n)
}

/// A switch (a bridge in a namespace of its own) and the namespaces of the hosts on it; all
/// deleted on drop.
pub(crate) struct Lab {
    tag: String,
    switch: String,
    names: Vec<String>,
    ports: usize,
}

impl Lab {
    pub(crate) fn new() -> Lab {
        let tag = format!(
            "gkmt{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::SeqCst)
        );
        let mut lab = Lab {
            switch: format!("{tag}-sw"),
            tag,
            names: Vec::new(),
            ports: 0,
        };
        let switch = lab.switch.clone();
        lab.add(&switch);
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        lab
    }

    fn add(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.names.push(name.to_owned());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
    }

    /// A new host `name` on the switch at `ip`/24 (and its IPv6 address), with a route for
    /// multicast through its link.
    pub(crate) fn attach(&mut self, name: &str, ip: Ipv4Addr) -> Host {
        let ns = format!("{}-{name}", self.tag);
        self.add(&ns);
        let port = format!("p{}", self.ports);
        self.ports += 1;
        let switch = &self.switch;
        run(
            "ip",
            &[
                "-n", switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
        );
        run(
            "ip",
            &["-n", switch, "link", "set", &port, "master", "br0", "up"],
        );
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"],
        );
        let ip6 = v6_address(u16::from(ip.octets()[3]));
        run(
            "ip",
            &[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        let link = run("ip", &["-n", &ns, "-o", "link", "show", "eth0"]);
        let ifindex = link
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .expect("an interface index");
        Host { ns, ip, ifindex }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
