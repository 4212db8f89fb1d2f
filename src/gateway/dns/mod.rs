//! The gateway's authoritative DNS server (hickory-server, UDP and TCP) for the
//! cluster's zone. One task rebuilds the zone whenever the view of etcd
//! changes (so answers follow etcd within a second, not on a timer) and bumps
//! the SOA serial when an answer changed; the request handler only reads the
//! latest zone.

pub mod zone;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::health::aggregate::aggregate;
use super::view::View;
use crate::config::Config;
use zone::{Entry, Names};

/// How often staleness is re-judged when nothing arrives from etcd.
const STALE_CHECK: Duration = Duration::from_millis(250);

/// The zone as served: records by name, ready to send.
pub struct ServedZone {
    origin: LowerName,
    soa: Record,
    ns: Vec<Record>,
    records: HashMap<LowerName, Vec<Record>>,
    /// Names the gateway cannot answer now (SERVFAIL).
    unknown: Vec<LowerName>,
}

/// Binds UDP and TCP on `addr` and serves until `shutdown`.
pub async fn serve(
    region: String,
    addr: SocketAddr,
    view: watch::Receiver<View>,
    shutdown: CancellationToken,
) -> Result<()> {
    let udp = tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("bind DNS (UDP) on {addr}"))?;
    let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind DNS (TCP) on {addr}"))?;
    let first = {
        let v = view.borrow();
        let empty = View::new(v.config.clone());
        Arc::new(served_zone(&v.config, &region, &current_names(&empty), 0))
    };
    let (tx, rx) = watch::channel(first);
    tokio::spawn(update(region, view, tx, shutdown.clone()));
    let mut server = hickory_server::Server::new(Handler { zone: rx });
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
    shutdown.cancelled().await;
    server.shutdown_gracefully().await.context("stop the DNS server")?;
    Ok(())
}

/// Rebuilds the zone on every view change (and when the view grows stale).
async fn update(
    region: String,
    mut view: watch::Receiver<View>,
    tx: watch::Sender<Arc<ServedZone>>,
    shutdown: CancellationToken,
) {
    let mut serial = initial_serial();
    let mut last: Option<(Names, u64)> = None;
    loop {
        let current = view.borrow_and_update().clone();
        let config = &current.config;
        let names = (current_names(&current), current.config_version);
        // Records are built only when an answer (or the cluster file) changed.
        if last.as_ref() != Some(&names) {
            if last.is_some() {
                serial = serial.wrapping_add(1);
            }
            tracing::debug!("DNS zone serial {serial}");
            tx.send_replace(Arc::new(served_zone(config, &region, &names.0, serial)));
            last = Some(names);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(STALE_CHECK) => {}
        }
    }
}

/// Serials start at the Unix time, so a restarted gateway's serial does not go back.
fn initial_serial() -> u32 {
    (crate::cluster::now_ms() / 1000) as u32
}

/// What every name answers now; a view older than half the lease TTL counts as none.
fn current_names(view: &View) -> Names {
    let config = &view.config;
    let snap = view.routable();
    let verdicts = snap
        .map(|s| aggregate(&config.health, &s.health).into_iter().map(|(k, v)| (k, v.healthy)).collect())
        .unwrap_or_default();
    zone::names(config, snap, &verdicts)
}

/// The records to serve for `names`, with the SOA and NS set.
fn served_zone(config: &Config, region: &str, names: &Names, serial: u32) -> ServedZone {
    let origin = Name::from_ascii(&config.dns.zone).expect("validated zone name");
    let ttl = config.dns.ttl.as_secs() as u32;
    let name = |n: &str| Name::from_ascii(n).expect("zone names are valid");
    let own_ns = name(&format!("ns-{region}.{}", config.dns.zone));
    let soa = SOA::new(own_ns, name(&format!("hostmaster.{}", config.dns.zone)), serial, 60, 10, 600, ttl);
    let soa = Record::from_rdata(origin.clone(), ttl, RData::SOA(soa));
    let ns = config
        .regions
        .iter()
        .map(|r| {
            Record::from_rdata(origin.clone(), ttl, RData::NS(NS(name(&format!("ns-{}.{}", r.name, config.dns.zone)))))
        })
        .collect();
    let mut records = HashMap::new();
    let mut unknown = Vec::new();
    for (n, answer) in names {
        let owner = name(n);
        let rdata: Vec<RData> = match &answer.entry {
            Entry::A(ips) => ips.iter().map(|ip| RData::A(A(*ip))).collect(),
            Entry::AAAA(ips) => ips.iter().map(|ip| RData::AAAA(AAAA(*ip))).collect(),
            Entry::CNAME(target) => vec![RData::CNAME(CNAME(name(target)))],
            Entry::Unknown(_) => {
                unknown.push(LowerName::from(owner.clone()));
                Vec::new()
            }
        };
        let recs = rdata.into_iter().map(|d| Record::from_rdata(owner.clone(), answer.ttl, d)).collect();
        records.insert(LowerName::from(owner), recs);
    }
    ServedZone { origin: LowerName::from(origin), soa, ns, records, unknown }
}

