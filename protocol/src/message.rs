//! Requests, responses and pushes, version 0 of every API.
//!
//! Each message is a plain struct; `wire_struct!` derives its encoding: the
//! fields in declaration order, each by its [`Wire`] impl. docs/PROTOCOL.md
//! lists every message field by field.

use bytes::Bytes;

use crate::api::{ApiKey, ErrorCode};
use crate::frame::{self, FrameHeader, FrameKind};
use crate::wire::{Reader, WireError, Writer};

/// A value with a wire encoding.
pub trait Wire: Sized {
    /// Fewest bytes an encoding takes (bounds element counts before allocating).
    const BYTES_MIN: usize;
    /// Appends the encoding.
    fn put(&self, writer: &mut Writer);
    /// Reads a value; `field` names it in errors.
    ///
    /// # Errors
    /// Whatever the bytes do wrong.
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError>;
}

macro_rules! wire_int {
    ($($ty:ty => $method:ident, $bytes:expr;)*) => {$(
        impl Wire for $ty {
            const BYTES_MIN: usize = $bytes;
            fn put(&self, writer: &mut Writer) {
                writer.$method(*self);
            }
            fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
                reader.$method(field)
            }
        }
    )*};
}

wire_int! {
    u8 => u8, 1;
    i8 => i8, 1;
    i16 => i16, 2;
    u16 => u16, 2;
    u32 => u32, 4;
    i32 => i32, 4;
    u64 => u64, 8;
    i64 => i64, 8;
}

impl Wire for String {
    const BYTES_MIN: usize = 2;
    fn put(&self, writer: &mut Writer) {
        writer.string(self);
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        reader.string(field)
    }
}

impl Wire for Option<String> {
    const BYTES_MIN: usize = 2;
    fn put(&self, writer: &mut Writer) {
        writer.nullable_string(self.as_deref());
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        reader.nullable_string(field)
    }
}

impl Wire for ErrorCode {
    const BYTES_MIN: usize = 2;
    fn put(&self, writer: &mut Writer) {
        writer.u16(self.code());
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        reader.u16(field).map(ErrorCode::from_code)
    }
}

impl<T: Wire> Wire for Vec<T> {
    const BYTES_MIN: usize = 4;
    fn put(&self, writer: &mut Writer) {
        writer.count(self.len());
        for element in self {
            element.put(writer);
        }
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        let count = reader.count(field, T::BYTES_MIN.max(1))?;
        (0..count).map(|_| T::get(reader, field)).collect()
    }
}

/// An optional list: count `0xFFFF_FFFF` means null (e.g. "all topics").
impl<T: Wire> Wire for Option<Vec<T>> {
    const BYTES_MIN: usize = 4;
    fn put(&self, writer: &mut Writer) {
        match self {
            Some(list) => list.put(writer),
            None => writer.u32(u32::MAX),
        }
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        let mut peek = Reader::new(reader.peek(4));
        if peek.u32(field)? == u32::MAX {
            reader.u32(field)?;
            return Ok(None);
        }
        Vec::get(reader, field).map(Some)
    }
}

/// Record batches as they are stored (concatenated RecordBatch v2), possibly
/// in several chunks, which are written out without copying.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordSet(pub Vec<Bytes>);

impl RecordSet {
    /// Records in one chunk.
    pub fn single(bytes: Bytes) -> Self {
        RecordSet(vec![bytes])
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer, without a copy when there is one chunk.
    pub fn into_bytes(mut self) -> Bytes {
        if self.0.len() == 1 {
            return self.0.pop().unwrap_or_default();
        }
        self.to_bytes()
    }

    /// The bytes in one buffer (copies if there are several chunks).
    pub fn to_bytes(&self) -> Bytes {
        match self.0.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => many
                .iter()
                .flat_map(|chunk| chunk.iter().copied())
                .collect::<Vec<u8>>()
                .into(),
        }
    }
}

impl Wire for RecordSet {
    const BYTES_MIN: usize = 4;
    fn put(&self, writer: &mut Writer) {
        writer.chunked_bytes(&self.0);
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        let limit = reader.remaining();
        reader.bytes(field, limit).map(RecordSet::single)
    }
}

/// An opaque byte string (`u32` length), bounded only by the frame.
impl Wire for Bytes {
    const BYTES_MIN: usize = 4;
    fn put(&self, writer: &mut Writer) {
        writer.chunked_bytes(std::slice::from_ref(self));
    }
    fn get(reader: &mut Reader, field: &'static str) -> Result<Self, WireError> {
        let limit = reader.remaining();
        reader.bytes(field, limit)
    }
}

