//! The client's error type.

use weir_protocol::ErrorCode;

/// Everything a client call can report.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached or the connection failed.
    #[error("connection to {addr} failed: {message}")]
    Connect {
        /// The broker address.
        addr: String,
        /// The OS error.
        message: String,
    },
    /// The connection closed while the call was in flight.
    #[error("connection closed")]
    Closed,
    /// The broker refused the connection: it serves as many connections as
    /// its limit allows (`connections_max`, or `connections_max_per_address`
    /// for this client's address). Retriable: slots free as others close.
    #[error("broker {addr} refused the connection: too many connections")]
    TooManyConnections {
        /// The broker address.
        addr: String,
    },
    /// The broker answered with an error.
    #[error("broker error {0}")]
    Broker(ErrorCode),
    /// The broker answered with something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No answer within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// The topic does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The call's arguments are invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An idempotent producer stopped: one of its batches failed for good,
    /// so its sequence on that partition has a gap it cannot close. Create
    /// a new producer (with the same `producer_name` it fences this one).
    #[error("producer stopped: {0}")]
    ProducerFailed(String),
}

impl ClientError {
    /// Whether retrying the same call later can succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Broker(code) => code.is_retriable(),
            ClientError::Closed
            | ClientError::Timeout
            | ClientError::Connect { .. }
            | ClientError::TooManyConnections { .. } => true,
            _ => false,
        }
    }
}

/// Result alias for the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
