//! The directory of a local-mode cluster.
//!
//! The controller owns it and writes, besides its private state:
//! - `controller.json`: cluster name, trust domain and listening addresses;
//! - `ca.pem`: the cluster's root(s), to authenticate the controller;
//! - `local.token`: the secret local components and the CLI present (0600).
//!
//! Sidecars, the gateway and the CLI need only the directory's path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::bundle::TrustBundles;
use crate::identity::SpiffeId;
use crate::tls::{self, SharedBundles};

pub const CONTROLLER_FILE: &str = "controller.json";
pub const CA_FILE: &str = "ca.pem";
pub const LOCAL_TOKEN_FILE: &str = "local.token";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "{path}: no controller has started in this cluster directory (start one with `isthmus controller --dir {dir}` or `isthmus up`)"
    )]
    NoController { path: String, dir: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: corrupt ({reason})")]
    Corrupt { path: String, reason: String },
    #[error(
        "cannot reach the controller of cluster {cluster} at {addr}: {reason} (is it running? `isthmus up` or `isthmus controller`)"
    )]
    Unreachable {
        cluster: String,
        addr: String,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The cluster directory could be read or replaced by someone else:
    /// its secrets (the admin token, CA keys) are not used from it.
    #[error("{path}: {reason}; refusing to keep or read the cluster's secrets there ({fix})")]
    Unsafe { path: String, reason: String, fix: String },
}

/// What the controller publishes about itself in `controller.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerInfo {
    pub cluster: String,
    pub trust_domain: String,
    pub control_addr: String,
    pub peering_addr: String,
    pub pid: u32,
}

#[derive(Clone, Debug)]
pub struct ClusterDir {
    path: PathBuf,
}

impl ClusterDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn read(&self, name: &str) -> Result<String, LocalError> {
        let p = self.file(name);
        std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                LocalError::NoController {
                    path: p.display().to_string(),
                    dir: self.path.display().to_string(),
                }
            } else {
                LocalError::Io {
                    path: p.display().to_string(),
                    source: e,
                }
            }
        })
    }

    pub fn controller_info(&self) -> Result<ControllerInfo, LocalError> {
        let s = self.read(CONTROLLER_FILE)?;
        serde_json::from_str(&s).map_err(|e| LocalError::Corrupt {
            path: self.file(CONTROLLER_FILE).display().to_string(),
            reason: e.to_string(),
        })
    }

    pub fn local_token(&self) -> Result<String, LocalError> {
        check_private_dir(&self.path)?;
        Ok(self.read(LOCAL_TOKEN_FILE)?.trim().to_string())
    }

    /// Create the directory (0700) if it is missing, and check that it is
    /// private either way (`check_private_dir`).
    pub fn create(&self) -> Result<(), LocalError> {
        let io = |e| LocalError::Io {
            path: self.path.display().to_string(),
            source: e,
        };
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        match b.create(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        check_private_dir(&self.path)
    }

    pub fn roots_pem(&self) -> Result<String, LocalError> {
        self.read(CA_FILE)
    }

    /// Write `contents` to `name` crash-safely: temp file, fsync, rename, fsync dir.
    pub fn write_atomic(&self, name: &str, contents: &[u8], private: bool) -> Result<(), LocalError> {
        write_atomic(&self.file(name), contents, private).map_err(|e| LocalError::Io {
            path: self.file(name).display().to_string(),
            source: e,
        })
    }

    /// Connect to this cluster's controller, authenticated both ways: the
    /// controller by its SVID under the cluster root, we by the local token.
    pub async fn connect(&self) -> Result<LocalClient, LocalError> {
        self.connect_with(self.local_token()?).await
    }

    /// Connect presenting `token`: the admin token, or a workload credential.
    pub async fn connect_with(&self, token: String) -> Result<LocalClient, LocalError> {
        self.connect_as(Credential::Token(token)).await
    }

    /// Connect presenting `credential`.
    pub async fn connect_as(&self, credential: Credential) -> Result<LocalClient, LocalError> {
        let info = self.controller_info()?;
        let mut bundles = TrustBundles::new();
        bundles
            .set_pem(&info.trust_domain, &self.roots_pem()?)
            .map_err(|e| LocalError::Corrupt {
                path: self.file(CA_FILE).display().to_string(),
                reason: e.to_string(),
            })?;
        let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(bundles));
        let config = tls::client_config(
            None,
            bundles.clone(),
            tls::Expect::Id(SpiffeId::controller(&info.trust_domain)),
            &[tls::ALPN_H2],
        )?;
        let channel = crate::grpc::connect(&info.control_addr, config)
            .await
            .map_err(|e| LocalError::Unreachable {
                cluster: info.cluster.clone(),
                addr: info.control_addr.clone(),
                reason: error_chain(&e),
            })?;
        Ok(LocalClient {
            info,
            channel,
            credential,
            bundles,
        })
    }
}

