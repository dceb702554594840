//! The gRPC contract between agent and master, and the users' cluster API
//! (`proto/caisson/v1/cluster.proto`, compiled by protox: no system `protoc`).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("caisson.v1");
}

pub use v1::*;

/// Metadata key carrying `Bearer <token>` (join token for agents, API token for users).
pub const AUTH_HEADER: &str = "authorization";

impl TaskState {
    /// FINISHED, FAILED, KILLED and LOST end a task; exactly one of them is recorded.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Lost
        )
    }
}
