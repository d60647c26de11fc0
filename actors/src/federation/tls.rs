//! The cluster's certificates: a CA made by `aion cluster init`, node identities it signs (`aion cluster issue`,
//! or the master at a worker's join), a revocation list (`aion cluster remove`), and the mutual-TLS
//! configurations of federation links built from them (TLS 1.3 only, ring provider, peers checked against the
//! cluster CA alone: no system roots).
//!
//! Layout under `<data dir>/cluster/`:
//! - `ca.pem`: the CA certificate (every device has it);
//! - `ca.key`: the CA's private key (only where certificates are issued; owner-only);
//! - `node.pem`, `node.key`, `node.name`: this device's certificate, key (owner-only), and the name it was
//!   issued for;
//! - `crl.pem`: revoked certificates (optional; peers named there are refused);
//! - `issued/<name>.serial`: the serial of each certificate issued (on the CA's device, to revoke it).

use crate::hex::{hex, unhex};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a node certificate is valid. Renewal: issue again (the master renews its workers' before expiry).
pub const NODE_CERT_DAYS: i64 = 365;
/// How long the CA is valid.
pub const CA_DAYS: i64 = 3650;

/// Errors handling the cluster's certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Certificate material is missing, malformed or inconsistent.
    #[error("{0}")]
    Bad(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |e| TlsError::Io(path.display().to_string(), e)
}

fn bad(what: impl std::fmt::Display) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |e| TlsError::Bad(format!("{what}: {e}"))
}

/// The files of a data dir's cluster identity.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    /// `<data dir>/cluster`.
    pub root: PathBuf,
}

impl ClusterDir {
    /// The cluster directory of a data dir.
    pub fn new(data_dir: &Path) -> ClusterDir {
        ClusterDir { root: data_dir.join("cluster") }
    }
    /// `ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// `node.pem`.
    pub fn node_cert(&self) -> PathBuf {
        self.root.join("node.pem")
    }
    /// `node.key`.
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// `node.name`.
    pub fn node_name(&self) -> PathBuf {
        self.root.join("node.name")
    }
    /// `crl.pem`.
    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
    }
    /// `issued/`.
    pub fn issued(&self) -> PathBuf {
        self.root.join("issued")
    }
    /// True when this data dir has a node identity.
    pub fn has_identity(&self) -> bool {
        self.node_cert().exists() && self.node_key().exists() && self.ca_cert().exists()
    }
    /// True when this data dir holds the CA's key (it can issue certificates).
    pub fn is_ca(&self) -> bool {
        self.ca_key().exists()
    }
}

/// Checks that `name` can be a device's certificate name (a DNS-style name: letters, digits, `-`, `_`, `.`).
///
/// # Errors
/// Why it cannot.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    if name.ends_with(ADMIN_SUFFIX) {
        return Err(TlsError::Bad(format!(
            "`{name}`: names ending in `{ADMIN_SUFFIX}` are admin identities, not devices"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(['-', '.'])
        && ServerName::try_from(name).is_ok();
    if ok {
        Ok(())
    } else {
        Err(TlsError::Bad(format!(
            "`{name}` cannot name a device in a certificate: use 1-63 letters, digits, `-`, `_` or `.`, not starting with `-` or `.`"
        )))
    }
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn serial() -> Result<SerialNumber, TlsError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| TlsError::Bad(format!("no randomness for a serial number: {e}")))?;
    b[0] &= 0x7f;
    b[0] |= 0x01; // positive and 16 bytes long
    Ok(SerialNumber::from_slice(&b))
}

/// The CA's parameters: fixed except the validity, so the CA can sign again from its key alone.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "aion cluster CA");
    dn.push(DnType::OrganizationName, "aion");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    crate::paths::write_private(path, data.as_bytes()).map_err(io(path))
}

fn write_public(path: &Path, data: &str) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))
}

