//! HostService: one per hypervisor host. The libvirt-driven service itself
//! arrives with issue 3; this crate already runs the host's gRPC endpoint
//! (health and reflection) so deployments can be laid out.
