//! Private Postgres and Redis servers for the test process, on free loopback ports.
//!
//! Each server has a guardian: a `sh` that waits on a pipe from this process and stops the
//! server (and removes its files) when the pipe closes, i.e. when the test process exits,
//! however it exits. Servers can be stopped, frozen and restarted by the tests that need
//! outages; such tests start their own (`dedicated`) so that others are not disturbed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static SERIAL: AtomicUsize = AtomicUsize::new(0);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as the `postgres` OS user when we are root (Postgres refuses root).
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A `sh` that runs `script` once this process's end of its stdin closes. In a process
/// group of its own, so that killing the test run's group (a timeout, Ctrl-C) still leaves
/// it to clean up.
fn guardian(script: &str) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(format!("read _ignored; {script}"))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn guardian")
}

fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "itemcache-test-{}-{kind}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres is installed (/usr/lib/postgresql); scripts/test installs it")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

pub fn wait_for_port(port: u16, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `redis-server` on loopback `port` that persists nothing, with `extra` arguments.
fn redis_server(port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed; scripts/test installs it")
}

/// A Postgres cluster of our own.
pub struct PgServer {
    pub port: u16,
    data: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    _guardian: Mutex<Child>,
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = pg_bin_dir();
        let dir = scratch_dir("pg");
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let data = dir.join("data");
        run(as_pg_user(&bin.join("initdb")).arg("-D").arg(&data).args([
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]));
        PgServer::run_on_free_port(bin, dir, data)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), on a port of its own; hot
    /// standby, so it answers reads. Its data is `primary`'s at the backup and follows it.
    /// `-c fast`: the backup's checkpoint at once, not spread over minutes.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let bin = primary.bin.clone();
        let dir = scratch_dir("pg-standby");
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let data = dir.join("data");
        run(as_pg_user(&bin.join("pg_basebackup"))
            .arg("-D")
            .arg(&data)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(primary.port.to_string()));
        PgServer::run_on_free_port(bin, dir, data)
    }

    /// Starts the cluster in `data` on a free port, with a guardian that stops it and
    /// removes `dir` when the test process ends.
    fn run_on_free_port(bin: PathBuf, dir: PathBuf, data: PathBuf) -> PgServer {
        let server = PgServer {
            port: free_port(),
            _guardian: Mutex::new(guardian(&format!(
                "{} {} -D {} stop -m immediate; rm -rf {}",
                if is_root() {
                    "runuser -u postgres --"
                } else {
                    ""
                },
                bin.join("pg_ctl").display(),
                data.display(),
                dir.display()
            ))),
            data,
            dir,
            bin,
        };
        server.start_again();
        server
    }

    /// Starts the (stopped) server on its port.
    pub fn start_again(&self) {
        // fsync off: test data need not survive a machine crash. synchronous_commit stays on:
        // `stop -m immediate` is a crash of Postgres, and acknowledged rows must survive it.
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c shared_preload_libraries=pg_stat_statements \
             -c fsync=off -c full_page_writes=off -c max_connections=400",
            self.port,
            self.dir.display()
        );
        run(as_pg_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"]));
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn stop(&self) {
        run(as_pg_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]));
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// A Redis server of our own.
pub struct RedisServer {
    pub port: u16,
    state: Mutex<RedisProcess>,
}

struct RedisProcess {
    child: Child,
    _guardian: Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        RedisServer {
            port,
            state: Mutex::new(Self::spawn(port)),
        }
    }

    fn spawn(port: u16) -> RedisProcess {
        let child = redis_server(port, &[]);
        let guardian = guardian(&format!("kill -CONT {0}; kill -9 {0}", child.id()));
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "redis on {port} did not start"
        );
        RedisProcess {
            child,
            _guardian: guardian,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let pid = self.state.lock().unwrap().child.id();
        run(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string()));
    }

    /// SIGSTOP: the socket still accepts, nothing answers.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Kills the server: connections are refused until [`RedisServer::restart`].
    pub fn kill(&self) {
        let mut state = self.state.lock().unwrap();
        let _ = state.child.kill();
        let _ = state.child.wait();
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&self) {
        let mut state = self.state.lock().unwrap();
        *state = Self::spawn(self.port);
    }
}

