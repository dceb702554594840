//! `host-local` IPAM plugin (see `caisson_cni_plugins::hostlocal`).
caisson_cni_plugins::plugin_main!(caisson_cni_plugins::run(
    &caisson_cni_plugins::plugins::HostLocal
));