/// Defines a struct and its [`Wire`] encoding (fields in order).
macro_rules! wire_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl Wire for $name {
            const BYTES_MIN: usize = 0 $(+ <$ty as Wire>::BYTES_MIN)*;
            fn put(&self, _writer: &mut Writer) {
                $(self.$field.put(_writer);)*
            }
            fn get(_reader: &mut Reader, _field: &'static str) -> Result<Self, WireError> {
                Ok($name {
                    $($field: <$ty as Wire>::get(_reader, concat!(stringify!($name), ".", stringify!($field)))?,)*
                })
            }
        }
    };
}

wire_struct! {
    /// A range of versions of one API.
    pub struct ApiVersionRange {
        /// The API's wire number.
        pub api_key: u16,
        /// Oldest version spoken.
        pub min_version: u16,
        /// Newest version spoken.
        pub max_version: u16,
    }
}

wire_struct! {
    /// Handshake request: who the client is and what it speaks.
    pub struct HandshakeRequest {
        /// Free text, for logs and metrics.
        pub client_name: String,
        /// Versions the client speaks.
        pub api_versions: Vec<ApiVersionRange>,
    }
}

wire_struct! {
    /// Handshake response: what the broker speaks and its limits.
    pub struct HandshakeResponse {
        /// `None`, or why the handshake failed.
        pub error: ErrorCode,
        /// The broker's id.
        pub broker_id: u32,
        /// The cluster's id.
        pub cluster_id: String,
        /// Versions the broker speaks.
        pub api_versions: Vec<ApiVersionRange>,
        /// Largest frame the broker accepts (header + body).
        pub frame_bytes_max: u32,
        /// Request bytes one connection may have in flight before the broker
        /// stops reading from it.
        pub in_flight_bytes_max: u32,
    }
}

wire_struct! {
    /// Metadata request.
    pub struct MetadataRequest {
        /// Topics to describe; `None` for all.
        pub topics: Option<Vec<String>>,
    }
}

wire_struct! {
    /// A broker's address.
    pub struct BrokerInfo {
        /// Broker id.
        pub id: u32,
        /// Host clients connect to.
        pub host: String,
        /// Port clients connect to.
        pub port: u16,
    }
}

wire_struct! {
    /// One partition's placement.
    pub struct PartitionMetadata {
        /// `None` or why the partition is unavailable.
        pub error: ErrorCode,
        /// Partition index.
        pub partition: u32,
        /// Leader broker id, -1 if none.
        pub leader: i32,
        /// Current leader epoch.
        pub leader_epoch: i32,
        /// Replica broker ids.
        pub replicas: Vec<u32>,
        /// In-sync replica broker ids.
        pub in_sync_replicas: Vec<u32>,
    }
}

wire_struct! {
    /// One topic's placement.
    pub struct TopicMetadata {
        /// `None`, or `UnknownTopicOrPartition` for a topic that does not exist.
        pub error: ErrorCode,
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<PartitionMetadata>,
    }
}

wire_struct! {
    /// Metadata response.
    pub struct MetadataResponse {
        /// The cluster's id.
        pub cluster_id: String,
        /// Controller broker id, -1 if none.
        pub controller_id: i32,
        /// Live brokers.
        pub brokers: Vec<BrokerInfo>,
        /// The topics asked for (or all).
        pub topics: Vec<TopicMetadata>,
        /// Registered brokers that are fenced (dead, stopping, or not yet
        /// caught up): they lead nothing.
        pub fenced_brokers: Vec<u32>,
    }
}

wire_struct! {
    /// A topic config entry.
    pub struct ConfigEntry {
        /// Key, e.g. `retention.ms`.
        pub key: String,
        /// Value as text.
        pub value: String,
    }
}

wire_struct! {
    /// A topic to create.
    pub struct NewTopic {
        /// Name: 1–249 characters of `[A-Za-z0-9._-]`.
        pub name: String,
        /// Number of partitions, at least 1.
        pub partitions: u32,
        /// Replicas per partition (1 on a single node).
        pub replication_factor: u16,
        /// Topic configs.
        pub configs: Vec<ConfigEntry>,
    }
}

wire_struct! {
    /// CreateTopics request.
    pub struct CreateTopicsRequest {
        /// Topics to create.
        pub topics: Vec<NewTopic>,
        /// How long to wait for creation to finish.
        pub timeout_ms: u32,
    }
}

