//! One PostgreSQL server, owned by its node's agent: directories, initdb,
//! base backup, the files meridian writes before every start, the command
//! line, and the status queries.
//!
//! On-disk layout of a node (paths from `meridian.toml`):
//!
//! ```text
//! <data_dir>/                 PGDATA (initdb or pg_basebackup); postgresql.auto.conf and
//!                             standby.signal are rewritten by the agent before every start
//! <run_dir>/.s.PGSQL.<port>   the unix socket the agent connects to as `postgres` (peer)
//! <run_dir>/pg_hba.conf       written by the agent; outside PGDATA so base backups and
//! <run_dir>/pg_ident.conf     pg_rewind never carry one node's rules to another
//! <run_dir>/pgpass            the replication role's password for libpq (never on a command line)
//! <run_dir>/postgresql.log    the server's stderr
//! ```
//!
//! PostgreSQL refuses to run as root: when meridian runs as root, every
//! PostgreSQL program runs as `postgres.os_user` with a cleared environment.

mod copy;
pub mod files;
pub mod scratch;
pub mod spawner;
pub mod status;
pub mod supervisor;
pub mod timeline;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::{Config, Node};

/// The superuser initdb creates; reachable only over the unix socket, by peer authentication.
pub const SUPERUSER: &str = "postgres";

/// One node's PostgreSQL server: where it lives and who it runs as.
#[derive(Debug, Clone)]
pub struct Server {
    pub node: String,
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub address: SocketAddr,
    /// uid and gid to switch to before exec; None when not running as root.
    pub os_ids: Option<(u32, u32)>,
    /// The OS user that runs the agent, for the pg_ident map to `postgres`.
    pub agent_os_user: String,
    /// The node's certificate as the cluster CA issued it (`node-<name>`).
    pub tls: crate::tls::Identity,
}

impl Server {
    pub fn new(config: &Config, node: &Node) -> Result<Server> {
        let euid = unsafe { libc::geteuid() };
        let os_ids = if euid == 0 { Some(lookup_user(&config.postgres.os_user)?) } else { None };
        Ok(Server {
            node: node.name.clone(),
            bin_dir: config.postgres.bin_dir.clone(),
            data_dir: config.resolve(&node.data_dir),
            run_dir: config.resolve(&node.run_dir()),
            address: node.address,
            os_ids,
            agent_os_user: user_name(euid).unwrap_or_else(|| "root".into()),
            tls: config.tls_identity(&format!("node-{}", node.name)),
        })
    }

    /// A PostgreSQL program with a cleared environment, as the server's OS user,
    /// in a directory that user can read.
    pub fn command(&self, program: &str) -> Command {
        self.command_at(&self.bin_dir.join(program))
    }

    /// Any program, run as `command` runs PostgreSQL's.
    pub fn command_at(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8").current_dir(&self.run_dir);
        if let Some((uid, gid)) = self.os_ids {
            // std drops supplementary groups (setgroups(0)) when switching from root.
            cmd.uid(uid).gid(gid);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join("postgresql.log")
    }

    pub fn socket_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Creates the run directory and an empty data directory owned by the server's user.
    pub fn prepare_dirs(&self) -> Result<()> {
        for dir in [&self.run_dir, &self.data_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", dir.display()))?;
            self.chown(dir)?;
        }
        self.check_reachable()?;
        self.copy_tls()
    }

    /// PostgreSQL's user must be able to walk to the data directory; a lab under
    /// /root would fail later with a confusing error, so say it now.
    fn check_reachable(&self) -> Result<()> {
        if self.os_ids.is_none() {
            return Ok(());
        }
        let mut dir = self.data_dir.parent();
        while let Some(d) = dir {
            let mode = std::fs::metadata(d).map(|m| m.permissions().mode()).unwrap_or(0o755);
            if mode & 0o001 == 0 {
                bail!(
                    "the PostgreSQL user cannot reach {} because {} is mode {:o}; put the data under a directory others can traverse (for the lab: --dir /tmp/meridian-lab)",
                    self.data_dir.display(),
                    d.display(),
                    mode & 0o777
                );
            }
            dir = d.parent();
        }
        Ok(())
    }

    pub fn chown(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.os_ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    /// A new, empty cluster with data checksums (pg_rewind needs them or wal_log_hints).
    pub fn initdb(&self) -> Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            "--data-checksums",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        run_logged(cmd, "initdb", Duration::from_secs(120))
    }

    /// Copies the leader's data directory over the replication connection.
    /// The password comes from the passfile, never the command line.
    pub fn base_backup(&self, source: SocketAddr, replication_user: &str) -> Result<()> {
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-d")
            .arg(files::conninfo(source, replication_user, &self.passfile(), &self.run_dir, &self.node))
            .args(["-X", "stream", "--checkpoint=fast", "--no-password"]);
        run_logged(cmd, "pg_basebackup", Duration::from_secs(600))
    }

    /// Runs a SQL file with psql as the superuser, one statement at a time (so
    /// CREATE DATABASE works). The file is read here and fed on stdin, so it
    /// may stay readable only by the agent's user.
    pub fn run_sql_file(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
        let mut cmd = self.command("psql");
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.run_dir)
            .args(["-p", &self.address.port().to_string(), "-U", SUPERUSER, "-d", "postgres"])
            // Run at bootstrap, before any standby exists: with synchronous
            // replication configured, a commit would wait for one forever.
            .env("PGOPTIONS", "-c synchronous_commit=local")
            .stdin(file);
        run_logged(cmd, &format!("psql -f {}", path.display()), Duration::from_secs(300))
    }

