//! Virtual IPs for transparent mode: the sidecar's DNS answers each known
//! service with an address of its own in 240.240.0.0/16 (reserved space,
//! never routed), so that a connection redirected to the sidecar says, by
//! where it was going, which service it is for: opaque TCP included, and
//! several services on one port. Allocation is a pure function of the
//! service names, stable as services come and go (a name keeps its
//! address unless it collides with one sorted before it).

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
    pub fn allocate<'a>(keys: impl IntoIterator<Item = &'a ServiceKey>) -> Self {
        let mut keys: Vec<&ServiceKey> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        let mut v = Vips::default();
        for key in keys.into_iter().take(SIZE as usize) {
            let mut slot = fnv1a(&key.to_string()) % SIZE;
            loop {
                let ip = Ipv4Addr::from(BASE + 1 + slot);
                if let std::collections::hash_map::Entry::Vacant(e) = v.by_ip.entry(ip) {
                    e.insert(key.clone());
                    v.by_key.insert(key.clone(), ip);
                    break;
                }
                slot = (slot + 1) % SIZE;
            }
        }
        v
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
        let v = Vips::allocate([&echo, &db]);
        let ip = v.ip_of(&echo).unwrap();
        assert_eq!(ip.octets()[..2], [240, 240]);
        assert_ne!(v.ip_of(&db), Some(ip));
        assert_eq!(v.service_at(IpAddr::V4(ip)), Some(&echo));
        // Another service arriving does not move the others.
        let other = ServiceKey::new("shop", "cart");
        let w = Vips::allocate([&echo, &db, &other]);
        assert_eq!(w.ip_of(&echo), Some(ip));
        assert_eq!(v.service_at("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn collisions_are_resolved_not_shared() {
        let keys: Vec<ServiceKey> = (0..5000).map(|i| ServiceKey::new("ns", format!("s{i}"))).collect();
        let v = Vips::allocate(&keys);
        let mut ips: Vec<Ipv4Addr> = keys.iter().map(|k| v.ip_of(k).unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), keys.len());
        assert!(ips.iter().all(|ip| *ip != Ipv4Addr::new(240, 240, 0, 0)));
    }
}