/// Creates the cluster CA in `dir` (refused if one is there) and this device's identity as `name`.
///
/// # Errors
/// A CA already exists, the name is unusable, or a file cannot be written.
pub fn init(dir: &ClusterDir, name: &str) -> Result<(), TlsError> {
    check_name(name)?;
    if dir.ca_cert().exists() || dir.ca_key().exists() {
        return Err(TlsError::Bad(format!(
            "{} already holds a cluster CA: a second one would split the cluster (remove the directory to start over)",
            dir.root.display()
        )));
    }
    create_dir(&dir.root)?;
    let key = KeyPair::generate().map_err(bad("generating the CA key"))?;
    let mut p = ca_params();
    p.serial_number = Some(serial()?);
    p.not_before = now() - Duration::from_secs(300);
    p.not_after = now() + time::Duration::days(CA_DAYS);
    let cert = p.self_signed(&key).map_err(bad("signing the CA"))?;
    write_private(&dir.ca_key(), &key.serialize_pem())?;
    write_public(&dir.ca_cert(), &cert.pem())?;
    let id = issue(dir, name)?;
    install(dir, &id)
}

/// A node identity: its certificate and key (PEM), the CA's certificate, and the name.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The device name it was issued for.
    pub name: String,
    /// The certificate (PEM).
    pub cert: String,
    /// The private key (PEM).
    pub key: String,
    /// The CA certificate (PEM).
    pub ca: String,
}

/// Issues an identity for device `name`, signed by the CA in `dir` (which must hold `ca.key`), and records its
/// serial (to revoke it later).
///
/// # Errors
/// No CA key here, an unusable name, or a file that cannot be read or written.
pub fn issue(dir: &ClusterDir, name: &str) -> Result<Identity, TlsError> {
    check_name(name)?;
    issue_named(dir, name, false)
}

/// What admin identities' names end with (`aion cluster issue NAME --admin`): no device can be named so.
pub const ADMIN_SUFFIX: &str = ".aion-admin";

/// Issues an admin identity for `name` (a person or a tool administering the cluster from elsewhere: `aion
/// --remote ADDR apply …`): its certificate names `<name>.aion-admin`, for client authentication only; revoked as
/// that name (`aion cluster remove <name>.aion-admin`).
///
/// # Errors
/// As [`issue`].
pub fn issue_admin(dir: &ClusterDir, name: &str) -> Result<Identity, TlsError> {
    check_name(name)?;
    let full = format!("{name}{ADMIN_SUFFIX}");
    if full.len() > 63 {
        return Err(TlsError::Bad(format!(
            "`{name}` is too long for an admin name (at most {} characters)",
            63 - ADMIN_SUFFIX.len()
        )));
    }
    issue_named(dir, &full, true)
}

