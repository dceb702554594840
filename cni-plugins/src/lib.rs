//! Shared skeleton for caisson's CNI plugins. Filled in by the networking work (issue 5).
