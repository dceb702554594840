//! `loopback` plugin (see `caisson_cni_plugins::plugins::loopback`).
caisson_cni_plugins::plugin_main!(caisson_cni_plugins::run(
    &caisson_cni_plugins::plugins::loopback::Loopback
));
