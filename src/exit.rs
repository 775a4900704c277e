//! How the three binaries end on an error: the whole cause chain on one line
//! on stderr, behind the program's name (`logbook: no socket at …: …`), and a
//! non-zero status, except for a closed pipe (`logbook logs | head`), which
//! is a normal way for a reader to stop and exits 0 quietly. And how they
//! are asked to stop: [`terminated`], SIGTERM or SIGINT.

use std::error::Error;
use std::process::ExitCode;

/// Prints `err` and its sources for `program` and returns the exit status.
pub fn report(program: &str, err: &(dyn Error + 'static)) -> ExitCode {
    if is_broken_pipe(err) {
        return ExitCode::SUCCESS;
    }
    eprintln!("{program}: {}", one_line(err));
    ExitCode::FAILURE
}

/// `err` and each of its sources, joined with `: `.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// Resolves when the process gets SIGTERM (systemd's stop) or SIGINT
/// (Ctrl-C): every binary's signal to shut down cleanly.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::error!("cannot install the SIGTERM handler ({e}); only Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `work` until it returns, cancelling `shutdown` when the process is
/// [`terminated`] (then `on_signal` runs first, for a line to the user).
/// No task is spawned: the signal watch lives exactly as long as `work`,
/// and ends with it when `work` returns on its own.
pub async fn run_until_terminated<T>(
    shutdown: tokio_util::sync::CancellationToken,
    work: impl std::future::Future<Output = T>,
    on_signal: impl FnOnce(),
) -> T {
    let watch = shutdown.clone();
    let signals = async move {
        tokio::select! {
            _ = terminated() => {
                on_signal();
                watch.cancel();
            }
            _ = watch.cancelled() => {}
        }
    };
    let work = async move {
        let out = work.await;
        // Ends the signal watch when `work` ended by itself.
        shutdown.cancel();
        out
    };
    let (out, ()) = tokio::join!(work, signals);
    out
}

fn is_broken_pipe(err: &(dyn Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot list sessions")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_on_one_line_and_broken_pipe_is_quiet() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no socket at /run/logbook/api.sock",
        ));
        assert_eq!(
            one_line(&e),
            "cannot list sessions: no socket at /run/logbook/api.sock"
        );
        assert_eq!(report("logbook", &e), ExitCode::FAILURE);
        let pipe = Outer(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(report("logbook", &pipe), ExitCode::SUCCESS);
    }
}