    /// One field of `pg_controldata` (the server must be stopped to trust it).
    fn control_field(&self, field: &str) -> Result<String> {
        let mut cmd = self.command("pg_controldata");
        cmd.arg("-D").arg(&self.data_dir);
        let out = cmd.output().context("run pg_controldata")?;
        if !out.status.success() {
            bail!("pg_controldata failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_string()))
            .with_context(|| format!("pg_controldata printed no {field:?}"))
    }

    /// The timeline of the last checkpoint in the control file.
    pub fn control_timeline(&self) -> Result<u32> {
        self.control_field("Latest checkpoint's TimeLineID")?
            .parse()
            .context("parse the timeline pg_controldata printed")
    }

    /// The last checkpoint's location: after a clean stop, the shutdown checkpoint.
    pub fn control_checkpoint(&self) -> Result<crate::cluster::Lsn> {
        self.control_field("Latest checkpoint location")?.parse().map_err(anyhow::Error::msg)
    }

    /// Rewinds this (stopped) server to where its history diverged from `source`,
    /// so it can follow it. pg_rewind finishes a crash recovery first if needed,
    /// and reports "no rewind required" when nothing diverged.
    pub fn rewind(&self, source: SocketAddr, replication_user: &str) -> Result<()> {
        let conninfo = format!(
            "{} dbname=postgres",
            files::conninfo(source, replication_user, &self.passfile(), &self.run_dir, &self.node)
        );
        let mut cmd = self.command("pg_rewind");
        cmd.arg("--target-pgdata").arg(&self.data_dir).arg("--source-server").arg(conninfo);
        run_logged(cmd, "pg_rewind", Duration::from_secs(600))
    }

    pub fn passfile(&self) -> PathBuf {
        self.run_dir.join("pgpass")
    }

    /// The postmaster's command line: per-node settings here, so that a copied
    /// `postgresql.conf` (base backup, pg_rewind) can never carry another node's.
    pub fn postmaster_command(&self) -> Result<Command> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(&self.data_dir);
        let settings = [
            ("listen_addresses", self.address.ip().to_string()),
            ("port", self.address.port().to_string()),
            ("unix_socket_directories", self.run_dir.display().to_string()),
            ("hba_file", self.run_dir.join("pg_hba.conf").display().to_string()),
            ("ident_file", self.run_dir.join("pg_ident.conf").display().to_string()),
            ("cluster_name", self.node.clone()),
            ("hot_standby", "on".into()),
            ("wal_level", "replica".into()),
            // TLS with the node's certificate (copies owned by the server's user, see
            // `copy_tls`); PostgreSQL reads the files again on every reload.
            ("ssl", "on".into()),
            ("ssl_cert_file", self.tls_file(files::TLS_CERT).display().to_string()),
            ("ssl_key_file", self.tls_file(files::TLS_KEY).display().to_string()),
            ("ssl_ca_file", self.tls_file(files::TLS_CA).display().to_string()),
            ("ssl_min_protocol_version", "TLSv1.2".into()),
        ];
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        self.chown(&self.log_path())?;
        cmd.stdout(log.try_clone()?).stderr(log);
        Ok(cmd)
    }

    /// The postmaster under its supervisor (see `supervisor`): the supervisor
    /// runs as the agent's user (so it can always run this binary), with the
    /// server's environment and log; it switches to the server's user for the
    /// postmaster. Its stdin is the pipe the agent sends fencing orders on.
    pub fn supervised_postmaster_command(&self) -> Result<Command> {
        let pm = self.postmaster_command()?;
        // /proc/self/exe, not current_exe(): the binary may have been replaced
        // on disk (a rebuild) while this agent runs.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("meridian").arg(supervisor::SUBCOMMAND);
        if let Some((uid, gid)) = self.os_ids {
            cmd.args(["--uid", &uid.to_string(), "--gid", &gid.to_string()]);
        }
        cmd.arg("--").arg(pm.get_program()).args(pm.get_args());
        cmd.env_clear();
        for (k, v) in pm.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.current_dir(&self.run_dir);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        cmd.stdin(Stdio::piped()).stdout(log.try_clone()?).stderr(log);
        Ok(cmd)
    }

    /// Connection settings for the agent's own superuser connection over the socket.
    pub fn local_pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.run_dir)
            .port(self.address.port())
            .user(SUPERUSER)
            .dbname("postgres")
            .application_name("meridian-agent")
            .connect_timeout(Duration::from_secs(2));
        c
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = self
            .local_pg_config()
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to PostgreSQL over {}", self.run_dir.display()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Removes a `postmaster.pid` left by a server that is gone. PostgreSQL checks
    /// the old pid with kill(pid, 0), which succeeds for a zombie not yet reaped
    /// or a pid reused by another process, and then refuses to start.
    pub fn clear_stale_lock(&self) -> Result<()> {
        let lock = self.data_dir.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&lock) else { return Ok(()) };
        let pid: Option<u32> = text.lines().next().and_then(|l| l.trim().parse().ok());
        if let Some(pid) = pid {
            if crate::process::is_ours(pid, &self.data_dir.display().to_string()) {
                bail!("another postmaster (pid {pid}) already runs on {}; stop it first", self.data_dir.display());
            }
        }
        tracing::warn!("removing stale {} (pid {pid:?} is not a running postmaster)", lock.display());
        std::fs::remove_file(&lock).with_context(|| format!("remove {}", lock.display()))
    }

    /// Waits until the server accepts queries (a standby: once it is consistent).
    pub async fn wait_ready(
        &self,
        mut child_alive: impl FnMut() -> bool,
        timeout: Duration,
    ) -> Result<tokio_postgres::Client> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect().await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "PostgreSQL did not accept connections within {timeout:?}; see {}",
                        self.log_path().display()
                    )))
                }
                Err(_) if !child_alive() => {
                    bail!("PostgreSQL exited while starting; see {}", self.log_path().display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Whether a PostgreSQL server at `addr` answers at all within `timeout`: it
/// replies to an SSLRequest (any reply byte counts). A hung server (stopped,
/// or stuck on its storage) still accepts TCP connections into the kernel's
/// backlog, so a connect alone proves nothing; nothing answers this, though.
pub async fn answers(addr: SocketAddr, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        // Length 8, then the SSLRequest code 80877103.
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut reply = [0u8; 1];
        s.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(())
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(())))
}

