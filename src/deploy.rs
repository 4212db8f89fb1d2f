//! Running meridian on real machines: the command line of each process (the
//! lab starts its processes with the same ones) and `meridian deploy
//! systemd`, which writes a unit file for an agent, a gateway or an etcd
//! member. Pure: a cluster file and a few paths in, text out. See docs/deploy.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;

/// What one unit runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    Agent {
        node: String,
    },
    Gateway {
        region: String,
    },
    /// `joining`: a member added to a running cluster (see `etcd_command`).
    Etcd {
        region: String,
        joining: bool,
    },
}

impl Unit {
    /// `meridian-agent-<node>.service`, ...
    pub fn file_name(&self) -> String {
        match self {
            Unit::Agent { node } => format!("meridian-agent-{node}.service"),
            Unit::Gateway { region } => format!("meridian-gateway-{region}.service"),
            Unit::Etcd { region, .. } => format!("meridian-etcd-{region}.service"),
        }
    }
}

/// A program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// `meridian agent --config FILE --node NODE`.
pub fn agent_command(meridian: &Path, config_file: &Path, node: &str) -> CommandLine {
    let args = ["agent", "--config", &config_file.display().to_string(), "--node", node].map(String::from).to_vec();
    CommandLine { program: meridian.to_path_buf(), args }
}

/// `meridian gateway --config FILE --region REGION`.
pub fn gateway_command(meridian: &Path, config_file: &Path, region: &str) -> CommandLine {
    let args =
        ["gateway", "--config", &config_file.display().to_string(), "--region", region].map(String::from).to_vec();
    CommandLine { program: meridian.to_path_buf(), args }
}

/// The etcd member of `region`: its client and peer URLs from the cluster
/// file, every member in `--initial-cluster`, TLS for clients and peers with
/// certificates from the cluster CA (`etcd-<region>` in `[tls] dir`),
/// pre-vote so a member back from a partition does not depose a healthy leader.
/// `joining`: the member joins a running cluster (a region added by `config
/// apply`, already a member as a learner): `--initial-cluster-state existing`.
/// Either way the flags only matter at the first start; etcd ignores them
/// once its data directory exists.
pub fn etcd_command(
    etcd: &Path,
    config: &Config,
    region: &str,
    data_dir: &Path,
    token: &str,
    joining: bool,
) -> Result<CommandLine> {
    let members: Vec<(&str, &str)> =
        config.regions.iter().filter_map(|r| r.etcd.as_deref().map(|u| (r.name.as_str(), u))).collect();
    let Some((_, url)) = members.iter().find(|(name, _)| *name == region) else {
        bail!("region {region:?} has no etcd member in the cluster file (region.etcd)");
    };
    let initial: Vec<String> = members.iter().map(|(name, url)| format!("{name}={}", peer_url(url))).collect();
    let tls = config.tls_identity(&format!("etcd-{region}"));
    let (cert, key, ca) =
        (tls.cert().display().to_string(), tls.key().display().to_string(), tls.ca().display().to_string());
    let args = [
        "--name",
        region,
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        &peer_url(url),
        "--initial-advertise-peer-urls",
        &peer_url(url),
        "--initial-cluster",
        &initial.join(","),
        "--initial-cluster-token",
        token,
        "--initial-cluster-state",
        if joining { "existing" } else { "new" },
        "--pre-vote",
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &ca,
        "--client-cert-auth",
        "--peer-cert-file",
        &cert,
        "--peer-key-file",
        &key,
        "--peer-trusted-ca-file",
        &ca,
        "--peer-client-cert-auth",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]
    .map(String::from)
    .to_vec();
    Ok(CommandLine { program: etcd.to_path_buf(), args })
}

/// etcd's peer URL: its client URL on the peer port.
pub fn peer_url(client_url: &str) -> String {
    use crate::lab::topology::{ETCD_CLIENT_PORT, ETCD_PEER_PORT};
    client_url.replace(&format!(":{ETCD_CLIENT_PORT}"), &format!(":{ETCD_PEER_PORT}"))
}

/// Where the programs and files are on the machine.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The meridian binary.
    pub meridian: PathBuf,
    /// The cluster file, as the unit passes it (absolute).
    pub config_file: PathBuf,
    /// etcd's binary and its data directory.
    pub etcd: PathBuf,
    pub etcd_data_dir: PathBuf,
    /// The users the gateway and etcd run as (agents run as `postgres.os_user`).
    pub gateway_user: String,
    pub etcd_user: String,
}

