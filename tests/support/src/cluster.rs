//! A 3-node (or n-node) JetStream cluster of real `nats-server`
//! processes on loopback, for tests that lose and regain nodes.
//!
//! Every node picks its own client and route ports (`-1`), so nothing is
//! bound and released: the first node starts before any other exists,
//! each later one routes to the first, and the routes gossip the rest. A
//! node that is [`NatsCluster::kill`]ed comes back with
//! [`NatsCluster::restart`] on the same ports and store, routing to every
//! other node.
//!
//! nats-server 2.9 refuses to start a clustered JetStream without a
//! configured route, so the first node gets one to a loopback port where
//! nothing listens ([`NOWHERE`]); it keeps retrying that one harmlessly.

use std::time::{Duration, Instant};

use crate::{NatsServer, ServerError, ServerOptions, port_after};

/// The cluster's name (`--cluster_name`).
pub const CLUSTER_NAME: &str = "hookmesh";

/// The route the first node starts with: the discard port, closed on
/// loopback.
pub const NOWHERE: &str = "nats://127.0.0.1:9";

/// Nodes that were started together.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    route_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `size` nodes named `n1`, `n2`, … .
    pub fn start(size: usize) -> Result<NatsCluster, ServerError> {
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            route_ports: Vec::new(),
        };
        for i in 0..size {
            let routes: Vec<String> = match cluster.route_ports.first() {
                Some(first) => vec![format!("nats://127.0.0.1:{first}")],
                None => vec![NOWHERE.to_string()],
            };
            let node = NatsServer::start_with(ServerOptions {
                args: args(i, "-1", &routes),
                ..ServerOptions::default()
            })?;
            let port = wait_route_port(&node)?;
            cluster.route_ports.push(port);
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// The client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills node `i` with SIGKILL (its store stays).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Restarts node `i` on its ports and store, routing to every other
    /// node.
    pub fn restart(&mut self, i: usize) -> Result<(), ServerError> {
        let routes: Vec<String> = (self.route_ports.iter().enumerate())
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        let own = self.route_ports[i].to_string();
        self.nodes[i].set_args(args(i, &own, &routes));
        self.nodes[i].restart()
    }

    /// Whether node `i` runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].is_running()
    }
}

fn args(i: usize, route_port: &str, routes: &[String]) -> Vec<String> {
    let mut args = vec![
        "--server_name".to_string(),
        format!("n{}", i + 1),
        "--cluster_name".to_string(),
        CLUSTER_NAME.to_string(),
        "--cluster".to_string(),
        format!("nats://127.0.0.1:{route_port}"),
    ];
    if !routes.is_empty() {
        args.push("--routes".to_string());
        args.push(routes.join(","));
    }
    args
}

/// The route port a node logged (`Listening for route connections on …`).
fn wait_route_port(node: &NatsServer) -> Result<u16, ServerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = node.log();
        if let Some(port) = port_after(&log, "Listening for route connections on ") {
            return Ok(port);
        }
        if Instant::now() > deadline {
            return Err(ServerError::NotReady { log });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
