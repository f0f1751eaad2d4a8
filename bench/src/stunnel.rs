//! The baseline: a stunnel pair, a mutual-TLS TCP tunnel built from a
//! standard tool. Plain TCP in at the client end, TLS 1.3 with client
//! certificates between the two, plain TCP out to the server. Keys are
//! ECDSA P-256 like the mesh's, so both pay for the same handshakes.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct Stunnel {
    pub entry: SocketAddr,
    pub client: Child,
    pub server: Child,
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        for c in [&mut self.client, &mut self.server] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA, and a client and a server certificate it signs (names `client`
/// and `server`): `ca.pem`, `<name>.pem`, `<name>.key` in `dir`. The
/// baselines' ends authenticate each other with them.
pub fn certs(dir: &Path) -> anyhow::Result<()> {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = KeyPair::generate_for(alg)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf whose issuer is its own subject
    // for self-signed.
    ca.distinguished_name
        .push(DnType::CommonName, "isthmus-bench baseline CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_ca_cert_der(ca_cert.der(), &ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    for name in ["client", "server"] {
        let key = KeyPair::generate_for(alg)?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(())
}

/// A port free on `ip` now; stunnel cannot be told to bind port 0 and
/// report it, so this is the one place the harness picks a port.
pub fn free_port(ip: &str) -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?)
}

pub fn binary() -> Option<&'static str> {
    ["/usr/bin/stunnel4", "/usr/bin/stunnel"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

pub fn start(dir: &Path, ip_client: &str, ip_server: &str, upstream: SocketAddr) -> anyhow::Result<Stunnel> {
    start_via(dir, ip_client, ip_server, upstream, Ok)
}

/// As `start`, with the client end dialling `via(middle)` instead of the
/// server end's address `middle` (a relay that adds delay).
pub fn start_via(
    dir: &Path,
    ip_client: &str,
    ip_server: &str,
    upstream: SocketAddr,
    via: impl FnOnce(SocketAddr) -> anyhow::Result<SocketAddr>,
) -> anyhow::Result<Stunnel> {
    let bin = binary().context("stunnel is not installed (apt-get install stunnel4)")?;
    certs(dir)?;
    let entry = free_port(ip_client)?;
    let middle = free_port(ip_server)?;
    let hop = via(middle)?;
    let d = dir.display();
    let common =
        "foreground = yes\npid =\nsyslog = no\ndebug = warning\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let client = format!(
        "{common}[tunnel]\nclient = yes\naccept = {entry}\nconnect = {hop}\ncert = {d}/client.pem\n\
         key = {d}/client.key\nCAfile = {d}/ca.pem\nverifyChain = yes\ncheckHost = server\nsslVersionMin = TLSv1.3\n"
    );
    let server = format!(
        "{common}[tunnel]\naccept = {middle}\nconnect = {upstream}\ncert = {d}/server.pem\nkey = {d}/server.key\n\
         CAfile = {d}/ca.pem\nverifyChain = yes\nrequireCert = yes\ncheckHost = client\nsslVersionMin = TLSv1.3\n"
    );
    let spawn = |name: &str, conf: String| -> anyhow::Result<Child> {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        Ok(Command::new(bin)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    };
    let server = spawn("stunnel-server", server)?;
    let client = spawn("stunnel-client", client)?;
    let tunnel = Stunnel { entry, client, server };
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in [middle, entry] {
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "stunnel did not start: {}",
                    std::fs::read_to_string(dir.join("stunnel-client.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(tunnel)
}
