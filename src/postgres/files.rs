//! The files meridian writes for a server before every start, and the SQL that
//! creates its roles. Rendering is pure (tested below); `write` puts them on disk.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};

use super::{Server, SUPERUSER};
use crate::config::{Config, Secrets};

/// How a server should start: read-write, or as a standby of `upstream` (None:
/// in recovery with nowhere to stream from yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAs {
    Primary,
    Standby { upstream: Option<(String, SocketAddr)> },
}

/// The node's TLS files in its run directory (`<run_dir>/tls/`), copied from
/// `[tls] dir` and owned by the server's user, who must own its key.
pub const TLS_DIR: &str = "tls";
pub const TLS_CERT: &str = "node.crt";
pub const TLS_KEY: &str = "node.key";
pub const TLS_CA: &str = "ca.crt";

/// A libpq connection string for the replication role; the password is in the
/// passfile. TLS is required and verified: the upstream's certificate must come
/// from the cluster CA and name the address connected to (`verify-full`), and
/// this node presents its own certificate, which the upstream's pg_hba asks for.
pub fn conninfo(host: SocketAddr, user: &str, passfile: &Path, run_dir: &Path, application_name: &str) -> String {
    let tls = run_dir.join(TLS_DIR);
    format!(
        "host={} port={} user={user} passfile={} application_name={application_name} connect_timeout=2 keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=2 sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        host.ip(),
        host.port(),
        passfile.display(),
        tls.join(TLS_CA).display(),
        tls.join(TLS_CERT).display(),
        tls.join(TLS_KEY).display(),
    )
}

/// The physical replication slot the primary keeps for a node.
pub fn slot_name(node: &str) -> String {
    format!("meridian_{}", node.replace('-', "_"))
}

/// Addresses meridian's own roles connect from: every node and gateway, and
/// 127.0.0.1 when any is on loopback (loopback clients come from 127.0.0.1
/// whatever address they target).
pub fn cluster_networks(config: &Config) -> Vec<String> {
    let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
    for r in &config.regions {
        ips.insert(r.gateway.api.ip());
        for n in &r.nodes {
            ips.insert(n.address.ip());
        }
    }
    if ips.iter().any(|ip| ip.is_loopback()) {
        ips.insert(IpAddr::from([127, 0, 0, 1]));
    }
    ips.into_iter().map(|ip| if ip.is_ipv4() { format!("{ip}/32") } else { format!("{ip}/128") }).collect()
}

/// pg_hba.conf: the superuser only over the socket by peer; meridian's roles
/// over TLS with a cluster certificate, from cluster addresses; application
/// roles over TLS from `client_networks` and from the gateways (their SQL
/// proxies); all with SCRAM. First match wins.
pub fn render_hba(config: &Config) -> String {
    let p = &config.postgres;
    let mut s = String::from("# Written by meridian before every start; edit meridian.toml instead.\n");
    let _ = writeln!(s, "local   all          {SUPERUSER:<12} peer map=meridian");
    for any in ["0.0.0.0/0", "::/0"] {
        let _ = writeln!(s, "host    all          {SUPERUSER:<12} {any:<16} reject");
        // meridian's own roles and every replication connection: never without TLS.
        let _ = writeln!(s, "hostnossl replication all        {any:<16} reject");
        let _ = writeln!(s, "hostnossl all        {:<12} {any:<16} reject", p.replication_user);
        let _ = writeln!(s, "hostnossl all        {:<12} {any:<16} reject", p.monitor_user);
        let _ = writeln!(s, "hostnossl all        {:<12} {any:<16} reject", p.auth_user);
    }
    for net in cluster_networks(config) {
        // Replication and pg_rewind: TLS only, with a certificate from the cluster CA, and SCRAM.
        let _ =
            writeln!(s, "hostssl replication  {:<12} {net:<16} scram-sha-256 clientcert=verify-ca", p.replication_user);
        // pg_rewind reads files through SQL functions over a normal connection.
        let _ =
            writeln!(s, "hostssl postgres     {:<12} {net:<16} scram-sha-256 clientcert=verify-ca", p.replication_user);
        // Gateways (status, health probes, verify): TLS with a gateway's certificate, and SCRAM.
        let _ = writeln!(s, "hostssl postgres     {:<12} {net:<16} scram-sha-256 clientcert=verify-ca", p.monitor_user);
    }
    for net in gateway_networks(config) {
        // The SQL proxies look up a client's SCRAM verifier: TLS with a gateway's certificate.
        let _ = writeln!(s, "hostssl postgres     {:<12} {net:<16} scram-sha-256 clientcert=verify-ca", p.auth_user);
        // ...and then log in as the client, over TLS, with SCRAM bound to this server's certificate.
        let _ = writeln!(s, "hostssl all          all          {net:<16} scram-sha-256");
    }
    // Applications connecting directly: TLS only.
    for net in &p.client_networks {
        let _ = writeln!(s, "hostssl all          all          {net:<16} scram-sha-256");
    }
    s
}

