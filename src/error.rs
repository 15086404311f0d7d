//! [`IoError`]: an I/O failure that keeps its source and can still be cloned and
//! compared, as the hub's and the client's error values are.

use std::fmt;
use std::io;
use std::sync::Arc;

/// An [`io::Error`], shared: cloning it clones a reference, [`IoError::get_ref`] is
/// the original error (its kind, its OS error code), and two compare equal when their
/// kinds and messages do (an `io::Error` itself is neither `Clone` nor `PartialEq`).
/// It is transparent: it displays as the original, and its source is the original's.
///
/// # Examples
///
/// ```
/// let e = hubcast::IoError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
/// assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
/// assert_eq!(e.get_ref().kind(), std::io::ErrorKind::BrokenPipe);
/// assert_eq!(e, e.clone());
/// ```
#[derive(Debug, Clone)]
pub struct IoError(Arc<io::Error>);

impl IoError {
    /// What kind of failure it was.
    pub fn kind(&self) -> io::ErrorKind {
        self.0.kind()
    }

    /// The original error.
    pub fn get_ref(&self) -> &io::Error {
        &self.0
    }
}

impl From<io::Error> for IoError {
    fn from(error: io::Error) -> Self {
        IoError(Arc::new(error))
    }
}

impl From<io::ErrorKind> for IoError {
    fn from(kind: io::ErrorKind) -> Self {
        IoError::from(io::Error::from(kind))
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoError {}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