/// Runs a PostgreSQL utility to completion; on failure the error carries its output.
fn run_logged(mut cmd: Command, what: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    // SAFETY: prctl is async-signal-safe. If the agent dies mid-way, the
    // utility must not run on against the data directory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("start {what}"))?;
    let pid = out.id();
    let output = {
        // wait_with_output blocks; a watchdog kills a utility that hangs (a dead source, say).
        let (tx, rx) = std::sync::mpsc::channel();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(timeout).is_err() {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        let r = out.wait_with_output();
        let _ = tx.send(());
        let _ = watchdog.join();
        r.with_context(|| format!("wait for {what}"))?
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!("{what} failed ({}) after {:.1}s: {}", output.status, started.elapsed().as_secs_f64(), stderr.trim());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let said = said.lines().last().unwrap_or("").trim();
    tracing::info!(
        "{what} done in {:.1}s{}",
        started.elapsed().as_secs_f64(),
        if said.is_empty() { String::new() } else { format!(": {said}") }
    );
    Ok(())
}

/// Whether the postmaster of `data_dir` is shutting down: line 8 of
/// `postmaster.pid` (PostgreSQL's `LOCK_FILE_LINE_PM_STATUS`) says `stopping`.
pub fn postmaster_stopping(data_dir: &Path) -> bool {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().nth(7).map(|l| l.trim() == "stopping"))
        .unwrap_or(false)
}

pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let cname = std::ffi::CString::new(name)?;
    // getpwnam is not thread-safe, but this runs once at startup before other threads read the passwd db.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        bail!("OS user {name:?} (postgres.os_user) does not exist; PostgreSQL refuses to run as root, so create it (apt-get install postgresql creates `postgres`)");
    }
    let pw = unsafe { &*pw };
    Ok((pw.pw_uid, pw.pw_gid))
}

fn user_name(uid: u32) -> Option<String> {
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) };
    Some(name.to_string_lossy().into_owned())
}