/// The gateways' addresses (their SQL proxies connect from there), and
/// 127.0.0.1 when one is on loopback.
fn gateway_networks(config: &Config) -> Vec<String> {
    let mut ips: BTreeSet<IpAddr> = config.regions.iter().map(|r| r.gateway.writer.ip()).collect();
    ips.extend(config.regions.iter().map(|r| r.gateway.reader.ip()));
    if ips.iter().any(|ip| ip.is_loopback()) {
        ips.insert(IpAddr::from([127, 0, 0, 1]));
    }
    ips.into_iter().map(|ip| if ip.is_ipv4() { format!("{ip}/32") } else { format!("{ip}/128") }).collect()
}

/// pg_ident.conf: the agent's OS user (and the server's) may be `postgres` over the socket.
pub fn render_ident(server: &Server, os_user: &str) -> String {
    let mut users: BTreeSet<&str> = BTreeSet::new();
    users.insert(&server.agent_os_user);
    users.insert(os_user);
    let mut s = String::from("# Written by meridian before every start.\n");
    for u in users {
        let _ = writeln!(s, "meridian  {u:<12} {SUPERUSER}");
    }
    s
}

/// Marks the lines of meridian's defaults and `postgres.settings` in
/// postgresql.auto.conf, so a published cluster file can replace them
/// (`set_settings`) without touching the lines meridian keeps for itself.
const SETTINGS_MARK: &str = "# meridian: settings";

/// meridian's defaults the user did not override, then `postgres.settings`, each line marked.
fn settings_lines(config: &Config) -> Vec<String> {
    let defaults = [
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_keep_size", "'256MB'"),
        // A replica down for long must not fill the primary's disk through its slot.
        ("max_slot_wal_keep_size", "'2GB'"),
        ("hot_standby_feedback", "on"),
        ("wal_receiver_status_interval", "'1s'"),
        ("wal_log_hints", "on"),
        ("password_encryption", "'scram-sha-256'"),
        ("recovery_target_timeline", "'latest'"),
        // Which process said it (walreceiver, startup, client backend, ...): a
        // FATAL line alone does not tell a standby's walreceiver from a client.
        ("log_line_prefix", "'%m [%p] %b '"),
    ];
    let mut lines = Vec::new();
    for (k, v) in defaults {
        if !config.postgres.settings.contains_key(k) {
            lines.push(format!("{k} = {v}  {SETTINGS_MARK}"));
        }
    }
    for (k, v) in &config.postgres.settings {
        let v = match v {
            toml::Value::String(t) => quote(t),
            toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        };
        lines.push(format!("{k} = {v}  {SETTINGS_MARK}"));
    }
    lines
}

/// postgresql.auto.conf: cluster-wide settings, then the user's, then where to stream from.
/// `meridian` is the program PostgreSQL's archive command runs on a standby.
pub fn render_auto_conf(config: &Config, server: &Server, start: &StartAs, meridian: &Path) -> String {
    let mut s = String::from("# Written by meridian before every start; edit meridian.toml instead.\n");
    for line in settings_lines(config) {
        let _ = writeln!(s, "{line}");
    }
    if let Some(backup) = &config.backup {
        for (k, v) in crate::backup::pgbackrest::archive_settings(config, backup, &server.run_dir, meridian) {
            let _ = writeln!(s, "{k} = {}", quote(&v));
        }
    }
    if let StartAs::Standby { upstream: Some((_, addr)) } = start {
        let info =
            conninfo(*addr, &config.postgres.replication_user, &server.passfile(), &server.run_dir, &server.node);
        let _ = writeln!(s, "primary_conninfo = {}", quote(&info));
        let _ = writeln!(s, "primary_slot_name = {}", quote(&slot_name(&server.node)));
    }
    s
}

