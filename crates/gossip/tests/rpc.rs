//! Serf's RPC protocol on a real socket: what a Serf client waits for always comes.

mod common;

use std::time::Duration;

use phoenix_gossip::rpc::{self, Client, CoordinateResponse};
use tokio::net::TcpListener;

async fn serving() -> (phoenix_gossip::Agent, std::net::SocketAddr) {
    let agent = common::start(vec![common::config("a", 1)]).await.remove(0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(rpc::serve(
        listener,
        agent.clone(),
        rpc::ServeOptions::default(),
    ));
    (agent, addr)
}

async fn coordinate_of(client: &mut Client, node: &str) -> CoordinateResponse {
    let node = std::collections::BTreeMap::from([("Node", node)]);
    tokio::time::timeout(
        Duration::from_secs(5),
        client.call("get-coordinate", Some(&node)),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap()
}

#[tokio::test]
async fn get_coordinate_answers_with_a_body_and_unknown_commands_close_the_connection() {
    let (_agent, addr) = serving().await;
    let mut client = Client::connect(addr, None).await.unwrap();
    // `serf rtt` reads a body after the header, error or not: it gets one, with the agent's
    // own coordinate (8 dimensions, Serf's starting error), or saying "unknown".
    let own = coordinate_of(&mut client, "a").await;
    assert!(own.ok);
    assert_eq!((own.coord.vec.len(), own.coord.error), (8, 1.5));
    assert!(!coordinate_of(&mut client, "nobody").await.ok);

    let unknown = client.call::<()>("bogus", None).await;
    assert_eq!(unknown, Err("Unsupported command".to_string()));
    let after = tokio::time::timeout(Duration::from_secs(5), client.call::<()>("members", None))
        .await
        .expect("the closed connection fails at once");
    assert_eq!(
        after,
        Err("the agent closed the RPC connection".to_string())
    );
}
