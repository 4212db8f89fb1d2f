//! The netns lab's WAN: a delay line between regions in user space.
//!
//! This kernel has no netem qdisc and no nftables `queue` expression, but it
//! has TUN. So the router namespace sends every packet that crosses from one
//! region's bridge to another's into a TUN device (`wan0`, by policy routing:
//! see `netns`), and this relay, running in the router namespace, reads each
//! packet, holds it for the configured one-way delay (plus jitter), and writes
//! it back; the kernel then routes it on to the destination region. Packets
//! of one flow are never reordered (a packet leaves no earlier than the one
//! before it in its flow, whatever its jitter: TCP reads reordering as loss);
//! flows are independent (one global order would hold every packet behind
//! the last one of every other flow, and turn jitter into extra delay); a
//! share of the packets (`loss`) is dropped.
//!
//! The delay is one way, as netem's is: a round trip between two regions
//! takes twice `latency`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What a packet between two regions sees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Wan {
    /// One-way delay.
    #[serde(with = "crate::config::humantime_serde")]
    pub latency: Duration,
    /// Each packet's delay is `latency` ± up to this much (uniformly), never reordered.
    #[serde(with = "crate::config::humantime_serde")]
    pub jitter: Duration,
    /// The share of packets dropped, 0.0..=0.5.
    pub loss: f64,
}

impl Wan {
    /// From `--wan-latency 40ms --wan-jitter 5ms --wan-loss 0.5%`.
    pub fn parse(latency: &str, jitter: Option<&str>, loss: Option<&str>) -> Result<Wan> {
        let duration = |flag: &str, s: &str| -> Result<Duration> {
            let d = humantime::parse_duration(s.trim())
                .map_err(|e| anyhow::anyhow!("{flag} {s:?} is not a duration like 40ms ({e})"))?;
            anyhow::ensure!(
                d <= Duration::from_secs(2),
                "{flag} {s:?}: at most 2s (a round trip around the earth is 0.3s)"
            );
            Ok(d)
        };
        let latency = duration("--wan-latency", latency)?;
        let jitter = jitter.map(|j| duration("--wan-jitter", j)).transpose()?.unwrap_or_default();
        anyhow::ensure!(
            jitter <= latency,
            "--wan-jitter ({jitter:?}) must not exceed --wan-latency ({latency:?}): a packet cannot arrive before it left"
        );
        let loss = match loss {
            None => 0.0,
            Some(s) => {
                let number = s
                    .trim()
                    .strip_suffix('%')
                    .with_context(|| format!("--wan-loss {s:?} must be a percentage like 0.5%"))?;
                let pct: f64 = number
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--wan-loss {s:?} must be a percentage like 0.5%"))?;
                anyhow::ensure!((0.0..=50.0).contains(&pct), "--wan-loss {s:?} must be between 0% and 50%");
                pct / 100.0
            }
        };
        anyhow::ensure!(
            !latency.is_zero() || (jitter.is_zero() && loss == 0.0),
            "--wan-jitter and --wan-loss need a --wan-latency above 0"
        );
        Ok(Wan { latency, jitter, loss })
    }

    /// When a packet read at `now` may leave, or None to drop it; `last` is
    /// when the previous packet of its flow leaves (no reordering in a flow).
    pub fn schedule(&self, now: Instant, last: Instant, rng: &mut impl Rng) -> Option<Instant> {
        if self.loss > 0.0 && rng.random_bool(self.loss) {
            return None;
        }
        let mut delay = self.latency;
        if !self.jitter.is_zero() {
            let j = self.jitter.as_secs_f64();
            let offset = rng.random_range(-j..=j);
            delay = Duration::from_secs_f64((self.latency.as_secs_f64() + offset).max(0.0));
        }
        Some((now + delay).max(last))
    }
}

impl fmt::Display for Wan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(f, "{:.0} ms each way ({:.0} ms round trip)", ms(self.latency), 2.0 * ms(self.latency))?;
        if !self.jitter.is_zero() {
            write!(f, ", jitter ±{:.0} ms", ms(self.jitter))?;
        }
        if self.loss > 0.0 {
            write!(f, ", {}% loss", self.loss * 100.0)?;
        }
        Ok(())
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Attaches to the TUN device `name` (made by `ip tuntap add`) in this process's network namespace.
fn open_tun(name: &str) -> Result<OwnedFd> {
    anyhow::ensure!(name.len() < libc::IFNAMSIZ, "device name {name:?} is too long");
    // SAFETY: plain syscalls on a buffer we own; the fd is owned from here on.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &req) < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("attach to TUN device {name}"));
        }
        Ok(fd)
    }
}

/// A packet's flow: IPv4 source and destination, protocol, and for TCP and
/// UDP the ports (anything else, which the lab does not route across
/// regions, is one flow).
fn flow_of(packet: &[u8]) -> [u8; 13] {
    let mut key = [0u8; 13];
    if packet.len() >= 20 && packet[0] >> 4 == 4 {
        key[..8].copy_from_slice(&packet[12..20]);
        key[8] = packet[9];
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if matches!(packet[9], 6 | 17) && packet.len() >= ihl + 4 {
            key[9..13].copy_from_slice(&packet[ihl..ihl + 4]);
        }
    }
    key
}

/// A packet waiting in the relay: due time, then arrival order (so packets due
/// at the same instant leave in the order they came).
type Held = Reverse<(Instant, u64, Vec<u8>)>;

