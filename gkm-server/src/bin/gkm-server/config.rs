//! The TOML configuration: where to listen and, per group, its multicast address and policy.
//! Every setting has a default, so `gkm-server run` works with no file at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use gkm_server::{Enrollment, GroupPolicy, Timestamp, TokenRule};
use lkh_tree::GroupId;
use serde::Deserialize;

/// The commented default file `gkm-server init` writes.
pub(crate) const DEFAULT_TOML: &str = r#"# gkm-server configuration. Every setting has a default; delete what you do not change.

# Member requests (TCP, one length-prefixed request per connection) and fan-out subscriptions
# (UDP) on the same address and port.
listen = "127.0.0.1:47700"

# Prometheus text endpoint (optional).
# metrics = "127.0.0.1:9477"

# Request connections open at once. A member's connection stays open until its batch is
# rekeyed, so with batch_interval_ms = B at most max_connections * 1000 / B registrations
# complete per second. Each takes a file descriptor: keep it under `ulimit -n`.
# max_connections = 4096

# Where group states are kept. The default, "redb", is a file in the state directory (one
# machine, no database). "postgres" keeps them in PostgreSQL, sealed under the storage key, so
# that several controllers (each with the same controller.key and storage.key) serve the groups
# highly available: per group one leads, the others stand by and take over when its lease runs
# out. See RFC-notes/ha.md.
# [storage]
# backend = "postgres"
# url = "host=/run/postgresql dbname=gkm user=gkm"   # or postgresql://gkm@db.example/gkm
# password_file = "/etc/gkm/pg-password"             # else $PGPASSWORD; never on the command line
# lease_ms = 3000          # a leader that cannot renew for this long is replaced
# advertise = "10.0.0.1:47700"   # where members reach this controller (default: listen)

[[group]]
name = "demo"
multicast = "239.255.77.1:47701"
ttl = 1
interface = "127.0.0.1"   # IPv4: the interface address; IPv6: the interface index
loop = true
# Also send each datagram by unicast to members that multicast does not reach, each at the one
# address where it proved (by echoing a cookie) that it receives: no address gets more than a
# cookie smaller than the request before that.
fanout = true
# degree = 4
# strategy = "group"      # group | key | user
# hash_forward_joins = false
# one_way = true
# batch_interval_ms = 0
# heartbeat_interval_ms = 2000
# lease_ms = 60000
# refresh_interval_ms = 0
# repeats = 2
# repeat_spacing_ms = 100  # time between the sends of one datagram
# mtu = 1200
# The KEMs of the members' HPKE keys, to which welcomes and resync responses are sealed:
# "x-wing" (ML-KEM-768 + X25519: stays confidential against a quantum computer later), or
# "x25519" for members that cannot afford X-Wing's 1,216-byte key, or both. Members under
# another KEM are refused, and told which the group takes.
# kem = "x-wing"          # or "x25519", or ["x-wing", "x25519"]
# enrollment = "open"     # open | restricted
# allowed = []            # hex Ed25519 identity keys (restricted)
# Single-use enrollment tokens (restricted): a string, or a table that may set an expiry and
# the one identity that may spend it. A token is spent for good, across restarts.
# tokens = ["tok-1", { token = "tok-2", expires = 2027-06-30T00:00:00Z, identity = "<hex>" }]
"#;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// TCP requests and UDP subscriptions.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// Prometheus endpoint.
    #[serde(default)]
    pub(crate) metrics: Option<SocketAddr>,
    /// Request connections open at once.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// Groups; one "demo" group when none is given.
    #[serde(default = "default_groups", rename = "group")]
    pub(crate) groups: Vec<GroupConfig>,
    /// Where group states are kept.
    #[serde(default)]
    pub(crate) storage: StorageConfig,
}

/// The `[storage]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageConfig {
    /// `redb` (default) or `postgres`.
    #[serde(default)]
    pub(crate) backend: Backend,
    /// PostgreSQL connection string (`postgres`).
    pub(crate) url: Option<String>,
    /// A file holding the database password (`postgres`).
    pub(crate) password_file: Option<std::path::PathBuf>,
    /// How long a leader's lease lasts without renewal (`postgres`).
    pub(crate) lease_ms: Option<u64>,
    /// The request address members reach this controller at (`postgres`; default `listen`).
    pub(crate) advertise: Option<SocketAddr>,
}

/// Where group states are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Backend {
    /// A redb file in the state directory.
    #[default]
    Redb,
    /// PostgreSQL, shared by several controllers.
    Postgres,
}

