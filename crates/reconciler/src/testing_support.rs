//! A bare agent state (no server, no workers) for unit tests and the
//! synthetic benchmark state.

use std::sync::Arc;

use crate::state::Shared;
use crate::{AgentConfig, Metrics};

pub(crate) fn shared() -> Arc<Shared> {
    shared_with(|_| {})
}

/// A bare agent state whose configuration `change` adjusts.
pub(crate) fn shared_with(change: impl FnOnce(&mut AgentConfig)) -> Arc<Shared> {
    let blob_store = steward_blob_store::BlobStore::new(Default::default());
    let mut config = AgentConfig::new(
        "bench".into(),
        "127.0.0.1:1".into(),
        std::env::temp_dir(),
        blob_store,
    );
    change(&mut config);
    let metrics = Arc::new(Metrics::new("bench", "bench", "bench"));
    let cache_dir =
        std::env::temp_dir().join(format!("steward-bench-cache-{}", std::process::id()));
    let cache = steward_blob_store::CodeCache::open(&cache_dir, 1 << 20)
        .expect("bench code cache in temp dir");
    // A lazy channel spawns its worker on a runtime; the bare state never
    // calls the server, so any runtime will do.
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let _entered = tokio::runtime::Handle::try_current().is_err().then(|| {
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
            })
            .enter()
    });
    let server = crate::server::channel(&config.server_addr, None).expect("a valid address");
    Shared::new(config, metrics, cache, server)
}

/// An allocation `id` on worker "fe" (unit tests).
#[cfg(test)]
pub(crate) fn alloc(id: &str) -> crate::pb::Allocation {
    crate::pb::Allocation {
        allocation_id: Some(id.into()),
        function_executor_id: Some("fe".into()),
        ..Default::default()
    }
}
