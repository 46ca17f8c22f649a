//! xoauth2-proxy: lets mail clients that only know passwords use Gmail. Clients log in to the
//! proxy with a local app password; the proxy logs in upstream with SASL XOAUTH2 using an OAuth
//! access token it keeps fresh, then splices the connection.

pub mod account;
pub mod accounts;
pub mod activity;
pub mod admin;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod oauth;
pub mod protocol;
pub mod provider;
pub mod proxy;
pub mod registry;
pub mod report;
pub mod secret;
pub mod store;
pub mod tls;