/// The shortest lease: renewals run three times a lease, and a save must fit in one.
pub(crate) const MIN_LEASE_MS: u64 = 500;
/// The lease when none is configured.
pub(crate) const DEFAULT_LEASE_MS: u64 = 3_000;

impl StorageConfig {
    /// How to reach PostgreSQL (`postgres`).
    pub(crate) fn pg(&self) -> gkm_server::PgConfig {
        gkm_server::PgConfig {
            url: self.url.clone().unwrap_or_default(),
            password_file: self.password_file.clone(),
        }
    }

    /// The lease length.
    pub(crate) fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_ms.unwrap_or(DEFAULT_LEASE_MS))
    }

    fn check(&self) -> Result<()> {
        match self.backend {
            Backend::Redb => {
                let postgres_only = [
                    ("url", self.url.is_some()),
                    ("password_file", self.password_file.is_some()),
                    ("lease_ms", self.lease_ms.is_some()),
                    ("advertise", self.advertise.is_some()),
                ];
                if let Some((key, _)) = postgres_only.iter().find(|(_, set)| *set) {
                    bail!(
                        "[storage] {key} is for backend = \"postgres\"; set that, or remove {key}"
                    );
                }
            }
            Backend::Postgres => {
                if self.url.is_none() {
                    bail!(
                        "[storage] backend = \"postgres\" needs url = \"…\" (for example \
                         \"host=/run/postgresql dbname=gkm user=gkm\")"
                    );
                }
                if let Some(ms) = self.lease_ms
                    && ms < MIN_LEASE_MS
                {
                    bail!("[storage] lease_ms is at least {MIN_LEASE_MS}, not {ms}");
                }
            }
        }
        Ok(())
    }
}

/// One group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupConfig {
    pub(crate) name: String,
    #[serde(default = "default_multicast")]
    pub(crate) multicast: SocketAddr,
    #[serde(default = "default_ttl")]
    pub(crate) ttl: u32,
    #[serde(default = "default_interface")]
    pub(crate) interface: String,
    #[serde(default = "yes", rename = "loop")]
    pub(crate) multicast_loop: bool,
    #[serde(default = "yes")]
    pub(crate) fanout: bool,
    degree: Option<u8>,
    strategy: Option<String>,
    hash_forward_joins: Option<bool>,
    one_way: Option<bool>,
    batch_interval_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    lease_ms: Option<u64>,
    refresh_interval_ms: Option<u64>,
    repeats: Option<u8>,
    repeat_spacing_ms: Option<u64>,
    mtu: Option<usize>,
    kem: Option<KemConfig>,
    enrollment: Option<String>,
    #[serde(default)]
    allowed: Vec<String>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

/// The `kem` setting: one KEM's name, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KemConfig {
    One(String),
    Some(Vec<String>),
}

impl KemConfig {
    /// As [`GroupPolicy::set`] takes it: names separated by commas.
    fn setting(&self) -> String {
        match self {
            KemConfig::One(name) => name.clone(),
            KemConfig::Some(names) => names.join(","),
        }
    }
}

/// One enrollment token: the token alone, or with its conditions. A token is a secret: its
/// `Debug` prints `***`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenConfig {
    Plain(String),
    Rule(TokenRuleConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRuleConfig {
    token: String,
    expires: Option<toml::value::Datetime>,
    identity: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 47_700))
}
/// The most request connections a config may allow.
const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;
fn default_max_connections() -> usize {
    4_096
}
fn default_multicast() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(239, 255, 77, 1), 47_701))
}
fn default_ttl() -> u32 {
    1
}
fn default_interface() -> String {
    "127.0.0.1".into()
}
fn yes() -> bool {
    true
}
fn default_groups() -> Vec<GroupConfig> {
    vec![GroupConfig::named("demo")]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            metrics: None,
            max_connections: default_max_connections(),
            groups: default_groups(),
            storage: StorageConfig::default(),
        }
    }
}

