//! The L7 peer: two HAProxy instances in HTTP mode, the shape of a sidecar
//! pair built from the most trusted C proxy. The client-side instance
//! takes plain HTTP/1.1 from the load generator and sends it on over
//! HTTP/2 with mutual TLS (TLS 1.3, ECDSA P-256 like the mesh) and
//! connection reuse to the server-side instance, which passes it to the
//! server in plain HTTP/1.1. One thread each, as a sidecar runs.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Haproxy {
    pub entry: SocketAddr,
    pub client: Child,
    pub server: Child,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        for c in [&mut self.client, &mut self.server] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn binary() -> Option<&'static str> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

pub fn start(dir: &Path, ip_client: &str, ip_server: &str, upstream: SocketAddr) -> anyhow::Result<Haproxy> {
    let bin = binary().context("haproxy is not installed (apt-get install haproxy)")?;
    crate::stunnel::certs(dir)?;
    // HAProxy takes a certificate and its key from one file.
    for name in ["client", "server"] {
        let pem = std::fs::read_to_string(dir.join(format!("{name}.pem")))?;
        let key = std::fs::read_to_string(dir.join(format!("{name}.key")))?;
        std::fs::write(dir.join(format!("{name}.crt-key.pem")), format!("{pem}{key}"))?;
    }
    let entry = crate::stunnel::free_port(ip_client)?;
    let middle = crate::stunnel::free_port(ip_server)?;
    let d = dir.display();
    let global = "global\n  nbthread 1\n  maxconn 4000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
                  ssl-default-server-options ssl-min-ver TLSv1.3\n\
                  defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
                  option http-keep-alive\n";
    let client = format!(
        "{global}frontend entry\n  bind {entry}\n  default_backend peer\n\
         backend peer\n  http-reuse always\n  server s {middle} ssl crt {d}/client.crt-key.pem ca-file {d}/ca.pem \
         verify required verifyhost server alpn h2\n"
    );
    let server = format!(
        "{global}frontend middle\n  bind {middle} ssl crt {d}/server.crt-key.pem ca-file {d}/ca.pem verify required \
         alpn h2\n  http-request deny unless {{ ssl_c_verify 0 }}\n  default_backend app\n\
         backend app\n  http-reuse always\n  server app {upstream}\n"
    );
    let spawn = |name: &str, conf: String| -> anyhow::Result<Child> {
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        Ok(Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    };
    let server = spawn("haproxy-server", server)?;
    let client = spawn("haproxy-client", client)?;
    let pair = Haproxy { entry, client, server };
    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in [middle, entry] {
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "haproxy did not start: {}{}",
                    std::fs::read_to_string(dir.join("haproxy-server.log")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("haproxy-client.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(pair)
}
