//! The seed demo's story, end to end, in one process.
#![allow(clippy::unwrap_used)]

use kv_testkit::inproc::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_demo_story_holds_from_put_to_failover() {
    demo_story(Cluster::start(4).await).await;
}

/// With a cluster secret every registration, heartbeat, push and peer
/// connection proves it; the story is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_demo_story_holds_with_a_cluster_secret() {
    let secret = test_secret("demo-secret-0123456789");
    demo_story(Cluster::start_with_secret(4, Some(secret)).await).await;
}

async fn demo_story(mut cluster: Cluster) {
    // Step 2: the mapping for user123 names a primary and two replicas.
    let owners = cluster.mapping("user123").await;
    assert_eq!(owners.len(), 3);
    let primary = cluster.worker(&owners[0]);

    // Step 3: PUT to the primary; acknowledged at two copies.
    let (status, reply) = http("PUT", &primary.url("/kv"), put_body("user123", "hello-k8s")).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["acks"].as_u64().unwrap() >= 2, "{reply}");
    assert_eq!(reply["key"], "user123");
    // Immediately on the primary and at least one replica...
    assert_eq!(primary.local("user123").await.as_deref(), Some("hello-k8s"));
    let mut holding = 0;
    for id in &owners[1..] {
        holding += usize::from(cluster.worker(id).local("user123").await.is_some());
    }
    assert!(
        holding >= 1,
        "no replica holds the value right after the ack"
    );
    // ...on all three shortly, and never on the fourth.
    for id in &owners {
        let w = cluster.worker(id);
        eventually("the value on every owner", || async {
            (w.local("user123").await.as_deref() == Some("hello-k8s")).then_some(())
        })
        .await;
    }
    let fourth = cluster
        .workers
        .iter()
        .find(|w| !owners.contains(&w.id))
        .unwrap();
    let (status, body) = fourth.get("/kv?key=user123").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("key not found"))
    );
    // A quorum read through the non-owner finds it.
    let (status, body) = fourth.get("/kv?key=user123&consistency=quorum").await;
    assert_eq!((status, body["value"].as_str()), (200, Some("hello-k8s")));

    // Step 4: a mapped worker fails; the controller marks it DOWN.
    let victim = owners[0].clone();
    cluster.stop(&victim).await;
    eventually("the stopped worker to be DOWN", || async {
        let (_, nodes) = cluster.controller.get("/nodes").await;
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == victim.as_str() && n["status"] == "DOWN")
            .then_some(())
    })
    .await;
    cluster.settled().await;
    let new_owners = cluster.mapping("user123").await;
    assert_eq!(new_owners.len(), 3);
    assert!(!new_owners.contains(&victim));
    // Every worker the new mapping names holds the value (rebalancing).
    for id in &new_owners {
        let w = cluster.worker(id);
        eventually("the value on every new owner", || async {
            (w.local("user123").await.as_deref() == Some("hello-k8s")).then_some(())
        })
        .await;
    }
    cluster.shutdown().await;
}