wire_struct! {
    /// The outcome for one topic of CreateTopics or DeleteTopics.
    pub struct TopicResult {
        /// Topic name.
        pub name: String,
        /// `None` or why it failed.
        pub error: ErrorCode,
        /// Human-readable detail for an error.
        pub message: Option<String>,
    }
}

wire_struct! {
    /// CreateTopics response.
    pub struct CreateTopicsResponse {
        /// One result per requested topic.
        pub topics: Vec<TopicResult>,
    }
}

wire_struct! {
    /// DeleteTopics request.
    pub struct DeleteTopicsRequest {
        /// Topics to delete.
        pub names: Vec<String>,
        /// How long to wait for deletion to finish.
        pub timeout_ms: u32,
    }
}

wire_struct! {
    /// DeleteTopics response.
    pub struct DeleteTopicsResponse {
        /// One result per requested topic.
        pub topics: Vec<TopicResult>,
    }
}

wire_struct! {
    /// DescribeTopics request.
    pub struct DescribeTopicsRequest {
        /// Topics to describe; empty for all.
        pub names: Vec<String>,
    }
}

wire_struct! {
    /// One partition's offsets and size.
    pub struct PartitionDescription {
        /// Partition index.
        pub partition: u32,
        /// `None` or why it could not be described.
        pub error: ErrorCode,
        /// Leader broker id.
        pub leader: i32,
        /// Current leader epoch.
        pub leader_epoch: i32,
        /// First offset still stored.
        pub start_offset: u64,
        /// Next offset to be written.
        pub end_offset: u64,
        /// Offsets below it are readable by consumers.
        pub high_watermark: u64,
        /// Bytes stored.
        pub size_bytes: u64,
        /// Segments stored.
        pub segments: u32,
    }
}

wire_struct! {
    /// One topic's description.
    pub struct TopicDescription {
        /// Topic name.
        pub name: String,
        /// `None` or `UnknownTopicOrPartition`.
        pub error: ErrorCode,
        /// Topic configs in force.
        pub configs: Vec<ConfigEntry>,
        /// Its partitions.
        pub partitions: Vec<PartitionDescription>,
    }
}

wire_struct! {
    /// DescribeTopics response.
    pub struct DescribeTopicsResponse {
        /// The topics asked for (or all).
        pub topics: Vec<TopicDescription>,
    }
}

wire_struct! {
    /// Record batches for one partition.
    pub struct ProducePartition {
        /// Partition index.
        pub partition: u32,
        /// One or more concatenated RecordBatch v2.
        pub records: RecordSet,
    }
}

wire_struct! {
    /// Record batches for one topic.
    pub struct ProduceTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ProducePartition>,
    }
}

wire_struct! {
    /// Produce request. With `acks = 0` the broker sends no response.
    pub struct ProduceRequest {
        /// 0: no response; 1: after the leader's append (durable on it when
        /// its flush policy is `always`); -1: after every in-sync replica.
        pub acks: i8,
        /// How long the broker may wait for the acks.
        pub timeout_ms: u32,
        /// The batches.
        pub topics: Vec<ProduceTopic>,
    }
}

wire_struct! {
    /// The outcome for one partition of a Produce.
    pub struct ProducePartitionResponse {
        /// Partition index.
        pub partition: u32,
        /// `None` or why nothing was appended.
        pub error: ErrorCode,
        /// Offset of the first record appended, -1 on error.
        pub base_offset: i64,
        /// Broker time of the append, milliseconds.
        pub log_append_time_ms: i64,
        /// The partition's first stored offset.
        pub log_start_offset: u64,
    }
}

wire_struct! {
    /// The outcome for one topic of a Produce.
    pub struct ProduceTopicResponse {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ProducePartitionResponse>,
    }
}

wire_struct! {
    /// Produce response.
    pub struct ProduceResponse {
        /// One entry per requested topic.
        pub topics: Vec<ProduceTopicResponse>,
    }
}

wire_struct! {
    /// One partition to fetch from.
    pub struct FetchPartition {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// First offset wanted.
        pub fetch_offset: u64,
        /// Most bytes for this partition (at least one whole batch is returned).
        pub partition_max_bytes: u32,
    }
}

wire_struct! {
    /// Fetch request: returns when `min_bytes` are available or after
    /// `max_wait_ms`.
    pub struct FetchRequest {
        /// Longest wait for `min_bytes`.
        pub max_wait_ms: u32,
        /// Bytes to wait for.
        pub min_bytes: u32,
        /// Most bytes in the whole response.
        pub max_bytes: u32,
        /// Partitions, in order.
        pub partitions: Vec<FetchPartition>,
    }
}

