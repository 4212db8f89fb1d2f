//! The running cluster file in etcd: `config show`, `config diff` and `config
//! apply` against a lab, a reloadable setting taken by every agent while it
//! runs (and again by one that restarts), and unsafe or not-yet-live changes
//! refused with nothing changed.

mod common;

use std::time::Duration;

use common::*;

/// The lab's cluster file with `edit` applied, written next to it as `name`.
fn edited(lab: &TestLab, name: &str, edit: impl Fn(&mut toml::Table)) -> String {
    let mut file: toml::Table = toml::from_str(&std::fs::read_to_string(lab.config()).unwrap()).unwrap();
    edit(&mut file);
    let path = lab.path().join(name);
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
    path.display().to_string()
}

fn set_setting(file: &mut toml::Table, name: &str, value: &str) {
    let postgres = file.entry("postgres").or_insert_with(|| toml::Value::Table(Default::default()));
    let settings =
        postgres.as_table_mut().unwrap().entry("settings").or_insert_with(|| toml::Value::Table(Default::default()));
    settings.as_table_mut().unwrap().insert(name.into(), toml::Value::String(value.into()));
}

fn work_mem_everywhere(lab: &TestLab, want: &str, within: Duration) {
    for node in ["ap-south-1a", "ap-northeast-1a"] {
        wait_until(&format!("work_mem = {want} on {node}"), within, || {
            let v = lab.try_psql(node, "SHOW work_mem").map_err(|e| e.to_string())?;
            if v == want {
                Ok(())
            } else {
                Err(v)
            }
        });
    }
}

#[test]
fn config_apply_publishes_a_reload_every_agent_takes_and_refuses_what_it_cannot_take() {
    let mut lab = TestLab::up(123, &[]);
    // `lab kill` of a node with a connection open (a gateway's probe).
    lab.expect_error("terminating connection due to unexpected postmaster exit");

    // Nothing published yet: the file the gateways started with, as version 0.
    let shown = lab.json(&["config", "show"]);
    assert_eq!(shown["version"], 0, "{shown}");
    assert_eq!(shown["text"].as_str().unwrap(), std::fs::read_to_string(lab.config()).unwrap());

    // A reloadable setting: diff says so, apply publishes version 1, every server takes it.
    let new = edited(&lab, "work-mem.toml", |f| set_setting(f, "work_mem", "7MB"));
    let diff = lab.json(&["config", "diff", &new]);
    assert_eq!(diff["running_version"], 0, "{diff}");
    let changes = diff["plan"]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{diff}");
    assert_eq!(changes[0]["path"], "postgres.settings.work_mem");
    assert_eq!(changes[0]["cost"], "reload");
    assert!(diff["published"].is_null(), "diff publishes nothing: {diff}");
    assert_eq!(lab.json(&["config", "show"])["version"], 0);
    let out = lab.meridian(&["config", "apply", &new]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("published version 1"), "{}", text(&out));
    work_mem_everywhere(&lab, "7MB", Duration::from_secs(15));
    let shown = lab.json(&["config", "show"]);
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["cost"], "reload");
    assert!(shown["summary"].as_str().unwrap().contains("postgres.settings.work_mem: (none) -> 7MB"), "{shown}");
    // The same file again changes nothing.
    let out = lab.meridian(&["config", "apply", &new]);
    assert!(out.status.success() && text(&out).contains("nothing to change"), "{}", text(&out));

    // An agent that restarts starts from its own file, then takes the published version again.
    let out = lab.run_lab(&["kill", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lab.run_lab(&["start", "ap-northeast-1a"]);
    assert!(out.status.success(), "{}", text(&out));
    work_mem_everywhere(&lab, "7MB", Duration::from_secs(15));

    // Refused, with the reason, and nothing changes.
    let refusals = [
        (edited(&lab, "rename.toml", |f| drop(f.insert("cluster".into(), "other".into()))), "renames the cluster"),
        (edited(&lab, "restart.toml", |f| set_setting(f, "shared_buffers", "64MB")), "rolling restart"),
        (edited(&lab, "broken.toml", |f| drop(f.remove("etcd"))), "problem"),
    ];
    for (file, why) in &refusals {
        let out = lab.meridian(&["config", "apply", file]);
        assert_eq!(out.status.code(), Some(2), "{file}: {}", text(&out));
        assert!(text(&out).contains(why), "{file}: want {why:?}: {}", text(&out));
    }
    assert_eq!(lab.json(&["config", "show"])["version"], 1, "a refused apply publishes nothing");
    let out = lab.meridian(&["config", "show", "--version", "9"]);
    assert!(!out.status.success() && text(&out).contains("no version 9 was published"), "{}", text(&out));
    let v1 = lab.meridian(&["config", "show", "--version", "1"]);
    assert!(text(&v1).contains("work_mem"), "{}", text(&v1));

    // Who applied it is in the audit log.
    let audit = lab.json(&["audit"]);
    assert!(audit.to_string().contains("/v1/config"), "{audit}");
    lab.finish();
}
