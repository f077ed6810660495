//! The kv controller: membership, failure detection, topology, admin HTTP. Built in the controller issue; nothing here yet.