fn issue_named(dir: &ClusterDir, name: &str, admin: bool) -> Result<Identity, TlsError> {
    let ca_key_pem = std::fs::read_to_string(dir.ca_key()).map_err(|e| {
        TlsError::Bad(format!(
            "{}: {e}: certificates are issued where the cluster CA is (`aion cluster init` made it)",
            dir.ca_key().display()
        ))
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(bad("reading the CA key"))?;
    let ca = std::fs::read_to_string(dir.ca_cert()).map_err(io(&dir.ca_cert()))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate().map_err(bad("generating the node key"))?;
    let mut p = node_params(name)?;
    if admin {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = p.signed_by(&key, &issuer).map_err(bad("signing the node certificate"))?;
    record_serial(dir, name, &p)?;
    Ok(Identity { name: name.to_owned(), cert: cert.pem(), key: key.serialize_pem(), ca })
}

/// Records the serial of a certificate issued for `name` (every one, renewals included: revoking a name revokes
/// them all).
fn record_serial(dir: &ClusterDir, name: &str, p: &CertificateParams) -> Result<(), TlsError> {
    use std::io::Write;
    create_dir(&dir.issued())?;
    let Some(sn) = &p.serial_number else { return Ok(()) };
    let path = dir.issued().join(format!("{name}.serial"));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
    f.write_all(format!("{}\n", hex(sn.as_ref())).as_bytes()).map_err(io(&path))
}

/// The parameters of a node certificate for `name`: valid [`NODE_CERT_DAYS`], for both ends of a link.
fn node_params(name: &str) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![name.to_owned()]).map_err(bad(format!("device name `{name}`")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.serial_number = Some(serial()?);
    p.not_before = now() - Duration::from_secs(300);
    p.not_after = now() + time::Duration::days(NODE_CERT_DAYS);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Installs `id` as the identity of the data dir whose cluster directory is `dir` (with the current revocation
/// list of `from`, if given).
///
/// # Errors
/// A file cannot be written.
pub fn install(dir: &ClusterDir, id: &Identity) -> Result<(), TlsError> {
    create_dir(&dir.root)?;
    write_public(&dir.ca_cert(), &id.ca)?;
    write_private(&dir.node_key(), &id.key)?;
    write_public(&dir.node_cert(), &id.cert)?;
    write_public(&dir.node_name(), &format!("{}\n", id.name))?;
    // When it expires (Unix seconds), so that it is renewed in time (a certificate is issued for NODE_CERT_DAYS).
    let expires = now() + time::Duration::days(NODE_CERT_DAYS);
    write_public(&dir.root.join("node.expires"), &format!("{}\n", expires.unix_timestamp()))
}

/// Seconds until this device's certificate expires (`None`: unknown, an identity made before this was recorded).
pub fn expires_in(dir: &ClusterDir) -> Option<i64> {
    let t: i64 = std::fs::read_to_string(dir.root.join("node.expires")).ok()?.trim().parse().ok()?;
    Some(t - now().unix_timestamp())
}

/// A certificate is renewed when it has less than this left (seconds): 30 days.
pub const RENEW_BEFORE_SECS: i64 = 30 * 86_400;

/// Installs a renewed certificate with its new key.
///
/// # Errors
/// A file cannot be written.
pub fn install_renewed(dir: &ClusterDir, cert: &str, key: &str) -> Result<(), TlsError> {
    let name = std::fs::read_to_string(dir.node_name()).map_err(io(&dir.node_name()))?.trim().to_owned();
    let ca = std::fs::read_to_string(dir.ca_cert()).map_err(io(&dir.ca_cert()))?;
    install(dir, &Identity { name, cert: cert.to_owned(), key: key.to_owned(), ca })
}

/// Revokes the certificate issued for `name`: adds its serial to the CA's revocation list (`crl.pem`, re-signed).
/// Returns the new list (PEM) to hand to the peers.
///
/// # Errors
/// No CA key here, nothing issued for `name`, or a file that cannot be read or written.
pub fn revoke(dir: &ClusterDir, name: &str) -> Result<String, TlsError> {
    let serial_file = dir.issued().join(format!("{name}.serial"));
    let text = std::fs::read_to_string(&serial_file).map_err(|e| {
        TlsError::Bad(format!("no certificate was issued here for `{name}` ({}: {e})", serial_file.display()))
    })?;
    let revoked_file = dir.root.join("revoked");
    let mut serials: Vec<String> =
        std::fs::read_to_string(&revoked_file).unwrap_or_default().lines().map(str::to_owned).collect();
    for s in text.lines().map(str::trim).filter(|s| !s.is_empty()) {
        if !serials.iter().any(|x| x == s) {
            serials.push(s.to_owned());
        }
    }
    let ca_key_pem = std::fs::read_to_string(dir.ca_key()).map_err(io(&dir.ca_key()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(bad("reading the CA key"))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let revoked_certs = serials
        .iter()
        .filter_map(|h| unhex(h))
        .map(|b| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&b),
            revocation_time: now(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now() - Duration::from_secs(60),
        next_update: now() + time::Duration::days(CA_DAYS),
        crl_number: SerialNumber::from(serials.len() as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(bad("signing the revocation list"))?;
    let pem = crl.pem().map_err(bad("encoding the revocation list"))?;
    write_public(&revoked_file, &(serials.join("\n") + "\n"))?;
    write_public(&dir.crl(), &pem)?;
    Ok(pem)
}

/// SHA-256, hex.
fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn random_hex(n: usize) -> Result<String, TlsError> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).map_err(|e| TlsError::Bad(format!("no randomness: {e}")))?;
    Ok(hex(&b))
}

/// The pin of the cluster CA in `dir`: the first 16 bytes (hex) of the SHA-256 of its certificate (DER).
///
/// # Errors
/// No readable CA certificate.
pub fn ca_pin(dir: &ClusterDir) -> Result<String, TlsError> {
    let der = CertificateDer::from_pem_file(dir.ca_cert())
        .map_err(|e| TlsError::Bad(format!("{}: {e}", dir.ca_cert().display())))?;
    Ok(sha256_hex(der.as_ref())[..32].to_owned())
}

/// A join token's parts: `aion1:<id>:<secret>:<CA pin>:<master name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Which token.
    pub id: String,
    /// Its secret.
    pub secret: String,
    /// The cluster CA's pin (the worker checks the master against it before trusting anything).
    pub pin: String,
    /// The master's device name (the name its certificate carries).
    pub master: String,
}

impl Token {
    /// Parses a token as `aion cluster token` printed it.
    ///
    /// # Errors
    /// Not a token.
    pub fn parse(s: &str) -> Result<Token, TlsError> {
        let bad = || {
            TlsError::Bad("not a join token (expected aion1:… as printed by `aion cluster token` on the master)".into())
        };
        let mut it = s.trim().splitn(5, ':');
        if it.next() != Some("aion1") {
            return Err(bad());
        }
        let mut part = || it.next().filter(|p| !p.is_empty()).map(str::to_owned).ok_or_else(bad);
        Ok(Token { id: part()?, secret: part()?, pin: part()?, master: part()? })
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "aion1:{}:{}:{}:{}", self.id, self.secret, self.pin, self.master)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredToken {
    id: String,
    /// SHA-256 of the secret (the secret itself is not kept).
    hash: String,
    expires_ms: u64,
    used: bool,
}

/// Runs `f` on the stored tokens under an exclusive lock of the file (the CLI mints while the master consumes).
fn with_tokens<R>(
    dir: &ClusterDir,
    f: impl FnOnce(&mut Vec<StoredToken>) -> Result<R, TlsError>,
) -> Result<R, TlsError> {
    use std::io::{Read, Seek, Write};
    let path = dir.root.join("tokens.json");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    let lock = nix::fcntl::Flock::lock(file.try_clone().map_err(io(&path))?, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| TlsError::Io(path.display().to_string(), e.into()))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io(&path))?;
    let mut tokens: Vec<StoredToken> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&text).map_err(|e| TlsError::Bad(format!("{}: {e}", path.display())))?
    };
    let r = f(&mut tokens)?;
    // Expired and used tokens are forgotten after a day.
    let now = super::wall_ms();
    tokens.retain(|t| t.expires_ms + 86_400_000 > now);
    let out = serde_json::to_string(&tokens).map_err(|e| TlsError::Bad(e.to_string()))?;
    file.set_len(0).map_err(io(&path))?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io(&path))?;
    file.write_all(out.as_bytes()).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    drop(lock);
    Ok(r)
}

/// Mints a single-use join token valid for `ttl`, for the master `master` whose CA is in `dir`.
///
/// # Errors
/// No CA here, or the token file cannot be written.
pub fn mint_token(dir: &ClusterDir, master: &str, ttl: std::time::Duration) -> Result<Token, TlsError> {
    if !dir.is_ca() {
        return Err(TlsError::Bad(format!(
            "{} holds no cluster CA: tokens are minted on the master (`aion cluster init`)",
            dir.root.display()
        )));
    }
    let t = Token { id: random_hex(4)?, secret: random_hex(16)?, pin: ca_pin(dir)?, master: master.to_owned() };
    let stored = StoredToken {
        id: t.id.clone(),
        hash: sha256_hex(t.secret.as_bytes()),
        expires_ms: super::wall_ms() + ttl.as_millis() as u64,
        used: false,
    };
    with_tokens(dir, |v| {
        v.push(stored);
        Ok(())
    })?;
    Ok(t)
}

/// Uses up token `id` if `secret` is its secret and it is neither expired nor used.
///
/// # Errors
/// Why the token is refused (unknown, wrong secret, expired, used).
pub fn consume_token(dir: &ClusterDir, id: &str, secret: &str) -> Result<(), TlsError> {
    let hash = sha256_hex(secret.as_bytes());
    with_tokens(dir, |v| {
        let t = v.iter_mut().find(|t| t.id == id).ok_or_else(|| TlsError::Bad("unknown join token".into()))?;
        // Digests of equal length compared in constant time.
        let differ =
            t.hash.len() != hash.len() || t.hash.bytes().zip(hash.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0;
        if differ {
            return Err(TlsError::Bad("wrong join token secret".into()));
        }
        if t.used {
            return Err(TlsError::Bad("join token already used (tokens are single-use)".into()));
        }
        if t.expires_ms <= super::wall_ms() {
            return Err(TlsError::Bad("join token expired".into()));
        }
        t.used = true;
        Ok(())
    })
}

/// A public key sent by a joining worker (ECDSA P-256, uncompressed point).
struct RawKey(Vec<u8>);

impl rcgen::PublicKeyData for RawKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Issues a certificate for device `name` on a public key the CA never sees the private half of (a joining
/// worker's): returns the certificate and the CA (PEM).
///
/// # Errors
/// No CA key, an unusable name, or a key that is not an ECDSA P-256 point.
pub fn issue_for_key(dir: &ClusterDir, name: &str, public_key: &[u8]) -> Result<(String, String), TlsError> {
    check_name(name)?;
    if public_key.len() != 65 || public_key[0] != 4 {
        return Err(TlsError::Bad("the public key is not an ECDSA P-256 point".into()));
    }
    let ca_key_pem = std::fs::read_to_string(dir.ca_key()).map_err(io(&dir.ca_key()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(bad("reading the CA key"))?;
    let ca = std::fs::read_to_string(dir.ca_cert()).map_err(io(&dir.ca_cert()))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let p = node_params(name)?;
    let cert = p.signed_by(&RawKey(public_key.to_vec()), &issuer).map_err(bad("signing the node certificate"))?;
    record_serial(dir, name, &p)?;
    Ok((cert.pem(), ca))
}

/// A new key pair for a joining worker: the private key (PEM) and the public point to send.
///
/// # Errors
/// No randomness.
pub fn new_key() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate().map_err(bad("generating a key"))?;
    Ok((key.serialize_pem(), key.public_key_raw().to_vec()))
}

/// Checks the master's certificate during a join, before the worker has the CA: the chain the master sends must
/// hold a CA whose pin is the token's, and the certificate must be that CA's and name the master.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()).starts_with(&self.pin))
            .ok_or_else(|| rustls::Error::General("the master's CA is not the one the join token pins".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC client configuration of a join: no client certificate (the token is the credential), the master
/// checked against the token's CA pin.
///
/// # Errors
/// A TLS configuration error.
pub fn join_client(pin: &str) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin: pin.to_owned(), provider }))
        .with_no_client_auth();
    c.alpn_protocols = vec![aion_transport::federation::ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(c).map_err(|e| TlsError::Bad(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(q)))
}

/// This device's loaded identity and the TLS configurations of its links.
pub struct Tls {
    /// The name in its certificate.
    pub name: String,
    /// Accepts links: the peer must present a certificate of the cluster CA, not revoked.
    pub server: quinn::ServerConfig,
    /// Dials links: the server must present a certificate of the cluster CA naming the dialled device.
    pub client: quinn::ClientConfig,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the identity in `dir` and builds the link configurations.
///
/// # Errors
/// Missing or malformed files (the message says which and what to run).
pub fn load(dir: &ClusterDir, timing: &aion_transport::federation::Timing) -> Result<Tls, TlsError> {
    if !dir.has_identity() {
        return Err(TlsError::Bad(format!(
            "{} has no cluster identity: run `aion cluster init --name NAME` on the first device, and `aion cluster issue NAME --out DATA_DIR` there for each other device",
            dir.root.display()
        )));
    }
    let name = std::fs::read_to_string(dir.node_name()).map_err(io(&dir.node_name()))?.trim().to_owned();
    let pem_err = |p: PathBuf| move |e: rustls::pki_types::pem::Error| TlsError::Bad(format!("{}: {e}", p.display()));
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.ca_cert())
        .map_err(pem_err(dir.ca_cert()))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(dir.ca_cert()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.node_cert())
        .map_err(pem_err(dir.node_cert()))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(dir.node_cert()))?;
    let key = PrivateKeyDer::from_pem_file(dir.node_key()).map_err(pem_err(dir.node_key()))?;
    let crls: Vec<CertificateRevocationListDer<'static>> = if dir.crl().exists() {
        CertificateRevocationListDer::pem_file_iter(dir.crl())
            .map_err(pem_err(dir.crl()))?
            .collect::<Result<_, _>>()
            .map_err(pem_err(dir.crl()))?
    } else {
        Vec::new()
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca_chain = ca.clone();
    for c in ca {
        roots.add(c).map_err(|e| TlsError::Bad(format!("{}: {e}", dir.ca_cert().display())))?;
    }
    let roots = Arc::new(roots);
    let tls_err = |what: &'static str| move |e: rustls::Error| TlsError::Bad(format!("{what}: {e}"));
    let mut verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).with_crls(crls.clone());
    if dir.is_ca() {
        // The master takes joins: a connection without a certificate may only present a join token.
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Bad(format!("client verifier: {e}")))?;
    // The CA goes with this device's certificate: a joining worker checks it against its token's pin.
    let mut server_chain = chain.clone();
    server_chain.extend(ca_chain);
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, key.clone_key())
        .map_err(tls_err("this device's certificate"))?;
    server.alpn_protocols = vec![aion_transport::federation::ALPN.to_vec()];
    let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Bad(format!("server verifier: {e}")))?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("this device's certificate"))?;
    client.alpn_protocols = vec![aion_transport::federation::ALPN.to_vec()];
    let mut transport = quinn::TransportConfig::default();
    // Our heartbeats find a lost peer first; QUIC's idle timeout is the backstop.
    // (The timing is in microseconds.)
    let idle = Duration::from_micros(timing.dead_after.saturating_mul(2).max(2_000_000));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    transport.keep_alive_interval(Some(Duration::from_micros(timing.ping_every.max(100_000))));

    let transport = Arc::new(transport);
    let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|e| TlsError::Bad(format!("QUIC server config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| TlsError::Bad(format!("QUIC client config: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);
    Ok(Tls { name, server, client })
}

/// Checks that the end-entity certificate `der` names device `name`.
///
/// # Errors
/// Why not.
pub fn names(der: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let server_name = ServerName::try_from(name).map_err(|e| format!("`{name}` is not a certificate name: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name).map_err(|_| format!("the certificate does not name `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_revoke_and_load() {
        let d = tempfile::tempdir().expect("tmp");
        let ca = ClusterDir::new(d.path());
        init(&ca, "master").expect("init");
        assert!(init(&ca, "master").is_err(), "a second CA is refused");
        let tls = load(&ca, &Default::default()).expect("load");
        assert_eq!(tls.name, "master");
        let w = tempfile::tempdir().expect("tmp");
        let wdir = ClusterDir::new(w.path());
        let id = issue(&ca, "worker-1").expect("issue");
        install(&wdir, &id).expect("install");
        assert!(load(&wdir, &Default::default()).is_ok());
        assert!(!wdir.is_ca());
        let der = CertificateDer::from_pem_slice(id.cert.as_bytes()).expect("pem");
        assert!(names(&der, "worker-1").is_ok());
        assert!(names(&der, "worker-2").is_err());
        let crl = revoke(&ca, "worker-1").expect("revoke");
        assert!(crl.contains("X509 CRL"));
        assert!(revoke(&ca, "nobody").is_err());
        assert!(load(&ca, &Default::default()).is_ok(), "loads with a revocation list");
        assert!(issue(&wdir, "x").is_err(), "no CA key on the worker");
    }

    #[test]
    fn names_must_fit_a_certificate() {
        for ok in ["master", "worker-1", "edge_2", "a.b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a b", "é", ".x", &"x".repeat(64), "alice.aion-admin"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