/// A single-quoted PostgreSQL configuration string.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// One line of a libpq passfile, with `:` and `\` escaped.
pub fn pgpass_line(user: &str, password: &str) -> String {
    let esc = |t: &str| t.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", esc(user), esc(password))
}

impl Server {
    /// Writes every file the server needs before a start, owned by its OS user.
    pub fn write_files(&self, config: &Config, secrets: &Secrets, start: &StartAs) -> Result<()> {
        self.copy_tls()?;
        self.write_private(&self.run_dir.join("pg_hba.conf"), &render_hba(config))?;
        self.write_private(&self.run_dir.join("pg_ident.conf"), &render_ident(self, &config.postgres.os_user))?;
        self.write_private(
            &self.passfile(),
            &pgpass_line(&config.postgres.replication_user, &secrets.replication_password),
        )?;
        if let Some(backup) = &config.backup {
            self.write_pgbackrest(config, backup, secrets)?;
        }
        if self.is_initialized() {
            let meridian = std::env::current_exe().context("find the meridian program (for the archive command)")?;
            let conf = render_auto_conf(config, self, start, &meridian);
            self.write_private(&self.data_dir.join("postgresql.auto.conf"), &conf)?;
            let signal = self.data_dir.join("standby.signal");
            match start {
                StartAs::Primary => match std::fs::remove_file(&signal) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("remove {}", signal.display()))
                    }
                    _ => {}
                },
                StartAs::Standby { .. } => self.write_private(&signal, "")?,
            }
        }
        Ok(())
    }

    /// Writes pg_hba.conf for `config` (a newly published cluster file: nodes
    /// come and go). The caller reloads.
    pub fn write_hba(&self, config: &Config) -> Result<()> {
        self.write_private(&self.run_dir.join("pg_hba.conf"), &render_hba(config))
    }

    /// Sets `synchronous_standby_names` in postgresql.auto.conf (removes it
    /// for `None`); returns whether the file changed. The caller reloads.
    pub fn set_synchronous_standby_names(&self, names: Option<&str>) -> Result<bool> {
        let line = names.map(|n| format!("synchronous_standby_names = {}", quote(n)));
        self.set_auto_conf_line(|l| l.starts_with("synchronous_standby_names"), line)
    }

    /// The `synchronous_standby_names` value postgresql.auto.conf holds (what
    /// the server runs with once reloaded), unquoted; None when unset.
    pub fn synchronous_standby_names(&self) -> Result<Option<String>> {
        let path = self.data_dir.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Ok(text.lines().rev().find_map(|l| {
            let value = l.strip_prefix("synchronous_standby_names")?.trim_start().strip_prefix('=')?.trim();
            Some(value.trim_matches('\'').replace("''", "'"))
        }))
    }

    /// Replaces the lines of postgresql.auto.conf that `ours` picks with
    /// `line` (appended), unless they already are just that line, wherever it
    /// stands (so two such settings do not reorder each other every pass).
    fn set_auto_conf_line(&self, ours: impl Fn(&str) -> bool, line: Option<String>) -> Result<bool> {
        let path = self.data_dir.join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let present: Vec<&str> = old.lines().filter(|l| ours(l)).collect();
        if present == line.as_deref().into_iter().collect::<Vec<&str>>() {
            return Ok(false);
        }
        let mut new: String = old.lines().filter(|l| !ours(l)).map(|l| format!("{l}\n")).collect();
        if let Some(line) = line {
            let _ = writeln!(new, "{line}");
        }
        self.write_private(&path, &new)?;
        Ok(true)
    }

    /// Replaces meridian's defaults and `postgres.settings` in
    /// postgresql.auto.conf with `config`'s (a newly published cluster file),
    /// leaving every other line. Returns whether the file changed. The caller reloads.
    pub fn set_settings(&self, config: &Config) -> Result<bool> {
        let path = self.data_dir.join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let mut new: String = old.lines().filter(|l| !l.ends_with(SETTINGS_MARK)).map(|l| format!("{l}\n")).collect();
        for line in settings_lines(config) {
            let _ = writeln!(new, "{line}");
        }
        if new == old {
            return Ok(false);
        }
        self.write_private(&path, &new)?;
        Ok(true)
    }

    /// While the commit-lag guard holds commits by replay, they wait for a
    /// remote standby to replay them (`synchronous_commit = remote_apply`);
    /// `None` removes meridian's line (the user's setting, or `on`, applies
    /// again). Returns whether the file changed. The caller reloads.
    pub fn set_guard_commit_level(&self, level: Option<&str>) -> Result<bool> {
        const MARK: &str = "# meridian: max_commit_lag";
        let line = level.map(|level| format!("synchronous_commit = {}  {MARK}", quote(level)));
        self.set_auto_conf_line(|l| l.ends_with(MARK), line)
    }

    /// pgBackRest's configuration (0600: it holds the repositories' keys) and
    /// its spool, lock and log directories, owned by the server's user.
    fn write_pgbackrest(&self, config: &Config, backup: &crate::config::BackupConfig, secrets: &Secrets) -> Result<()> {
        use crate::backup::pgbackrest as pgbr;
        let node = pgbr::NodeFiles {
            data_dir: &self.data_dir,
            run_dir: &self.run_dir,
            port: self.address.port(),
            cluster_ca: self.tls_file(TLS_CA),
        };
        let text = pgbr::render_conf(config, backup, secrets, &node)?;
        let dir = self.run_dir.join(pgbr::DIR);
        for d in [dir.clone(), dir.join("spool"), dir.join("lock"), dir.join("log"), pgbr::include_path(&self.run_dir)]
        {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            self.chown(&d)?;
        }
        self.write_private(&pgbr::conf_path(&self.run_dir), &text)
    }

    pub fn tls_file(&self, name: &str) -> std::path::PathBuf {
        self.run_dir.join(TLS_DIR).join(name)
    }

    /// Copies the node's certificate, key and CA from `[tls] dir` into the run
    /// directory, owned by the server's user (PostgreSQL refuses a key it does
    /// not own, and libpq one others can read). Called before every start and
    /// base backup; after a renewal, a copy and a reload are enough.
    pub fn copy_tls(&self) -> Result<()> {
        let dir = self.run_dir.join(TLS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", dir.display()))?;
        }
        self.chown(&dir)?;
        for (from, to) in [(self.tls.cert(), TLS_CERT), (self.tls.key(), TLS_KEY), (self.tls.ca(), TLS_CA)] {
            let text = std::fs::read_to_string(&from).with_context(|| {
                format!("read {} (the node's certificate: `meridian ca issue --node {}`)", from.display(), self.node)
            })?;
            self.write_private(&dir.join(to), &text)?;
        }
        Ok(())
    }

    fn write_private(&self, path: &Path, text: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("meridian-tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("write {}", tmp.display()))?;
        self.chown(&tmp)?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename {} into place", path.display()))?;
        Ok(())
    }
}