impl Config {
    /// Reads and checks `path`: a setting that does not parse, an unknown key, or a value
    /// the daemon could not serve is an error naming the file (and, from the parser, the line
    /// and the key).
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))?;
        config
            .check()
            .with_context(|| format!("config file {}", path.display()))?;
        Ok(config)
    }

    /// Every check `run` would make of the settings before serving them.
    fn check(&self) -> Result<()> {
        self.storage.check()?;
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            bail!(
                "max_connections is 1..={MAX_CONNECTIONS_LIMIT}, not {}",
                self.max_connections
            );
        }
        let mut ids = BTreeMap::new();
        for g in &self.groups {
            if !valid_name(&g.name) {
                bail!(
                    "group name {:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-'",
                    g.name
                );
            }
            if let Some(other) = ids.insert(g.id(), g.name.as_str()) {
                if other == g.name {
                    bail!("group {other:?} appears twice");
                }
                bail!(
                    "groups {other:?} and {:?} have the same id; rename one",
                    g.name
                );
            }
            g.policy()?;
            g.interface()?;
        }
        Ok(())
    }

    /// What the daemon serves with this config, for people (`gkm-server check-config`).
    pub(crate) fn describe(&self) -> Result<String> {
        use std::fmt::Write as _;
        let mut out = String::new();
        let metrics = self.metrics.map_or("off".to_owned(), |m| m.to_string());
        writeln!(out, "listen            {}", self.listen)?;
        writeln!(out, "metrics           {metrics}")?;
        writeln!(out, "max_connections   {}", self.max_connections)?;
        match self.storage.backend {
            Backend::Redb => writeln!(
                out,
                "storage           redb (state.redb in the state directory)"
            )?,
            Backend::Postgres => writeln!(
                out,
                "storage           postgres, lease {} ms, advertised as {}",
                self.storage.lease().as_millis(),
                self.storage.advertise.unwrap_or(self.listen)
            )?,
        }
        for g in &self.groups {
            let p = g.policy()?;
            writeln!(out, "group {:?} (id {})", g.name, p.id)?;
            writeln!(
                out,
                "  multicast       {} ttl {} interface {} loop {}",
                g.multicast, g.ttl, g.interface, g.multicast_loop
            )?;
            writeln!(out, "  fanout          {}", g.fanout)?;
            let enrollment = match &p.enrollment {
                Enrollment::Open => "open: anyone who can reach `listen` may join".to_owned(),
                Enrollment::Restricted { allowed, tokens } => format!(
                    "restricted: {} allowed identities, {} tokens (spent tokens are not shown)",
                    allowed.len(),
                    tokens.len()
                ),
            };
            writeln!(out, "  enrollment      {enrollment}")?;
            writeln!(
                out,
                "  tree            degree {} strategy {:?} hash_forward_joins {} one_way {}",
                p.tree.degree, p.tree.strategy, p.tree.hash_forward_joins, p.tree.one_way
            )?;
            writeln!(
                out,
                "  timing          batch {} ms, heartbeat {} ms, lease {} ms, refresh {} ms",
                p.batch_interval_ms, p.heartbeat_interval_ms, p.lease_ms, p.refresh_interval_ms
            )?;
            writeln!(
                out,
                "  datagrams       mtu {}, {} sends {} ms apart",
                p.mtu, p.repeats, p.repeat_spacing_ms
            )?;
            let kems: Vec<&str> = p.kems.iter().map(|k| k.name()).collect();
            writeln!(out, "  member keys     {}", kems.join(", "))?;
        }
        Ok(out)
    }
}

/// The longest group name.
const MAX_NAME: usize = 64;

