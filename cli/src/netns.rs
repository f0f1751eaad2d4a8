//! `isthmus up --netns NAME`: the client workload in a network namespace of
//! its own, as a pod is, so an unchanged app run there with
//! `ip netns exec NAME ...` reaches `*.svc.clusterset.local` by name, with
//! no proxy setting, through its sidecar.
//!
//! In the namespace: loopback up and the only route, `isthmus redirect`'s
//! rules, a resolv.conf (`/etc/netns/NAME/resolv.conf`, which `ip netns
//! exec` binds over `/etc/resolv.conf`) naming the sidecar's DNS on
//! 127.0.0.1:53, and the sidecar itself as user 1337, whose own
//! connections the rules exempt. It reads a copy of what it needs from the cluster directory,
//! which it cannot reach (root's, 0700, under root's home most often): the
//! controller's address and CA, and its credential, in
//! `/run/isthmus/netns/NAME/` (its own, 0700).
//!
//! The cluster's controller and gateway listen on host loopback, which a
//! namespace cannot reach. This process (root) opens a listener on the
//! same address inside the namespace (a socket stays in the namespace it
//! was made in) and relays each connection to the host's: plain TCP under
//! the sidecar's own mTLS, so the relay sees nothing and no address in the
//! cluster directory or the sidecar's config changes. No veth pair, no
//! routes, no host address to pick.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::net::{TcpListener, TcpStream};

use crate::error::{CliError, exit};

/// The user the sidecar runs as; `isthmus redirect`'s default exemption.
pub const SIDECAR_UID: u32 = 1337;
/// Where the sidecars' copies live, one directory per namespace.
const RUN_DIR: &str = "/run/isthmus/netns";
/// Where `ip netns exec` finds a namespace's own /etc files.
const ETC_DIR: &str = "/etc/netns";

/// A network namespace made for the client workload, removed on drop.
pub struct Netns {
    pub name: String,
    /// The sidecar's readable copy of the cluster directory's files.
    pub dir: PathBuf,
    /// The relays' accept loops, stopped on drop.
    relays: Vec<tokio::task::JoinHandle<()>>,
}

fn fail(m: String) -> CliError {
    CliError::new(exit::FAILURE, m)
}

