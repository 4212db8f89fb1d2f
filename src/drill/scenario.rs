//! The faults a drill injects, and what each promises. Pure.

use std::fmt;

use rand::{Rng, SeedableRng};

use crate::config::Synchronous;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    PrimaryNodeKill,
    PrimaryRegionKill,
    PrimaryRegionPartition,
    Switchover,
    DrFailover,
    ReplicaRegionPartition,
    EtcdMemberLoss,
    PrimaryAgentFreeze,
    PrimaryHang,
    ClockSkew,
    BackupDuringFailover,
    Restore,
    /// A region (etcd member, gateway, one node) joins under the workload, then leaves.
    AddRegion,
    /// A replica leaves under the workload (with --purge), then joins again.
    RemoveNode,
}

pub const ALL: [Scenario; 14] = [
    Scenario::PrimaryNodeKill,
    Scenario::PrimaryRegionKill,
    Scenario::PrimaryRegionPartition,
    Scenario::Switchover,
    Scenario::DrFailover,
    Scenario::ReplicaRegionPartition,
    Scenario::EtcdMemberLoss,
    Scenario::PrimaryAgentFreeze,
    Scenario::PrimaryHang,
    Scenario::ClockSkew,
    Scenario::BackupDuringFailover,
    Scenario::Restore,
    Scenario::AddRegion,
    Scenario::RemoveNode,
];

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::PrimaryNodeKill => "primary-node-kill",
            Scenario::PrimaryRegionKill => "primary-region-kill",
            Scenario::PrimaryRegionPartition => "primary-region-partition",
            Scenario::Switchover => "switchover",
            Scenario::DrFailover => "dr-failover",
            Scenario::ReplicaRegionPartition => "replica-region-partition",
            Scenario::EtcdMemberLoss => "etcd-member-loss",
            Scenario::PrimaryAgentFreeze => "primary-agent-freeze",
            Scenario::PrimaryHang => "primary-hang",
            Scenario::ClockSkew => "clock-skew",
            Scenario::BackupDuringFailover => "backup-during-failover",
            Scenario::Restore => "restore",
            Scenario::AddRegion => "add-region",
            Scenario::RemoveNode => "remove-node",
        }
    }

    /// Scenarios that need `[backup]`: they are left out of `random`, which
    /// must run on every cluster (and a restore round takes a minute).
    pub fn needs_backup(self) -> bool {
        matches!(self, Scenario::BackupDuringFailover | Scenario::Restore)
    }

    /// Scenarios that change the cluster's shape: left out of `random` (their
    /// rounds take long, and remove-node needs two nodes in a region).
    pub fn changes_membership(self) -> bool {
        matches!(self, Scenario::AddRegion | Scenario::RemoveNode)
    }

    /// Scenarios that inject faults need the lab; operator actions work on any cluster.
    pub fn needs_lab(self) -> bool {
        !matches!(self, Scenario::Switchover | Scenario::DrFailover)
    }

    /// With persistent client connections and transaction pooling: how many
    /// failed transactions each writer may see. A switchover hides itself
    /// from clients; a failover, or a fault that might end in one, costs
    /// each at most the one in flight (a hung primary's too: the proxy cuts
    /// it once the leader changes). Faults that cut clients off from the
    /// database (a region killed or partitioned with its gateway) promise
    /// nothing here; nor do those with no primary to fail (restore, adding a
    /// region, removing a node).
    pub fn client_failures_allowed(self) -> Option<u32> {
        match self {
            Scenario::Switchover => Some(0),
            Scenario::PrimaryNodeKill
            | Scenario::DrFailover
            | Scenario::PrimaryHang
            | Scenario::PrimaryAgentFreeze
            | Scenario::ClockSkew
            | Scenario::BackupDuringFailover
            | Scenario::EtcdMemberLoss => Some(1),
            Scenario::PrimaryRegionKill
            | Scenario::PrimaryRegionPartition
            | Scenario::ReplicaRegionPartition
            | Scenario::Restore
            | Scenario::AddRegion
            | Scenario::RemoveNode => None,
        }
    }

    /// Whether the primary is expected to move.
    pub fn expects_new_primary(self) -> bool {
        !matches!(
            self,
            Scenario::ReplicaRegionPartition
                | Scenario::EtcdMemberLoss
                | Scenario::Restore
                | Scenario::AddRegion
                | Scenario::RemoveNode
        )
    }

    /// Whether this round must lose no acknowledged write, given the
    /// replication mode and whether the new primary is in the old one's region.
    /// A planned switchover always promises none; synchronous replication
    /// promises none for the losses it covers; no scenario without failover may lose any.
    pub fn promises_no_loss(self, sync: Synchronous, same_region: bool) -> bool {
        match self {
            Scenario::Switchover
            | Scenario::ReplicaRegionPartition
            | Scenario::EtcdMemberLoss
            | Scenario::Restore
            | Scenario::AddRegion
            | Scenario::RemoveNode => true,
            _ => match sync {
                Synchronous::Off => false,
                Synchronous::Remote => !same_region,
                Synchronous::Region => same_region,
            },
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `--scenario` names: one scenario, or a seeded random sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    One(Scenario),
    Random,
}

impl std::str::FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Plan, String> {
        if s == "random" {
            return Ok(Plan::Random);
        }
        ALL.iter().find(|sc| sc.name() == s).map(|sc| Plan::One(*sc)).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario {s:?}; one of {}, or random", names.join(", "))
        })
    }
}

/// The scenario of each round. `random` draws from the scenarios allowed here
/// (all in the lab, operator actions elsewhere) with a seeded generator, so a
/// seed reproduces the sequence.
pub fn rounds(plan: Plan, rounds: usize, seed: u64, lab: bool) -> Vec<Scenario> {
    match plan {
        Plan::One(s) => vec![s; rounds],
        Plan::Random => {
            let allowed: Vec<Scenario> = ALL
                .iter()
                .copied()
                .filter(|s| (lab || !s.needs_lab()) && !s.needs_backup() && !s.changes_membership())
                .collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..rounds).map(|_| allowed[rng.random_range(0..allowed.len())]).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_plans_are_reproducible_and_respect_the_lab() {
        let a = rounds(Plan::Random, 20, 7, true);
        assert_eq!(a, rounds(Plan::Random, 20, 7, true), "same seed, same rounds");
        assert_ne!(a, rounds(Plan::Random, 20, 8, true));
        let outside = rounds(Plan::Random, 50, 7, false);
        assert!(outside.iter().all(|s| !s.needs_lab()), "{outside:?}");
        assert!(rounds(Plan::Random, 200, 7, true).iter().all(|s| !s.needs_backup()));
        assert_eq!(rounds(Plan::One(Scenario::Switchover), 3, 0, false), vec![Scenario::Switchover; 3]);
    }

    #[test]
    fn names_parse_back() {
        for s in ALL {
            assert_eq!(s.name().parse::<Plan>(), Ok(Plan::One(s)));
        }
        assert_eq!("random".parse::<Plan>(), Ok(Plan::Random));
        assert!("meteor".parse::<Plan>().unwrap_err().contains("primary-node-kill"));
    }

    #[test]
    fn promises_follow_the_replication_mode() {
        use Scenario::*;
        assert!(Switchover.promises_no_loss(Synchronous::Off, true));
        assert!(!PrimaryRegionKill.promises_no_loss(Synchronous::Off, false));
        assert!(PrimaryRegionKill.promises_no_loss(Synchronous::Remote, false));
        assert!(PrimaryNodeKill.promises_no_loss(Synchronous::Region, true));
        assert!(!PrimaryRegionKill.promises_no_loss(Synchronous::Region, false));
    }
}
