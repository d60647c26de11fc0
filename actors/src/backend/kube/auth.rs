//! Who may speak for an instance on the pod network.
//!
//! A pod cannot use the runtime's Unix socket, so pods reach the kanban endpoint (AION's gRPC API) over the
//! network; that endpoint then admits a call for instance `svc`-`n` only when:
//! - it carries `svc`-`n`'s credential (`authorization: Bearer <token>` or `aion-token: <token>` metadata): the
//!   token is an HMAC-SHA256 of the project, service and instance under a key kept in the runtime's data
//!   directory, injected into that instance's pod from its own Secret (`AION_TOKEN`); or
//! - it comes from the pod IP that the API server reports for `svc`-`n`'s pod (AION's own client libraries send
//!   no credential; the pod network does not let one pod use another's IP).
//!
//! Anything else is refused (`PERMISSION_DENIED`) and counted: a pod cannot claim another instance.
//!
//! The trust boundary is the namespace: whoever may create pods in it can mount any instance's Secret (and so
//! its credential) or give a pod an instance's labels; the gate keeps the instances' pods apart, not the
//! namespace's administrators out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Length of the key that signs instance credentials.
const KEY_LEN: usize = 32;

/// The instance credentials of one runtime.
pub struct Tokens {
    key: ring::hmac::Key,
    project: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("project", &self.project).finish_non_exhaustive()
    }
}

impl Tokens {
    /// Loads the signing key from `path`, creating it (mode 0600) on first use.
    ///
    /// # Errors
    /// The file cannot be read or written, or holds something else than a key.
    pub fn load_or_create(path: &Path, project: &str) -> Result<Tokens, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; KEY_LEN];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                    .map_err(|_| "no randomness for the endpoint key".to_owned())?;
                crate::paths::write_private(path, &b).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                b
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        if bytes.len() != KEY_LEN {
            return Err(format!("{} is not an endpoint key ({} bytes, not {KEY_LEN})", path.display(), bytes.len()));
        }
        Ok(Tokens { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes), project: project.to_owned() })
    }

    fn message(&self, service: &str, instance: u32) -> Vec<u8> {
        format!("aion-instance\0{}\0{service}\0{instance}", self.project).into_bytes()
    }

    /// The credential of `service`-`instance`.
    pub fn token(&self, service: &str, instance: u32) -> String {
        crate::hex::hex(ring::hmac::sign(&self.key, &self.message(service, instance)).as_ref())
    }

    /// True if `token` is `service`-`instance`'s credential (constant time).
    pub fn verify(&self, service: &str, instance: u32, token: &str) -> bool {
        let token = token.trim();
        // (Only the length and the hex-ness are checked before the constant-time comparison: neither is secret.)
        let Some(tag) = (token.len() <= 128).then(|| crate::hex::unhex(token)).flatten() else { return false };
        ring::hmac::verify(&self.key, &self.message(service, instance), &tag).is_ok()
    }
}

/// Counters of the pod-network gate.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Calls admitted by credential.
    pub by_token: AtomicU64,
    /// Calls admitted by pod IP.
    pub by_pod_ip: AtomicU64,
    /// Calls refused.
    pub refused: AtomicU64,
}

/// The gate of the kanban endpoint on the pod network (see the module docs).
pub struct PodGate {
    tokens: Tokens,
    /// Pod IP → the instance whose pod has it (from the API server's pod watch).
    ips: RwLock<HashMap<IpAddr, (String, u32)>>,
    /// Counters.
    pub stats: GateStats,
}

impl PodGate {
    /// A gate over `tokens`, knowing no pod yet.
    pub fn new(tokens: Tokens) -> PodGate {
        PodGate { tokens, ips: RwLock::default(), stats: GateStats::default() }
    }

    /// The credentials.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Replaces what is known of pod IPs.
    pub fn set_pod_ips(&self, ips: HashMap<IpAddr, (String, u32)>) {
        *self.ips.write().unwrap_or_else(|p| p.into_inner()) = ips;
    }

    fn ip_owner(&self, ip: IpAddr) -> Option<(String, u32)> {
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
        self.ips.read().unwrap_or_else(|p| p.into_inner()).get(&ip.to_canonical()).cloned()
    }
}