/// Run `program args`; its stderr in the error if it fails.
fn run(program: &str, args: &[&str]) -> Result<(), CliError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    /// Whether namespace `name` can be made here: by root, with a name
    /// `ip netns` takes, not in use. Checked before anything starts.
    pub fn check(name: &str) -> Result<(), CliError> {
        if !rustix::process::geteuid().is_root() {
            return Err(CliError::new(
                exit::REFUSED,
                "--netns needs root: it makes a network namespace and nftables rules".to_string(),
            ));
        }
        let valid = !name.is_empty()
            && name.len() <= 32
            && !name.starts_with('-')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(CliError::new(
                exit::BAD_INPUT,
                format!("--netns {name:?}: use up to 32 letters, digits, '-' or '_'"),
            ));
        }
        // Someone else's namespace, or its /etc/netns files, are not ours
        // to replace or remove.
        if Path::new("/run/netns").join(name).exists() {
            return Err(CliError::new(
                exit::BAD_INPUT,
                format!("network namespace {name} already exists (remove it with `ip netns del {name}`)"),
            ));
        }
        let etc = Path::new(ETC_DIR).join(name);
        if etc.exists() {
            return Err(CliError::new(
                exit::BAD_INPUT,
                format!(
                    "{} already exists: another namespace's files (remove it if it is a leftover)",
                    etc.display()
                ),
            ));
        }
        Ok(())
    }

    /// Make namespace `name` and the sidecar's copy of `cluster_dir`'s files.
    pub fn create(name: &str, cluster_dir: &Path, credential: &Path) -> Result<Self, CliError> {
        Self::check(name)?;
        run("ip", &["netns", "add", name])?;
        // From here on, drop removes what was made.
        let ns = Netns {
            name: name.to_string(),
            dir: Path::new(RUN_DIR).join(name),
            relays: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // Every destination routes to loopback, from 127.0.0.1: a connect
        // to a mesh address needs a route to reach the nat hook that
        // redirects it, and nothing leaves the namespace anyway.
        ns.exec(&["ip", "route", "add", "default", "dev", "lo", "src", "127.0.0.1"])?;
        // The sidecar, an unprivileged user, answers DNS on port 53.
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"])?;
        // Modes set outright, whatever root's umask: apps of any user in the
        // namespace read resolv.conf.
        let etc = Path::new(ETC_DIR).join(name);
        std::fs::create_dir_all(&etc)
            .and_then(|()| std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)))
            .and_then(|()| std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n"))
            .and_then(|()| std::fs::set_permissions(etc.join("resolv.conf"), std::fs::Permissions::from_mode(0o644)))
            .map_err(|e| fail(format!("{}: {e}", etc.display())))?;
        ns.copy_for_sidecar(cluster_dir, credential)?;
        Ok(ns)
    }

    /// The sidecar's files, readable by it alone, in a directory of its own
    /// under root's `/run/isthmus/netns` (0755, so it can reach its own).
    fn copy_for_sidecar(&self, cluster_dir: &Path, credential: &Path) -> Result<(), CliError> {
        let io = |p: &Path, e: std::io::Error| fail(format!("{}: {e}", p.display()));
        for p in [Path::new(RUN_DIR).parent().expect("has a parent"), Path::new(RUN_DIR)] {
            match std::fs::create_dir(p) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(p, e)),
                _ => {}
            }
            // Root's own directory, not a link someone else put there.
            let meta = std::fs::symlink_metadata(p).map_err(|e| io(p, e))?;
            if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != 0 {
                return Err(fail(format!("{}: not a directory of root's", p.display())));
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).map_err(|e| io(p, e))?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        for (from, to) in [
            (
                cluster_dir.join(isthmus_core::local::CONTROLLER_FILE),
                isthmus_core::local::CONTROLLER_FILE,
            ),
            (
                cluster_dir.join(isthmus_core::local::CA_FILE),
                isthmus_core::local::CA_FILE,
            ),
            (credential.to_path_buf(), "client.cred"),
        ] {
            std::fs::copy(&from, self.dir.join(to)).map_err(|e| io(&from, e))?;
        }
        // The directory is the sidecar's alone (its ready file goes there).
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(&self.dir, e))?;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let p = entry.map_err(|e| io(&self.dir, e))?.path();
            std::os::unix::fs::chown(&p, Some(SIDECAR_UID), Some(SIDECAR_UID)).map_err(|e| io(&p, e))?;
        }
        std::os::unix::fs::chown(&self.dir, Some(SIDECAR_UID), Some(SIDECAR_UID)).map_err(|e| io(&self.dir, e))?;
        Ok(())
    }

    /// Run a command in the namespace, as root.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), CliError> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend(cmd);
        run("ip", &args)
    }

    /// The command line that runs `isthmus <args>` in the namespace as the
    /// sidecar's user: `(program, its arguments before <args>)`.
    pub fn as_sidecar(&self, exe: &Path) -> (String, Vec<String>) {
        let uid = SIDECAR_UID.to_string();
        (
            "ip".into(),
            vec![
                "netns".into(),
                "exec".into(),
                self.name.clone(),
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                exe.display().to_string(),
            ],
        )
    }

    /// Relay connections to `addr` inside the namespace to `addr` on the
    /// host, until this is dropped.
    pub fn relay(&mut self, addr: &str) -> Result<(), CliError> {
        let listener = self.listen(addr)?;
        let to = addr.to_string();
        self.relays.push(tokio::spawn(async move {
            loop {
                let (mut inside, _) = match listener.accept().await {
                    Ok(c) => c,
                    // Out of descriptors, most often: wait, do not spin.
                    Err(e) => {
                        tracing::warn!(error = %e, addr = %to, "namespace relay cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let to = to.clone();
                tokio::spawn(async move {
                    if let Ok(mut host) = TcpStream::connect(&to).await {
                        let _ = inside.set_nodelay(true);
                        let _ = host.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                    }
                });
            }
        }));
        Ok(())
    }

    /// A listener on `addr` made inside the namespace: a thread of its own
    /// enters it (`setns` changes only the calling thread), binds, and ends.
    fn listen(&self, addr: &str) -> Result<TcpListener, CliError> {
        let path = Path::new("/run/netns").join(&self.name);
        let addr = addr.to_string();
        let bound = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<std::net::TcpListener> {
                let ns = std::fs::File::open(&path)?;
                // Only this thread moves, and it ends right after.
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                let l = std::net::TcpListener::bind(&addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .join()
            .expect("the namespace thread does not panic")
        })
        .map_err(|e| fail(format!("relay for {addr} in network namespace {}: {e}", self.name)))?;
        TcpListener::from_std(bound).map_err(|e| fail(format!("relay for {addr}: {e}")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for r in &self.relays {
            r.abort();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        // Only what was written here: check() refused a directory that was
        // there before.
        let etc = Path::new(ETC_DIR).join(&self.name);
        let _ = std::fs::remove_file(etc.join("resolv.conf"));
        let _ = std::fs::remove_dir(etc);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