wire_struct! {
    /// Data for one partition of a Fetch.
    pub struct FetchPartitionResponse {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// `None` or why there is no data.
        pub error: ErrorCode,
        /// Offsets below it are readable.
        pub high_watermark: u64,
        /// First offset still stored.
        pub log_start_offset: u64,
        /// Whole batches, the first holding `fetch_offset`.
        pub records: RecordSet,
    }
}

wire_struct! {
    /// Fetch response.
    pub struct FetchResponse {
        /// One entry per requested partition.
        pub partitions: Vec<FetchPartitionResponse>,
    }
}

wire_struct! {
    /// Subscribe request: the broker pushes batches from `offset` while credit lasts.
    pub struct SubscribeRequest {
        /// Chosen by the client, unique on its connection; pushes carry it.
        pub subscription_id: u32,
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// First offset wanted.
        pub offset: u64,
        /// Bytes the broker may push before it needs more credit.
        pub credit_bytes: u32,
    }
}

wire_struct! {
    /// Subscribe response.
    pub struct SubscribeResponse {
        /// `None`, or why the subscription was not created.
        pub error: ErrorCode,
        /// Offsets below it are readable.
        pub high_watermark: u64,
        /// First offset still stored.
        pub log_start_offset: u64,
    }
}

wire_struct! {
    /// Credit request: more bytes a subscription may receive.
    pub struct CreditRequest {
        /// The subscription.
        pub subscription_id: u32,
        /// Bytes added to its credit.
        pub credit_bytes: u32,
    }
}

wire_struct! {
    /// Response to Credit or Unsubscribe.
    pub struct SubscriptionAck {
        /// `None` or `UnknownSubscription`.
        pub error: ErrorCode,
    }
}

wire_struct! {
    /// Unsubscribe request.
    pub struct UnsubscribeRequest {
        /// The subscription to end.
        pub subscription_id: u32,
    }
}

wire_struct! {
    /// A push for a subscription (frame kind push, API Subscribe,
    /// correlation id = subscription id).
    pub struct SubscriptionPush {
        /// `None`, or why the subscription ended (it is then gone).
        pub error: ErrorCode,
        /// Offsets below it are readable.
        pub high_watermark: u64,
        /// Whole batches continuing where the last push ended.
        pub records: RecordSet,
    }
}

wire_struct! {
    /// One partition for ListOffsets.
    pub struct ListOffsetsPartition {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// -2: earliest; -1: latest (the high watermark); otherwise a
        /// timestamp in ms: the first offset whose record is at or after it.
        pub spec: i64,
    }
}

wire_struct! {
    /// ListOffsets request.
    pub struct ListOffsetsRequest {
        /// Partitions to look up.
        pub partitions: Vec<ListOffsetsPartition>,
    }
}

wire_struct! {
    /// One partition's answer to ListOffsets.
    pub struct ListOffsetsPartitionResponse {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// `None` or why there is no answer.
        pub error: ErrorCode,
        /// The offset; for a timestamp with no later record, the high watermark.
        pub offset: i64,
        /// The found record's timestamp, or -1.
        pub timestamp_ms: i64,
    }
}

wire_struct! {
    /// ListOffsets response.
    pub struct ListOffsetsResponse {
        /// One entry per requested partition.
        pub partitions: Vec<ListOffsetsPartitionResponse>,
    }
}

wire_struct! {
    /// InitProducerId request: a producer id and epoch for idempotent
    /// (deduplicated) produce.
    pub struct InitProducerIdRequest {
        /// A stable name for the producer (an application instance): the
        /// same name gets the same producer id with the next epoch, fencing
        /// an older instance still running. Null: a fresh id.
        pub producer_name: Option<String>,
    }
}

wire_struct! {
    /// InitProducerId response.
    pub struct InitProducerIdResponse {
        /// `None` or why no id was given.
        pub error: ErrorCode,
        /// The producer id to stamp on every batch.
        pub producer_id: i64,
        /// Its epoch; batches of an older epoch are refused.
        pub producer_epoch: i16,
    }
}

wire_struct! {
    /// A topic and partition.
    pub struct TopicPartition {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
    }
}

wire_struct! {
    /// FindCoordinator request: which broker coordinates a group.
    pub struct FindCoordinatorRequest {
        /// The group.
        pub group: String,
    }
}

wire_struct! {
    /// FindCoordinator response.
    pub struct FindCoordinatorResponse {
        /// `None` or why there is no coordinator.
        pub error: ErrorCode,
        /// The coordinator's broker id.
        pub broker_id: i32,
        /// Its client listener's host.
        pub host: String,
        /// Its client listener's port.
        pub port: u16,
    }
}

