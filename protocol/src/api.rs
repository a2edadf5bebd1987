//! API keys, the versions this build speaks, and error codes.

/// Every API of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKey {
    /// Version negotiation and limits; optional, usually first.
    Handshake,
    /// Brokers, topics, partitions, leaders.
    Metadata,
    /// Create topics.
    CreateTopics,
    /// Delete topics.
    DeleteTopics,
    /// Partition offsets, sizes and configs of topics.
    DescribeTopics,
    /// Append record batches.
    Produce,
    /// Pull record batches (long poll).
    Fetch,
    /// Start a push subscription with credit-based flow control.
    Subscribe,
    /// Grant a subscription more credit (bytes).
    Credit,
    /// End a push subscription.
    Unsubscribe,
    /// Offsets by position (earliest, latest) or timestamp.
    ListOffsets,
    /// A producer id and epoch for idempotent produce.
    InitProducerId,
    /// The broker coordinating a consumer group.
    FindCoordinator,
    /// Join a group; answered when the rebalance completes.
    JoinGroup,
    /// A member's assignment in a generation.
    SyncGroup,
    /// A member is alive; learns of rebalances.
    Heartbeat,
    /// A member leaves its group.
    LeaveGroup,
    /// Commit a group's offsets.
    OffsetCommit,
    /// Read a group's committed offsets.
    OffsetFetch,
    /// The groups a coordinator knows.
    ListGroups,
    /// A group's members, assignment, offsets and lag.
    DescribeGroup,
    /// Broker to broker: the controller quorum's messages (Raft RPCs,
    /// proposals forwarded to the controller leader, broker heartbeats).
    Controller,
    /// Broker to broker: a follower fetches its partitions from their leader.
    ReplicaFetch,
    /// Move a partition's replicas to another set of brokers.
    ReassignPartition,
}

impl ApiKey {
    /// All keys, in numeric order.
    pub const ALL: [ApiKey; 24] = [
        ApiKey::Handshake,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::DescribeTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::Subscribe,
        ApiKey::Credit,
        ApiKey::Unsubscribe,
        ApiKey::ListOffsets,
        ApiKey::InitProducerId,
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::SyncGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroup,
        ApiKey::Controller,
        ApiKey::ReplicaFetch,
        ApiKey::ReassignPartition,
    ];

    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            ApiKey::Handshake => 0,
            ApiKey::Metadata => 1,
            ApiKey::CreateTopics => 2,
            ApiKey::DeleteTopics => 3,
            ApiKey::DescribeTopics => 4,
            ApiKey::Produce => 5,
            ApiKey::Fetch => 6,
            ApiKey::Subscribe => 7,
            ApiKey::Credit => 8,
            ApiKey::Unsubscribe => 9,
            ApiKey::ListOffsets => 10,
            ApiKey::InitProducerId => 11,
            ApiKey::FindCoordinator => 12,
            ApiKey::JoinGroup => 13,
            ApiKey::SyncGroup => 14,
            ApiKey::Heartbeat => 15,
            ApiKey::LeaveGroup => 16,
            ApiKey::OffsetCommit => 17,
            ApiKey::OffsetFetch => 18,
            ApiKey::ListGroups => 19,
            ApiKey::DescribeGroup => 20,
            ApiKey::Controller => 21,
            ApiKey::ReplicaFetch => 22,
            ApiKey::ReassignPartition => 23,
        }
    }

    /// The key for a wire number, if it is one this build knows.
    pub fn from_code(code: u16) -> Option<ApiKey> {
        ApiKey::ALL.into_iter().find(|key| key.code() == code)
    }

    /// Versions of this API this build speaks (inclusive range).
    pub fn versions(self) -> (u16, u16) {
        (0, 0)
    }

    /// Whether this build speaks `version` of the API.
    pub fn supports(self, version: u16) -> bool {
        let (min, max) = self.versions();
        (min..=max).contains(&version)
    }
}

