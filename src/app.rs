//! Start-up as a function tests call: [`Application::build`] connects, migrates and binds
//! (port 0 in tests), [`Application::run_until_stopped`] serves until the shutdown future
//! resolves, then lets in-flight requests finish and stops the background tasks.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, middleware::from_fn, web};
use tokio::sync::watch;

use crate::cache::{Cache, Connections, Factory, Keys, Near, tracking};
use crate::config::Settings;
use crate::db::replicas::Replicas;
use crate::db::{self, DbSetupError};
use crate::feed::{Feed, Follower, replay};
use crate::http::{self, AppState};
use crate::items::repo::ItemRepo;
use crate::items::service::ItemService;
use crate::metrics::{self, MetricsError};

/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often histograms are compacted and pool gauges sampled.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbSetupError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("REDIS_URL: cannot make Redis connections from it")]
    Redis(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("LISTEN_ADDR: could not listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        cause: std::io::Error,
    },
}

pub struct Application {
    server: Server,
    port: u16,
    state: web::Data<AppState>,
    database_url: String,
    /// The near cache and what its invalidations follow (one Redis's URL, the key prefix).
    near: Option<(Arc<Near>, String, String)>,
}

impl Application {
    /// Connects to Postgres (migrating it) and Redis, and binds the listener.
    /// Redis being down is not fatal: the service starts degraded and connects later.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let metrics = metrics::install()?;
        db::run_migrations(&settings.database_url).await?;
        let replicas = Replicas::new(
            &settings.database_replica_urls,
            settings.db_pool_size,
            http_workers(),
            settings.database_replica_max_lag,
        )?;
        let repo = ItemRepo::new(
            db::Pools::new(
                &settings.database_url,
                settings.db_pool_size,
                http_workers(),
            )?,
            replicas,
        );

        // Connecting may take longer than one command's deadline (TCP + HELLO), but not long.
        let connect_timeout = settings.redis_timeout.max(Duration::from_millis(500));
        let factory = if settings.redis_cluster_nodes.is_empty() {
            let pool = deadpool_redis::Config::from_url(settings.redis_url.clone())
                .builder()
                .map_err(|e| StartupError::Redis(Box::new(e)))?
                .max_size(settings.redis_pool_size)
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| StartupError::Redis(Box::new(e)))?;
            Factory::Single(pool)
        } else {
            let client = ::redis::cluster::ClusterClientBuilder::new(
                settings.redis_cluster_nodes.iter().map(String::as_str),
            )
            .connection_timeout(connect_timeout)
            .response_timeout(settings.redis_timeout)
            .build()
            .map_err(|e| StartupError::Redis(Box::new(e)))?;
            Factory::Cluster(Box::new(client))
        };
        // A cluster connection connects to every seed, asks one for the map of slots, then
        // connects to every node in it, each connect within `connect_timeout`: a frozen node
        // costs it two of those (it waits for all), and it must not be given up before.
        let make_timeout = match factory {
            Factory::Single(_) => connect_timeout,
            Factory::Cluster(_) => connect_timeout * 3 + settings.redis_timeout,
        };
        let conns = Connections::new(
            factory,
            settings.redis_pool_size,
            http_workers(),
            make_timeout,
        );
        if conns.connect_all().await == 0 {
            tracing::warn!("redis is not reachable; serving from postgres until it is");
        }
        let mut cache = Cache::new(
            conns,
            Keys::new(
                &settings.cache_key_prefix,
                !settings.redis_cluster_nodes.is_empty(),
            ),
            settings.redis_timeout,
        );
        let near = if settings.cache_l1_max_bytes > 0 {
            let near = Arc::new(Near::new(
                settings.cache_l1_max_bytes,
                settings.cache_l1_ttl,
            ));
            cache = cache.with_near(near.clone());
            Some((
                near,
                settings.redis_url.clone(),
                settings.cache_key_prefix.clone(),
            ))
        } else {
            None
        };

        let state = web::Data::new(AppState {
            service: ItemService::new(repo, cache, &settings),
            write_token: settings.write_token.clone(),
            metrics,
            feed: if settings.redis_cluster_nodes.is_empty() {
                Feed::default()
            } else {
                Feed::keeping_recent()
            },
        });
        let listener = listen(settings.listen_addr).map_err(|cause| StartupError::Bind {
            addr: settings.listen_addr.to_string(),
            cause,
        })?;
        let port = listener
            .local_addr()
            .map_err(|cause| StartupError::Bind {
                addr: settings.listen_addr.to_string(),
                cause,
            })?
            .port();
        let server = server(state.clone(), listener).map_err(|cause| StartupError::Bind {
            addr: settings.listen_addr.to_string(),
            cause,
        })?;
        Ok(Application {
            server,
            port,
            state,
            database_url: settings.database_url.clone(),
            near,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets in-flight requests
    /// finish (up to 10 s), stops background tasks and closes the pools.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let upkeep = tokio::spawn(upkeep(self.state.clone(), stop_rx.clone()));
        let invalidations = tokio::spawn(retry_invalidations(self.state.clone(), stop_rx.clone()));
        let follower = Follower {
            service: self.state.service.clone(),
            database_url: self.database_url.clone(),
            feed: self.state.feed.clone(),
        };
        let feed = tokio::spawn(follower.run(stop_rx.clone()));
        let near = self.near.map(|(near, url, prefix)| {
            tokio::spawn(tracking::follow(url, prefix, near, stop_rx.clone()))
        });
        let failovers = self.state.feed.recent().cloned().map(|recent| {
            tokio::spawn(replay::watch_failovers(
                self.state.service.clone(),
                recent,
                stop_rx.clone(),
            ))
        });
        let replicas = tokio::spawn(self.state.service.track_replicas(stop_rx));
        let handle = self.server.handle();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            handle.stop(true).await;
        });
        let served = self.server.await;
        let _ = stop_tx.send(true);
        let _ = upkeep.await;
        let _ = invalidations.await;
        let _ = feed.await;
        if let Some(failovers) = failovers {
            let _ = failovers.await;
        }
        if let Some(near) = near {
            let _ = near.await;
        }
        let _ = replicas.await;
        self.state.service.close();
        served
    }
}

