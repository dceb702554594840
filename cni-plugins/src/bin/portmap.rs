//! `portmap` plugin (see `caisson_cni_plugins::plugins::portmap`).
caisson_cni_plugins::plugin_main!(caisson_cni_plugins::run(
    &caisson_cni_plugins::plugins::portmap::Portmap
));
