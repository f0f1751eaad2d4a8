//! `isthmus install` and `isthmus uninstall`: every manifest a cluster
//! needs, printed for `kubectl apply -f -` (or `delete`).

use std::path::PathBuf;

use isthmus_controller::k8s::install::{self, Values};

use crate::error::{CliError, exit};

#[derive(clap::Args)]
pub struct Args {
    /// This cluster's name (lowercase letters, digits, '-').
    #[arg(long)]
    pub cluster: Option<String>,
    /// SPIFFE trust domain [default: <cluster>.mesh].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// The image holding the isthmus binary (see Dockerfile).
    #[arg(long)]
    pub image: Option<String>,
    /// The controller's peering address as other clusters dial it
    /// (host:port; a DNS name is best): it goes into join tokens.
    #[arg(long)]
    pub peering_address: Option<String>,
    /// The gateway's QUIC address as other clusters' gateways dial it.
    #[arg(long)]
    pub gateway_address: Option<String>,
    /// Service type for the gateway and the peering port: LoadBalancer, or
    /// NodePort where there is none.
    #[arg(long, value_parser = ["LoadBalancer", "NodePort"])]
    pub gateway_service_type: Option<String>,
    /// A YAML file with these settings (camelCase keys: cluster,
    /// trustDomain, image, controllerReplicas, gatewayServiceType,
    /// peeringAddress, gatewayAddress); flags win over it.
    #[arg(long)]
    pub values: Option<PathBuf>,
}

impl Args {
    fn values(&self) -> Result<Values, CliError> {
        let mut v = match &self.values {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError::new(exit::BAD_INPUT, format!("--values {}: {e}", path.display())))?;
                serde_saphyr::from_str::<Values>(&text)
                    .map_err(|e| CliError::new(exit::BAD_INPUT, format!("--values {}: {e}", path.display())))?
            }
            None => Values::default(),
        };
        let set = |field: &mut Option<String>, flag: &Option<String>| {
            if flag.is_some() {
                *field = flag.clone();
            }
        };
        if let Some(c) = &self.cluster {
            v.cluster = c.clone();
        }
        if let Some(i) = &self.image {
            v.image = i.clone();
        }
        if let Some(t) = &self.gateway_service_type {
            v.gateway_service_type = t.clone();
        }
        set(&mut v.trust_domain, &self.trust_domain);
        set(&mut v.peering_address, &self.peering_address);
        set(&mut v.gateway_address, &self.gateway_address);
        isthmus_core::identity::validate_name(&v.cluster)
            .map_err(|e| CliError::new(exit::BAD_INPUT, format!("--cluster (or cluster in --values): {e}")))?;
        if let Some(td) = &v.trust_domain {
            isthmus_core::identity::validate_trust_domain(td)
                .map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
        }
        if v.controller_replicas < 1 {
            return Err(CliError::new(exit::BAD_INPUT, "controllerReplicas must be at least 1"));
        }
        Ok(v)
    }
}

pub fn install(a: Args) -> Result<(), CliError> {
    print!("{}", install::yaml(&install::objects(&a.values()?)));
    Ok(())
}

pub fn uninstall(a: Args, with_crds: bool) -> Result<(), CliError> {
    print!("{}", install::yaml(&install::uninstall(&a.values()?, with_crds)));
    Ok(())
}