wire_struct! {
    /// JoinGroup request: join (or rejoin) a group and wait for the
    /// rebalance to complete. The coordinator assigns the partitions.
    pub struct JoinGroupRequest {
        /// The group.
        pub group: String,
        /// Empty for a new member; the id the coordinator gave otherwise.
        pub member_id: String,
        /// Static membership: an id that survives restarts without a
        /// rebalance. Null for a dynamic member.
        pub group_instance_id: Option<String>,
        /// The member is removed if no heartbeat arrives for this long.
        pub session_timeout_ms: u32,
        /// How long the coordinator waits for every member to rejoin.
        pub rebalance_timeout_ms: u32,
        /// Topics the member consumes.
        pub topics: Vec<String>,
        /// `range` or `roundrobin`; every member must name the same one.
        pub assignor: String,
    }
}

wire_struct! {
    /// JoinGroup response: the new generation and this member's partitions.
    pub struct JoinGroupResponse {
        /// `None` or why the member is not in the generation.
        pub error: ErrorCode,
        /// The generation the assignment belongs to.
        pub generation: i32,
        /// This member's id (use it from now on).
        pub member_id: String,
        /// The member chosen as leader (informational).
        pub leader: String,
        /// The assignor used.
        pub assignor: String,
        /// The partitions this member owns in the generation.
        pub assignment: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// SyncGroup request: this member's assignment in a generation.
    pub struct SyncGroupRequest {
        /// The group.
        pub group: String,
        /// The generation.
        pub generation: i32,
        /// The member.
        pub member_id: String,
    }
}

wire_struct! {
    /// SyncGroup response.
    pub struct SyncGroupResponse {
        /// `None`, or e.g. `RebalanceInProgress`, `IllegalGeneration`.
        pub error: ErrorCode,
        /// The member's partitions.
        pub assignment: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// Heartbeat request: the member is alive in this generation.
    pub struct HeartbeatRequest {
        /// The group.
        pub group: String,
        /// The generation.
        pub generation: i32,
        /// The member.
        pub member_id: String,
    }
}

wire_struct! {
    /// Response carrying only an error code (Heartbeat, LeaveGroup).
    pub struct GroupAck {
        /// `None`; `RebalanceInProgress` tells a member to rejoin.
        pub error: ErrorCode,
    }
}

wire_struct! {
    /// LeaveGroup request.
    pub struct LeaveGroupRequest {
        /// The group.
        pub group: String,
        /// The member leaving.
        pub member_id: String,
    }
}

wire_struct! {
    /// One committed offset.
    pub struct OffsetCommitPartition {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// The next offset to consume.
        pub offset: u64,
        /// Free-form text kept with the offset.
        pub metadata: Option<String>,
    }
}

wire_struct! {
    /// OffsetCommit request.
    pub struct OffsetCommitRequest {
        /// The group.
        pub group: String,
        /// The committing member's generation; -1 with an empty member id
        /// commits for a group without members (an admin reset).
        pub generation: i32,
        /// The committing member.
        pub member_id: String,
        /// Offsets to commit.
        pub offsets: Vec<OffsetCommitPartition>,
    }
}

wire_struct! {
    /// The outcome for one partition of an OffsetCommit.
    pub struct OffsetCommitPartitionResponse {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// `None` or why it was not committed.
        pub error: ErrorCode,
    }
}

wire_struct! {
    /// OffsetCommit response. A request is committed whole or not at all.
    pub struct OffsetCommitResponse {
        /// `None`, or why nothing was committed (e.g. `IllegalGeneration`).
        pub error: ErrorCode,
        /// One entry per requested partition.
        pub partitions: Vec<OffsetCommitPartitionResponse>,
    }
}

wire_struct! {
    /// OffsetFetch request.
    pub struct OffsetFetchRequest {
        /// The group.
        pub group: String,
        /// Partitions to look up; null for every committed one.
        pub partitions: Option<Vec<TopicPartition>>,
    }
}

wire_struct! {
    /// One committed offset as fetched.
    pub struct OffsetFetchPartition {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// The committed offset, -1 if none.
        pub offset: i64,
        /// Its metadata.
        pub metadata: Option<String>,
    }
}

wire_struct! {
    /// OffsetFetch response.
    pub struct OffsetFetchResponse {
        /// `None` or why nothing could be read.
        pub error: ErrorCode,
        /// The offsets.
        pub offsets: Vec<OffsetFetchPartition>,
    }
}

wire_struct! {
    /// ListGroups request.
    pub struct ListGroupsRequest {}
}

wire_struct! {
    /// One group in ListGroups.
    pub struct GroupListing {
        /// The group.
        pub group: String,
        /// `Empty`, `PreparingRebalance`, `Stable`.
        pub state: String,
        /// Members now.
        pub members: u32,
    }
}

wire_struct! {
    /// ListGroups response.
    pub struct ListGroupsResponse {
        /// Every group the coordinator knows.
        pub groups: Vec<GroupListing>,
    }
}

wire_struct! {
    /// DescribeGroup request.
    pub struct DescribeGroupRequest {
        /// The group.
        pub group: String,
    }
}

wire_struct! {
    /// One member of a described group.
    pub struct GroupMemberDescription {
        /// Member id.
        pub member_id: String,
        /// Static instance id, if any.
        pub group_instance_id: Option<String>,
        /// Topics it consumes.
        pub topics: Vec<String>,
        /// Partitions it owns.
        pub assignment: Vec<TopicPartition>,
    }
}

wire_struct! {
    /// A committed offset with the partition's end and the lag.
    pub struct GroupOffset {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// Committed offset, -1 if none.
        pub committed: i64,
        /// The partition's high watermark (0 if it no longer exists).
        pub high_watermark: u64,
        /// high_watermark − committed (the whole partition if none).
        pub lag: u64,
    }
}

wire_struct! {
    /// DescribeGroup response.
    pub struct DescribeGroupResponse {
        /// `None` or `UnknownGroup`.
        pub error: ErrorCode,
        /// The group.
        pub group: String,
        /// Its state.
        pub state: String,
        /// The assignor in use.
        pub assignor: String,
        /// The current generation.
        pub generation: i32,
        /// Its members.
        pub members: Vec<GroupMemberDescription>,
        /// Committed offsets and lag, per partition.
        pub offsets: Vec<GroupOffset>,
    }
}

/// Spec value for ListOffsets: the earliest offset.
pub const OFFSET_SPEC_EARLIEST: i64 = -2;
/// Spec value for ListOffsets: the latest offset (high watermark).
pub const OFFSET_SPEC_LATEST: i64 = -1;

/// Why a frame could not become a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The API key is not one this build knows.
    #[error("unknown api key {0}")]
    UnsupportedApi(u16),
    /// This build does not speak that version.
    #[error("unsupported version {version} of {api:?}")]
    UnsupportedVersion {
        /// The API.
        api: ApiKey,
        /// The version asked for.
        version: u16,
    },
    /// The frame kind does not fit (e.g. a push sent by a client).
    #[error("unexpected {0:?} frame")]
    UnexpectedKind(FrameKind),
    /// The body does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl DecodeError {
    /// The error code to answer with before closing the connection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedApi(_) => ErrorCode::UnsupportedApi,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnexpectedKind(_) | DecodeError::Wire(_) => ErrorCode::CorruptMessage,
        }
    }
}

