use super::*;

/// A valid three-region file; tests break one thing at a time.
const GOOD: &str = r#"
cluster = "orders"

[etcd]
endpoints = ["https://127.0.1.1:2379", "https://127.0.2.1:2379", "https://127.0.3.1:2379"]

[failover]
lease_ttl = "6s"
max_lag_on_failover = "16MB"

[postgres]
secrets_file = "secrets.toml"

[[region]]
name = "ap-south-1"
priority = 1
etcd = "https://127.0.1.1:2379"
gateway = { api = "127.0.1.2:8080", dns = "127.0.1.2:5353", writer = "127.0.1.2:6432", reader = "127.0.1.2:6433" }

  [[region.node]]
  name = "ap-south-1a"
  address = "127.0.1.11:5432"
  api = "127.0.1.11:8008"
  data_dir = "/var/lib/meridian/ap-south-1a"

[[region]]
name = "ap-northeast-1"
priority = 2
etcd = "https://127.0.2.1:2379"
gateway = { api = "127.0.2.2:8080", dns = "127.0.2.2:5353", writer = "127.0.2.2:6432", reader = "127.0.2.2:6433" }

  [[region.node]]
  name = "ap-northeast-1a"
  address = "127.0.2.11:5432"
  api = "127.0.2.11:8008"
  data_dir = "/var/lib/meridian/ap-northeast-1a"

[[region]]
name = "witness"
etcd = "https://127.0.3.1:2379"
gateway = { api = "127.0.3.2:8080", dns = "127.0.3.2:5353", writer = "127.0.3.2:6432", reader = "127.0.3.2:6433" }
"#;