/// `meridian lab wan-relay`: runs until killed. One thread reads packets and
/// stamps each with its departure time, another writes them back when due.
pub fn relay(device: &str, wan: Wan) -> Result<()> {
    let fd = open_tun(device)?;
    let raw = fd.as_raw_fd();
    tracing::info!("WAN relay on {device}: {wan}");
    let (tx, rx) = mpsc::channel::<Held>();
    let writer = std::thread::Builder::new().name("wan-out".into()).spawn(move || {
        let mut queue: BinaryHeap<Held> = BinaryHeap::new();
        loop {
            let next = match queue.peek() {
                Some(Reverse((due, _, _))) => rx.recv_timeout(due.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(item) => queue.push(item),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
                let Reverse((_, _, packet)) = queue.pop().expect("checked");
                // SAFETY: writing a buffer we own to an fd that outlives this thread (held by `relay`).
                let n = unsafe { libc::write(raw, packet.as_ptr().cast(), packet.len()) };
                if n < 0 {
                    tracing::debug!("WAN relay: write: {}", std::io::Error::last_os_error());
                }
            }
        }
    })?;
    let mut rng = rand::rng();
    // When the last packet of each flow leaves; flows with nothing in flight are forgotten now and then.
    let mut last: HashMap<[u8; 13], Instant> = HashMap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            drop(tx);
            let _ = writer.join();
            bail!("WAN relay: read from {device}: {e}");
        }
        let now = Instant::now();
        let packet = &buf[..n as usize];
        if last.len() > 4096 {
            last.retain(|_, due| *due > now);
        }
        let flow = last.entry(flow_of(packet)).or_insert(now);
        if let Some(due) = wan.schedule(now, *flow, &mut rng) {
            *flow = due;
            seq += 1;
            if tx.send(Reverse((due, seq, packet.to_vec()))).is_err() {
                bail!("WAN relay: the writer thread stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_or_are_refused_with_the_reason() {
        let w = Wan::parse("40ms", Some("5ms"), Some("0.5%")).unwrap();
        assert_eq!(w, Wan { latency: Duration::from_millis(40), jitter: Duration::from_millis(5), loss: 0.005 });
        assert_eq!(w.to_string(), "40 ms each way (80 ms round trip), jitter ±5 ms, 0.5% loss");
        assert_eq!(Wan::parse("0ms", None, None).unwrap().latency, Duration::ZERO);
        for (latency, jitter, loss, why) in [
            ("forty", None, None, "not a duration"),
            ("-5ms", None, None, "not a duration"),
            ("3s", None, None, "at most 2s"),
            ("40ms", Some("50ms"), None, "must not exceed"),
            ("40ms", None, Some("0.5"), "percentage"),
            ("40ms", None, Some("abc%"), "percentage"),
            ("40ms", None, Some("60%"), "between 0% and 50%"),
            ("0s", None, Some("1%"), "need a --wan-latency"),
        ] {
            let e = Wan::parse(latency, jitter, loss).unwrap_err().to_string();
            assert!(e.contains(why), "{latency} {jitter:?} {loss:?}: {e}");
        }
    }

    #[test]
    fn packets_are_delayed_within_the_jitter_and_never_reordered() {
        let wan = Wan { latency: Duration::from_millis(40), jitter: Duration::from_millis(10), loss: 0.0 };
        let mut rng = rand::rng();
        let start = Instant::now();
        let mut last = start;
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 100);
            let due = wan.schedule(now, last, &mut rng).expect("no loss configured");
            assert!(due >= last, "packet {i} would overtake the one before it");
            assert!(due >= now + Duration::from_millis(30), "packet {i} left too early");
            last = due;
        }
        // Not held back more than the worst jitter beyond the last packet read.
        assert!(last <= start + Duration::from_micros(9_999 * 100) + Duration::from_millis(50));
    }

    #[test]
    fn a_packets_flow_is_its_addresses_protocol_and_ports() {
        let mut tcp = [0u8; 40];
        tcp[0] = 0x45;
        tcp[9] = 6;
        tcp[12..16].copy_from_slice(&[10, 42, 1, 11]);
        tcp[16..20].copy_from_slice(&[10, 42, 2, 11]);
        tcp[20..24].copy_from_slice(&[0xc3, 0x50, 0x15, 0x38]); // 50000 -> 5432
        assert_eq!(flow_of(&tcp), [10, 42, 1, 11, 10, 42, 2, 11, 6, 0xc3, 0x50, 0x15, 0x38]);
        let mut other = tcp;
        other[21] = 0x51;
        assert_ne!(flow_of(&tcp), flow_of(&other), "another source port, another flow");
        let mut icmp = tcp;
        icmp[9] = 1;
        assert_eq!(flow_of(&icmp)[9..], [0, 0, 0, 0], "no ports outside TCP and UDP");
        assert_eq!(flow_of(&tcp[..10]), [0; 13], "too short for a header");
        assert_eq!(flow_of(&[0x60; 40]), [0; 13], "IPv6");
    }

    #[test]
    fn the_configured_share_of_packets_is_lost() {
        let wan = Wan { latency: Duration::from_millis(1), jitter: Duration::ZERO, loss: 0.1 };
        let mut rng = rand::rng();
        let now = Instant::now();
        let lost = (0..100_000).filter(|_| wan.schedule(now, now, &mut rng).is_none()).count();
        // 10% of 100,000: the standard deviation is ~95, so ±1,000 never fails by chance.
        assert!((9_000..=11_000).contains(&lost), "{lost} of 100000 lost");
    }
}