struct Handler {
    zone: watch::Receiver<Arc<ServedZone>>,
}

/// What to answer, before it is encoded.
struct Reply {
    code: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additionals: Vec<Record>,
}

impl ServedZone {
    fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Reply {
        let reply = |code, answers, authority| Reply { code, answers, authority, additionals: Vec::new() };
        if !self.origin.zone_of(qname) {
            return reply(ResponseCode::Refused, Vec::new(), Vec::new());
        }
        if self.unknown.contains(qname) {
            return reply(ResponseCode::ServFail, Vec::new(), Vec::new());
        }
        let nodata = || reply(ResponseCode::NoError, Vec::new(), vec![self.soa.clone()]);
        if *qname == self.origin {
            return match qtype {
                RecordType::SOA => reply(ResponseCode::NoError, vec![self.soa.clone()], Vec::new()),
                RecordType::NS => {
                    let glue = self.ns.iter().filter_map(|ns| match &ns.data {
                        RData::NS(NS(n)) => self.records.get(&LowerName::from(n.clone())),
                        _ => None,
                    });
                    let additionals = glue.flatten().cloned().collect();
                    Reply { code: ResponseCode::NoError, answers: self.ns.clone(), authority: Vec::new(), additionals }
                }
                RecordType::ANY => {
                    let mut all = vec![self.soa.clone()];
                    all.extend(self.ns.iter().cloned());
                    reply(ResponseCode::NoError, all, Vec::new())
                }
                _ => nodata(),
            };
        }
        let Some(records) = self.records.get(qname) else {
            // An empty non-terminal (`reader.<zone>` above `reader.<region>.<zone>`) exists without data.
            let parent_of_some = self.records.keys().any(|k| k != qname && qname.zone_of(k));
            let code = if parent_of_some { ResponseCode::NoError } else { ResponseCode::NXDomain };
            return reply(code, Vec::new(), vec![self.soa.clone()]);
        };
        let mut answers: Vec<Record> = Vec::new();
        let mut current = records;
        // Follow CNAMEs inside the zone (a bounded chain).
        for _ in 0..8 {
            let cname = current.iter().find(|r| r.record_type() == RecordType::CNAME);
            match cname {
                Some(c) if qtype != RecordType::CNAME && qtype != RecordType::ANY => {
                    answers.push(c.clone());
                    let RData::CNAME(CNAME(target)) = &c.data else { break };
                    match self.records.get(&LowerName::from(target.clone())) {
                        Some(next) => current = next,
                        None => return reply(ResponseCode::NoError, answers, Vec::new()),
                    }
                }
                _ => {
                    answers.extend(
                        current.iter().filter(|r| qtype == RecordType::ANY || r.record_type() == qtype).cloned(),
                    );
                    break;
                }
            }
        }
        if answers.is_empty() {
            return nodata();
        }
        reply(ResponseCode::NoError, answers, Vec::new())
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let zone = self.zone.borrow().clone();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = false;
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            e
        });
        let reply = match (request.metadata.op_code, request.queries.queries()) {
            (OpCode::Query, [q]) => zone.lookup(q.name(), q.query_type()),
            (OpCode::Query, _) => {
                Reply { code: ResponseCode::FormErr, answers: vec![], authority: vec![], additionals: vec![] }
            }
            _ => Reply { code: ResponseCode::NotImp, answers: vec![], authority: vec![], additionals: vec![] },
        };
        metadata.response_code = reply.code;
        if reply.code == ResponseCode::Refused {
            metadata.authoritative = false;
        }
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let message =
            builder.build(metadata, reply.answers.iter(), reply.authority.iter(), [], reply.additionals.iter());
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("failed to send a DNS response: {e}");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                hickory_proto::op::Header { metadata, counts: Default::default() }.into()
            }
        }
    }
}