macro_rules! message_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident($ty:ty) = $api:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $(
                #[doc = concat!("The ", stringify!($api), " API.")]
                $variant($ty),
            )*
        }

        impl $name {
            /// The message's API.
            pub fn api(&self) -> ApiKey {
                match self {
                    $($name::$variant(_) => ApiKey::$api,)*
                }
            }

            /// Encodes the body (version 0) as parts for a vectored write.
            pub fn encode_body(&self) -> Writer {
                let mut writer = Writer::new();
                match self {
                    $($name::$variant(message) => message.put(&mut writer),)*
                }
                writer
            }

            /// Decodes a body of `api` at `version`.
            ///
            /// # Errors
            /// [`DecodeError`].
            pub fn decode_body(api_key: u16, version: u16, body: Bytes) -> Result<Self, DecodeError> {
                let api = ApiKey::from_code(api_key).ok_or(DecodeError::UnsupportedApi(api_key))?;
                if !api.supports(version) {
                    return Err(DecodeError::UnsupportedVersion { api, version });
                }
                let mut reader = Reader::new(body);
                #[allow(unreachable_patterns)]
                let message = match api {
                    $(ApiKey::$api => $name::$variant(<$ty>::get(&mut reader, stringify!($ty))?),)*
                    _ => return Err(DecodeError::UnsupportedApi(api_key)),
                };
                reader.finish()?;
                Ok(message)
            }
        }
    };
}

wire_struct! {
    /// Broker to broker: one controller message. `kind` says what the
    /// payload (JSON, see docs/PROTOCOL.md) holds.
    pub struct ControllerRequest {
        /// 0 Raft AppendEntries, 1 Raft Vote, 2 Raft InstallSnapshot,
        /// 3 a metadata proposal, 4 a broker heartbeat.
        pub kind: u8,
        /// The message, JSON.
        pub payload: Bytes,
    }
}

