//! A leader cut off from the database (issue 14 §6): three controllers, PostgreSQL and two member
//! hosts, each on a host of its own (network namespaces on one bridge; the database over TCP).
//! nftables in the leader's namespace drops its traffic to and from the database. The leader
//! must stop leading within one lease (its lease's local deadline passes unrenewed) though its
//! members still reach it; a controller that reaches the database takes over and rekeys; the
//! members follow it: an eviction and a join made through it reach every member (the joiner
//! asks the cut-off controller first). Healed, the old leader stands by with a warm copy at the
//! new leader's epoch. No member is lost.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and PostgreSQL; fails saying what is missing,
//! unless `GKM_SKIP_NETNS=1` (CI sets neither skip).

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::netns::{Host, Lab, missing_prerequisite, nft};
use support::postgres::PgServer;
use support::{GKMCTL, Running, SERVER, Server, api_current};

const LEASE: Duration = Duration::from_millis(1_000);
const GROUP: &str = "239.255.79.1:47731";
const DB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MEMBERS_PER_HOST: usize = 3;
/// Slack on "within one lease": the step-down is seen through `gkmctl`, polled every 20 ms.
const SLACK: Duration = Duration::from_millis(500);
const GROUP_SETTINGS: &str = "repeats = 2\nrepeat_spacing_ms = 20\nbatch_interval_ms = 50\n\
                              heartbeat_interval_ms = 200\n";

fn member_binary() -> PathBuf {
    Path::new(SERVER).with_file_name("gkm-member")
}

/// A controller on its host.
struct Node {
    host: Host,
    server: Server,
    running: Option<Running>,
}

impl Node {
    fn addr(&self) -> String {
        format!("{}:47700", self.host.ip)
    }

