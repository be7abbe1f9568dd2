//! The contract suite (`contract.rs`) against two instances of one provider, serving as one
//! store through NATS JetStream (`replication = "jetstream"`), each call landing on either.

#[path = "contract.rs"]
mod contract;