impl crate::session::grpc::Gate for PodGate {
    fn admit(&self, service: &str, instance: u32, peer: Option<SocketAddr>, token: Option<&str>) -> Result<(), String> {
        if let Some(t) = token {
            if self.tokens.verify(service, instance, t) {
                self.stats.by_token.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!("the credential is not {service}-{instance}'s"));
        }
        let owner = peer.and_then(|p| self.ip_owner(p.ip()));
        match owner {
            Some((s, n)) if s == service && n == instance => {
                self.stats.by_pod_ip.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Some((s, n)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(format!("this pod is {s}-{n}'s, not {service}-{instance}'s"))
            }
            None => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(format!(
                    "no credential, and {} is not the IP of {service}-{instance}'s pod",
                    peer.map_or_else(|| "an unknown address".to_owned(), |p| p.ip().to_string())
                ))
            }
        }
    }

    fn admit_any(
        &self,
        peer: Option<SocketAddr>,
        token: Option<&str>,
        instances: &[(String, u32)],
    ) -> Result<(), String> {
        if let Some(t) = token {
            if instances.iter().any(|(s, n)| self.tokens.verify(s, *n, t)) {
                self.stats.by_token.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err("the credential is no instance's of this project".to_owned());
        }
        if peer.and_then(|p| self.ip_owner(p.ip())).is_some() {
            self.stats.by_pod_ip.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        Err("no credential, and not from a pod of this project".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::grpc::Gate;

    #[test]
    fn a_credential_opens_its_own_instance_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let t = Tokens::load_or_create(&path, "p").unwrap();
        let tok = t.token("a", 1);
        assert!(t.verify("a", 1, &tok));
        assert!(!t.verify("a", 2, &tok));
        assert!(!t.verify("b", 1, &tok));
        assert!(!t.verify("a", 1, "zz"));
        assert!(!t.verify("a", 1, ""));
        // The key is kept: the same credentials after a restart; another project's differ.
        assert_eq!(Tokens::load_or_create(&path, "p").unwrap().token("a", 1), tok);
        assert_ne!(Tokens::load_or_create(&path, "q").unwrap().token("a", 1), tok);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, b"short").unwrap();
        assert!(Tokens::load_or_create(&path, "p").err().unwrap().contains("not an endpoint key"));
    }

    #[test]
    fn the_gate_admits_by_credential_or_by_the_instance_pod_ip() {
        let dir = tempfile::tempdir().unwrap();
        let g = PodGate::new(Tokens::load_or_create(&dir.path().join("key"), "p").unwrap());
        let a1: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b1: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        g.set_pod_ips(HashMap::from([(a1.ip(), ("a".to_owned(), 1)), (b1.ip(), ("b".to_owned(), 1))]));
        assert!(g.admit("a", 1, Some(a1), None).is_ok());
        assert!(g.admit("b", 1, Some(a1), None).unwrap_err().contains("a-1's, not b-1's"));
        let stranger: SocketAddr = "10.9.9.9:1".parse().unwrap();
        assert!(g.admit("a", 1, Some(stranger), None).is_err());
        let tok = g.tokens().token("a", 2);
        assert!(g.admit("a", 2, Some(stranger), Some(&tok)).is_ok());
        assert!(g.admit("a", 1, Some(stranger), Some(&tok)).is_err(), "a-2's credential does not open a-1");
        assert!(g.admit("a", 1, Some(a1), Some("00")).is_err(), "a wrong credential is refused even from the pod");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
        assert!(g.admit("a", 1, Some(mapped), None).is_ok(), "an IPv4-mapped address is its IPv4 address");
        let all = [("a".to_owned(), 1), ("a".to_owned(), 2), ("b".to_owned(), 1)];
        assert!(g.admit_any(Some(b1), None, &all).is_ok());
        assert!(g.admit_any(Some(stranger), None, &all).is_err());
        assert!(g.admit_any(Some(stranger), Some(&tok), &all).is_ok());
        assert!(g.admit_any(Some(stranger), Some(&tok), &all[..1]).is_err());
        assert_eq!(g.stats.refused.load(Ordering::Relaxed), 6);
    }
}