wire_struct! {
    /// The answer to a [`ControllerRequest`].
    pub struct ControllerResponse {
        /// `None`, or `NotController` (payload: the leader's id as JSON, or
        /// `null`), or why the request failed.
        pub error: ErrorCode,
        /// The answer, JSON.
        pub payload: Bytes,
    }
}

wire_struct! {
    /// One partition a follower fetches.
    pub struct ReplicaFetchPartition {
        /// Topic.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// The leader epoch the follower follows.
        pub leader_epoch: i32,
        /// The follower's durable end: the first offset it wants.
        pub fetch_offset: u64,
        /// The newest epoch in the follower's epoch cache, -1 for none.
        pub last_fetched_epoch: i32,
    }
}

wire_struct! {
    /// Broker to broker: a follower's fetch of partitions from their leader.
    pub struct ReplicaFetchRequest {
        /// The follower's broker id.
        pub replica_id: u32,
        /// Longest the leader may wait for data, milliseconds.
        pub max_wait_ms: u32,
        /// Most bytes of records to return over all partitions.
        pub max_bytes: u32,
        /// The partitions.
        pub partitions: Vec<ReplicaFetchPartition>,
    }
}

wire_struct! {
    /// One partition's answer to a replica fetch.
    pub struct ReplicaFetchData {
        /// Topic.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// `None`, or `NotLeader`, `FencedLeaderEpoch`, `UnknownLeaderEpoch`,
        /// `UnknownTopicOrPartition`.
        pub error: ErrorCode,
        /// The leader's high watermark.
        pub high_watermark: u64,
        /// The leader's first stored offset.
        pub log_start_offset: u64,
        /// 1 if the follower's log diverges from the leader's: it must cut
        /// back to where `diverging_epoch` ends (`diverging_end_offset`).
        pub diverging: u8,
        /// The largest epoch the leader knows at or below the follower's.
        pub diverging_epoch: i32,
        /// Where that epoch ends on the leader.
        pub diverging_end_offset: u64,
        /// Whole batches from `fetch_offset`, as stored.
        pub records: RecordSet,
    }
}

wire_struct! {
    /// The answer to a [`ReplicaFetchRequest`].
    pub struct ReplicaFetchResponse {
        /// `None`, or why the whole request was refused.
        pub error: ErrorCode,
        /// Per partition.
        pub partitions: Vec<ReplicaFetchData>,
    }
}

wire_struct! {
    /// ReassignPartition request: move a partition's replicas to `replicas`
    /// (the preferred leader first). The new replicas catch up before the
    /// old ones are dropped.
    pub struct ReassignPartitionRequest {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// The broker ids the partition is to live on.
        pub replicas: Vec<u32>,
    }
}

wire_struct! {
    /// The answer to a [`ReassignPartitionRequest`]: the move has started
    /// (its progress shows in Metadata), or why it was refused.
    pub struct ReassignPartitionResponse {
        /// `None`, `UnknownTopicOrPartition`, `InvalidRequest` (with the
        /// reason in `message`), `NotController` (retriable).
        pub error: ErrorCode,
        /// Why, when refused.
        pub message: String,
    }
}

message_enum! {
    /// Every request a client may send.
    Request {
        Handshake(HandshakeRequest) = Handshake,
        Metadata(MetadataRequest) = Metadata,
        CreateTopics(CreateTopicsRequest) = CreateTopics,
        DeleteTopics(DeleteTopicsRequest) = DeleteTopics,
        DescribeTopics(DescribeTopicsRequest) = DescribeTopics,
        Produce(ProduceRequest) = Produce,
        Fetch(FetchRequest) = Fetch,
        Subscribe(SubscribeRequest) = Subscribe,
        Credit(CreditRequest) = Credit,
        Unsubscribe(UnsubscribeRequest) = Unsubscribe,
        ListOffsets(ListOffsetsRequest) = ListOffsets,
        InitProducerId(InitProducerIdRequest) = InitProducerId,
        FindCoordinator(FindCoordinatorRequest) = FindCoordinator,
        JoinGroup(JoinGroupRequest) = JoinGroup,
        SyncGroup(SyncGroupRequest) = SyncGroup,
        Heartbeat(HeartbeatRequest) = Heartbeat,
        LeaveGroup(LeaveGroupRequest) = LeaveGroup,
        OffsetCommit(OffsetCommitRequest) = OffsetCommit,
        OffsetFetch(OffsetFetchRequest) = OffsetFetch,
        ListGroups(ListGroupsRequest) = ListGroups,
        DescribeGroup(DescribeGroupRequest) = DescribeGroup,
        Controller(ControllerRequest) = Controller,
        ReplicaFetch(ReplicaFetchRequest) = ReplicaFetch,
        ReassignPartition(ReassignPartitionRequest) = ReassignPartition,
    }
}