/// A Redis Cluster of our own: 3 masters and 3 replicas on free ports, with a 1 s node
/// timeout so that a killed master is replaced within a few seconds.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    _dir: PathBuf,
}

pub struct ClusterNode {
    pub port: u16,
    child: Mutex<Option<Child>>,
    /// Stopped (SIGSTOP): asked nothing, since it would answer nothing.
    frozen: std::sync::atomic::AtomicBool,
    _guardian: Child,
}

impl ClusterNode {
    /// Starts a node on a free port with its cluster bus on another free port (`--cluster-port`;
    /// the default, port + 10000, may be some other socket's ephemeral port, or past 65535).
    /// A node that exits at once lost a port to another process between `free_port` and its
    /// bind: it is started again on fresh ports.
    fn start(dir: &Path, node_timeout: Duration) -> ClusterNode {
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            if port == bus {
                continue;
            }
            let mut child = redis_server(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    &node_timeout.as_millis().to_string(),
                    // Sync replicas at once, not after the default 5 s wait for more.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    dir.to_str().expect("utf-8 temp dir"),
                ],
            );
            let until = Instant::now() + Duration::from_secs(10);
            let listening = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                if Instant::now() >= until {
                    let _ = child.kill();
                    panic!("cluster node on {port} did not start");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !listening {
                continue;
            }
            let guardian = guardian(&format!(
                "kill -CONT {0}; kill -9 {0}; rm -rf {1}",
                child.id(),
                dir.display()
            ));
            return ClusterNode {
                port,
                child: Mutex::new(Some(child)),
                frozen: Default::default(),
                _guardian: guardian,
            };
        }
        panic!("no cluster node started in 5 tries on fresh ports");
    }
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with_node_timeout(Duration::from_secs(1))
    }

    /// A cluster whose nodes take `node_timeout` to judge a silent master failed (and fail
    /// it over).
    pub fn start_with_node_timeout(node_timeout: Duration) -> RedisCluster {
        let dir = scratch_dir("redis-cluster");
        let nodes: Vec<ClusterNode> = (0..6)
            .map(|_| ClusterNode::start(&dir, node_timeout))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        run(&mut create);
        let cluster = RedisCluster { nodes, _dir: dir };
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster.wait_for_replicas(Duration::from_secs(30));
        cluster
    }

    /// Waits until every master knows its replica: `cluster_state:ok` comes first, and a
    /// master learns of its replica by gossip (CI once found none right after the start).
    fn wait_for_replicas(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let replicas = |port: u16| {
            let id = Self::cli(port, &["cluster", "myid"])?;
            Self::cli(port, &["cluster", "replicas", id.trim()])
        };
        loop {
            let nodes = self
                .alive()
                .next()
                .and_then(|n| Self::cli(n.port, &["cluster", "nodes"]))
                .unwrap_or_default();
            let masters: Vec<u16> = nodes
                .lines()
                .filter(|line| line.contains("master") && !line.contains("fail"))
                .filter_map(|line| {
                    let address = line.split_whitespace().nth(1)?;
                    address.split('@').next()?.rsplit(':').next()?.parse().ok()
                })
                .collect();
            let all = masters.len() == 3
                && masters
                    .iter()
                    .all(|&m| replicas(m).is_some_and(|r| !r.trim().is_empty()));
            if all {
                return;
            }
            assert!(
                Instant::now() < until,
                "the masters did not see their replicas"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed URLs, comma-separated (`REDIS_CLUSTER_NODES`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn cli(port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The nodes that run and answer (neither killed nor frozen).
    fn alive(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some() && !n.frozen.load(Ordering::Relaxed))
    }

    /// Waits until every live node says the cluster is ok and agrees on 3 masters with
    /// every slot served.
    pub fn wait_until_ok(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            let ok = self.alive().all(|n| {
                Self::cli(n.port, &["cluster", "info"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < until, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> u16 {
        self.find_master_of(key)
            .unwrap_or_else(|| panic!("no master serves {key}"))
    }

    /// Waits until a master other than `old` serves `key` (a failover), and the cluster is
    /// ok again.
    pub fn wait_for_failover(&self, key: &str, old: u16, deadline: Duration) -> u16 {
        let until = Instant::now() + deadline;
        loop {
            if let Some(port) = self.find_master_of(key).filter(|&p| p != old) {
                self.wait_until_ok(until.saturating_duration_since(Instant::now()));
                return port;
            }
            assert!(
                Instant::now() < until,
                "no failover of {key} away from {old}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn find_master_of(&self, key: &str) -> Option<u16> {
        let port = self.alive().next().expect("a live node").port;
        let slot: u16 = Self::cli(port, &["cluster", "keyslot", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = Self::cli(port, &["cluster", "nodes"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut bounds = range.split('-').map(|b| b.parse::<u16>().ok());
                match (bounds.next().flatten(), bounds.next()) {
                    (Some(low), Some(Some(high))) => (low..=high).contains(&slot),
                    (Some(only), None) => only == slot,
                    _ => false,
                }
            });
            if serves {
                let address = fields[1].split('@').next().unwrap_or_default();
                return address.rsplit(':').next().and_then(|p| p.parse().ok());
            }
        }
        None
    }

    /// What the node on `port` (a replica too) holds under `key`.
    pub fn value_on(&self, port: u16, key: &str) -> Option<String> {
        use std::io::Write;
        let mut cli = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = cli.stdin.take()?;
        writeln!(stdin, "READONLY\nGET {key}").ok()?;
        drop(stdin);
        let out = cli.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = text.lines().nth(1)?.trim().to_owned();
        (!value.is_empty()).then_some(value)
    }

    /// Closes the master's replication links: what it takes next reaches no replica until
    /// they reconnect (a frozen replica cannot).
    pub fn cut_replication(&self, master: u16) {
        Self::cli(master, &["client", "kill", "type", "replica"]).expect("CLIENT KILL");
    }

    /// The port of a replica of the master on `master`.
    pub fn replica_of(&self, master: u16) -> u16 {
        let id = Self::cli(master, &["cluster", "myid"]).expect("CLUSTER MYID");
        let replicas = Self::cli(master, &["cluster", "replicas", id.trim()]).expect("REPLICAS");
        replicas
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter_map(|address| address.split('@').next()?.rsplit(':').next()?.parse().ok())
            .next()
            .expect("a replica")
    }

    fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }

    fn signal(&self, port: u16, signal: &str) {
        if let Some(child) = self.node(port).child.lock().unwrap().as_ref() {
            run(Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string()));
        }
    }

    /// Kills a node for good.
    pub fn kill(&self, port: u16) {
        if let Some(mut child) = self.node(port).child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the node neither answers nor replicates.
    pub fn freeze(&self, port: u16) {
        self.signal(port, "STOP");
        self.node(port).frozen.store(true, Ordering::Relaxed);
    }

    pub fn thaw(&self, port: u16) {
        self.signal(port, "CONT");
        self.node(port).frozen.store(false, Ordering::Relaxed);
    }
}

/// A private nginx in front of instances (`deploy/nginx.conf`, rendered for them by
/// `deploy/render-nginx-conf`), on a free port.
pub struct NginxServer {
    pub port: u16,
    child: Mutex<Child>,
    _guardian: Child,
}

impl NginxServer {
    pub fn start(instances: &[u16]) -> NginxServer {
        let dir = scratch_dir("nginx");
        let port = free_port();
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut render = Command::new(deploy.join("render-nginx-conf"));
        render.arg(format!("127.0.0.1:{port}"));
        for instance in instances {
            render.arg(format!("127.0.0.1:{instance}"));
        }
        let rendered = render.output().expect("deploy/render-nginx-conf runs");
        assert!(rendered.status.success(), "render-nginx-conf failed");
        std::fs::write(dir.join("nginx.conf"), rendered.stdout).expect("nginx.conf written");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .args(["-c", "nginx.conf", "-e", "stderr", "-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx is installed; scripts/test installs it");
        let guardian = guardian(&format!(
            "kill -TERM {0}; sleep 1; kill -9 {0} 2>/dev/null; rm -rf {1}",
            child.id(),
            dir.display()
        ));
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "nginx on {port} did not start"
        );
        NginxServer {
            port,
            child: Mutex::new(child),
            _guardian: guardian,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        // nginx's master stops its workers on SIGQUIT/SIGTERM; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}