fn server(state: web::Data<AppState>, listener: TcpListener) -> std::io::Result<Server> {
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(from_fn(http::middleware::observe))
            .configure(http::routes)
            .default_service(web::to(http::errors::route_not_found))
    })
    // Slow or idle clients must not hold connections: a request head must arrive within
    // 5 s (408 otherwise), a closing client gets 1 s, an idle keep-alive connection 30 s.
    .workers(http_workers())
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .keep_alive(Duration::from_secs(30))
    .listen(listener)?
    // Signals are the binary's business (main.rs turns them into the shutdown future);
    // tests stop servers without them.
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .run())
}

/// One HTTP worker per core (actix's default, named because each worker also keeps its own
/// Redis connection and Postgres connections: see `workers`).
fn http_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Histogram upkeep and pool sampling, until the server stops.
async fn upkeep(state: web::Data<AppState>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        if stopped(&mut every, &mut stop).await {
            return;
        }
        state.metrics.run_upkeep();
        state.sample_pools();
    }
}

/// Retries failed cache invalidations until the server stops (see `cache::invalidation`).
async fn retry_invalidations(state: web::Data<AppState>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(crate::cache::invalidation::RETRY_EVERY);
    loop {
        if stopped(&mut every, &mut stop).await {
            let left = state.service.pending_invalidations();
            if left > 0 {
                tracing::warn!(
                    left,
                    "stopping with cache invalidations not applied here; the change feed applies them"
                );
            }
            return;
        }
        state.service.retry_invalidations().await;
    }
}

/// Waits for the next tick; true if the server stopped first.
async fn stopped(every: &mut tokio::time::Interval, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = every.tick() => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// How many connections the kernel queues before the service accepts them. The standard
/// library's `TcpListener::bind` asks for 128, which a burst of new connections overflows
/// (an nginx restart, a client opening a thousand at once): the kernel then drops the
/// excess, and each dropped client retries a second later. actix's own `bind` asks for
/// 1,024; this does the same for the listener the service binds itself (to know its port).
const LISTEN_BACKLOG: i32 = 1024;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