    /// The group's row in `gkmctl --json groups` (`None` if it does not answer).
    fn group(&self) -> Option<serde_json::Value> {
        let out = Command::new(GKMCTL)
            .arg("--socket")
            .arg(self.server.socket())
            .args(["--json", "groups"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().find(|g| g["name"] == "demo").cloned()
    }

    fn leads(&self) -> Option<u64> {
        let g = self.group().filter(|g| g["role"] == "leader")?;
        g["epoch"].as_u64()
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(GKMCTL)
            .arg("--socket")
            .arg(self.server.socket())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "gkmctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.server.dir.join("server.log")).unwrap_or_default()
    }
}

/// A member daemon on a member host.
struct MemberDaemon {
    state: PathBuf,
    _running: Running,
}

impl MemberDaemon {
    fn start(host: &Host, dir: &Path, i: usize, key: &str, controllers: &[String]) -> Self {
        let state = dir.join(format!("member-{i}"));
        let mut cmd = host.command(member_binary());
        cmd.args(["run", "--group", "demo", "--controller-key", key]);
        for c in controllers {
            cmd.args(["--controller", c]);
        }
        cmd.args(["--interface", &host.ip.to_string(), "--state-dir"])
            .arg(&state)
            .env("RUST_LOG", "info");
        let running = Running::spawn_logged(&mut cmd, dir, &format!("m{i}"));
        MemberDaemon {
            state,
            _running: running,
        }
    }

    /// Its member id and epoch, once it holds a key.
    fn view(&self) -> Option<(u64, u64)> {
        let v = api_current(&self.state.join("api.sock"), Duration::from_secs(1))?;
        Some((v["member"].as_u64()?, v["epoch"].as_u64()?))
    }
}

/// Waits until `f` gives a value, at most `limit`; panics with `what` and `evidence()`.
fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    evidence: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}\n{}",
            evidence()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every member's view once all hold `epoch`.
fn converged(members: &[MemberDaemon], epoch: u64) -> Option<Vec<u64>> {
    members
        .iter()
        .map(|m| m.view().filter(|v| v.1 == epoch).map(|v| v.0))
        .collect()
}

#[test]
fn ha_partition_leader_cut_off_from_the_database_steps_down_and_members_follow_the_new_one() {
    if let Some(why) = missing_prerequisite(&member_binary()) {
        if std::env::var_os("GKM_SKIP_NETNS").is_some_and(|v| v == "1") {
            println!("skipped (GKM_SKIP_NETNS=1): {why}");
            return;
        }
        panic!("this test needs {why}; set GKM_SKIP_NETNS=1 to skip it");
    }
    // Declared first, dropped last: the processes and the database go before the namespaces.
    let mut lab = Lab::new();
    let db = lab.attach("db", DB_IP);
    let hosts: Vec<Host> = (0..3u8)
        .map(|i| lab.attach(&format!("c{i}"), Ipv4Addr::new(10, 77, 0, 10 + i)))
        .collect();
    let member_hosts: Vec<Host> = (0..2u8)
        .map(|i| lab.attach(&format!("m{i}"), Ipv4Addr::new(10, 77, 0, 20 + i)))
        .collect();
    let Some(pg) = PgServer::start_in("partition", Some((db.ns.clone(), db.ip))) else {
        return;
    };

    let mut nodes: Vec<Node> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, host)| Node {
            host,
            server: Server::new(&format!("partition-c{i}"), ""),
            running: None,
        })
        .collect();
    let init = Command::new(SERVER)
        .args(["init", "--state-dir"])
        .arg(&nodes[0].server.state)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let key = String::from_utf8(init.stdout).unwrap().trim().to_owned();
    for node in &nodes {
        if node.server.state != nodes[0].server.state {
            std::fs::create_dir_all(&node.server.state).unwrap();
            for file in ["controller.key", "storage.key"] {
                std::fs::copy(
                    nodes[0].server.state.join(file),
                    node.server.state.join(file),
                )
                .unwrap();
            }
        }
        let ip = node.host.ip;
        std::fs::write(
            &node.server.config,
            format!(
                "listen = \"{ip}:47700\"\n\n[storage]\nbackend = \"postgres\"\nurl = \"{}\"\n\
                 lease_ms = {}\n\n[[group]]\nname = \"demo\"\nmulticast = \"{GROUP}\"\n\
                 interface = \"{ip}\"\n{GROUP_SETTINGS}",
                pg.url(),
                LEASE.as_millis()
            ),
        )
        .unwrap();
    }
    for node in &mut nodes {
        let mut cmd = node.host.command(SERVER);
        cmd.args(["run", "--config"])
            .arg(&node.server.config)
            .arg("--state-dir")
            .arg(&node.server.state)
            .env("RUST_LOG", "info");
        let log = node.server.dir.join("server.log");
        node.running = Some(
            node.server
                .try_spawn(cmd, &log)
                .unwrap_or_else(|(status, log)| panic!("controller exited ({status}): {log}")),
        );
    }
    let logs = || {
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- controller {i}:\n{}", n.log()))
            .collect::<String>()
    };
    let leader = |nodes: &[Node]| nodes.iter().position(|n| n.leads().is_some());
    let old = wait_for(
        Duration::from_secs(20),
        "no leader",
        || leader(&nodes),
        logs,
    );

    // Members: the cut-off leader first in every list, as the worst case for following.
    let dir = support::temp_dir("partition-members");
    let mut order: Vec<String> = vec![nodes[old].addr()];
    order.extend(
        (0..nodes.len())
            .filter(|&i| i != old)
            .map(|i| nodes[i].addr()),
    );
    let mut members: Vec<MemberDaemon> = (0..2 * MEMBERS_PER_HOST)
        .map(|i| MemberDaemon::start(&member_hosts[i % 2], &dir, i, &key, &order))
        .collect();
    let epoch = wait_for(
        Duration::from_secs(30),
        "members not admitted",
        || {
            let epoch = nodes[old].leads()?;
            converged(&members, epoch).map(|_| epoch)
        },
        logs,
    );
    let ids = converged(&members, epoch).unwrap();

    // Cut the leader off from the database (its members still reach it).
    nft(
        &nodes[old].host.ns,
        &format!(
            "table inet gkmpart {{\n chain out {{ type filter hook output priority 0; \
             ip daddr {DB_IP} drop; }}\n chain in {{ type filter hook input priority 0; \
             ip saddr {DB_IP} drop; }}\n}}\n"
        ),
    );
    let cut = Instant::now();
    wait_for(
        LEASE * 10,
        "the cut-off leader did not step down",
        || nodes[old].leads().is_none().then_some(()),
        logs,
    );
    let stepped = cut.elapsed();
    eprintln!("partition: the cut-off leader stepped down {stepped:?} after the cut");
    assert!(
        stepped <= LEASE + SLACK,
        "stepped down after {stepped:?}, more than one lease ({LEASE:?})\n{}",
        logs()
    );
    let (new, new_epoch) = wait_for(
        Duration::from_secs(20),
        "no controller took over",
        || {
            (0..nodes.len())
                .filter(|&i| i != old)
                .find_map(|i| Some((i, nodes[i].leads()?)))
        },
        logs,
    );
    assert!(new_epoch > epoch, "the new leader rekeys above {epoch}");
    wait_for(
        Duration::from_secs(30),
        "members did not follow the new leader's first rekey",
        || converged(&members, new_epoch),
        logs,
    );

    // Membership through the new leader: an eviction (with a ban: the evicted daemon would
    // register again) and a join (asking the cut-off controller first).
    let evicted = ids[0];
    nodes[new].ctl(&["evict", "--ban", "demo", &evicted.to_string()]);
    let joiner = MemberDaemon::start(&member_hosts[0], &dir, members.len(), &key, &order);
    let gone = members.remove(0);
    members.push(joiner);
    let after = wait_for(
        Duration::from_secs(60),
        "the eviction and the join did not reach every member",
        || {
            let epoch = nodes[new].leads()?;
            converged(&members, epoch).map(|ids| (epoch, ids))
        },
        logs,
    );
    assert!(
        gone.view().is_none_or(|v| v.1 < after.0),
        "the evicted member holds the epoch after its eviction"
    );

    // Heal: the old leader stands by, its warm copy at the new leader's epoch; nothing lost.
    nft(&nodes[old].host.ns, "delete table inet gkmpart\n");
    wait_for(
        LEASE * 10,
        "the healed controller holds no warm copy at the leader's epoch",
        || {
            let g = nodes[old].group()?;
            let leads = nodes[new].leads()?;
            (g["role"] == "standby" && g["epoch"].as_u64() == Some(leads)).then_some(())
        },
        logs,
    );
    let listed: serde_json::Value =
        serde_json::from_str(&nodes[new].ctl(&["--json", "members", "demo"])).unwrap();
    let mut listed: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    listed.sort_unstable();
    let mut want = after.1.clone();
    want.sort_unstable();
    assert_eq!(listed, want, "every member the leader lists holds the key");
    assert!(!listed.contains(&evicted));
    assert!(
        ids[1..].iter().all(|id| listed.contains(id)),
        "no member lost"
    );
    assert!(
        nodes[old].log().contains("\"event\":\"deposed\""),
        "the cut-off leader logs its deposition\n{}",
        nodes[old].log()
    );
    let final_epoch = nodes[new].leads().unwrap();
    let _ = converged(&members, final_epoch);
    drop(members);
    drop(gone);
    for node in &mut nodes {
        node.running = None;
    }
    drop(pg);
}
