//! Redis Cluster (`REDIS_CLUSTER_NODES`): the service on a private 3-master, 3-replica
//! cluster; every read and write path, a master killed under load, and an invalidation that
//! a failover lost.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::servers::RedisCluster;
use crate::support::{Spawn, TestApp, command, eventually, header};

async fn cluster_app(cluster: &RedisCluster) -> TestApp {
    Spawn::default()
        .var("REDIS_CLUSTER_NODES", cluster.seeds())
        .var("REDIS_TIMEOUT_MS", 1000)
        .start()
        .await
}

/// A command on the cluster, through a cluster client (routed by its key).
async fn cluster_cmd<T: redis::FromRedisValue>(cluster: &RedisCluster, args: &[&str]) -> T {
    let nodes: Vec<String> = cluster.seeds().split(',').map(str::to_owned).collect();
    let client = redis::cluster::ClusterClient::new(nodes).expect("cluster client");
    let mut conn = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    command(&mut conn, args).await
}

async fn version_of(response: reqwest::Response) -> i64 {
    let body: Value = response.json().await.unwrap();
    body["version"].as_i64().unwrap()
}

#[tokio::test]
async fn every_read_and_write_path_works_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let app = cluster_app(&cluster).await;
    // Enough ids to land on every master.
    let ids = app.insert_items(30).await;

    for &id in &ids {
        assert_eq!(header(&app.get_item(id).await, "x-cache"), "MISS");
    }
    for &id in &ids {
        assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    }
    let entry: Option<String> = cluster_cmd(
        &cluster,
        &["GET", &format!("{}item:{{{}}}", app.prefix, ids[0])],
    )
    .await;
    assert!(entry.is_some(), "entries carry the id as hash tag");

    // A batch over many slots: one answer, all hits; and with cold ids, filled per slot.
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let batch = app.get(&format!("/items?ids={}", list.join(","))).await;
    assert_eq!(batch.status(), 200);
    assert_eq!(header(&batch, "x-cache"), "HIT");
    let more = app.insert_items(20).await;
    let list: Vec<String> = more.iter().map(i64::to_string).collect();
    let path = format!("/items?ids={}", list.join(","));
    assert_eq!(header(&app.get(&path).await, "x-cache"), "MISS");
    let batch = app.get(&path).await;
    assert_eq!(header(&batch, "x-cache"), "HIT");
    let body: Value = batch.json().await.unwrap();
    assert_eq!(body["items"].as_array().unwrap().len(), 20);

    // A write through the API, and one behind its back (the change feed).
    let patched = app.patch_item(ids[0], &json!({"price_cents": 777})).await;
    assert_eq!(patched.status(), 200);
    assert_eq!(version_of(app.get_item(ids[0]).await).await, 2);
    app.sql(&format!(
        "UPDATE items SET price_cents = 5 WHERE id = {}",
        ids[1]
    ))
    .await;
    eventually(
        "the feed's invalidation",
        Duration::from_secs(10),
        || async {
            let body: Value = app.get_item(ids[1]).await.json().await.ok()?;
            (body["price_cents"] == 5).then_some(())
        },
    )
    .await;

    // Lookups by name, and a rename moving an item out of one.
    let a = app.create_item("cluster-chair", 1).await["id"]
        .as_i64()
        .unwrap();
    let b = app.create_item("cluster-chair", 2).await["id"]
        .as_i64()
        .unwrap();
    // The feed's own invalidations of the name (for both inserts) land first: one arriving
    // after the first read noted the name's stamp would refuse its fill (one more miss).
    app.settle_feed().await;
    for expected in ["MISS", "HIT"] {
        let found = app.get("/items?name=cluster-chair").await;
        assert_eq!(header(&found, "x-cache"), expected);
        let body: Value = found.json().await.unwrap();
        assert_eq!(body["items"].as_array().unwrap().len(), 2);
    }
    app.patch_item(a, &json!({"name": "cluster-table"})).await;
    let body: Value = app
        .get("/items?name=cluster-chair")
        .await
        .json()
        .await
        .unwrap();
    let items: Vec<i64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(items, vec![b]);

    // A truncate: every copy of the flush token replaced, every entry on every master gone.
    app.sql("TRUNCATE items").await;
    eventually("the truncate's flush", Duration::from_secs(15), || async {
        let mut all_gone = true;
        for &id in ids.iter().chain(&more) {
            all_gone &= app.get_item(id).await.status() == 404;
        }
        all_gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_master_killed_under_reads_and_writes_costs_no_5xx_and_the_service_follows_the_new_topology()
 {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .unwrap(),
    );
    let app = Arc::new(cluster_app(&cluster).await);
    let ids = app.insert_items(20).await;
    for &id in &ids {
        app.get_item(id).await;
    }

    // Reads and writes of every id, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (app, ids, stop) = (app.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = ids[n % ids.len()];
                let response = if n.is_multiple_of(5) {
                    app.patch_item(id, &json!({"price_cents": n})).await
                } else {
                    app.get_item(id).await
                };
                statuses.push(response.status().as_u16());
                n += 1;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = format!("{}item:{{{}}}", app.prefix, ids[0]);
    let victim = cluster.master_of(&key);
    cluster.kill(victim);
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            cluster.wait_for_failover(&key, victim, Duration::from_secs(30))
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(statuses.len() > 50, "the load ran: {}", statuses.len());
    assert!(
        statuses.iter().all(|s| (200..300).contains(s)),
        "no error while a master failed over: {:?}",
        statuses
            .iter()
            .filter(|s| !(200..300).contains(*s))
            .collect::<Vec<_>>()
    );

    // The service follows the new topology: the failed-over slots cache again, and every
    // read answers the last write.
    eventually(
        "hits on the new master",
        Duration::from_secs(15),
        || async {
            app.get_item(ids[0]).await;
            (header(&app.get_item(ids[0]).await, "x-cache") == "HIT").then_some(())
        },
    )
    .await;
    for &id in &ids {
        let cached: Value = app.get_item(id).await.json().await.unwrap();
        let truth: Value = app
            .get(&format!("/items?ids={id}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(cached["version"], truth["items"][0]["version"], "id {id}");
    }
}

#[tokio::test]
async fn an_invalidation_that_a_failover_lost_is_applied_again() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .unwrap(),
    );
    let app = cluster_app(&cluster).await;
    let id = app.create_item("replayed", 100).await["id"]
        .as_i64()
        .unwrap();
    app.get_item(id).await;
    assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    let key = format!("{}item:{{{id}}}", app.prefix);
    let master = cluster.master_of(&key);
    let replica = cluster.replica_of(master);
    // Let the replica have the cached v1, then stop it and cut its link: what the master
    // takes from now on (the write's invalidation) never reaches it. (A frozen replica alone
    // is not enough: its socket still receives, and it reads that on waking.)
    eventually("v1 on the replica", Duration::from_secs(10), || async {
        cluster
            .value_on(replica, &key)
            .filter(|v| v.starts_with("I1 "))
    })
    .await;
    cluster.freeze(replica);
    cluster.cut_replication(master);
    let patched = app.patch_item(id, &json!({"price_cents": 200})).await;
    assert_eq!(patched.status(), 200);
    app.settle_feed().await;
    // The master dies with the invalidation; the replica, which never had it, takes over
    // and still holds v1 under the old stamp.
    cluster.kill(master);
    cluster.thaw(replica);
    {
        let cluster = cluster.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            cluster.wait_for_failover(&key, master, Duration::from_secs(30))
        })
        .await
        .unwrap();
    }
    let before: Option<String> = cluster_cmd(&cluster, &["GET", &key]).await;
    assert!(
        before.is_some_and(|entry| entry.starts_with("I1 ")),
        "the new master holds v1: the invalidation was lost"
    );
    // The feed's replay applies the write's invalidation again on the new master.
    eventually("v2 from the cache", Duration::from_secs(15), || async {
        let read = app.get_item(id).await;
        let cache = header(&read, "x-cache");
        let body: Value = read.json().await.ok()?;
        (body["version"] == 2 && cache == "HIT").then_some(())
    })
    .await;
}

