//! The kv worker: store, replication, rebalancing. Built in the worker issue; nothing here yet.
