//! A Rust program logging to `logbookd` through `logbook::client`: events
//! go to the agent's `ingest.sock` (and to stderr), without ever blocking
//! the loop, whether or not the agent is running. With
//! `$LOGBOOK_API_SOCKET` set, the run is also a session: opened with tags,
//! package and metadata, tagged on the way, closed at the end.
//!
//! ```sh
//! cargo run --example tracing_client -- /run/logbook/ingest.sock
//! # or: LOGBOOK_INGEST_SOCKET=/tmp/lb/ingest.sock LOGBOOK_API_SOCKET=/tmp/lb/api.sock \
//! #     cargo run --example tracing_client
//! ```

use std::time::Duration;

use tracing_subscriber::prelude::*;

fn main() {
    let mut builder = logbook::client::LogbookLayer::builder();
    if let Some(path) = std::env::args_os().nth(1) {
        builder = builder.socket(path);
    }
    let layer = builder.build();
    let logbook = layer.handle();
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();

    // Session control is a plain blocking call; failing to reach the agent
    // must not stop the robot, so it is only reported.
    let mut session = std::env::var_os(logbook::client::API_SOCKET_ENV).and_then(|_| {
        let new = logbook::client::NewSession::new()
            .tag("example")
            .package("tracing_client", Some(env!("CARGO_PKG_VERSION")))
            .meta("mission", "m-17");
        logbook::client::Api::new()
            .open(&new)
            .inspect_err(|e| eprintln!("logbook: no session: {e}"))
            .ok()
    });
    if let Some(s) = &session {
        eprintln!(
            "logbook: session {} ({})",
            s.id(),
            s.artifact_dir().display()
        );
    }

    let mission = tracing::info_span!("mission", id = "m-17");
    let _mission = mission.enter();
    for tick in 0..10u32 {
        let control = tracing::debug_span!("control_loop");
        let _control = control.enter();
        tracing::info!(tick, speed_mps = 0.4 + f64::from(tick) / 10.0, "moving");
        if tick % 4 == 3 {
            tracing::warn!(tick, distance_m = 0.8, "obstacle close");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::error!(joint = 3, temp_c = 81.5, "arm over temperature");
    if let Some(s) = &mut session {
        if let Err(e) = s.tag("arm-overheat") {
            eprintln!("logbook: tagging failed: {e}");
        }
    }

    let delivered = logbook.flush(Duration::from_secs(2));
    eprintln!(
        "logbook: {} (dropped {})",
        if delivered {
            "all events delivered"
        } else {
            "agent unreachable, events not delivered"
        },
        logbook.dropped()
    );
    if let Some(s) = session {
        match s.fail("arm over temperature") {
            Ok(v) => eprintln!("logbook: session {} closed as {:?}", v.id, v.status),
            Err(e) => eprintln!("logbook: closing the session failed: {e}"),
        }
    }
}
