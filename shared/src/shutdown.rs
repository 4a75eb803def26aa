//! Work at the end of a container's life. Lambda sends the runtime SIGTERM before it
//! shuts an execution environment down only when an extension is registered, so this
//! registers an internal one that subscribes to no event (one request at init, and a
//! connection that waits), and runs a hook on SIGTERM. Lambda then gives the runtime
//! 500 ms; the aggregator writes the metric lines its container added up.

use std::future::Future;

/// The internal extension's name (unique within a function).
const EXTENSION_NAME: &str = "s3-event-aggregator-shutdown";

#[derive(Debug, thiserror::Error)]
#[error("cannot arrange for work at shutdown: {0}")]
pub struct ShutdownHookError(String);

/// Registers the extension and runs `hook` when SIGTERM comes, then exits. An error
/// means that no SIGTERM will come: the caller must not leave work for the hook.
pub async fn on_shutdown<F, Fut>(hook: F) -> Result<(), ShutdownHookError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ShutdownHookError(format!("SIGTERM handler: {e}")))?;
    let extension = lambda_extension::Extension::new()
        .with_events(&[])
        .with_extension_name(EXTENSION_NAME)
        .register()
        .await
        .map_err(|e| ShutdownHookError(format!("extension registration: {e}")))?;
    // Its next-event request never answers (no event is subscribed); it must be
    // pending for Lambda to end the init phase.
    tokio::spawn(async move {
        let _ = extension.run().await;
    });
    tokio::spawn(async move {
        if sigterm.recv().await.is_some() {
            hook().await;
            std::process::exit(0);
        }
    });
    Ok(())
}