message_enum! {
    /// Every response a broker may send.
    Response {
        Handshake(HandshakeResponse) = Handshake,
        Metadata(MetadataResponse) = Metadata,
        CreateTopics(CreateTopicsResponse) = CreateTopics,
        DeleteTopics(DeleteTopicsResponse) = DeleteTopics,
        DescribeTopics(DescribeTopicsResponse) = DescribeTopics,
        Produce(ProduceResponse) = Produce,
        Fetch(FetchResponse) = Fetch,
        Subscribe(SubscribeResponse) = Subscribe,
        Credit(SubscriptionAck) = Credit,
        Unsubscribe(SubscriptionAck) = Unsubscribe,
        ListOffsets(ListOffsetsResponse) = ListOffsets,
        InitProducerId(InitProducerIdResponse) = InitProducerId,
        FindCoordinator(FindCoordinatorResponse) = FindCoordinator,
        JoinGroup(JoinGroupResponse) = JoinGroup,
        SyncGroup(SyncGroupResponse) = SyncGroup,
        Heartbeat(GroupAck) = Heartbeat,
        LeaveGroup(GroupAck) = LeaveGroup,
        OffsetCommit(OffsetCommitResponse) = OffsetCommit,
        OffsetFetch(OffsetFetchResponse) = OffsetFetch,
        ListGroups(ListGroupsResponse) = ListGroups,
        DescribeGroup(DescribeGroupResponse) = DescribeGroup,
        Controller(ControllerResponse) = Controller,
        ReplicaFetch(ReplicaFetchResponse) = ReplicaFetch,
        ReassignPartition(ReassignPartitionResponse) = ReassignPartition,
    }
}

/// A frame with its body as parts, ready for a vectored write.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// Length prefix and header, then the body parts.
    pub parts: Vec<Bytes>,
}

impl EncodedFrame {
    fn new(header: FrameHeader, body: Writer) -> Self {
        let mut head = bytes::BytesMut::new();
        frame::put_header(&mut head, &header, body.len());
        let mut parts = vec![head.freeze()];
        parts.extend(body.into_parts());
        EncodedFrame { parts }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Never true: a frame has a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// All parts in one buffer (copies; for tests and small frames).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts
            .iter()
            .flat_map(|part| part.iter().copied())
            .collect()
    }
}

/// The frame a broker sends before closing a connection whose input it
/// cannot decode: a response whose body is one error code.
pub fn error_frame(api_key: u16, correlation_id: u32, error: ErrorCode) -> EncodedFrame {
    let header = FrameHeader {
        kind: FrameKind::Response,
        api_key,
        api_version: 0,
        correlation_id,
    };
    let mut body = Writer::new();
    error.put(&mut body);
    EncodedFrame::new(header, body)
}

impl Request {
    /// The whole request frame.
    pub fn encode(&self, correlation_id: u32) -> EncodedFrame {
        let header = FrameHeader {
            kind: FrameKind::Request,
            api_key: self.api().code(),
            api_version: 0,
            correlation_id,
        };
        EncodedFrame::new(header, self.encode_body())
    }
}

impl Response {
    /// The whole response frame answering `correlation_id`.
    pub fn encode(&self, correlation_id: u32) -> EncodedFrame {
        let header = FrameHeader {
            kind: FrameKind::Response,
            api_key: self.api().code(),
            api_version: 0,
            correlation_id,
        };
        EncodedFrame::new(header, self.encode_body())
    }
}

impl SubscriptionPush {
    /// The whole push frame for `subscription_id`.
    pub fn encode(&self, subscription_id: u32) -> EncodedFrame {
        let header = FrameHeader {
            kind: FrameKind::Push,
            api_key: ApiKey::Subscribe.code(),
            api_version: 0,
            correlation_id: subscription_id,
        };
        let mut body = Writer::new();
        self.put(&mut body);
        EncodedFrame::new(header, body)
    }

    /// Decodes a push body.
    ///
    /// # Errors
    /// [`DecodeError::Wire`].
    pub fn decode(body: Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let push = SubscriptionPush::get(&mut reader, "SubscriptionPush")?;
        reader.finish()?;
        Ok(push)
    }
}
