//! Items: the model (valid by construction), the Postgres queries, and the service that
//! puts the cache in front of them. No HTTP here.

pub mod model;
pub mod repo;
pub mod service;
