//! Virtual IPs for transparent mode: the sidecar's DNS answers each known
//! service with an address of its own in 240.240.0.0/16 (reserved space,
//! never routed), so that a connection redirected to the sidecar says, by
//! where it was going, which service it is for: opaque TCP included, and
//! several services on one port. A name's address is a hash of it (the
//! next free one on a collision), given when the sidecar first learns the
//! service and kept while it runs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use isthmus_core::naming::ServiceKey;

/// The first address of the range (240.240.0.0/16).
const BASE: u32 = u32::from_be_bytes([240, 240, 0, 0]);
/// Addresses in the range, less .0.0 and .255.255.
const SIZE: u32 = 65_534;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vips {
    by_ip: HashMap<Ipv4Addr, ServiceKey>,
    by_key: HashMap<ServiceKey, Ipv4Addr>,
}

/// FNV-1a: a hash that stays the same across builds and platforms.
fn fnv1a(s: &str) -> u32 {
    s.bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

impl Vips {
    /// These addresses plus one for each new key in `keys`: an address
    /// once given stays while the sidecar runs (services are learned one
    /// at a time, and a client may hold an answer for its TTL).
    pub fn extended(&self, keys: &[ServiceKey]) -> Self {
        let mut v = self.clone();
        let mut new: Vec<&ServiceKey> = keys.iter().filter(|k| !v.by_key.contains_key(*k)).collect();
        if new.is_empty() {
            return v;
        }
        new.sort();
        new.dedup();
        for key in new {
            if v.by_key.len() >= SIZE as usize {
                break;
            }
            v.insert(key);
        }
        v
    }

    fn insert(&mut self, key: &ServiceKey) {
        let mut slot = fnv1a(&key.to_string()) % SIZE;
        loop {
            let ip = Ipv4Addr::from(BASE + 1 + slot);
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_ip.entry(ip) {
                e.insert(key.clone());
                self.by_key.insert(key.clone(), ip);
                return;
            }
            slot = (slot + 1) % SIZE;
        }
    }

    pub fn ip_of(&self, key: &ServiceKey) -> Option<Ipv4Addr> {
        self.by_key.get(key).copied()
    }

    pub fn service_at(&self, ip: IpAddr) -> Option<&ServiceKey> {
        match ip {
            IpAddr::V4(v4) => self.by_ip.get(&v4),
            IpAddr::V6(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_gets_its_own_stable_address() {
        let echo = ServiceKey::new("demo", "echo");
        let db = ServiceKey::new("demo", "db");
        let v = Vips::default().extended(&[echo.clone(), db.clone()]);
        let ip = v.ip_of(&echo).unwrap();
        assert_eq!(ip.octets()[..2], [240, 240]);
        assert_ne!(v.ip_of(&db), Some(ip));
        assert_eq!(v.service_at(IpAddr::V4(ip)), Some(&echo));
        // Another service arriving does not move the others.
        let other = ServiceKey::new("shop", "cart");
        let w = v.extended(&[other.clone(), echo.clone()]);
        assert_eq!(w.ip_of(&echo), Some(ip));
        assert!(w.ip_of(&other).is_some());
        assert_eq!(v.service_at("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn collisions_are_resolved_not_shared() {
        let keys: Vec<ServiceKey> = (0..5000).map(|i| ServiceKey::new("ns", format!("s{i}"))).collect();
        let v = Vips::default().extended(&keys);
        // Learned one at a time, each keeps the address it was given.
        let mut one_by_one = Vips::default();
        for k in &keys[..100] {
            let before = one_by_one.clone();
            one_by_one = one_by_one.extended(std::slice::from_ref(k));
            assert!(before.by_key.iter().all(|(k, ip)| one_by_one.ip_of(k) == Some(*ip)));
        }
        let mut ips: Vec<Ipv4Addr> = keys.iter().map(|k| v.ip_of(k).unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), keys.len());
        assert!(ips.iter().all(|ip| *ip != Ipv4Addr::new(240, 240, 0, 0)));
    }
}
