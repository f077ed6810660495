//! kvctl: the kv client library. Built in the kvctl issue; nothing here yet.
