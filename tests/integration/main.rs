//! Integration tests: real hubs on 127.0.0.1:0, real sockets, real processes.
//!
//! One test binary (faster to build and link than one per file); `support` holds the
//! shared helper that starts a hub and watches what it reports.

mod bench;
mod browser;
mod cli;
mod client;
mod cluster;
mod consumers;
mod control;
mod delivery;
mod demo;
mod faults;
mod flood;
mod hostile;
mod js_client;
mod logging;
mod node;
mod pool;
mod properties;
mod protocol;
mod security;
mod security_cli;
mod streams;
mod support;
mod tls;
mod ws;
