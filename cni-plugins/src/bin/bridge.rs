//! `bridge` plugin (see `caisson_cni_plugins::plugins::bridge`).
caisson_cni_plugins::plugin_main!(caisson_cni_plugins::plugins::bridge::main());