/// Whether `name` can name a group: it shows in tables, metric labels, logs and command lines
/// as it is, so it holds no space, quote or control character.
fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl GroupConfig {
    fn named(name: &str) -> GroupConfig {
        GroupConfig {
            name: name.into(),
            multicast: default_multicast(),
            ttl: default_ttl(),
            interface: default_interface(),
            multicast_loop: true,
            fanout: true,
            degree: None,
            strategy: None,
            hash_forward_joins: None,
            one_way: None,
            batch_interval_ms: None,
            heartbeat_interval_ms: None,
            lease_ms: None,
            refresh_interval_ms: None,
            repeats: None,
            repeat_spacing_ms: None,
            mtu: None,
            kem: None,
            enrollment: None,
            allowed: Vec::new(),
            tokens: Vec::new(),
        }
    }

    /// The group's id: derived from its name, as members derive it.
    pub(crate) fn id(&self) -> GroupId {
        GroupId::from_name(&self.name)
    }

    /// The interface to send multicast on: an IPv4 address, or an IPv6 interface index.
    pub(crate) fn interface(&self) -> Result<Interface> {
        match self.multicast.ip() {
            IpAddr::V4(_) => self
                .interface
                .parse()
                .map(Interface::V4)
                .with_context(|| {
                    format!(
                        "group {:?}: interface {:?} is not an IPv4 address",
                        self.name, self.interface
                    )
                }),
            IpAddr::V6(_) => self.interface.parse().map(Interface::V6).with_context(|| {
                format!(
                    "group {:?}: for IPv6 multicast, interface is an interface index (see `ip link`), not {:?}",
                    self.name, self.interface
                )
            }),
        }
    }

    /// The controller's policy for this group.
    pub(crate) fn policy(&self) -> Result<GroupPolicy> {
        let what = |field: &str| format!("group {:?}: bad {field}", self.name);
        let mut p = GroupPolicy::new(&self.name, self.id());
        p.rekey_address = Some(self.multicast);
        p.fanout = self.fanout;
        let settings = [
            ("degree", self.degree.map(|v| v.to_string())),
            ("strategy", self.strategy.clone()),
            (
                "hash_forward_joins",
                self.hash_forward_joins.map(|v| v.to_string()),
            ),
            ("one_way", self.one_way.map(|v| v.to_string())),
            (
                "batch_interval_ms",
                self.batch_interval_ms.map(|v| v.to_string()),
            ),
            (
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms.map(|v| v.to_string()),
            ),
            ("lease_ms", self.lease_ms.map(|v| v.to_string())),
            (
                "refresh_interval_ms",
                self.refresh_interval_ms.map(|v| v.to_string()),
            ),
            ("repeats", self.repeats.map(|v| v.to_string())),
            (
                "repeat_spacing_ms",
                self.repeat_spacing_ms.map(|v| v.to_string()),
            ),
            ("mtu", self.mtu.map(|v| v.to_string())),
            ("kem", self.kem.as_ref().map(KemConfig::setting)),
        ];
        for (key, value) in settings {
            if let Some(value) = value {
                p.set(key, &value)
                    .map_err(|e| anyhow::anyhow!("group {:?}: bad {e}", self.name))?;
            }
        }
        p.enrollment = match self.enrollment.as_deref() {
            None | Some("open") => Enrollment::Open,
            Some("restricted") => {
                let mut allowed = BTreeSet::new();
                for key in &self.allowed {
                    let bytes: [u8; 32] = hex::decode(key)
                        .ok()
                        .and_then(|b| b.try_into().ok())
                        .with_context(|| {
                            format!("{}: {key:?} is not 64 hex digits", what("allowed key"))
                        })?;
                    allowed.insert(bytes);
                }
                let mut tokens = BTreeMap::new();
                for token in &self.tokens {
                    let (token, rule) = token.rule().map_err(|e| e.context(what("token")))?;
                    if tokens
                        .insert(gkm_server::token_digest(token.as_bytes()), rule)
                        .is_some()
                    {
                        bail!("{}: a token is listed twice", what("token"));
                    }
                }
                Enrollment::Restricted { allowed, tokens }
            }
            Some(other) => bail!("{}: {other:?}; use open or restricted", what("enrollment")),
        };
        Ok(p)
    }
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenConfig(***)")
    }
}

impl TokenConfig {
    /// The token and its conditions.
    fn rule(&self) -> Result<(&str, TokenRule)> {
        let rule = match self {
            TokenConfig::Plain(token) => return Ok((token, TokenRule::default())),
            TokenConfig::Rule(rule) => rule,
        };
        let expires = rule
            .expires
            .as_ref()
            .map(unix_ms)
            .transpose()?
            .map(Timestamp);
        let identity = rule
            .identity
            .as_deref()
            .map(|key| {
                hex::decode(key)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .with_context(|| format!("identity {key:?} is not 64 hex digits"))
            })
            .transpose()?;
        Ok((&rule.token, TokenRule { expires, identity }))
    }
}

/// Milliseconds since the Unix epoch of a TOML date-time with an offset (an instant).
fn unix_ms(at: &toml::value::Datetime) -> Result<u64> {
    let (Some(date), Some(time), Some(offset)) = (at.date, at.time, at.offset) else {
        bail!(
            "expires {at} is not an instant: give a date, a time and an offset (2027-06-30T00:00:00Z)"
        );
    };
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let (y, m, d) = (
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let offset_minutes = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => i64::from(minutes),
    };
    let seconds = days * 86_400
        + i64::from(time.hour) * 3_600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    let ms = seconds * 1_000 + i64::from(time.nanosecond.unwrap_or(0) / 1_000_000);
    u64::try_from(ms).with_context(|| format!("expires {at} is before 1970"))
}

