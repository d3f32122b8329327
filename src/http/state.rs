//! What every handler can reach: one cheap-to-clone handle, made by `app` and read only by
//! the HTTP layer.

use crate::config::WriteToken;
use crate::feed::Feed;
use crate::hot_keys::HotKeys;
use crate::items::service::ItemService;
use crate::metrics::{self, PoolName};

pub struct AppState {
    pub service: ItemService,
    pub write_token: Option<WriteToken>,
    pub metrics: metrics::Exporter,
    /// The change feed follower's state, for `/readyz`.
    pub feed: Feed,
}

impl AppState {
    /// The sketch of the most read ids, which the item handlers record reads in. The
    /// exporter keeps it, to render it into `/metrics`.
    pub fn hot_keys(&self) -> &HotKeys {
        self.metrics.hot_keys()
    }

    /// Samples both pools into the pool gauges.
    pub fn sample_pools(&self) {
        let usage = self.service.pool_usage();
        metrics::record_pool(
            PoolName::Postgres,
            usage.postgres.idle,
            usage.postgres.in_use,
            usage.postgres.waiting,
        );
        // Redis requests never wait for a connection: a missing one is made in the
        // background while the request goes on without the cache.
        metrics::record_pool(PoolName::Redis, usage.redis.idle, usage.redis.in_use, 0);
    }
}
