//! A private PostgreSQL server for one test: `initdb -A trust` into a temporary directory,
//! started with `pg_ctl` on a Unix socket in that directory (no TCP), stopped (`-m immediate`)
//! and removed on drop. As root, `initdb` and the server run as the `postgres` user (`initdb`
//! refuses root). Without `initdb`/`pg_ctl` the test fails saying to install Debian's
//! `postgresql`, unless `GKM_SKIP_POSTGRES=1`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The database role the tests connect as (made by `initdb -U`).
pub(crate) const USER: &str = "gkm";

/// A running private server.
pub(crate) struct PgServer {
    /// The temporary directory: the socket lives here, the cluster in `data/`.
    pub(crate) dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// A network namespace the server runs in and the address it listens on there (TCP, for
    /// the partition test); `None`: the Unix socket only.
    netns: Option<(String, std::net::Ipv4Addr)>,
}

/// Where `initdb` and `pg_ctl` are: on PATH, or in Debian's versioned directory.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|path| {
        std::env::split_paths(&path)
            .filter(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
            .collect::<Vec<_>>()
    });
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin"))
        .filter(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists());
    on_path.chain(debian).next()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

impl PgServer {
    /// Starts a server for the test `tag`; `None` (the test returns) only when PostgreSQL is
    /// missing and `GKM_SKIP_POSTGRES=1` is set.
    pub(crate) fn start(tag: &str) -> Option<PgServer> {
        PgServer::start_in(tag, None)
    }

    /// As [`PgServer::start`], the server run inside network namespace `ns` listening on TCP at
    /// `ip` (and on its socket), open to every address of `ip`'s /24 without a password.
    pub(crate) fn start_in(
        tag: &str,
        netns: Option<(String, std::net::Ipv4Addr)>,
    ) -> Option<PgServer> {
        let Some(bin) = binaries() else {
            let what = "PostgreSQL's initdb and pg_ctl (install Debian's postgresql: \
                        apt-get install postgresql)";
            if std::env::var_os("GKM_SKIP_POSTGRES").is_some_and(|v| v == "1") {
                println!("skipped (GKM_SKIP_POSTGRES=1): needs {what}");
                return None;
            }
            panic!("this test needs {what}; set GKM_SKIP_POSTGRES=1 to skip it");
        };
        let as_postgres = is_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("gkm-pg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = PgServer {
            dir,
            bin,
            as_postgres,
            netns,
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&server.dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres {}", server.dir.display());
        }
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                USER.as_ref(),
                "--no-sync".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
        if let Some((_, ip)) = &server.netns {
            let [a, b, c, _] = ip.octets();
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .unwrap();
            std::io::Write::write_all(
                &mut hba,
                format!("host all all {a}.{b}.{c}.0/24 trust\n").as_bytes(),
            )
            .unwrap();
        }
        server.start_again();
        Some(server)
    }

    /// The connection string (the socket directory as host).
    pub(crate) fn url(&self) -> String {
        match &self.netns {
            Some((_, ip)) => format!("host={ip} user={USER} dbname=postgres"),
            None => format!("host={} user={USER} dbname=postgres", self.dir.display()),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs one of the server's programs (as `postgres` when we are root); panics with its
    /// output if it fails.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
        out
    }

    /// One of the server's programs, as `postgres` when we are root, in its namespace if any.
    fn command(&self, program: &str) -> Command {
        let mut words: Vec<std::ffi::OsString> = Vec::new();
        if let Some((ns, _)) = &self.netns {
            words.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        if self.as_postgres {
            words.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
        }
        words.push(self.bin.join(program).into());
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd.current_dir(&self.dir);
        cmd
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub(crate) fn start_again(&self) {
        let listen = self
            .netns
            .as_ref()
            .map_or_else(String::new, |(_, ip)| ip.to_string());
        let options = format!(
            "-k {} -c listen_addresses='{listen}' -c fsync=off -c shared_buffers=16MB",
            self.dir.display()
        );
        let (data, log) = (self.data(), self.dir.join("server.log"));
        self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        );
    }

    /// Stops the server at once (`-m immediate`: as a crash, recovered at the next start).
    pub(crate) fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
    }

    /// Whether the server's socket is there.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join(".s.PGSQL.5432")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        if data.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `f` is true, at most `limit`.
pub(crate) fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