/// The unit file for `unit`.
pub fn unit_file(config: &Config, unit: &Unit, paths: &Paths) -> Result<String> {
    anyhow::ensure!(paths.config_file.is_absolute(), "the cluster file's path must be absolute in a unit");
    let (description, command, user, writable, low_ports) = match unit {
        Unit::Agent { node } => {
            let (_, n) = config.node(node)?;
            let mut writable = vec![config.resolve(&n.data_dir), config.resolve(&n.run_dir())];
            // Directory repositories: the node's server archives into them.
            for r in config.backup.iter().flat_map(|b| &b.repositories) {
                if let Ok(crate::config::RepoLocation::Posix { path }) = r.location() {
                    writable.push(path);
                }
            }
            (
                format!("meridian agent of node {node} (cluster {})", config.cluster),
                agent_command(&paths.meridian, &paths.config_file, node),
                config.postgres.os_user.clone(),
                writable,
                Vec::new(),
            )
        }
        Unit::Gateway { region } => {
            let g = config.region(region)?.gateway;
            let low: Vec<u16> =
                [g.api, g.dns, g.writer, g.reader].iter().map(|a| a.port()).filter(|p| *p < 1024).collect();
            (
                format!("meridian gateway of region {region} (cluster {})", config.cluster),
                gateway_command(&paths.meridian, &paths.config_file, region),
                paths.gateway_user.clone(),
                Vec::new(),
                low,
            )
        }
        Unit::Etcd { region, joining } => (
            format!("etcd member of region {region} for meridian (cluster {})", config.cluster),
            etcd_command(
                &paths.etcd,
                config,
                region,
                &paths.etcd_data_dir,
                &format!("meridian-{}", config.cluster),
                *joining,
            )?,
            paths.etcd_user.clone(),
            vec![paths.etcd_data_dir.clone()],
            Vec::new(),
        ),
    };
    let mut s = String::new();
    let _ = writeln!(s, "# Written by `meridian deploy systemd`; see docs/deploy.md.");
    let _ = writeln!(s, "[Unit]\nDescription={}", escape(&description));
    let _ = writeln!(s, "Wants=network-online.target\nAfter=network-online.target");
    // Restart for ever (below): a node that keeps failing shows in `meridian status`.
    let _ = writeln!(s, "StartLimitIntervalSec=0");
    let _ = writeln!(s, "\n[Service]");
    let etcd = matches!(unit, Unit::Etcd { .. });
    // etcd tells systemd when it serves; meridian's processes serve once exec'd.
    let _ = writeln!(s, "Type={}", if etcd { "notify" } else { "exec" });
    let _ = writeln!(s, "User={user}\nGroup={user}");
    let line: Vec<String> = std::iter::once(command.program.display().to_string())
        .chain(command.args.iter().cloned())
        .map(|a| quote(&a))
        .collect();
    let _ = writeln!(s, "ExecStart={}", line.join(" "));
    // Restart after a crash, not after a clean stop, a few seconds apart.
    let _ = writeln!(s, "Restart=on-failure\nRestartSec=2s");
    if matches!(unit, Unit::Agent { .. }) {
        // The agent stops PostgreSQL cleanly on SIGTERM (a shutdown checkpoint
        // can take a while); what is left after that is killed.
        let _ = writeln!(s, "KillMode=mixed\nTimeoutStopSec=120");
    } else {
        let _ = writeln!(s, "TimeoutStopSec=30");
    }
    let _ = writeln!(s, "LimitNOFILE=65536");
    let _ = writeln!(s, "# Hardening: nothing but its own directories writable, no privileges to gain.");
    let _ = writeln!(s, "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes");
    let _ = writeln!(
        s,
        "ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectKernelLogs=yes\nProtectControlGroups=yes"
    );
    let _ = writeln!(
        s,
        "ProtectClock=yes\nProtectHostname=yes\nRestrictSUIDSGID=yes\nRestrictRealtime=yes\nLockPersonality=yes"
    );
    let _ = writeln!(s, "RestrictNamespaces=yes\nSystemCallArchitectures=native");
    let _ = writeln!(s, "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6");
    let _ = writeln!(s, "PrivateDevices=yes");
    if low_ports.is_empty() {
        let _ = writeln!(s, "CapabilityBoundingSet=");
    } else {
        let ports: Vec<String> = low_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(s, "# Ports below 1024 ({}): only the right to bind them.", ports.join(", "));
        let _ = writeln!(s, "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE");
    }
    if !writable.is_empty() {
        // "-": the directories may not exist yet on the first start (initdb makes the data directory).
        let dirs: Vec<String> = writable.iter().map(|d| format!("-{}", quote(&d.display().to_string()))).collect();
        let _ = writeln!(s, "ReadWritePaths={}", dirs.join(" "));
    }
    let _ = writeln!(s, "\n[Install]\nWantedBy=multi-user.target");
    Ok(s)
}

