//! Standard output helpers: noticing that whoever read our output has gone.

/// Completes when standard output is a pipe whose reading end has closed (as when
/// `head` has read its lines); never completes otherwise.
pub async fn closed() {
    #[cfg(unix)]
    if let Some(watch) = pipe_watch() {
        // A pipe's writing end reports an error condition once the reader is gone.
        if watch.ready(tokio::io::Interest::ERROR).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

#[cfg(unix)]
fn pipe_watch() -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let stdout = std::io::stdout();
    let fd = stdout.as_fd().try_clone_to_owned().ok()?;
    let file = std::fs::File::from(fd);
    if !file.metadata().ok()?.file_type().is_fifo() {
        return None;
    }
    let fd = std::os::fd::OwnedFd::from(file);
    // SAFETY: the `AsyncFd` owns `fd` (our own duplicate of stdout), so the descriptor
    // stays open and refers to the same pipe for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::ERROR) }.ok()
}
