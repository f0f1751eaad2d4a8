//! What the CLI tells the user when something fails: a message and an exit
//! code, one per kind of failure (docs/cli.md lists them).

use isthmus_core::local::LocalError;

/// Exit codes, documented in docs/cli.md.
pub mod exit {
    /// Every code, for the docs check.
    pub const ALL: [u8; 5] = [FAILURE, BAD_INPUT, NOT_FOUND, REFUSED, UNREACHABLE];

    /// Something failed that has no more specific code.
    pub const FAILURE: u8 = 1;
    /// Bad input: a malformed token, an invalid name or flag.
    pub const BAD_INPUT: u8 = 2;
    /// The thing named does not exist (an unknown service or token).
    pub const NOT_FOUND: u8 = 3;
    /// Refused: token expired, already used, revoked or tampered; linking
    /// a cluster to itself or twice; fingerprint mismatch.
    pub const REFUSED: u8 = 4;
    /// A controller or peer could not be reached.
    pub const UNREACHABLE: u8 = 5;
}

/// An error for the user, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(exit::FAILURE, format!("{e:#}"))
    }
}

impl From<LocalError> for CliError {
    fn from(e: LocalError) -> Self {
        let code = match e {
            LocalError::Unreachable { .. } => exit::UNREACHABLE,
            LocalError::NoController { .. } => exit::NOT_FOUND,
            _ => exit::FAILURE,
        };
        Self::new(code, e.to_string())
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument => exit::BAD_INPUT,
            Code::NotFound => exit::NOT_FOUND,
            Code::FailedPrecondition | Code::AlreadyExists | Code::PermissionDenied => exit::REFUSED,
            Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
            _ => exit::FAILURE,
        };
        Self::new(code, s.message().to_string())
    }
}
