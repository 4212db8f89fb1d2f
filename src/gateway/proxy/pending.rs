//! Connections that have not yet sent their startup packet. Each is held for
//! at most the startup timeout; without a bound, one host opening sockets and
//! saying nothing (or trickling a byte at a time) would take every slot of
//! `max_client_conn` and lock every application out. So such connections are
//! counted apart, and limited per source address and in all; past either
//! limit a new connection is closed at once, before anything is read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections without a startup packet from one address at a time.
pub const PER_ADDRESS: usize = 32;
/// And from all addresses together.
pub const TOTAL: usize = 4096;

#[derive(Default)]
struct Counts {
    by_address: HashMap<IpAddr, usize>,
    total: usize,
}

/// The proxy port's count of connections without a startup packet.
#[derive(Clone, Default)]
pub struct Pending(Arc<Mutex<Counts>>);

/// One counted connection; uncounted when dropped.
pub struct Entry {
    pending: Pending,
    address: IpAddr,
}

impl Pending {
    /// Counts a new connection from `address`, or None past a limit.
    pub fn enter(&self, address: IpAddr) -> Option<Entry> {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let from_address = c.by_address.get(&address).copied().unwrap_or(0);
        if from_address >= PER_ADDRESS || c.total >= TOTAL {
            return None;
        }
        c.by_address.insert(address, from_address + 1);
        c.total += 1;
        Some(Entry { pending: self.clone(), address })
    }

    /// Connections counted now.
    pub fn total(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut c = self.pending.0.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_and_others_still_get_in() {
        let pending = Pending::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let held: Vec<Entry> = (0..PER_ADDRESS).map(|_| pending.enter(a).expect("within the share")).collect();
        assert!(pending.enter(a).is_none(), "past its share, an address is turned away");
        let other = pending.enter(b).expect("another address is not");
        assert_eq!(pending.total(), PER_ADDRESS + 1);
        drop(held);
        drop(other);
        assert_eq!(pending.total(), 0, "every entry is uncounted when it ends");
        assert!(pending.enter(a).is_some(), "and the address may come back");
    }
}