/// SQL that creates meridian's roles on a new cluster, and the one function
/// the SQL proxies' role may run: a login role's SCRAM verifier, only for an
/// application role that may log in now (not a superuser, a replication role
/// or one of meridian's, not past `VALID UNTIL`), with a fixed search_path
/// (the traps PgBouncer's auth_query has had advisories about). Passwords go in as SCRAM
/// verifiers computed here, so no plaintext password reaches the server's logs.
/// The replication role also gets the four file functions pg_rewind needs; it
/// can already read every byte of the cluster through a base backup, so this
/// adds no access to data, and spares a superuser login over the network.
pub fn roles_sql(config: &Config, secrets: &Secrets) -> String {
    let p = &config.postgres;
    let repl = postgres_protocol::password::scram_sha_256(secrets.replication_password.as_bytes());
    let mon = postgres_protocol::password::scram_sha_256(secrets.monitor_password.as_bytes());
    let auth = postgres_protocol::password::scram_sha_256(secrets.auth_password.as_bytes());
    let own_roles = [&p.replication_user, &p.monitor_user, &p.auth_user].map(|r| quote(r)).join(", ");
    format!(
        "CREATE ROLE {repl_user} WITH LOGIN REPLICATION PASSWORD '{repl}';
CREATE ROLE {mon_user} WITH LOGIN PASSWORD '{mon}';
GRANT pg_monitor TO {mon_user};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {repl_user};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {repl_user};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {repl_user};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {repl_user};
CREATE SCHEMA meridian AUTHORIZATION {mon_user};
CREATE TABLE meridian.verify (id bigint PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT now(), written_by text NOT NULL);
ALTER TABLE meridian.verify OWNER TO {mon_user};
REVOKE ALL ON SCHEMA public FROM PUBLIC;
CREATE ROLE {auth_user} WITH LOGIN PASSWORD '{auth}';
CREATE SCHEMA meridian_auth;
REVOKE ALL ON SCHEMA meridian_auth FROM PUBLIC;
CREATE FUNCTION meridian_auth.scram_verifier(username text) RETURNS text
    LANGUAGE sql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT rolpassword FROM pg_catalog.pg_authid
     WHERE rolname = username
       AND rolcanlogin AND NOT rolsuper AND NOT rolreplication
       AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())
       AND rolname <> ALL (ARRAY[{own_roles}]::name[])
       AND rolpassword LIKE 'SCRAM-SHA-256$%'
$$;
REVOKE ALL ON FUNCTION meridian_auth.scram_verifier(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA meridian_auth TO {auth_user};
GRANT EXECUTE ON FUNCTION meridian_auth.scram_verifier(text) TO {auth_user};",
        repl_user = ident(&p.replication_user),
        mon_user = ident(&p.monitor_user),
        auth_user = ident(&p.auth_user),
    )
}

