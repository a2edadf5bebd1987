//! Blocking work (file I/O, decompression) called from async code.

/// Runs blocking work from async code: on a multi-threaded runtime
/// the worker hands its other tasks to the rest first; elsewhere (a
/// current-thread runtime, no runtime) it simply runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