/// A master frozen: its own ids are answered from Postgres (its shard's circuit opens), all
/// others stay hits; once a replica has taken over, its ids are hits again.
#[tokio::test]
async fn a_frozen_master_sends_only_its_own_ids_to_postgres_until_it_is_replaced() {
    // A node timeout long enough that the reads below run before the failover (they hold
    // after it too), short enough that the failover comes within the test.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| {
            RedisCluster::start_with_node_timeout(Duration::from_secs(3))
        })
        .await
        .unwrap(),
    );
    let app = Spawn::default()
        .var("REDIS_CLUSTER_NODES", cluster.seeds())
        .var("REDIS_TIMEOUT_MS", 200)
        .start()
        .await;
    let ids = app.insert_items(30).await;
    for &id in &ids {
        app.get_item(id).await;
        assert_eq!(header(&app.get_item(id).await, "x-cache"), "HIT");
    }
    let key = |id: i64| format!("{}item:{{{id}}}", app.prefix);
    let frozen = cluster.master_of(&key(ids[0]));
    let (on_frozen, elsewhere): (Vec<i64>, Vec<i64>) = ids
        .iter()
        .partition(|&&id| cluster.master_of(&key(id)) == frozen);
    assert!(!elsewhere.is_empty(), "30 ids land on more than one master");
    cluster.freeze(frozen);

    // The frozen master's ids: answered from Postgres, the first few after the deadline,
    // then at once (its shard's circuit is open).
    for round in 0..3 {
        for &id in &on_frozen {
            let read = app.get_item(id).await;
            assert_eq!(read.status(), 200, "round {round}, id {id}");
        }
    }
    // Every other id is still a hit from its own master: one master's circuit is not all.
    for &id in &elsewhere {
        let read = app.get_item(id).await;
        assert_eq!(read.status(), 200);
        assert_eq!(
            header(&read, "x-cache"),
            "HIT",
            "id {id} is on a live master"
        );
    }

    // The replica takes over (the frozen master stays frozen): the service follows it, and
    // the frozen master's ids are hits again, from the promoted replica.
    {
        let cluster = cluster.clone();
        let key = key(ids[0]);
        tokio::task::spawn_blocking(move || {
            cluster.wait_for_failover(&key, frozen, Duration::from_secs(30))
        })
        .await
        .unwrap();
    }
    for &id in &on_frozen {
        eventually(
            "a hit from the promoted replica",
            Duration::from_secs(15),
            || async {
                let read = app.get_item(id).await;
                (header(&read, "x-cache") == "HIT").then_some(())
            },
        )
        .await;
    }
    cluster.thaw(frozen);
}
