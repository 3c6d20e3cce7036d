use devbox_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request is valid but the devbox is in the wrong state for it.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
}

impl CoreError {
    /// Map an agent-reported error (bad path, missing file...) to the client-facing kind.
    pub fn from_runtime(e: RuntimeError) -> CoreError {
        use devbox_protocol::ErrorKind;
        match e {
            RuntimeError::Agent(a) => match a.kind {
                ErrorKind::NotFound => CoreError::NotFound(a.message),
                ErrorKind::BadRequest | ErrorKind::IsADirectory | ErrorKind::PermissionDenied => {
                    CoreError::BadRequest(a.message)
                }
                ErrorKind::NoSpace => CoreError::NoSpace(a.message),
                _ => CoreError::Runtime(RuntimeError::Agent(a)),
            },
            other => CoreError::Runtime(other),
        }
    }
}
