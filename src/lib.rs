//! meridian runs one PostgreSQL database across several regions and survives
//! the loss of any of them.
//!
//! # Architecture
//!
//! Every node runs an **agent** (`agent`) that owns its PostgreSQL server
//! (`postgres`): it creates it (initdb or base backup), starts it as its direct
//! child with a parent-death signal, and every second publishes the node's
//! report to etcd under a lease. The primary's agent also holds the `leader`
//! key with the fencing **epoch**. What an agent does next is a pure function
//! of what it sees (`failover::decide`); the safety rule is that a server runs
//! read-write only while its agent holds `leader` for the current epoch with a
//! freshly renewed lease, and is restarted as a standby otherwise.
//!
//! Every region runs a **gateway** (`gateway`) with the HTTP API that the CLI
//! talks to; any gateway serves any request. **etcd** (`coord`, one member per
//! region, three regions at least) is the only shared state; `coord::keys`
//! alone spells its keys. One cluster file (`config`) describes everything.
//!
//! `lab` runs the whole topology on one machine, each region on its own
//! loopback /24, with processes started and stopped by pid (`process`).
//!
//! # On disk
//!
//! A node: `<data_dir>` is PGDATA, `<run_dir>` holds the socket, pg_hba/ident,
//! the passfile and the server log (see `postgres`). A lab: see `lab`.

pub mod agent;
pub mod auth;
pub mod backup;
pub mod ca;
pub mod client;
pub mod cluster;
pub mod cmd;
pub mod config;
pub mod coord;
pub mod deploy;
pub mod destroy;
pub mod drill;
pub mod failover;
pub mod gateway;
pub mod lab;
pub mod logging;
pub mod objects;
pub mod postgres;
pub mod process;
pub mod progress;
pub mod rolling;
pub mod tls;
