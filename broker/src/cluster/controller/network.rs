//! Raft RPCs between controller voters, over the brokers' own listener.
//!
//! Each RPC is one `Controller` request (docs/PROTOCOL.md) whose payload
//! is the openraft message as JSON; the answer's payload is the openraft
//! result as JSON. A connection that fails is dropped and reopened on the
//! next RPC, and the failure is reported to openraft as `Unreachable`, so
//! it backs off instead of spinning.

use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use weir_client::connection::Connection;
use weir_protocol::message::ControllerRequest;
use weir_protocol::{Request, Response};

use super::{TypeConfig, kind};

type NodeId = u64;

/// Makes one [`PeerClient`] per target voter.
#[derive(Debug, Clone)]
pub struct Network {
    /// Bound on connecting to a peer.
    pub connect_timeout: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            connection: None,
            connect_timeout: self.connect_timeout,
        }
    }
}

/// One voter's connection, opened lazily.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    connection: Option<Connection>,
    connect_timeout: Duration,
}

/// Why one RPC failed before the peer answered.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("controller peer {addr}: {source}")]
    Client {
        addr: String,
        source: weir_client::ClientError,
    },
    #[error("controller peer {addr} answered {error}")]
    Refused {
        addr: String,
        error: weir_protocol::ErrorCode,
    },
    #[error("controller peer {addr}: undecodable answer: {source}")]
    Decode {
        addr: String,
        source: serde_json::Error,
    },
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: u8,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, CallError> {
        let payload = serde_json::to_vec(request).map_err(|source| CallError::Decode {
            addr: self.addr.clone(),
            source,
        })?;
        let connection = match &self.connection {
            Some(connection) if !connection.is_closed() => connection.clone(),
            _ => {
                let timeout = self.connect_timeout.min(option.hard_ttl());
                let connection =
                    Connection::connect(&self.addr, timeout)
                        .await
                        .map_err(|source| CallError::Client {
                            addr: self.addr.clone(),
                            source,
                        })?;
                self.connection = Some(connection.clone());
                connection
            }
        };
        let request = Request::Controller(ControllerRequest {
            kind,
            payload: Bytes::from(payload),
        });
        let answer = async {
            connection
                .start_call(request)
                .await?
                .with_timeout(option.hard_ttl())
                .wait()
                .await
        }
        .await;
        let response = match answer {
            Ok(Response::Controller(response)) => response,
            Ok(_) => {
                self.connection = None;
                return Err(CallError::Refused {
                    addr: self.addr.clone(),
                    error: weir_protocol::ErrorCode::CorruptMessage,
                });
            }
            Err(source) => {
                self.connection = None;
                return Err(CallError::Client {
                    addr: self.addr.clone(),
                    source,
                });
            }
        };
        if !response.error.is_ok() {
            return Err(CallError::Refused {
                addr: self.addr.clone(),
                error: response.error,
            });
        }
        serde_json::from_slice(&response.payload).map_err(|source| CallError::Decode {
            addr: self.addr.clone(),
            source,
        })
    }

    /// Calls the peer and sorts the outcome into openraft's error kinds.
    async fn rpc<Req, Resp, E>(
        &mut self,
        kind: u8,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        match self
            .call::<Req, Result<Resp, RaftError<NodeId, E>>>(kind, request, option)
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(error @ CallError::Client { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&error)))
            }
            Err(error) => Err(RPCError::Network(NetworkError::new(&AnyError::new(&error)))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(kind::APPEND_ENTRIES, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(kind::INSTALL_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(kind::VOTE, &rpc, &option).await
    }
}
