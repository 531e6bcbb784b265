//! The WASI context of one invocation: nothing is granted unless the
//! manifest says so.

use std::time::Duration;

use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx};

use crate::manifest::Sandbox;

/// Builds the context: no preopened directories, no sockets, no name
/// lookups, no stdin; environment variables only as listed; clocks frozen
/// at zero unless `clock` is granted. Randomness stays available (the
/// standard library needs it to seed hash maps).
pub fn wasi_ctx(sandbox: &Sandbox) -> WasiCtx {
    let mut builder = WasiCtx::builder();
    builder
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (key, value) in &sandbox.env {
        builder.env(key, value);
    }
    if !sandbox.clock {
        builder.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    }
    builder.build()
}

/// A clock that always reads zero.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}