/// One word of ExecStart: quoted when it has spaces or quotes; `%` doubled (systemd's specifiers).
fn quote(word: &str) -> String {
    let word = word.replace('%', "%%");
    if word.is_empty() || word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == ';') {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        word
    }
}

/// A free-text value: `%` doubled.
fn escape(text: &str) -> String {
    text.replace('%', "%%")
}

/// Writes the unit into `dir`, or returns its text for standard output.
pub fn write_unit(dir: &Path, unit: &Unit, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(unit.file_name());
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::{lab_config, LabShape};

    fn paths() -> Paths {
        Paths {
            meridian: "/usr/local/bin/meridian".into(),
            config_file: "/etc/meridian/meridian.toml".into(),
            etcd: "/usr/bin/etcd".into(),
            etcd_data_dir: "/var/lib/etcd/meridian".into(),
            gateway_user: "meridian".into(),
            etcd_user: "etcd".into(),
        }
    }

    #[test]
    fn each_unit_runs_its_process_as_its_own_user_with_hardening() {
        let c = lab_config(&LabShape::default(), Path::new("/var/lib/meridian"));
        let agent = unit_file(&c, &Unit::Agent { node: "ap-south-1a".into() }, &paths()).unwrap();
        for want in [
            "ExecStart=/usr/local/bin/meridian agent --config /etc/meridian/meridian.toml --node ap-south-1a\n",
            "User=postgres\n",
            "Restart=on-failure\n",
            "KillMode=mixed\n",
            "NoNewPrivileges=yes\n",
            "ProtectSystem=strict\n",
            "ReadWritePaths=-/var/lib/meridian/nodes/ap-south-1a/data -/var/lib/meridian/nodes/ap-south-1a/run -/var/lib/meridian/backup/ap-northeast-1\n",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(agent.contains(want), "agent: missing {want:?} in\n{agent}");
        }
        let gateway = unit_file(&c, &Unit::Gateway { region: "witness".into() }, &paths()).unwrap();
        assert!(gateway.contains("--region witness\n") && gateway.contains("User=meridian\n"), "{gateway}");
        assert!(!gateway.contains("ReadWritePaths"), "a gateway writes nothing: {gateway}");
        let etcd = unit_file(&c, &Unit::Etcd { region: "witness".into(), joining: false }, &paths()).unwrap();
        for want in [
            "Type=notify\n",
            "User=etcd\n",
            "--initial-cluster ap-south-1=https://127.0.1.1:2380,ap-northeast-1=https://127.0.2.1:2380,witness=https://127.0.3.1:2380",
            "--peer-client-cert-auth",
            "--pre-vote",
            "ReadWritePaths=-/var/lib/etcd/meridian\n",
        ] {
            assert!(etcd.contains(want), "etcd: missing {want:?} in\n{etcd}");
        }
    }

    #[test]
    fn a_gateway_on_port_53_may_bind_it_and_nothing_more() {
        let mut c = lab_config(&LabShape::default(), Path::new("/var/lib/meridian"));
        c.regions[0].gateway.dns.set_port(53);
        let gateway = unit_file(&c, &Unit::Gateway { region: "ap-south-1".into() }, &paths()).unwrap();
        assert!(
            gateway.contains("CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n")
        );
    }

    #[test]
    fn unknown_names_and_odd_paths_are_handled() {
        let c = lab_config(&LabShape::default(), Path::new("/var/lib/meridian"));
        assert!(unit_file(&c, &Unit::Agent { node: "nope".into() }, &paths()).is_err());
        assert!(unit_file(&c, &Unit::Etcd { region: "nope".into(), joining: false }, &paths())
            .unwrap_err()
            .to_string()
            .contains("no etcd member"));
        let mut p = paths();
        p.config_file = "relative.toml".into();
        assert!(unit_file(&c, &Unit::Gateway { region: "witness".into() }, &p).is_err());
        assert_eq!(quote("/srv/my data/100%"), "\"/srv/my data/100%%\"");
        assert_eq!(quote("plain"), "plain");
    }
}
