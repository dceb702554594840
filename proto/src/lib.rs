//! The gRPC contract between agent and master. Filled in by the cluster work (issue 7).