/// A connection to the local controller.
#[derive(Clone)]
pub struct LocalClient {
    pub info: ControllerInfo,
    channel: Channel,
    credential: Credential,
    /// What the controller's certificate is verified against: `ca.pem` at
    /// first, then the bundles of each config snapshot, so that a root
    /// rotation does not cut a long-running component off its controller.
    pub bundles: SharedBundles,
}

/// What a component presents to its controller.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The admin token, or a workload credential, read once.
    Token(String),
    /// A file read at every request: a workload credential, or a
    /// Kubernetes service-account token that the kubelet rotates.
    File(PathBuf),
}

impl Credential {
    /// The credential as of now.
    pub fn current(&self) -> std::io::Result<String> {
        match self {
            Credential::Token(t) => Ok(t.clone()),
            Credential::File(p) => Ok(std::fs::read_to_string(p)?.trim().to_string()),
        }
    }
}

/// Adds the credential to every request.
#[derive(Clone)]
pub struct Bearer(Credential);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let token = self
            .0
            .current()
            .map_err(|e| tonic::Status::unauthenticated(format!("cannot read the credential: {e}")))?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::unauthenticated("the credential is not printable ASCII"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

pub type AuthChannel = InterceptedService<Channel, Bearer>;

impl LocalClient {
    fn bearer(&self) -> Bearer {
        Bearer(self.credential.clone())
    }

    pub fn control(&self) -> isthmus_proto::control_client::ControlClient<AuthChannel> {
        isthmus_proto::control_client::ControlClient::with_interceptor(self.channel.clone(), self.bearer())
    }

    pub fn admin(&self) -> isthmus_proto::admin_client::AdminClient<AuthChannel> {
        isthmus_proto::admin_client::AdminClient::with_interceptor(self.channel.clone(), self.bearer())
    }
}

/// An error and all its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A cluster directory holds the admin token and CA keys: it must be a real
/// directory (not a symlink), owned by this process's user, and writable by
/// no one else; else another local user could have made it first, or could
/// swap its files.
pub fn check_private_dir(path: &Path) -> Result<(), LocalError> {
    let unsafe_dir = |reason: String, fix: String| LocalError::Unsafe {
        path: path.display().to_string(),
        reason,
        fix,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        // A missing directory is the caller's to report (no controller).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(LocalError::Io {
                path: path.display().to_string(),
                source: e,
            });
        }
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "it is a symbolic link".into(),
            "give the real directory's path".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory".into(), "give a directory".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to this process's effective user.
        if let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid())
            && meta.uid() != me
        {
            return Err(unsafe_dir(
                format!("owned by uid {}, not by this user (uid {me})", meta.uid()),
                "use a directory of your own, for example under $HOME".into(),
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(unsafe_dir(
                format!("writable by group or others (mode {mode:o})"),
                format!("chmod 700 {}", path.display()),
            ));
        }
    }
    Ok(())
}

pub fn write_atomic(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    // A name no one can guess, created new: a file or symlink planted in
    // the directory is never opened, let alone followed.
    let tmp = dir.join(format!(
        ".{}.tmp.{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u64>()
    ));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if private { 0o600 } else { 0o644 });
        }
        let mut f = opts.open(&tmp)?;
        if let Err(e) = f.write_all(contents).and_then(|()| f.sync_all()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_others_may_write_keeps_no_secrets() {
        let root = tempfile::tempdir().unwrap();
        let dir = ClusterDir::new(root.path().join("east"));
        dir.create().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "created {mode:o}");
        std::fs::write(dir.file(LOCAL_TOKEN_FILE), "secret").unwrap();
        assert_eq!(dir.local_token().unwrap(), "secret");

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = dir.local_token().unwrap_err();
        assert!(matches!(e, LocalError::Unsafe { .. }), "{e}");
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert!(dir.create().is_err(), "an existing unsafe directory is refused too");

        // A symlink to a private directory is refused: it could be swapped.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = ClusterDir::new(&link).local_token().unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_planted_symlink_is_not_followed_by_atomic_writes() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        // The temp name the old code used (pid-based) and a guess.
        for name in [
            format!(".state.json.tmp.{}", std::process::id()),
            ".state.json.tmp.0000000000000000".to_string(),
        ] {
            std::os::unix::fs::symlink(&victim, root.path().join(name)).unwrap();
        }
        write_atomic(&root.path().join("state.json"), b"{}", true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(std::fs::read_to_string(root.path().join("state.json")).unwrap(), "{}");
        let mode = std::fs::metadata(root.path().join("state.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
}