/// Gives meridian's roles in restored data (`meridian restore`, which copies
/// the source cluster's roles) this cluster's passwords.
pub fn role_passwords_sql(config: &Config, secrets: &Secrets) -> String {
    let p = &config.postgres;
    [
        (&p.replication_user, &secrets.replication_password),
        (&p.monitor_user, &secrets.monitor_password),
        (&p.auth_user, &secrets.auth_password),
    ]
    .iter()
    .map(|(role, password)| {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        format!("ALTER ROLE {} WITH PASSWORD '{verifier}';\n", ident(role))
    })
    .collect()
}

/// A double-quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::{lab_config, LabShape};

    fn server(config: &Config) -> Server {
        let (_, node) = config.node("ap-northeast-1a").unwrap();
        Server {
            node: node.name.clone(),
            bin_dir: "/usr/lib/postgresql/15/bin".into(),
            data_dir: node.data_dir.clone(),
            run_dir: node.run_dir(),
            address: node.address,
            os_ids: None,
            agent_os_user: "root".into(),
            tls: config.tls_identity(&format!("node-{}", node.name)),
        }
    }

    #[test]
    fn hba_never_trusts_and_keeps_the_superuser_local() {
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        let hba = render_hba(&c);
        assert!(!hba.contains("trust"), "{hba}");
        assert!(hba.contains("local   all          postgres     peer map=meridian"));
        assert!(hba.contains("host    all          postgres     0.0.0.0/0        reject"));
        let repl = "hostssl replication  replicator   127.0.1.11/32    scram-sha-256 clientcert=verify-ca";
        assert!(hba.contains(repl), "replication: TLS, a cluster certificate and SCRAM\n{hba}");
        assert!(hba.contains("hostssl replication  replicator   127.0.0.1/32     scram-sha-256 clientcert=verify-ca"));
        // Every replication line requires TLS, or rejects what comes without it.
        assert!(
            !hba.lines().any(|l| l.contains("replication")
                && !l.starts_with("hostssl")
                && !(l.starts_with("hostnossl") && l.ends_with("reject"))),
            "{hba}"
        );
        let reject = hba.find("reject").unwrap();
        let app = hba.find("hostssl all          all").unwrap();
        assert!(reject < app, "the superuser reject comes before the application rule");
        // No line lets anyone in without TLS but the superuser's local socket.
        assert!(!hba.lines().any(|l| l.starts_with("host ") && !l.ends_with("reject")), "{hba}");
        for line in hba.lines().filter(|l| l.starts_with("host")) {
            let method = line.split_whitespace().nth(4).unwrap();
            assert!(method == "scram-sha-256" || method == "reject", "{line}");
        }
    }

    #[test]
    fn applications_need_tls_from_their_networks_and_from_the_gateways_proxies() {
        let mut c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        for (i, r) in c.regions.iter_mut().enumerate() {
            let gw: IpAddr = format!("10.{i}.0.2").parse().unwrap();
            for a in [&mut r.gateway.api, &mut r.gateway.dns, &mut r.gateway.writer, &mut r.gateway.reader] {
                a.set_ip(gw);
            }
            for (k, n) in r.nodes.iter_mut().enumerate() {
                let ip: IpAddr = format!("10.{i}.0.{}", 11 + k).parse().unwrap();
                n.address.set_ip(ip);
                n.api.set_ip(ip);
            }
        }
        c.postgres.client_networks = vec!["10.9.0.0/16".into()];
        let hba = render_hba(&c);
        assert!(hba.contains("hostssl all          all          10.9.0.0/16      scram-sha-256"), "{hba}");
        assert!(hba.contains("hostssl all          all          10.0.0.2/32      scram-sha-256"), "{hba}");
        let lookup = "hostssl postgres     meridian_auth 10.0.0.2/32      scram-sha-256 clientcert=verify-ca";
        assert!(hba.contains(lookup), "the proxies' lookup role: a gateway certificate\n{hba}");
        assert!(
            !hba.lines().any(|l| l.contains("meridian_auth") && l.contains("10.0.0.11")),
            "only from gateways: {hba}"
        );
        assert!(!hba.contains("127.0.0.1"), "{hba}");
        // meridian's roles never reach the proxies' rule without TLS: their hostnossl rejects come first.
        let reject = hba.find("hostnossl all        meridian_auth").unwrap();
        assert!(reject < hba.find("hostssl all          all          10.0.0.2/32").unwrap(), "{hba}");
        assert!(hba.find("hostnossl replication all").unwrap() < hba.find("hostssl replication").unwrap());
    }

    #[test]
    fn standby_conf_streams_from_upstream_with_a_passfile_and_no_password() {
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        let s = server(&c);
        let up = ("ap-south-1a".to_string(), "127.0.1.11:5432".parse().unwrap());
        let conf = render_auto_conf(&c, &s, &StartAs::Standby { upstream: Some(up) }, Path::new("/bin/meridian"));
        assert!(conf.contains("primary_conninfo = 'host=127.0.1.11 port=5432 user=replicator passfile=/tmp/lab/nodes/ap-northeast-1a/run/pgpass application_name=ap-northeast-1a"), "{conf}");
        assert!(conf.contains("primary_slot_name = 'meridian_ap_northeast_1a'"));
        assert!(conf.contains("shared_buffers = '32MB'"));
        assert!(conf.contains("max_connections = 50"));
        assert!(!conf.contains("password="));
        let tls = "sslmode=verify-full sslrootcert=/tmp/lab/nodes/ap-northeast-1a/run/tls/ca.crt sslcert=/tmp/lab/nodes/ap-northeast-1a/run/tls/node.crt sslkey=/tmp/lab/nodes/ap-northeast-1a/run/tls/node.key";
        assert!(conf.contains(tls), "replication verifies the upstream and presents the node's certificate: {conf}");
        let primary = render_auto_conf(&c, &s, &StartAs::Primary, Path::new("/bin/meridian"));
        assert!(!primary.contains("primary_conninfo"));
    }

    #[test]
    fn passwords_are_escaped_and_roles_get_verifiers_not_plaintext() {
        assert_eq!(pgpass_line("rep", "a:b\\c"), "*:*:*:rep:a\\:b\\\\c\n");
        let c = lab_config(&LabShape::default(), Path::new("/tmp/lab"));
        let secrets = Secrets {
            replication_password: "hunter2-repl".into(),
            monitor_password: "hunter2-mon".into(),
            auth_password: "hunter2-auth".into(),
            backup_cipher_pass: None,
            repositories: Default::default(),
        };
        let sql = roles_sql(&c, &secrets);
        assert!(!sql.contains("hunter2"), "{sql}");
        assert!(sql.contains("PASSWORD 'SCRAM-SHA-256$4096:"));
        assert!(sql.contains("WITH LOGIN REPLICATION"));
        assert!(!sql.contains("SUPERUSER"));
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(slot_name("ap-south-1a"), "meridian_ap_south_1a");
    }
}