/// Error codes carried in responses (top-level or per topic/partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Success.
    None,
    /// The broker failed in a way it did not expect; see its log.
    Unknown,
    /// The frame or its body could not be decoded; the connection is closed.
    CorruptMessage,
    /// The frame exceeds the broker's `max_frame_bytes`; the connection is closed.
    FrameTooLarge,
    /// The broker does not know the API key; the connection is closed.
    UnsupportedApi,
    /// The broker does not speak this version of the API; the connection is closed.
    UnsupportedVersion,
    /// A field is out of its domain (e.g. acks 2, zero partitions).
    InvalidRequest,
    /// The topic or partition does not exist.
    UnknownTopicOrPartition,
    /// CreateTopics: the topic exists already.
    TopicAlreadyExists,
    /// The topic name is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]`.
    InvalidTopic,
    /// A record batch is malformed or fails its CRC; nothing was appended.
    CorruptBatch,
    /// A record batch exceeds the broker's batch limit; nothing was appended.
    BatchTooLarge,
    /// The offset is outside the partition's `[start, end]`.
    OffsetOutOfRange,
    /// This broker is not the partition's leader; refresh metadata.
    NotLeader,
    /// The broker's disk is full; nothing was appended. Retriable.
    StorageFull,
    /// An I/O error on the broker; nothing acknowledged was lost. Retriable.
    StorageError,
    /// The request did not complete within its timeout.
    Timeout,
    /// Credit or Unsubscribe named a subscription this connection does not have.
    UnknownSubscription,
    /// The broker is at its connection limit; the connection is closed.
    TooManyConnections,
    /// The broker is shutting down. Retriable elsewhere or later.
    ShuttingDown,
    /// A batch's sequence does not follow the producer's last one on the
    /// partition (a gap: something was lost in between); nothing appended.
    OutOfOrderSequence,
    /// A batch from a producer epoch older than the partition has seen: a
    /// newer instance of the producer took over (fenced); nothing appended.
    ProducerFenced,
    /// A batch from a producer id the partition has no state for, not
    /// starting at sequence 0; nothing appended.
    UnknownProducerId,
    /// The group does not exist (Heartbeat, SyncGroup, LeaveGroup,
    /// DescribeGroup).
    UnknownGroup,
    /// The member id is not (or no longer) in the group: rejoin as new.
    UnknownMemberId,
    /// The generation is not the group's current one: a stale member is
    /// fenced; rejoin.
    IllegalGeneration,
    /// The group is rebalancing: rejoin (JoinGroup with the member id).
    RebalanceInProgress,
    /// OffsetCommit for a partition the member does not own; nothing
    /// committed.
    PartitionNotAssigned,
    /// The operation needs a group without members (an offset reset).
    GroupNotEmpty,
    /// A session timeout outside the broker's allowed range.
    InvalidSessionTimeout,
    /// A member named an assignor other than the group's.
    InconsistentAssignor,
    /// A newer process of the same static instance took this member's
    /// place: this one must stop consuming.
    FencedInstanceId,
    /// `acks=all` with fewer in-sync replicas than `min_insync_replicas`:
    /// nothing was appended.
    NotEnoughReplicas,
    /// Appended, but the in-sync set shrank below `min_insync_replicas`
    /// before it was replicated: the batch may be kept; retry.
    NotEnoughReplicasAfterAppend,
    /// The request named an older leader epoch than the partition's.
    FencedLeaderEpoch,
    /// The request named a leader epoch newer than this broker knows.
    UnknownLeaderEpoch,
    /// A controller request reached a broker that is not the controller
    /// leader (or not a controller voter); the response names the leader
    /// when it is known.
    NotController,
    /// A group call reached a broker that does not coordinate the group
    /// (its offsets partition is led elsewhere, or was only just taken
    /// over and is loading): FindCoordinator again and retry.
    NotCoordinator,
    /// FindCoordinator: the group's offsets partition has no leader now
    /// (an election, or the offsets topic is being created). Retriable.
    CoordinatorNotAvailable,
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16); 39] = [
        (ErrorCode::None, 0),
        (ErrorCode::Unknown, 1),
        (ErrorCode::CorruptMessage, 2),
        (ErrorCode::FrameTooLarge, 3),
        (ErrorCode::UnsupportedApi, 4),
        (ErrorCode::UnsupportedVersion, 5),
        (ErrorCode::InvalidRequest, 6),
        (ErrorCode::UnknownTopicOrPartition, 7),
        (ErrorCode::TopicAlreadyExists, 8),
        (ErrorCode::InvalidTopic, 9),
        (ErrorCode::CorruptBatch, 10),
        (ErrorCode::BatchTooLarge, 11),
        (ErrorCode::OffsetOutOfRange, 12),
        (ErrorCode::NotLeader, 13),
        (ErrorCode::StorageFull, 14),
        (ErrorCode::StorageError, 15),
        (ErrorCode::Timeout, 16),
        (ErrorCode::UnknownSubscription, 17),
        (ErrorCode::TooManyConnections, 18),
        (ErrorCode::ShuttingDown, 19),
        (ErrorCode::OutOfOrderSequence, 20),
        (ErrorCode::ProducerFenced, 21),
        (ErrorCode::UnknownProducerId, 22),
        (ErrorCode::UnknownGroup, 23),
        (ErrorCode::UnknownMemberId, 24),
        (ErrorCode::IllegalGeneration, 25),
        (ErrorCode::RebalanceInProgress, 26),
        (ErrorCode::PartitionNotAssigned, 27),
        (ErrorCode::GroupNotEmpty, 28),
        (ErrorCode::InvalidSessionTimeout, 29),
        (ErrorCode::InconsistentAssignor, 30),
        (ErrorCode::FencedInstanceId, 31),
        (ErrorCode::NotEnoughReplicas, 32),
        (ErrorCode::NotEnoughReplicasAfterAppend, 33),
        (ErrorCode::FencedLeaderEpoch, 34),
        (ErrorCode::UnknownLeaderEpoch, 35),
        (ErrorCode::NotController, 36),
        (ErrorCode::NotCoordinator, 37),
        (ErrorCode::CoordinatorNotAvailable, 38),
    ];

    /// The number on the wire.
    pub fn code(self) -> u16 {
        Self::TABLE
            .iter()
            .find(|(error, _)| *error == self)
            .map_or(1, |(_, code)| *code)
    }

    /// The error for a wire number; unknown numbers (from a newer broker)
    /// read as [`ErrorCode::Unknown`].
    pub fn from_code(code: u16) -> ErrorCode {
        Self::TABLE
            .iter()
            .find(|(_, number)| *number == code)
            .map_or(ErrorCode::Unknown, |(error, _)| *error)
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::NotEnoughReplicasAfterAppend
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::UnknownLeaderEpoch
                | ErrorCode::NotController
                | ErrorCode::NotCoordinator
                | ErrorCode::CoordinatorNotAvailable
                | ErrorCode::StorageFull
                | ErrorCode::StorageError
                | ErrorCode::Timeout
                | ErrorCode::ShuttingDown
                | ErrorCode::TooManyConnections
        )
    }

    /// True for [`ErrorCode::None`].
    pub fn is_ok(self) -> bool {
        self == ErrorCode::None
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?} ({})", self.code())
    }
}
