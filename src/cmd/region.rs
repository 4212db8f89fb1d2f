//! `meridian region add NAME --from FILE` and `meridian region remove NAME`:
//! the running cluster file with one region more or less, written next to
//! the local cluster file as `meridian.next.toml` and applied as `config
//! apply` does (etcd's member joins as a learner and is promoted once caught
//! up, or is removed; the region's nodes join or leave; in a lab its
//! processes start or stop).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::client::ApiClient;
use crate::config::Config;
use crate::coord::PublishedConfig;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Add region NAME as FILE describes it: one `[[region]]` table (its
    /// etcd member, gateway and nodes) and, optionally, `[[health.check]]`
    /// tables for its nodes. Its etcd member is added to `etcd.endpoints`.
    Add {
        name: String,
        #[arg(long = "from")]
        from: PathBuf,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Remove region NAME: its nodes leave (keeping their data unless
    /// --purge), its etcd member is removed, its gateway is no longer routed
    /// to. Refused while it holds the primary (switch over first).
    Remove {
        name: String,
        #[arg(long)]
        purge: bool,
        /// If it holds the primary, switch over to another region's node first.
        #[arg(long)]
        switchover: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config_path: &Path, args: Args) -> Result<i32> {
    let config = super::load_config(config_path)?;
    let running = running(&config).await?;
    let (next, purge, switchover, wait, json) = match args.command {
        Sub::Add { name, from, no_wait, timeout, json } => {
            let fragment = std::fs::read_to_string(&from).with_context(|| format!("read {}", from.display()))?;
            let text = with_region(&running, &name, &fragment).with_context(|| format!("{}", from.display()))?;
            (write_next(config_path, &text)?, false, false, (!no_wait).then_some(timeout), json)
        }
        Sub::Remove { name, purge, switchover, no_wait, timeout, json } => {
            let mut c = Config::parse(&running).config.context("the running cluster file does not parse")?;
            crate::lab::membership::remove_region(&mut c, &name)?;
            let text = toml::to_string(&c).context("render the cluster file")?;
            (write_next(config_path, &text)?, purge, switchover, (!no_wait).then_some(timeout), json)
        }
    };
    if !json {
        eprintln!("wrote {}; applying it (install it on every machine afterwards)", next.display());
    }
    super::config::apply(config_path, &next, purge, wait, switchover, json).await
}

/// The running cluster file's text (`config show`).
async fn running(config: &Config) -> Result<String> {
    let shown: PublishedConfig = ApiClient::new(config)?.get("/v1/config", Duration::from_secs(20)).await?;
    Ok(shown.text)
}

/// `running` with the region of `fragment` added (and its etcd member to
/// `etcd.endpoints`, its health checks to `[health]`).
pub fn with_region(running: &str, name: &str, fragment: &str) -> Result<String> {
    let mut file: toml::Table = toml::from_str(running).context("parse the running cluster file")?;
    let mut part: toml::Table = toml::from_str(fragment).context("parse the region's file")?;
    let regions = match part.remove("region") {
        Some(toml::Value::Array(r)) => r,
        _ => bail!("the region's file needs one [[region]] table"),
    };
    let [region] = regions.as_slice() else {
        bail!("the region's file has {} [[region]] tables; one, please", regions.len())
    };
    let given = region.get("name").and_then(|n| n.as_str()).unwrap_or_default();
    if given != name {
        bail!("its [[region]] is named {given:?}, not {name:?}");
    }
    let checks = part.remove("health").and_then(|h| h.get("check").cloned());
    if let Some(other) = part.keys().next() {
        bail!("unexpected [{other}]: the region's file holds [[region]] and [[health.check]] only");
    }
    let list = file.entry("region").or_insert_with(|| toml::Value::Array(Vec::new()));
    let list = list.as_array_mut().context("region is not a list in the running file")?;
    if list.iter().any(|r| r.get("name").and_then(|n| n.as_str()) == Some(name)) {
        bail!("the cluster already has a region {name:?}");
    }
    list.push(region.clone());
    if let Some(url) = region.get("etcd").and_then(|e| e.as_str()) {
        let etcd = file.entry("etcd").or_insert_with(|| toml::Value::Table(Default::default()));
        let endpoints = etcd
            .as_table_mut()
            .context("etcd is not a table")?
            .entry("endpoints")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let endpoints = endpoints.as_array_mut().context("etcd.endpoints is not a list")?;
        if !endpoints.iter().any(|e| e.as_str() == Some(url)) {
            endpoints.push(url.into());
        }
    }
    if let Some(toml::Value::Array(checks)) = checks {
        let health = file.entry("health").or_insert_with(|| toml::Value::Table(Default::default()));
        let list = health
            .as_table_mut()
            .context("health is not a table")?
            .entry("check")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        list.as_array_mut().context("health.check is not a list")?.extend(checks);
    }
    toml::to_string(&file).context("render the cluster file")
}

/// Writes the new file next to the local cluster file (0600: it names the secrets file).
fn write_next(config_path: &Path, text: &str) -> Result<PathBuf> {
    let dir = std::path::absolute(config_path)?.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let next = dir.join("meridian.next.toml");
    let text =
        format!("# Written by `meridian region`: the running cluster file with one region more or less.\n{text}");
    std::fs::write(&next, text).with_context(|| format!("write {}", next.display()))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::with_region;

    const RUNNING: &str = r#"
cluster = "c"
[etcd]
endpoints = ["https://10.0.1.1:2379"]
[[region]]
name = "a"
"#;

    #[test]
    fn a_region_fragment_is_merged_with_its_etcd_member_and_checks() {
        let fragment = r#"
[[region]]
name = "b"
etcd = "https://10.0.2.1:2379"
[[health.check]]
name = "node-b1"
"#;
        let merged: toml::Table = toml::from_str(&with_region(RUNNING, "b", fragment).unwrap()).unwrap();
        assert_eq!(merged["region"].as_array().unwrap().len(), 2);
        assert_eq!(merged["etcd"]["endpoints"].as_array().unwrap().len(), 2);
        assert_eq!(merged["health"]["check"][0]["name"].as_str(), Some("node-b1"));
    }

    #[test]
    fn a_bad_fragment_is_refused_with_the_reason() {
        let two = "[[region]]\nname = \"b\"\n[[region]]\nname = \"c\"\n";
        assert!(with_region(RUNNING, "b", two).unwrap_err().to_string().contains("2 [[region]] tables"));
        assert!(with_region(RUNNING, "x", "[[region]]\nname = \"b\"\n").unwrap_err().to_string().contains("not \"x\""));
        assert!(with_region(RUNNING, "a", "[[region]]\nname = \"a\"\n").unwrap_err().to_string().contains("already"));
        assert!(with_region(RUNNING, "b", "[[region]]\nname = \"b\"\n[tls]\n")
            .unwrap_err()
            .to_string()
            .contains("[tls]"));
        assert!(with_region(RUNNING, "b", "cluster = 3").unwrap_err().to_string().contains("one [[region]]"));
    }
}