fn problems(text: &str) -> Vec<String> {
    Config::parse(text).problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn good_file_has_no_problems_and_defaults_apply() {
    let checked = Config::parse(GOOD);
    assert_eq!(checked.problems, vec![]);
    let c = checked.config.unwrap();
    assert_eq!(c.failover.lease_ttl, Duration::from_secs(6));
    assert_eq!(c.failover.probe_timeout(), Duration::from_secs(3), "half the lease TTL");
    assert_eq!(c.failover.max_lag_on_failover, LagBudget::Bytes(16 << 20));
    assert_eq!(c.failover.cross_region, FailoverMode::Automatic);
    assert_eq!(c.dns.ttl, Duration::from_secs(5));
    assert_eq!(c.bootstrap_node().unwrap().name, "ap-south-1a");
    assert_eq!(c.nodes().count(), 2);
    assert_eq!(c.regions[0].nodes[0].run_dir(), PathBuf::from("/var/lib/meridian/ap-south-1a.run"));
}

#[test]
fn each_broken_file_reports_the_problem_where_it_is() {
    // (what is changed, replacement, expected substring of some problem)
    let cases: &[(&str, &str, &str)] = &[
        ("lease_ttl = \"6s\"", "lease_tll = \"6s\"", "failover.lease_tll: unknown field"),
        ("priority = 2", "priority = 2\ncolour = \"red\"", "region[1].colour: unknown field"),
        (
            "name = \"ap-northeast-1a\"",
            "name = \"ap-south-1a\"",
            "region[1].node[0].name: duplicate node name \"ap-south-1a\" (also region[0].node[0])",
        ),
        ("name = \"ap-northeast-1\"\n", "name = \"ap-south-1\"\n", "region[1].name: duplicate region name"),
        (
            "address = \"127.0.2.11:5432\"",
            "address = \"127.0.1.11:5432\"",
            "region[1].node[0].address: address 127.0.1.11:5432 is already used by region[0].node[0].address",
        ),
        ("api = \"127.0.2.11:8008\"", "api = \"127.0.1.2:8080\"", "is already used by region[0].gateway.api"),
        ("etcd = \"https://127.0.3.1:2379\"\n", "", "2 region(s) have an etcd member; at least three are needed"),
        ("priority = 1\n", "", "region[0].priority: missing"),
        ("  data_dir = \"/var/lib/meridian/ap-northeast-1a\"\n", "", "missing field `data_dir`"),
        ("max_lag_on_failover = \"16MB\"", "max_lag_on_failover = \"lots\"", "neither a size"),
        ("lease_ttl = \"6s\"", "lease_ttl = \"1s\"", "failover.lease_ttl: must be at least 2s"),
        (
            "lease_ttl = \"6s\"",
            "lease_ttl = \"6s\"\nprimary_probe_timeout = \"6s\"",
            "failover.primary_probe_timeout: 6s must be at least 200ms and below lease_ttl",
        ),
        ("cluster = \"orders\"", "cluster = \"Orders DB\"", "cluster: \"Orders DB\" must be lowercase"),
        (
            "etcd = \"https://127.0.2.1:2379\"",
            "etcd = \"https://127.0.9.1:2379\"",
            "region[1].etcd: \"https://127.0.9.1:2379\" is not one of etcd.endpoints",
        ),
        ("[postgres]", "[postgres]\nsettings = { port = 1 }", "postgres.settings.port: is managed by meridian"),
        ("cluster = \"orders\"", "cluster = \"orders", "line 2"),
    ];
    for (from, to, want) in cases {
        assert!(GOOD.contains(from), "test case does not apply: {from}");
        let text = GOOD.replacen(from, to, 1);
        let got = problems(&text);
        assert!(got.iter().any(|p| p.contains(want)), "changing {from:?} to {to:?}: want {want:?} in {got:#?}");
    }
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = GOOD
        .replacen("lease_ttl = \"6s\"", "lease_tll = \"6s\"", 1)
        .replacen("priority = 2", "priority = 2\ncolour = \"red\"", 1)
        .replacen("address = \"127.0.2.11:5432\"", "address = \"127.0.1.11:5432\"", 1)
        .replacen("etcd = \"https://127.0.3.1:2379\"\n", "", 1);
    let got = problems(&text);
    assert_eq!(got.len(), 4, "{got:#?}");
}

#[test]
fn sizes_and_budgets_parse() {
    assert_eq!(parse_bytes("16MB"), Ok(16 << 20));
    assert_eq!(parse_bytes("512kB"), Ok(512 << 10));
    assert_eq!(parse_bytes("8192"), Ok(8192));
    assert!(parse_bytes("12 parsecs").is_err());
    assert_eq!("5s".parse::<LagBudget>(), Ok(LagBudget::Time(Duration::from_secs(5))));
    assert_eq!("1GB".parse::<LagBudget>(), Ok(LagBudget::Bytes(1 << 30)));
    assert_eq!(format_bytes(16 << 20), "16MB");
    assert_eq!(format_bytes(1000), "1000B");
}

#[test]
fn cidrs_parse() {
    assert!(parse_cidr("10.0.0.0/8").is_some());
    assert!(parse_cidr("127.0.0.1").is_some());
    assert!(parse_cidr("10.0.0.0/33").is_none());
    assert!(parse_cidr("ten/8").is_none());
}

#[test]
fn the_file_round_trips_through_serialization() {
    let c = Config::parse(GOOD).config.unwrap();
    let text = toml::to_string(&c).unwrap();
    let again = Config::parse(&text);
    assert_eq!(again.problems, vec![], "{text}");
}

#[test]
fn secrets_file_must_not_be_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.toml");
    std::fs::write(&path, "replication_password = \"a\"\nmonitor_password = \"b\"\nauth_password = \"c\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Secrets::load(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Secrets::load(&path).unwrap();
    assert_eq!(s.replication_password, "a");
    assert_eq!(format!("{s:?}"), "Secrets { .. }");
}

const ROUTING: &str = r#"
[health]
healthy_share = 0.18

[[health.check]]
name = "dr-trigger"
kind = "object-exists"
target = "s3://orders-dr/trigger"
invert = true

[[health.check]]
name = "pg"
kind = "postgres"
target = "127.0.1.11:5432"
max_lag = "16MB"

[[health.check]]
name = "either"
kind = "calculated"
children = ["dr-trigger", "pg"]
min_healthy = "any"

[[dns.record]]
name = "app"
primary = { value = "127.0.1.2", health_check = "dr-trigger" }
secondary = { value = "127.0.2.2" }

[failover.dr_trigger]
object = "s3://orders-dr/trigger"
region = "ap-northeast-1"
"#;

#[test]
fn routing_sections_parse_with_defaults() {
    let checked = Config::parse(&format!("{GOOD}{ROUTING}"));
    assert_eq!(checked.problems, vec![]);
    let c = checked.config.unwrap();
    assert_eq!(c.health.checks.len(), 3);
    assert_eq!(c.health.checks[0].failure_threshold, 3);
    assert_eq!(c.health.checks[0].interval, Duration::from_secs(1));
    assert_eq!(c.health.checks[2].min_healthy, Some(MinHealthy::Any));
    assert_eq!(c.dns.records[0].record_type, RecordType::A);
    assert_eq!(c.proxy.leader_wait, Duration::from_secs(15));
    assert_eq!(c.failover.dr_trigger.as_ref().unwrap().region, "ap-northeast-1");
}

#[test]
fn routing_mistakes_are_all_reported_with_their_paths() {
    let bad = r#"
[health]
healthy_share = 1.5

[[health.check]]
name = "loop"
kind = "calculated"
children = ["loop", "missing"]
min_healthy = 3

[[health.check]]
name = "t"
kind = "tcp"
target = "no-port"
query = "SELECT 1"
failure_threshold = 0

[[health.check]]
name = "t"
kind = "http"
target = "ftp://x"

[[health.check]]
name = "o"
kind = "object-exists"

[[dns.record]]
name = "writer"
primary = { value = "not-an-ip", health_check = "nope" }

[failover.dr_trigger]
object = "gs://bucket/key"
region = "witness"
"#;
    let p = problems(&format!("{GOOD}{bad}"));
    let expect = [
        "health.healthy_share: must be at least 0 and below 1",
        "health.check[0].children[1]: no check is named \"missing\"",
        "health.check[0].min_healthy: must be between 1 and 2",
        "health.check[0].children: \"loop\" depends on itself",
        "health.check[1].target: \"no-port\" must be host:port",
        "health.check[1].query: does not apply to a tcp check",
        "health.check[1].failure_threshold: must be between 1 and 10",
        "health.check[2].name: duplicate check name \"t\"",
        "health.check[2].target: \"ftp://x\" must be an http:// or https:// URL",
        "health.check[3].target: missing",
        "dns.record[0].name: \"writer\" is answered by meridian itself",
        "dns.record[0].primary.value: \"not-an-ip\" is not an IPv4 address",
        "dns.record[0].primary.health_check: no check is named \"nope\"",
        "failover.dr_trigger.object: \"gs://bucket/key\" is neither",
        "failover.dr_trigger.region: \"witness\" has no database nodes",
    ];
    for e in expect {
        assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
    }
}

#[test]
fn the_full_example_in_docs_config_md_is_a_valid_cluster_file() {
    let doc = include_str!("../../docs/config.md");
    let start = doc.find("```toml\n").expect("a toml example") + "```toml\n".len();
    let end = start + doc[start..].find("```").expect("the example's end");
    let checked = Config::parse(&doc[start..end]);
    assert!(checked.problems.is_empty(), "docs/config.md's example: {:#?}", checked.problems);
    let config = checked.config.unwrap();
    assert_eq!(config.api.certificate_roles.get("user:alice"), Some(&ApiRole::Operator));
}

#[test]
fn api_settings_are_checked() {
    let short = format!("{GOOD}\n[api]\naudit_retention = \"1h\"\n");
    assert!(
        problems(&short).iter().any(|p| p.starts_with("api.audit_retention: must be at least 1d")),
        "{:?}",
        problems(&short)
    );
    let member = format!("{GOOD}\n[api]\ncertificate_roles = {{ \"node:a1\" = \"admin\" }}\n");
    assert!(
        problems(&member).iter().any(|p| p.contains("names a cluster member's certificate")),
        "{:?}",
        problems(&member)
    );
    let fine =
        format!("{GOOD}\n[api]\naudit_retention = \"90d\"\ncertificate_roles = {{ \"user:ops\" = \"operator\" }}\n");
    assert!(problems(&fine).is_empty(), "{:?}", problems(&fine));
    let http = GOOD.replace("https://127.0.1.1:2379\", \"https", "http://127.0.1.1:2379\", \"https");
    assert!(problems(&http).iter().any(|p| p.contains("must start with https://")), "{:?}", problems(&http));
}

#[test]
fn backup_sections_parse_and_every_mistake_is_named() {
    let good = format!(
        "{GOOD}\n[backup]\nretention_full = 3\n\n[[backup.repository]]\nname = \"ap-south-1\"\nregion = \"ap-south-1\"\nurl = \"s3://orders-backup/pg\"\nendpoint = \"https://s3.ap-south-1.amazonaws.com\"\n\n[[backup.repository]]\nname = \"ap-northeast-1\"\nregion = \"ap-northeast-1\"\nurl = \"file:///srv/backup\"\n"
    );
    assert!(problems(&good).is_empty(), "{:?}", problems(&good));
    let c = Config::parse(&good).config.unwrap();
    let b = c.backup.unwrap();
    assert_eq!((b.retention_full, b.encrypt, b.archive_timeout), (3, true, Duration::from_secs(60)));
    assert_eq!(
        b.repositories[0].location().unwrap(),
        RepoLocation::S3 {
            bucket: "orders-backup".into(),
            prefix: "/pg".into(),
            host: "s3.ap-south-1.amazonaws.com".into(),
            port: 443
        }
    );

    let bad = format!(
        "{GOOD}\n[backup]\nretention_full = 0\narchive_timeout = \"1s\"\nfull_every = \"1d\"\ndiff_every = \"2d\"\n\n[[backup.repository]]\nname = \"r\"\nregion = \"mars\"\nurl = \"s3://Bad_Bucket/x\"\n\n[[backup.repository]]\nname = \"r\"\nregion = \"ap-south-1\"\nurl = \"s3://good-bucket\"\nendpoint = \"http://127.0.0.1:9000\"\n\n[[backup.repository]]\nname = \"d\"\nregion = \"ap-south-1\"\nurl = \"file://relative\"\n\n[[backup.repository]]\nname = \"e\"\nregion = \"ap-south-1\"\nurl = \"s3://good-bucket\"\nendpoint = \"https://127.0.0.1:9000\"\n"
    );
    let found = problems(&bad);
    for want in [
        "backup.retention_full: must be between 1 and 100",
        "backup.archive_timeout: must be between 10s and 1h",
        "backup.diff_every: 2days must be at least 10m and shorter than 1day",
        "backup.repository[0].region: \"mars\" is not one of the [[region]] names",
        "backup.repository[0].url: \"s3://Bad_Bucket/x\": \"Bad_Bucket\" is not a bucket name",
        "backup.repository[1].name: duplicate repository name \"r\"",
        "backup.repository[1].url: endpoint \"http://127.0.0.1:9000\" must start with https://",
        "backup.repository[2].url: \"file://relative\" must name an absolute directory",
        "backup.repository[3].url: endpoint \"https://127.0.0.1:9000\": the host must be a DNS name",
    ] {
        assert!(found.iter().any(|p| p.starts_with(want)), "missing {want:?} in {found:#?}");
    }
    let managed = format!("{GOOD}\n[postgres.settings]\narchive_command = \"cp %p /tmp\"\n");
    assert!(problems(&managed).iter().any(|p| p.starts_with("postgres.settings.archive_command: is managed")));
}

#[test]
fn backup_health_checks_name_a_repository_and_their_limits() {
    let backup = "\n[backup]\narchive_timeout = \"60s\"\n\n[[backup.repository]]\nname = \"ap-south-1\"\nregion = \"ap-south-1\"\nurl = \"file:///srv/backup\"\n";
    let check = |body: &str| format!("{GOOD}{backup}\n[[health.check]]\nname = \"backups\"\nkind = \"backup\"\n{body}");
    let good = check("target = \"ap-south-1\"\ninterval = \"30s\"\nmax_archive_age = \"5m\"\nmax_full_age = \"8d\"\n");
    assert!(problems(&good).is_empty(), "{:?}", problems(&good));
    let c = Config::parse(&good).config.unwrap();
    assert_eq!(c.health.checks[0].max_full_age, Some(Duration::from_secs(8 * 86400)));
    let found = problems(&check("target = \"nowhere\"\ninterval = \"1s\"\nmax_archive_age = \"30s\"\n"));
    for want in [
        "health.check[0].target: no [[backup.repository]] is named \"nowhere\"",
        "health.check[0].interval: must be at least 10s for a backup check",
    ] {
        assert!(found.iter().any(|p| p.starts_with(want)), "missing {want:?} in {found:#?}");
    }
    let found = problems(&check("target = \"ap-south-1\"\ninterval = \"30s\"\nmax_archive_age = \"30s\"\n"));
    assert!(found.iter().any(|p| p.contains("is not above backup.archive_timeout")), "{found:#?}");
    let found = problems(&check("target = \"ap-south-1\"\ninterval = \"30s\"\n"));
    assert!(found.iter().any(|p| p.contains("needs max_archive_age, max_full_age or both")), "{found:#?}");
    let stray = format!(
        "{GOOD}\n[[health.check]]\nname = \"t\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\nmax_full_age = \"1d\"\n"
    );
    assert!(
        problems(&stray).iter().any(|p| p.contains("max_full_age: does not apply to a tcp check")),
        "{:?}",
        problems(&stray)
    );
    let no_backup = format!("{GOOD}\n[[health.check]]\nname = \"b\"\nkind = \"backup\"\ntarget = \"r\"\ninterval = \"30s\"\nmax_full_age = \"1d\"\n");
    assert!(problems(&no_backup).iter().any(|p| p.contains("needs a [backup] section")), "{:?}", problems(&no_backup));
}

#[test]
fn pool_sizes_take_user_at_database_first_then_user_then_the_default() {
    let mut proxy = ProxyConfig { default_pool_size: 20, ..Default::default() };
    assert_eq!(proxy.pool_size("app", "app"), 20, "no overrides");
    proxy.pool_sizes.insert("app@app".into(), 40);
    proxy.pool_sizes.insert("app".into(), 30);
    proxy.pool_sizes.insert("reporting".into(), 5);
    assert_eq!(proxy.pool_size("app", "app"), 40);
    assert_eq!(proxy.pool_size("app", "other"), 30);
    assert_eq!(proxy.pool_size("reporting", "app"), 5);
    assert_eq!(proxy.pool_size("someone", "app"), 20);
}