/// Where multicast leaves the host.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Interface {
    V4(Ipv4Addr),
    V6(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        let c: Config = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.max_connections, default_max_connections());
        assert_eq!(c.groups.len(), 1);
        let p = c.groups[0].policy().unwrap();
        let mut want = GroupPolicy::new("demo", GroupId::from_name("demo"));
        want.rekey_address = Some(default_multicast());
        assert_eq!(p, want);
    }

    #[test]
    fn group_names_that_would_not_print_plainly_are_refused() {
        let path = std::env::temp_dir().join(format!("gkm-names-{}.toml", std::process::id()));
        let long = "x".repeat(MAX_NAME + 1);
        let cases = [
            ("iptv-sports.eu_1", None),
            ("", Some("group name \"\"")),
            ("two words", Some("use 1 to 64 letters")),
            ("quote\\\"", Some("use 1 to 64 letters")),
            ("line\\n", Some("use 1 to 64 letters")),
            (long.as_str(), Some("use 1 to 64 letters")),
        ];
        for (name, refused) in cases {
            std::fs::write(&path, format!("[[group]]\nname = \"{name}\"\n")).unwrap();
            match (Config::load(&path), refused) {
                (Ok(c), None) => assert_eq!(c.groups[0].name, name),
                (Err(e), Some(why)) => assert!(format!("{e:#}").contains(why), "{name:?}: {e:#}"),
                (outcome, _) => panic!("{name:?}: {outcome:?}"),
            }
        }
        std::fs::write(&path, "[[group]]\nname = \"a\"\n[[group]]\nname = \"a\"\n").unwrap();
        let error = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(error.contains("group \"a\" appears twice"), "{error}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn tokens_never_print() {
        let c: Config = toml::from_str(
            "[[group]]\nname = \"g\"\ntokens = [\"sekrit-1\", { token = \"sekrit-2\" }]\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
    }

    #[test]
    fn token_expiries_are_instants() {
        let at = |s: &str| unix_ms(&s.parse().unwrap());
        assert_eq!(at("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(at("2027-06-30T00:00:00Z").unwrap(), 1_814_313_600_000);
        assert_eq!(
            at("2000-02-29T12:30:15.250+02:00").unwrap(),
            951_820_215_250
        );
        assert!(at("2027-06-30").is_err(), "a date alone is not an instant");
        assert!(
            at("2027-06-30T00:00:00").is_err(),
            "no offset: not an instant"
        );
    }

    #[test]
    fn tokens_may_carry_an_expiry_and_an_identity() {
        let key = "ab".repeat(32);
        let text = format!(
            "[[group]]\nname = \"g\"\nenrollment = \"restricted\"\ntokens = [\"a\", \
             {{ token = \"b\", expires = 2027-06-30T00:00:00Z, identity = \"{key}\" }}]\n"
        );
        let c: Config = toml::from_str(&text).unwrap();
        let Enrollment::Restricted { tokens, .. } = c.groups[0].policy().unwrap().enrollment else {
            panic!("restricted");
        };
        assert_eq!(
            tokens[&gkm_server::token_digest(b"a")],
            TokenRule::default()
        );
        let b = tokens[&gkm_server::token_digest(b"b")];
        assert_eq!(b.expires, Some(Timestamp(1_814_313_600_000)));
        assert_eq!(b.identity, Some([0xab; 32]));
    }

    #[test]
    fn max_connections_out_of_range_is_refused_with_its_range() {
        let path = std::env::temp_dir().join(format!("gkm-config-{}.toml", std::process::id()));
        for (value, ok) in [("0", false), ("1", true), ("2000000", false)] {
            std::fs::write(&path, format!("max_connections = {value}\n")).unwrap();
            match Config::load(&path) {
                Ok(c) => assert!(ok && c.max_connections == 1, "{value} accepted"),
                Err(e) => assert!(
                    !ok && format!("{e:#}").contains("max_connections is 1..="),
                    "{value}: {e:#}"
                ),
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn kem_takes_one_name_or_a_list_and_refuses_an_unknown_one() {
        let kems = |setting: &str| {
            let text = format!("[[group]]\nname = \"g\"\n{setting}\n");
            let c: Config = toml::from_str(&text).unwrap();
            c.groups[0]
                .policy()
                .map(|p| p.kems)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(kems("").unwrap(), [wire::Kem::XWing]);
        assert_eq!(kems("kem = \"x25519\"").unwrap(), [wire::Kem::X25519]);
        assert_eq!(
            kems("kem = [\"x25519\", \"x-wing\"]").unwrap(),
            [wire::Kem::XWing, wire::Kem::X25519]
        );
        let refused = kems("kem = \"kyber\"").unwrap_err();
        assert!(refused.contains("x-wing, x25519, or both"), "{refused}");
        assert!(kems("kem = []").is_err());
    }
}
