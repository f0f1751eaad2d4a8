//! Reconcilers (stub; filled in next).

use std::sync::Arc;

use crate::shared::Shared;

pub(crate) async fn run(shared: Arc<Shared>, client: kube::Client) {
    let _ = (shared, client);
}
